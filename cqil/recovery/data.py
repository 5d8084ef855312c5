"""RedPajama-style text: read records, mix them by source, tokenize and pack them into blocks.

A record is one JSON object per line with a ``"text"`` string and, optionally, a source label at a
dotted path (RedPajama: ``meta.redpajama_set_name``; some RedPajama dumps store ``meta`` as a JSON
string, which is parsed). Files may be JSONL, gzip- or zstd-compressed JSONL, or Parquet; a spec
``hf://<dataset id>[@config]`` streams a Hub dataset through ``datasets``. The functions compose as
``pack_tokens(tokenizer, (text for text, _ in iter_records(paths)), seq_len=...)``; training uses
:class:`cqil.recovery.stream.TokenStream`, an endless, per-rank, resumable stream of packed blocks.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import warnings
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from cqil.errors import DataError, DataNotFoundError

PathLike = str | os.PathLike
DEFAULT_SOURCE_FIELD = "meta.redpajama_set_name"
_MAX_WARNINGS_PER_FILE = 5  # one warning per bad line would flood the log on a damaged shard
_TOKENIZE_BATCH = 64  # fast tokenizers encode a batch in parallel
_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
HUB_PREFIX = "hf://"


def expand_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand files, directories (their ``*.jsonl[.gz|.zst]`` / ``*.parquet``, sorted) and globs into files.

    Raises ``FileNotFoundError`` naming the first path that matches nothing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        entry = os.fspath(entry)
        matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
        found = []
        for match in map(Path, matches):
            if match.is_dir():
                found += sorted(p for p in match.iterdir() if p.name.endswith(_SUFFIXES) and p.is_file())
            elif match.is_file():
                found.append(match)
        if not found:
            raise DataNotFoundError(f"no JSONL or Parquet files found at {entry!r}")
        files += found
    return files


def iter_records(
    paths: PathLike | Iterable[PathLike],
    *,
    source_field: str | None = DEFAULT_SOURCE_FIELD,
    text_field: str = "text",
    hub_split: str = "train",
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(text, source)`` for every record of the files (or ``hf://`` datasets) under ``paths``.

    ``source`` is the string at the dotted path ``source_field`` (``None`` when absent or when
    ``source_field`` is ``None``). Lines that are not JSON objects with a string ``"text"`` are skipped
    with a warning naming ``file:line``; records with blank text are skipped silently. A file with no
    usable record, or with more bad lines than good ones, raises ``ValueError`` naming it.
    """
    fields = source_field.split(".") if source_field else []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    local: list[PathLike] = []
    for entry in list(paths) + [None]:  # None flushes the local files gathered so far
        if entry is not None and not os.fspath(entry).startswith(HUB_PREFIX):
            local.append(entry)
            continue
        for path in expand_paths(local) if local else []:
            yield from _checked(path, _raw_records(path), fields, text_field)
        local = []
        if entry is not None:
            yield from _checked(entry, _hub_records(os.fspath(entry), hub_split), fields, text_field)


def _raw_records(path: Path) -> Iterator[tuple[int, object]]:
    """``(line or row number, record or raw line)`` of one file; JSON is parsed later.

    A file that cannot be read (not gzip/zstd, truncated, invalid UTF-8, not Parquet) raises
    :class:`DataError` naming the file and, for text files, the line where reading failed.
    """
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable Parquet after row {row} ({e})") from None
        return
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):  # noqa: B007 (lineno is reported below)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start} of the line)"
                    ) from None
                yield lineno, line
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        kind = "zstd" if path.name.endswith(".zst") else "gzip" if path.name.endswith(".gz") else "text"
        raise DataError(f"{path}:{lineno + 1}: damaged or truncated {kind} file ({e})") from None
    except Exception as e:  # zstandard.ZstdError derives from Exception only
        if type(e).__name__ != "ZstdError":
            raise
        raise DataError(f"{path}:{lineno + 1}: damaged or truncated zstd file ({e})") from None


def _open_binary(path: Path):
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _hub_records(spec: str, split: str) -> Iterator[tuple[int, object]]:
    """Stream a Hub dataset ``hf://owner/name[@config]`` without downloading it whole."""
    import datasets

    name, _, config = spec[len(HUB_PREFIX) :].partition("@")
    stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    yield from enumerate(stream, start=1)


def _checked(origin, records, fields: list[str], text_field: str) -> Iterator[tuple[str, str | None]]:
    good = bad = 0
    for lineno, raw in records:
        if isinstance(raw, str):
            if not raw.strip():
                continue
            record, problem = _parse_line(raw, text_field)
        else:
            record, problem = _check_record(raw, text_field)
        if problem is not None:
            bad += 1
            if bad <= _MAX_WARNINGS_PER_FILE:
                warnings.warn(f"{origin}:{lineno}: {problem}; line skipped", stacklevel=3)
            continue
        if not record[text_field].strip():
            continue
        good += 1
        yield record[text_field], _lookup(record, fields)
    if bad > _MAX_WARNINGS_PER_FILE:
        warnings.warn(f"{origin}: {bad} bad lines skipped in total", stacklevel=3)
    if good == 0 or bad > good:
        raise DataError(f"{origin}: {good} usable records and {bad} bad lines; is it a JSONL text file?")


