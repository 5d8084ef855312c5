"""The contract of docs/design.md, "The math of one group", checked on tiny models of every architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import cqil
from cqil._compat import cache_kwargs
from cqil.rewrite.group import BranchGroup, MergedGroup, ParallelGroup
from cqil.testing import make_model

PLAN = [[1, 2, 3], [4, 5]]  # a triple (exercises cqil distances) and a pair
BYPASS = [("lp", 1), ("none", 1), ("cqil", 1), ("cqil", 2)]


def parallel(model, plan=PLAN, **kw):
    return cqil.parallelize(copy.deepcopy(model), plan, **kw)


def expected_gates(bypass: str, distance: int, degree: int) -> torch.Tensor:
    """G of the design, written out independently of the library."""
    g = torch.zeros(degree, degree)
    for j in range(degree):
        for k in range(degree):
            if k == j:
                continue
            if bypass == "lp" or (bypass == "cqil" and 0 < j - k <= distance):
                g[j, k] = 1.0
    return g


def reference_logits(original, plan, gates_by_group, input_ids):
    """The design's formula evaluated with the original layers' own submodules.

    Uses SDPA with no mask (causal), so the inputs must not be padded.
    """
    m = original.model
    x = m.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1])[None]
    pe = m.rotary_emb(x, positions)
    groups = {g[0]: g for g in plan}
    i = 0
    while i < len(m.layers):
        group = groups.get(i)
        if group is None:
            x = m.layers[i](x, attention_mask=None, position_embeddings=pe, position_ids=positions)
            i += 1
            continue
        layers = [m.layers[j] for j in group]
        g = gates_by_group[tuple(group)]
        a = [
            ly.self_attn(ly.input_layernorm(x), position_embeddings=pe, attention_mask=None)[0]
            for ly in layers
        ]
        y = x + sum(a)
        for j, ly in enumerate(layers):
            u = x + a[j] + sum(g[j, k] * a[k] for k in range(len(layers)) if k != j)
            y = y + ly.mlp(ly.post_attention_layernorm(u))
        x = y
        i += len(group)
    return original.lm_head(m.norm(x))


# ------------------------------------------------------------------ identity


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("form", ["merged", "branches"])
@pytest.mark.parametrize("plan", [[], [[i] for i in range(8)], [[2], [5]]])
def test_no_groups_is_bit_identical(arch, attn, form, plan, input_ids):
    model = make_model(arch, attn_implementation=attn)
    with torch.no_grad():
        expected = model(input_ids).logits
        got = parallel(model, plan, form=form)(input_ids).logits
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ the math


@pytest.mark.parametrize("bypass, distance", BYPASS)
@pytest.mark.parametrize("form", ["merged", "branches"])
def test_logits_follow_the_design_formula(arch, bypass, distance, form, input_ids):
    model = make_model(arch)
    par = parallel(model, bypass=bypass, bypass_distance=distance, form=form)
    gates = {tuple(g): expected_gates(bypass, distance, len(g)) for g in PLAN}
    with torch.no_grad():
        expected = reference_logits(model, PLAN, gates, input_ids)
        got = par(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_shape", ["scalar", "channel"])
def test_learned_gates_enter_the_formula(gate_shape, input_ids):
    model = make_model("llama")
    par = parallel(model, bypass="lp", gate_shape=gate_shape)
    torch.manual_seed(3)
    gates = {}
    with torch.no_grad():
        for group in cqil.rewrite.surgery.parallel_groups(par):
            group.gates.copy_(torch.randn_like(group.gates))
            gates[group.original_indices] = group.gate_matrix()
        expected = reference_logits(model, PLAN, gates, input_ids)
        got = par(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_bypass_is_a_sum_of_independent_layers(input_ids):
    """G = 0: y = x + sum_j (layer_j(x) - x), the CQIL combination without bypass."""
    model = make_model("qwen3")
    par = parallel(model, [[3, 4, 5]], bypass="none")
    group = par.model.layers[3]
    x = torch.randn(2, 7, model.config.hidden_size)
    pos = torch.arange(7)[None]
    pe = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        outs = [model.model.layers[i](x, attention_mask=None, position_embeddings=pe) for i in (3, 4, 5)]
        expected = x + sum(o - x for o in outs)
        got = group(x, attention_mask=None, position_embeddings=pe)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
@pytest.mark.parametrize("gates", ["fixed", "learned"])
def test_lp_group_is_one_wide_decoder_layer(arch_name, gates):
    """G = 1: the group is one standard layer with P x heads and P x intermediate size."""
    model = make_model(arch_name)
    par = parallel(model, [[1, 2, 3]], bypass="lp", gates=gates)
    group = par.model.layers[1]
    assert isinstance(group, MergedGroup) and group.shared_mlp_input == (gates == "fixed")
    wide_cfg = copy.deepcopy(model.config)
    wide_cfg.head_dim = group.head_dim
    wide_cfg.num_attention_heads *= 3
    wide_cfg.num_key_value_heads *= 3
    wide_cfg.intermediate_size *= 3
    wide = type(model.model.layers[1])(wide_cfg, layer_idx=1).eval()
    wide.load_state_dict(group.plain_layer_state_dict(), strict=True)
    x = torch.randn(2, 9, model.config.hidden_size)
    pe = model.model.rotary_emb(x, torch.arange(9)[None])
    with torch.no_grad():
        expected = group(x, attention_mask=None, position_embeddings=pe)
        torch.testing.assert_close(
            wide(x, attention_mask=None, position_embeddings=pe), expected, rtol=1e-5, atol=1e-5
        )


def test_plain_layer_needs_gates_at_one():
    par = parallel(make_model("llama"), [[1, 2]], bypass="lp")
    with torch.no_grad():
        par.model.layers[1].gates.fill_(0.5)
    with pytest.raises(
        ValueError, match=r"group \[1, 2\] is one plain layer only with lp bypass and gates at 1"
    ):
        par.model.layers[1].plain_layer_state_dict()


# ------------------------------------------------------------------ merged = branches


@pytest.mark.parametrize("bypass, distance", BYPASS)
@pytest.mark.parametrize("gates", ["learned", "fixed"])
@pytest.mark.parametrize("gate_shape", ["scalar", "channel"])
def test_merged_equals_branches_with_perturbed_gates(arch, bypass, distance, gates, gate_shape, input_ids):
    model = make_model(arch)
    kw = dict(bypass=bypass, bypass_distance=distance, gates=gates, gate_shape=gate_shape)
    merged, branches = parallel(model, form="merged", **kw), parallel(model, form="branches", **kw)
    if gates == "learned" and bypass != "none":
        torch.manual_seed(5)
        with torch.no_grad():
            for gm, gb in zip(
                cqil.rewrite.surgery.parallel_groups(merged),
                cqil.rewrite.surgery.parallel_groups(branches),
                strict=True,
            ):
                gm.gates.copy_(gm.gates + 0.5 * torch.randn_like(gm.gates))
                gb.gates.copy_(gm.gates)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, branches(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_merged_equals_branches_with_padding_and_eager():
    model = make_model("mistral", attn_implementation="eager")
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    merged, branches = parallel(model, form="merged"), parallel(model, form="branches")
    with torch.no_grad():
        lm = merged(ids, attention_mask=mask).logits
        lb = branches(ids, attention_mask=mask).logits
    torch.testing.assert_close(lm[mask.bool()], lb[mask.bool()], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ generation and the KV cache


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("bypass", ["lp", "none", "cqil"])
def test_generate_with_cache_matches_forms_and_no_cache_path(arch, bypass):
    model = make_model(arch)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    outs = {}
    for form in ("merged", "branches"):
        par = parallel(model, bypass=bypass, form=form)
        with torch.no_grad():
            outs[form] = par.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
            assert torch.equal(outs[form], greedy_without_cache(par, prompt, 8))
    assert torch.equal(outs["merged"], outs["branches"])


@pytest.mark.parametrize("form", ["merged", "branches"])
def test_kv_cache_holds_all_branches_under_one_layer_index(form, input_ids):
    model = make_model("llama")
    par = parallel(model, form=form)
    cache = DynamicCache(config=par.config)
    with torch.no_grad():
        par(input_ids, use_cache=True, **cache_kwargs(cache))
    assert len(cache.layers) == cqil.GroupPlan.parse(PLAN, 8).num_layers_after == 5
    kv = model.config.num_key_value_heads
    heads = [layer.keys.shape[1] for layer in cache.layers]
    assert heads == [kv, 3 * kv, 2 * kv, kv, kv]


def test_hidden_states_are_reported_per_effective_layer(input_ids):
    par = parallel(make_model("qwen3"))
    with torch.no_grad():
        out = par(input_ids, output_hidden_states=True)
    assert len(out.hidden_states) == 5 + 1


# ------------------------------------------------------------------ what the surgery did


@pytest.mark.parametrize("form, cls", [("merged", MergedGroup), ("branches", BranchGroup)])
def test_surgery_replaced_exactly_the_grouped_layers(arch, form, cls):
    model = make_model(arch)
    originals = list(model.model.layers)
    par = cqil.parallelize(model, PLAN, form=form)
    assert par is model
    layers = list(par.model.layers)
    assert len(layers) == 5 and par.config.num_hidden_layers == 5
    assert [type(layer) for layer in layers[1:3]] == [cls, cls]
    assert [layer.original_indices for layer in layers[1:3]] == [(1, 2, 3), (4, 5)]
    assert layers[0] is originals[0] and layers[3] is originals[6] and layers[4] is originals[7]
    assert [layer.layer_idx for layer in layers[1:3]] == [1, 2]
    assert layers[3].self_attn.layer_idx == 3 and layers[4].self_attn.layer_idx == 4
    assert par.config.cqil["plan"]["groups"] == PLAN and par.config.cqil["form"] == form
    if getattr(par.config, "layer_types", None):
        assert len(par.config.layer_types) == 5


@pytest.mark.parametrize("form", ["merged", "branches"])
def test_materialize_builds_each_group_from_its_originals(form, input_ids):
    """The hook ZeRO-3 uses: called once per group, with that group's original layers, in order."""
    model, reference = make_model("llama"), make_model("llama")
    originals = list(model.model.layers)
    calls = []

    def materialize(layers, build):
        calls.append([originals.index(layer) for layer in layers])
        return build()

    cqil.parallelize(model, PLAN, form=form, materialize=materialize)
    cqil.parallelize(reference, PLAN, form=form)
    assert calls == PLAN
    assert torch.equal(model(input_ids).logits, reference(input_ids).logits)


