"""Peak memory of ``cqil analyze`` and ``cqil plan`` against the model's own weights.

Builds a randomly initialised Llama-architecture model from a config (default: hidden 2048,
22 layers, 32 query / 4 key-value heads, intermediate 5632: about 1.2B parameters with
SmolLM2's 49152-token vocabulary, whose tokenizer it carries), saves it as safetensors into a
temporary folder, then runs each command in a fresh process with small calibration settings and
reads that process's peak resident memory (``VmHWM``) twice: over the whole run (loading
included) and from the end of loading on (the peak is reset once the model is in memory, so this
is what the analysis itself adds to the weights). Prints one JSON line: parameters, weight bytes,
and per command the peaks and their ratios to the weight bytes.

    python bench/analysis_memory.py                       # the ~1.2B model (float32: ~4.7 GB)
    python bench/analysis_memory.py --layers 4 --hidden 256 --intermediate 688   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Stopwatch, emit

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sample" / "heldout.jsonl.gz"

# Runs inside the measured process: the cqil command line, with its model loading wrapped so that
# the peak resident memory is read (and reset) once the weights are in memory.
WRAPPER = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import cqil.cli.analyze, cqil.cli.plan, cqil.cli.common
marks = {}
load = cqil.cli.common.load_model_arg
def wrapped(*args, **kwargs):
    out = load(*args, **kwargs)
    marks["after_load_rss"] = status("VmRSS")
    marks["load_peak_rss"] = status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    return out
cqil.cli.analyze.load_model_arg = cqil.cli.plan.load_model_arg = wrapped
from cqil.cli import main
rc = main(sys.argv[2:])
marks["analysis_peak_rss"] = status("VmHWM")
marks["rc"] = rc
open(sys.argv[1], "w").write(json.dumps(marks))
"""


def build(folder: Path, args) -> tuple[int, int]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cqil.pretrained import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=args.dtype,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return params, weight_bytes


def measure(command: list[str], workdir: Path) -> dict:
    marks = workdir / f"{command[0]}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    clock = Stopwatch()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(marks), *command], cwd=REPO, env=env, stdout=subprocess.PIPE
    )
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed with status {proc.returncode}")
    out = json.loads(marks.read_text())
    out["seconds"] = round(clock.total(), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--num-sequences", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        params, weight_bytes = build(model_dir, args)
        calib = ["--seq-len", str(args.seq_len), "--num-sequences", str(args.num_sequences)]
        calib += ["--batch-size", str(args.batch_size), "--dtype", args.dtype]
        common = ["--model", str(model_dir), "--data", str(DATA), *calib]
        results = {
            "analyze": measure(["analyze", *common, "--out", str(tmp / "analyze")], tmp),
            # One group: round 1 of the search measures every window, the most plans per round.
            "plan": measure(
                ["plan", *common, "--out", str(tmp / "plan"), "--target-depth", str(args.layers - 1)], tmp
            ),
        }
    for r in results.values():
        r["peak_rss"] = max(r["load_peak_rss"], r["analysis_peak_rss"])  # the whole process
        r["ratio"] = round(r["peak_rss"] / weight_bytes, 3)
        r["analysis_ratio"] = round(r["analysis_peak_rss"] / weight_bytes, 3)
        r["extra_over_weights_bytes"] = r["analysis_peak_rss"] - weight_bytes
    summary = {
        "model": f"llama hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}",
        "dtype": args.dtype,
        "params": params,
        "weight_bytes": weight_bytes,
        "calibration": {
            "seq_len": args.seq_len,
            "num_sequences": args.num_sequences,
            "batch_size": args.batch_size,
        },
        **results,
    }
    emit(summary)


if __name__ == "__main__":
    main()
