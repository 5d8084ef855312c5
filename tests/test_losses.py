"""cqil.losses against their definitions, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cqil.losses import hidden_loss, kd_loss, lm_loss


def test_lm_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    logp = logits.log_softmax(-1)
    expected = -sum(logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)) / 8
    torch.testing.assert_close(lm_loss(logits, ids), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_is_kl_teacher_student_mean_over_tokens(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p = (t / temperature).softmax(-1)
    kl = (p * (p.log() - (s / temperature).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, temperature), kl * temperature**2)
    assert kd_loss(t, t, temperature).abs() < 1e-6


def test_kd_loss_upcasts_half_precision():
    s, t = torch.randn(1, 4, 50).bfloat16(), torch.randn(1, 4, 50).bfloat16()
    out = kd_loss(s, t)
    assert out.dtype == torch.float32 and math.isfinite(out.item())


def test_hidden_loss_is_mean_mse_over_boundaries():
    a, b = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3)], [torch.ones(1, 2, 3), torch.ones(1, 2, 3)]
    assert hidden_loss(a, b).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        hidden_loss(a, b[:1])
