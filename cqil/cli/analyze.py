"""``cqil analyze``: layer-input similarity, suggested plans and their perplexity before recovery."""

from __future__ import annotations

import argparse

from cqil.cli.common import check_data_paths, load_model_arg


def add_analyze_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="layer-input similarity, suggested plans and their perplexity before recovery",
        description="Measure the cosine similarity of the decoder layers' inputs on calibration "
        "text, suggest the most similar contiguous range for each group count, and measure the "
        "perplexity of each suggestion under every bypass mode and as a depth-coalesced model "
        "(averaged layers), each in place from its first group on (the model is never copied). With "
        "--rank-groups, also the measured cost of every group beside its similarity. Writes "
        "similarity.json and similarity.png into --out.",
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
    p.add_argument(
        "--rank-groups",
        action="store_true",
        help="also measure every group of --degree layers on its own (calibration KL and perplexity) "
        "and rank them beside their similarity: one measurement per group, from its first layer on",
    )
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from cqil.files import check_out_dir
    from cqil.selection.similarity import analyze, format_group_ranking

    check_data_paths(args.data)
    check_out_dir(args.out, args.overwrite)
    model, tokenizer = load_model_arg(args.model, args.dtype)
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
        measured=args.rank_groups,
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
