"""The benchmark scripts run on tiny models and end with their JSON summary."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def bench_script(name: str, monkeypatch):
    """``bench/<name>.py`` as a module (the scripts import their shared helpers from ``bench/``)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module(name)


@pytest.mark.integration
def test_merged_vs_original_tiny():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "bench/merged_vs_original.py", "--model", "tiny", "--reps", "2", "--no-engines"]
    cmd += ["--prefill-lens", "64", "128", "--new-tokens", "8", "--exported"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["model"] == "tiny" and summary["reps"] == 2 and summary["decode_mode"] == "eager"
    assert summary["ideal"] == pytest.approx(8 / 6, abs=1e-4) and summary["prefill_lens"] == [64, 128]
    names = {"merged_lp_fixed", "merged_cqil_learned", "merged_lp_fixed_exported"}
    assert set(summary["speedup"]) == set(summary["share_of_ideal"]) == names
    assert set(summary["prefill_ms"]) == set(summary["decode_ms"]) == {"original"} | names
    for name in names:
        speed, share, tps = summary["speedup"][name], summary["share_of_ideal"][name], summary["tokens_per_s"]
        assert set(speed) == {"prefill", "decode", "prefill_64", "prefill_128", "decode_eager"}
        for phase in ("prefill_64", "prefill_128", "decode_eager"):  # the ratio is that of the tokens/s
            assert tps[name][phase] / tps["original"][phase] == pytest.approx(speed[phase], rel=1e-3)
            assert share[phase] == pytest.approx((speed[phase] - 1) / (8 / 6 - 1), abs=2e-3)
    assert summary["decode_speedup"] == summary["speedup"]["merged_lp_fixed"]["decode_eager"]
    table = "\n".join(lines)
    assert "share of ideal gain" in table and "merged_lp_fixed_exported" in table and "1.20-1.46x" in table
    rows = [line for line in lines if line.startswith("merged_cqil_learned ")]
    assert len(rows) == 3 and all("1.333x" in row for row in rows)


LLAMA_PYTHON = REPO / ".venv-llama" / "bin" / "python"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def _engines_problem() -> tuple[str, str] | None:
    """Why bench/serving.py cannot run its engines here: ("skip", why) when an engine's environment
    does not exist, ("fail", why) when it exists and the engine or the cqil vLLM plugin is broken."""
    for python, module in ((LLAMA_PYTHON, "llama_cpp"), (VLLM_PYTHON, "vllm, cqil.serving.vllm.model")):
        if not python.is_file():
            return "skip", f"{python} is missing: run scripts/setup_engines.sh"
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        if probe.returncode:
            return "fail", f"{module} does not import in {python}: {probe.stderr.strip()[-1500:]}"
    return None


@pytest.mark.engines
def test_serving_tiny():
    problem = _engines_problem()
    if problem:
        kind, why = problem
        if kind == "skip":
            pytest.skip(why)
        pytest.fail(why)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/serving.py", "--tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]  # every stdout line is JSON
    sections = {(line["section"], line.get("variant")): line for line in lines if "section" in line}
    assert lines[0]["bench"] == "serving" and lines[0]["tiny"] and len(lines[0]["loadavg"]) == 3
    assert {("llama.cpp", "lp"), ("vllm gpu bfloat16", None)} <= set(sections)
    assert {(f"vllm tp{tp}", v) for tp in (1, 2) for v in ("lp", "cqil")} <= set(sections)
    common = {
        "model",
        "plan",
        "layers",
        "prefill_speedup",
        "decode_speedup",
        "ideal_depth",
        "prefill_ms",
        "decode_ms_per_token",
        "reps",
        "loadavg",
    }
    llama = sections["llama.cpp", "lp"]
    assert common | {"ideal_single_thread", "threads", "gguf"} <= set(llama)
    assert llama["threads"] == 1 and llama["ideal_single_thread"] == 1.0
    assert llama["layers"] == {"original": 8, "parallelized": 6}
    assert llama["ideal_depth"] == pytest.approx(8 / 6, abs=1e-4)
    assert set(llama["prefill_ms"]) == set(llama["decode_ms_per_token"]) == {"original", "parallelized"}
    for variant in ("lp", "cqil"):
        tp1, tp2 = sections["vllm tp1", variant], sections["vllm tp2", variant]
        assert common | {
            "tp",
            "compilation",
            "collectives_per_forward",
            "per_rep",
            "throughput_speedup",
        } <= set(tp1)
        assert tp1["collectives_per_forward"] == {"original": 0, variant: 0}
        assert tp2["collectives_per_forward"] == {"original": 16, variant: 12}
        assert tp2["ideal_collectives"] == pytest.approx(16 / 12, abs=1e-4)
        for line in (tp1, tp2):
            assert set(line["prefill_ms"]) == set(line["decode_ms_per_token"]) == {"original", variant}
            # The speedup is the ratio of the medians the line prints.
            ms = line["prefill_ms"]
            assert line["prefill_speedup"] == pytest.approx(ms["original"] / ms[variant], rel=2e-3)
            assert line["compilation"]["mode"] != "NONE"  # timed compiled, as deployed
    for line in lines[1:-1]:
        if "skipped" not in line:
            assert line["prefill_speedup"] > 0 and line["decode_speedup"] > 0
    gpu = sections["vllm gpu bfloat16", None]
    assert "skipped" in gpu or "decode_tok_s" in gpu
    assert lines[-1]["summary"] and "llama.cpp tiny-llama-8L lp" in lines[-1]


