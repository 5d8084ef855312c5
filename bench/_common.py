"""What the benchmark scripts share: timing, interleaving, ratios and JSON lines.

Timing and interleaving are the library's own (:mod:`cqil.evaluation.latency`): a benchmark and a
run's report time models with the same code, so their figures can be set side by side. A ratio is
always one of medians (``ratio_of_medians``), the same medians its times and tokens/s are printed
from. Every script prints one JSON object per line (``emit``), which ``--out`` files append to.

Import it from a script in bench/ as ``from _common import ...`` (the script's folder is on the path).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from cqil.evaluation.latency import (  # noqa: F401  (re-exported for the scripts)
    Timer,
    available_modes,
    interleave,
    measure_latency,
    share_of_ideal,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


class Stopwatch:
    """Wall-clock seconds since creation (or the last ``lap``), for a script's phases."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = time.perf_counter()
        seconds, self.mark = now - self.mark, now
        return seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio_of_medians(baseline: Sequence[float], other: Sequence[float]) -> float:
    """The baseline's median over the other's: a speedup when both are times, from the printed medians."""
    return statistics.median(baseline) / statistics.median(other)


def rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15-minute load, to judge a figure measured on a shared machine."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment(device: str | None = None) -> dict:
    """The versions and the device a figure was measured with, as one JSON-able dict."""
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    if device is not None:
        env["device"] = str(device)
        if str(device).startswith("cuda"):
            env["gpu"] = torch.cuda.get_device_name()
    return env


def emit(line: Mapping, out: str | os.PathLike | None = None) -> dict:
    """Print ``line`` as one JSON line on stdout and, with ``out``, append it to that file.

    The line is appended with a single write, so concurrent writers never interleave within one."""
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    return dict(line)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank or torn lines skipped)."""
    rows = []
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(text))
        except ValueError:
            continue
    return rows


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    left: int | Collection[int] = 1,
    rule: bool = True,
) -> str:
    """A plain-text table: the columns in ``left`` (or the first ``left`` ones) left-aligned, the rest
    right-aligned; ``rule`` draws a line under the header."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    cells = [[str(c) for c in header]] + [[("–" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(
            c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    ruler = ["  ".join("-" * w for w in widths)] if rule else []
    return "\n".join([line(cells[0]), *ruler, *map(line, cells[1:])])


def ratio_cell(x: float | None) -> str:
    """A speedup for a table: below 1 it says slower."""
    if x is None:
        return "–"
    return f"{x:.3f}x" + (" (slower)" if x < 1 else "")


def share_cell(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"
