"""Held-out perplexity of depth coalescing against parallel groups, before any training.

For each plan (groups of consecutive layers), measures on the same packed held-out tokens:
  original   the unmodified model;
  coalesced  cqil.coalesce: one layer per group, its weights the mean of the group's layers;
  lp         cqil.parallelize(..., bypass="lp", form="merged"): the group's layers read one
             input and every MLP sees all attention outputs (Layer Parallelism);
  none       cqil.parallelize(..., bypass="none", form="merged"): independent branches.
All three shorten the model to the same depth, plan.num_layers_after. Each variant is a fresh
copy of the original, measured and freed before the next one is made.

Default plans for SmolLM2-135M (30 layers), fixed so that runs compare: 2 and 4 pairs from
layer 20 ("20-24:2", "20-28:2"), 6 pairs ending at layer 28 ("16-28:2") and 6 pairs in the
middle ("10-22:2"). Runtime: 13 perplexity passes over 32 x 256 tokens, about 530 CPU-seconds
(4-5 minutes on 2 idle cores, longer on a shared machine); seconds with --model tiny (random
weights and tokens, a smoke test).

    python bench/coalesce_vs_parallel.py
    python bench/coalesce_vs_parallel.py --plans 20-24:2 10-22:2 --num-sequences 16
    python bench/coalesce_vs_parallel.py --model tiny

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import Stopwatch, emit, table
from tiny import build_tiny  # bench/tiny.py, beside this script

import cqil
from cqil.evaluation.metrics import perplexity
from cqil.pretrained import load_model
from cqil.recovery.data import calibration_tokens
from cqil.rewrite.coalescing import coalesce

DEFAULT_PLANS = {
    "smollm2-135m": ["20-24:2", "20-28:2", "16-28:2", "10-22:2"],
    "tiny": ["2-4:2", "2-6:2"],
}
DEFAULT_DATA = "data/sample/heldout.jsonl.gz"
VARIANTS = ("coalesced", "lp", "none")


def groups_label(plan: cqil.GroupPlan) -> str:
    """'4x2' for four groups of two layers; the bare count when sizes differ."""
    sizes = {len(g) for g in plan.groups}
    return f"{len(plan.groups)}x{sizes.pop()}" if len(sizes) == 1 else str(len(plan.groups))


def make_variant(original, plan: cqil.GroupPlan, variant: str):
    if variant == "coalesced":
        return coalesce(original, plan)
    return cqil.parallelize(copy.deepcopy(original), plan, bypass=variant, form="merged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    parser.add_argument("--data", default=DEFAULT_DATA, help="held-out JSONL(.gz) file, folder or glob")
    parser.add_argument("--plans", nargs="+", help="plan specs, e.g. 20-24:2 (default: per model)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per held-out sequence")
    parser.add_argument("--num-sequences", type=int, default=32, help="held-out sequences")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        original = build_tiny()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(
            original.config.vocab_size, (args.num_sequences, args.seq_len), generator=generator
        )
        data = "random tokens"
    else:
        original, tokenizer = load_model(args.model, dtype="float32")
        tokens = calibration_tokens(
            tokenizer, args.data, seq_len=args.seq_len, num_sequences=args.num_sequences
        )
        data = args.data
    original.eval()
    specs = args.plans or DEFAULT_PLANS.get(args.model)
    if specs is None:
        parser.error(f"no default plans for {args.model!r}; pass --plans")
    num_layers = len(original.model.layers)
    plans = [cqil.GroupPlan.parse(spec, num_layers) for spec in specs]  # fail on a bad spec before measuring
    print(
        f"model {args.model}  layers {num_layers}  data {data}  "
        f"{tokens.shape[0]} x {tokens.shape[1]} tokens  threads {torch.get_num_threads()}",
        flush=True,
    )

    clock = Stopwatch()
    base = perplexity(original, tokens, batch_size=args.batch_size, progress=False)
    print(f"original  ppl {base['ppl']:.3f}", flush=True)
    rows = []
    for spec, plan in zip(specs, plans, strict=True):
        row = {
            "plan": spec,
            "num_groups": len(plan.groups),
            "num_layers_after": plan.num_layers_after,
            "ppl": {},
        }
        for variant in VARIANTS:
            model = make_variant(original, plan, variant).eval()
            assert len(model.model.layers) == plan.num_layers_after, f"{variant} did not change the depth"
            row["ppl"][variant] = perplexity(model, tokens, batch_size=args.batch_size, progress=False)["ppl"]
            del model  # one copy at a time
            print(f"{spec:>10}  {variant:<9}  ppl {row['ppl'][variant]:.3f}", flush=True)
        rows.append(row)
    elapsed = clock.total()

    header = ["plan", "groups", "depth", "original", *VARIANTS, "coalesced/lp"]
    rows_text = [
        [
            r["plan"],
            groups_label(p),
            f"{num_layers}->{r['num_layers_after']}",
            f"{base['ppl']:.2f}",
            *(f"{r['ppl'][v]:.2f}" for v in VARIANTS),
            f"{r['ppl']['coalesced'] / r['ppl']['lp']:.2f}x",
        ]
        for r, p in zip(rows, plans, strict=True)
    ]
    print()
    print(table(header, rows_text, left=0))
    print(f"held-out perplexity, {tokens.shape[0]} x {tokens.shape[1]} tokens, no training; {elapsed:.0f} s")

    summary = {
        "model": args.model,
        "data": data,
        "seq_len": int(tokens.shape[1]),
        "num_sequences": int(tokens.shape[0]),
        "num_layers": num_layers,
        "original_ppl": round(base["ppl"], 4),
        "plans": [
            {
                **{k: r[k] for k in ("plan", "num_groups", "num_layers_after")},
                "ppl": {v: round(x, 4) for v, x in r["ppl"].items()},
            }
            for r in rows
        ],
        "seconds": round(elapsed, 1),
    }
    emit(summary)


if __name__ == "__main__":
    main()
