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

from cqil.export_cli import add_export_parser

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
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--groups", type=int, nargs="+", default=[2], metavar="N", help="group counts to suggest")
    p.add_argument("--degree", type=int, default=2, help="layers per group")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--num-sequences", type=int, default=32, help="calibration sequences")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    from cqil.similarity import analyze

    # Fail on a mistyped path now rather than after loading the model.
    for path in args.data:
        if not glob.glob(path):
            raise FileNotFoundError(f"--data {path!r}: no such file or directory")
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
    )
    calib = result["calibration"]
    print(f"{args.model}: perplexity on {calib['num_sequences']} x {calib['seq_len']} calibration tokens")
    print(format_analysis(result))
    print(f"wrote {args.out}/similarity.json and {args.out}/similarity.png")
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
    add_export_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except _INPUT_ERRORS as e:
        # Library messages may span lines (transformers' do); the contract is one line.
        print(f"cqil: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
