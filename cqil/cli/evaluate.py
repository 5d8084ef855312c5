"""``cqil evaluate``: perplexity, lm-eval tasks and latency of a recovered export, with a report."""

from __future__ import annotations

import argparse
import glob

from cqil.cli.common import check_data_paths
from cqil.errors import DataNotFoundError


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
        "--other-domain",
        nargs="+",
        help="text the model was not trained on (e.g. data/other_domain/dialogue.jsonl.gz): every "
        "document's perplexity, each packed on its own; leads the report",
    )
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
    from cqil.recovery.run_lock import refuse_if_claimed

    refuse_if_claimed(args.out)  # a report folder inside a live run's output_dir waits for its end
    check_data_paths(args.data)
    for path in args.other_domain or []:
        if not glob.glob(path):
            raise DataNotFoundError(f"--other-domain {path!r}: no such file or directory")
    report = evaluate(
        args.model,
        original=args.original,
        data=args.data,
        seq_len=args.seq_len,
        num_sequences=args.num_sequences,
        other_domain=args.other_domain,
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
