"""Tiny models of every supported architecture, built locally from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention everywhere
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _llama():
    # Explicit head_dim (not hidden/heads), all biases, llama3 RoPE scaling, tied embeddings.
    cfg = LlamaConfig(
        **COMMON,
        head_dim=16,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    return LlamaForCausalLM(cfg)


def _mistral():
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=64))


def _qwen2():
    # q/k/v biases; the last layers use sliding-window attention.
    cfg = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=64, max_window_layers=4)
    return Qwen2ForCausalLM(cfg)


def _qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))  # q/k norms


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}
ARCHS = list(BUILDERS)


def make_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random model whose weights (norms included) are far from their init values."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # non-trivial norm weights test the folding
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.config._attn_implementation = attn_implementation
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12))
