"""The optimizer and learning-rate schedule of a recovery run, and the DeepSpeed batch settings."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from cqil.recovery.recipe import Recipe

if TYPE_CHECKING:
    from cqil.recovery.trainer import RecoveryTrainer


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine/linear decay to min_lr_ratio."""
    train = recipe.train

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape

    return factor


def make_optimizer(trainer: RecoveryTrainer) -> torch.optim.Optimizer:
    train = trainer.recipe.train
    decay = [p for n, p in trainer.trainable.items() if p.dim() >= 2 and not n.endswith(".gates")]
    no_decay = [p for n, p in trainer.trainable.items() if not (p.dim() >= 2 and not n.endswith(".gates"))]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = tuple(train.adam_betas)
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get(
        "offload_optimizer", {}
    ).get("device", "none") not in ("none", None):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optimizer states on the CPU need its kernel

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, foreach=False)


def configure_deepspeed(trainer: RecoveryTrainer) -> None:
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    train = trainer.recipe.train
    # No DataLoader goes through accelerate, so DeepSpeed cannot infer the batch size ("auto").
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum_steps
    cfg["train_batch_size"] = (
        train.micro_batch_size * train.grad_accum_steps * trainer.accelerator.num_processes
    )
    cfg["gradient_clipping"] = train.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)
    if plugin.zero_stage == 3:
        from cqil.recovery.sharded import register_external_weights

        register_external_weights(trainer.model.student)
