"""Build the frozen out-of-domain evaluation sets in ``data/other_domain/``.

Three kinds of text the shipped training sample (Wikipedia leads, the King James Bible, CPython
standard-library source) lacks, each from a pinned PyPI package, each record with its licence:

* ``dialogue.jsonl.gz`` (source label ``Dialogue``): the English conversations of
  ``chatterbot-corpus`` (``chatterbot_corpus/data/english/*.yml``, BSD-3-Clause), one turn a line
  with alternating ``A:``/``B:`` speakers; exact repeats of a conversation dropped; the conversations
  of one topic file grouped into documents of at most ``DIALOGUE_CHARS`` characters, the first
  ``DIALOGUE_PARTS`` of each file kept.
* ``science_docs.jsonl.gz`` (``ScienceDocs``): mathematics and physics prose of SymPy's own
  documentation (``doc/src/{explanation,tutorials,guides}`` of the ``sympy`` source distribution,
  BSD-3-Clause), one document per page, with doctest blocks and reST/MyST directive lines dropped.
* ``project_readmes.jsonl.gz`` (``ProjectReadmes``): the PyPI long descriptions (Markdown or reST
  READMEs) of ``READMES``, other projects than the 21 of ``package_docs.jsonl.gz``, with badge and
  image lines dropped, each cut at ``README_CHARS``; descriptions shorter than ``MIN_README_CHARS``
  after that are left out.

Every other document is cut at ``MAX_CHARS`` (at a paragraph break in the second half where there is one).
Nothing is trained, tuned or chosen on these sets: they were committed before any model was measured
on them (``data/README.md`` says when). The output is a pure function of the package versions below;
gzip headers carry mtime 0. Usage (from the repository root; the packages go to a throwaway folder,
never into the project's environment)::

    pip download --no-deps --no-binary :all: sympy==1.14.0 -d /tmp/frozen-src
    pip install --no-deps --target /tmp/frozen-site chatterbot-corpus==1.3.3 requests==2.34.2 ...
    python data/build_frozen_sets.py --site /tmp/frozen-site --sympy-sdist /tmp/frozen-src/sympy-1.14.0.tar.gz

(``python data/build_frozen_sets.py --print-install`` prints the full install line.)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import yaml
from build_other_domain import _DROP, write

MAX_CHARS = 4_000
DIALOGUE_CHARS = 3_000
README_CHARS = 6_000  # as package_docs.jsonl.gz
MIN_README_CHARS = 1_500
DIALOGUE_PARTS = 8  # documents per topic file, so the two long files do not make up the set
CHATTERBOT = ("chatterbot-corpus", "1.3.3")
SYMPY = ("sympy", "1.14.0")
# Permissively licensed projects with prose READMEs; none is among package_docs.jsonl.gz's 21.
READMES = (
    ("aiohttp", "3.14.5"), ("arrow", "1.4.0"), ("attrs", "26.1.0"), ("black", "26.10.1"),
    ("boto3", "1.44.8"), ("click", "8.5.1"), ("cryptography", "50.0.2"), ("django", "5.2.19"),
    ("fastapi", "0.165.0"), ("flask", "3.1.3"), ("httpie", "3.2.4"), ("httpx", "0.29.0"),
    ("isort", "9.0.2"), ("jinja2", "3.1.6"), ("loguru", "0.7.3"), ("marshmallow", "4.4.0"),
    ("mypy", "2.4.1"), ("networkx", "3.6.1"), ("pendulum", "3.3.0"), ("pyjwt", "2.15.1"),
    ("pytest", "9.2.0"), ("requests", "2.34.2"), ("scikit-learn", "1.9.1"), ("seaborn", "0.13.2"),
    ("sqlmodel", "0.0.50"), ("starlette", "1.10.0"), ("tenacity", "9.2.1"), ("textual", "8.2.8"),
    ("uvicorn", "0.55.0"),
)  # fmt: skip
SYMPY_DIRS = ("doc/src/explanation/", "doc/src/tutorials/", "doc/src/guides/")
# Index pages are link lists; the deprecation log and the Autolev pages are mostly code listings.
SYMPY_SKIP = re.compile(r"(^|/)index\.(rst|md)$|active-deprecations|autolev")
# Directive and comment lines (``.. math::``, ``:maxdepth: 2``, MyST fences, targets and comments);
# a line that opens with an inline role (``:func:`simplify```) is prose and stays.
_DIRECTIVE = re.compile(r"^\s*(\.\. |:[\w-]+:(\s|$)|```|\(.*\)=$|%)")
# Lines of bare HTML tags (``</a>``, ``<em>``) that a README keeps around its dropped logo.
_HTML_ONLY = re.compile(r"^\s*(<[^>]*>\s*)+$")


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` up to ``limit`` characters, at a paragraph break where one lies in the second half."""
    if len(text) <= limit:
        return text
    end = text.rfind("\n\n", 0, limit)
    return text[: end if end > limit // 2 else limit]


def squeeze(lines: list[str]) -> str:
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines)).strip()


