"""Data checks before the model loads: every path matches, every file reads, every source exists.

:func:`check_data` finds what would otherwise fail minutes into a run (a glob matching nothing, an
empty folder, a damaged ``.gz``/``.zst``, invalid UTF-8, a mixture source absent from the data) and
raises one :class:`cqil.errors.DataError` naming the recipe key, file and line.
"""

from __future__ import annotations

import codecs
import os
import zlib
from pathlib import Path

from cqil.errors import DataError, DataNotFoundError
from cqil.recovery import data as _data
from cqil.recovery.data import (
    HUB_PREFIX,
    PEEK_RECORDS,
    UNLABELLED,
    _hub_dataset,
    _lookup,
    expand_paths,
    peek_sources,
)

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
        with _data._open_binary(path) as f:
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
