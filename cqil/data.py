"""RedPajama-style text: read JSONL records, tokenize and pack them into fixed-length blocks.

A record is one JSON object per line with a ``"text"`` string and, optionally, a source label at a
dotted path (RedPajama: ``meta.redpajama_set_name``; some RedPajama dumps store ``meta`` as a JSON
string, which is parsed). Files may be gzip-compressed. The functions compose as
``pack_tokens(tokenizer, (text for text, _ in iter_records(paths)), seq_len=...)``.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

PathLike = str | os.PathLike
DEFAULT_SOURCE_FIELD = "meta.redpajama_set_name"
_MAX_WARNINGS_PER_FILE = 5  # one warning per bad line would flood the log on a damaged shard
_TOKENIZE_BATCH = 64  # fast tokenizers encode a batch in parallel


def expand_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand files, directories (their ``*.jsonl`` / ``*.jsonl.gz``, sorted) and globs into files.

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
                found += sorted(
                    p for p in match.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")) and p.is_file()
                )
            elif match.is_file():
                found.append(match)
        if not found:
            raise FileNotFoundError(f"no JSONL files found at {entry!r}")
        files += found
    return files


def iter_records(
    paths: PathLike | Iterable[PathLike], *, source_field: str | None = DEFAULT_SOURCE_FIELD
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(text, source)`` for every record of the JSONL / JSONL.gz files under ``paths``.

    ``source`` is the string at the dotted path ``source_field`` (``None`` when absent or when
    ``source_field`` is ``None``). Lines that are not JSON objects with a string ``"text"`` are skipped
    with a warning naming ``file:line``; records with blank text are skipped silently. A file with no
    usable record, or with more bad lines than good ones, raises ``ValueError`` naming it.
    """
    fields = source_field.split(".") if source_field else []
    for path in expand_paths(paths):
        good = bad = 0
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record, problem = _parse_line(line)
                if problem is not None:
                    bad += 1
                    if bad <= _MAX_WARNINGS_PER_FILE:
                        warnings.warn(f"{path}:{lineno}: {problem}; line skipped", stacklevel=2)
                    continue
                if not record["text"].strip():
                    continue
                good += 1
                yield record["text"], _lookup(record, fields)
        if bad > _MAX_WARNINGS_PER_FILE:
            warnings.warn(f"{path}: {bad} bad lines skipped in total", stacklevel=2)
        if good == 0 or bad > good:
            raise ValueError(f"{path}: {good} usable records and {bad} bad lines; is it a JSONL text file?")


def pack_tokens(
    tokenizer, texts: Iterable[str], *, seq_len: int, max_sequences: int | None = None
) -> torch.LongTensor:
    """Tokenize ``texts``, end each with EOS, concatenate, and cut into ``(N, seq_len)`` blocks.

    No padding: the tail that does not fill a whole block is dropped. Special tokens other than the
    EOS separator are not added (a BOS mid-stream would not match what the model saw in pretraining
    for most packed corpora). Stops reading ``texts`` once ``max_sequences`` blocks are full.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate packed documents")
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
        raise ValueError(f"not enough text for one sequence of {seq_len} tokens in {names}")
    if tokens.shape[0] < num_sequences:
        warnings.warn(
            f"only {tokens.shape[0]} of {num_sequences} sequences of {seq_len} tokens in {names}",
            stacklevel=2,
        )
    return tokens


def _parse_line(line: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a usable record, else ``(None, why it is not)``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "text" not in record:
        return None, 'record has no "text"'
    if not isinstance(record["text"], str):
        return None, f'"text" is {type(record["text"]).__name__}, not a string'
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
