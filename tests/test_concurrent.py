"""Concurrent groups over CPU ranks (gloo): the sharded model equals the whole one, on 2 and 3 processes.

Every case builds a tiny parallelized model on each rank (same seed), computes the whole model's
logits and greedy tokens, shards it, and computes them again; the ranks write what they saw to JSON
and this process asserts. Cases cover every bypass mode (lp with gates at 1 and trained away from 1,
none, cqil with distance 1 and 2), both forms, both transports (torch.distributed's gloo and shared
memory), groups smaller than the world (an idle rank) and a triple, single-layer groups, padding,
and the errors. Plus ``cqil.serving.serve`` under torchrun on a tiny export and ``bench/concurrent_groups.py --tiny``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cqil
from cqil.export.load import load_export
from cqil.export.write import export_model
from cqil.rewrite.group import ParallelGroup
from cqil.serving.concurrent import (
    GroupShard,
    check_world_size,
    generate_greedy,
    make_communicator,
    shard_model,
)
from cqil.serving.serve import main as serve_main
from cqil.testing import VOCAB, make_model, make_tokenizer

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` on ``world_size`` processes; none outlives this call."""
    context = mp.start_processes(
        fn, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises if a rank failed (and terminates the others)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def run_command(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, killed whole (launcher and ranks) if it overruns."""
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def build(case: dict):
    model = make_model(case["arch"])
    cqil.parallelize(
        model,
        case["plan"],
        bypass=case["bypass"],
        bypass_distance=case.get("distance", 1),
        gates=case.get("gates", "learned"),
        gate_shape=case.get("gate_shape", "scalar"),
        form=case["form"],
    )
    if case.get("perturb", True):  # as after training: gates away from their initial values
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, gates in model.named_parameters():
                if name.endswith(".gates"):
                    gates.add_(0.3 * torch.randn(gates.shape, generator=generator))
    return model


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    if not case.get("padded"):
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first sequence
    return ids, mask


def group_parameters(model) -> int:
    """Parameters of the groups (whole) or of the group shards (this rank's), by number."""
    layers = [layer for layer in model.model.layers if isinstance(layer, (ParallelGroup, GroupShard))]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def greedy_without_cache(model, ids, steps, mask=None):
    """Greedy tokens recomputing the whole sequence each step (positions as generate() derives them)."""
    mask = torch.ones_like(ids) if mask is None else mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


def equivalence_ranks(rank: int, world_size: int, port: int, cases: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(seconds=TIMEOUT_S)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timeout
    )
    comms = {t: make_communicator(t, timeout=timeout) for t in ("torch", "shm")}
    results = []
    for case in cases:
        model = build(case)
        ids, mask = inputs(case)
        with torch.no_grad():
            whole = model(ids, attention_mask=mask, output_hidden_states=True)
            whole_tokens = model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        before = group_parameters(model)
        shard_model(model, comms[case["transport"]])
        shards = [layer for layer in model.model.layers if isinstance(layer, GroupShard)]
        with torch.no_grad():
            got = model(ids, attention_mask=mask, output_hidden_states=True)
            tokens = model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            greedy = generate_greedy(model, ids, NEW_TOKENS, attention_mask=mask)
            nocache = greedy_without_cache(model, ids, NEW_TOKENS, mask)
        results.append(
            {
                "case": case,
                "max_diff": (got.logits - whole.logits).abs().max().item(),
                "hidden_states": [len(got.hidden_states), len(whole.hidden_states)],
                "hidden_diff": max(
                    (a - b).abs().max().item()
                    for a, b in zip(got.hidden_states, whole.hidden_states, strict=True)
                ),
                "logits": got.logits.flatten().tolist()[:64],
                "generate_equal": torch.equal(tokens, whole_tokens),
                "greedy_equal": torch.equal(greedy, whole_tokens),
                "nocache_equal": torch.equal(nocache, whole_tokens),
                "shards": [(s.branch, s.exchange_kind) for s in shards],
                "kept_fraction": group_parameters(model) / before,
            }
        )
    # A group with more branches than ranks is refused, naming both numbers.
    too_wide = build({"arch": "llama", "plan": [[1, 2, 3]], "bypass": "lp", "form": "merged"})
    try:
        shard_model(too_wide, comms["shm"])
        refused = ""
    except ValueError as e:
        refused = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results, "refused": refused}, f)
    dist.barrier()
    dist.destroy_process_group()


def cases_for(world_size: int) -> list[dict]:
    modes = [
        dict(bypass="lp", gates="fixed", perturb=False),  # shared MLP input: two all-reduces
        dict(bypass="lp"),  # trained gates: all-gather, then one all-reduce
        dict(bypass="lp", gate_shape="channel"),
        dict(bypass="none"),
        dict(bypass="cqil", distance=1),
        dict(bypass="cqil", distance=2, gate_shape="channel"),
    ]
    if world_size == 2:
        plan = "2-6:2"
        cases = [
            dict(m, arch="llama", form=f, transport="shm") for m in modes for f in ("merged", "branches")
        ]
        cases += [dict(m, arch="llama", form="merged", transport="torch") for m in modes]
        cases += [
            dict(m, arch=a, form="merged", transport="shm") for a in ("qwen2", "qwen3") for m in modes[1::3]
        ]
        cases += [
            dict(arch="mistral", bypass="lp", form="merged", transport="shm", padded=True),
            dict(arch="mistral", bypass="cqil", form="branches", transport="torch", padded=True),
            # Single-layer groups are plain layers, replicated on every rank.
            dict(arch="llama", bypass="lp", form="merged", transport="shm", plan=[[1], [3, 4], [6]]),
        ]
    else:  # a pair (rank 2 idles) and a triple (cqil distance 2 reads two branches back)
        plan = [[1, 2], [4, 5, 6]]
        cases = [dict(m, arch="llama", form="merged", transport="shm") for m in modes]
        cases += [dict(m, arch="qwen3", form="branches", transport="torch") for m in modes[1::2]]
    return [dict({"plan": plan}, **c) for c in cases]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"ranks{world_size}")
    run_ranks(equivalence_ranks, world_size, cases_for(world_size), str(out))
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return world_size, per_rank


