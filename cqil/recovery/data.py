"""RedPajama-style text: read records, mix them by source, tokenize and pack them into blocks.

A record is one JSON object per line with a ``"text"`` string and, optionally, a source label at a
dotted path (RedPajama: ``meta.redpajama_set_name``; some RedPajama dumps store ``meta`` as a JSON
string, which is parsed). Files may be JSONL, gzip- or zstd-compressed JSONL, or Parquet; a spec
``hf://<dataset id>[@config]`` streams a Hub dataset through ``datasets``. The functions compose as
``pack_tokens(tokenizer, (text for text, _ in iter_records(paths)), seq_len=...)``; training uses
:class:`TokenStream`, an endless, per-rank, resumable stream of packed blocks.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
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
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class TokenStream:
    """An endless stream of packed ``seq_len`` token blocks for one rank, with a resumable position.

    The documents are a ``datasets`` streaming pipeline (:class:`datasets.IterableDataset`), built
    once per source:

    * local files: :meth:`IterableDataset.from_generator` over the file list, so that each file is
      one shard; ``hf://<id>[@config]`` entries: ``load_dataset(id, config, split=..., streaming=True)``
      (one shard per data file of the dataset), filtered to records with text;
    * the hash split (``split="train"`` drops the held-out documents, ``"heldout"`` keeps only them)
      and, with ``mixture``, the source label, are filters inside that pipeline;
    * each rank keeps its own shards, ``ds.shard(world_size, rank, contiguous=False)`` (files
      ``i`` with ``i % world_size == rank``): a rank opens only its own files. A source with fewer
      shards than ranks falls back to keeping every ``world_size``-th document (every rank then
      reads that source's files whole); give it at least as many files as ranks (a multiple, so
      that the ranks' epochs are equally long) to stay on the fast path;
    * each source repeats endlessly (``.repeat(None)``: a source that runs out restarts, an epoch);
    * with ``mixture`` ({source label: weight}) the sources are mixed by
      ``interleave_datasets(probabilities=..., seed=..., stopping_strategy="first_exhausted")``
      (the sources are endless, so it only stops on a source without documents, which is an
      error naming it). Without a mixture the documents come in file order.

    Which files hold a source is found by peeking at the first :data:`PEEK_RECORDS` records of each
    file (:func:`peek_sources`): a file whose first records are all one source feeds only that
    source; a file with several feeds each of them (filtered by label).

    :meth:`state_dict` is the exact position: the pipeline's ``IterableDataset.state_dict()`` (per
    source: shard index, example offset within the shard, epoch; the mixture generator) and this
    rank's not yet emitted tokens. :meth:`load_state_dict` restores it in time bounded by one shard
    (the offset within the current shard is skipped by reading, nothing before it), not by the
    position in the corpus. A state saved with another number of processes is refused: each rank's
    position is an offset into its own set of shards, which another world size regroups.
    """

    def __init__(
        self,
        tokenizer,
        paths: Sequence[PathLike],
        *,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        mixture: dict[str, float] | None = None,
        seed: int = 0,
        split: str | None = None,
        heldout_fraction: float = 0.0,
        source_field: str | None = DEFAULT_SOURCE_FIELD,
        text_field: str = "text",
        hub_split: str = "train",
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token_id to separate packed documents")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if split not in (None, "train", "heldout"):
            raise DataError(f"split must be None, 'train' or 'heldout', got {split!r}")
        if mixture is not None and not (any(w > 0 for w in mixture.values()) and min(mixture.values()) >= 0):
            raise DataError(f"mixture weights must be non-negative with a positive sum, got {mixture}")
        self.tokenizer, self.paths, self.seq_len = tokenizer, list(paths), seq_len
        self.rank, self.world_size = rank, world_size
        self.mixture = {k: float(w) for k, w in mixture.items() if w > 0} if mixture else None
        self.split, self.heldout_fraction = split, heldout_fraction
        self.source_field, self.text_field, self.hub_split = source_field, text_field, hub_split
        self.seed = seed
        self.dataset, self.shards = self._build()
        self._buffer: list[int] = []
        self._examples: Iterator[dict] | None = None

    # -------------------------------------------------------------- the document pipeline
    def _build(self):
        import datasets

        local = [p for p in self.paths if not os.fspath(p).startswith(HUB_PREFIX)]
        hub = [os.fspath(p) for p in self.paths if os.fspath(p).startswith(HUB_PREFIX)]
        files = expand_paths(local) if local else []
        names = list(self.mixture) if self.mixture else [None]
        if self.mixture and files:
            found = {f: peek_sources(f, self.source_field, self.text_field) for f in files}
        parts, shards = [], {}
        for name in names:
            mine = files
            if name is not None and files:
                mine = [f for f in files if found[f] == {name} or (len(found[f]) > 1)]
                if not hub and not any(name in found[f] for f in mine):
                    seen = sorted(set().union(*found.values()))
                    raise DataError(
                        f"data.mixture.{name}: no record of source {name!r} (field {self.source_field}) "
                        f"in the first {PEEK_RECORDS} records of any file of {_names(self.paths)}; "
                        f"sources found: {', '.join(seen) or 'none'}"
                    )
            pieces = []
            if mine:
                pieces.append(
                    datasets.IterableDataset.from_generator(
                        _generate_texts,
                        gen_kwargs={
                            "files": [os.fspath(f) for f in mine],
                            "source": name,
                            "source_field": self.source_field,
                            "text_field": self.text_field,
                            "split": self.split,
                            "fraction": self.heldout_fraction,
                        },
                    )
                )
            for spec in hub:
                keep = _Keep(name, self.source_field, self.text_field, self.split, self.heldout_fraction)
                ds = _hub_dataset(spec, self.hub_split).filter(keep)
                pieces.append(ds.map(_Text(self.text_field), remove_columns=_other_columns(ds)))
            ds = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
            shards[name or ""] = [os.fspath(f) for f in mine] + hub
            if ds.num_shards >= self.world_size:
                ds = ds.shard(num_shards=self.world_size, index=self.rank, contiguous=False)
            elif self.world_size > 1:
                warnings.warn(
                    f"source {name or 'all'} has {ds.num_shards} shard(s) for {self.world_size} ranks: "
                    "each rank reads all of it and keeps every "
                    f"{self.world_size}-th document; give it {self.world_size} or more files",
                    stacklevel=3,
                )
                ds = ds.filter(_EveryNth(self.world_size, self.rank), with_indices=True)
            parts.append(ds.repeat(None))
        if len(parts) == 1:
            return parts[0], shards
        total = sum(self.mixture.values())
        mixed = datasets.interleave_datasets(
            parts,
            probabilities=[self.mixture[n] / total for n in names],
            seed=self.seed * 1_000_003 + self.rank,  # each rank draws its own sequence of sources
            stopping_strategy="first_exhausted",
        )
        return mixed, shards

    def _documents(self) -> Iterator[str]:
        if self._examples is None:
            self._examples = iter(self.dataset)
        for example in self._examples:
            yield example["text"]
        names = list(self.mixture) if self.mixture else [None]
        empty = [
            n
            for n, done in zip(names, _exhausted(self.dataset.state_dict(), len(names)), strict=False)
            if done
        ]
        what = (
            f"source {empty[0]!r} (field {self.source_field})" if self.mixture and empty else "any document"
        )
        raise DataError(f"no {self.split or ''} text of {what} in {_names(self.paths)}")

    def _next_document(self) -> str:
        if not hasattr(self, "_docs"):
            self._docs = self._documents()
        return next(self._docs)

    # -------------------------------------------------------------- blocks
    def __iter__(self) -> Iterator[torch.LongTensor]:
        eos = self.tokenizer.eos_token_id
        while True:
            while len(self._buffer) < self.seq_len:
                batch = [self._next_document() for _ in range(_TOKENIZE_BATCH // 4)]
                for ids in self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                    self._buffer += ids
                    self._buffer.append(eos)
            block, self._buffer = self._buffer[: self.seq_len], self._buffer[self.seq_len :]
            yield torch.tensor(block, dtype=torch.long)

    def next_batch(self, batch_size: int) -> torch.LongTensor:
        """The next ``(batch_size, seq_len)`` blocks."""
        if not hasattr(self, "_blocks"):
            self._blocks = iter(self)
        return torch.stack([next(self._blocks) for _ in range(batch_size)])

    # -------------------------------------------------------------- position
    def state_dict(self) -> dict:
        """Plain Python data (``torch.load(weights_only=True)`` reads it back)."""
        return {
            "version": 2,
            "dataset": self.dataset.state_dict(),
            "buffer": list(self._buffer),
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": {k: list(v) for k, v in self.shards.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 2:
            raise DataError(
                "stream position was saved by an older cqil that replayed documents; "
                "it cannot be restored by shard: start this run afresh or resume with that version"
            )
        if state["world_size"] != self.world_size:
            raise DataError(
                f"stream position was saved by {state['world_size']} processes, this run has "
                f"{self.world_size}: each rank's position is an offset into its own shards (files "
                f"i % {state['world_size']} == rank), which {self.world_size} processes would regroup; "
                f"resume with {state['world_size']} processes (the same number of processes)"
            )
        if state["rank"] != self.rank:
            raise DataError(f"stream position of rank {state['rank']} given to rank {self.rank}")
        if state["shards"] != self.shards:
            changed = sorted(set(state["shards"]) ^ set(self.shards)) or [
                k for k in self.shards if state["shards"].get(k) != self.shards[k]
            ]
            raise DataError(
                f"the files of source(s) {', '.join(c or 'all' for c in changed)} changed since the "
                f"stream position was saved ({_names(self.paths)}): the position cannot be restored"
            )
        self.dataset.load_state_dict(state["dataset"])
        self._examples = None
        for attr in ("_docs", "_blocks"):
            if hasattr(self, attr):
                delattr(self, attr)
        self._buffer = list(state["buffer"])


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


def _generate_texts(files, source, source_field, text_field, split, fraction):
    """The examples of one shard list for :meth:`IterableDataset.from_generator`: ``{"text": ...}``."""
    fields = source_field.split(".") if source_field else []
    for file in files:
        for text, label in _checked(Path(file), _raw_records(Path(file)), fields, text_field):
            if source is not None and (label or UNLABELLED) != source:
                continue
            if split is not None and in_heldout(text, fraction) != (split == "heldout"):
                continue
            yield {"text": text}


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


class _Keep:
    """Filter of Hub records: usable text of the source, on the requested side of the hash split."""

    def __init__(self, source, source_field, text_field, split, fraction) -> None:
        self.source, self.text_field, self.split, self.fraction = source, text_field, split, fraction
        self.fields = source_field.split(".") if source_field else []

    def __call__(self, record: dict) -> bool:
        text = record.get(self.text_field)
        if not isinstance(text, str) or not text.strip():
            return False
        if self.source is not None and (_lookup(record, self.fields) or UNLABELLED) != self.source:
            return False
        return self.split is None or in_heldout(text, self.fraction) == (self.split == "heldout")


class _Text:
    def __init__(self, text_field: str) -> None:
        self.text_field = text_field

    def __call__(self, record: dict) -> dict:
        return {"text": record[self.text_field]}


class _EveryNth:
    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __call__(self, _example, index: int) -> bool:
        return index % self.n == self.offset


def _other_columns(ds) -> list[str] | None:
    return [c for c in ds.column_names if c != "text"] if ds.column_names else None


def _exhausted(state: dict, n: int) -> list[bool]:
    state = state.get("examples_iterable", state) if isinstance(state, dict) else {}
    flags = state.get("is_exhausted") if isinstance(state, dict) else None
    return list(flags) if flags else [True] * n


def _names(paths) -> str:
    return ", ".join(map(str, paths))


def _heldout_records(train_paths, eval_paths, heldout_fraction: float, **kw) -> tuple[Iterator, str]:
    """``(text, source)`` of the evaluation text and a description of where it comes from: ``eval_paths``
    when given, else the hash-held-out documents of ``train_paths`` (the ones :class:`TokenStream` skips)."""
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
    else the hash-held-out documents of ``train_paths`` (the ones :class:`TokenStream` skips)."""
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
) -> tuple[torch.LongTensor, list[str]]:
    """About ``num_sequences`` held-out blocks drawn equally from each source: ``(tokens, sources)``.

    Each source's documents are packed on their own (EOS-separated, no padding), so every block
    holds one source's text and ``sources[i]`` names the source of row ``i``; per-source perplexity
    is then the same tokens as the overall figure, split by row. Each of the ``S`` sources gives
    ``ceil(num_sequences / S)`` blocks (fewer if it has too little text, with a warning), sources
    in order of first appearance. The text is ``eval_paths`` when given, else the hash-held-out
    documents of ``train_paths``; reading stops at the end, after ``max_records`` documents (a bound
    for streamed Hub datasets), or after 2,000 once every source seen has its share.
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
        if counts.get(source, 0) < num_sequences * seq_len:
            texts.setdefault(source, []).append(text)
            counts[source] = counts.get(source, 0) + len(text) // 8  # a cheap lower bound on tokens
        # A source missing from the first few thousand documents is too rare to report on its own.
        full = n >= 2_000 and all(c >= num_sequences * seq_len for c in counts.values())
        if full or n >= max_records:
            break
    if not texts:
        raise DataError(f"no held-out text in {where}")
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
FULL_CHECK_BYTES = 256 << 20  # local files are read through (decompressed, UTF-8 checked) up to this total


def check_data(data, source: str = "<recipe>", *, full_check_bytes: int = FULL_CHECK_BYTES) -> set[str]:
    """Check a recipe's ``data`` section before any model weights load; return the sources found.

    Every path of ``data.train`` and ``data.eval`` must match files (:class:`DataNotFoundError`
    naming the entry otherwise); the head of each file (:data:`PEEK_RECORDS` records) must read and
    hold usable records; local files are read through whole, decompressed and UTF-8 checked, until
    ``full_check_bytes`` have been checked (a truncated or damaged ``.gz``/``.zst`` or invalid UTF-8
    is a :class:`DataError` naming the file and line; files beyond the budget are checked as the
    stream reaches them, and a damaged one ends the run with the same error). Every source named by
    ``data.mixture`` must appear among the sources found in those heads (``hf://`` datasets: the
    first records of the stream), else a :class:`DataError` naming ``data.mixture.<source>`` and
    the sources found.
    """
    found: set[str] = set()
    checked = 0
    entries = [("data.train", data.train)] + ([("data.eval", data.eval)] if data.eval else [])
    for key, paths in entries:
        local = [p for p in paths if not os.fspath(p).startswith(HUB_PREFIX)]
        hub = [os.fspath(p) for p in paths if os.fspath(p).startswith(HUB_PREFIX)]
        try:
            files = expand_paths(local) if local else []
        except DataNotFoundError as e:
            raise DataNotFoundError(f"{source}: {key}: {e}") from None
        for file in files:
            labels = peek_sources(file, data.source_field, data.text_field)
            if not labels:
                raise DataError(
                    f"{file}: no usable record (JSON object with a string {data.text_field!r}) "
                    f"in its first {PEEK_RECORDS} records"
                )
            if checked < full_check_bytes:
                checked += _scan(file)
            if key == "data.train":
                found |= labels
        for spec in hub:
            ds = _hub_dataset(spec, data.hub_split)
            fields = data.source_field.split(".") if data.source_field else []
            labels = {_lookup(r, fields) or UNLABELLED for r in ds.take(PEEK_RECORDS)}
            if key == "data.train":
                found |= labels
    for name, weight in (data.mixture or {}).items():
        if weight > 0 and name not in found:
            raise DataError(
                f"{source}: data.mixture.{name}: no record of source {name!r} (field {data.source_field}) "
                f"in the first {PEEK_RECORDS} records of each file of data.train; "
                f"sources found: {', '.join(sorted(found)) or 'none'}"
            )
    return found


def _scan(path: Path) -> int:
    """Read a local file through (decompressing, checking UTF-8); its size in bytes read."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path).metadata  # noqa: B018 (reads and checks the footer)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        return path.stat().st_size
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = size = 0
    try:
        with _open_binary(path) as f:
            while chunk := f.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    line = lines + chunk.count(b"\n", 0, max(e.start, 0)) + 1
                    raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
                lines += chunk.count(b"\n")
                size += len(chunk)
            decoder.decode(b"", final=True)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lines + 1}: invalid UTF-8 at the end of the file ({e.reason})") from None
    except Exception as e:  # OSError, EOFError, zlib.error, zstandard.ZstdError
        if not isinstance(e, (OSError, EOFError, zlib.error)) and type(e).__name__ != "ZstdError":
            raise
        raise DataError(f"{path}:{lines + 1}: damaged or truncated compressed file ({e})") from None
    return size
