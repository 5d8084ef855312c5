"""``cqil plan``: search which layers to group under a depth, speed or quality budget."""

from __future__ import annotations

import argparse

from cqil.cli.common import check_data_paths, load_model_arg
from cqil.errors import UsageError
from cqil.selection.options import SearchOptions

D = SearchOptions()  # the defaults of the plan search's arguments


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose which layers to group by measured quality under a depth, speed or quality budget",
        description="Search where groups of --degree consecutive layers go (anywhere in the model, "
        "several ranges allowed) by measuring candidate plans on calibration text: KL divergence of "
        "each plan's next-token distribution from the original's, and perplexity. Per-group costs "
        "are measured once, then a beam search adds one group at a time and measures every "
        "combination again. Exactly one budget: --target-depth (effective layers), --speedup "
        "(estimated from measured per-layer times, a group costing its slowest layer) or "
        "--max-ppl-increase (percent). Writes plans.json, plan.yaml (the recipe snippet), "
        "table.txt and pareto.png into --out.",
    )
    p.add_argument("--model", required=True, help="embedded name (smollm2-135m), HF folder or Hub id")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL(.gz) files, dirs or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, refused if not empty")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--degree", type=int, default=D.degree, help="layers per group")
    p.add_argument(
        "--bypass", default=D.bypass, choices=["lp", "none", "cqil"], help="bypass mode of the groups"
    )
    p.add_argument(
        "--bypass-distance",
        type=int,
        default=D.bypass_distance,
        help="under cqil: preceding branches per MLP",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-depth", type=int, metavar="N", help="effective depth to reach exactly")
    budget.add_argument("--speedup", type=float, metavar="X", help="least estimated speedup, e.g. 1.2")
    budget.add_argument(
        "--max-ppl-increase", type=float, metavar="PCT", help="shallowest plan within PCT %% more perplexity"
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--num-sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument(
        "--beam-width", type=int, default=D.beam_width, help="plans kept from one round to the next"
    )
    p.add_argument(
        "--pool-size", type=int, default=D.pool_size, help="cheapest groups tried as each plan's next group"
    )
    p.add_argument("--objective", default=D.objective, choices=list(D.OBJECTIVES), help="what 'best' means")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from cqil.files import check_out_dir
    from cqil.recovery.data import calibration_tokens
    from cqil.selection.search import BudgetError, search_plan, write_report

    check_data_paths(args.data)
    check_out_dir(args.out, args.overwrite)  # refuse before the (slow) search, not after it
    model, tokenizer = load_model_arg(args.model, args.dtype)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = calibration_tokens(tokenizer, args.data, seq_len=args.seq_len, num_sequences=args.num_sequences)
    try:
        result = search_plan(model, tokens, search_options(args))
    except BudgetError as e:
        raise UsageError(f"--{e.budget.replace('_', '-')} {e.value}: {e.reason}") from None
    calibration = {"data": args.data, "seq_len": tokens.shape[1], "num_sequences": tokens.shape[0]}
    write_report(
        result, args.out, overwrite=args.overwrite, extra={"model": args.model, "calibration": calibration}
    )
    print(f"{args.model}: plan search on {tokens.shape[0]} x {tokens.shape[1]} calibration tokens")
    print(result.format_table())
    print()
    print(result.recipe_snippet(), end="")
    print(f"wrote {args.out}/plans.json, plan.yaml, table.txt and pareto.png")
    return 0


def search_options(args: argparse.Namespace) -> SearchOptions:
    """The plan search's options from ``cqil plan``'s arguments (one per field of SearchOptions)."""
    return SearchOptions(
        degree=args.degree,
        bypass=args.bypass,
        bypass_distance=args.bypass_distance,
        target_depth=args.target_depth,
        speedup=args.speedup,
        max_ppl_increase=args.max_ppl_increase,
        beam_width=args.beam_width,
        pool_size=args.pool_size,
        objective=args.objective,
        batch_size=args.batch_size,
        seed=args.seed,
    )
