"""The plan search's latency model: measured per-layer times and a plan's estimated time.

The original layers' times and the rest of a forward pass (embeddings, final norm, LM head) are
measured once on one calibration batch (:func:`measure_layer_times`); a plan's time is the rest
plus, for every effective layer, the time of its slowest original layer (:func:`plan_time_ms`): a
group's branches run concurrently (one rank or stream per branch, as
:mod:`cqil.serving.concurrent` runs them) and communication is free. So it estimates prefill
latency at the calibration batch shape, and is an upper bound on what a real concurrent run gains.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from cqil.rewrite.group import effective_layers
from cqil.selection.plans import Groups


@torch.inference_mode()
def measure_layer_times(model: nn.Module, ids: torch.LongTensor, *, reps: int = 3) -> dict:
    """Per-layer forward times (ms, median of ``reps`` after one warm-up) on one batch ``ids``.

    Returns ``{"layers_ms": [...], "other_ms": embeddings + final norm + LM head, "total_ms",
    "batch": [B, T]}``. Forward hooks time each decoder layer (synchronizing a GPU around it).
    """
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    layers = list(model.model.layers)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    starts: dict[int, float] = {}
    times: list[list[float]] = [[] for _ in layers]
    totals: list[float] = []

    def before(i):
        def hook(module, args):
            sync()
            starts[i] = time.perf_counter()

        return hook

    def after(i):
        def hook(module, args, output):
            sync()
            times[i].append((time.perf_counter() - starts[i]) * 1e3)

        return hook

    was_training = model.training
    model.eval()
    model(input_ids=ids, use_cache=False)  # warm-up: allocator, kernels
    handles = [layer.register_forward_pre_hook(before(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    try:
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            totals.append((time.perf_counter() - start) * 1e3)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers_ms = [statistics.median(t) for t in times]
    total = statistics.median(totals)
    return {
        "layers_ms": layers_ms,
        "other_ms": max(total - sum(layers_ms), 0.0),
        "total_ms": total,
        "batch": list(ids.shape),
    }


def plan_time_ms(groups: Groups, latency: dict) -> float:
    """The latency model: the rest of the model plus each effective layer's slowest original layer."""
    t = latency["layers_ms"]
    return latency["other_ms"] + sum(max(t[i] for i in e) for e in effective_layers(groups, len(t)))


def estimate_speedup(groups: Groups, latency: dict) -> float:
    return plan_time_ms((), latency) / plan_time_ms(groups, latency)


def fastest_times(windows: list[tuple[int, ...]], latency: dict) -> list[float]:
    """Least plan time (ms) with exactly k groups drawn from ``windows``, for k = 0, 1, ... (inf: none)."""
    t = latency["layers_ms"]
    n = len(t)
    cost = {w[0]: (len(w), max(t[i] for i in w)) for w in windows}
    kmax = n
    inf = math.inf
    # best[i][k]: least time of layers i.. with exactly k groups among them.
    best = [[inf] * (kmax + 1) for _ in range(n + 1)]
    best[n][0] = 0.0
    for i in range(n - 1, -1, -1):
        for k in range(kmax + 1):
            value = t[i] + best[i + 1][k]
            if k and i in cost:
                size, c = cost[i]
                if i + size <= n:
                    value = min(value, c + best[i + size][k - 1])
            best[i][k] = value
    return [latency["other_ms"] + b for b in best[0]]
