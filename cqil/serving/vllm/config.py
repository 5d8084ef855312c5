"""The export's config as vLLM reads it, the plan, and which vLLM layer each group becomes.

Imports torch and transformers only (vLLM's own dependencies), so the plugin registers its config
before vLLM builds anything.
"""

from __future__ import annotations

import copy

import torch
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig  # vLLM's own dependency

ARCHITECTURE = "CqilForCausalLM"
MODEL_TYPE = "cqil"
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def register_config() -> None:
    """Make ``AutoConfig`` parse ``model_type: cqil`` with :class:`CqilVllmConfig` (no remote code)."""
    AutoConfig.register(MODEL_TYPE, CqilVllmConfig, exist_ok=True)


class CqilVllmConfig(PretrainedConfig):
    """The config of an export as vLLM reads it (the export's own ``CqilConfig`` needs a newer
    transformers than vLLM pins): ``text_config`` (the base architecture's config at the effective
    depth, which vLLM reads through ``get_text_config()``) and ``cqil`` (the plan and group options).
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    cqil: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            text.setdefault("model_type", "llama")
            self.text_config = CONFIG_MAPPING[text["model_type"]](**text)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["llama"]()
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        super().__post_init__(**kwargs)


def effective_layers(groups, num_layers: int) -> list[tuple[int, ...]]:
    """The original layer indices each effective layer runs (as cqil.rewrite.group.effective_layers)."""
    by_start = {g[0]: tuple(g) for g in groups}
    out, i = [], 0
    while i < num_layers:
        indices = by_start.get(i, (i,))
        out.append(indices)
        i += len(indices)
    return out


def bypass_mask(bypass: str, degree: int, distance: int = 1) -> torch.Tensor:
    """Which G[j,k] a bypass mode connects (as cqil.rewrite.group.bypass_mask)."""
    j = torch.arange(degree)[:, None]
    k = torch.arange(degree)[None, :]
    if bypass == "lp":
        return j != k
    if bypass == "cqil":
        return (k < j) & (j - k <= distance)
    if bypass == "none":
        return torch.zeros(degree, degree, dtype=torch.bool)
    raise ValueError(f"unknown bypass mode {bypass!r} (expected lp, none or cqil)")


def attention_biases(config) -> dict[str, bool]:
    """Which biases and head norms a base architecture's layers have (as transformers builds them)."""
    model_type = config.model_type
    if model_type == "qwen2":
        return {"qkv": True, "o": False, "mlp": False, "qk_norm": False}
    if model_type == "qwen3":
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv": bias, "o": bias, "mlp": False, "qk_norm": True}
    if model_type == "mistral":
        return {"qkv": False, "o": False, "mlp": False, "qk_norm": False}
    bias = bool(getattr(config, "attention_bias", False))
    return {"qkv": bias, "o": bias, "mlp": bool(getattr(config, "mlp_bias", False)), "qk_norm": False}


def is_wide_layer(config, cqil: dict) -> bool:
    """Whether a group of this export is exactly one plain decoder layer of the base architecture.

    A folded export says so itself. Otherwise ``lp`` with fixed gates (every MLP reads x + sum_j a_j)
    is, except for Qwen3, whose branches keep their own q/k head norms in the merged and branches
    forms (one decoder layer has one pair; the folded export was checked to have equal ones), and
    Qwen3 with attention biases, whose o_proj bias vLLM's Qwen3 layer does not have.
    """
    if config.model_type == "qwen3" and getattr(config, "attention_bias", False):
        return False
    if cqil.get("folded"):
        return True
    return cqil["bypass"] == "lp" and cqil["gates"] == "fixed" and config.model_type != "qwen3"


def wide_layer_config(config, degree: int):
    """A copy of the base config for one decoder layer with ``degree`` times the heads and width.

    head_dim is set explicitly (a wide layer's hidden_size / heads is no longer it). Qwen2 becomes a
    Llama layer with q/k/v biases (``qkv_bias``): vLLM's Qwen2 attention derives head_dim from
    hidden_size / heads, and a Qwen2 layer is a Llama layer with those biases.
    """
    wide = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    wide.head_dim = head_dim
    wide.num_attention_heads = degree * config.num_attention_heads
    wide.num_key_value_heads = degree * config.num_key_value_heads
    wide.intermediate_size = degree * config.intermediate_size
    if config.model_type == "qwen2":
        wide.attention_bias = False
        wide.qkv_bias = True
    return wide
