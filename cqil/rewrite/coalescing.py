"""Depth coalescing, de-coalescing and interpolation: the multi-level training operators.

Zou et al. (ICLR 2024, "A Multi-Level Framework for Accelerating Training Transformer
Models") move a transformer between depths with three operators on its weights. Here they
work on the Llama family as transformers implements it (Llama, Mistral, Qwen2, Qwen3) and
take the same group plans as :func:`cqil.parallelize`:

``coalesce(model, plan)``
    A new, shallower model of the same class with one decoder layer per group: every
    parameter of the merged layer (q/k/v/o and MLP weights, biases, input and post-attention
    norms, Qwen3 q/k norms) is the plain mean of that parameter over the group's layers.
    Layers in no group are copied unchanged, and so are the embeddings, final norm and LM head.
``decoalesce(small, plan, like=model)``
    Back to the original depth: every original layer of a group gets a copy of its merged
    layer; everything outside the layers is copied from ``small`` as well. ``like`` (a model
    of the original depth) supplies the class, config, dtype and device.
``interpolate(model, expanded, alpha)``
    The blend ``(1 - alpha) * W_model + alpha * W_expanded`` of every parameter and persistent
    buffer of two models of the same architecture and shape.

Only depth changes: the hidden size, head counts and MLP width stay as they are. The paper's
width operators (averaging neighbouring neurons and heads) are not implemented. Each operator
returns a new model and leaves its inputs untouched; the results are plain transformers
models that save and load with ``AutoModelForCausalLM`` and generate with a KV cache.

When to use which. A coalesced model is a *standard* shallower model: it runs with any
transformers-compatible runtime and every byte of it (embeddings aside) is trained as usual,
but averaging two layers throws away what distinguished them, so before training it is
usually much worse than running the same layers as a parallel group (:func:`cqil.parallelize`),
which keeps every original weight and only changes what each layer reads. Pick coalescing to
*train* faster in a multi-level V-cycle (coalesce, train small, de-coalesce, interpolate with
the deep model, continue), or when the target runtime can only run standard checkpoints; pick
parallel groups to *serve* a shallower model with the least damage before recovery. The
README section "Coalescing or parallel groups?" has the numbers measured on SmolLM2-135M.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import check_supported, is_parallelized

# The config attribute that records how a coalesced model was made (plain JSON: it survives
# save_pretrained / from_pretrained with plain transformers, which keeps unknown config keys).
COALESCED_KEY = "cqil_coalesced"


def coalesce(model: nn.Module, plan: str | Sequence[Sequence[int]] | GroupPlan) -> nn.Module:
    """A new model with one decoder layer per group of ``plan``, its parameters the group's mean.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (not parallelized). It is not modified.
        plan: a :class:`GroupPlan`, a ``"S-E:P"`` spec, or a list of layer-index lists.

    Returns:
        A model of the same class, dtype and device with ``plan.num_layers_after`` layers;
        its config has the new ``num_hidden_layers``, a shortened ``layer_types`` (when the
        config has one) and ``cqil_coalesced = {"plan": ..., "num_hidden_layers_original": L}``.

    Raises:
        ValueError: an unsupported or parallelized model, a bad plan, or a group whose layers
            have different attention types (``layer_types``).
    """
    _check_model(model, "model")
    layers = list(model.model.layers)
    plan = GroupPlan.parse(plan, len(layers))
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    for group in plan.groups:
        kinds = sorted({layer_types[i] for i in group}) if layer_types else []
        if len(kinds) > 1:
            raise ValueError(f"group {list(group)} mixes layer types {kinds}; coalesce layers of one type")

    # Copy everything but the decoder layers (seeding deepcopy's memo with the layer list stops
    # it from copying the deep stack only to throw it away). The same memo then maps each
    # layer's references to the model's config onto the new config.
    memo: dict = {id(model.model.layers): nn.ModuleList()}
    new = copy.deepcopy(model, memo)
    effective = plan.effective_layers()
    with torch.no_grad():
        for layer_idx, group in enumerate(effective):
            merged = copy.deepcopy(layers[group[0]], memo)
            if len(group) > 1:
                _average_into(merged, [layers[i] for i in group], group)
            _set_layer_idx(merged, layer_idx)
            new.model.layers.append(merged)

    config = new.config
    config.num_hidden_layers = len(effective)
    if layer_types:
        config.layer_types = [layer_types[group[0]] for group in effective]
    setattr(config, COALESCED_KEY, {"plan": plan.to_dict(), "num_hidden_layers_original": len(layers)})
    return new


def decoalesce(
    small: nn.Module, plan: str | Sequence[Sequence[int]] | GroupPlan, *, like: nn.Module
) -> nn.Module:
    """A model of ``like``'s depth in which every layer of a group is a copy of its merged layer.

    Args:
        small: a coalesced model with ``plan.num_layers_after`` layers (e.g. from :func:`coalesce`,
            possibly trained since). It is not modified.
        plan: the plan ``small`` was coalesced with, over ``like``'s layers.
        like: a model of the original depth (typically the deep model itself) whose class,
            config, dtype and device the result takes. Only its structure is used: every
            parameter and persistent buffer of the result comes from ``small``.

    Raises:
        ValueError: unsupported or mismatched models, ``small``'s depth is not
            ``plan.num_layers_after``, ``small`` records a different plan, a parameter's shape
            differs, or a group's layers in ``like`` differ in type from their merged layer.
    """
    _check_model(small, "small")
    _check_model(like, "like")
    if type(small) is not type(like):
        raise ValueError(f"small is a {type(small).__name__} but like is a {type(like).__name__}")
    _check_same_tying(small, like, ("small", "like"))
    deep_layers = list(like.model.layers)
    plan = GroupPlan.parse(plan, len(deep_layers))
    small_layers = list(small.model.layers)
    if len(small_layers) != plan.num_layers_after:
        raise ValueError(
            f"small has {len(small_layers)} layers but the plan {plan} over {plan.num_layers} layers "
            f"coalesces to {plan.num_layers_after}"
        )
    recorded = getattr(small.config, COALESCED_KEY, None)
    if isinstance(recorded, dict) and recorded.get("plan") not in (None, plan.to_dict()):
        recorded_plan = GroupPlan.from_dict(recorded["plan"])
        raise ValueError(f"small was coalesced with plan {recorded_plan} but decoalesce got plan {plan}")
    small_types = list(getattr(small.config, "layer_types", None) or [])
    deep_types = list(getattr(like.config, "layer_types", None) or [])

    new = copy.deepcopy(like)
    target = new.state_dict()
    with torch.no_grad():
        # Embeddings, final norm, LM head: from small (tied weights are written twice, alike).
        for name, value in _outside_layers(small.state_dict()).items():
            if name not in target:
                raise ValueError(f"parameter {name!r} of small has no counterpart in like")
            _copy_checked(target[name], value, name)
        for k, group in enumerate(plan.effective_layers()):
            source = small_layers[k].state_dict()
            for i in group:
                if small_types and deep_types and small_types[k] != deep_types[i]:
                    raise ValueError(
                        f"layer {i} of like is {deep_types[i]!r} but small's layer {k} "
                        f"(group {list(group)}) is {small_types[k]!r}"
                    )
                dest = new.model.layers[i].state_dict()
                if dest.keys() != source.keys():
                    missing = sorted(dest.keys() ^ source.keys())
                    raise ValueError(f"layer {i} of like and layer {k} of small differ in {missing}")
                for name, value in source.items():
                    _copy_checked(dest[name], value, f"model.layers.{i}.{name}")
    if hasattr(new.config, COALESCED_KEY):
        delattr(new.config, COALESCED_KEY)
    return new


def interpolate(model: nn.Module, expanded: nn.Module, alpha: float) -> nn.Module:
    """A new model whose parameters and persistent buffers are ``(1 - alpha) * model + alpha * expanded``.

    ``alpha = 0`` returns an exact copy of ``model``'s values and ``alpha = 1`` of ``expanded``'s;
    in between each floating tensor is ``(1 - alpha) * a + alpha * b`` computed in (at least)
    float32 and stored in ``model``'s dtype. Integer buffers must be equal in both models.
    The result has ``model``'s class, config, dtype and device; neither input is modified.

    Raises:
        ValueError: ``alpha`` outside [0, 1], unsupported or parallelized models, different
            classes or depths, or a parameter whose name or shape differs (named).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    _check_model(model, "model")
    _check_model(expanded, "expanded")
    if type(model) is not type(expanded):
        raise ValueError(f"model is a {type(model).__name__} but expanded is a {type(expanded).__name__}")
    _check_same_tying(model, expanded, ("model", "expanded"))
    depth, expanded_depth = len(model.model.layers), len(expanded.model.layers)
    if depth != expanded_depth:
        raise ValueError(
            f"model has {depth} layers but expanded has {expanded_depth}; de-coalesce the smaller one first"
        )
    a_state, b_state = model.state_dict(), expanded.state_dict()
    for name in sorted(a_state.keys() ^ b_state.keys()):
        owner = "model" if name in a_state else "expanded"
        raise ValueError(f"parameter {name!r} exists only in {owner}")
    for name, a in a_state.items():
        b = b_state[name]
        if a.shape != b.shape:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(a.shape)} in model but {tuple(b.shape)} in expanded"
            )
        if not a.is_floating_point() and not torch.equal(a, b.to(a.device)):
            raise ValueError(f"integer buffer {name!r} differs between model and expanded")

    new = copy.deepcopy(model)
    if alpha == 0.0:
        return new
    out_state = new.state_dict()
    with torch.no_grad():
        for name, a in a_state.items():
            if not a.is_floating_point():
                continue
            b = b_state[name].to(a.device)
            if alpha == 1.0:
                out_state[name].copy_(b)
                continue
            compute = torch.promote_types(a.dtype, torch.float32)
            out_state[name].copy_((1 - alpha) * a.to(compute) + alpha * b.to(compute))
    return new


