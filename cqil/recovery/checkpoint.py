"""Checkpoints of a recovery run: write, list and resume them, bit-exactly.

A checkpoint ``output_dir/checkpoints/step-NNNNNN/`` holds the trainable weights and the optimizer
state (DeepSpeed's own sub-folder under DeepSpeed), the scheduler, one RNG-and-stream file per rank
and ``trainer_state.json``. It is written under a hidden temporary name and renamed into place, so a
listed checkpoint is always complete. ``checksums.json`` (the SHA-256 of every other file, DeepSpeed's
sub-folder included) is written last; a resume verifies the latest checkpoint and falls back to the
newest intact one. No checkpoint is written of weights that are not finite or have exploded.
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cqil.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    from cqil.recovery.trainer import RecoveryTrainer

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One SHA-256 over named tensors' bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


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


def latest_intact(trainer: RecoveryTrainer) -> Path | None:
    """The newest checkpoint that verifies, warning about each damaged one above it (main process decides)."""
    from accelerate.utils import broadcast_object_list

    acc = trainer.accelerator
    found = list_checkpoints(trainer.output_dir)
    choice = [None]
    if acc.is_main_process and found:
        for path in reversed(found):
            why = damage(path)
            if why is None:
                choice = [str(path)]
                break
            trainer.log(f"cqil: warning: checkpoint {path} is damaged ({why}); trying the one before it")
    if acc.num_processes > 1:
        broadcast_object_list(choice)
    if found and choice[0] is None:
        raise CheckpointError(
            f"no intact checkpoint under {trainer.output_dir / 'checkpoints'} (all {len(found)} are damaged); "
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


def check_weights(trainer: RecoveryTrainer) -> None:
    """Refuse to save non-finite or exploded trainable weights (see EXPLODED_FACTOR)."""
    largest = max_abs(trainer.trainable.values())
    limit = EXPLODED_FACTOR * max(1.0, trainer.start_max_abs)
    if math.isfinite(largest) and largest <= limit:
        return
    what = (
        "are not finite" if not math.isfinite(largest) else f"exploded (max |w| {largest:.3g} > {limit:.3g})"
    )
    good = [p for p in list_checkpoints(trainer.output_dir) if int(p.name.split("-")[1]) <= trainer.step]
    raise NonFiniteWeightsError(trainer.step, what, good[-1] if good else None)


def _storage_error(path: Path, e: OSError) -> StorageError:
    cause = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return StorageError(f"cannot write {path}: {cause}")


def save_checkpoint(trainer: RecoveryTrainer) -> Path:
    """Write the full training state to ``checkpoints/step-NNNNNN/`` (via a temporary name, checksums last)."""
    check_weights(trainer)
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    final = root / checkpoint_name(trainer.step)
    tmp = root / f".{final.name}.tmp"
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if trainer.is_deepspeed:
            trainer.engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
        elif acc.is_main_process:
            from safetensors.torch import save_file

            save_file(trainer._trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        rank_state = {"stream": trainer.stream.state_dict(), **rng_state()}
        torch.save(rank_state, tmp / f"rank-{acc.process_index:03d}.pt")
        if acc.is_main_process:
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {
                "step": trainer.step,
                "tokens_seen": trainer.tokens_seen,
                "world_size": acc.num_processes,
                "start_max_abs": trainer.start_max_abs,
                "fingerprint": trainer.fingerprint,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / CHECKSUMS).write_text(json.dumps(file_checksums(tmp), indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error(tmp, e) from e
    if acc.is_main_process:
        for old in list_checkpoints(trainer.output_dir)[: -trainer.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        trainer.log(f"cqil: checkpoint {final}")
    acc.wait_for_everyone()
    return final


def resume(trainer: RecoveryTrainer, path: Path, *, reset_optimizer: bool = False) -> None:
    """Restore everything :func:`save_checkpoint` wrote; training continues bit-exactly.

    ``reset_optimizer``: the weights, step, data position and RNG only; the optimizer and scheduler
    stay as the new recipe built them, the scheduler moved on to the resumed step."""
    acc = trainer.accelerator
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != acc.num_processes:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes; resume with the same number, "
            f"not {acc.num_processes}"
        )
    if trainer.is_deepspeed:
        trainer.engine.load_checkpoint(
            str(path),
            tag="deepspeed",
            load_module_strict=False,
            load_optimizer_states=not reset_optimizer,
            load_lr_scheduler_states=False,
        )
    else:
        from safetensors.torch import load_file

        saved = load_file(str(path / "trainable.safetensors"))
        missing = set(trainer.trainable) ^ set(saved)
        if missing:
            raise CheckpointError(
                f"{path}: trainable weights do not match this recipe: {sorted(missing)[:5]}"
            )
        with torch.no_grad():
            for name, param in trainer.trainable.items():
                param.copy_(saved[name])
        if not reset_optimizer:
            trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler = trainer.scheduler
    if reset_optimizer:  # what `step` calls of scheduler.step() give, without an optimizer step before them
        scheduler.last_epoch = state["step"]
        lrs = [
            base * fn(state["step"])
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        for group, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    else:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_state = torch.load(path / f"rank-{acc.process_index:03d}.pt", weights_only=True)
    trainer.stream.load_state_dict(rank_state["stream"])
    set_rng_state(rank_state)
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    trainer.start_max_abs = state.get("start_max_abs", trainer.start_max_abs)
    how = " with a fresh optimizer and schedule (train.resume=reset_optimizer)" if reset_optimizer else ""
    trainer.log(f"cqil: resumed from {path} at step {trainer.step}{how}")


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
