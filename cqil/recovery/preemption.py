"""Preemption of a recovery run: SIGTERM or SIGUSR1, what schedulers such as Slurm send before they
stop a job, asks the run to checkpoint at the next step and exit (the trainer's ``EXIT_PREEMPTED``)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch


class StopSignals:
    """While installed, SIGTERM and SIGUSR1 are recorded (:attr:`received`) instead of ending the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        def handler(signum, frame):
            self.received = signum

        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)

    def agreed(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], device) -> bool:
        """Whether any process received one (``reduce_sum``: the sum over processes, a collective every
        process calls). Every rank must agree, or one would wait forever in the checkpoint's collectives."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        flag = reduce_sum(flag)
        if flag.item() > 0 and self.received is None:
            self.received = signal.SIGTERM
        return flag.item() > 0

    def restore(self) -> None:
        """The handlers as they were before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
