"""LoRA for a recovery: inject peft adapters on the groups' (or every layer's) linear layers, merge them back."""

from __future__ import annotations

from torch import nn

from cqil.rewrite.surgery import parallel_groups


def apply_lora(model: nn.Module, lora, *, target: str, layers=None) -> list[str]:
    """Inject LoRA adapters (peft) on the linear layers of the groups (``target="groups"``) or of
    every decoder layer (``"all"``); returns the adapted module names. ``layers`` names the groups'
    effective indices (needed for a coalesced model); by default, the parallel groups of ``model``."""
    from peft import LoraConfig, inject_adapter_in_model

    prefix = "model.layers."
    if layers is None:
        groups = {id(g) for g in parallel_groups(model)}
        layers = [e for e, layer in enumerate(model.model.layers) if id(layer) in groups]
    layers = set(layers)
    names = []
    for e, layer in enumerate(model.model.layers):
        if target == "groups" and e not in layers:
            continue
        names += [f"{prefix}{e}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=names)
    inject_adapter_in_model(config, model)
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold injected LoRA adapters into their base linear layers and put the plain layers back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
