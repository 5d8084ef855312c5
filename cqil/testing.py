"""Tiny models, a tiny tokenizer and corpus for the tests and the benchmarks' ``--model tiny``.

Everything is built locally from configs (nothing is downloaded): :func:`make_model` gives a tiny
random model of every supported architecture (:data:`ARCHS`), whose weights are far from their init
values; :func:`make_tokenizer` a word-level tokenizer whose vocabulary fits :data:`VOCAB`;
:func:`write_corpus` and :func:`write_task` RedPajama-shaped JSONL text and a tiny lm-eval task;
:func:`build_tiny` the benchmarks' random 8-layer Llama.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
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


@torch.no_grad()
def randomize_weights(model) -> None:
    """Weights (norms included) far from their init values, from torch's current random state."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))  # non-trivial norm weights test the folding
        elif p.dim() == 1:
            p.copy_(0.05 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.08)


def make_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random model whose weights (norms included) are far from their init values."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    randomize_weights(model)
    model.config._attn_implementation = attn_implementation
    return model.eval()


SENTENCES = [
    "in the beginning god created the heaven and the earth",
    "and the earth was without form and void and darkness was upon the face of the deep",
    "freedom of speech is a principle that supports the freedom of an individual",
    "def main ( ) : return sum ( range ( 10 ) )",
    "the river flows to the sea and the sea is wide and deep",
    "import os , sys ; print ( os . getcwd ( ) )",
]
SOURCES = [
    "RedPajamaBook",
    "RedPajamaBook",
    "RedPajamaWikipedia",
    "RedPajamaGithub",
    "RedPajamaWikipedia",
    "RedPajamaGithub",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def write_corpus(path: Path, repeats: int = 20) -> Path:
    """Write ``repeats`` passes over the sentences as gzipped RedPajama records."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for _ in range(repeats):
            for text, source in zip(SENTENCES, SOURCES, strict=True):
                f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": source}}) + "\n")
    return path


def write_task(folder: Path, name: str = "tiny_choice") -> list[dict]:
    """An lm-eval multiple-choice task over the sentences (``dataset_path: json``, local file); returns its docs.

    Each document is the first half of a sentence, to be completed by its own second half among
    the second halves of three sentences.
    """
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i, sentence in enumerate(SENTENCES):
        words = sentence.split()
        cut = len(words) // 2
        others = [SENTENCES[(i + k) % len(SENTENCES)].split() for k in (1, 2)]
        choices = [" ".join(words[cut:])] + [" ".join(o[len(o) // 2 :]) for o in others]
        label = i % 3
        choices[0], choices[label] = choices[label], choices[0]
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return docs


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
