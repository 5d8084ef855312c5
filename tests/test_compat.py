"""The touchpoints of other libraries' private or renamed APIs: right for the installed versions, loud when gone."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import pytest
import torch
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from cqil import _compat
from cqil.rewrite.group import take_cache
from cqil.testing import make_model


def test_cache_argument_is_the_one_transformers_layers_take():
    params = inspect.signature(LlamaDecoderLayer.forward).parameters
    assert _compat.cache_argument() in params


def test_take_cache_accepts_either_spelling_and_refuses_two_caches():
    a, b = object(), object()
    for name in _compat.CACHE_NAMES:
        kwargs = {name: a, "other": 1}
        assert take_cache(kwargs) is a
        assert kwargs == {"other": 1}
    assert take_cache({"cache": a, "past_key_values": a}) is a
    with pytest.raises(ValueError, match="two different KV caches"):
        take_cache({"cache": a, "past_key_values": b})


def test_causal_lm_output_files_the_cache_where_generate_reads_it():
    cache = object()
    out = _compat.causal_lm_output(logits=torch.zeros(1), cache=cache)
    assert _compat.output_cache(out) is cache


def test_masks_and_rotary_embeddings_match_the_models_own():
    model = make_model("qwen2")  # full and sliding-window layers
    embeds = model.model.embed_tokens(torch.randint(0, 97, (1, 5)))
    positions = torch.arange(5)[None]
    masks = _compat.causal_masks(model.config, embeds, positions, ["full_attention", "sliding_attention"])
    assert set(masks) == {"full_attention", "sliding_attention"}
    cos, sin = _compat.rotary_embeddings(model.model, embeds, positions)
    ref_cos, ref_sin = model.model.rotary_emb(embeds, positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    with pytest.raises(ValueError, match="chunked_attention"):
        _compat.causal_masks(model.config, embeds, positions, ["chunked_attention"])


def test_a_missing_touchpoint_names_the_library_and_its_version(monkeypatch):
    monkeypatch.delattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref")
    with (
        pytest.raises(_compat.IncompatibleLibrary, match=f"transformers {version('transformers')}"),
        _compat.zero3_init_disabled(),
    ):
        pass
    base = torch.nn.Module()
    with pytest.raises(_compat.IncompatibleLibrary, match="rotary_emb"):
        _compat.rotary_embeddings(base, None, None)


def test_zero3_init_switch_restores_the_reference():
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    with _compat.zero3_init_disabled():
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is saved


def test_adapters_disabled_switches_lora_off_and_back_without_freezing():
    from peft import LoraConfig, get_peft_model

    model = make_model("llama")
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with _compat.adapters_disabled(peft_model):
            off = peft_model(ids).logits
        again = peft_model(ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, adapted)
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)


def test_set_last_lr_makes_a_schedule_moved_by_hand_report_what_stepping_reports():
    def schedule():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))

    stepped_optimizer, stepped = schedule()
    for _ in range(3):
        stepped_optimizer.step()
        stepped.step()
    optimizer, moved = schedule()
    moved.last_epoch = 3
    lrs = [base * fn(3) for base, fn in zip(moved.base_lrs, moved.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    assert moved.get_last_lr() != stepped.get_last_lr()  # torch records the rates only in step()
    _compat.set_last_lr(moved, lrs)
    assert moved.get_last_lr() == pytest.approx(stepped.get_last_lr())
    for opt, sched in ((optimizer, moved), (stepped_optimizer, stepped)):
        opt.step()
        sched.step()
    assert moved.get_last_lr() == pytest.approx(stepped.get_last_lr())
    # Why not record the rates with step(): before an optimizer step, torch warns the order is wrong.
    _, fresh = schedule()
    with pytest.warns(UserWarning, match="before `optimizer.step"):
        fresh.step()
    with pytest.raises(_compat.IncompatibleLibrary, match=re.escape(f"torch {version('torch')}")):
        _compat.set_last_lr(object(), lrs)
