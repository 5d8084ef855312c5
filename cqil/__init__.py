"""cqil: recover LLMs whose middle layers were rewritten to run concurrently."""

from cqil.plan import GroupPlan
from cqil.surgery import parallelize, trainable_parameters

__all__ = ["GroupPlan", "parallelize", "trainable_parameters"]
__version__ = "0.1.0"
