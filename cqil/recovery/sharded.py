"""DeepSpeed ZeRO-3 with no whole model on any rank: partitioned loading, surgery, teacher and export.

ZeRO-3 exists so that each of N ranks holds 1/N of every weight. A recovery reads whole weights in
four places, and under ZeRO-3 each of them works on one piece of the model at a time:

* **the load**: transformers builds the model inside ``deepspeed.zero.Init`` and fills each
  module's partitions from the checkpoint (its ZeRO-3 loading path);
* **the teacher's copy** of the grouped layers (:func:`teacher_copies`): each layer is gathered
  alone, copied, and the copy partitioned before the next;
* **the surgery** (:func:`parallelize_partitioned`): :func:`cqil.parallelize` with a ``materialize``
  that gathers one group's original layers while it builds the group, then partitions the group;
* **the end** (:func:`gathered_digest`, :func:`main_process_copy`): the frozen-weight digest reads
  one parameter at a time, and the export is built on the main process from weights gathered one
  module at a time into its host memory.

So while the model is built a rank's peak is its share of the partitioned state plus one group's
whole weights (the original layers gathered beside the group built from them); in training, what
ZeRO-3 itself keeps gathered (up to ``stage3_max_live_parameters``) and its buckets add a constant. The measurements are
``bench/zero3_memory.py``'s; the memory model for 7B and 70B models is in ``launch/README.md``.

What still needs the whole model on every rank falls back to the whole-model path, said in the log:
coalesce mode (a coalesced layer is fitted from the original layers' activations) and LoRA (peft
wraps the layers before DeepSpeed sees them).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from cqil._compat import zero3_init_disabled
from cqil.recovery.measure import HeldOut, before_label, run_perplexity
from cqil.recovery.progress import Log
from cqil.recovery.recipe import EvalConfig, ModelConfig, Recipe
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import parallelize


def whole_model_reason(plugin, recipe: Recipe) -> str | None:
    """Why this run (DeepSpeed ``plugin``, None without it) loads the whole model on every rank, or
    None when it is ZeRO-3 and loads sharded."""
    if plugin is None or plugin.zero_stage != 3:
        return "not ZeRO-3"
    if recipe.parallelize.mode == "coalesce":
        return "coalesce mode fits each coalesced layer from the whole original layers"
    if recipe.train.lora is not None:
        return "LoRA adapters are added to whole layers"
    if recipe.parallelize.groups == "auto":
        return "groups: auto searches the plan on the whole model"
    return None


def ds_config() -> dict:
    """The DeepSpeed config the model was partitioned with (accelerate's, its batch sizes filled in)."""
    from transformers.integrations import deepspeed_config

    return deepspeed_config()


def load(m: ModelConfig, plugin, num_processes: int, log: Log):
    """``(model, tokenizer)`` of the recipe's ``model`` section, the weights partitioned as they load
    (transformers' ZeRO-3 path) under the DeepSpeed ``plugin``."""
    from cqil.pretrained import load_model

    # accelerate points transformers at the DeepSpeed config only with zero3_init_flag; say it here.
    plugin.set_deepspeed_weakref()
    log(f"cqil: ZeRO-3: loading the model partitioned over {num_processes} ranks (no rank holds it whole)")
    return load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)


def partition(module: nn.Module, config: dict) -> nn.Module:
    """Partition ``module``'s whole parameters across the ranks (those already partitioned stay)."""
    import deepspeed

    # mem_efficient_linear would replace torch.nn.functional.linear for the rest of the process.
    deepspeed.zero.Init(module=module, config_dict_or_path=config, mem_efficient_linear=False)
    return module


@contextlib.contextmanager
def whole_model(model: nn.Module, *, gather: bool) -> Iterator[None]:
    """With ``gather`` (a ZeRO-3 run that loaded the whole model and had accelerate partition it), all
    of ``model`` whole again inside the context; without, a no-op."""
    if not gather:
        yield
        return
    with gathered(model.parameters()):
        yield


def evaluate_before(
    model: nn.Module, heldout: HeldOut, settings: EvalConfig, *, mode: str, log: Log
) -> dict[str, dict]:
    """Held-out perplexity of the original and the parallelized model, through the engine.

    Under sharded ZeRO-3 the original layers exist only as the partitioned teacher copy, and only the
    engine's hooks gather partitioned weights in forward: both measurements wait for it, and every
    rank runs them (a gather is collective). The lm-eval tasks before training are left out: they run
    on the main process alone; ``cqil evaluate`` measures the original model on its own.

    ``model`` is the run's :class:`~cqil.recovery.model.RecoveryModel`; returns the results by key
    (``"original"``, ``"parallelized"``), none when ``settings.before`` is off.
    """
    if not settings.before:
        return {}
    size = settings.batch_size
    results = {
        "original": run_perplexity(OriginalModel(model), heldout, batch_size=size, label="original", log=log),
        "parallelized": run_perplexity(
            model.student, heldout, batch_size=size, label=before_label(mode), log=log
        ),
    }
    if settings.tasks:
        log("cqil: lm-eval before training is not run under sharded ZeRO-3 (cqil evaluate runs it)")
    return results


