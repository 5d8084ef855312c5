"""RecoveryModel's optimized step against the straightforward computation: same losses, same gradients.

The reference is the naive step: the teacher as a separate full copy of the original model run from
the input ids, and the losses of ``cqil.recovery.losses`` on both models' whole-batch logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cqil.recovery.losses import hidden_loss, kd_loss, lm_loss, local_loss
from cqil.recovery.model import RecoveryModel
from cqil.rewrite.surgery import parallelize, trainable_parameters
from cqil.testing import make_model

GROUPS = [[2, 3], [5, 6]]  # not ending at the last layer, whose hidden state HF returns normed


def student_and_teachers(arch: str):
    """(parallelized student with only its groups trainable, full original copy, grouped-layer copies)."""
    model = make_model(arch)
    original = copy.deepcopy(model).requires_grad_(False)
    layers = {i: copy.deepcopy(model.model.layers[i]) for g in GROUPS for i in g}
    parallelize(model, GROUPS)
    model.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)
    return model, original, layers


def naive_losses(student, original, input_ids, *, kd, lm, hidden, temperature):
    """The losses the straightforward way: two full forwards, whole-batch logits."""
    out = student(input_ids, output_hidden_states=True)
    with torch.no_grad():
        ref = original(input_ids, output_hidden_states=True)
    losses = {}
    if kd:
        losses["kd"] = kd_loss(out.logits, ref.logits, temperature)
    if lm:
        losses["lm"] = lm_loss(out.logits, input_ids)
    if hidden:
        # Group outputs: effective layers 2 and 4 of the student, original layers 3 and 6 (hidden_states[0]
        # is the embedding output).
        losses["hidden"] = hidden_loss(
            [out.hidden_states[3], out.hidden_states[5]], [ref.hidden_states[4], ref.hidden_states[7]]
        )
    weights = {"kd": kd, "lm": lm, "hidden": hidden}
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def grads_of(loss, params: dict) -> dict:
    loss.backward()
    out = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(
    ("kd", "lm", "hidden", "temperature", "chunk"),
    [(1.0, 0.0, 0.0, 1.0, 64), (1.0, 0.0, 0.0, 1.0, 7), (0.0, 1.0, 0.0, 1.0, 5), (1.0, 0.5, 0.3, 2.0, 9)],
)
def test_optimized_step_equals_the_naive_one(arch, kd, lm, hidden, temperature, chunk, input_ids):
    student, original, layers = student_and_teachers(arch)
    params = trainable_parameters(student)
    rm = RecoveryModel(student, layers, kd=kd, lm=lm, hidden=hidden, kd_temperature=temperature).train()
    rm.loss_chunk_tokens = chunk
    assert rm.fused_head_losses and rm._head_is_fusable()

    expected = naive_losses(
        student, original, input_ids, kd=kd, lm=lm, hidden=hidden, temperature=temperature
    )
    expected_grads = grads_of(expected["loss"], params)
    got = rm(input_ids)
    got_grads = grads_of(got["loss"], params)

    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].detach(), msg=name)
    for name in params:
        torch.testing.assert_close(got_grads[name], expected_grads[name], msg=name)
    # Only the groups learn: the rest of the student and the teacher's copies get no gradient.
    assert all(p.grad is None for p in rm.parameters())
    assert any(g.abs().max() > 0 for g in got_grads.values())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_local_step_runs_each_group_on_the_original_models_state(arch, input_ids):
    """local_only: each group's output on the original's state at its input, against the original layers'
    output there, and gradients to the groups alone; the same term as a weighted part of a full step."""
    student, original, layers = student_and_teachers(arch)
    params = trainable_parameters(student)
    with torch.no_grad():
        ref = original(input_ids, output_hidden_states=True).hidden_states  # [i]: the input of layer i
    position_ids = torch.arange(input_ids.shape[1])[None]
    rm = RecoveryModel(student, layers, kd=1.0, local=0.5).train()
    masks = rm._masks(ref[0], position_ids)
    ctx = {
        "position_embeddings": student.model.rotary_emb(ref[0], position_ids),
        "position_ids": position_ids,
    }
    # Groups [2, 3] and [5, 6] sit at effective layers 2 and 4.
    outs = [
        rm._run(student.model.layers[e], ref[g[0]], masks["full_attention"], ctx)
        for e, g in [(2, GROUPS[0]), (4, GROUPS[1])]
    ]
    expected = local_loss(outs, [ref[4], ref[7]], [ref[2], ref[5]])
    expected_grads = grads_of(expected, params)

    got = rm(input_ids, local_only=True)
    assert set(got) == {"local", "loss"}
    torch.testing.assert_close(got["loss"], expected.detach())
    got_grads = grads_of(got["loss"], params)
    for name in params:
        torch.testing.assert_close(got_grads[name], expected_grads[name], msg=name)
    assert all(p.grad is None for p in rm.parameters())
    assert all(g.abs().max() > 0 for g in got_grads.values())  # every group and gate learns

    # A local phase before a loss that reads no teacher (plain LM) is the same step.
    lm_only = RecoveryModel(student, layers, kd=0.0, lm=1.0).train()
    torch.testing.assert_close(lm_only(input_ids, local_only=True)["loss"], expected.detach())
    with pytest.raises(ValueError, match="teacher's copies"):
        RecoveryModel(student, None, kd=0.0, lm=1.0)(input_ids, local_only=True)

    mixed = rm(input_ids)
    torch.testing.assert_close(mixed["local"], expected.detach())
    torch.testing.assert_close(mixed["loss"], mixed["kd"] + 0.5 * mixed["local"])


def test_unfused_path_is_the_same_step(input_ids):
    student, _, layers = student_and_teachers("llama")
    params = trainable_parameters(student)
    rm = RecoveryModel(student, layers, kd=1.0, lm=0.5).train()
    fused = rm(input_ids)
    fused_grads = grads_of(fused["loss"], params)
    rm.fused_head_losses = False
    plain = rm(input_ids)
    plain_grads = grads_of(plain["loss"], params)
    for name in ("loss", "kd", "lm"):
        torch.testing.assert_close(fused[name], plain[name].detach())
    for name in params:
        torch.testing.assert_close(fused_grads[name], plain_grads[name])


def test_no_vocabulary_sized_tensor_is_kept_for_backward(input_ids):
    """The fused losses keep no (tokens, vocab) tensor for backward; the teacher keeps nothing at all."""
    student, _, layers = student_and_teachers("llama")
    rm = RecoveryModel(student, layers, kd=1.0, lm=1.0).train()
    vocab = student.config.vocab_size

    def saved_shapes():
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = rm(input_ids)
        return shapes, out

    fused_shapes, out = saved_shapes()
    out["loss"].backward()
    assert fused_shapes and not [s for s in fused_shapes if s and s[-1] == vocab]
    rm.fused_head_losses = False
    plain_shapes, _ = saved_shapes()
    assert [s for s in plain_shapes if s and s[-1] == vocab]  # the check can fail
    # The teacher runs under no_grad: without any trainable weight nothing is saved at all.
    student.requires_grad_(False)
    rm.fused_head_losses = True
    assert saved_shapes()[0] == []


def test_falls_back_to_logits_when_the_head_cannot_be_read_directly(input_ids):
    student, _, layers = student_and_teachers("llama")
    rm = RecoveryModel(student, layers, kd=1.0).train()
    assert rm._head_is_fusable()
    handle = student.lm_head.register_forward_pre_hook(lambda module, args: None)
    assert not rm._head_is_fusable()  # hooks may gather or move the weight (ZeRO-3, offload)
    handle.remove()
    student.lm_head.weight.requires_grad_(True)  # tied with the embeddings here
    assert not rm._head_is_fusable()
    out = rm(input_ids)
    out["loss"].backward()
    assert student.lm_head.weight.grad is not None
