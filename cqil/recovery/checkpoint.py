"""Checkpoints of a recovery run: write, list and resume them, bit-exactly.

A checkpoint ``output_dir/checkpoints/step-NNNNNN/`` holds the trainable weights and the optimizer
state (DeepSpeed's own sub-folder under DeepSpeed), the scheduler, one RNG-and-stream file per rank
and ``trainer_state.json``. It is written under a hidden temporary name and renamed into place, so a
listed checkpoint is always complete. ``checksums.json`` (the SHA-256 of every other file, DeepSpeed's
sub-folder included) is written last; a resume verifies the latest checkpoint and falls back to the
newest intact one. No checkpoint is written of weights that are not finite or have exploded.

Each function takes what it reads (the :class:`TrainingState` of tensors and their optimizer, the
run's :class:`~cqil.recovery.state.RunState` counters, the processes, ``output_dir``, a log) and
returns what it produced; none knows the trainer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cqil._compat import set_last_lr
from cqil.errors import CheckpointError, StorageError
from cqil.recovery.progress import Log
from cqil.recovery.sharded import gathered_digest
from cqil.recovery.state import Processes, RunState

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainingState:
    """The tensors a checkpoint holds, and what steps them: the trainable weights (by name), the
    optimizer and schedule, the data stream, and under DeepSpeed its engine, which saves and loads
    the weights and the optimizer state itself."""

    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: Any  # state_dict() / load_state_dict(): cqil.recovery.stream.TokenStream
    engine: Any = None  # the DeepSpeed engine; None without DeepSpeed


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One SHA-256 over named tensors' bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def weights_digest(named: dict[str, torch.Tensor]) -> str:
    """:func:`state_digest`, with partitioned (ZeRO-3) parameters gathered one at a time."""
    partitioned = any(hasattr(p, "ds_id") for p in named.values())
    return (gathered_digest if partitioned else state_digest)(named)


def trainable_state(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable weights, by name: what a checkpoint without DeepSpeed saves."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in trainable.items()}


def frozen_weights(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` that is not in ``trainable``: what must stay bit-identical."""
    ids = {id(p) for p in trainable.values()}
    return {n: p for n, p in model.named_parameters() if id(p) not in ids}


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def numpy_state(saved: dict | None = None):
    """NumPy's global RNG state as plain types that ``torch.load(weights_only=True)`` reads, or back."""
    if saved is None:
        name, key, pos, has_gauss, gauss = np.random.get_state()
        return {
            "name": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    key = saved["key"].numpy().astype(np.uint32)
    return (saved["name"], key, saved["pos"], saved["has_gauss"], saved["gauss"])


def rng_state() -> dict:
    """Every RNG this process draws from (Python, NumPy, torch, CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKSUMS = "checksums.json"
# Exploded: some trainable weight's magnitude above EXPLODED_FACTOR x max(1, the largest magnitude of
# the trainable weights at the start of training). Recovery fine-tunes from a working model, so a
# thousand-fold growth is divergence, never learning.
EXPLODED_FACTOR = 1e3


class Preempted(RuntimeError):
    """A SIGTERM / SIGUSR1 arrived; the training state is checkpointed and the run should exit."""


class NonFiniteWeightsError(RuntimeError):
    """The trainable weights became NaN/inf or exploded: no checkpoint (or export) of them is written."""

    def __init__(self, step: int, what: str, last_good: Path | None) -> None:
        self.step = step
        kept = f"last good checkpoint {last_good}" if last_good else "no checkpoint was written"
        super().__init__(f"trainable weights {what} at step {step}; stopped without saving them, {kept}")


def file_checksums(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` except the checksums file itself."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[path.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def damage(folder: Path) -> str | None:
    """Why ``folder`` is not an intact checkpoint (None when it is)."""
    listed = folder / CHECKSUMS
    if not listed.is_file():
        return f"no {CHECKSUMS}"
    try:
        expected = json.loads(listed.read_text())
    except ValueError:
        return f"{CHECKSUMS} is unreadable"
    actual = file_checksums(folder)
    for name in sorted(expected):
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != expected[name]:
            return f"{name} does not match its checksum"
    return None


def latest_intact(output_dir: Path, processes: Processes, log: Log) -> Path | None:
    """The newest checkpoint that verifies, warning about each damaged one above it (main process decides)."""
    from accelerate.utils import broadcast_object_list

    found = list_checkpoints(output_dir)
    choice = [None]
    if processes.is_main_process and found:
        for path in reversed(found):
            why = damage(path)
            if why is None:
                choice = [str(path)]
                break
            log(f"cqil: warning: checkpoint {path} is damaged ({why}); trying the one before it")
    if processes.num_processes > 1:
        broadcast_object_list(choice)
    if found and choice[0] is None:
        raise CheckpointError(
            f"no intact checkpoint under {Path(output_dir) / 'checkpoints'} (all {len(found)} are damaged); "
            "choose a new output_dir"
        )
    return Path(choice[0]) if choice[0] else None


def max_abs(tensors) -> float:
    """The largest |w| over ``tensors`` (NaN if any is NaN), reduced over processes under ZeRO-3's partitions."""
    local = torch.zeros((), dtype=torch.float64)
    for tensor in tensors:
        data = getattr(tensor, "ds_tensor", tensor).detach()
        if data.numel():
            value = data.abs().max().double().cpu()
            local = value if torch.isnan(value) else torch.maximum(local, value)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        nan = torch.isnan(local).double()
        both = torch.stack([torch.nan_to_num(local, posinf=math.inf), nan])
        device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
        both = both.to(device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        local = torch.tensor(math.nan) if both[1].item() else both[0].cpu()
    return float(local)


def check_weights(trainable: Iterable[torch.Tensor], run: RunState, output_dir: Path) -> None:
    """Refuse to save non-finite or exploded trainable weights (see EXPLODED_FACTOR); the error names
    the newest checkpoint of ``output_dir`` at or before ``run.step``."""
    largest = max_abs(trainable)
    limit = EXPLODED_FACTOR * max(1.0, run.start_max_abs)
    if math.isfinite(largest) and largest <= limit:
        return
    what = (
        "are not finite" if not math.isfinite(largest) else f"exploded (max |w| {largest:.3g} > {limit:.3g})"
    )
    good = [p for p in list_checkpoints(output_dir) if int(p.name.split("-")[1]) <= run.step]
    raise NonFiniteWeightsError(run.step, what, good[-1] if good else None)


def _storage_error(path: Path, e: OSError) -> StorageError:
    cause = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return StorageError(f"cannot write {path}: {cause}")


def save_checkpoint(
    output_dir: Path,
    training: TrainingState,
    run: RunState,
    processes: Processes,
    *,
    fingerprint: dict,
    keep: int,
    log: Log,
) -> Path:
    """Write the full training state to ``output_dir/checkpoints/step-NNNNNN/`` (via a temporary name,
    checksums last), keep the newest ``keep`` checkpoints; returns the new one's path."""
    check_weights(training.trainable.values(), run, output_dir)
    root = Path(output_dir) / "checkpoints"
    final = root / checkpoint_name(run.step)
    tmp = root / f".{final.name}.tmp"
    main = processes.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        processes.wait_for_everyone()
        if training.engine is not None:
            training.engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
        elif main:
            from safetensors.torch import save_file

            save_file(trainable_state(training.trainable), str(tmp / "trainable.safetensors"))
            torch.save(training.optimizer.state_dict(), tmp / "optimizer.pt")
        rank_state = {"stream": training.stream.state_dict(), **rng_state()}
        torch.save(rank_state, tmp / f"rank-{processes.process_index:03d}.pt")
        if main:
            torch.save(training.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {
                "step": run.step,
                "tokens_seen": run.tokens_seen,
                "world_size": processes.num_processes,
                "start_max_abs": run.start_max_abs,
                "fingerprint": fingerprint,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        processes.wait_for_everyone()
        if main:
            (tmp / CHECKSUMS).write_text(json.dumps(file_checksums(tmp), indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(tmp, e) from e
    if main:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log(f"cqil: checkpoint {final}")
    processes.wait_for_everyone()
    return final


def resume(
    path: Path,
    training: TrainingState,
    run: RunState,
    processes: Processes,
    *,
    reset_optimizer: bool = False,
    log: Log,
) -> RunState:
    """Restore everything :func:`save_checkpoint` wrote into ``training`` (in place) and return the
    counters it recorded (``run``'s where the checkpoint has none); training continues bit-exactly.

    ``reset_optimizer``: the weights, step, data position and RNG only; the optimizer and scheduler
    stay as the new recipe built them, the scheduler moved on to the resumed step."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != processes.num_processes:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes; resume with the same number, "
            f"not {processes.num_processes}"
        )
    if training.engine is not None:
        training.engine.load_checkpoint(
            str(path),
            tag="deepspeed",
            load_module_strict=False,
            load_optimizer_states=not reset_optimizer,
            load_lr_scheduler_states=False,
        )
    else:
        from safetensors.torch import load_file

        saved = load_file(str(path / "trainable.safetensors"))
        missing = set(training.trainable) ^ set(saved)
        if missing:
            raise CheckpointError(
                f"{path}: trainable weights do not match this recipe: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            for name, param in training.trainable.items():
                param.copy_(saved[name])
        if not reset_optimizer:
            training.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler = training.scheduler
    if reset_optimizer:  # what `step` calls of scheduler.step() give, without an optimizer step before them
        scheduler.last_epoch = state["step"]
        lrs = [
            base * fn(state["step"])
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(training.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        set_last_lr(scheduler, lrs)
    else:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_state = torch.load(path / f"rank-{processes.process_index:03d}.pt", weights_only=True)
    training.stream.load_state_dict(rank_state["stream"])
    set_rng_state(rank_state)
    resumed = replace(
        run,
        step=state["step"],
        tokens_seen=state["tokens_seen"],
        start_max_abs=state.get("start_max_abs", run.start_max_abs),
    )
    how = " with a fresh optimizer and schedule (train.resume=reset_optimizer)" if reset_optimizer else ""
    log(f"cqil: resumed from {path} at step {resumed.step}{how}")
    return resumed


def trim_metrics(path: Path, step: int) -> None:
    """Keep the complete lines of ``metrics.jsonl`` with step <= ``step`` (a resumed run logs the rest again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn by a kill mid-write
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    from cqil.files import write_atomic

    write_atomic(path, "".join(kept))
