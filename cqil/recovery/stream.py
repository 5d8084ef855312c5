"""The training stream: an endless, per-rank, resumable stream of packed token blocks.

:class:`TokenStream` is a ``datasets`` streaming pipeline over the readers of
:mod:`cqil.recovery.data`: one iterable per source, mixed by ``interleave_datasets`` with the
recipe's probabilities, each rank reading only its own shards, resumed from the pipeline's
``state_dict()`` in time bounded by one shard.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from cqil.errors import DataError
from cqil.recovery.data import (
    _TOKENIZE_BATCH,
    DEFAULT_SOURCE_FIELD,
    HUB_PREFIX,
    PEEK_RECORDS,
    UNLABELLED,
    PathLike,
    _checked,
    _hub_dataset,
    _lookup,
    _raw_records,
    expand_paths,
    hash_fraction,
    in_heldout,
    peek_sources,
)


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

    With ``repeat_share`` > 0, that share of the blocks (chosen by a hash of their first half's tokens
    and ``seed``) is the first half of the text twice over: text in which every token of the second
    half can be copied from the context. In-context copying is what a rewrite of the middle layers
    damages most (on a repeated half block the original's perplexity is 1.8, the rewritten model's 18), and
    natural text repeats itself too rarely to train it back.

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
        repeat_share: float = 0.0,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token_id to separate packed documents")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if split not in (None, "train", "heldout"):
            raise DataError(f"split must be None, 'train' or 'heldout', got {split!r}")
        if not 0 <= repeat_share < 1:
            raise DataError(f"repeat_share must be in [0, 1), got {repeat_share}")
        if mixture is not None and not (any(w > 0 for w in mixture.values()) and min(mixture.values()) >= 0):
            raise DataError(f"mixture weights must be non-negative with a positive sum, got {mixture}")
        self.tokenizer, self.paths, self.seq_len = tokenizer, list(paths), seq_len
        self.rank, self.world_size = rank, world_size
        self.mixture = {k: float(w) for k, w in mixture.items() if w > 0} if mixture else None
        self.split, self.heldout_fraction = split, heldout_fraction
        self.source_field, self.text_field, self.hub_split = source_field, text_field, hub_split
        self.seed, self.repeat_share = seed, repeat_share
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
            head = self.seq_len - self.seq_len // 2
            if self.repeat_share and _repeated(self._buffer[:head], self.repeat_share, self.seed):
                # The block's second half repeats its first: only the first half is read from the text.
                block, self._buffer = self._buffer[:head], self._buffer[head:]
                block = block + block[: self.seq_len - head]
            else:
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


def _repeated(head: list[int], share: float, seed: int) -> bool:
    """Whether the block that starts with ``head`` repeats it: a hash of its tokens and the seed, so the
    choice needs no state of its own, is the same after a resume and on every rank."""
    return hash_fraction(struct.pack(f"<q{len(head)}q", seed, *head)) < share


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
