"""Checkpoints of a recovery run: write, list and resume them, bit-exactly.

A checkpoint ``output_dir/checkpoints/step-NNNNNN/`` holds the trainable weights and the optimizer
state (DeepSpeed's own sub-folder under DeepSpeed), the scheduler, one RNG-and-stream file per rank
and ``trainer_state.json``. It is written under a hidden temporary name and renamed into place, so a
listed checkpoint is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

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


def save_checkpoint(trainer: RecoveryTrainer) -> Path:
    """Write the full training state to ``checkpoints/step-NNNNNN/`` (via a temporary name)."""
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    final = root / checkpoint_name(trainer.step)
    tmp = root / f".{final.name}.tmp"
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
        state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen, "world_size": acc.num_processes}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(trainer.output_dir)[: -trainer.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        trainer.log(f"cqil: checkpoint {final}")
    acc.wait_for_everyone()
    return final


def resume(trainer: RecoveryTrainer, path: Path) -> None:
    """Restore everything :func:`save_checkpoint` wrote; training continues bit-exactly."""
    acc = trainer.accelerator
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != acc.num_processes:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes; resume with the same number, "
            f"not {acc.num_processes}"
        )
    if trainer.is_deepspeed:
        trainer.engine.load_checkpoint(
            str(path), tag="deepspeed", load_module_strict=False, load_lr_scheduler_states=False
        )
    else:
        from safetensors.torch import load_file

        saved = load_file(str(path / "trainable.safetensors"))
        missing = set(trainer.trainable) ^ set(saved)
        if missing:
            raise RuntimeError(f"{path}: trainable weights do not match this recipe: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, param in trainer.trainable.items():
                param.copy_(saved[name])
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_state = torch.load(path / f"rank-{acc.process_index:03d}.pt", weights_only=True)
    trainer.stream.load_state_dict(rank_state["stream"])
    set_rng_state(rank_state)
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    trainer.log(f"cqil: resumed from {path} at step {trainer.step}")
