"""Decode and prefill speed of parallelized models on whatever GPU this finds, at real models' shapes.

Random-weight models (latency does not depend on the values) at the shapes of SmolLM2-135M,
Llama-3.2-1B, Llama-2-7B and Llama-3-8B, bf16, batch 1: the original, ``cqil.parallelize(form="merged")``
with bypass ``lp`` and fixed gates (foldable, what llama.cpp runs) and with bypass ``cqil`` and learned
gates, plus wider plans of SmolLM2 and Llama-3-8B. Timed with the library's own code
(:func:`cqil.evaluation.latency.measure_latency`, the path a run's report takes): prefill of 512 and
2,048 tokens, eager decode (the ``generate()`` loop) and decode replayed from a CUDA graph over a
``StaticCache`` (how vLLM, TensorRT-LLM and SGLang decode), the models interleaved, medians of
``--reps`` repetitions; speedup = the original's median over the model's, with the ideal L / L_eff and
the share of its gain. First, on the device: merged = branches (float32), cached = recomputed greedy
tokens (bf16) and graph-replayed = eager greedy tokens.

Every line printed is one JSON object, also appended to ``bench/results/gpu-<gpu>.jsonl`` (``--out`` to
choose). The whole default run takes about 4 minutes on an H200 and stops starting new models past
``--budget-s`` (default 450 s) so that it stays under 8 minutes; the reference lines of 2026-12-04 are in
``bench/results/gpu-h200.jsonl``.

    python bench/gpu_latency.py                    # on a GPU
    python bench/gpu_latency.py --models llama3-8b --reps 5
    python bench/gpu_latency.py --smoke            # tiny shapes on the CPU: checks this script
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import traceback

import torch
from _common import RESULTS, Stopwatch, emit, environment, measure_latency, rounded, share_of_ideal

import cqil
from cqil.evaluation.latency import StaticDecode, available_modes, eager_tokens

LLAMA3 = dict(max_position_embeddings=8192, rope_theta=500000.0)
MODELS = {
    # name: (LlamaConfig keywords, plan, extra variants "plan/bypass/gates")
    "smollm2-135m": (
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
             tie_word_embeddings=True),
        "14-26:2",
        ["10-28:2/lp/fixed", "14-26:3/lp/fixed"],
    ),
    "llama3.2-1b": (
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, **LLAMA3),
        "4-14:2",
        [],
    ),
    "llama2-7b": (
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
        "12-30:2",
        [],
    ),
    "llama3-8b": (
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, **LLAMA3),
        "12-30:2",
        ["4-28:2/lp/fixed", "12-30:3/lp/fixed", "8-32:4/lp/fixed"],
    ),
}  # fmt: skip
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
BASE_VARIANTS = ("lp/fixed", "cqil/learned")


def build(config: dict, device, dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def parallelized(original, spec: str):
    """``plan/bypass/gates``: a merged deep copy of ``original``."""
    plan, bypass, gates = spec.split("/")
    model = copy.deepcopy(original)
    cqil.parallelize(model, cqil.GroupPlan.parse(plan, original.config.num_hidden_layers), bypass=bypass,
                     gates=gates, form="merged")  # fmt: skip
    return model.eval()


def correctness(device, dtype, out) -> None:
    """On this device: merged = branches in float32, cached = recomputed and graph = eager greedy tokens."""
    for bypass, gates in (("lp", "fixed"), ("cqil", "learned"), ("none", "fixed")):
        line = {"section": "correctness", "device": str(device), "bypass": bypass, "gates": gates}
        try:
            base = build(SMOKE, device, torch.float32, seed=1)
            plan = cqil.GroupPlan.parse("2-6:2", SMOKE["num_hidden_layers"])
            forms = {}
            for form in ("merged", "branches"):
                forms[form] = cqil.parallelize(
                    copy.deepcopy(base), plan, bypass=bypass, gates=gates, form=form
                )
            ids = torch.randint(0, SMOKE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
            ids = ids.to(device)
            with torch.inference_mode():
                a = forms["merged"](ids).logits.double()
                b = forms["branches"](ids).logits.double()
                line["merged_vs_branches_rel_fp32"] = ((a - b).norm() / b.norm()).item()
                low = forms["merged"].to(dtype).eval()
                cached = low.generate(ids[:1, :8], max_new_tokens=16, do_sample=False, use_cache=True)
                recomputed = low.generate(ids[:1, :8], max_new_tokens=16, do_sample=False, use_cache=False)
                line[f"cached_eq_recompute_{str(dtype).removeprefix('torch.')}"] = bool(
                    torch.equal(cached, recomputed)
                )
                if device.type == "cuda":
                    graph = StaticDecode(low, ids[:1, :8], 16, graph=True).tokens()
                    line["graph_eq_eager_tokens"] = graph == eager_tokens(low, ids[:1, :8], 16)
        except Exception as e:  # noqa: BLE001  (one failed check is a line, not the end of the run)
            line |= {"error": repr(e)[:400], "traceback": traceback.format_exc()[-1200:]}
        emit(line, out)


def latency(name: str, args, device, dtype, out) -> None:
    config, spec, extra = (SMOKE, "2-6:2", ["2-8:3/lp/fixed"]) if args.smoke else MODELS[name]
    clock = Stopwatch()
    original = build(config, device, dtype)
    layers = config["num_hidden_layers"]
    specs = [f"{spec}/{v}" for v in BASE_VARIANTS] + ([] if args.no_extra else extra)
    models = {"original": original} | {s.replace("/", "_"): parallelized(original, s) for s in specs}
    ideal = {
        s.replace("/", "_"): round(layers / cqil.GroupPlan.parse(s.split("/")[0], layers).num_layers_after, 4)
        for s in specs
    }
    result = measure_latency(
        models,
        prefill_lens=args.prefill_lens,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        reps=args.reps,
        modes=args.modes or available_modes(device),
        progress=False,
    )
    share = {
        v: {phase: rounded(share_of_ideal(x, ideal[v])) for phase, x in phases.items()}
        for v, phases in result["speedup"].items()
    }
    line = {
        "section": "latency",
        "model": name,
        "plan": spec,
        "layers": layers,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": 1,
        "prefill_lens": result["prefill_lens"],
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "modes": result["modes"],
        "ideal_depth": ideal,
        "params": {v: sum(p.numel() for p in m.parameters()) for v, m in models.items()},
        "median_ms": {
            v: {p: x.get("ms_per_token", x["ms"]) for p, x in m["phases"].items()}
            for v, m in result["models"].items()
        },
        "speedup": {
            v: {p: x for p, x in s.items() if p not in ("prefill", "decode")}
            for v, s in result["speedup"].items()
        },
        "share_of_ideal": {
            v: {p: x for p, x in s.items() if p not in ("prefill", "decode")} for v, s in share.items()
        },
        "wall_s": round(clock.total(), 1),
    }
    if device.type == "cuda":
        line["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    emit(line, out)
    del models, original
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def results_file(device) -> str:
    """bench/results/gpu-<name>.jsonl, the GPU's name without the vendor (``NVIDIA H200`` -> ``h200``)."""
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia").strip()
    return str(RESULTS / f"gpu-{re.sub(r'[^a-z0-9]+', '-', name).strip('-')}.jsonl")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check this script")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--prefill-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--modes", nargs="+", choices=["eager", "graph"], help="decode modes (default: all available)"
    )
    ap.add_argument(
        "--no-extra", action="store_true", help="only lp/fixed and cqil/learned on each model's plan"
    )
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="start no further model after this many seconds"
    )
    ap.add_argument(
        "--out",
        help="JSON-lines file to append to (default bench/results/gpu-<gpu>.jsonl; none with --smoke)",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.prefill_lens, args.new_tokens, args.reps = [16, 64], 4, 1
        todo = ["smoke"]
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or --smoke to check the script on the CPU")
    else:
        device, dtype, todo = torch.device("cuda"), torch.bfloat16, args.models
    out = args.out or (None if args.smoke else results_file(device))
    clock = Stopwatch()
    emit({"section": "env", "script": "bench/gpu_latency.py", "date": time.strftime("%Y-%m-%d"),
          **environment(str(device))}, out)  # fmt: skip
    if not args.skip_correctness:
        correctness(device, dtype, out)
    for name in todo:
        if clock.total() > args.budget_s:
            emit(
                {"section": "latency", "model": name, "skipped": f"past the {args.budget_s:.0f} s budget"},
                out,
            )
            continue
        try:
            latency(name, args, device, dtype, out)
        except Exception as e:  # noqa: BLE001  (an out-of-memory on one shape still leaves the others)
            emit({"section": "latency", "model": name, "error": repr(e)[:600],
                  "traceback": traceback.format_exc()[-1500:]}, out)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
    emit({"section": "done", "wall_s": round(clock.total(), 1)}, out)


if __name__ == "__main__":
    main()
