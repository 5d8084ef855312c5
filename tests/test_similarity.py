"""Layer-input similarity, plan suggestion and the analysis report, on tiny local models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cqil.rewrite.plan import GroupPlan
from cqil.selection.similarity import analyze, layer_input_similarity, rank_ranges, suggest_plan
from cqil.testing import VOCAB, make_model, make_tokenizer, write_corpus


def test_layer_input_similarity_is_a_cosine_matrix():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    sim = layer_input_similarity(model, tokens, batch_size=2, progress=False)
    matrix, io_sim = sim["matrix"], sim["io"]
    num_layers = len(model.model.layers)
    assert matrix.shape == (num_layers, num_layers) and io_sim.shape == (num_layers,)
    assert sim["tokens"] == 5 * 12
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(
        matrix.diagonal(), torch.ones(num_layers, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert matrix.abs().max() <= 1 + 1e-6
    # Layer i's output is layer i+1's input, so the two measurements must agree.
    torch.testing.assert_close(io_sim[:-1], matrix.diagonal(offset=1), atol=1e-6, rtol=1e-6)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


def test_similarity_does_not_depend_on_batching():
    model = make_model("llama")
    tokens = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    a = layer_input_similarity(model, tokens, batch_size=1, progress=False)
    b = layer_input_similarity(model, tokens, batch_size=4, progress=False)
    # The per-token cosines are float32; only their sums are float64.
    torch.testing.assert_close(a["matrix"], b["matrix"], atol=1e-6, rtol=1e-6)


def planted_matrix(num_layers: int = 16) -> torch.Tensor:
    """Background 0.5; pairs (10,11) and (12,13) at 0.9; a decoy range 2..5 whose layers are
    similar *across* the pair boundaries (0.99) but not within pairs (0.6)."""
    sim = torch.full((num_layers, num_layers), 0.5)
    sim[2:6, 2:6] = 0.99
    for i, j, value in [(10, 11, 0.9), (12, 13, 0.9), (2, 3, 0.6), (4, 5, 0.6)]:
        sim[i, j] = sim[j, i] = value
    sim.fill_diagonal_(1.0)
    return sim


def test_suggest_plan_picks_the_planted_pairs():
    plan = suggest_plan(planted_matrix(), num_groups=2, degree=2)
    assert isinstance(plan, GroupPlan)
    assert plan.groups == ((10, 11), (12, 13))
    assert plan.num_layers == 16 and plan.num_layers_after == 14


def test_rank_ranges_scores_within_group_pairs_only():
    ranking = rank_ranges(planted_matrix(), num_groups=2, degree=2)
    assert len(ranking) == 16 - 4 + 1
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert ranking[0] == {"start": 10, "end": 14, "score": pytest.approx(0.9)}
    by_start = {r["start"]: r["score"] for r in ranking}
    assert by_start[2] == pytest.approx(0.6)  # the decoy: its cross-pair similarity does not count
    assert by_start[3] == pytest.approx((0.99 + 0.5) / 2)


def test_rank_ranges_degree_three_averages_all_pairs_of_a_group():
    sim = torch.full((9, 9), 0.2)
    sim[6:9, 6:9] = 0.8
    sim[6, 8] = sim[8, 6] = 0.5
    sim.fill_diagonal_(1.0)
    ranking = rank_ranges(sim.tolist(), num_groups=1, degree=3)  # nested lists, as read from JSON
    assert ranking[0]["start"] == 6
    assert ranking[0]["score"] == pytest.approx((0.8 + 0.8 + 0.5) / 3)
    assert suggest_plan(sim, num_groups=1, degree=3).groups == ((6, 7, 8),)


@pytest.mark.parametrize(
    ("num_groups", "degree", "match"),
    [(5, 2, "need 10 layers but the model has 8"), (1, 1, "degree must be at least 2"), (0, 2, "at least 1")],
)
def test_suggest_plan_rejects_impossible_budgets(num_groups, degree, match):
    with pytest.raises(ValueError, match=match):
        suggest_plan(torch.eye(8), num_groups=num_groups, degree=degree)


def test_analyze_writes_report(tmp_path):
    model = make_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    out = tmp_path / "out"
    result = analyze(
        model,
        make_tokenizer(),
        [data],
        num_groups=[1, 2],
        degree=2,
        out_dir=out,
        seq_len=16,
        num_sequences=4,
        batch_size=2,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "similarity.json",
        "similarity.png",
    ]  # no temp files left
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "similarity.json").read_text())
    assert report == json.loads(json.dumps(result))
    assert report["calibration"] == {"data": [str(data)], "seq_len": 16, "num_sequences": 4}
    assert len(report["matrix"]) == 8 and len(report["io_similarity"]) == 8
    assert [p["num_groups"] for p in report["plans"]] == [1, 2]
    assert math.isfinite(report["original"]["ppl"]) and report["original"]["tokens"] == 4 * 15
    for entry in report["plans"]:
        plan = GroupPlan.from_dict(entry["plan"])
        assert len(plan.groups) == entry["num_groups"] and all(len(g) == 2 for g in plan.groups)
        assert GroupPlan.parse(entry["spec"], 8) == plan
        assert entry["ranking"][0]["score"] == entry["score"]
        assert set(entry["perplexity"]) == {"lp", "none", "cqil", "coalesce"}
        assert all(math.isfinite(r["ppl"]) for r in entry["perplexity"].values())
    # The model itself is measured, never rewritten.
    assert len(model.model.layers) == 8 and getattr(model.config, "cqil", None) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_analyze_rejects_unknown_bypass_before_measuring(tmp_path):
    with pytest.raises(ValueError, match="unknown bypass modes"):
        analyze(
            make_model("llama"),
            make_tokenizer(),
            [tmp_path / "never-read.jsonl"],
            num_groups=1,
            degree=2,
            out_dir=tmp_path / "out",
            bypass_modes=("lp", "sideways"),
        )
    assert not (tmp_path / "out").exists()


def _analyze_tiny(tmp_path, model, **kw):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    return analyze(
        model,
        make_tokenizer(),
        [data],
        num_groups=[1, 2],
        degree=2,
        out_dir=tmp_path / "out",
        seq_len=16,
        num_sequences=4,
        batch_size=2,
        progress=False,
        **kw,
    )


def test_analyze_default_does_not_rank_every_group(tmp_path, monkeypatch):
    import cqil.selection.meter
    import cqil.selection.similarity

    def refuse(*args, **kwargs):
        raise AssertionError("the per-group ranking ran by default")

    monkeypatch.setattr(cqil.selection.meter.PlanMeter, "windows", refuse)
    monkeypatch.setattr(cqil.selection.similarity, "measure_windows", refuse)
    monkeypatch.setattr(cqil.selection.similarity, "rank_groups", refuse)
    result = _analyze_tiny(tmp_path, make_model("llama"))
    assert "groups" not in result
    assert all(set(e["perplexity"]) == {"lp", "none", "cqil", "coalesce"} for e in result["plans"])


def _calib_tokens(tmp_path):
    from cqil.recovery.data import calibration_tokens

    data = write_corpus(tmp_path / "calib.jsonl.gz")
    return calibration_tokens(make_tokenizer(), [data], seq_len=16, num_sequences=4)


def test_candidate_evaluation_is_in_place_and_leaves_the_model_bit_identical(tmp_path, monkeypatch):
    import copy

    from cqil.selection.search import measure_plans

    model = make_model("llama")
    tokens = _calib_tokens(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(model.model.layers)
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits
    deepcopy = copy.deepcopy

    def no_model_copy(obj, *args, **kwargs):
        if obj is model or obj is model.model or obj is model.model.layers:
            raise AssertionError("the whole model was copied")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    _analyze_tiny(tmp_path, model, measured=True)
    measure_plans(model, tokens, ["2-6:2", [[0, 1, 2]]], bypass="cqil", batch_size=2, progress=False)
    monkeypatch.undo()

    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 8
    assert getattr(model.config, "cqil", None) is None
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    with torch.inference_mode():
        assert torch.equal(model(input_ids=tokens).logits, logits)


def test_measured_numbers_match_a_rewritten_copy(tmp_path):
    """The in-place measurements give what rewriting a copy of the model and measuring it gives."""
    import copy

    import torch.nn.functional as F

    from cqil.evaluation.metrics import perplexity
    from cqil.rewrite.coalescing import coalesce
    from cqil.rewrite.surgery import parallelize

    model = make_model("llama")
    tokens = _calib_tokens(tmp_path)
    result = _analyze_tiny(tmp_path, model, measured=True)
    with torch.inference_mode():
        logp = F.log_softmax(model(input_ids=tokens).logits[:, :-1].float(), dim=-1)

    def kl(candidate):
        with torch.inference_mode():
            logq = F.log_softmax(candidate(input_ids=tokens).logits[:, :-1].float(), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean().item()

    original = perplexity(model, tokens, batch_size=2, progress=False)
    assert result["original"]["ppl"] == pytest.approx(original["ppl"], rel=1e-5)
    assert result["original"]["tokens"] == original["tokens"]
    for entry in result["plans"]:
        plan = GroupPlan.from_dict(entry["plan"])
        for mode, measured in entry["perplexity"].items():
            if mode == "coalesce":
                candidate = coalesce(model, plan)
            else:
                candidate = parallelize(copy.deepcopy(model), plan, bypass=mode)
            expected = perplexity(candidate, tokens, batch_size=2, progress=False)
            assert measured["ppl"] == pytest.approx(expected["ppl"], rel=1e-5), (entry["spec"], mode)
            assert measured["kl"] == pytest.approx(kl(candidate), rel=1e-4, abs=1e-7)
    for group in result["groups"]:
        candidate = parallelize(copy.deepcopy(model), [group["layers"]], bypass="lp")
        expected = perplexity(candidate, tokens, batch_size=2, progress=False)
        assert group["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
        assert group["kl"] == pytest.approx(kl(candidate), rel=1e-4, abs=1e-7)
