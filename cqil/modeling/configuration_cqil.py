"""Configuration of an exported cqil model (shipped as ``configuration_cqil.py`` in every export).

An export's ``config.json`` looks like this (abridged)::

    {
      "model_type": "cqil",
      "architectures": ["CqilForCausalLM"],
      "auto_map": {"AutoConfig": "configuration_cqil.CqilConfig",
                   "AutoModelForCausalLM": "modeling_cqil.CqilForCausalLM"},
      "cqil": {"plan": {"groups": [[3, 4], [5, 6]], "num_layers": 8}, "bypass": "lp", ...},
      "text_config": {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 48, ...},
      "tie_word_embeddings": true
    }

``text_config`` is the base architecture's own config (``model_type`` llama, mistral, qwen2 or
qwen3) *at the effective depth*: ``num_hidden_layers`` and ``layer_types`` count one entry per
layer that runs — exactly what ``cqil.parallelize`` leaves in ``model.config`` of the in-memory
model. The original depth and layer types are in ``cqil`` (``num_hidden_layers_original``,
``layer_types_original``), next to the plan, the bypass mode and the gate options, as
``cqil.parallelize`` recorded them, plus ``folded`` for an export whose groups are plain wide
decoder layers. Keeping the effective config under the name ``text_config`` lets transformers'
generic code (``get_text_config()``: the KV cache, masks, generation, embedding resizing) see the
network that actually runs, with no cqil-specific code.

This file depends on transformers only, so that it can be loaded as remote code.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class CqilConfig(PreTrainedConfig):
    r"""The config of a :class:`CqilForCausalLM`: the base architecture's config plus the cqil rewrite.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The base architecture's config at the effective depth (see the module docstring).
        cqil (`dict`):
            The rewrite, as recorded by ``cqil.parallelize``: ``plan`` (``groups``, ``num_layers``),
            ``bypass``, ``bypass_distance``, ``gates``, ``gate_shape``, ``form``,
            ``num_hidden_layers_original``, ``layer_types_original``; and ``folded`` (bool), set by a
            folded export.
        tie_word_embeddings (`bool`):
            Mirrors ``text_config.tie_word_embeddings`` (transformers reads it on the top-level config).
    """

    model_type = "cqil"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    cqil: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The text config is the single source of truth; the top-level copy is what tying reads.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["CqilConfig"]
