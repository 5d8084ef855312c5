"""Rewrite a loaded transformers causal LM so that the layers of each planned group run in parallel.

The surgery replaces entries of ``model.model.layers`` with :class:`~cqil.rewrite.group.ParallelGroup`
modules (one per *effective* layer) and leaves everything else — embeddings, ungrouped layers,
final norm, LM head, the model class itself — untouched. The plan and options are recorded in
``model.config.cqil`` so that an export can rebuild the same model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cqil._compat import capture_hidden_states
from cqil.rewrite.group import (
    BYPASS_MODES,
    FORMS,
    GATE_KINDS,
    GATE_SHAPES,
    BranchGroup,
    MergedGroup,
    ParallelGroup,
    set_layer_idx,
)
from cqil.rewrite.plan import GroupPlan

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is one of the supported transformers causal LMs."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if not names & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"{type(model).__name__} is not supported; supported model classes: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def is_parallelized(model: nn.Module) -> bool:
    return getattr(model.config, "cqil", None) is not None


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def parallelize(
    model: nn.Module,
    plan: str | Sequence[Sequence[int]] | GroupPlan,
    *,
    bypass: str = "lp",
    bypass_distance: int = 1,
    gates: str = "learned",
    gate_shape: str = "scalar",
    form: str = "merged",
    materialize: Callable[[list[nn.Module], Callable[[], nn.Module]], nn.Module] | None = None,
) -> nn.Module:
    """Rewrite ``model`` in place so that every group of ``plan`` runs as one parallel layer.

    Args:
        model: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM``.
        plan: a :class:`GroupPlan`, a ``"S-E:P"`` spec, or a list of layer-index lists.
        bypass: ``"lp"`` (G = 1: every MLP reads the sum of all attention outputs),
            ``"none"`` (G = 0: independent branches) or ``"cqil"`` (G[j,k] = 1 for the
            ``bypass_distance`` branches before j).
        bypass_distance: how many preceding branches feed each MLP under ``"cqil"``.
        gates: ``"learned"`` (``nn.Parameter`` initialised to the mode's G) or ``"fixed"`` (buffers).
        gate_shape: ``"scalar"`` (one gate per branch pair) or ``"channel"`` (one per hidden channel).
        form: ``"merged"`` (fused wide projections) or ``"branches"`` (original modules, branch by branch).
        materialize: how each group's module comes into being, called as ``materialize(originals,
            build)`` with the group's original layers; it returns the module, and the default is
            ``build()``. Under DeepSpeed ZeRO-3 (:mod:`cqil.recovery.sharded`) it gathers the originals'
            partitioned weights around ``build`` and partitions what it built, one group at a time.

    Returns:
        The same ``model`` object, rewritten.
    """
    check_supported(model)
    if is_parallelized(model):
        raise ValueError("model is already parallelized (config.cqil is set); load the original model again")
    _check_choice("bypass", bypass, BYPASS_MODES)
    _check_choice("gates", gates, GATE_KINDS)
    _check_choice("gate_shape", gate_shape, GATE_SHAPES)
    _check_choice("form", form, FORMS)
    if isinstance(bypass_distance, bool) or not isinstance(bypass_distance, int) or bypass_distance < 1:
        raise ValueError(f"bypass_distance must be a positive integer, got {bypass_distance!r}")

    config = model.config
    layers = list(model.model.layers)
    num_layers = len(layers)
    plan = GroupPlan.parse(plan, num_layers)
    layer_types = list(getattr(config, "layer_types", None) or [])
    for group in plan.groups:
        kinds = {layer_types[i] for i in group} if layer_types else set()
        if len(kinds) > 1:
            raise ValueError(
                f"group {list(group)} mixes attention types {sorted(kinds)}; group layers of one type"
            )

    options = dict(bypass=bypass, bypass_distance=bypass_distance, gates=gates, gate_shape=gate_shape)
    grouped = set(plan.groups)
    new_layers: list[nn.Module] = []
    for layer_idx, indices in enumerate(plan.effective_layers()):
        originals = [layers[i] for i in indices]
        if indices not in grouped:
            set_layer_idx(originals[0], layer_idx)
            new_layers.append(originals[0])
            continue
        attn = originals[0].self_attn
        # Mistral reads its window from the config; Qwen2/3 set it per layer on the attention.
        sliding_window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        kw = dict(options, sliding_window=sliding_window)
        # A single layer has nothing to fuse: run it through its own modules so that it stays bit-exact.
        kind = BranchGroup if form == "branches" or len(indices) == 1 else MergedGroup.from_layers
        build = functools.partial(kind, originals, config, layer_idx, indices, **kw)
        new_layers.append(build() if materialize is None else materialize(originals, build))

    model.model.layers = nn.ModuleList(new_layers)
    config.cqil = {
        "plan": plan.to_dict(),
        "bypass": bypass,
        "bypass_distance": bypass_distance,
        "gates": gates,
        "gate_shape": gate_shape,
        "form": form,
        "num_hidden_layers_original": num_layers,
        "layer_types_original": layer_types or None,
    }
    config.num_hidden_layers = len(new_layers)
    if layer_types:
        config.layer_types = [layer_types[indices[0]] for indices in plan.effective_layers()]
    capture_hidden_states(model.model, [m for m in model.model.layers if isinstance(m, ParallelGroup)])
    return model


def parallel_groups(model: nn.Module) -> list[ParallelGroup]:
    return [layer for layer in model.model.layers if isinstance(layer, ParallelGroup)]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a recovery trains: every layer inside a group and the learned gates, by name."""
    groups = {id(g) for g in parallel_groups(model)}
    if not groups and not is_parallelized(model):
        raise ValueError("model is not parallelized: call cqil.parallelize first")
    out: dict[str, nn.Parameter] = {}
    prefix = layers_prefix(model)
    for idx, layer in enumerate(model.model.layers):
        if id(layer) in groups:
            for name, param in layer.named_parameters():
                out[f"{prefix}.{idx}.{name}"] = param
    return out


def layers_prefix(model: nn.Module) -> str:
    """The dotted name of ``model.model.layers`` inside ``model`` (``model.layers`` for a ``*ForCausalLM``)."""
    layers = model.model.layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("model.model.layers is not a submodule of the model")


@torch.no_grad()
def gate_values(model: nn.Module) -> dict[int, torch.Tensor]:
    """The effective gate matrix G of every group with gates, keyed by effective layer index."""
    return {
        g.layer_idx: g.gate_matrix().detach().cpu() for g in parallel_groups(model) if g.gates is not None
    }


def merged_lp_group(group: ParallelGroup) -> MergedGroup:
    """The merged form of a group that folds (``lp``, gates at 1): itself, or its branches fused.

    Folding into one plain layer (the export's ``fold``, the GGUF writer) reads the merged weights.
    """
    if isinstance(group, MergedGroup):
        return group
    return MergedGroup.from_layers(
        list(group.branches),
        group.config,
        group.layer_idx,
        group.original_indices,
        bypass="lp",
        bypass_distance=group.bypass_distance,
        gates="fixed",
        gate_shape=group.gate_shape,
        sliding_window=group.sliding_window,
    )
