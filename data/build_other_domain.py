"""Build ``data/other_domain/``: text from a domain the training sample lacks, a test set and a dev set.

The shipped training sample (``data/sample/``) is encyclopaedia leads, scripture and Python source.
This set is technical documentation in prose: the long descriptions (the README a project shows on
PyPI) of the Python packages listed in ``PACKAGES``, read from their installed ``*.dist-info/METADATA``.
It is never trained or tuned on; ``bench/recovery_quality.py`` measures how much of the perplexity
gap a recovery closes on it, beside the sample's own held-out split.

``python_docs.jsonl.gz`` is the same kind of text from another source, kept apart so that recipe
choices can be compared out of domain without touching the test set: the topics of the Python
language reference that ``help()`` shows (``pydoc_data.topics``, a file the sample's standard-library
part excludes), one record per topic, source label ``PythonDocs``.

Each record is ``{"text": ..., "meta": {"redpajama_set_name": "PackageDocs", "title": "<name> <version>",
"license": ...}}``. Badge and image lines are dropped and each description is cut at ``MAX_CHARS``
(at a paragraph break), so no single long changelog dominates. The output is a pure function of the
installed package versions; gzip headers carry mtime 0. Usage (from the repository root, in the
environment whose packages are listed)::

    python data/build_other_domain.py
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from build_sample import write_jsonl_gz

# Permissively licensed, prose-heavy descriptions of packages cqil installs anyway.
PACKAGES = (
    "accelerate", "datasets", "deepspeed", "dill", "huggingface_hub", "lm_eval", "more_itertools",
    "pandas", "peft", "psutil", "pydantic", "rich", "sacrebleu", "safetensors", "sympy",
    "threadpoolctl", "tokenizers", "torch", "tqdm", "transformers", "typer",
)  # fmt: skip
MAX_CHARS = 6_000
_DROP = re.compile(r"^\s*(\[!\[|!\[|<img|<a href|<p align|</?p>|</?div|<br|\.\. image::|\.\. \|)", re.I)


def description(name: str) -> tuple[str, str, str]:
    """(text, "name version", licence) of one installed package's long description."""
    try:
        meta = metadata.metadata(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"package {name!r} is not installed in this environment")
    body = meta.get_payload() or meta.get("Description") or ""
    lines = [line.rstrip() for line in body.splitlines() if not _DROP.match(line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    text = cut(text)
    licence = meta.get("License-Expression") or meta.get("License") or ""
    return text, f"{meta['Name']} {meta['Version']}", licence.splitlines()[0] if licence else ""


def cut(text: str) -> str:
    """``text`` up to ``MAX_CHARS``, at a paragraph break where one lies in the second half."""
    if len(text) <= MAX_CHARS:
        return text
    end = text.rfind("\n\n", 0, MAX_CHARS)
    return text[: end if end > MAX_CHARS // 2 else MAX_CHARS]


def python_docs() -> list[dict]:
    """The language reference topics of this interpreter's ``pydoc_data``, in sorted topic order."""
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:3]))
    return [
        {
            "text": cut(topics[key].strip()),
            "meta": {"redpajama_set_name": "PythonDocs", "title": f"{key} (Python {version})", "license": "PSF-2.0"},
        }
        for key in sorted(topics)
    ]  # fmt: skip


def write(out: Path, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out, records)
    print(f"wrote {out} ({len(records)} documents, {sum(len(r['text']) for r in records):,} characters)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "other_domain"))
    args = parser.parse_args(argv)
    records = []
    for name in PACKAGES:
        text, title, licence = description(name)
        records.append(
            {"text": text, "meta": {"redpajama_set_name": "PackageDocs", "title": title, "license": licence}}
        )
        print(f"{title:32s} {len(text):6d} chars  {licence}")
    write(Path(args.out_dir) / "package_docs.jsonl.gz", records)
    write(Path(args.out_dir) / "python_docs.jsonl.gz", python_docs())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