@pytest.mark.integration
def test_recovery_quality_one_short_run(tmp_path):
    # cqil_style: LoRA on every layer and bypass none, the branch-by-branch path through adapters.
    # Four of the seven sets (two test sets, two dev sets, the copying probe): what the bench does with
    # a set is the same for each, and every block costs three forward passes of the real model at one
    # thread (the pooling over all of them is checked by the tests above and below).
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "bench/recovery_quality.py", "--recipes", "recipes/cqil_style.yaml"]
    cmd += ["--scales", "0.05", "--heldout-sequences", "6", "--other-sequences", "16", "--threads", "1"]
    cmd += ["--domains", "other_domain", "dev_domain", "chat_dev", "dialogue", "--cache", str(tmp_path)]
    cmd += ["--tasks", "cqil_last_word", "cqil_next_line", "--task-limit", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["recipe"] == "cqil_style" and row["tokens"] == 3 * 512 and row["threads"] == 1
    sets = ("heldout", "other_domain", "dev_domain", "chat_dev", "dialogue", "copying")
    assert set(sets) <= set(row) and not {"discussion_dev", "science_docs", "project_readmes"} & set(row)
    for text in sets:
        r = row[text]
        assert r["original"] < r["rewritten"] and r["recovered"] != r["rewritten"]
        expected = (r["rewritten"] - r["recovered"]) / (r["rewritten"] - r["original"])
        assert r["gap_closed"] == pytest.approx(expected, abs=2e-3)
    # The copying probe repeats the Python reference's blocks' first halves: the copy is easy to predict.
    assert row["copying"]["original"] < row["dev_domain"]["original"] / 2
    # Scored: each block from its second token; the probe's second copy from its second token.
    assert row["dev_domain"]["scored_tokens"] == 16 * 127 and row["copying"]["scored_tokens"] == 16 * 63
    # 16 blocks of the package READMEs, each README packed on its own, reach into the second one.
    docs = row["other_domain"]
    assert docs["tokens"] == 16 * 128 and docs["documents"] == 2
    assert list(docs["gap_closed_by_document"]) == ["accelerate 1.15.0", "datasets 5.2.0"]
    assert all(-1 < g < 1 for g in docs["gap_closed_by_document"].values())
    assert row["dialogue"]["tokens"] == 16 * 128 and len(row["dialogue"]["gap_closed_by_document"]) >= 2
    pooled = row["out_of_domain"]
    assert pooled["sets"] == ["other_domain", "dialogue"]
    assert pooled["gap_closed_by_set"] == {k: row[k]["gap_closed"] for k in pooled["sets"]}
    assert pooled["gap_closed_min"] == min(pooled["gap_closed_by_set"].values())
    dev = row["dev"]
    assert dev["sets"] == ["dev_domain", "chat_dev"]
    assert dev["gap_closed_by_set"] == {k: row[k]["gap_closed"] for k in dev["sets"]}
    assert set(row["heldout"]["gap_closed_by_source"]) == {  # the recipe's data.mixture
        "RedPajamaWikipedia",
        "RedPajamaBook",
        "RedPajamaGithub",
        "SoftwareDocs",
        "MailingLists",
        "Chat",
    }
    # Each task's accuracy for the three models on the same examples, its chance level and the share kept.
    tasks = row["tasks"]
    assert tasks["cqil_last_word"]["examples"] == 4 and tasks["cqil_last_word"]["chance"] == 0.0
    assert tasks["cqil_next_line"]["chance"] == 0.25
    for task in tasks.values():
        acc = task["acc"]
        assert set(acc) == {"original", "rewritten", "recovered"} and all(0 <= v <= 1 for v in acc.values())
        assert len(task["acc_stderr"]) == 3
        if acc["original"] > task["chance"]:
            expected = (acc["recovered"] - task["chance"]) / (acc["original"] - task["chance"])
            assert task["acc_kept"]["recovered"] == pytest.approx(expected, abs=1e-4)
    # --cache: nothing to reuse on the first run; both untrained models' measurements kept for the next.
    assert row["reused"] == []
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json")) == ["original", "rewritten"]


def test_recovery_quality_scales_an_overridden_step_count_and_refuses_a_bad_override(monkeypatch):
    from cqil.recovery.recipe import load_recipe

    bench = bench_script("recovery_quality", monkeypatch)
    steps = ["train.max_steps=60", "train.warmup_steps=10"]
    recipe = load_recipe(REPO / "recipes/smollm2_135m.yaml", ["train.micro_batch_size=4", *steps])
    assert bench.scaled_overrides(recipe, 2, 60 * 512) == ["train.max_steps=120", "train.warmup_steps=20"]
    # Half the tokens a step: twice the steps for the same tokens, the schedule scaled alike.
    half = load_recipe(REPO / "recipes/smollm2_135m.yaml", ["train.micro_batch_size=2", *steps])
    assert bench.scaled_overrides(half, 1, 60 * 512) == ["train.max_steps=120", "train.warmup_steps=20"]
    cmd = [sys.executable, "bench/recovery_quality.py", "--scales", "1", "--set", "train.lr=-1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: <command line>: train.lr=-1: must be > 0; got -1.0"]
    # Another training length is measured on the default's blocks only when eval.seq_len says so.
    cmd = [sys.executable, "bench/recovery_quality.py", "--scales", "1", "--set", "train.seq_len=256"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: recipes/smollm2_135m.yaml: measures in blocks of 256 tokens, the default in 128 "
        "(set eval.seq_len=128)"
    ]


def test_recovery_quality_pools_the_test_sets_by_tokens_and_the_dev_sets_apart(monkeypatch):
    import math

    bench = bench_script("recovery_quality", monkeypatch)

    def measured(**ppl_tokens):
        return {k: {"ppl": p, "nll": math.log(p), "tokens": t} for k, (p, t) in ppl_tokens.items()}

    originals = measured(other_domain=(10.0, 300), dialogue=(20.0, 100), dev_domain=(5.0, 1000))
    before = measured(other_domain=(20.0, 300), dialogue=(40.0, 100), dev_domain=(50.0, 1000))
    after = measured(other_domain=(12.0, 300), dialogue=(30.0, 100), dev_domain=(5.0, 1000))
    row = bench.pooled_row(originals, {"before": before, "after": after})
    assert row["sets"] == ["other_domain", "dialogue"]
    assert row["gap_closed_by_set"] == {"other_domain": 0.8, "dialogue": 0.5}
    assert row["gap_closed_min"] == 0.5
    # Pooled over 400 tokens: exp((300 ln 10 + 100 ln 20) / 400) and so on, not the mean of the sets.
    pooled = [
        math.exp((300 * math.log(a) + 100 * math.log(b)) / 400) for a, b in ((10, 20), (20, 40), (12, 30))
    ]
    assert row["original"] == round(pooled[0], 3) and row["recovered"] == round(pooled[2], 3)
    assert row["gap_closed"] == round((pooled[1] - pooled[2]) / (pooled[1] - pooled[0]), 4)
    # The dev sets pool apart from the test sets, over their own tokens.
    originals |= measured(discussion_dev=(8.0, 1000))
    before |= measured(discussion_dev=(20.0, 1000))
    after |= measured(discussion_dev=(10.0, 1000))
    dev = bench.pooled_row(originals, {"before": before, "after": after}, bench.DEV_DOMAINS)
    assert dev["sets"] == ["dev_domain", "discussion_dev"]
    assert dev["gap_closed_by_set"] == {"dev_domain": 1.0, "discussion_dev": round(10 / 12, 4)}
    assert dev["original"] == round(math.sqrt(5 * 8), 3) and dev["recovered"] == round(math.sqrt(5 * 10), 3)
    assert row["gap_closed"] != round((0.8 + 0.5) / 2, 4)


def test_recovery_quality_summarises_seeds_by_mean_spread_and_the_lowest_sets_mean(monkeypatch):
    import statistics

    bench = bench_script("recovery_quality", monkeypatch)

    def row(seed, held, python, chat, pooled, kept):
        by_set = {"dev_domain": python, "chat_dev": chat}
        return {
            "recipe": "smollm2_135m",
            "scale": 1.0,
            "seed": seed,
            "train_s": 100.0 + seed,
            "heldout": {"gap_closed": held},
            "dev_domain": {"gap_closed": python},
            "chat_dev": {"gap_closed": chat},
            "dev": {
                "sets": ["dev_domain", "chat_dev"],
                "gap_closed": pooled,
                "gap_closed_min": min(by_set.values()),
                "gap_closed_by_set": by_set,
            },
            "tasks": {"cqil_last_word": {"acc_kept": {"rewritten": 0.6, "recovered": kept}}},
        }

    # Each seed's lowest set is a different one; the means' lowest is the Python reference.
    rows = [
        row(0, 0.9, 0.83, 0.88, 0.85, 0.79),
        row(1, 0.95, 0.79, 1.0, 0.86, 0.81),
        row(2, 0.93, 0.84, 0.78, 0.8, 0.8),
    ]
    summary = bench.seed_summary(rows)
    assert summary["seeds"] == [0, 1, 2] and summary["train_s"] == 101.0
    assert set(summary["gap_closed"]) == {"heldout", "dev_domain", "chat_dev"}
    chat = summary["gap_closed"]["chat_dev"]
    assert chat["values"] == [0.88, 1.0, 0.78]
    assert chat["mean"] == round(statistics.fmean([0.88, 1.0, 0.78]), 4)
    assert chat["sd"] == round(statistics.stdev([0.88, 1.0, 0.78]), 4) and chat["sd"] > 0.1
    dev = summary["dev"]
    assert dev["gap_closed_min"]["values"] == [0.83, 0.79, 0.78]
    assert dev["lowest_mean"] == {"set": "dev_domain", "gap_closed": round((0.83 + 0.79 + 0.84) / 3, 4)}
    assert "out_of_domain" not in summary
    assert summary["acc_kept"]["cqil_last_word"]["values"] == [0.79, 0.81, 0.8]
    # One seed has no spread; a seed without a figure (the rewrite opened no gap) leaves no mean.
    assert bench.spread([0.5]) == {"mean": 0.5, "sd": None, "values": [0.5]}
    assert bench.spread([0.5, None]) == {"mean": None, "sd": None, "values": [0.5, None]}
    rows[1]["dev"]["gap_closed_by_set"]["dev_domain"] = rows[1]["dev_domain"]["gap_closed"] = None
    assert bench.seed_summary(rows)["dev"]["lowest_mean"]["set"] == "chat_dev"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seeds", "0", "0"], "error: --seeds: a seed given twice: 0 0"),
        (
            ["--seeds", "1", "--set", "train.seed=3"],
            "error: --seeds and --set train.seed=...: give the seeds one way",
        ),
    ],
)
def test_recovery_quality_refuses_seeds_given_twice(extra, message):
    cmd = [sys.executable, "bench/recovery_quality.py", "--scales", "1", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == message


def test_recovery_quality_refuses_an_unknown_set():
    cmd = [sys.executable, "bench/recovery_quality.py", "--domains", "news"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "argument --domains: invalid choice: 'news'" in proc.stderr


def test_recovery_quality_refuses_a_count_of_no_blocks():
    cmd = [sys.executable, "bench/recovery_quality.py", "--other-sequences", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip().splitlines()[-1].endswith("argument --other-sequences: must be at least 1, got 0")
    )


def test_gpu_latency_smoke_runs_the_library_timing_on_tiny_shapes(monkeypatch, capsys):
    """bench/gpu_latency.py --smoke: the GPU script's every section, on the CPU, in seconds."""

    gpu_latency = bench_script("gpu_latency", monkeypatch)
    gpu_latency.main(["--smoke"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sections = [line["section"] for line in lines]
    assert sections == ["env", "correctness", "correctness", "correctness", "latency", "done"]
    for check in lines[1:4]:
        assert "error" not in check, check
        assert check["merged_vs_branches_rel_fp32"] < 1e-5 and check["cached_eq_recompute_float32"]
    latency = lines[4]
    assert "error" not in latency, latency
    assert latency["modes"] == ["eager"] and latency["prefill_lens"] == [16, 64]
    assert latency["ideal_depth"] == {
        "2-6:2_lp_fixed": 1.3333,
        "2-6:2_cqil_learned": 1.3333,
        "2-8:3_lp_fixed": 2.0,
    }
    for variant, speedup in latency["speedup"].items():
        assert set(speedup) == {"prefill_16", "prefill_64", "decode_eager"}
        for phase, x in speedup.items():
            ms = latency["median_ms"]
            assert x == pytest.approx(ms["original"][phase] / ms[variant][phase], rel=2e-3)
            ideal = latency["ideal_depth"][variant]
            assert latency["share_of_ideal"][variant][phase] == pytest.approx((x - 1) / (ideal - 1), abs=2e-3)


def test_bench_scripts_share_the_library_timing():
    """One timing path: no bench script but the vLLM ones keeps its own timer or interleaving loop."""
    converted = ["merged_vs_original.py", "gpu_latency.py", "recovery_step.py", "coalesce_vs_parallel.py"]
    converted += ["analysis_memory.py", "data_stream.py", "plan_search.py", "zero3_memory.py"]
    for name in converted:
        text = (REPO / "bench" / name).read_text()
        assert "from _common import" in text and "perf_counter" not in text and "statistics" not in text, name


@pytest.mark.parametrize("variant", ["ours", "naive", "cqil_style"])
def test_recovery_step_puts_the_whole_step_on_the_device(variant, monkeypatch):
    """The student and its teacher (the RecoveryModel's layer copies, naive's whole copy) move together:
    on the meta device here, as they must on CUDA."""
    import argparse

    recovery_step = bench_script("recovery_step", monkeypatch)
    args = argparse.Namespace(model="tiny", groups="2-6:2", dtype="float32", lm_weight=0.0)
    model, _, modules = recovery_step.make_step(args, variant, torch.device("meta"))
    assert model in modules and len(modules) == 2
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device.type == "meta", f"{variant}: {name} stayed on {tensor.device}"


def test_recovery_step_bf16_is_the_same_step_under_autocast(monkeypatch):
    import argparse

    recovery_step = bench_script("recovery_step", monkeypatch)
    args = argparse.Namespace(model="tiny", groups="2-6:2", dtype="float32", lm_weight=0.5)
    model, full, _ = recovery_step.make_step(args, "ours")
    _, half, _ = recovery_step.make_step(args, "ours_bf16")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = full(ids), half(ids)  # the same weights (make_step seeds them) and batch
    assert a != b and b == pytest.approx(a, rel=0.02)


def test_recovery_quality_task_rows_give_the_share_of_the_margin_above_chance_kept(monkeypatch):
    bench = bench_script("recovery_quality", monkeypatch)

    def acc(a, n=500):
        return {"acc": a, "acc_stderr": 0.02, "samples": n}

    rows = bench.task_rows(
        {
            "cqil_next_sentence": {**acc(0.40), "chance": 0.25},
            "cqil_last_word": {**acc(0.40), "chance": 0.0},
            "t": acc(0.2),
        },
        {"cqil_next_sentence": acc(0.25), "cqil_last_word": acc(0.30), "t": acc(0.1)},
        {"cqil_next_sentence": acc(0.325), "cqil_last_word": acc(0.325), "t": acc(0.3)},
    )
    assert rows["cqil_next_sentence"]["acc_kept"] == {"rewritten": 0.0, "recovered": 0.5}
    assert rows["cqil_last_word"]["chance"] == 0.0
    assert rows["cqil_last_word"]["acc_kept"] == {"rewritten": 0.75, "recovered": 0.8125}
    assert rows["cqil_next_sentence"]["acc"] == {"original": 0.4, "rewritten": 0.25, "recovered": 0.325}
    assert "acc_kept" not in rows["t"] and "chance" not in rows["t"]  # chance unknown
    # A chance the harness reports wins; an original at chance keeps nothing measurable.
    at_chance = bench.task_rows({"t": {**acc(0.25), "chance": 0.25}}, {"t": acc(0.3)}, {"t": acc(0.3)})
    assert at_chance["t"]["acc_kept"] == {"rewritten": None, "recovered": None}


def test_recovery_quality_label_names_one_recipe_and_qualifies_several(monkeypatch):
    bench = bench_script("recovery_quality", monkeypatch)
    assert bench.label("lp_style", None, several=True) == "lp_style"
    assert bench.label("lp_style", "lr 3e-4", several=False) == "lr 3e-4"
    assert bench.label("lp_style", "lr 3e-4", several=True) == "lp_style lr 3e-4"


ORPHAN = """
import os, subprocess, sys, time
if sys.argv[1] == "parent":
    child = subprocess.Popen([sys.executable, __file__, "child", str(os.getpid())], stdout=subprocess.PIPE)
    print(child.pid, child.stdout.readline().decode().strip(), flush=True)
    time.sleep(120)
else:
    sys.path.insert(0, os.environ["BENCH_DIR"])
    import recovery_quality
    from cqil.recovery.preemption import StopSignals
    recovery_quality.end_with_parent(int(sys.argv[2]))
    StopSignals().install()  # as the trainer does: SIGTERM is a preemption notice, not an end
    print("ready", flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_recovery_quality_run_ends_with_the_bench_that_started_it(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    env = dict(os.environ, BENCH_DIR=str(REPO / "bench"), PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, env=env)
    child_pid, ready = parent.stdout.readline().decode().split()
    assert ready == "ready"
    parent.kill()  # as a test's timeout kills the bench: no handler runs in it
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        os.kill(int(child_pid), signal.SIGKILL)
        pytest.fail("the training run outlived the bench that started it")


def test_recovery_quality_refuses_an_unknown_task_before_any_model_loads():
    cmd = [sys.executable, "bench/recovery_quality.py", "--scales", "1", "--tasks", "cqil_last_wrd"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --tasks: unknown lm-eval task 'cqil_last_wrd'")
    )


def test_serving_leaves_out_a_cpu_time_ratio_the_clock_cannot_resolve(monkeypatch):
    bench = bench_script("serving", monkeypatch)

    tick = bench.CPU_TICK_S
    # A tiny model's prefill reads 0 or 1 tick: no ratio, not a division by zero.
    assert bench.cpu_ratio([tick, 0.0, tick], [0.0, 0.0, tick]) is None
    assert bench.cpu_ratio([0.0], [1.0]) is None
    # Measurable on both sides: the ratio of the medians, a slowdown reading below 1.
    assert bench.cpu_ratio([1.0, 0.5, 2.0], [2.0, 4.0, 1.0]) == pytest.approx(0.5)


def test_recovery_quality_cache_is_keyed_by_what_the_untrained_measurements_depend_on(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from cqil.recovery.recipe import load_recipe

    bench = bench_script("recovery_quality", monkeypatch)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    sets = {}
    for name in ("other_domain", "dev_domain"):
        sets[name] = tmp_path / f"{name}.jsonl.gz"
        sets[name].write_bytes(name.encode())
    monkeypatch.setattr(bench, "DOMAINS", sets)
    args = SimpleNamespace(domains=list(sets), other_sequences=16, tasks=["cqil_last_word"], task_limit=4)

    def keys(*overrides, **changed):
        recipe = load_recipe(REPO / "recipes/smollm2_135m.yaml", [f"model.name_or_path={model}", *overrides])
        a = SimpleNamespace(**{**vars(args), **changed})
        return bench.measurement_key(a, recipe, rewritten=False), bench.measurement_key(
            a, recipe, rewritten=True
        )

    original, rewritten = keys()
    assert original != rewritten and original["measured"] == "original"
    # What a run trains, and on what text, changes neither.
    assert keys("train.lr=1e-3", "train.max_steps=17", "data.mixture={RedPajamaBook: 1.0}") == (
        original,
        rewritten,
    )
    # The rewrite changes the rewritten model's key alone.
    other_plan = keys("parallelize.bypass=none")
    assert other_plan[0] == original and other_plan[1] != rewritten
    # The length a run trains on changes neither while the blocks measured stay; the blocks change both.
    assert keys("train.seq_len=256", "train.micro_batch_size=1", "eval.seq_len=128") == (original, rewritten)
    longer = keys("eval.seq_len=256")
    assert longer[0] != original and longer[1] != rewritten
    assert keys(other_sequences=8) != (original, rewritten)
    for changed in (sets["dev_domain"], model / "model.safetensors"):
        changed.write_bytes(b"changed")
        now = keys()
        assert now[0] != original and now[1] != rewritten
        original, rewritten = now

    calls, reused = [], []
    cache = tmp_path / "cache"

    def measure():
        calls.append(1)
        return {"other_domain": {"ppl": 12.5}}, {"cqil_last_word": {"acc": 0.25}}

    first = bench.reuse(cache, lambda: original, measure, reused)
    again = bench.reuse(cache, lambda: original, measure, reused)
    assert first == again == [{"other_domain": {"ppl": 12.5}}, {"cqil_last_word": {"acc": 0.25}}]
    assert len(calls) == 1 and reused == ["original"]
    bench.reuse(cache, lambda: rewritten, measure, reused)  # another key: measured, not read
    assert len(calls) == 2 and reused == ["original"] and len(list(cache.glob("*.json"))) == 2
    assert bench.reuse(None, lambda: original, measure, reused) == measure() and len(calls) == 4


def test_recovery_quality_refuses_a_cache_that_is_a_file_or_a_damaged_entry(monkeypatch, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    cmd = [sys.executable, "bench/recovery_quality.py", "--scales", "1", "--cache", str(not_a_folder)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: --cache: {not_a_folder} exists and is not a folder"]

    bench = bench_script("recovery_quality", monkeypatch)
    key = {"measured": "original", "sets": {}}
    cache = tmp_path / "kept"
    bench.reuse(cache, lambda: key, lambda: ({}, {}), [])
    (entry,) = cache.glob("*.json")
    entry.write_text('{"key": ')  # cut short
    with pytest.raises(SystemExit, match=f"--cache: {entry} is not a measurement this script wrote"):
        bench.reuse(cache, lambda: key, lambda: ({}, {}), [])


def test_teacher_text_continues_openings_of_each_source_by_weight_reproducibly(monkeypatch, tmp_path):
    import gzip

    from cqil.testing import SENTENCES, SOURCES, make_model, make_tokenizer, write_corpus

    bench = bench_script("teacher_text", monkeypatch)
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "train.jsonl.gz", repeats=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name_or_path: {model_dir}}}\n"
        f"data: {{train: {corpus}, mixture: {{RedPajamaBook: 0.5, RedPajamaWikipedia: 0.25, "
        "RedPajamaGithub: 0.25, Teacher: 0.2}}\n"
        "parallelize: {groups: [[1, 2]]}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )

    def written(name: str, seed: int) -> list[dict]:
        out = tmp_path / name
        argv = [str(out), "--recipe", str(recipe), "--documents", "8", "--prefix-tokens", "4"]
        assert bench.main([*argv, "--new-tokens", "5", "--batch-size", "3", "--seed", str(seed)]) == 0
        with gzip.open(out, "rt") as f:
            return [json.loads(line) for line in f]

    records = written("a.jsonl.gz", 0)
    # Openings by weight (Teacher itself is not a source of openings): 4 / 2 / 2 of 8.
    titles = [r["meta"]["title"] for r in records]
    assert sorted(titles) == sorted(
        ["continuation of RedPajamaBook"] * 4
        + ["continuation of RedPajamaWikipedia"] * 2
        + ["continuation of RedPajamaGithub"] * 2
    )
    assert {r["meta"]["redpajama_set_name"] for r in records} == {"Teacher"}
    openings = {
        s: {" ".join(t.split()[:4]) for t, src in zip(SENTENCES, SOURCES, strict=True) if src == s}
        for s in SOURCES
    }
    for r in records:
        words = r["text"].split()
        assert " ".join(words[:4]) in openings[r["meta"]["title"].split()[-1]]
        assert len(words) <= 4 + 5  # the opening and five sampled tokens (special ones are not text)
    assert max(len(r["text"].split()) for r in records) == 4 + 5
    assert written("b.jsonl.gz", 0) == records  # the seed decides the samples
    assert written("c.jsonl.gz", 1) != records
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "a.jsonl.gz"), "--recipe", str(recipe)])  # never overwritten


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{train: MISSING, mixture: {A: 1.0}}", "missing.jsonl.gz"),
        ("{train: CORPUS}", "data.mixture names no source to take openings from"),
    ],
)
def test_teacher_text_refuses_a_recipe_it_cannot_read_in_one_line_and_writes_nothing(tmp_path, data, message):
    from cqil.testing import write_corpus

    corpus = write_corpus(tmp_path / "train.jsonl.gz", repeats=1)
    data = data.replace("MISSING", str(tmp_path / "missing.jsonl.gz")).replace("CORPUS", str(corpus))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{name_or_path: smollm2-135m}}\ndata: {data}\nparallelize: {{groups: [[1, 2]]}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    out = tmp_path / "teacher.jsonl.gz"
    cmd = [sys.executable, "bench/teacher_text.py", str(out), "--recipe", str(recipe)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "train.jsonl.gz"]
