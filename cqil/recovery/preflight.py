"""Checks a recovery run makes before any weights load or anything is written to ``output_dir``.

From the model's config (read without weights) and the file system: the model exists and has a
supported architecture, the groups fit it, ``train.seq_len`` and ``eval.seq_len`` fit its positions,
and ``output_dir`` is a writable folder that is new, empty, or a cqil run of the same recipe
(:mod:`cqil.recovery.fingerprint`).
Each failure is one :class:`cqil.errors.CqilError` naming the key, file or folder. :func:`check_run`
returns what it found (:class:`CheckedRun`), which :func:`claim_run_folder` then acts on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cqil.errors import (
    DataError,
    DataNotFoundError,
    ModelError,
    ModelNotFoundError,
    OutputDirError,
    RecipeError,
)
from cqil.recovery import checkpoint, fingerprint, run_lock
from cqil.recovery.checkpoint import list_checkpoints
from cqil.recovery.measure import BEFORE
from cqil.recovery.progress import Log
from cqil.recovery.recipe import Recipe
from cqil.recovery.state import Processes


def _looks_local(name: str) -> bool:
    """An absolute or ./ ../ path, or one whose parent folder exists: a path, never a Hub id."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~")) or name in (".", ".."):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def model_config(recipe: Recipe, source: str):
    """The model's config, without its weights; a missing or unusable model is a one-line error."""
    from transformers import AutoConfig

    from cqil.pretrained import EMBEDDED_MODELS, resolve_model_path

    name = recipe.model.name_or_path
    if name not in EMBEDDED_MODELS and _looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise ModelNotFoundError(f"{source}: model.name_or_path: {name}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        what = (
            "a model folder"
            if os.path.isdir(name)
            else f"an embedded model ({', '.join(EMBEDDED_MODELS)}), a model folder or a reachable Hub id"
        )
        raise ModelError(
            f"{source}: model.name_or_path: {name!r} is not {what} ({' '.join(str(e).split())})"
        ) from None
    return config


