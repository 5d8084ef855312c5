"""The student of a recovery run and the teacher's own weights: the model loaded (partitioned as it
loads under sharded ZeRO-3), then transformed by the plan (parallelized or coalesced), with a copy of
the grouped region's original layers kept for the teacher where a loss reads it."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

from torch import nn

from cqil._compat import unset_zero3_init
from cqil.recovery import sharded
from cqil.recovery.progress import Log
from cqil.recovery.recipe import ModelConfig, ParallelizeConfig, TrainConfig
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallelize


def needs_teacher(train: TrainConfig) -> bool:
    """Whether any loss of the run reads the original model (every one but plain LM)."""
    loss = train.loss
    return bool(loss.kd or loss.hidden or loss.local or train.local_steps)


def load(m: ModelConfig, plugin, *, whole_because: str | None, num_processes: int, log: Log):
    """``(model, tokenizer)`` of the recipe's ``model`` section under the DeepSpeed ``plugin`` (None
    without DeepSpeed): partitioned as it loads when ``whole_because`` is None (sharded ZeRO-3, see
    :func:`cqil.recovery.sharded.whole_model_reason`), else whole on every process."""
    from cqil.pretrained import load_model

    if whole_because is None:
        return sharded.load(m, plugin, num_processes, log)
    if plugin is not None and plugin.zero_stage == 3:
        log(f"cqil: ZeRO-3 with the whole model loaded on every rank: {whole_because}")
    if plugin is not None:
        # The teacher copy and the surgery need whole weights: under ZeRO-3, transformers would
        # otherwise load into deepspeed.zero.Init and partition them on load. Each rank holds
        # the model in CPU memory until accelerate.prepare partitions it.
        unset_zero3_init()
    try:
        return load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
    finally:
        if plugin is not None:
            plugin.set_deepspeed_weakref()


def transform(
    model: nn.Module,
    plan: GroupPlan,
    par: ParallelizeConfig,
    *,
    keep_teacher: bool,
    partitioned: bool = False,
    trained_after: Sequence[int] = (),
) -> tuple[nn.Module, dict[int, nn.Module] | None]:
    """The student (``model`` parallelized in place, or a coalesced copy) and, with ``keep_teacher``,
    the teacher's copies of the original layers in the plan's groups and of the plain layers in
    ``trained_after`` (which the run trains too), by layer index (else None).

    ``partitioned``: ``model`` was loaded partitioned (sharded ZeRO-3); the copies and the surgery
    then gather one layer or group of whole weights at a time (:mod:`cqil.recovery.sharded`)."""
    teacher = None
    copied = [i for g in plan.groups for i in g] + list(trained_after)
    if par.mode == "coalesce":
        from cqil.rewrite.coalescing import coalesce

        student = coalesce(model, plan)
        if keep_teacher:
            # coalesce copies every weight it keeps and leaves `model` as it was: the original
            # layers themselves are the teacher's copy; the rest of `model` is dropped here.
            teacher = {i: model.model.layers[i] for i in copied}
        return student, teacher
    surgery = parallelize
    if partitioned:  # one layer or group of whole weights at a time
        config = sharded.ds_config()
        surgery = functools.partial(sharded.parallelize_partitioned, config=config)
        teacher = sharded.teacher_copies(model, copied, config) if keep_teacher else None
    elif keep_teacher:
        teacher = {i: copy.deepcopy(model.model.layers[i]) for i in copied}
    surgery(
        model,
        plan,
        bypass=par.bypass,
        bypass_distance=par.bypass_distance,
        gates=par.gates,
        gate_shape=par.gate_shape,
        form=par.form,
    )
    return model, teacher
