"""The progress of a training run: the run's log, one line per window of steps, peak memory, tracker config.

Every part of a run logs through a :data:`Log`, a function of one line; the trainer hands each part
one that prints on the main process only (:func:`log`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

Log = Callable[[str], None]


def log(line: str, *, main: bool = True, bar=None) -> None:
    """One line on stderr, from the main process only (``main``), through tqdm while a ``bar`` shows."""
    if not main:
        return
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


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


class TrainingProgress:
    """What the training loop reports, step by step: ``logs/metrics.jsonl`` (one line per step, flushed,
    for the report's loss curves; ``metrics_path`` None on all but the main process), a tqdm bar when
    ``bar`` (stderr is a terminal), and every ``log_every_steps`` steps and at the last one
    :func:`step_line` of the window's means. :meth:`close` ends both, whichever way the loop ends."""

    def __init__(
        self,
        *,
        max_steps: int,
        start_step: int,
        log_every_steps: int,
        log: Log,
        metrics_path: Path | None = None,
        bar: bool = False,
    ) -> None:
        self.max_steps, self.start_step, self.log_every_steps, self.log = (
            max_steps,
            start_step,
            log_every_steps,
            log,
        )
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.start = self.window_start = time.time()
        self.window_tokens = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path else None  # noqa: SIM115

    def step(
        self, step: int, values: dict[str, float], *, lr: float, tokens: int, tokens_seen: int
    ) -> dict | None:
        """Record optimizer step ``step`` (its reduced losses ``values``, ``tokens`` trained in it,
        ``tokens_seen`` in all); at the end of a window, log its line and return its values for the
        trackers (``train/<loss>``, ``train/lr``, ``train/tok_s``), else None."""
        self.window_tokens += tokens
        for k, v in values.items():  # a key may be missing from part of a window (local_steps)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **values, "lr": lr, "tokens": tokens_seen}) + "\n")
            self.metrics.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}")
        if step % self.log_every_steps != 0 and step != self.max_steps:
            return None
        means = {k: s / self.counts[k] for k, s in self.sums.items()}
        self.sums, self.counts = {}, {}
        now = time.time()
        tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        elapsed = now - self.start
        eta = elapsed / max(step - self.start_step, 1) * (self.max_steps - step)
        line = step_line(step, self.max_steps, means, lr, tok_s, elapsed, eta)
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self.log(line)
        return {f"train/{k}": v for k, v in means.items()} | {"train/lr": lr, "train/tok_s": tok_s}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