def check_model(recipe: Recipe, source: str, config) -> None:
    """Architecture, groups and sequence length against the model's config."""
    from cqil.rewrite.plan import GroupPlan
    from cqil.rewrite.surgery import SUPPORTED_ARCHITECTURES

    archs = list(getattr(config, "architectures", None) or [])
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ModelError(
            f"{source}: model.name_or_path: {recipe.model.name_or_path} is a {', '.join(archs)}, which the "
            f"surgery does not support (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    groups = recipe.parallelize.groups
    n_layers = getattr(config, "num_hidden_layers", None)
    if groups != "auto" and n_layers is not None:
        try:
            plan = GroupPlan.parse(groups, n_layers)
        except ValueError as e:
            raise RecipeError(
                source, "parallelize.groups", f"{e} (the model has {n_layers} layers)"
            ) from None
        check_plan(plan, recipe, source)
    positions = getattr(config, "max_position_embeddings", None)
    for key, length in (("train.seq_len", recipe.train.seq_len), ("eval.seq_len", recipe.eval.seq_len)):
        if positions and length and length > positions:
            raise RecipeError(source, key, f"{length} > the model's max_position_embeddings {positions}")


def check_plan(plan, recipe: Recipe, source: str) -> None:
    """What a resolved plan must allow (the recipe's own plan here, a searched one in the trainer):
    a group of two or more layers, and the layers ``train.layers_after_groups`` names."""
    if not plan.groups or plan.is_identity():
        raise RecipeError(source, "parallelize.groups", "the plan has no group of two or more layers")
    try:
        plan.layers_after(recipe.train.layers_after_groups)
    except ValueError as e:
        raise RecipeError(source, "train.layers_after_groups", str(e)) from None


def check_gguf_export(recipe: Recipe, source: str, config) -> None:
    """``export.gguf`` needs groups that fold into one plain layer each, which llama.cpp runs."""
    if recipe.export.gguf is None:
        return
    p = recipe.parallelize
    if p.mode != "parallel" or p.bypass != "lp" or p.gates != "fixed":
        raise RecipeError(
            source,
            "export.gguf",
            f"a GGUF holds each group as one plain wide layer, which needs parallelize.mode: parallel, "
            f"bypass: lp and gates: fixed (this recipe: mode {p.mode}, bypass {p.bypass}, gates {p.gates})",
        )
    if getattr(config, "model_type", None) == "qwen3":
        raise RecipeError(
            source,
            "export.gguf",
            "llama.cpp's deci layers have no per-head q/k norms (Qwen3); remove export.gguf",
        )


def check_data(recipe: Recipe, source: str) -> None:
    """The data paths, files and mixture (:func:`cqil.recovery.data_checks.check_data`)."""
    from cqil.recovery.data import expand_paths
    from cqil.recovery.data_checks import check_data as check

    check(recipe.data, source)
    # The out-of-domain text is read only for the evaluation; a path that matches nothing is still
    # bad input, so it is refused here, before the weights load and before anything is written.
    for path in recipe.eval.other_domain or []:
        try:
            expand_paths([path])
        except (DataNotFoundError, DataError) as e:
            raise RecipeError(source, "eval.other_domain", str(e)) from None


def check_precision(recipe: Recipe, source: str, device: torch.device) -> None:
    """fp16 autocast needs a GPU: on a CPU accelerate trains in float32 and says nothing (bf16 runs)."""
    if recipe.train.mixed_precision == "fp16" and device.type == "cpu":
        raise RecipeError(
            source,
            "train.mixed_precision",
            "fp16 needs a GPU (on a CPU it trains in float32): use bf16 or no",
        )


def check_output_dir(output_dir: Path) -> None:
    """``output_dir`` must be (or be creatable as) a writable folder."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} exists and is not a folder")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent != out and not parent.is_dir():
        raise OutputDirError(f"output_dir {out} lies under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output_dir {out}: {parent} is not writable")


_STALE = re.compile(r"^\..+\.(\d+\.[0-9a-f]{8}\.(tmp|old)|tmp)$")


def remove_stale(output_dir: Path) -> list[Path]:
    """Hidden temporary checkpoints and export staging folders a killed run left behind."""
    out = Path(output_dir)
    stale = [p for p in (out / "checkpoints").glob(".step-*.tmp")]
    stale += [p for p in out.glob(".*") if _STALE.match(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


# What the project's own job scripts write into output_dir before the run starts (the Slurm logs of
# launch/slurm/recover.sbatch): a folder holding only these is still a new run's folder.
LAUNCHER_LOGS = ("slurm",)


@dataclass
class CheckedRun:
    """What :func:`check_run` found: the model's config, this run's fingerprint, the folder's marker,
    and the checkpoint to resume from (with the recipe keys that changed since it was written)."""

    model_config: Any
    fingerprint: dict
    marker: dict | None = None  # cqil_run.json of a folder that already holds a run
    resume_from: Path | None = None  # the newest intact checkpoint of this run
    resume_changes: dict = field(default_factory=dict)  # train.resume=reset_optimizer: key -> [old, new]

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None


def check_run(recipe: Recipe, source: str, output_dir: Path, processes: Processes, log: Log) -> CheckedRun:
    """Bad input fails here, in one line: the model (from its config), the output folder, the data
    paths, and a folder that holds a run of another recipe (:mod:`cqil.recovery.fingerprint`)."""
    out = Path(output_dir)
    config = model_config(recipe, source)
    check_model(recipe, source, config)
    check_gguf_export(recipe, source, config)
    check_output_dir(out)
    check_data(recipe, source)
    check_precision(recipe, source, processes.device)
    checked = CheckedRun(config, fingerprint.run_fingerprint(recipe, processes.num_processes))
    checked.marker = marker = fingerprint.read_marker(out)
    if (
        marker is None
        and out.is_dir()
        and any(p.name not in LAUNCHER_LOGS and not run_lock.is_lock_file(p.name) for p in out.iterdir())
    ):
        raise OutputDirError(
            f"output_dir {out} is not empty and is not a cqil run (no {fingerprint.MARKER}); "
            "choose a new output_dir"
        )
    if marker is not None and "fingerprint" not in marker:
        raise OutputDirError(f"{out / fingerprint.MARKER} is unreadable; choose a new output_dir")
    found = list_checkpoints(out)
    if found:
        checked.resume_changes = fingerprint.check_resumable(
            source, out, marker["fingerprint"], checked.fingerprint, recipe.train.resume
        )
    checked.resume_from = checkpoint.latest_intact(out, processes, log) if found else None
    return checked


def claim_run_folder(output_dir: Path, checked: CheckedRun, processes: Processes, log: Log) -> None:
    """The marker first (a new run), the history of a changed recipe, stale temporaries removed."""
    out, marker, new = Path(output_dir), checked.marker, checked.fingerprint
    if processes.is_main_process:
        if marker is None:
            fingerprint.write_marker(out, new)
        elif marker["fingerprint"] != new:
            # No differences: the marker only gains the keys a newer cqil added, at their defaults.
            changed, event = fingerprint.differences(marker["fingerprint"], new), None
            if changed and checked.resuming:
                step = json.loads((checked.resume_from / "trainer_state.json").read_text())["step"]
                event = {"resume": "reset_optimizer", "step": step, "changed": changed}
            elif changed:  # nothing was trained: what an earlier attempt measured belongs to the old recipe
                event = {"restart": "no checkpoint yet", "changed": changed}
                shutil.rmtree(out / "plan", ignore_errors=True)
                (out / BEFORE).unlink(missing_ok=True)
            fingerprint.write_marker(out, new, previous=marker, event=event)
        for path in remove_stale(out):
            log(f"cqil: removed {path}, left by an interrupted run")
    processes.wait_for_everyone()
