"""The run fingerprint: what decides a run's trajectory, recorded so that a resume never mixes two runs.

The fingerprint is the recipe flattened to dotted keys (:func:`cqil.recovery.recipe.recipe_to_dict`)
minus an explicit list of keys that do not change what is computed (logging, saving, evaluation,
output), plus the world size. A new recipe key is therefore part of the fingerprint unless it is
added to :data:`EXCLUDED`. It is written in ``output_dir/cqil_run.json`` (the marker that makes a
folder a cqil run, written first) and in every checkpoint's ``trainer_state.json``.

A key is added to the schema with the default that reproduces what cqil did before it existed, so a
key missing from a run's recorded fingerprint (the run was started by an older cqil) compares as that
default: the run resumes unless the recipe now sets the key to something else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import typing
from pathlib import Path

from cqil.errors import RecipeError
from cqil.files import write_atomic
from cqil.recovery.recipe import Recipe, recipe_to_dict

MARKER = "cqil_run.json"
# Keys (or whole sections, ending in ".") that never change the trained weights.
EXCLUDED = (
    "output_dir",
    "eval.",  # what is measured, not what is trained (data.eval, the held-out split, is data.)
    "export.",  # what is written at the end, not what is trained
    "train.save_every_steps",
    "train.keep_checkpoints",
    "train.log_every_steps",
    "train.trackers",
    "train.resume",
    # Non-reentrant recomputation in backward gives the same values; it only trades memory for time.
    "train.gradient_checkpointing",
)
# What train.resume=reset_optimizer may change: the optimizer and its schedule, restarted from the recipe.
OPTIMIZER_KEYS = (
    "train.lr",
    "train.min_lr_ratio",
    "train.schedule",
    "train.warmup_steps",
    "train.weight_decay",
    "train.adam_betas",
    "train.max_grad_norm",
    "train.max_steps",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, name + ".")
        else:
            out[name] = value
    return out


def _excluded(key: str) -> bool:
    return any(key == e or (e.endswith(".") and key.startswith(e)) for e in EXCLUDED)


def run_fingerprint(recipe: Recipe, world_size: int) -> dict:
    """Dotted key -> value for everything that determines the run's trajectory."""
    flat = _flatten(recipe_to_dict(recipe))
    out = {k: v for k, v in sorted(flat.items()) if not _excluded(k)}
    out["world_size"] = int(world_size)
    return json.loads(json.dumps(out))  # plain JSON values (tuples as lists), as read back from disk


@functools.cache
def schema_defaults(cls: type = Recipe, prefix: str = "") -> dict:
    """Dotted key -> the schema's default, as :func:`run_fingerprint` writes it, for every key that has
    one (read only: the result is cached)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif dataclasses.is_dataclass(hints[f.name]):  # a required section: its own fields' defaults
            out |= schema_defaults(hints[f.name], name + ".")
            continue
        else:
            continue
        out |= _flatten({name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value})
    return json.loads(json.dumps(out))


def differences(old: dict, new: dict) -> dict[str, list]:
    """Dotted key -> [old, new] for every key whose value differs. A key ``old`` lacks reads as its
    schema default (``old`` was written before the key existed), any other missing key as None."""
    defaults = schema_defaults()
    before = {k: old[k] if k in old else defaults.get(k) for k in set(old) | set(new)}
    return {k: [before[k], new.get(k)] for k in sorted(before) if before[k] != new.get(k)}


def check_resumable(source: str, output_dir: Path, old: dict, new: dict, mode: str) -> dict:
    """The differences a resume may go on with (empty, or optimizer keys under reset_optimizer); else a RecipeError."""
    changed = differences(old, new)
    if not changed:
        return {}
    resettable = all(k in OPTIMIZER_KEYS for k in changed)
    if resettable and mode == "reset_optimizer":
        return changed
    listed = "; ".join(f"{k} {json.dumps(a)} → {json.dumps(b)}" for k, (a, b) in changed.items())
    how = (
        "choose a new output_dir, or set train.resume=reset_optimizer to continue these weights with a "
        "fresh optimizer and schedule"
        if resettable
        else "these change what the checkpoints are; choose a new output_dir"
    )
    raise RecipeError(source, "output_dir", f"{output_dir} holds a run of another recipe ({listed}); {how}")


def read_marker(output_dir: Path) -> dict | None:
    path = Path(output_dir) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_marker(
    output_dir: Path, fingerprint: dict, *, previous: dict | None = None, event: dict | None = None
):
    """``cqil_run.json`` with ``fingerprint``; ``previous`` keeps its creation time and history, ``event`` is appended."""
    from cqil import __version__

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    marker = {
        "fingerprint": fingerprint,
        "cqil_version": __version__,
        "created": (previous or {}).get("created", now),
        "history": list((previous or {}).get("history", [])),
    }
    if event is not None:
        marker["history"].append({"time": now, **event})
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(output_dir) / MARKER, json.dumps(marker, indent=1, ensure_ascii=False))
    return marker
