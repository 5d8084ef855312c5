"""Two CPU processes under `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3 on a tiny random Llama.

Each run trains a few steps and must lower the loss and leave every non-trainable weight bit-identical
(the trainer checks a digest of them and records it). Under DDP, ZeRO-2 and ZeRO-3 a run is SIGKILLed
after its first checkpoint and resumed; its final trainable weights must equal an uninterrupted run's.
ZeRO-3 loads the model partitioned (cqil.recovery.sharded): its surgery and teacher copy must equal the
whole-model path's bit for bit (tests/zero3_equivalence.py, under torchrun).
The first DeepSpeed run compiles DeepSpeed's CPU communication op (about a minute, cached).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cqil.testing import make_model, make_tokenizer, write_corpus

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ddp": ROOT / "launch/accelerate/cpu_ddp.yaml",
    "zero2": ROOT / "launch/accelerate/zero2.yaml",
    "zero3": ROOT / "launch/accelerate/zero3.yaml",
}
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_model("llama")
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    write_corpus(root / "train.jsonl.gz", repeats=40)
    (root / "recipe.yaml").write_text(
        f"""
model: {{name_or_path: {root / "model"}}}
parallelize: {{groups: "2-6:2"}}
train: {{max_steps: {STEPS}, seq_len: 16, micro_batch_size: 2, grad_accum_steps: 2, lr: 3.0e-3, warmup_steps: 1,
        log_every_steps: 1, save_every_steps: 2, keep_checkpoints: 5, trackers: [],
        loss: {{kd: 1.0, lm: 0.5, hidden: 0.1}}}}
data: {{train: {root / "train.jsonl.gz"}, eval_fraction: 0.2}}
eval: {{num_sequences: 4}}
output_dir: {root / "unused"}
"""
    )
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(setup: Path, kind: str, out: Path, *overrides: str) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if kind == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # with multi-GPU mode: N CPU processes (--cpu starts one)
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS[kind]), "--num_processes", "2", "--main_process_port", str(free_port()),
        str(ROOT / "train/recover.py"), str(setup / "recipe.yaml"), f"output_dir={out}", *overrides,
    ]  # fmt: skip
    return cmd, env


def launch(setup: Path, kind: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd, env = command(setup, kind, out, *overrides)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(stderr: str) -> list[float]:
    return [float(line.split("| loss ")[1].split()[0]) for line in stderr.splitlines() if "| loss " in line]


def check_run(out: Path, stderr: str) -> dict:
    result = json.loads((out / "eval.json").read_text())
    curve = losses(stderr)
    assert len(curve) == STEPS
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve  # the loss goes down
    assert result["recovered"]["ppl"] < result["parallelized"]["ppl"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    return result


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (the ranks run in sessions of their own, so a process-group
    kill would miss them and leave them hanging on a collective)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for row in rows.splitlines():
        pid, ppid = map(int, row.split())
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def kill_after_first_checkpoint(setup: Path, kind: str, out: Path) -> None:
    cmd, env = command(setup, kind, out)
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: a full pipe would stall the run
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 400
    try:
        while not (out / "checkpoints" / "step-000002").is_dir():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        for pid in process_tree(proc.pid):  # the launcher and both ranks, mid-step
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "eval.json").exists()


@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3"])
def test_sigkill_and_resume_is_bit_identical(setup, kind, tmp_path):
    full = tmp_path / "full"
    result = check_run(full, launch(setup, kind, full).stderr)

    killed = tmp_path / "killed"
    kill_after_first_checkpoint(setup, kind, killed)
    proc = launch(setup, kind, killed)
    assert "resumed from" in proc.stderr
    resumed = json.loads((killed / "eval.json").read_text())
    assert resumed["trainable_digest"] == result["trainable_digest"]
    assert resumed["frozen_digest"] == result["frozen_digest"]
    assert resumed["recovered"]["ppl"] == result["recovered"]["ppl"]


def test_zero3_trains_and_keeps_frozen_weights(setup, tmp_path):
    # With the layer after the last group trained too: the teacher's partitioned copies hold it.
    after = "train.layers_after_groups=1"
    out = tmp_path / "z3"
    stderr = launch(setup, "zero3", out, after).stderr
    result = check_run(out, stderr)
    assert "loading the model partitioned over 2 ranks" in stderr
    # launch/deepspeed/zero3.json's "auto" buffers, sized from the tiny model's hidden size 48.
    assert "reduce_bucket_size=2,304" in stderr and "stage3_param_persistence_threshold=480" in stderr
    ddp_out = tmp_path / "ddp"
    reference = check_run(ddp_out, launch(setup, "ddp", ddp_out, after).stderr)
    # The trainer itself raises if the frozen weights changed; they must also equal DDP's.
    assert result["frozen_digest"] == reference["frozen_digest"]
    # The original and the parallelized model, measured through the engine from partitions, are DDP's.
    for key in ("original", "parallelized"):
        assert result[key]["ppl"] == reference[key]["ppl"], key
    assert result["recovered"]["ppl"] == pytest.approx(reference["recovered"]["ppl"], rel=1e-4)


def test_zero3_partitioned_surgery_equals_the_whole_model_path(setup):
    """Teacher copy, parallelized student and its logits from partitions, against the whole model."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "tests/zero3_equivalence.py"), str(setup / "model"), "2-6:2",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    report = json.loads(line[len("RESULT ") :])
    assert report["world"] == 2
    assert report["whole_on_rank"] == 0  # no rank holds any weight whole after loading
    assert report["share"] <= 0.5  # each rank holds half of every large weight
    assert report["teacher_equal"] and report["keys_equal"] and report["weights_equal"], report
    assert report["logits_max_diff"] == 0.0