def test_sharded_model_equals_the_whole_model(ranks):
    world_size, per_rank = ranks
    for rank, seen in enumerate(per_rank):
        assert len(seen["results"]) == len(cases_for(world_size))
        for result in seen["results"]:
            name = f"rank {rank} {result['case']}"
            assert result["max_diff"] <= 1e-5, f"{name}: max |logit diff| {result['max_diff']:.2e}"
            assert result["hidden_states"][0] == result["hidden_states"][1], name
            assert result["hidden_diff"] <= 1e-5, name
            assert result["generate_equal"], f"{name}: generate() tokens differ"
            assert result["greedy_equal"], f"{name}: generate_greedy tokens differ"
            assert result["nocache_equal"], f"{name}: tokens without the KV cache differ"
    # Every rank ends with the same logits: the replicated layers and the head see identical inputs.
    for rank in range(1, world_size):
        for a, b in zip(per_rank[0]["results"], per_rank[rank]["results"], strict=True):
            assert a["logits"] == b["logits"], f"rank {rank} {a['case']}"


def test_each_rank_keeps_only_its_branches(ranks):
    world_size, per_rank = ranks
    for rank, seen in enumerate(per_rank):
        for result in seen["results"]:
            case, shards = result["case"], result["shards"]
            degrees = [len(g) for g in cqil.GroupPlan.parse(case["plan"], 8).groups if len(g) > 1]
            assert len(shards) == len(degrees), case
            for (branch, kind), degree in zip(shards, degrees, strict=True):
                assert branch == (rank if rank < degree else None)
                expected = {"none": "none", "cqil": "cqil"}.get(case["bypass"])
                if expected is None:
                    expected = "shared" if case.get("gates") == "fixed" else "gathered"
                assert kind == expected, case
            if world_size == 2 and case["plan"] == "2-6:2":
                # Two pairs fill layers 1..4 of 6 effective ones; each rank holds about half of them.
                assert 0.45 < result["kept_fraction"] < 0.55, (case, result["kept_fraction"])


