"""cqil.recovery.losses against their definitions, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cqil.recovery.losses import head_losses, hidden_loss, kd_loss, lm_loss, local_loss


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


def test_local_loss_is_the_relative_error_of_each_update():
    torch.manual_seed(0)
    x = [torch.randn(2, 3, 4), 10 * torch.randn(2, 3, 4)]
    t = [x[0] + torch.randn(2, 3, 4), x[1] + 10 * torch.randn(2, 3, 4)]
    assert local_loss(t, t, x).item() == 0
    s = [ti + 0.1 * (ti - xi) for ti, xi in zip(t, x, strict=True)]  # 1 % of each update's energy off
    assert local_loss(s, t, x).item() == pytest.approx(0.01, rel=1e-5)
    # Weighed alike: the second group's ten-fold scale does not dominate.
    one = local_loss([s[0], t[1]], t, x).item()
    assert one == pytest.approx(0.005, rel=1e-5)
    manual = (
        sum(((si - ti) ** 2).mean() / ((ti - xi) ** 2).mean() for si, ti, xi in zip(s, t, x, strict=True)) / 2
    )
    assert local_loss(s, t, x).item() == pytest.approx(manual.item(), rel=1e-6)
    with pytest.raises(ValueError):
        local_loss(s, t, x[:1])


@pytest.mark.parametrize(
    ("kd", "lm", "temperature", "chunk"), [(1.0, 0.0, 1.0, 4), (0.0, 1.0, 1.0, 64), (0.7, 0.3, 2.0, 3)]
)
def test_head_losses_equal_the_losses_of_whole_batch_logits(kd, lm, temperature, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=True).requires_grad_(False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 8)
    ids = torch.randint(0, 13, (2, 5))
    logits = head(hidden)
    expected = {}
    if kd:
        expected["kd"] = kd_loss(logits, head(teacher), temperature)
    if lm:
        expected["lm"] = lm_loss(logits, ids)
    expected["loss"] = kd * expected.get("kd", 0) + lm * expected.get("lm", 0)
    (expected_grad,) = torch.autograd.grad(expected["loss"], hidden)

    got = head_losses(
        hidden, teacher, head, ids, kd=kd, lm=lm, kd_temperature=temperature, chunk_tokens=chunk
    )
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].detach())
    (grad,) = torch.autograd.grad(3.0 * got["loss"], hidden)  # the upstream gradient scales it
    torch.testing.assert_close(grad, 3.0 * expected_grad)
    assert all(not value.requires_grad for name, value in got.items() if name != "loss")


def test_head_losses_keep_the_dtype_and_refuse_a_trained_head():
    head = torch.nn.Linear(8, 13, bias=False).bfloat16().requires_grad_(False)
    hidden = torch.randn(1, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    out = head_losses(
        hidden, torch.randn(1, 4, 8, dtype=torch.bfloat16), head, torch.zeros(1, 4, dtype=torch.long)
    )
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    assert hidden.grad.dtype == torch.bfloat16
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen head"):
        head_losses(hidden, hidden, head, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher's hidden states"):
        head_losses(hidden, None, head.requires_grad_(False), torch.zeros(1, 4, dtype=torch.long))
