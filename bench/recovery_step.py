"""One recovery training step three ways, on the same model, plan and batch: tokens/s and peak memory.

* ``ours``: :class:`cqil.recovery.model.RecoveryModel` as the trainer runs it: the teacher's own weights are
  the grouped region's original layers only, the layers before the first group run once for both,
  the teacher runs under no_grad, and the KD loss comes straight from the final hidden states a
  chunk of tokens at a time (:func:`cqil.recovery.losses.head_losses`);
* ``naive``: the same losses the straightforward way: the teacher is a separate full copy of the
  original model run from the input ids under no_grad (no shared prefix, no shared weights), and
  :func:`cqil.recovery.losses.kd_loss` reads both models' whole-batch logits;
* ``cqil_style``: the CQIL paper's recovery as ``recipes/cqil_style.yaml`` runs it in this trainer:
  LoRA r=32 on every linear layer of every layer, the teacher is the whole model with the adapters
  (and the rewrite) switched off, one full forward each plus backward through the whole depth. The
  merged groups fuse the original weights, so the teacher keeps its copy of the grouped layers here
  too (the paper's code runs the unfused layers and needs none).

``--variants`` also accepts ``ours_unfused`` (``ours`` with the losses computed from whole-batch logits)
to separate the gain of the shared teacher from that of the chunked losses, and ``ours_bf16`` (``ours``
under bf16 autocast, as ``train.mixed_precision: bf16`` runs it; on a CPU with AMX or AVX512-BF16 its
matmuls take the bf16 units).

Fairness: every variant starts from the same weights and trains on the same batch with the same
optimizer (AdamW over its trainable parameters, as the trainer builds it) and the same number of
threads: one by default, because on a shared CPU every parallel region of a multi-threaded step
waits for its slowest thread, which penalizes the variant with more operations (``naive``) beyond
its share of the load; pass ``--threads`` to use more on a quiet machine. Each variant lives in its
own process, so that its memory is its own; all processes are built and warmed up first, then take
one timed step at a time in turn (the order rotating every round), so that drifting load on a shared
machine hits all of them alike. A speedup is the ratio of the median step times, the medians the tokens/s
come from (the best step is reported too). Peak memory is
the highest over rounds of the process's peak resident set size (``VmHWM``, reset before each step;
on CUDA the allocator's peak). ``ours`` and ``naive`` compute the same losses: their first losses
(same weights, same batch) must agree to float32 rounding; later steps drift apart slowly, as Adam
amplifies rounding differences in the gradients. An analytic count of each step's matmul FLOPs per
token is printed beside the measurements.

    python bench/recovery_step.py                  # smollm2-135m, "14-26:2", 2 x 128 tokens (~2 min on CPU)
    python bench/recovery_step.py --threads 2      # all cores of this machine, when nothing else runs
    python bench/recovery_step.py --model tiny     # a tiny random Llama (seconds)

The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
from _common import Timer, emit, median, ratio_of_medians

VARIANTS = ("ours", "naive", "cqil_style")
EXTRA_VARIANTS = ("ours_unfused", "ours_bf16")
DEFAULT_GROUPS = {"tiny": "2-6:2"}


# ------------------------------------------------------------------------------------------ worker
def build(args):
    """The benchmarked model, loaded fresh, in training mode."""
    if args.model == "tiny":
        from cqil.testing import build_tiny

        return build_tiny().train()
    from cqil.pretrained import load_model

    model, _ = load_model(args.model, dtype=args.dtype)
    return model.train()


def make_step(args, variant, device="cpu"):
    """(model, step, modules): ``step(input_ids)`` runs forward, backward and the optimizer and returns the
    loss; ``modules`` are all the step runs.

    Everything the step runs is on ``device``: the student, and the teacher (the ``RecoveryModel``'s
    copies of the grouped layers, or ``naive``'s whole copy), as the trainer's ``accelerator.prepare``
    of the whole ``RecoveryModel`` places them."""
    from cqil.recovery.lora import apply_lora
    from cqil.recovery.losses import kd_loss, lm_loss
    from cqil.recovery.model import RecoveryModel
    from cqil.recovery.recipe import LoraConfig
    from cqil.rewrite.plan import GroupPlan
    from cqil.rewrite.surgery import parallelize, trainable_parameters

    torch.manual_seed(0)
    model = build(args)
    plan = GroupPlan.parse(args.groups, model.config.num_hidden_layers)
    teacher_model = teacher_layers = None
    if variant == "naive":
        teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        teacher_layers = {i: copy.deepcopy(model.model.layers[i]) for g in plan.groups for i in g}
    parallelize(model, plan, bypass="none" if variant == "cqil_style" else "lp")
    model.requires_grad_(False)
    if variant == "cqil_style":
        apply_lora(model, LoraConfig(r=32, alpha=32), target="all")
        params = [p for n, p in model.named_parameters() if "lora_" in n]
    else:
        params = list(trainable_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    model.to(device)  # in place: the parameters keep their identity, so ``params`` follow

    if variant == "naive":
        teacher_model.to(device)

        def loss_fn(ids):
            logits = model(ids).logits
            with torch.no_grad():
                teacher = teacher_model(ids).logits
            loss = kd_loss(logits, teacher)
            return loss + args.lm_weight * lm_loss(logits, ids) if args.lm_weight else loss
    else:
        rm = RecoveryModel(model, teacher_layers, kd=1.0, lm=args.lm_weight).to(device).train()
        rm.adapters_outside_groups = variant == "cqil_style"
        rm.fused_head_losses = variant != "ours_unfused"

        def loss_fn(ids):
            if variant != "ours_bf16":
                return rm(ids)["loss"]
            with torch.autocast(torch.device(device).type, torch.bfloat16):  # as accelerate wraps forward
                return rm(ids)["loss"]

    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)  # as RecoveryTrainer builds it

    def step(ids):
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step, [model, teacher_model if variant == "naive" else rm]


def _status_gb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


class PeakMemory:
    """The peak memory of a region: CUDA allocator peak, else peak RSS (exact ``VmHWM`` or sampled)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.exact = device != "cuda" and os.access("/proc/self/clear_refs", os.W_OK)

    def __enter__(self):
        self.peak = 0.0
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        else:  # no clear_refs: sample the RSS
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_gb("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**30
        elif self.exact:
            self.peak = _status_gb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _status_gb("VmRSS"))


def worker(args) -> None:
    """One variant: build, warm up, then one timed step per ``step`` line on stdin, one JSON line each."""
    import peft  # noqa: F401  (imported here so that the runtime's memory below counts it)

    import cqil.recovery.trainer  # noqa: F401

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime_gb = _status_gb("VmRSS") if device == "cpu" else 0.0  # the libraries, no model yet
    model, step, _ = make_step(args, args.worker, device)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    loss = step(batch)  # warm-up: allocator, kernels, optimizer state
    print(json.dumps({"ready": True, "loss": loss, "runtime_gb": runtime_gb}), flush=True)
    timer, losses = Timer(device), []

    def run():
        losses.append(step(batch))

    for line in sys.stdin:
        if line.strip() != "step":
            break
        with PeakMemory(device) as mem:
            seconds = timer(run)
        print(json.dumps({"seconds": seconds, "peak_gb": mem.peak, "loss": losses[-1]}), flush=True)


# ------------------------------------------------------------------------------------------ driver
class Worker:
    def __init__(self, argv: list[str], variant: str) -> None:
        self.variant = variant
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (the worker's stderr; closed in close())
        cmd = [
            sys.executable,
            *(["-P"] if sys.flags.safe_path else []),
            os.path.abspath(__file__),
            *argv,
            "--worker",
            variant,
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            sys.exit(f"{self.variant} failed (exit {self.proc.returncode}):\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        return self.reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def flops_per_token(args) -> dict:
    """Matmul GFLOP per token of each variant's step, by part (attention scores and norms ignored)."""
    from transformers import AutoConfig

    from cqil.rewrite.plan import GroupPlan

    if args.model == "tiny":
        cfg = build(args).config
    else:
        from cqil.pretrained import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(args.model))
    plan = GroupPlan.parse(args.groups, cfg.num_hidden_layers)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d, inter = cfg.hidden_size, cfg.intermediate_size
    layer = d * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) + 3 * d * inter
    head = d * cfg.vocab_size
    n, first = cfg.num_hidden_layers, plan.groups[0][0]
    grouped = sum(len(g) for g in plan.groups)
    full = n * layer + head  # one forward of the whole model (a merged group costs its P layers)
    # Backward: activation gradients from the loss down to the first group's input (1x forward), and
    # weight gradients of the trained weights (1x); LoRA's are negligible but it backpropagates to the
    # first layer. Multiply-adds count 2.
    parts = {
        "ours": {
            "student_forward": full,
            "teacher_forward": (n - first) * layer + head,
            "backward": ((n - first) * layer + head) + grouped * layer,
        },
        "naive": {"student_forward": full, "teacher_forward": full},
        "cqil_style": {"student_forward": full, "teacher_forward": full, "backward": n * layer + head},
    }
    parts["naive"]["backward"] = parts["ours"]["backward"]
    parts["ours_unfused"] = parts["ours_bf16"] = parts["ours"]
    out = {v: {k: 2 * x / 1e9 for k, x in p.items()} for v, p in parts.items()}
    for v in out:
        out[v]["total"] = sum(out[v].values())
    out["lm_head_per_pass"] = 2 * head / 1e9
    out["layer_per_pass"] = 2 * layer / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="'tiny', an embedded name or a HF folder")
    ap.add_argument("--tiny", action="store_true", help="same as --model tiny")
    ap.add_argument("--groups", help='plan spec (default: "14-26:2"; "2-6:2" for tiny)')
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=7, help="timed steps (rounds) per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: see above)")
    ap.add_argument(
        "--lm-weight", type=float, default=0.0, help="LM loss weight beside KD (default: KD only)"
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS + EXTRA_VARIANTS)} (ours, naive, cqil_style needed "
        "for the ratios)",
    )
    ap.add_argument("--worker", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.model = "tiny"
    args.groups = args.groups or DEFAULT_GROUPS.get(args.model, "14-26:2")
    if args.worker:
        worker(args)
        return

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS + EXTRA_VARIANTS))
    if unknown or not set(VARIANTS) <= set(variants):
        sys.exit(f"--variants must list {', '.join(VARIANTS)} (and optionally {', '.join(EXTRA_VARIANTS)})")
    argv = [
        "--model", args.model, "--groups", args.groups, "--dtype", args.dtype, "--batch", str(args.batch),
        "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--lm-weight", str(args.lm_weight),
    ]  # fmt: skip
    workers, ready = {}, {}
    for v in variants:  # one at a time, so that building does not compete with anything
        workers[v] = Worker(argv, v)
        ready[v] = workers[v].reply()
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.steps):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            rounds[v].append(workers[v].step())
    for w in workers.values():
        w.close()

    # ours and naive train the same weights on the same batch with the same losses: same values.
    def losses(v):
        return [ready[v]["loss"]] + [x["loss"] for x in rounds[v]]

    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses("ours"), losses("naive"), strict=True)]

    results = {}
    for v in variants:
        seconds = [x["seconds"] for x in rounds[v]]
        peak = max(x["peak_gb"] for x in rounds[v])
        results[v] = {
            "tok_s": args.batch * args.seq_len / median(seconds),
            "s_per_step": median(seconds),
            "s_per_step_best": min(seconds),
            "s_per_step_rounds": [round(x, 4) for x in seconds],
            "peak_mem_gb": peak,
            "peak_mem_above_runtime_gb": peak - ready[v]["runtime_gb"],
        }
    flops = flops_per_token(args)
    for v in variants:
        r = results[v]
        print(
            f"{v:>12}: {r['tok_s']:8.1f} tok/s  {r['s_per_step']:6.3f} s/step"
            f" (best {r['s_per_step_best']:.3f})"
            f"  peak mem {r['peak_mem_gb']:5.2f} GB ({r['peak_mem_above_runtime_gb']:.2f} above the runtime)"
            f"  ~{flops[v]['total']:.3f} GFLOP/token",
            file=sys.stderr,
        )
    ours, naive, cqil = results["ours"], results["naive"], results["cqil_style"]

    def speedup(other: str) -> float:  # from the same medians as the tokens/s
        return ratio_of_medians([x["seconds"] for x in rounds[other]], [x["seconds"] for x in rounds["ours"]])

    summary = {
        "speedup_vs_naive": speedup("naive"),
        "mem_ratio_vs_naive": ours["peak_mem_gb"] / naive["peak_mem_gb"],
        "speedup_vs_cqil_style": speedup("cqil_style"),
        "mem_ratio_vs_cqil_style": ours["peak_mem_gb"] / cqil["peak_mem_gb"],
        "mem_ratio_vs_naive_above_runtime": ours["peak_mem_above_runtime_gb"]
        / naive["peak_mem_above_runtime_gb"],
        "flop_ratio_naive_over_ours": flops["naive"]["total"] / flops["ours"]["total"],
        "same_losses_ours_naive": gaps[0] < 1e-5,
        "rel_loss_gap_ours_naive": {"first_step": gaps[0], "max_over_steps": max(gaps)},
        "gflop_per_token": flops,
        "runtime_mem_gb": ready["ours"]["runtime_gb"],
        **{key: {v: results[v][key] for v in variants} for key in next(iter(results.values()))},
        "setup": {
            "model": args.model,
            "groups": args.groups,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "threads": args.threads,
            "lm_weight": args.lm_weight,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "memory": "peak RSS (VmHWM) per step" if PeakMemory("cpu").exact else "sampled RSS",
        },
    }
    if "ours_bf16" in variants:  # its first loss is before any update: how far bf16's rounding moves it
        summary["speedup_bf16"] = 1 / speedup("ours_bf16")  # bf16's over float32's
        summary["rel_loss_gap_bf16_first_step"] = (
            abs(ready["ours_bf16"]["loss"] - ready["ours"]["loss"]) / ready["ours"]["loss"]
        )
    if torch.cuda.is_available():
        summary["setup"]["memory"] = "torch.cuda.max_memory_allocated per step"
    emit(summary)


if __name__ == "__main__":
    main()