def test_a_group_wider_than_the_world_is_refused(ranks):
    world_size, per_rank = ranks
    for seen in per_rank:
        if world_size == 2:
            assert "3 branches" in seen["refused"] and "only 2 ranks" in seen["refused"]
        else:
            assert seen["refused"] == ""  # 3 ranks hold a triple


def test_refusals_without_a_process_group():
    model = build({"arch": "llama", "plan": [[1, 2, 3], [5, 6]], "bypass": "none", "form": "merged"})
    with pytest.raises(ValueError, match=r"group \[1, 2, 3\] has 3 branches but there are only 2 ranks"):
        check_world_size(model, 2)
    check_world_size(model, 3)
    with pytest.raises(ValueError, match="not parallelized"):
        check_world_size(make_model("llama"), 2)
    with pytest.raises(ValueError, match="transport must be one of"):
        make_communicator("mpi")


# ---------------------------------------------------------------------------------------------- serve


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny cqil export whose greedy continuation decodes to words (its head favours known tokens)."""
    tokenizer = make_tokenizer()
    model = build({"arch": "mistral", "plan": "2-6:2", "bypass": "cqil", "form": "merged"})
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] = 0
    folder = export_model(model, tmp_path_factory.mktemp("serve") / "export", tokenizer=tokenizer)
    return folder, tokenizer


def test_serve_prints_what_the_whole_model_generates(export):
    folder, tokenizer = export
    prompt = "the river flows to the"
    model = load_export(folder)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    tokens = generate_greedy(
        model, ids, NEW_TOKENS, eos_token_id=eos if eos is not None else tokenizer.eos_token_id
    )
    expected = tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected.strip(), "the test export should continue with words"

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "cqil.serving.serve", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS),
    ]  # fmt: skip
    proc = run_command(cmd, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines() == [expected], proc.stdout  # rank 0 alone prints


def test_serve_errors_name_the_problem(export, tmp_path, monkeypatch, capsys):
    folder, _ = export
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert serve_main(["--model", str(folder), "--prompt", "x"]) == 2
    assert "largest group has 2 branches" in capsys.readouterr().err

    monkeypatch.setenv("WORLD_SIZE", "2")
    plain = tmp_path / "plain"
    make_model("llama").save_pretrained(plain)
    assert serve_main(["--model", str(plain), "--prompt", "x"]) == 2
    assert "not a cqil export" in capsys.readouterr().err

    assert serve_main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err

    bare = tmp_path / "bare"
    model = build({"arch": "llama", "plan": "2-6:2", "bypass": "lp", "form": "merged"})
    export_model(model, bare)  # no tokenizer
    assert serve_main(["--model", str(bare), "--prompt", "x"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bench


def test_bench_tiny_prints_the_summary():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = run_command([sys.executable, "bench/concurrent_groups.py", "--tiny"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = {"prefill", "decode"}
    for key in ("speedup_b_over_a", "ideal", "efficiency", "speedup_b_over_c", "speedup_b_over_d"):
        assert set(summary[key]) == phases, key
        assert all(v > 0 for v in summary[key].values()), key
    for phase in phases:
        # Amdahl's limit for pairs lies between 1 and 2, and at or below L/L_eff's share of it.
        assert 1 < summary["ideal"][phase] < 2
        assert summary["efficiency"][phase] == pytest.approx(
            summary["speedup_b_over_a"][phase] / summary["ideal"][phase], rel=1e-3
        )
    assert summary["L_over_L_eff"] == pytest.approx(8 / 6, abs=1e-4)
    assert set(summary["prefill_ms"]) == {"original", "concurrent", "threads", "tensor", "hybrid"}
    assert max(summary["max_abs_logit_diff"].values()) < 1e-4
