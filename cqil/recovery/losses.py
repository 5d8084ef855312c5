"""Recovery losses: next-token cross-entropy, logit distillation, hidden-state and local matching.

All three take tensors shaped like a causal LM's outputs, (B, T, V) logits and (B, T, D) hidden
states, compute in float32 whatever the model's dtype, and return a scalar mean over tokens.
:func:`head_losses` computes the first two from the final hidden states and the LM head a chunk of
tokens at a time, so that a training step never holds the whole batch's logits.
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
    student, teacher = student_logits.float(), teacher_logits.float()
    if t != 1.0:  # a division by 1 would still copy the (tokens, vocab) logits
        student, teacher = student / t, teacher / t
    student = F.log_softmax(student, dim=-1).flatten(0, -2)
    teacher = F.log_softmax(teacher, dim=-1).flatten(0, -2)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * (t * t)


def hidden_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over boundaries of the mean squared error between paired hidden states."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of states, got {len(student)} and {len(teacher)}")
    total = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True))
    return total / len(student)


def local_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over groups of each group's relative error on its update, from the same input.

    For group ``g`` with input ``x`` (the original model's state there), ``student[g]`` is the group's
    output on ``x`` and ``teacher[g]`` the original layers' output on ``x``:
    ``||s - t||^2 / ||t - x||^2``. Dividing by the update's own energy weighs every group alike,
    whatever the scale of the residual stream at its depth (which grows several-fold through a model).
    """
    if not (len(student) == len(teacher) == len(inputs)) or not student:
        raise ValueError(
            f"need the same non-zero number of states, got {len(student)}, {len(teacher)} and {len(inputs)}"
        )
    total = 0.0
    for s, t, x in zip(student, teacher, inputs, strict=True):
        t = t.float()
        update = (t - x.float()).pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)
        total = total + F.mse_loss(s.float(), t) / update
    return total / len(student)


class _HeadLosses(torch.autograd.Function):
    """KD and LM losses from final hidden states through a frozen linear head, a chunk of tokens at a time.

    The forward pass also computes the gradient with respect to the student's hidden states (the
    softmax minus the targets, times the head's weight), so that no (tokens, vocab) tensor outlives
    its chunk: autograd would otherwise keep the logits, their log-softmax and their gradients of
    the whole batch at once. The backward pass only scales that stored gradient.
    """

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, bias, targets, kd, lm, temperature, chunk_tokens):
        n = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden)
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        lm_sum = hidden.new_zeros((), dtype=torch.float32)
        # d(T^2 KL / n)/d(logits) = T (softmax(s/T) - softmax(t/T)) / n;
        # d(mean CE)/d(logits) = (softmax(s) - onehot(target)) / count, on the rows that have a target.
        kd_scale = kd * temperature / n
        valid = targets >= 0
        lm_count = int(valid.sum())
        for start in range(0, n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            s_logp = p_teacher = None
            logits = F.linear(hidden[rows], weight, bias)
            logits_dtype = logits.dtype
            logits = logits.float()
            logp = logits.log_softmax(-1)  # the student's log-probabilities at T = 1
            scaled = logits.div_(temperature) if kd and temperature != 1.0 else None
            del logits  # at most three (tokens, vocab) buffers alive at once
            target = targets[rows].clamp(min=0)[:, None]
            lm_row = valid[rows, None] * (lm / max(lm_count, 1)) if lm else 0.0
            if lm:
                lm_sum -= logp.gather(1, target)[valid[rows, None]].sum()
            if kd:
                t_logp = F.linear(teacher_hidden[rows], weight, bias).float()
                if temperature != 1.0:
                    t_logp = t_logp.div_(temperature)
                t_logp = t_logp.log_softmax(-1)
                s_logp = logp if scaled is None else scaled.log_softmax(-1)
                del scaled
                p_teacher = t_logp.exp()
                kd_sum += t_logp.sub_(s_logp).mul_(p_teacher).sum()  # sum_v p_t (log p_t - log q_s)
                del t_logp
            # The gradient of the chunk's logits, up to a factor that is applied to the (tokens, hidden)
            # product instead (one pass less over the vocabulary).
            if not lm:
                grad, scale = s_logp.exp_().sub_(p_teacher), kd_scale
            elif not kd:
                grad = logp.exp_().scatter_add_(
                    1, target, torch.full(target.shape, -1.0, device=target.device)
                )
                scale = lm_row  # zero on the rows without a target
            else:
                if temperature != 1.0:
                    grad = s_logp.exp_().sub_(p_teacher).mul_(kd_scale).add_(logp.exp_().mul_(lm_row))
                else:  # one softmax serves both: (lm_row + kd_scale) q - kd_scale p_t - lm_row onehot
                    grad = logp.exp_().mul_(lm_row + kd_scale).sub_(p_teacher, alpha=kd_scale)
                grad, scale = grad.scatter_add_(1, target, -lm_row.to(grad.dtype)), 1.0
            if ctx.needs_input_grad[0]:
                grad_hidden[rows] = (grad.to(logits_dtype) @ weight.to(logits_dtype)) * scale
            # Free this chunk's buffers before the next chunk allocates its own.
            del grad, logp, s_logp, p_teacher
        ctx.save_for_backward(grad_hidden)
        kd_value = kd_sum * (temperature * temperature) / n
        lm_value = lm_sum / lm_count
        ctx.mark_non_differentiable(kd_value, lm_value)
        return kd * kd_value + lm * lm_value, kd_value, lm_value

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_lm):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_total).to(grad_hidden.dtype), *([None] * 8)


def head_losses(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    head: torch.nn.Linear,
    input_ids: torch.LongTensor,
    *,
    kd: float = 1.0,
    lm: float = 0.0,
    kd_temperature: float = 1.0,
    chunk_tokens: int = 128,
) -> dict[str, torch.Tensor]:
    """:func:`kd_loss` and :func:`lm_loss` of the logits ``head(hidden)`` (student) and ``head(teacher_hidden)``
    without ever holding the batch's logits: ``chunk_tokens`` tokens at a time.

    ``hidden`` and ``teacher_hidden`` are (B, T, D) final hidden states (after the final norm); ``head`` is
    a frozen ``nn.Linear``. Returns ``{"kd": ..., "lm": ..., "loss": kd * KD + lm * LM}`` with the keys
    of the non-zero weights and ``"loss"``; only ``"loss"`` carries a gradient (to ``hidden``).
    """
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        raise ValueError("head_losses needs a frozen head; train the head through its logits instead")
    if not kd and not lm:
        raise ValueError("head_losses needs a non-zero kd or lm weight")
    if kd and teacher_hidden is None:
        raise ValueError("the kd loss needs the teacher's hidden states")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -1)], dim=1).flatten()
    total, kd_value, lm_value = _HeadLosses.apply(
        hidden.flatten(0, 1),
        None if teacher_hidden is None else teacher_hidden.flatten(0, 1),
        head.weight,
        head.bias,
        targets,
        float(kd),
        float(lm),
        float(kd_temperature),
        int(chunk_tokens),
    )
    out = {}
    if kd:
        out["kd"] = kd_value
    if lm:
        out["lm"] = lm_value
    out["loss"] = total
    return out
