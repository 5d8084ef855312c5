"""The errors cqil raises for bad user input.

:class:`CqilError` is the base: the ``cqil`` console script prints any of them as one
``cqil: error: ...`` line with exit status 2, while every other exception is a bug and keeps its
traceback. Each subclass also derives from the builtin exception the same failure raised before
(``ValueError``, ``FileExistsError``, ``FileNotFoundError``), so ``except ValueError`` and
``pytest.raises(ValueError)`` keep catching it.
"""

from __future__ import annotations


class CqilError(Exception):
    """Bad user input: a message naming the file, key or value to fix, never a bug."""


class RecipeError(CqilError, ValueError):
    """A recipe value that cannot be used; the message names the file and the dotted key."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source, self.path = source, path
        super().__init__(f"{source}: {path or '<root>'}: {message}")


class DataError(CqilError, ValueError):
    """Training or evaluation text that cannot be used (no text, an unreadable shard, ...)."""


class DataNotFoundError(CqilError, FileNotFoundError):
    """A data path (file, folder or glob) that matches nothing."""


class ModelError(CqilError, ValueError):
    """A model (name, folder or export) that cannot be loaded or used as asked."""


class LaunchError(CqilError, ValueError):
    """A launch setting that cannot be used: an environment variable, an accelerate or DeepSpeed config."""


class OutputDirError(CqilError, FileExistsError):
    """An output folder that exists and may not be written into (not a folder, or not empty)."""


class UsageError(CqilError, ValueError):
    """Options that contradict each other or an impossible request (e.g. a budget no plan meets)."""


class ModelNotFoundError(CqilError, FileNotFoundError):
    """A model folder, or a file a model folder needs, that does not exist."""


class PlanError(CqilError, ValueError):
    """A plan (groups of layers) that is malformed or does not fit the model."""


class MissingPackageError(CqilError, ImportError):
    """An optional package that the request needs is not installed."""


class HubError(CqilError, OSError):
    """A Hugging Face Hub request that failed (the message never carries the token)."""


class StorageError(CqilError, OSError):
    """A file or folder that could not be written (disk full, quota, permissions); names the path and the cause."""


class CheckpointError(CqilError, RuntimeError):
    """No intact checkpoint to resume from, or one that cannot be used; names the folder."""