def normalize(name: str) -> str:
    """A project name as PyPI compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(site: Path, name: str, version: str) -> metadata.Distribution:
    for dist in metadata.distributions(path=[str(site)]):
        if normalize(dist.metadata["Name"]) == normalize(name):
            if dist.version != version:
                sys.exit(f"{name} {dist.version} is installed in {site}, the sets are built from {version}")
            return dist
    sys.exit(f"{name}=={version} is not installed in {site}; see --print-install")


def licence_of(meta) -> str:
    """The licence a package declares: its SPDX expression, else its License field, else its classifier."""
    if meta.get("License-Expression"):
        return meta["License-Expression"]
    if (meta.get("License") or "").strip() and len(meta["License"]) < 80:
        return meta["License"].strip()
    classifiers = [
        c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
    ]
    return " OR ".join(classifiers)


def dialogue(site: Path) -> list[dict]:
    dist = distribution(site, *CHATTERBOT)
    root = Path(dist.locate_file("chatterbot_corpus")) / "data" / "english"
    records, seen = [], set()
    for path in sorted(root.glob("*.yml")):
        conversations = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []
        chunks, current = [], ""
        for turns in conversations:
            text = "\n".join(f"{'AB'[i % 2]}: {str(t).strip()}" for i, t in enumerate(turns))
            if text in seen:  # the topic files repeat some exchanges many times
                continue
            seen.add(text)
            if current and len(current) + 2 + len(text) > DIALOGUE_CHARS:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{text}" if current else text
        if current:
            chunks.append(current)
        for i, chunk in enumerate(chunks[:DIALOGUE_PARTS], 1):
            records.append(
                {
                    "text": cut(chunk, DIALOGUE_CHARS),
                    "meta": {
                        "redpajama_set_name": "Dialogue",
                        "title": f"chatterbot-corpus {CHATTERBOT[1]} english/{path.name} part {i}",
                        "license": "BSD-3-Clause",
                    },
                }
            )
    return records


def clean_doc(text: str) -> str:
    """Documentation prose: doctest blocks (from ``>>>`` to the next blank line) and directive lines out."""
    lines, in_doctest = [], False
    for line in text.splitlines():
        if line.strip().startswith(">>>"):
            in_doctest = True
        if in_doctest:
            in_doctest = bool(line.strip())
            continue
        if not _DIRECTIVE.match(line):
            lines.append(line)
    return squeeze(lines)


def science_docs(sdist: Path) -> list[dict]:
    prefix = f"{SYMPY[0]}-{SYMPY[1]}/"
    if not sdist.name.startswith(prefix[:-1]):
        sys.exit(f"{sdist} is not the {SYMPY[0]} {SYMPY[1]} source distribution")
    records = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith((".rst", ".md"))),
            key=lambda m: m.name,
        )
        for m in members:
            rel = m.name[len(prefix) :]
            if not rel.startswith(SYMPY_DIRS) or SYMPY_SKIP.search(rel):
                continue
            text = cut(clean_doc(tar.extractfile(m).read().decode("utf-8")))
            if len(text) >= 500:
                records.append(
                    {
                        "text": text,
                        "meta": {
                            "redpajama_set_name": "ScienceDocs",
                            "title": f"sympy {SYMPY[1]} {rel}",
                            "license": "BSD-3-Clause",
                        },
                    }
                )
    return records


def project_readmes(site: Path) -> list[dict]:
    records = []
    for name, version in READMES:
        meta = distribution(site, name, version).metadata
        body = meta.get_payload() or meta.get("Description") or ""
        lines = [line for line in body.splitlines() if not (_DROP.match(line) or _HTML_ONLY.match(line))]
        text = cut(squeeze(lines), README_CHARS)
        if len(text) >= MIN_README_CHARS:
            records.append(
                {
                    "text": text,
                    "meta": {
                        "redpajama_set_name": "ProjectReadmes",
                        "title": f"{meta['Name']} {meta['Version']}",
                        "license": licence_of(meta),
                    },
                }
            )
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, help="the folder the packages were installed into (--target)")
    parser.add_argument(
        "--sympy-sdist", type=Path, help=f"the {SYMPY[0]}-{SYMPY[1]}.tar.gz source distribution"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "other_domain")
    parser.add_argument("--print-install", action="store_true", help="print the pip commands and exit")
    args = parser.parse_args(argv)
    if args.print_install:
        pins = " ".join(f"{n}=={v}" for n, v in (CHATTERBOT, *READMES))
        print(f"pip download --no-deps --no-binary :all: {SYMPY[0]}=={SYMPY[1]} -d /tmp/frozen-src")
        print(f"pip install --no-deps --only-binary :all: --target /tmp/frozen-site {pins}")
        return 0
    if args.site is None or args.sympy_sdist is None:
        parser.error("--site and --sympy-sdist are required (see --print-install)")
    for name, records in (
        ("dialogue", dialogue(args.site)),
        ("science_docs", science_docs(args.sympy_sdist)),
        ("project_readmes", project_readmes(args.site)),
    ):
        out = args.out_dir / f"{name}.jsonl.gz"
        write(out, records)
        print(f"  sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
