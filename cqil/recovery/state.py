"""What the parts of a recovery run share below the trainer: how far the run has come, and the
processes it runs on, as the parts use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class RunState:
    """The counters of a run: what a checkpoint records and a resume restores besides the tensors."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens over all processes
    # The largest |w| of the trainable weights when training started: the scale against which
    # "exploded" is measured (cqil.recovery.checkpoint.EXPLODED_FACTOR), kept across resumes.
    start_max_abs: float = 0.0


class Processes(Protocol):
    """The processes of a run; accelerate's ``Accelerator`` and ``PartialState`` both are one."""

    @property
    def is_main_process(self) -> bool: ...

    @property
    def process_index(self) -> int: ...

    @property
    def num_processes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def wait_for_everyone(self) -> None: ...