def pack_tokens(
    tokenizer, texts: Iterable[str], *, seq_len: int, max_sequences: int | None = None
) -> torch.LongTensor:
    """Tokenize ``texts``, end each with EOS, concatenate, and cut into ``(N, seq_len)`` blocks.

    No padding: the tail that does not fill a whole block is dropped. Special tokens other than the
    EOS separator are not added (a BOS mid-stream would not match what the model saw in pretraining
    for most packed corpora). Stops reading ``texts`` once ``max_sequences`` blocks are full.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id to separate packed documents")
    blocks: list[list[int]] = []
    buffer: list[int] = []
    texts = iter(texts)
    while max_sequences is None or len(blocks) < max_sequences:
        batch = list(itertools.islice(texts, _TOKENIZE_BATCH))
        if not batch:
            break
        # verbose=False: documents longer than model_max_length are expected here, they get cut.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            buffer += ids
            buffer.append(eos)
        full = len(buffer) // seq_len
        blocks += [buffer[i * seq_len : (i + 1) * seq_len] for i in range(full)]
        del buffer[: full * seq_len]
    if max_sequences is not None:
        del blocks[max_sequences:]
    if not blocks:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(blocks, dtype=torch.long)


def calibration_tokens(
    tokenizer,
    paths: PathLike | Iterable[PathLike],
    *,
    seq_len: int,
    num_sequences: int,
    source_field: str | None = DEFAULT_SOURCE_FIELD,
) -> torch.LongTensor:
    """The first ``num_sequences`` packed blocks of ``seq_len`` tokens from the records under ``paths``.

    Raises ``ValueError`` naming the files when they do not fill one block; warns when they fill
    fewer than ``num_sequences``.
    """
    files = expand_paths(paths)
    texts = (text for text, _ in iter_records(files, source_field=source_field))
    tokens = pack_tokens(tokenizer, texts, seq_len=seq_len, max_sequences=num_sequences)
    names = ", ".join(map(str, files))
    if tokens.shape[0] == 0:
        raise DataError(f"not enough text for one sequence of {seq_len} tokens in {names}")
    if tokens.shape[0] < num_sequences:
        warnings.warn(
            f"only {tokens.shape[0]} of {num_sequences} sequences of {seq_len} tokens in {names}",
            stacklevel=2,
        )
    return tokens


def _parse_line(line: str, text_field: str = "text") -> tuple[dict | None, str | None]:
    """``(record, None)`` for a usable record, else ``(None, why it is not)``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    return _check_record(record, text_field)


def _check_record(record, text_field: str = "text") -> tuple[dict | None, str | None]:
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if text_field not in record:
        return None, f'record has no "{text_field}"'
    if not isinstance(record[text_field], str):
        return None, f'"{text_field}" is {type(record[text_field]).__name__}, not a string'
    return record, None


def _lookup(record: dict, fields: list[str]) -> str | None:
    if not fields:
        return None
    value = record
    for field in fields:
        if isinstance(value, str):
            # RedPajama dumps differ: some store meta as an object, some as a JSON string.
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict):
            return None
        value = value.get(field)
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------ training streams
def in_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a hash of its text, so every run and
    every rank agrees, and a document never lands on both sides."""
    return hash_fraction(text.encode("utf-8")) < fraction


def hash_fraction(data: bytes) -> float:
    """A number in [0, 1) fixed by ``data``: a choice every run, rank and resume agrees on."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2**64


PEEK_RECORDS = 1000  # records read from the head of each file to find its sources
_PEEK_BYTES = 16 << 20  # ... or this many bytes of text, whichever comes first


def peek_sources(
    path: Path, source_field: str | None = DEFAULT_SOURCE_FIELD, text_field: str = "text"
) -> set[str]:
    """The source labels among the first :data:`PEEK_RECORDS` records of one file (``UNLABELLED``
    for records without one). Reading errors (damaged compression, invalid UTF-8) raise
    :class:`DataError` naming the file and line."""
    fields = source_field.split(".") if source_field else []
    found: set[str] = set()
    size = n = 0
    for _, raw in _raw_records(Path(path)):
        if isinstance(raw, str):
            size += len(raw)
            if not raw.strip():
                continue
            record, problem = _parse_line(raw, text_field)
        else:
            record, problem = _check_record(raw, text_field)
        if problem is None:
            found.add(_lookup(record, fields) or UNLABELLED)
        n += 1
        if n >= PEEK_RECORDS or size >= _PEEK_BYTES:
            break
    return found


def _hub_dataset(spec: str, split: str):
    """``hf://owner/name[@config]`` as a streaming ``IterableDataset`` (nothing downloaded whole).

    ``owner/name`` may also be a local folder laid out like a Hub dataset repository."""
    import datasets

    name, _, config = spec[len(HUB_PREFIX) :].partition("@")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=True)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"{spec}: {e}") from None
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None


