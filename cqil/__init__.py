"""cqil: recover LLMs whose middle layers were rewritten to run concurrently.

The public names are imported on first use, so that ``cqil --help`` and light tools start
without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "GroupPlan": "cqil.plan",
    "parallelize": "cqil.surgery",
    "trainable_parameters": "cqil.surgery",
    "analyze": "cqil.similarity",
    "load_model": "cqil.pretrained",
    "fetch_model": "cqil.pretrained",
    "coalesce": "cqil.coalescing",
    "decoalesce": "cqil.coalescing",
    "interpolate": "cqil.coalescing",
    "export_model": "cqil.export",
    "load_export": "cqil.export",
    "push_to_hub": "cqil.export",
    "search_plan": "cqil.search",
    "evaluate": "cqil.evaluation",
    "write_report": "cqil.report",
    "shard_model": "cqil.concurrent",
}

__all__ = [
    "GroupPlan",
    "analyze",
    "coalesce",
    "decoalesce",
    "evaluate",
    "export_model",
    "fetch_model",
    "interpolate",
    "load_export",
    "load_model",
    "parallelize",
    "push_to_hub",
    "search_plan",
    "shard_model",
    "trainable_parameters",
    "write_report",
]

if TYPE_CHECKING:
    from cqil.coalescing import coalesce, decoalesce, interpolate
    from cqil.concurrent import shard_model
    from cqil.evaluation import evaluate
    from cqil.export import export_model, load_export, push_to_hub
    from cqil.plan import GroupPlan
    from cqil.pretrained import fetch_model, load_model
    from cqil.report import write_report
    from cqil.search import search_plan
    from cqil.similarity import analyze
    from cqil.surgery import parallelize, trainable_parameters


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cqil' has no attribute {name!r}")
