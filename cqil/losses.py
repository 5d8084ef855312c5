"""Recovery losses: next-token cross-entropy, logit distillation and hidden-state matching.

All three take tensors shaped like a causal LM's outputs, (B, T, V) logits and (B, T, D) hidden
states, compute in float32 whatever the model's dtype, and return a scalar mean over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts token t + 1 of the same row."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of the softmax at ``temperature``, summed over the vocabulary and
    averaged over tokens, times T^2 (so that gradients keep their scale as T changes)."""
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1).flatten(0, -2)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * (t * t)


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over boundaries of the mean squared error between paired hidden states."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of states, got {len(student)} and {len(teacher)}")
    total = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True))
    return total / len(student)