# --------------------------------------------------------------------------- helpers
def _check_model(model: nn.Module, what: str) -> None:
    check_supported(model)
    if is_parallelized(model):
        raise ValueError(
            f"{what} is parallelized (config.cqil is set); the operators need plain decoder layers"
        )


def _average_into(merged: nn.Module, sources: list[nn.Module], group: tuple[int, ...]) -> None:
    """Set every parameter and persistent buffer of ``merged`` to the mean over ``sources``."""
    target = merged.state_dict()
    states = [layer.state_dict() for layer in sources]
    for name, out in target.items():
        values = [state[name] for state in states]
        if any(v.shape != out.shape for v in values):
            shapes = [tuple(v.shape) for v in values]
            raise ValueError(f"group {list(group)}: {name!r} has different shapes {shapes} in its layers")
        if all(torch.equal(values[0], v) for v in values[1:]):
            out.copy_(values[0])  # exact, whatever the group size: de-coalesced layers come back unchanged
        elif not out.is_floating_point():
            raise ValueError(f"group {list(group)}: integer buffer {name!r} differs between its layers")
        else:
            compute = torch.promote_types(out.dtype, torch.float32)  # average half precision in float32
            out.copy_(torch.stack([v.to(compute) for v in values]).mean(dim=0))


def _set_layer_idx(layer: nn.Module, layer_idx: int) -> None:
    # Attention modules index the KV cache by layer; in the new stack the layer sits at layer_idx.
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = layer_idx


