"""Latency of a merged-form parallelized model against the original, measured side by side.

Times, for the original model and a deep copy parallelized with ``form="merged"`` per ``--variants``
entry (``bypass/gates``; default ``lp/fixed`` and ``cqil/learned``), with the library's own timing
(:func:`cqil.evaluation.latency.measure_latency`, the path a run's report takes):

  prefill_<n>    one forward of batch 1 x n tokens building the KV cache (``--prefill-lens``, default
                 512 and 2048, capped by the model's context);
  decode eager   ``--new-tokens`` greedy steps over a dynamic cache after an untimed prompt (the
                 ``generate()`` loop);
  decode graph   on ``--device cuda``: one decode step over a ``StaticCache`` captured as a CUDA graph
                 once per model and replayed per token, as vLLM, TensorRT-LLM and SGLang decode.

The models alternate within every repetition after a warmup round; a speedup is the original's median
time over the model's, the same medians as the tokens/s. Each row gives the ideal L / L_eff and the
share of its gain reached, (speedup - 1) / (ideal - 1). ``--exported`` also times the first variant
exported and loaded back as a user loads it (``cqil.export.load.load_export``).

On a CPU each core streams the same weights whatever the depth, so batch-1 decode reads about 1.0x
here; the engine rows follow: llama.cpp timed now through ``bench/serving.py`` (its llama.cpp section,
in the ``.venv-llama`` environment when it exists) and vLLM's rows read from the newest
``bench/results/serving-*.jsonl`` that ``bench/serving.py`` wrote. On a GPU the depth reduction shows:
``bench/gpu_latency.py`` and ``bench/results/gpu-h200.jsonl`` (1.20-1.46x CUDA-graph decode on an H200).

Threads default to 1: on a shared CPU runner one thread gives stable, comparable numbers.
Runtime on 1 CPU thread, smollm2-135m, 3 reps, two variants: about 4 minutes plus the llama.cpp
section (about 2); seconds on --model tiny.

    python bench/merged_vs_original.py                              # SmolLM2-135M, plan 14-26:2, CPU
    python bench/merged_vs_original.py --device cuda --dtype bfloat16
    python bench/merged_vs_original.py --model tiny --reps 2 --no-engines

Every row is printed in a table; the last line is one JSON object with the medians, ratios and shares.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import (
    REPO,
    RESULTS,
    emit,
    loadavg,
    measure_latency,
    ratio_cell,
    read_jsonl,
    rounded,
    share_cell,
    share_of_ideal,
    table,
)
from tiny import build_tiny  # bench/tiny.py, beside this script

import cqil
from cqil.evaluation.latency import MODES, PREFILL_LENS, available_modes
from cqil.pretrained import load_model

DEFAULT_PLANS = {"smollm2-135m": "14-26:2", "tiny": "2-6:2"}
DEFAULT_VARIANTS = ("lp/fixed", "cqil/learned")
LLAMA_PYTHON = REPO / ".venv-llama" / "bin" / "python"


def variant_name(spec: str) -> str:
    return "merged_" + spec.replace("/", "_")


def build_models(args, device) -> tuple[dict, cqil.GroupPlan, str]:
    if args.model == "tiny":
        original = build_tiny().to(device, getattr(torch, args.dtype))
    else:
        original, _ = load_model(args.model, dtype=args.dtype, device=device)
    original.eval()
    spec = args.groups or DEFAULT_PLANS.get(args.model)
    if spec is None:
        sys.exit(f"no default plan for {args.model!r}; pass --groups")
    plan = cqil.GroupPlan.parse(spec, original.config.num_hidden_layers)
    models = {"original": original}
    for entry in dict.fromkeys(args.variants):
        bypass, _, gates = entry.partition("/")
        model = cqil.parallelize(
            copy.deepcopy(original), plan, form="merged", bypass=bypass, gates=gates or "learned"
        ).eval()
        assert len(model.model.layers) == plan.num_layers_after, (
            "the surgery did not replace the grouped layers"
        )
        models[variant_name(entry)] = model
    return models, plan, spec


def add_exported(models: dict, first: str, folder: Path, device, dtype: str) -> None:
    """The first variant exported and loaded back as a user loads it, timed like the others."""
    from cqil.export.load import load_export
    from cqil.export.write import export_model

    export_model(models[first], folder / "model")
    models[first + "_exported"] = load_export(folder / "model", dtype=dtype, device=device).eval()


def engine_rows(args, spec: str) -> list[dict]:
    """llama.cpp measured now (bench/serving.py's llama.cpp section) and vLLM's newest recorded lines."""
    rows: list[dict] = []
    python = Path(args.llama_python)
    problem = None
    if not python.is_file():
        problem = f"{python} is missing (scripts/setup_engines.sh builds it)"
    elif subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode:
        problem = f"llama_cpp does not import in {python}"
    if problem:
        rows.append({"engine": "llama.cpp", "skipped": problem})
    else:
        cmd = [sys.executable, str(REPO / "bench" / "serving.py"), "--llama-python", str(python)]
        cmd += ["--skip", "vllm-tp1", "vllm-tp2", "gpu"] + (["--tiny"] if args.model == "tiny" else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        found = [x for x in lines if x.get("section") == "llama.cpp"]
        if proc.returncode or not found:
            rows.append({"engine": "llama.cpp", "skipped": f"bench/serving.py failed: {proc.stderr[-400:]}"})
        else:
            for line in found:
                rows.append(dict(line, engine=_engine(line), source="measured now by bench/serving.py"))
    recorded = sorted(RESULTS.glob("serving-*.jsonl"), key=lambda p: p.stat().st_mtime)
    if recorded:
        for line in read_jsonl(recorded[-1]):
            if str(line.get("section", "")).startswith("vllm") and "decode_speedup" in line:
                rows.append(dict(line, engine=_engine(line), source=str(recorded[-1].relative_to(REPO))))
    else:
        rows.append({"engine": "vllm", "skipped": "no bench/results/serving-*.jsonl: run bench/serving.py"})
    return rows


def _engine(line: dict) -> str:
    """A serving.py section's engine, with the bypass variant where its lines name one."""
    return line["section"] + (f" {line['variant']}" if line.get("variant") else "")


def engine_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["engine"], "–", "–", "–", "–", "–", "–", "skipped: " + r["skipped"]])
            continue
        ideal = r.get("ideal_depth")
        for kind in ("prefill", "decode"):
            x = r.get(f"{kind}_speedup")
            out.append(
                [
                    r["engine"],
                    r.get("model", "?"),
                    r.get("plan", "?"),
                    kind,
                    ratio_cell(x),
                    f"{ideal:.3f}x" if ideal else "–",
                    share_cell(share_of_ideal(x, ideal)),
                    r.get("source", ""),
                ]
            )
    return table(
        ["engine", "model", "plan", "phase", "speedup", "ideal", "share of ideal gain", "source"], out
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    parser.add_argument("--groups", help="plan spec, e.g. '14-26:2' (default: per model)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=list(PREFILL_LENS))
    parser.add_argument("--prompt-len", type=int, default=32, help="untimed prompt before decoding")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="bypass/gates of each merged copy, e.g. lp/fixed cqil/learned none/fixed",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, help="decode modes (default: all the device runs)"
    )
    parser.add_argument(
        "--exported", action="store_true", help="also time the first variant exported and reloaded"
    )
    parser.add_argument(
        "--no-engines", dest="engines", action="store_false", help="skip the engine rows (CPU)"
    )
    parser.add_argument(
        "--llama-python", default=str(LLAMA_PYTHON), help="python of the llama.cpp environment"
    )
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = loadavg()  # a figure from a loaded machine is a noisy one: each line says how loaded
    modes = args.modes or list(available_modes(device))
    models, plan, spec = build_models(args, device)
    first = variant_name(args.variants[0])
    with tempfile.TemporaryDirectory() as tmp:
        if args.exported:
            add_exported(models, first, Path(tmp), device, args.dtype)
        with torch.inference_mode():  # the rewrite is sound before it is timed
            logits = models[first](input_ids=torch.zeros(1, 4, dtype=torch.long, device=device)).logits
            assert torch.isfinite(logits).all(), "the parallelized model produced non-finite logits"
        print(
            f"model {args.model}  plan {spec}  layers {plan.num_layers} -> {plan.num_layers_after}  "
            f"threads {args.threads}  device {device}  dtype {args.dtype}  modes {' '.join(modes)}  "
            f"load average {load_start}",
            flush=True,
        )
        ideal = plan.ideal_speedup
        latency = measure_latency(
            models,
            prefill_lens=args.prefill_lens,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            reps=args.reps,
            modes=modes,
            ideal=ideal,
            progress=False,
        )
    rows = []
    base = latency["models"]["original"]["phases"]
    for name, entry in latency["models"].items():
        for phase, numbers in entry["phases"].items():
            kind, _, rest = phase.partition("_")
            x = latency["speedup"].get(name, {}).get(phase)
            rows.append(
                [
                    name,
                    kind if kind == "decode" else f"prefill {rest}",
                    rest if kind == "decode" else "–",
                    f"{numbers['ms_per_token']:.3f} ms/tok"
                    if kind == "decode"
                    else f"{numbers['ms']:.1f} ms",
                    f"{numbers['tokens_per_s']:.1f}",
                    "1x" if name == "original" else ratio_cell(x),
                    f"{ideal:.3f}x",
                    "–" if name == "original" else share_cell(share_of_ideal(x, ideal)),
                ]
            )
            assert (
                name == "original"
                or abs(numbers["tokens_per_s"] / base[phase]["tokens_per_s"] - x) < 1e-3 * x
            )
    print(
        table(
            ["model", "phase", "mode", "median", "tokens/s", "speedup", "ideal", "share of ideal gain"], rows
        )
    )
    engines = []
    if args.engines and device.type == "cpu":
        engines = engine_rows(args, spec)
        print("\nengines (batch 1; llama.cpp and vLLM run the folded lp model):")
        print(engine_table(engines))
    if device.type == "cpu":
        print(
            "\nOn a CPU each core streams the same weights whatever the depth, so batch-1 decode reads about "
            "1.0x; on a GPU with CUDA graphs the merged form decodes 1.20-1.46x faster (bench/gpu_latency.py, "
            "bench/results/gpu-h200.jsonl)."
        )
    speed = latency["speedup"][first]
    summary = {
        "model": args.model,
        "plan": spec,
        "ideal": round(ideal, 4),
        "variants": list(models)[1:],
        "prefill_speedup": speed["prefill"],
        "decode_speedup": speed["decode"],
        "decode_mode": latency["decode_mode"],
        "speedup": latency["speedup"],
        "share_of_ideal": latency["share_of_ideal"],
        "prefill_ms": {n: m["prefill_ms"] for n, m in latency["models"].items()},
        "decode_ms": {
            n: {
                p.removeprefix("decode_"): x["ms_per_token"]
                for p, x in m["phases"].items()
                if "ms_per_token" in x
            }
            for n, m in latency["models"].items()
        },
        "tokens_per_s": {
            n: {p: x["tokens_per_s"] for p, x in m["phases"].items()} for n, m in latency["models"].items()
        },
        "engines": [
            {
                k: r.get(k)
                for k in (
                    "engine",
                    "model",
                    "plan",
                    "prefill_speedup",
                    "decode_speedup",
                    "ideal_depth",
                    "source",
                    "skipped",
                )
                if k in r
            }
            | {
                "decode_share_of_ideal": rounded(
                    share_of_ideal(r.get("decode_speedup"), r.get("ideal_depth"))
                )
            }
            for r in engines
        ],
        "device": latency["device"],
        "dtype": args.dtype,
        "prefill_lens": latency["prefill_lens"],
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "reps": args.reps,
        "loadavg": {"start": load_start, "end": loadavg()},
    }
    emit(summary, args.out)


if __name__ == "__main__":
    main()
