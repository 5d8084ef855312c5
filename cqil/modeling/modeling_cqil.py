"""The exported model (shipped as ``modeling_cqil.py`` in every export).

:class:`CqilForCausalLM` builds the base architecture's own decoder stack from ``config.text_config``
through transformers' auto classes (``AutoModel.from_config``: ``LlamaModel``, ``MistralModel``,
``Qwen2Model`` or ``Qwen3Model``), then rewrites ``model.layers`` from the recorded plan exactly as
``cqil.parallelize`` rewrites a loaded model:

* an ungrouped layer stays the base class's decoder layer, numbered by its effective index;
* a group becomes an empty :class:`MergedGroup` (form ``merged``) or a :class:`BranchGroup` of
  freshly built decoder layers (form ``branches``, and every single-layer group), so the state dict
  keys of an export are those of the in-memory parallelized model, and loading is a plain
  ``from_pretrained`` (on the meta device: no random init for weights that are loaded);
* in a *folded* export (``cqil.folded``, only for ``lp`` bypass with every gate at 1) a group
  becomes one plain decoder layer of the base class with P x heads and P x intermediate size.

Everything else — embeddings, masks, RoPE, the KV cache, the layer loop — is the base model's own
forward, which this file calls and does not copy; the head (final projection and loss) is the few
lines every ``*ForCausalLM`` of the Llama family shares. The group math lives in one place,
``cqil/rewrite/group.py``, shipped next to this file as ``cqil_group.py`` and imported relatively.

This file depends on transformers and torch only, so that it can be loaded as remote code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel

from .configuration_cqil import CqilConfig
from .cqil_compat import cache_kwargs, capture_hidden_states, causal_lm_output, output_cache
from .cqil_group import (
    BranchGroup,
    MergedGroup,
    ParallelGroup,
    bypass_mask,
    effective_layers,
    set_layer_idx,
    take_cache,
)


def wide_layer(decoder_cls: type, config, layer_idx: int, degree: int) -> nn.Module:
    """A plain decoder layer with ``degree`` x heads, key/value heads and intermediate size.

    An ``lp`` group with every gate at 1 is exactly such a layer (see docs/design.md). Widths are fixed
    when the layer is built, from a widened copy of ``config``; afterwards every submodule points at
    the shared ``config`` again, so run-time switches such as the attention implementation apply to
    this layer like to any other.
    """
    wide = copy.deepcopy(config)
    wide.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wide.num_attention_heads = degree * config.num_attention_heads
    wide.num_key_value_heads = degree * config.num_key_value_heads
    wide.intermediate_size = degree * config.intermediate_size
    layer = decoder_cls(wide, layer_idx)
    for module in layer.modules():
        if getattr(module, "config", None) is wide:
            module.config = config
    return layer


def build_layers(layers: nn.ModuleList, config, cqil: dict) -> nn.ModuleList:
    """Rewrite a freshly built stack of effective-depth decoder layers into the recorded plan.

    ``layers`` holds one base decoder layer per effective layer (built from ``config``, which has the
    effective depth and layer types); the entry at a group's position serves as the template that
    tells which biases, q/k norms and sliding window the group's attention has — the same rule
    ``cqil.parallelize`` applies to the group's first original layer.
    """
    plan = cqil["plan"]
    groups = {tuple(g) for g in plan["groups"]}
    options = {key: cqil[key] for key in ("bypass", "bypass_distance", "gates", "gate_shape")}
    effective = effective_layers(plan["groups"], plan["num_layers"])
    if len(effective) != len(layers):
        raise ValueError(
            f"the plan has {len(effective)} effective layers but text_config.num_hidden_layers is {len(layers)}"
        )
    out: list[nn.Module] = []
    for layer_idx, indices in enumerate(effective):
        template = layers[layer_idx]
        if indices not in groups:
            out.append(template)
            continue
        decoder_cls = type(template)
        if cqil.get("folded"):
            out.append(wide_layer(decoder_cls, config, layer_idx, len(indices)))
            continue
        attn, mlp = template.self_attn, template.mlp
        sliding_window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        kw = dict(options, sliding_window=sliding_window)
        weight = attn.q_proj.weight
        if cqil["form"] == "branches" or len(indices) == 1:
            branches = [decoder_cls(config, layer_idx) for _ in indices]
            for branch, original in zip(branches, indices, strict=True):
                set_layer_idx(branch, original)  # as in the in-memory model: branches keep their index
            # from_pretrained builds under a meta default device; the group's small gate masks are
            # computed on the CPU first (it inspects them) and placed with the weights' device.
            with torch.device("cpu"):
                out.append(BranchGroup(branches, config, layer_idx, indices, **kw))
        else:
            bias = {
                "qkv": attn.q_proj.bias is not None,
                "o": attn.o_proj.bias is not None,
                "mlp": mlp.gate_proj.bias is not None,
                "qk_norm": hasattr(attn, "q_norm"),
            }
            with torch.device("cpu"):  # as above; every weight is created on `weight.device`
                group = MergedGroup(
                    config, layer_idx, indices, dtype=weight.dtype, device=weight.device, bias=bias, **kw
                )
            out.append(group)
    return nn.ModuleList(out)


class CqilForCausalLM(PreTrainedModel, GenerationMixin):
    """A Llama-family causal LM whose grouped layers run in parallel (see the module docstring).

    ``model`` is the base architecture's decoder stack (``LlamaModel``, ...) with its layers
    rewritten; ``lm_head`` the output projection (tied to the embeddings when the base config says so).
    """

    config_class = CqilConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BranchGroup", "MergedGroup"]  # the base decoder layer class comes from `model`
    _skip_keys_device_placement = [
        "cache",
        "past_key_values",
    ]  # the keyword before and from transformers 5.24
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # The groups call transformers' attention dispatch like the base layers do.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: CqilConfig):
        super().__init__(config)
        text_config = config.text_config
        self.model = AutoModel.from_config(text_config)
        self.model.layers = build_layers(self.model.layers, text_config, config.cqil)
        capture_hidden_states(self.model, [m for m in self.model.layers if isinstance(m, ParallelGroup)])
        self.vocab_size = text_config.vocab_size
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        # The groups' gate masks are non-persistent buffers (never saved): from_pretrained builds
        # the model on the meta device and re-creates such buffers empty, so set them here.
        for layer in self.model.layers:
            if isinstance(layer, ParallelGroup):
                mask = bypass_mask(layer.bypass, layer.degree, layer.bypass_distance)
                layer.gate_mask.copy_(mask.reshape(layer.gate_mask.shape))
                eye = torch.eye(layer.degree, dtype=layer.gate_eye.dtype)
                layer.gate_eye.copy_(eye.reshape(layer.gate_eye.shape))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        # generate() passes the cache as ``cache=`` from transformers 5.24 on, ``past_key_values=``
        # before; the base model is called with the keyword the installed transformers uses.
        cache = take_cache(kwargs, cache)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return causal_lm_output(
            loss=loss,
            logits=logits,
            cache=output_cache(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["CqilForCausalLM"]
