"""One recovery training step three ways, on the same model, plan and batch: tokens/s and peak memory.

* ``ours``: :class:`cqil.trainer.RecoveryModel`: the teacher is the grouped region's original layers
  only, the layers before the first group run once for both, the teacher runs under no_grad;
* ``naive``: the same losses with the teacher as a separate full copy of the original model (no
  shared prefix, no shared weights), run under no_grad from the input ids;
* ``cqil_style``: the CQIL paper's recovery: LoRA r=32 on every linear layer of every layer, the
  teacher is the whole model with the adapters (and the rewrite) switched off; one forward each
  plus backward through the whole depth.

Each variant runs in its own process (so that peak memory is its own): a thread samples the resident
memory (CPU) or the CUDA allocator's peak during the timed steps. An analytic estimate of each step's
FLOPs (matmuls only) is printed beside it. The last line is one JSON object with the ratios.

    python bench/recovery_step.py                      # smollm2-135m, "14-26:2", 2 x 128 tokens (CPU: minutes)
    python bench/recovery_step.py --tiny --steps 3     # a tiny random Llama (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time

import torch

VARIANTS = ("ours", "naive", "cqil_style")


def build(args):
    """(model, tokenizer-less vocab size) of the benchmarked model, loaded fresh."""
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from conftest import make_model

        return make_model("llama").train()
    from cqil.pretrained import load_model

    model, _ = load_model(args.model, dtype=args.dtype)
    return model.train()


def make_step(args, variant):
    from cqil.losses import kd_loss, lm_loss
    from cqil.recipe import LoraConfig
    from cqil.surgery import parallelize, trainable_parameters
    from cqil.trainer import RecoveryModel, apply_lora

    torch.manual_seed(0)
    model = build(args)
    groups = args.groups if not args.tiny else "2-6:2"
    plan_groups = __import__("cqil.plan", fromlist=["GroupPlan"]).GroupPlan.parse(
        groups, model.config.num_hidden_layers
    )
    copies = {i: copy.deepcopy(model.model.layers[i]) for g in plan_groups.groups for i in g}
    naive_teacher = copy.deepcopy(model).eval() if variant == "naive" else None
    parallelize(model, plan_groups, bypass="none" if variant == "cqil_style" else "lp")
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == "cqil_style":
        apply_lora(model, LoraConfig(r=32, alpha=32), target="all")
        params = [p for n, p in model.named_parameters() if "lora_" in n]
    else:
        params = list(trainable_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)

    if variant == "naive":
        for p in naive_teacher.parameters():
            p.requires_grad_(False)

        def loss_fn(ids):
            logits = model(ids).logits
            with torch.no_grad():
                teacher = naive_teacher(ids).logits
            return kd_loss(logits, teacher) + args.lm_weight * lm_loss(logits, ids)
    else:
        rm = RecoveryModel(model, copies if variant == "ours" else copies, kd=1.0, lm=args.lm_weight)
        rm.adapters_outside_groups = variant == "cqil_style"
        rm.train()

        def loss_fn(ids):
            return rm(ids)["loss"]

    def step(ids):
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args, variant) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, step = make_step(args, variant)
    model.to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g).to(device)
    step(batch)  # warm-up: allocator, kernels, optimizer state
    peak = {"v": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["v"] = max(peak["v"], rss_bytes())
            time.sleep(0.002)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stop.set()
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else peak["v"]
    tokens = args.batch * args.seq_len * args.steps
    return {
        "variant": variant,
        "tok_s": tokens / seconds,
        "peak_mem_gb": mem / 2**30,
        "s_per_step": seconds / args.steps,
    }


def flops_per_token(args) -> dict:
    """Matmul FLOPs per token of each variant's step (attention scores and norms ignored)."""
    from transformers import AutoConfig

    if args.tiny:
        model = build(args)
        cfg = model.config
    else:
        from cqil.pretrained import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(args.model))
    from cqil.plan import GroupPlan

    plan = GroupPlan.parse(args.groups if not args.tiny else "2-6:2", cfg.num_hidden_layers)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d, i = cfg.hidden_size, cfg.intermediate_size
    layer = d * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + 3 * d * i
    head = d * cfg.vocab_size
    n = cfg.num_hidden_layers
    first = plan.groups[0][0]
    grouped = sum(len(g) for g in plan.groups)
    after_first = n - first
    fwd = n * layer + head
    # Backward: activation gradients (1x) from the loss down to the first group, weight gradients (1x) of
    # the trained weights; x2 for multiply-add.
    ours = fwd + (after_first * layer + head) + (after_first * layer + head) + grouped * layer
    naive = fwd + fwd + (after_first * layer + head) + grouped * layer
    cqil = fwd + fwd + (n * layer + head)  # LoRA weight gradients are negligible
    return {k: 2 * v / 1e9 for k, v in {"ours": ours, "naive": naive, "cqil_style": cqil}.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--groups", default="14-26:2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--lm-weight", type=float, default=0.0, help="LM loss weight beside KD (default: KD only)"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child process: one variant, one JSON line
        print(json.dumps(measure(args, args.variant)))
        return

    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    flops = flops_per_token(args)
    for v in VARIANTS:
        r = results[v]
        print(
            f"{v:>10}: {r['tok_s']:9.1f} tok/s  {r['s_per_step']:7.3f} s/step  peak mem {r['peak_mem_gb']:6.2f} GB  "
            f"~{flops[v]:.3f} GFLOP/token",
            file=sys.stderr,
        )
    ours, naive, cqil = results["ours"], results["naive"], results["cqil_style"]
    summary = {
        "speedup_vs_naive": ours["tok_s"] / naive["tok_s"],
        "mem_ratio_vs_naive": ours["peak_mem_gb"] / naive["peak_mem_gb"],
        "speedup_vs_cqil_style": ours["tok_s"] / cqil["tok_s"],
        "mem_ratio_vs_cqil_style": ours["peak_mem_gb"] / cqil["peak_mem_gb"],
        "gflop_per_token": flops,
        "tok_s": {v: results[v]["tok_s"] for v in VARIANTS},
        "peak_mem_gb": {v: results[v]["peak_mem_gb"] for v in VARIANTS},
        "setup": {
            "model": "tiny-llama" if args.tiny else args.model,
            "groups": "2-6:2" if args.tiny else args.groups,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