def test_trainable_parameters_are_exactly_the_groups(arch):
    model = make_model(arch)
    par = parallel(model, gates="learned")
    named = cqil.trainable_parameters(par)
    group_params = {
        id(p) for layer in par.model.layers if isinstance(layer, ParallelGroup) for p in layer.parameters()
    }
    assert {id(p) for p in named.values()} == group_params
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in named)
    assert "model.layers.1.gates" in named and "model.layers.2.gates" in named
    everything = dict(par.named_parameters())
    assert all(everything[n] is p for n, p in named.items())
    fixed = cqil.trainable_parameters(parallel(model, gates="fixed"))
    assert not any(n.endswith("gates") for n in fixed)


def test_gates_start_at_the_mode_values():
    par = parallel(make_model("llama"), [[0, 1, 2, 3]], bypass="cqil", bypass_distance=2)
    g = cqil.rewrite.surgery.gate_values(par)[0]
    assert torch.equal(g, expected_gates("cqil", 2, 4) + torch.eye(4))
    assert isinstance(par.model.layers[0].gates, torch.nn.Parameter)
    fixed = parallel(make_model("llama"), [[0, 1]], bypass="lp", gates="fixed")
    assert not isinstance(fixed.model.layers[0].gates, torch.nn.Parameter)
    assert "model.layers.0.gates" in fixed.state_dict()
    assert parallel(make_model("llama"), [[0, 1]], bypass="none").model.layers[0].gates is None


