"""Helpers shared by the subcommands of :mod:`cqil.cli`."""

from __future__ import annotations

import glob
import os

from cqil.errors import DataNotFoundError, ModelError


def check_data_paths(paths) -> None:
    """Fail on a mistyped ``--data`` path now rather than after loading the model."""
    for path in paths or []:
        if not glob.glob(path):
            raise DataNotFoundError(f"--data {path!r}: no such file or directory")


def load_model_arg(name: str, dtype: str):
    """``load_model(name)`` for ``--model``; a failure says what ``name`` could have been."""
    from cqil.pretrained import EMBEDDED_MODELS, load_model

    try:
        return load_model(name, dtype=dtype)
    except (OSError, ValueError) as e:  # transformers' own loading errors: the user's --model
        if name in EMBEDDED_MODELS or os.path.isdir(name):
            raise ModelError(f"cannot load --model {name!r}: {e}") from e
        # transformers reads any other string as a Hub id; say what else it could have been.
        raise ModelError(
            f"--model {name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"a model folder or a reachable Hub id ({e})"
        ) from e
