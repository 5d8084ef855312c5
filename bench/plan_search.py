"""Searched plans against an exhaustive scan of contiguous ranges and the similarity pick, held out.

For each number K of pairs (default 2, 4 and 6 on SmolLM2-135M), three ways to choose which
layers run as K parallel pairs (degree 2), all on the same calibration tokens (the first
sequences of data/sample/train.jsonl.gz):
  searched    cqil.selection.search.search_plan: per-pair costs measured once, then a beam search over
              pairs anywhere in the model, every combination measured (calibration KL);
  scan        every single contiguous range of 2K layers cut into K pairs, each measured
              (calibration KL), the best one kept;
  similarity  cqil.selection.similarity.suggest_plan: the contiguous range whose pairs' inputs are the
              most similar (no plan is run; one pass with hooks).
Each plan is then parallelized for real (cqil.parallelize, merged form, gates at the bypass
mode's G) and its perplexity measured on held-out text (data/sample/heldout.jsonl.gz), which
none of the three saw. The searched plans for every K come from one search run to the largest
K: a search for K pairs stops after round K, so the plan and cost it reports are those of round K
(the beam does not depend on the budget). Costs are counted in forward passes over the
calibration tokens: decoder-layer work / num_layers, prefixes shared with the original model (or
a plan of the beam) reused, not recomputed; "plans" is how many candidates were measured, each
needing one LM-head pass as well.

Runtime: about 8-10 minutes on SmolLM2-135M with 1 CPU thread (8 x 128 calibration tokens,
16 x 256 held-out tokens); seconds with --model tiny (random weights and tokens, a smoke test).

    python bench/plan_search.py
    python bench/plan_search.py --pairs 2 4 --calib-sequences 16 --bypass none
    python bench/plan_search.py --model tiny

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _common import Stopwatch, emit, table
from tiny import build_tiny  # bench/tiny.py, beside this script

import cqil
from cqil.evaluation.metrics import perplexity
from cqil.pretrained import load_model
from cqil.recovery.data import calibration_tokens
from cqil.selection.search import measure_plans, search_plan
from cqil.selection.similarity import layer_input_similarity, suggest_plan

DEFAULT_PAIRS = {"smollm2-135m": [2, 4, 6], "tiny": [1, 2]}


def contiguous_plans(num_layers: int, pairs: int) -> list[cqil.GroupPlan]:
    """Every range of 2 * pairs consecutive layers, cut into pairs."""
    width = 2 * pairs
    return [cqil.GroupPlan.parse(f"{s}-{s + width}:2", num_layers) for s in range(num_layers - width + 1)]


def label(groups) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    parser.add_argument("--pairs", type=int, nargs="+", help="pair counts K (default: per model)")
    parser.add_argument("--bypass", default="lp", choices=["lp", "none", "cqil"])
    parser.add_argument("--calib-data", default="data/sample/train.jsonl.gz")
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--calib-sequences", type=int, default=8)
    parser.add_argument("--heldout-data", default="data/sample/heldout.jsonl.gz")
    parser.add_argument("--heldout-seq-len", type=int, default=256)
    parser.add_argument("--heldout-sequences", type=int, default=16)
    parser.add_argument("--beam-width", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    clock = Stopwatch()
    if args.model == "tiny":
        model = build_tiny()
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 512, (args.calib_sequences, args.calib_seq_len), generator=g)
        heldout = torch.randint(0, 512, (args.heldout_sequences, args.heldout_seq_len), generator=g)
        args.calib_data = args.heldout_data = "random tokens"
    else:
        model, tokenizer = load_model(args.model)
        model.eval()
        calib = calibration_tokens(
            tokenizer, args.calib_data, seq_len=args.calib_seq_len, num_sequences=args.calib_sequences
        )
        heldout = calibration_tokens(
            tokenizer, args.heldout_data, seq_len=args.heldout_seq_len, num_sequences=args.heldout_sequences
        )
    num_layers = model.config.num_hidden_layers
    pairs = sorted(args.pairs or DEFAULT_PAIRS.get(args.model, [2, 4, 6]))
    print(
        f"model {args.model}  layers {num_layers}  pairs {pairs}  bypass {args.bypass}  "
        f"calibration {tuple(calib.shape)} from {args.calib_data}  "
        f"held-out {tuple(heldout.shape)}  beam {args.beam_width} pool {args.pool_size}  threads {args.threads}",
        flush=True,
    )
    options = dict(bypass=args.bypass, batch_size=args.batch_size, progress=False)

    # searched: one search to the largest K; round K is what a search for K pairs returns.
    result = search_plan(
        model,
        calib,
        degree=2,
        target_depth=num_layers - pairs[-1],
        beam_width=args.beam_width,
        pool_size=args.pool_size,
        **options,
    )
    rows: dict[int, dict] = {k: {} for k in pairs}
    for k in pairs:
        r = result.rounds[k - 1]
        best = r["best"]
        rows[k]["searched"] = {
            "groups": best["groups"],
            "calib_kl": best["kl"],
            "calib_ppl": best["ppl"],
            "plans": r["candidates"],
            "forward_passes": r["forward_passes"],
            "lm_head_passes": r["lm_head_passes"],
        }
    phases = {"search": result.cost["seconds"]}
    print(f"search: {phases['search']:.0f} s, calibration ppl of the original {result.original['ppl']:.2f}")
    clock.lap()

    # scan: every contiguous range, measured the same way (original prefix shared).
    for k in pairs:
        scores, cost = measure_plans(model, calib, contiguous_plans(num_layers, k), **options)
        best = min(scores, key=lambda s: (s["kl"], s["plan"]["groups"]))
        rows[k]["scan"] = {
            "groups": best["plan"]["groups"],
            "calib_kl": best["kl"],
            "calib_ppl": best["ppl"],
            "plans": cost["candidates"],
            "forward_passes": round(cost["forward_passes"], 3),
            "lm_head_passes": round(cost["lm_head_passes"], 3),
        }
        print(
            f"scan {k} pairs: {cost['candidates']} ranges, best {label(best['plan']['groups'])}", flush=True
        )

    phases["scan"] = round(clock.lap(), 1)

    # similarity: one pass with hooks through the decoder stack (no LM head), then no plan is run.
    sim = layer_input_similarity(model, calib, batch_size=args.batch_size, progress=False)
    suggested = [suggest_plan(sim["matrix"], num_groups=k, degree=2) for k in pairs]
    scores, _ = measure_plans(model, calib, suggested, **options)  # for the table only, not its cost
    for k, plan, score in zip(pairs, suggested, scores, strict=True):
        rows[k]["similarity"] = {
            "groups": [list(g) for g in plan.groups],
            "calib_kl": score["kl"],
            "calib_ppl": score["ppl"],
            "plans": 0,
            "forward_passes": 1.0,
            "lm_head_passes": 0.0,
        }

    phases["similarity"] = round(clock.lap(), 1)

    # held out: each distinct plan parallelized for real and measured on text none of them saw.
    heldout_ppl: dict[str, float] = {
        "original": perplexity(model, heldout, batch_size=args.batch_size, progress=False)["ppl"]
    }
    for k in pairs:
        for entry in rows[k].values():
            key = json.dumps(entry["groups"])
            if key not in heldout_ppl:
                student = cqil.parallelize(
                    copy.deepcopy(model), entry["groups"], bypass=args.bypass, gates="fixed"
                )
                heldout_ppl[key] = perplexity(student, heldout, batch_size=args.batch_size, progress=False)[
                    "ppl"
                ]
                del student
            entry["heldout_ppl"] = heldout_ppl[key]
        print(f"held out {k} pairs done ({clock.total():.0f} s)", flush=True)

    phases["heldout"] = round(clock.lap(), 1)
    base = heldout_ppl["original"]
    header = [
        "pairs",
        "method",
        "plan",
        "calib KL",
        "calib ppl",
        "held-out ppl",
        "vs orig",
        "plans",
        "fwd passes",
    ]
    rows_text = [["-", "original", "-", "0", f"{result.original['ppl']:.2f}", f"{base:.2f}", "-", "-", "-"]]
    for k in pairs:
        for method, e in rows[k].items():
            rows_text.append(
                [
                    str(k),
                    method,
                    label(e["groups"]),
                    f"{e['calib_kl']:.4f}",
                    f"{e['calib_ppl']:.2f}",
                    f"{e['heldout_ppl']:.2f}",
                    f"{100 * (e['heldout_ppl'] / base - 1):+.1f}%",
                    str(e["plans"]),
                    f"{e['forward_passes']:.1f}",
                ]
            )
    print()
    print(table(header, rows_text, left={2}, rule=False))
    wins = {
        k: {
            "vs_scan": rows[k]["searched"]["heldout_ppl"] <= rows[k]["scan"]["heldout_ppl"],
            "vs_similarity": rows[k]["searched"]["heldout_ppl"] < rows[k]["similarity"]["heldout_ppl"],
        }
        for k in pairs
    }
    print(f"searched <= scan and < similarity on held-out perplexity: {wins}")
    summary = {
        "model": args.model,
        "bypass": args.bypass,
        "calibration": {"data": args.calib_data, "shape": list(calib.shape)},
        "heldout": {"data": args.heldout_data, "shape": list(heldout.shape)},
        "search": {
            "beam_width": args.beam_width,
            "pool_size": args.pool_size,
            "seconds": result.cost["seconds"],
        },
        "original": {"calib_ppl": result.original["ppl"], "heldout_ppl": base},
        "pairs": {str(k): rows[k] for k in pairs},
        "searched_wins": {str(k): v for k, v in wins.items()},
        "threads": args.threads,
        "phase_seconds": phases,
        "seconds": round(clock.total(), 1),
    }
    emit(summary)


if __name__ == "__main__":
    main()
