"""Depth coalesce / de-coalesce / interpolate (cqil.rewrite.coalescing) on tiny models of every architecture."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import cqil
from cqil.rewrite.coalescing import coalesce, decoalesce, interpolate
from cqil.testing import VOCAB, make_model

PLAN = [[1, 2, 3], [4, 5]]  # a triple and a pair; layers 0, 6, 7 stay as they are
SINGLETONS = [[i] for i in range(8)]


def state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


# ------------------------------------------------------------------ coalesce


def test_coalesced_layers_are_group_means(arch):
    model = make_model(arch)
    before = state(model)
    small = coalesce(model, PLAN)
    assert_same_state(state(model), before)  # the input is untouched
    assert type(small) is type(model) and len(small.model.layers) == 5
    deep, new = model.model.layers, small.model.layers
    for k, group in enumerate([(0,), (1, 2, 3), (4, 5), (6,), (7,)]):
        merged = new[k].state_dict()
        sources = [deep[i].state_dict() for i in group]
        assert merged.keys() == sources[0].keys()
        for name, value in merged.items():
            expected = torch.stack([s[name] for s in sources]).mean(dim=0)
            assert torch.equal(value, expected), (k, name)
    # Outside the layers nothing changed.
    for name, value in small.state_dict().items():
        if not name.startswith("model.layers."):
            assert torch.equal(value, before[name]), name


def test_coalesced_pair_is_the_manual_mean(arch):
    model = make_model(arch)
    small = coalesce(model, [[2, 3]])
    a, b, m = model.model.layers[2], model.model.layers[3], small.model.layers[2]
    pairs = [
        (m.self_attn.q_proj.weight, a.self_attn.q_proj.weight, b.self_attn.q_proj.weight),
        (m.self_attn.o_proj.weight, a.self_attn.o_proj.weight, b.self_attn.o_proj.weight),
        (m.mlp.down_proj.weight, a.mlp.down_proj.weight, b.mlp.down_proj.weight),
        (m.input_layernorm.weight, a.input_layernorm.weight, b.input_layernorm.weight),
        (
            m.post_attention_layernorm.weight,
            a.post_attention_layernorm.weight,
            b.post_attention_layernorm.weight,
        ),
    ]
    if arch in ("llama", "qwen2"):
        pairs.append((m.self_attn.k_proj.bias, a.self_attn.k_proj.bias, b.self_attn.k_proj.bias))
    if arch == "qwen3":
        pairs.append((m.self_attn.q_norm.weight, a.self_attn.q_norm.weight, b.self_attn.q_norm.weight))
    for merged, x, y in pairs:
        assert torch.equal(merged, (x + y) / 2)
    # Two different layers really were averaged into something new.
    assert not torch.equal(m.self_attn.q_proj.weight, a.self_attn.q_proj.weight)


def test_config_depth_layer_types_and_parameter_counts(arch):
    model = make_model(arch)
    small = coalesce(model, PLAN)
    cfg = small.config
    assert cfg.num_hidden_layers == 5 and model.config.num_hidden_layers == 8
    assert cfg.cqil_coalesced == {"plan": {"groups": PLAN, "num_layers": 8}, "num_hidden_layers_original": 8}
    assert not hasattr(model.config, "cqil_coalesced")
    if getattr(model.config, "layer_types", None):
        deep = model.config.layer_types
        assert cfg.layer_types == [deep[0], deep[1], deep[4], deep[6], deep[7]]
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert num_params(small) == num_params(model) - 3 * per_layer
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2, 3, 4]
    assert all(layer.self_attn.config is cfg for layer in small.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(8))
    back = decoalesce(small, PLAN, like=model)
    assert back.config.num_hidden_layers == 8 and num_params(back) == num_params(model)
    assert not hasattr(back.config, "cqil_coalesced")
    assert [layer.self_attn.layer_idx for layer in back.model.layers] == list(range(8))


def test_generate_works_on_the_coalesced_model(arch):
    small = coalesce(make_model(arch), PLAN)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = small.generate(
            prompt,
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (1, 12)
    # Each step's logits (KV cache, layer_idx 0..4) match a full forward pass without a cache.
    full = logits(small, out.sequences)
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step[0], full[0, 5 + t], rtol=1e-4, atol=1e-4)


def test_group_mixing_layer_types_is_rejected():
    model = make_model("qwen2")  # layers 0-3 full attention, 4-7 sliding window
    with pytest.raises(ValueError, match=r"group \[3, 4\] mixes layer types"):
        coalesce(model, [[3, 4]])
    small = coalesce(model, [[2, 3], [4, 5]])
    assert small.model.layers[3].self_attn.sliding_window == 64
    assert small.model.layers[2].self_attn.sliding_window is None


def test_half_precision_keeps_its_dtype():
    model = make_model("llama").to(torch.bfloat16)
    small = coalesce(model, PLAN)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    a, b = model.model.layers[4].mlp.up_proj.weight, model.model.layers[5].mlp.up_proj.weight
    expected = ((a.float() + b.float()) / 2).to(torch.bfloat16)
    assert torch.equal(small.model.layers[2].mlp.up_proj.weight, expected)


# ------------------------------------------------------------------ round trips and identities


@pytest.mark.parametrize("plan", [PLAN, [[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 1, 2, 3]]])
def test_coalesce_of_decoalesce_is_exact(arch, plan):
    model = make_model(arch)
    small = coalesce(make_model(arch, seed=3), plan)  # any model of the coalesced depth
    small_before = state(small)
    back = decoalesce(small, plan, like=model)
    assert_same_state(state(small), small_before)
    assert len(back.model.layers) == 8
    for k, group in enumerate(cqil.GroupPlan.parse(plan, 8).effective_layers()):
        for i in group:  # every original layer of a group is a copy of its merged layer
            assert_same_state(state(back.model.layers[i]), state(small.model.layers[k]))
    assert_same_state(state(coalesce(back, plan)), small_before)


@pytest.mark.parametrize("plan", [SINGLETONS, []])
def test_singleton_plan_is_the_identity(arch, plan, input_ids):
    model = make_model(arch)
    before = state(model)
    same = coalesce(model, plan)
    assert_same_state(state(same), before)
    assert torch.equal(logits(same, input_ids), logits(model, input_ids))
    back = decoalesce(same, plan, like=model)
    assert_same_state(state(back), before)
    for alpha in (0.0, 0.5, 1.0):  # exact in floating point: (1 - a) * w + a * w == w
        assert_same_state(state(interpolate(model, back, alpha)), before)
    blend = interpolate(model, back, 0.3)
    for name, value in blend.state_dict().items():
        assert torch.equal(value, 0.7 * before[name] + 0.3 * before[name]), name
    torch.testing.assert_close(logits(blend, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ interpolate


def test_interpolate_ends_are_exact_and_middle_is_the_formula(arch, input_ids):
    deep = make_model(arch)
    expanded = decoalesce(coalesce(deep, PLAN), PLAN, like=deep)
    deep_state, expanded_state = state(deep), state(expanded)
    assert_same_state(state(interpolate(deep, expanded, 0)), deep_state)
    assert_same_state(state(interpolate(deep, expanded, 1.0)), expanded_state)
    for alpha in (0.25, 0.5):
        blend = interpolate(deep, expanded, alpha)
        for name, value in blend.state_dict().items():
            expected = (1 - alpha) * deep_state[name] + alpha * expanded_state[name]
            assert torch.equal(value, expected), name
    assert_same_state(state(deep), deep_state)
    assert_same_state(state(expanded), expanded_state)
    # Layers outside the plan are equal in both ends, so the blend keeps them.
    assert torch.equal(blend.model.layers[7].mlp.up_proj.weight, deep.model.layers[7].mlp.up_proj.weight)
    assert torch.isfinite(logits(blend, input_ids)).all()


def test_interpolate_blends_persistent_buffers():
    a, b = make_model("llama"), make_model("llama", seed=1)
    for model, value in ((a, 1.0), (b, 3.0)):
        model.model.norm.register_buffer("scale", torch.full((4,), value))
        model.model.norm.register_buffer("scratch", torch.full((4,), value), persistent=False)
    blend = interpolate(a, b, 0.25)
    assert torch.equal(blend.model.norm.scale, torch.full((4,), 1.5))
    assert torch.equal(blend.model.norm.scratch, torch.full((4,), 1.0))  # not persistent: model's


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, True, "0.5"])
def test_interpolate_rejects_alpha_outside_the_unit_interval(alpha):
    model = make_model("llama")
    with pytest.raises(ValueError, match="alpha must be a number in"):
        interpolate(model, model, alpha)


def test_interpolate_rejects_mismatched_models():
    llama = make_model("llama")
    with pytest.raises(ValueError, match="model is a LlamaForCausalLM but expanded is a MistralForCausalLM"):
        interpolate(llama, make_model("mistral"), 0.5)
    with pytest.raises(ValueError, match="model has 8 layers but expanded has 5"):
        interpolate(llama, coalesce(llama, PLAN), 0.5)
    wider = copy.deepcopy(llama)
    wider.model.layers[3].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(96, 48))
    with pytest.raises(
        ValueError, match=r"'model.layers.3.mlp.up_proj.weight' has shape \(80, 48\) in model"
    ):
        interpolate(llama, wider, 0.5)
    extra = copy.deepcopy(llama)
    extra.model.norm.register_buffer("scale", torch.ones(4))
    with pytest.raises(ValueError, match="'model.norm.scale' exists only in expanded"):
        interpolate(llama, extra, 0.5)


# ------------------------------------------------------------------ bad input


def test_decoalesce_checks_depth_and_plan():
    model = make_model("llama")
    small = coalesce(model, PLAN)
    with pytest.raises(ValueError, match="small has 5 layers but the plan .* coalesces to 6"):
        decoalesce(small, [[1, 2, 3]], like=model)
    with pytest.raises(ValueError, match=r"small was coalesced with plan \[\[1, 2, 3\], \[4, 5\]\]"):
        decoalesce(small, [[0, 1, 2], [3, 4]], like=model)
    with pytest.raises(ValueError, match="small is a LlamaForCausalLM but like is a MistralForCausalLM"):
        decoalesce(small, PLAN, like=make_model("mistral"))


def test_unsupported_and_parallelized_models_are_rejected():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        coalesce(gpt2, [[0, 1]])
    model = make_model("llama")
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        interpolate(model, gpt2, 0.5)
    par = cqil.parallelize(copy.deepcopy(model), [[2, 3]])
    with pytest.raises(ValueError, match="model is parallelized"):
        coalesce(par, [[0, 1]])
    with pytest.raises(ValueError, match="like is parallelized"):
        decoalesce(coalesce(model, [[2, 3]]), [[2, 3]], like=par)


# ------------------------------------------------------------------ plain transformers


def test_results_save_and_load_with_plain_transformers(arch, tmp_path, input_ids):
    deep = make_model(arch)
    small = coalesce(deep, PLAN)
    back = decoalesce(small, PLAN, like=deep)
    blend = interpolate(deep, back, 0.5)
    for name, model in (("coalesced", small), ("decoalesced", back), ("interpolated", blend)):
        model.save_pretrained(tmp_path / name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, attn_implementation="sdpa").eval()
        assert type(loaded) is type(model)
        assert loaded.config.num_hidden_layers == len(model.model.layers)
        assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
        assert torch.equal(logits(loaded, input_ids), logits(model, input_ids)), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "coalesced")
    assert reloaded.config.cqil_coalesced == small.config.cqil_coalesced
    # The record lets decoalesce check the plan of a reloaded model too.
    with pytest.raises(ValueError, match="small was coalesced with plan"):
        decoalesce(reloaded, [[0, 1, 2], [3, 4]], like=deep)
