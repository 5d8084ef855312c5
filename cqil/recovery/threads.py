"""How many torch threads a training process uses on CPU.

``accelerate launch`` without a config exports ``OMP_NUM_THREADS=1`` to every process it starts
(unless told ``--cpu``), so a single-process CPU run would train on one core of many. A recipe can
name the count (``train.cpu_threads``); otherwise a count above 1 in ``OMP_NUM_THREADS`` is the
user's and is kept, and a count of 1 or none gives every core this process may run on, shared
among the node's processes. One thread is then asked for with ``train.cpu_threads: 1``, since
accelerate's default and a user's explicit 1 cannot be told apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cqil.errors import LaunchError


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def training_threads(
    requested: int | None, *, env: Mapping[str, str] = os.environ, cores: int | None = None
) -> int:
    """The thread count for one CPU training process: see the module docstring."""
    if requested is not None:
        return requested
    try:
        omp = int(env.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        omp = 0
    if omp > 1:
        return omp
    raw = env.get("LOCAL_WORLD_SIZE", "") or "1"
    try:
        local = max(int(raw), 1)
    except ValueError:
        # The launcher sets it; a value that is not a count means the environment is broken.
        raise LaunchError(f"LOCAL_WORLD_SIZE={raw!r} is not a process count") from None
    return max((cores if cores is not None else usable_cores()) // local, 1)
