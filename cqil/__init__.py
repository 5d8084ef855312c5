"""cqil: recover LLMs whose middle layers were rewritten to run concurrently.

The public names are imported on first use, so that ``cqil --help`` and light tools start
without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "GroupPlan": "cqil.rewrite.plan",
    "parallelize": "cqil.rewrite.surgery",
    "trainable_parameters": "cqil.rewrite.surgery",
    "analyze": "cqil.selection.similarity",
    "load_model": "cqil.pretrained",
    "fetch_model": "cqil.pretrained",
    "coalesce": "cqil.rewrite.coalescing",
    "decoalesce": "cqil.rewrite.coalescing",
    "interpolate": "cqil.rewrite.coalescing",
    "export_model": "cqil.export.write",
    "load_export": "cqil.export.load",
    "push_to_hub": "cqil.export.hub",
    "search_plan": "cqil.selection.search",
    "evaluate": "cqil.evaluation.evaluate",
    "write_report": "cqil.evaluation.report",
    "shard_model": "cqil.serving.concurrent",
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
    from cqil.evaluation.evaluate import evaluate
    from cqil.evaluation.report import write_report
    from cqil.export.hub import push_to_hub
    from cqil.export.load import load_export
    from cqil.export.write import export_model
    from cqil.pretrained import fetch_model, load_model
    from cqil.rewrite.coalescing import coalesce, decoalesce, interpolate
    from cqil.rewrite.plan import GroupPlan
    from cqil.rewrite.surgery import parallelize, trainable_parameters
    from cqil.selection.search import search_plan
    from cqil.selection.similarity import analyze
    from cqil.serving.concurrent import shard_model


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cqil' has no attribute {name!r}")