def _heldout_records(train_paths, eval_paths, heldout_fraction: float, **kw) -> tuple[Iterator, str]:
    """``(text, source)`` of the evaluation text and a description of where it comes from: ``eval_paths``
    when given, else the hash-held-out documents of ``train_paths`` (the ones :class:`cqil.recovery.stream.TokenStream` skips)."""
    if eval_paths:
        return iter_records(eval_paths, **kw), ", ".join(map(str, eval_paths))
    records = ((t, s) for t, s in iter_records(train_paths, **kw) if in_heldout(t, heldout_fraction))
    return records, f"the {heldout_fraction:.2%} hash split of {', '.join(map(str, train_paths))}"


def heldout_tokens(
    tokenizer,
    train_paths: Sequence[PathLike],
    eval_paths: Sequence[PathLike] | None,
    *,
    seq_len: int,
    num_sequences: int,
    heldout_fraction: float,
    source_field: str | None = DEFAULT_SOURCE_FIELD,
    text_field: str = "text",
    hub_split: str = "train",
) -> torch.LongTensor:
    """The first ``num_sequences`` packed blocks of the evaluation text: ``eval_paths`` when given,
    else the hash-held-out documents of ``train_paths`` (the ones :class:`cqil.recovery.stream.TokenStream` skips)."""
    records, where = _heldout_records(
        train_paths,
        eval_paths,
        heldout_fraction,
        source_field=source_field,
        text_field=text_field,
        hub_split=hub_split,
    )
    texts = (t for t, _ in records)
    tokens = pack_tokens(tokenizer, texts, seq_len=seq_len, max_sequences=num_sequences)
    if tokens.shape[0] == 0:
        raise DataError(f"not enough held-out text for one sequence of {seq_len} tokens in {where}")
    if tokens.shape[0] < num_sequences:
        warnings.warn(
            f"only {tokens.shape[0]} of {num_sequences} held-out sequences in {where}", stacklevel=2
        )
    return tokens


UNLABELLED = "unlabelled"  # the source name of records without a source label


def heldout_blocks(
    tokenizer,
    train_paths: Sequence[PathLike],
    eval_paths: Sequence[PathLike] | None,
    *,
    seq_len: int,
    num_sequences: int,
    heldout_fraction: float,
    source_field: str | None = DEFAULT_SOURCE_FIELD,
    text_field: str = "text",
    hub_split: str = "train",
    max_records: int = 100_000,
    only_sources: Collection[str] | None = None,
) -> tuple[torch.LongTensor, list[str]]:
    """About ``num_sequences`` held-out blocks drawn equally from each source: ``(tokens, sources)``.

    Each source's documents are packed on their own (EOS-separated, no padding), so every block
    holds one source's text and ``sources[i]`` names the source of row ``i``; per-source perplexity
    is then the same tokens as the overall figure, split by row. Each of the ``S`` sources gives
    ``ceil(num_sequences / S)`` blocks (fewer if it has too little text, with a warning), sources
    in order of first appearance. The text is ``eval_paths`` when given, else the hash-held-out
    documents of ``train_paths``; reading stops at the end, after ``max_records`` documents (a bound
    for streamed Hub datasets), or after 2,000 once every source seen has its share. With
    ``only_sources`` (a recipe's ``data.mixture``), the documents of other sources are passed over:
    the held-out figure is then text of the sources the run trains on, as its name says.
    """
    records, where = _heldout_records(
        train_paths,
        eval_paths,
        heldout_fraction,
        source_field=source_field,
        text_field=text_field,
        hub_split=hub_split,
    )
    texts: dict[str, list[str]] = {}
    counts: dict[str, int] = {}  # tokens gathered per source (approximate until packed)
    for n, (text, source) in enumerate(records, 1):
        source = source or UNLABELLED
        wanted = only_sources is None or source in only_sources
        if wanted and counts.get(source, 0) < num_sequences * seq_len:
            texts.setdefault(source, []).append(text)
            counts[source] = counts.get(source, 0) + len(text) // 8  # a cheap lower bound on tokens
        # A source missing from the first few thousand documents is too rare to report on its own.
        full = n >= 2_000 and all(c >= num_sequences * seq_len for c in counts.values())
        if full or n >= max_records:
            break
    if not texts:
        of = "" if only_sources is None else f" of the sources {sorted(only_sources)}"
        raise DataError(f"no held-out text{of} in {where}")
    share = -(-num_sequences // len(texts))
    tokens, sources = [], []
    for source, docs in texts.items():
        blocks = pack_tokens(tokenizer, docs, seq_len=seq_len, max_sequences=share)
        if blocks.shape[0] < share:
            warnings.warn(
                f"only {blocks.shape[0]} of {share} held-out sequences of {seq_len} tokens for source "
                f"{source!r} in {where}",
                stacklevel=2,
            )
        tokens.append(blocks)
        sources += [source] * blocks.shape[0]
    if not sources:
        raise DataError(f"not enough held-out text for one sequence of {seq_len} tokens in {where}")
    return torch.cat(tokens), sources


# ------------------------------------------------------------------------------------ start-up check
