"""Latency of a merged-form parallelized model against the original, measured side by side.

Times, for the original model and for a deep copy parallelized with ``form="merged"`` (one per
``--bypass`` mode; the first is the summary's ``merged``, the others ``merged_<mode>``):
  prefill  one forward of batch 1 x --prefill-len tokens (KV cache built, last-position logits
           only, as ``generate`` does);
  decode   --new-tokens greedy steps of one token each with the KV cache, after an untimed
           prefill of a --prompt-len prompt.
The two models alternate within every repetition (A B, then B A) after one warmup round, so
drift in machine load hits both alike; speedups are medians of per-repetition ratios. The
gates keep their initial values, so the parallelized model's tokens differ from the original's:
this measures speed only.

Threads default to 1: on a shared CPU runner one thread gives stable, comparable numbers, and
the depth reduction then shows only as less per-layer overhead; pass --threads to use more.
Runtime: about 1.5 minutes on smollm2-135m (1 CPU thread, 5 reps), seconds on --model tiny.

    python bench/merged_vs_original.py                     # SmolLM2-135M, plan 10-22:2
    python bench/merged_vs_original.py --model tiny --reps 2
    python bench/merged_vs_original.py --groups 14-26:2 --threads 2 --bypass lp cqil

The last line printed is one JSON object with the medians and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from tiny import build_tiny  # bench/tiny.py, beside this script

import cqil
from cqil.evaluation import metrics
from cqil.pretrained import load_model
from cqil.rewrite.group import BYPASS_MODES

DEFAULT_PLANS = {"smollm2-135m": "10-22:2", "tiny": "2-6:2"}


def time_prefill(model, ids: torch.Tensor) -> float:
    return metrics.time_prefill(model, ids) * 1e3


def time_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    return metrics.time_decode(model, prompt, new_tokens) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    parser.add_argument("--groups", help="plan spec, e.g. '10-22:2' (default: per model)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=32, help="untimed prompt before decoding")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--bypass",
        nargs="+",
        default=["lp"],
        choices=BYPASS_MODES,
        help="bypass modes to time, each as its own parallelized copy in the same interleaved run",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model == "tiny":
        original = build_tiny().to(device, getattr(torch, args.dtype))
    else:
        original, _ = load_model(args.model, dtype=args.dtype, device=device)
    original.eval()
    spec = args.groups or DEFAULT_PLANS.get(args.model)
    if spec is None:
        parser.error(f"no default plan for {args.model!r}; pass --groups")
    plan = cqil.GroupPlan.parse(spec, original.config.num_hidden_layers)
    # The first mode is "merged" (the summary's speedups); any others are "merged_<mode>".
    models = {"original": original}
    for i, bypass in enumerate(dict.fromkeys(args.bypass)):
        model = cqil.parallelize(copy.deepcopy(original), plan, form="merged", bypass=bypass).eval()
        assert len(model.model.layers) == plan.num_layers_after, (
            "the surgery did not replace the grouped layers"
        )
        models["merged" if i == 0 else f"merged_{bypass}"] = model
    merged = models["merged"]

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(original.config.vocab_size, (1, args.prefill_len), generator=generator).to(device)
    prompt = ids[:, : args.prompt_len]
    print(
        f"model {args.model}  plan {spec}  layers {plan.num_layers} -> {plan.num_layers_after}  "
        f"threads {args.threads}  device {device}  dtype {args.dtype}",
        flush=True,
    )

    with torch.inference_mode():
        logits = merged(input_ids=prompt).logits
        assert logits.shape == (1, args.prompt_len, original.config.vocab_size)
        assert torch.isfinite(logits).all(), "the parallelized model produced non-finite logits"
        for model in models.values():  # warmup: allocator, kernels, caches
            time_prefill(model, ids)
            time_decode(model, prompt, args.new_tokens)

        times = {name: {"prefill": [], "decode": []} for name in models}
        for rep in range(args.reps):
            order = list(models) if rep % 2 == 0 else list(reversed(models))
            for name in order:
                times[name]["prefill"].append(time_prefill(models[name], ids))
                times[name]["decode"].append(time_decode(models[name], prompt, args.new_tokens))
            print(
                f"rep {rep + 1}/{args.reps}  "
                + "  ".join(
                    f"{name}: prefill {times[name]['prefill'][-1]:8.1f} ms, "
                    f"decode {times[name]['decode'][-1] / args.new_tokens:6.2f} ms/token"
                    for name in models
                ),
                flush=True,
            )

    def median_ratio(kind: str, name: str = "merged") -> float:
        pairs = zip(times["original"][kind], times[name][kind], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def medians(kind: str) -> dict:
        return {name: round(statistics.median(times[name][kind]), 3) for name in models}

    summary = {
        "model": args.model,
        "plan": spec,
        "prefill_speedup": round(median_ratio("prefill"), 4),
        "decode_speedup": round(median_ratio("decode"), 4),
        "ideal": round(plan.ideal_speedup, 4),
        "bypass": args.bypass[0],
        **{
            f"{kind}_speedup_{name.removeprefix('merged_')}": round(median_ratio(kind, name), 4)
            for name in models
            if name.startswith("merged_")
            for kind in ("prefill", "decode")
        },
        "prefill_ms": medians("prefill"),
        "decode_ms": medians("decode"),
        "prefill_len": args.prefill_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "reps": args.reps,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
