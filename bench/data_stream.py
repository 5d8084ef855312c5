"""The training data pipeline (:class:`cqil.recovery.stream.TokenStream`): throughput and resume time.

Generates a local RedPajama-shaped corpus of ``--size-gb`` GB (plain JSONL on disk, ``--shards``
files, one source label per file as in RedPajama-1T's per-source layout, seven labels: the
shipped sample's documents cycled, each prefixed with its record id so no two are equal), then
prints one JSON line per measurement and deletes the corpus:

* ``throughput``: packed tokens per second of one rank's stream (read, filter, mix, tokenize,
  pack) for the default recipe (``recipes/smollm2_135m.yaml``: the three of its six sources that carry
  a RedPajama label, at its weights for them, ``seq_len`` 128) and for ``recipes/llama7b.yaml`` (its
  mixture, ``seq_len`` 2048), against what one trainer rank consumes:

  - default recipe on this CPU: 2 x 128 = 256 tokens per step, assuming 0.8 s per step (an upper bound
    on its consumption: its 120 steps train in about 110 s on both cores, 0.9 s a step);
  - llama7b on 8 H100s: 2 x 8 x 2048 = 32,768 tokens per rank and step, assuming 3 s per step (ZeRO-2,
    bf16; a 7B distillation step of 262k tokens at about 40 % MFU), i.e. about 10,900 tokens/s per rank.
    The stream is measured here on this CPU with the SmolLM2 tokenizer (Llama-2's needs the Hub);
    ``ratio`` must be at least 10.

* ``resume``: the time to build a stream and restore a position saved at 10 % and at 90 % of the corpus
  (no mixture, one rank, so the position is a share of the files) up to its first block, beside the
  time it took to read up to that position (what resuming by replaying the documents would cost).

    python bench/data_stream.py              # 1 GB, a few minutes on 2 cores
    python bench/data_stream.py --size-gb 0.1
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path

from _common import Stopwatch, emit

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaWikipedia",
    "RedPajamaArXiv",
    "RedPajamaStackExchange",
]
RECIPES = {  # recipe: (mixture, seq_len, tokens a rank consumes per step, assumed seconds per step)
    "smollm2_135m (this CPU)": (
        {"RedPajamaWikipedia": 0.228, "RedPajamaBook": 0.152, "RedPajamaGithub": 0.152},
        128,
        2 * 128,
        0.8,
    ),
    "llama7b (8 x H100, per rank)": (
        {"RedPajamaCommonCrawl": 0.67, "RedPajamaC4": 0.15, "RedPajamaGithub": 0.045, "RedPajamaBook": 0.045,
         "RedPajamaWikipedia": 0.045, "RedPajamaArXiv": 0.025, "RedPajamaStackExchange": 0.02},
        2048,
        2 * 8 * 2048,
        3.0,
    ),
}  # fmt: skip


def generate(folder: Path, size_gb: float, shards: int) -> tuple[list[Path], int]:
    """Write the corpus; return its files and document count."""
    with gzip.open(ROOT / "data/sample/train.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.dumps(json.loads(line)["text"])[1:-1] for line in f]
    per_shard = int(size_gb * 1e9 / shards)
    files, n = [], 0
    for s in range(shards):
        source = SOURCES[s % len(SOURCES)]
        path = folder / f"{source}-{s:04d}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            written = 0
            while written < per_shard:
                line = f'{{"text": "{n} {texts[n % len(texts)]}", "meta": {{"redpajama_set_name": "{source}", "id": {n}}}}}\n'
                out.write(line)
                written += len(line)
                n += 1
        files.append(path)
    return files, n


def tokenizer():
    from transformers import AutoTokenizer

    from cqil.pretrained import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def throughput(tok, files, mixture, seq_len, seconds) -> float:
    from cqil.recovery.stream import TokenStream

    stream = TokenStream(tok, files, seq_len=seq_len, mixture=mixture, seed=0)
    stream.next_batch(2)  # warm up: open the files, first tokenizer calls
    blocks, clock = 0, Stopwatch()
    while clock.total() < seconds:
        stream.next_batch(4)
        blocks += 4
    return blocks * seq_len / clock.total()


def resume(tok, files, documents: int, share: float) -> dict:
    from cqil.recovery.stream import TokenStream

    stream = TokenStream(tok, files, seq_len=128)
    clock = Stopwatch()
    for _ in range(int(documents * share)):
        stream._next_document()  # reach the position without tokenizing: how it was reached does not matter
    reached = clock.lap()
    stream.next_batch(1)
    state = stream.state_dict()
    expected = stream.next_batch(1)
    clock.lap()
    resumed = TokenStream(tok, files, seq_len=128)
    resumed.load_state_dict(state)
    first = resumed.next_batch(1)
    took = clock.lap()
    assert (first == expected).all()
    inner = state["dataset"]
    while "shard_idx" not in inner:  # repeat -> shard -> generator
        inner = inner["examples_iterable"]
    return {
        "measure": "resume",
        "position": f"{share:.0%}",
        "documents_before": int(documents * share),
        "shard": inner["shard_idx"],
        "offset_in_shard": inner["shard_example_idx"],
        "resume_s": round(took, 3),
        "read_to_position_s": round(reached, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each throughput measurement")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the corpus (a temp dir)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cqil-data-bench-", dir=args.dir))
    try:
        clock = Stopwatch()
        files, documents = generate(folder, args.size_gb, args.shards)
        size = sum(f.stat().st_size for f in files)
        emit({"measure": "corpus", "bytes": size, "files": len(files), "documents": documents,
              "generate_s": round(clock.total(), 1)})  # fmt: skip
        tok = tokenizer()
        for name, (mixture, seq_len, per_step, step_s) in RECIPES.items():
            rate = throughput(tok, files, mixture, seq_len, args.seconds)
            need = per_step / step_s
            emit({"measure": "throughput", "recipe": name, "seq_len": seq_len,
                  "pipeline_tokens_per_s": round(rate), "trainer_tokens_per_s": round(need),
                  "assumed_step_s": step_s, "ratio": round(rate / need, 1), "ok": rate >= 10 * need})  # fmt: skip
        for share in (0.1, 0.9):
            emit(resume(tok, files, documents, share))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
