"""The optimizer and learning-rate schedule of a recovery run, and the DeepSpeed batch settings.

Each function takes the ``train`` section of the recipe and what it configures (the trainable weights,
the DeepSpeed plugin) and returns what it built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn

from cqil.errors import LaunchError
from cqil.recovery.progress import Log
from cqil.recovery.recipe import TrainConfig


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warmup, then cosine/linear decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        if train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * shape

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_lambda` over ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))


def make_optimizer(
    trainable: dict[str, nn.Parameter], train: TrainConfig, deepspeed_config: dict | None = None
) -> torch.optim.Optimizer:
    """AdamW over ``trainable`` (weight decay on matrices, never on gates); DeepSpeed's CPU Adam when
    ``deepspeed_config`` offloads the optimizer state."""
    decay = [p for n, p in trainable.items() if p.dim() >= 2 and not n.endswith(".gates")]
    no_decay = [p for n, p in trainable.items() if not (p.dim() >= 2 and not n.endswith(".gates"))]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = tuple(train.adam_betas)
    offload = (deepspeed_config or {}).get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device", "none") not in ("none", None):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optimizer states on the CPU need its kernel

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, foreach=False)


# DeepSpeed buffer sizes that "auto" derives from the hidden size h, by the rule accelerate and
# transformers apply: the gradient reduce bucket h², the ZeRO-3 prefetch bucket 0.9 h², and the size
# under which ZeRO-3 keeps a parameter whole on every rank, 10 h.
HIDDEN_SIZED_KEYS: dict[str, Callable[[int], int]] = {
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


def size_deepspeed_buffers(plugin, model_config) -> dict[str, int]:
    """Fill the DeepSpeed config's hidden-size ``"auto"`` values from the model's config; returns them.

    accelerate fills them in ``prepare()`` from ``model.config``: too late for a model that ZeRO-3
    partitions as it loads (``zero.Init`` reads them first), and the model prepared here is the
    student and teacher together, which has no config. Values written as numbers stay as they are.
    """
    auto = [key for key in HIDDEN_SIZED_KEYS if plugin.is_auto(key)]
    if not auto:
        return {}
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int):
        where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"
        raise LaunchError(
            f'{where} sets {", ".join(auto)} to "auto", which needs the model\'s hidden_size, and '
            "its config has none: write the numbers into the DeepSpeed config"
        )
    values = {key: HIDDEN_SIZED_KEYS[key](hidden) for key in auto}
    for key in auto:  # only these keys: the batch sizes are still "auto" (see configure_deepspeed)
        plugin.fill_match(key, must_match=False, **values)
    return values


def fill_deepspeed_auto(plugin, model_config, log: Log) -> None:
    """Before the model loads: the hidden-size ``"auto"`` values of the run's DeepSpeed config
    (``plugin``, None without DeepSpeed), logged."""
    if plugin is not None and (sized := size_deepspeed_buffers(plugin, model_config)):
        values = ", ".join(f"{k}={v:,}" for k, v in sized.items())
        log(f'cqil: DeepSpeed "auto" from the hidden size: {values}')


def configure_deepspeed(plugin, train: TrainConfig, num_processes: int, student: nn.Module) -> None:
    """The batch settings of the DeepSpeed config (``plugin``, None without DeepSpeed) from ``train``;
    under ZeRO-3, the weights a merged group of ``student`` reads registered with it."""
    if plugin is None:
        return
    # No DataLoader goes through accelerate, so DeepSpeed cannot infer the batch size ("auto").
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum_steps
    cfg["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps * num_processes
    cfg["gradient_clipping"] = train.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)
    if plugin.zero_stage == 3:
        from cqil.recovery.sharded import register_external_weights

        register_external_weights(student)