def _check_same_tying(a: nn.Module, b: nn.Module, names: tuple[str, str]) -> None:
    # With tied embeddings one tensor has two names; a tied and an untied model cannot be mixed.
    tied = [bool(getattr(m.config, "tie_word_embeddings", False)) for m in (a, b)]
    if tied[0] != tied[1]:
        raise ValueError(
            f"{names[0]} has tie_word_embeddings={tied[0]} but {names[1]} has tie_word_embeddings={tied[1]}"
        )


def _outside_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if not name.startswith("model.layers.")}


def _copy_checked(dest: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if dest.shape != value.shape:
        raise ValueError(
            f"parameter {name!r} has shape {tuple(value.shape)} in small but {tuple(dest.shape)} in like"
        )
    dest.copy_(value)


def coalesced_layer(layers: Sequence[nn.Module], group: Sequence[int], config=None) -> nn.Module:
    """One new decoder layer whose parameters are the mean over ``layers[i] for i in group``.

    The layer :func:`coalesce` puts in place of ``group``, built alone: only that layer's weights
    are copied (``config``, the model's config, is shared rather than copied) and ``layers`` are
    left untouched. Lets a caller measure a coalesced group in place of the original layers.
    """
    group = tuple(group)
    first = layers[group[0]]
    memo = {id(config): config} if config is not None else {}
    merged = copy.deepcopy(first, memo)
    if len(group) > 1:
        with torch.no_grad():
            _average_into(merged, [layers[i] for i in group], group)
    return merged
