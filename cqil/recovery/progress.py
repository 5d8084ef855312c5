"""The progress of a training run: one log line per window of steps, peak memory, tracker config."""

from __future__ import annotations

import json
import resource

import torch


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def step_line(
    step: int, max_steps: int, means: dict, lr: float, tok_s: float, elapsed: float, eta: float
) -> str:
    """``step 3/6 | loss ... | lr ... | tok/s | peak mem | elapsed, ETA``: the log line of a window of steps."""
    parts = " ".join(f"{k} {means[k]:.4f}" for k in ["loss"] + [k for k in means if k != "loss"])
    return (
        f"step {step:>{len(str(max_steps))}}/{max_steps} | {parts} | lr {lr:.2e} | "
        f"{tok_s:,.0f} tok/s | peak mem {peak_memory_gb():.2f} GB | "
        f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}"
    )