def gathered(params: Iterable[nn.Parameter]):
    """The whole values of partitioned ``params`` on every rank, for reading, inside the context."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def teacher_copies(model: nn.Module, indices: Sequence[int], config: dict) -> dict[int, nn.Module]:
    """A partitioned copy of each original layer in ``indices``, made one layer at a time."""
    layers = model.model.layers
    copies = {}
    for i in indices:
        layer = layers[i]
        with gathered(layer.parameters()):
            state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        # The copy is built empty (meta) and takes the cloned tensors as they are: no second allocation.
        with torch.device("meta"), zero3_init_disabled():
            fresh = copy_structure(layer)
        fresh.load_state_dict(state, assign=True)
        copies[i] = partition(fresh, config)
    return copies


def copy_structure(layer: nn.Module) -> nn.Module:
    """An empty module of ``layer``'s class and configuration (decoder layers take config, layer_idx)."""
    attn = layer.self_attn
    return type(layer)(attn.config, attn.layer_idx)


def parallelize_partitioned(model: nn.Module, plan: GroupPlan, config: dict, **options) -> nn.Module:
    """:func:`cqil.parallelize` on a partitioned model, one group's whole weights at a time."""

    def materialize(originals: list[nn.Module], build: Callable[[], nn.Module]) -> nn.Module:
        with gathered(p for layer in originals for p in layer.parameters()):
            group = build()
        return partition(group, config)

    return parallelize(model, plan, materialize=materialize, **options)


def register_external_weights(model: nn.Module) -> None:
    """Tell ZeRO-3 that each merged group reads its projections' weights in its own forward.

    A merged group slices ``o_proj``, ``gate_up_proj`` and ``down_proj`` weights branch by branch
    instead of calling those modules; ZeRO-3 gathers a weight only around its owner's forward unless
    it is registered with the module that reads it (``deepspeed.zero.register_external_parameter``).
    """
    import deepspeed

    from cqil.rewrite.group import MergedGroup

    for group in model.modules():
        if isinstance(group, MergedGroup):
            for proj in (group.o_proj, group.gate_up_proj, group.down_proj):
                for param in proj.parameters():
                    deepspeed.zero.register_external_parameter(group, param)


def gathered_digest(named: dict[str, nn.Parameter]) -> str:
    """:func:`cqil.recovery.checkpoint.state_digest` of partitioned parameters, gathered one at a time."""
    h = hashlib.sha256()
    for name in sorted(named):
        with gathered([named[name]]):
            tensor = named[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def gathered_state(named: dict[str, nn.Parameter], *, main: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of partitioned ``named`` on the main process (``main``); elsewhere ``{}``."""
    out = {}
    for name, param in named.items():
        with gathered([param]):
            if main:
                out[name] = param.detach().cpu().contiguous().clone()
    return out


def main_process_copy(student: nn.Module, *, main: bool) -> nn.Module | None:
    """A whole CPU copy of the partitioned parallelized ``student`` on the main process, built from
    weights gathered one module at a time (the other ranks take part in the gathers and get None).

    The copy is the original architecture rebuilt empty from the config and parallelized with the
    recorded options, then given the gathered tensors: it is what :func:`cqil.export.export_model`
    writes, and the live student's partitions are never touched.
    """
    state = {}
    for prefix, module in student.named_modules():
        own = list(module.named_parameters(prefix=prefix, recurse=False))
        own += [(n, b) for n, b in module.named_buffers(prefix=prefix, recurse=False)]
        with gathered(p for _, p in own if isinstance(p, nn.Parameter)):
            if main:
                state |= {n: t.detach().cpu().contiguous().clone() for n, t in own}
    if not main:
        return None
    record = student.config.cqil
    config = copy.deepcopy(student.config)
    config.num_hidden_layers = record["num_hidden_layers_original"]
    if record.get("layer_types_original"):
        config.layer_types = list(record["layer_types_original"])
    del config.cqil
    with torch.device("meta"), zero3_init_disabled():
        skeleton = type(student)(config)
    options = {k: record[k] for k in ("bypass", "bypass_distance", "gates", "gate_shape", "form")}
    parallelize(skeleton, GroupPlan.from_dict(record["plan"]), **options)
    skeleton.load_state_dict({k: state[k] for k in skeleton.state_dict()}, strict=True, assign=True)
    skeleton.tie_weights()
    for name, buffer in list(skeleton.named_buffers()):  # non-persistent ones (rotary frequencies)
        if buffer.is_meta and name in state:
            owner, _, attr = name.rpartition(".")
            setattr(skeleton.get_submodule(owner), attr, state[name])
    left = [n for n, t in [*skeleton.named_parameters(), *skeleton.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered student has no value for {left[:5]}")
    return skeleton.eval()


class OriginalModel(nn.Module):
    """The original model as the teacher's path of a :class:`~cqil.recovery.model.RecoveryModel`
    computes it: called like a causal LM (``.logits``), for a perplexity of the original under
    ZeRO-3, where the original layers exist only as the partitioned teacher copy."""

    def __init__(self, recovery_model: nn.Module) -> None:
        super().__init__()
        self.inner = recovery_model

    def forward(self, input_ids: torch.LongTensor, **_) -> Logits:
        return Logits(self.inner.original_logits(input_ids))


class Logits:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