# ------------------------------------------------------------------ bad input


def test_unsupported_model_class_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        cqil.parallelize(model, [[0, 1]])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(bypass="full"), "bypass must be one of"),
        (dict(gates="frozen"), "gates must be one of"),
        (dict(form="fused"), "form must be one of"),
        (dict(gate_shape="vector"), "gate_shape must be one of"),
        (dict(bypass="cqil", bypass_distance=0), "bypass_distance must be a positive integer"),
    ],
)
def test_bad_options(kw, message):
    with pytest.raises(ValueError, match=message):
        parallel(make_model("llama"), **kw)


def test_bad_plan_and_double_surgery():
    model = make_model("llama")
    with pytest.raises(ValueError, match="overlap at layer 2"):
        parallel(model, [[1, 2], [2, 3]])
    par = parallel(model)
    with pytest.raises(ValueError, match="already parallelized"):
        cqil.parallelize(par, PLAN)


def test_group_mixing_attention_types_is_rejected():
    model = make_model("qwen2")  # layers 0-3 full attention, 4-7 sliding window
    with pytest.raises(ValueError, match=r"group \[3, 4\] mixes attention types"):
        parallel(model, [[3, 4]])


@pytest.mark.parametrize("bypass", ["lp", "none", "cqil"])
def test_lora_on_a_merged_group_trains_and_merges_on_every_path(bypass, input_ids):
    # Only lp with gates at 1 calls o_proj, gate_up_proj and down_proj whole; every other mode runs
    # them branch by branch, and must still go through the adapters peft wraps them in.
    from types import SimpleNamespace

    from cqil.recovery.lora import apply_lora, merge_lora

    model = parallel(make_model("llama"), bypass=bypass, gates="learned")
    names = apply_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0), target="groups")
    assert any(n.endswith("o_proj") for n in names) and any(n.endswith("down_proj") for n in names)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or n.endswith(".gates"):
                p.add_(torch.randn_like(p) * 0.1)  # adapters that count, gates away from 1
    out = model(input_ids).logits
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, out.detach(), rtol=0, atol=2e-5)
