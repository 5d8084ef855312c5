"""The CUDA tier: the rewrite, the cache, a CUDA-graph decode and a short recovery run on a GPU.

Run with ``pytest -m gpu tests/test_gpu.py``; every test skips where torch sees no CUDA device. Latency
on a GPU is measured by ``bench/gpu_latency.py``, never here: these tests check results only.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cqil
from cqil.evaluation.latency import StaticDecode, eager_tokens, measure_latency
from cqil.testing import VOCAB, make_model, make_tokenizer, write_corpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
PLAN = "2-6:2"
MODES = [("lp", "fixed"), ("cqil", "learned"), ("none", "fixed")]
CUDA = torch.device("cuda")


def parallelized(original, bypass: str, gates: str, form: str = "merged"):
    model = cqil.parallelize(
        copy.deepcopy(original), cqil.GroupPlan.parse(PLAN, 8), bypass=bypass, gates=gates, form=form
    )
    return model.eval()


def prompt(length: int = 8, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)).to(CUDA)


@pytest.mark.parametrize(("bypass", "gates"), MODES)
def test_merged_equals_branches_on_cuda(bypass, gates):
    original = make_model("llama").to(CUDA)
    ids = prompt(24, batch=2)
    logits = {}
    for form in ("merged", "branches"):
        model = parallelized(original, bypass, gates, form)
        with torch.no_grad():
            logits[form, "float32"] = model(ids).logits.double()
            logits[form, "bfloat16"] = model.to(torch.bfloat16)(ids).logits.double()
    a, b = logits["merged", "float32"], logits["branches", "float32"]
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 rounding
    a, b = logits["merged", "bfloat16"], logits["branches", "bfloat16"]
    assert ((a - b).norm() / b.norm()).item() < 3e-2  # bf16: 8 bits of mantissa, summed in another order


@pytest.mark.parametrize(("bypass", "gates"), MODES)
def test_cached_greedy_equals_recomputed_greedy_in_bf16(bypass, gates):
    model = parallelized(make_model("llama").to(CUDA), bypass, gates).to(torch.bfloat16)
    ids = prompt()
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
        recomputed = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bypass", "gates"), MODES)
def test_cuda_graph_replay_of_a_parallelized_model_equals_eager_decode(bypass, gates, dtype, tmp_path):
    from cqil.export.load import load_export
    from cqil.export.write import export_model

    model = parallelized(make_model("llama").to(CUDA), bypass, gates).to(dtype)
    export_model(model, tmp_path / "model")
    exported = load_export(tmp_path / "model", dtype=dtype, device=CUDA).eval()  # as a user loads it
    ids = prompt()
    with torch.inference_mode():
        for m in (model, exported):
            graph = StaticDecode(m, ids, 12, graph=True)  # captured once
            expected = StaticDecode(m, ids, 12, graph=False).tokens()  # the same step, launched eagerly
            assert graph.tokens() == expected
            graph.prepare()()  # a timed replay in between; the next run starts from the prompt again
            assert graph.tokens() == expected
            if dtype == torch.float32:  # and the generate()-style loop over a dynamic cache agrees
                assert expected == eager_tokens(m, ids, 12)


def test_latency_on_cuda_measures_graph_decode_for_the_in_memory_and_the_exported_model(tmp_path):
    from cqil.export.load import load_export
    from cqil.export.write import export_model

    original = make_model("llama").to(CUDA, torch.bfloat16)
    model = parallelized(original, "lp", "fixed")
    export_model(model, tmp_path / "model")
    exported = load_export(tmp_path / "model", dtype="bfloat16", device=CUDA)
    out = measure_latency(
        {"original": original, "merged": model, "exported": exported},
        prefill_lens=(64, 4096),
        new_tokens=8,
        reps=2,
        ideal=8 / 6,
        progress=False,
    )
    assert out["modes"] == ["eager", "graph"] and out["decode_mode"] == "graph"
    assert out["prefill_lens"] == [64, 256]  # capped by the tiny model's context
    for name in ("merged", "exported"):
        assert set(out["speedup"][name]) >= {"prefill_64", "prefill_256", "decode_eager", "decode_graph"}
        assert out["speedup"][name]["decode"] == out["speedup"][name]["decode_graph"] > 0


def test_recovery_step_bench_runs_on_cuda():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "bench/recovery_step.py", "--model", "tiny", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["setup"]["device"] == "cuda" and summary["same_losses_ours_naive"]


@pytest.fixture
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_twenty_trainer_steps_with_export_on_cuda(tmp_path, fresh_accelerate_state):
    from cqil.export.load import load_export
    from cqil.recovery.recipe import recipe_from_dict
    from cqil.recovery.trainer import run

    original = make_model("llama")
    original.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    write_corpus(tmp_path / "train.jsonl.gz")
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(tmp_path / "model"), "dtype": "bfloat16"},
            "parallelize": {"groups": PLAN, "bypass": "lp", "gates": "fixed"},
            "train": {
                "max_steps": 20,
                "seq_len": 16,
                "micro_batch_size": 2,
                "grad_accum_steps": 1,
                "lr": 1e-3,
                "warmup_steps": 2,
                "log_every_steps": 5,
                "trackers": [],
                "save_every_steps": 10,
                "loss": {"kd": 1.0, "lm": 0.5},
            },
            "data": {"train": str(tmp_path / "train.jsonl.gz"), "eval_fraction": 0.2},
            "eval": {
                "num_sequences": 4,
                "latency_prefill_len": 32,
                "latency_new_tokens": 8,
                "latency_reps": 1,
            },
            "output_dir": str(tmp_path / "run"),
        }
    )
    assert run(recipe) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["steps"] == 20 and results["recovered"]["ppl"] < results["parallelized"]["ppl"]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    latency = report["latency"]
    assert (
        latency["device_type"] == "cuda" and latency["decode_mode"] == "graph"
    )  # the export, graph-replayed
    exported = load_export(tmp_path / "run" / "model", dtype="bfloat16", device=CUDA)
    ids = prompt()
    with torch.no_grad():
        cached = exported.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        recomputed = exported.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
