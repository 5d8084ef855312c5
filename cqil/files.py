"""Writing results safely: the output-folder check, atomic files and staged folders.

Every writer in cqil goes through here, so a reader (or a crash) never sees a half-written file
or folder, and a non-empty output folder is refused the same way everywhere:

- :func:`check_out_dir` refuses an existing non-empty folder unless ``overwrite`` (call it before
  any slow work);
- :func:`write_atomic` writes one file under a hidden temporary name and renames it;
- :func:`staged_folder` builds a whole folder in a hidden sibling and renames it into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from cqil.errors import OutputDirError

# Files that unpickle (run code) when loaded; a model folder must not hold any.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing non-empty ``out_dir`` unless ``overwrite`` (before any slow work)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    return out


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` via a hidden temporary name in the same folder, then rename it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def sibling(target: Path, kind: str) -> Path:
    """A hidden, unique name beside ``target``, so the final rename stays on one filesystem."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing a previous ``target`` only once the new one is in place."""
    old = None
    if target.exists():
        old = sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: Path, *, model: bool = True):
    """A hidden sibling of ``out`` to write a model folder (or, ``model=False``, any folder) into.

    When the block succeeds a model folder is checked — no pickle files (e.g. a tokenizer class
    that pickles: a model folder must stay safe to open), and every file gets the mode the user's
    umask gives ``config.json`` (some writers, safetensors among them, create mode-600 files) —
    and renamed to ``out``, replacing a previous ``out`` only then. On failure nothing is left.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(out, "tmp")
    staging.mkdir()
    try:
        yield staging
        if model:
            pickles = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ValueError(
                    f"refusing to write pickle files into an export: {', '.join(sorted(pickles))}"
                )
            mode = (staging / "config.json").stat().st_mode & 0o777
            for path in staging.rglob("*"):
                if path.is_file():
                    path.chmod(mode)
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
