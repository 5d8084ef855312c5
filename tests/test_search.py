"""Plan search on tiny local models: measurement, budgets, determinism, the report and `cqil plan`."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import cqil
from cqil.cli import main
from cqil.evaluation.metrics import perplexity
from cqil.selection.search import (
    BudgetError,
    estimate_speedup,
    measure_plans,
    measure_windows,
    search_plan,
    write_report,
)
from cqil.selection.similarity import analyze, format_group_ranking
from cqil.testing import VOCAB, make_model, make_tokenizer, write_corpus

REPO = Path(__file__).resolve().parents[1]
BAD = 4  # the planted layer
# Uniform layer times (ms) and the rest of the model as much as two layers: results that
# depend on speed estimates do not depend on this machine's timing noise.
UNIFORM = {"layers_ms": [1.0] * 8, "other_ms": 2.0, "total_ms": 10.0, "batch": [4, 16]}


def calib(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def planted_model(arch: str = "llama"):
    """A model where any pair is cheap to group except one containing layer ``BAD``.

    Embeddings (and so the tied LM head) are scaled up, so each layer is a small correction of
    the residual stream and reading a slightly stale input costs little; layer ``BAD``'s output
    projections are scaled up tenfold, so that it reading a stale input (grouped after a layer)
    or a layer after it missing its output (grouped before one) is catastrophic.
    """
    model = make_model(arch)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.mul_(20)
        layer = model.model.layers[BAD]
        layer.self_attn.o_proj.weight.mul_(10)
        layer.mlp.down_proj.weight.mul_(10)
    return model


def confident_model():
    """Qwen3 with a sharpened output and its own greedy text: every single group raises perplexity.

    (On random tokens some groups lower a random model's perplexity, so no budget is impossible.)
    """
    model = make_model("qwen3")
    with torch.no_grad():
        model.model.norm.weight.mul_(5)
    prompt = torch.randint(0, VOCAB, (4, 2), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = model.generate(prompt, max_new_tokens=14, do_sample=False, pad_token_id=0)
    return model, tokens


def search(model, tokens=None, **kw):
    kw = {"degree": 2, "latency": UNIFORM, "progress": False, **kw}
    return search_plan(model, calib() if tokens is None else tokens, **kw)


# ------------------------------------------------------------------------------------ measuring
@pytest.mark.parametrize("bypass", ["lp", "none", "cqil"])
def test_measured_perplexity_equals_the_real_surgery(arch, bypass):
    """Prefix caching and rewiring compute exactly what cqil.parallelize builds."""
    model = make_model(arch)
    tokens = calib(5, 12)
    plans = [[[2, 3]], [[0, 1], [5, 6]], [[6, 7]], [[1, 2], [6, 7]], []]
    scores, cost = measure_plans(model, tokens, plans, bypass=bypass, batch_size=2, progress=False)
    for plan, score in zip(plans, scores, strict=True):
        student = cqil.parallelize(copy.deepcopy(model), plan, bypass=bypass, gates="fixed")
        expected = perplexity(student, tokens, batch_size=2, progress=False)
        assert score["nll"] == pytest.approx(expected["nll"], abs=1e-5), plan
        assert score["kl"] >= -1e-6 and (score["kl"] > 1e-4) == bool(plan)
    # Each plan ran only from its first group on: 4 plans cost less than 4 full passes.
    assert cost["candidates"] == 4 and cost["forward_passes"] < 4 + 1 + 1


def test_measuring_leaves_the_model_as_it_was():
    model = make_model("qwen2")  # layer_types (full / sliding) are swapped while measuring
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers, types = list(model.model.layers), list(model.config.layer_types)
    search(model, target_depth=6, beam_width=2, pool_size=3)
    assert list(model.model.layers) == layers and model.config.layer_types == types
    assert model.config.num_hidden_layers == 8 and getattr(model.config, "cqil", None) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_windows_never_mix_attention_types():
    model = make_model("qwen2")  # layers 0-3 full attention, 4-7 sliding window
    windows, _ = measure_windows(model, calib(), degree=2, progress=False)
    assert [w["layers"] for w in windows] == [[0, 1], [1, 2], [2, 3], [4, 5], [5, 6], [6, 7]]
    with pytest.raises(ValueError, match="mixes attention types"):
        measure_plans(model, calib(), [[[3, 4]]], progress=False)


# ------------------------------------------------------------------------------------ the search
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_planted_bad_layer_is_avoided(arch):
    model = planted_model(arch)
    result = search(model, target_depth=6, beam_width=2, pool_size=4)
    singles = {c.groups[0]: c.kl for c in result.candidates if c.round == 1}
    bad = [kl for g, kl in singles.items() if BAD in g]
    good = [kl for g, kl in singles.items() if BAD not in g]
    assert min(bad) > 1.5 * max(good), singles  # the plant works: grouping layer BAD is the worst
    assert all(BAD not in g for g in result.plan.groups), result.plan


@pytest.mark.parametrize(("degree", "depth"), [(2, 7), (2, 6), (2, 4), (3, 6), (3, 4), (4, 5)])
def test_target_depth_is_met_exactly(degree, depth):
    result = search(make_model("llama"), degree=degree, target_depth=depth, beam_width=2, pool_size=3)
    assert result.plan.num_layers_after == depth == result.chosen.depth
    assert all(len(g) == degree for g in result.plan.groups)
    assert result.budget == {"target_depth": depth}
    assert result.eligible[0] == result.chosen and all(c.depth == depth for c in result.eligible)
    assert [c.kl for c in result.eligible] == sorted(c.kl for c in result.eligible)


def test_speedup_budget_takes_the_fewest_groups_that_reach_it():
    # 8 layers of 1 ms and 2 ms of the rest: one pair 10/9 = 1.11x, two 10/8 = 1.25x, three 1.43x.
    result = search(make_model("llama"), speedup=1.2, beam_width=2, pool_size=3)
    assert len(result.plan.groups) == 2
    assert result.chosen.speedup == pytest.approx(1.25) and result.chosen.speedup >= 1.2
    assert estimate_speedup(result.plan.groups, UNIFORM) == pytest.approx(1.25)
    # A slow layer shifts the estimate: a group costs its slowest layer.
    slow = dict(UNIFORM, layers_ms=[1.0] * 7 + [3.0])
    assert estimate_speedup(((6, 7),), slow) == pytest.approx(12 / 11)
    assert estimate_speedup(((5, 6),), slow) == pytest.approx(12 / 11)


def test_max_ppl_increase_takes_the_shallowest_plan_within_it():
    model, tokens = confident_model()
    result = search(model, tokens, max_ppl_increase=40.0, beam_width=2, pool_size=4)
    limit = result.original["ppl"] * 1.4
    assert result.chosen.ppl <= limit and all(c.ppl <= limit for c in result.eligible)
    k = len(result.plan.groups)
    if k < 4:  # stopped because no plan of one more group the beam reached stays within it
        assert all(c.ppl > limit for c in result.candidates if c.round == k + 1)


def test_search_is_deterministic_for_a_seed():
    model = make_model("mistral")
    a = search(model, target_depth=5, beam_width=2, pool_size=4, seed=3).to_dict()
    b = search(model, target_depth=5, beam_width=2, pool_size=4, seed=3).to_dict()
    for result in (a, b):
        result["cost"].pop("seconds")
        for r in result["rounds"]:
            r.pop("seconds")
    assert a == b


def test_a_shorter_search_is_a_prefix_of_a_longer_one():
    """What the benchmark relies on: round k of a search is what a search for k groups returns."""
    model = make_model("llama")
    long = search(model, target_depth=5, beam_width=2, pool_size=4)
    short = search(model, target_depth=7, beam_width=2, pool_size=4)
    assert short.chosen.to_dict() == long.rounds[0]["best"]
    assert short.cost["candidates"] == long.rounds[0]["candidates"]


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"target_depth": 3}, r"target_depth=3: below the shallowest depth degree 2 allows on 8 layers: 4"),
        ({"target_depth": 8}, r"target_depth=8: the model has 8 layers"),
        ({"target_depth": 5, "degree": 3}, r"target_depth=5: each group of 3 removes 2 layers.*4 and 6"),
        ({"speedup": 2.5}, r"speedup=2.5: above the ideal speedup 2.000x of degree 2 on 8 layers"),
        ({"speedup": 4.5, "degree": 3}, r"speedup=4.5: above the ideal speedup 2.000x of degree 3"),
        ({"speedup": 1.7}, r"speedup=1.7: above the most the measured latency model allows, 1.667x"),
        ({"speedup": 1.0}, r"speedup=1.0: a speedup must be above 1"),
        ({"max_ppl_increase": 0}, r"max_ppl_increase=0: .* must be positive"),
    ],
)
def test_impossible_budgets_name_the_budget(budget, match):
    with pytest.raises(BudgetError, match=match) as info:
        search(make_model("llama"), **budget)
    assert info.value.budget in budget


def test_a_perplexity_budget_no_group_meets_names_the_least_costly():
    model, tokens = confident_model()
    with pytest.raises(BudgetError, match=r"max_ppl_increase=1.0: every plan of one group raises .* at \+"):
        search(model, tokens, max_ppl_increase=1.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "exactly one budget"),
        ({"target_depth": 6, "speedup": 1.1}, "exactly one budget"),
        ({"target_depth": 6, "degree": 1}, "degree must be an integer of at least 2"),
        ({"target_depth": 6, "objective": "bleu"}, "objective"),
        ({"target_depth": 6, "bypass": "sideways"}, "bypass must be one of"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        search(make_model("llama"), **kw)


# ------------------------------------------------------------------------------------ the report
def test_report_files_and_recipe_snippet(tmp_path):
    result = search(make_model("llama"), target_depth=6, beam_width=2, pool_size=3)
    out = write_report(result, tmp_path / "plan", extra={"model": "tiny"})
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "plan.yaml", "plans.json", "table.txt"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "plans.json").read_text())
    assert data["model"] == "tiny" and data["plan"] == result.plan.to_dict()
    assert len(data["candidates"]) == result.cost["candidates"] == data["rounds"][-1]["candidates"]
    assert data["front"][-1]["depth"] == 6 and [f["depth"] for f in data["front"]] == [7, 6]
    snippet_text = (out / "plan.yaml").read_text()
    snippet = yaml.safe_load(snippet_text)
    groups = [list(g) for g in result.plan.groups]
    assert snippet == {"parallelize": {"groups": groups, "bypass": "lp", "gates": "fixed"}}
    assert "# served by transformers, vLLM (cqil plugin), llama.cpp/Ollama (GGUF)\n" in snippet_text
    table = (out / "table.txt").read_text()
    assert "plans meeting target_depth=6" in table and "Pareto front" in table and "1*" in table
    with pytest.raises(FileExistsError, match="not empty"):
        write_report(result, out)
    write_report(result, out, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_analyze_shows_the_measured_ranking_beside_similarity(tmp_path):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    result = analyze(
        make_model("llama"),
        make_tokenizer(),
        [data],
        num_groups=1,
        degree=2,
        out_dir=tmp_path / "out",
        seq_len=16,
        num_sequences=4,
        batch_size=2,
        bypass_modes=("lp",),
        measured=True,
        coalesced=False,
    )
    groups = result["groups"]
    assert [g["layers"] for g in groups] == [[s, s + 1] for s in range(7)]
    assert sorted(g["measured_rank"] for g in groups) == list(range(1, 8))
    assert sorted(g["similarity_rank"] for g in groups) == list(range(1, 8))
    best = min(groups, key=lambda g: g["kl"])
    assert best["measured_rank"] == 1 and math.isfinite(best["ppl"])
    # The similarity of a group is the score rank_ranges gives the one-group range there.
    top = result["plans"][0]
    assert next(g for g in groups if g["similarity_rank"] == 1)["similarity"] == pytest.approx(top["score"])
    assert "sim rank" in format_group_ranking(result)
    assert json.loads((tmp_path / "out" / "similarity.json").read_text())["groups"] == groups


# ------------------------------------------------------------------------------------ cqil plan
@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def plan_argv(model_dir, data, out, *budget):
    return [
        "plan",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "16",
        "--num-sequences",
        "4",
        "--beam-width",
        "2",
        "--pool-size",
        "3",
        *budget,
    ]


def test_cli_plan_writes_the_report(tmp_path, tiny_model_dir, capsys):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    out = tmp_path / "plan"
    assert main(plan_argv(tiny_model_dir, data, out, "--target-depth", "6")) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "parallelize:" in printed
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "plan.yaml", "plans.json", "table.txt"]
    report = json.loads((out / "plans.json").read_text())
    assert report["chosen"]["depth"] == 6 and report["calibration"]["num_sequences"] == 4
    # A non-empty --out is refused before any work, and accepted with --overwrite.
    assert main(plan_argv(tiny_model_dir, data, out, "--target-depth", "7")) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(plan_argv(tiny_model_dir, data, out, "--target-depth", "7", "--overwrite")) == 0


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [
        (["--target-depth", "2"], "--target-depth 2: below the shallowest depth"),
        (["--speedup", "3"], "--speedup 3.0: above the ideal speedup 2.000x"),
    ],
)
def test_cli_plan_impossible_budget_is_one_line(tmp_path, tiny_model_dir, capsys, budget, fragment):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    assert main(plan_argv(tiny_model_dir, data, tmp_path / "out", *budget)) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("cqil: error: ") and fragment in last and "Traceback" not in err


def test_cli_plan_needs_exactly_one_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--model", "m", "--data", "x", "--out", "o", "--target-depth", "6", "--speedup", "1.1"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.integration
def test_plan_search_bench_tiny():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/plan_search.py", "--model", "tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model"] == "tiny" and set(summary["pairs"]) == {"1", "2"}
    for rows in summary["pairs"].values():
        assert set(rows) == {"searched", "scan", "similarity"}
        for row in rows.values():
            assert {"groups", "calib_kl", "heldout_ppl", "plans", "forward_passes"} <= set(row)
        # The search measures every single pair, a superset of the one-pair scan.
        assert (
            rows["searched"]["calib_kl"] <= rows["scan"]["calib_kl"] + 1e-9 or len(rows["scan"]["groups"]) > 1
        )


def test_one_options_class_for_the_library_the_cli_and_the_recipe():
    import argparse
    import dataclasses

    from cqil.cli.plan import add_plan_parser, search_options
    from cqil.recovery.recipe import PlanSearchConfig
    from cqil.selection.options import SearchOptions

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", "--model", "m", "--data", "d", "--out", "o", "--target-depth", "6"])
    assert search_options(args) == SearchOptions(target_depth=6)
    section = PlanSearchConfig(speedup=1.2, beam_width=3)
    options = section.options(bypass="cqil", bypass_distance=2, seed=5)
    assert options == SearchOptions(speedup=1.2, beam_width=3, bypass="cqil", bypass_distance=2, seed=5)
    for f in dataclasses.fields(PlanSearchConfig):
        if hasattr(SearchOptions, f.name):
            assert f.default == getattr(SearchOptions(), f.name), f.name
    with pytest.raises(TypeError, match="unknown plan search options"):
        SearchOptions().replace(beam=3)


def test_search_plan_takes_options_or_keywords():
    from cqil.selection.options import SearchOptions

    model = planted_model()
    a = search_plan(model, calib(), SearchOptions(target_depth=7), latency=UNIFORM, progress=False)
    b = search_plan(model, calib(), target_depth=7, latency=UNIFORM, progress=False)
    assert a.plan == b.plan and a.chosen == b.chosen
