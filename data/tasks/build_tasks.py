"""Build the small local lm-eval-harness tasks in this folder from the shipped held-out text.

Three zero-shot tasks, each a JSONL file next to its task YAML, all drawn from
``data/sample/heldout.jsonl.gz`` (never from the training split):

* ``cqil_next_sentence`` (multiple choice, 4 options): one to three sentences of a Wikipedia lead or
  Bible passage; the options are the true next sentence and three sentences of other documents of the
  same source. Up to ``PER_DOCUMENT`` examples per document, at different places. Metrics ``acc`` and
  ``acc_norm``.
* ``cqil_last_word`` (LAMBADA-style): a passage of up to four sentences whose last word is to be
  predicted; up to ``PER_DOCUMENT`` passages per document, one after the other. Metric ``acc`` (the
  word is the greedy continuation) and ``perplexity`` of the word.
* ``cqil_next_line`` (multiple choice, 4 options): a few lines of Python from the standard library;
  the options are the true next non-blank line and three lines of other files.

``LIMIT`` examples per task: the held-out split has 429 documents of three sentences or more, so one
example per document would give fewer, and at 500 a task's accuracy has a standard error of about
2 points (at most 2.2), small enough to tell apart models whose accuracies differ by 5 points or more.
Deterministic: documents in file order, a fixed seed. Rebuild from the repository root with
``python data/tasks/build_tasks.py``.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT = HERE.parent / "sample" / "heldout.jsonl.gz"
LIMIT = 500
PER_DOCUMENT = 2
SEED = 0
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_VERSE = re.compile(r"^\d+:\d+ ")


def _records() -> list[tuple[str, str]]:
    with gzip.open(HELDOUT, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(r["text"], r["meta"]["redpajama_set_name"]) for r in rows]


def _sentences(text: str, source: str) -> list[str]:
    if source == "RedPajamaBook":  # verses, without their chapter:verse numbers
        lines = [_VERSE.sub("", ln).strip() for ln in text.splitlines()[2:]]
        text = " ".join(ln for ln in lines if ln)
    return [s.strip() for s in _SENTENCE.split(text) if 20 <= len(s.strip()) <= 300]


def next_sentence(records, rng: random.Random) -> list[dict]:
    pools: dict[str, list[list[str]]] = {}
    for text, source in records:
        if source in ("RedPajamaWikipedia", "RedPajamaBook"):
            sentences = _sentences(text, source)
            if len(sentences) >= 3:
                pools.setdefault(source, []).append(sentences)
    docs = [(source, d, s) for source, pool in pools.items() for d, s in enumerate(pool)]
    rng.shuffle(docs)
    out = []
    for source, d, sentences in docs:
        # The answer is sentence ``cut``, after up to three sentences of context.
        for cut in sorted(rng.sample(range(1, len(sentences)), min(PER_DOCUMENT, len(sentences) - 1))):
            context, answer = " ".join(sentences[max(0, cut - 3) : cut]), sentences[cut]
            others = [i for i in range(len(pools[source])) if i != d]
            distractors = [rng.choice(pools[source][i]) for i in rng.sample(others, 3)]
            choices = [answer, *distractors]
            rng.shuffle(choices)
            out.append(
                {"context": context, "choices": choices, "label": choices.index(answer), "source": source}
            )
    rng.shuffle(out)
    return out[:LIMIT]


def last_word(records, rng: random.Random) -> list[dict]:
    out = []
    for text, source in records:
        if source not in ("RedPajamaWikipedia", "RedPajamaBook"):
            continue
        all_sentences = _sentences(text, source)
        for part in range(PER_DOCUMENT):
            sentences = all_sentences[4 * part : 4 * part + 4]
            passage = " ".join(sentences)
            words = passage.rstrip(".!?\"'").split(" ")
            if len(sentences) < 2 or len(words) < 25 or not words[-1].isalpha():
                continue
            out.append({"context": " ".join(words[:-1]), "target": " " + words[-1], "source": source})
    rng.shuffle(out)
    return out[:LIMIT]


def next_line(records, rng: random.Random) -> list[dict]:
    files = [
        [ln for ln in text.splitlines() if ln.strip() and 8 <= len(ln.strip()) <= 120]
        for text, source in records
        if source == "RedPajamaGithub"
    ]
    files = [f for f in files if len(f) > 20]
    out = []
    per_file = -(-2 * LIMIT // len(files))  # twice the share: some files are shorter than theirs
    for f, lines in enumerate(files):
        for start in sorted(rng.sample(range(len(lines) - 6), min(per_file, len(lines) - 6))):
            context, answer = "\n".join(lines[start : start + 5]), lines[start + 5]
            distractors = []
            while len(distractors) < 3:
                other = rng.choice([i for i in range(len(files)) if i != f])
                line = rng.choice(files[other])
                if line.strip() != answer.strip() and line not in distractors:
                    distractors.append(line)
            choices = [answer, *distractors]
            rng.shuffle(choices)
            out.append({"context": context, "choices": choices, "label": choices.index(answer)})
    rng.shuffle(out)
    return out[:LIMIT]


def main() -> None:
    records = _records()
    for name, build in (
        ("cqil_next_sentence", next_sentence),
        ("cqil_last_word", last_word),
        ("cqil_next_line", next_line),
    ):
        rows = build(records, random.Random(SEED))
        path = HERE / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
