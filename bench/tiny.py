"""The tiny random model every benchmark offers as ``--model tiny``: seconds, for CI smoke runs."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_tiny() -> LlamaForCausalLM:
    """A random 8-layer Llama with grouped-query attention, small enough for CI."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()
