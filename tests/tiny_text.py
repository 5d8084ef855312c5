"""A tiny word-level tokenizer and RedPajama-shaped JSONL corpus, built locally (nothing is downloaded).

The vocabulary fits the conftest models' ``VOCAB`` so that ``make_model`` can read its ids.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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
