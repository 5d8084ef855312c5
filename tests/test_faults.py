"""Bad input and faults of a recovery run, through the real ``cqil recover`` entry (in-process).

Bad input: one ``cqil: error: ...`` line naming the culprit, exit status 2, and ``output_dir`` exactly as
it was (same files, same bytes). Faults: damaged checkpoints fall back to the newest intact one and still
end bit-identical; exploded weights are never checkpointed; a full disk leaves no temporary folder.
One run per folder (cqil.recovery.run_lock): of two runs started together, with the same recipe or
another, one runs to the end as if alone and the other refuses in one line naming it; a SIGKILLed run's
claim is taken over and the run resumes; a run that holds the folder but stopped moving (a requeue's
lingering old attempt) is never disturbed, and the requeued attempt waits for it before refusing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cqil.cli import main
from cqil.recovery.checkpoint import list_checkpoints, trim_metrics
from cqil.testing import make_model, make_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    write_corpus(root / "train.jsonl.gz")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(root / "gpt2")
    recipe = {
        "model": {"name_or_path": str(root / "model")},
        "parallelize": {"groups": "2-6:2"},
        "train": {
            "max_steps": 4,
            "seq_len": 16,
            "micro_batch_size": 2,
            "grad_accum_steps": 1,
            "lr": 3e-3,
            "log_every_steps": 1,
            "save_every_steps": 2,
            "keep_checkpoints": 5,
            "trackers": [],
            "loss": {"kd": 1.0, "hidden": 0.1},
        },
        "data": {"train": str(root / "train.jsonl.gz"), "eval_fraction": 0.2},
        "eval": {"num_sequences": 2, "before": False, "report": False},
        "output_dir": str(root / "unused"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def recover(root: Path, out: Path, *overrides: str) -> int:
    return main(["recover", str(root / "recipe.yaml"), f"output_dir={out}", *overrides])


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with the SHA-256 of its bytes (folders as None)."""
    if not folder.exists():
        return {"<absent>": None}
    if folder.is_file():
        return {"<file>": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        )
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished(root, tmp_path_factory):
    """One complete run (checkpoints at steps 2 and 4), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert recover(root, out) == 0
    return out


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


# Each case: overrides, a setup of the file system (given root and output_dir), the message's regex.
def _file(out: Path):
    out.write_text("not a folder")


def _under_file(out: Path):
    out.parent.write_text("x")  # output_dir is <tmp>/blocker/run


def _foreign(out: Path):
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "model").mkdir()
    (out / "model" / "weights.safetensors").write_bytes(b"\0" * 10)


BAD_INPUT = {
    "groups out of range": (["parallelize.groups=[[7,8,9]]"], None, r"parallelize\.groups.*8 layers"),
    "no group of two layers": (
        ["parallelize.groups=[[2],[3]]"],
        None,
        r"parallelize\.groups: .*no group of two",
    ),
    "unsupported architecture": (
        ["model.name_or_path={root}/gpt2"],
        None,
        r"model\.name_or_path: .*GPT2LMHeadModel",
    ),
    "missing local model": (
        ["model.name_or_path={root}/nope/model"],
        None,
        r"model\.name_or_path: .*nope/model",
    ),
    "seq_len above positions": (
        ["train.seq_len=4096"],
        None,
        r"train\.seq_len: 4096 > .*max_position_embeddings 256",
    ),
    "eval.seq_len above positions": (
        ["eval.seq_len=512"],
        None,
        r"eval\.seq_len: 512 > .*max_position_embeddings 256",
    ),
    "eval.seq_len zero": (["eval.seq_len=0"], None, r"eval\.seq_len=0: must be >= 1"),
    "infinite lr": (["train.lr=.inf"], None, r"train\.lr=\.inf: must be a finite number"),
    "nan in a list": (["train.adam_betas=[.nan, 0.9]"], None, r"train\.adam_betas=.*finite number"),
    "override not a number": (["train.lr=abc"], None, r"<command line>: train\.lr=abc: expected a number"),
    "output_dir is a file": ([], _file, r"output_dir .* is not a folder"),
    "output_dir under a file": ([], _under_file, r"lies under .*blocker, which is a file"),
    "foreign non-empty folder": ([], _foreign, r"is not empty and is not a cqil run"),
    "gguf of groups that do not fold": (
        ["export.gguf=q8_0", "parallelize.gates=learned"],
        None,
        r"export\.gguf: .*bypass: lp and gates: fixed",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_leaves_output_dir_untouched(case, root, tmp_path, capsys):
    overrides, setup, pattern = BAD_INPUT[case]
    out = tmp_path / "run"
    if case == "output_dir under a file":
        out = tmp_path / "blocker" / "run"
    if setup is not None:
        setup(out)
    before = snapshot(out)
    code = recover(root, out, *(o.format(root=root) for o in overrides))
    assert code == 2
    assert re.search(pattern, one_error_line(capsys)), case
    assert snapshot(out) == before


def test_bad_recipe_files(root, tmp_path, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["recover", str(binary)]) == 2
    assert "binary.yaml: <root>: not a text file" in one_error_line(capsys)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert main(["recover", str(listed)]) == 2
    assert "list.yaml: <root>: the top level must be a mapping" in one_error_line(capsys)


def test_unwritable_output_dir(root, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert recover(root, parent / "run") == 2
        assert "is not writable" in one_error_line(capsys)
    finally:
        parent.chmod(0o700)


def test_script_entry_prints_one_line_and_exits_2(root, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train/recover.py"), str(root / "recipe.yaml"), "train.lr=abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: <command line>: train.lr=abc: expected a number, got str 'abc'"
    ]


# ------------------------------------------------------------------------------------ with a run
def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.lr=1.0e-3"], r"train\.lr 0\.003 → 0\.001.*train\.resume=reset_optimizer"),
        (["parallelize.groups=2-4:2"], r"parallelize\.groups \"2-6:2\" → \"2-4:2\".*choose a new output_dir"),
        (["train.seed=1"], r"train\.seed 0 → 1\); these change what the checkpoints are"),
        (["train.lr=1.0e-3", "train.loss.hidden=0.5"], r"train\.loss\.hidden.*choose a new output_dir"),
    ],
)
def test_another_recipe_is_refused_before_anything_is_written(
    root, finished, tmp_path, capsys, overrides, pattern
):

    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    assert recover(root, out, *overrides) == 2
    assert re.search(pattern, one_error_line(capsys))
    assert snapshot(out) == before  # recipe.yaml included


def test_a_run_started_before_a_key_existed_resumes_while_the_recipe_keeps_its_default(
    root, finished, tmp_path, capsys
):
    """A key is added with the default that reproduces the older behaviour: a run whose marker lacks it
    (started by an older cqil) goes on, and is refused only when the recipe sets it otherwise."""
    out = copy_run(finished, tmp_path)
    path = out / "cqil_run.json"
    older = json.loads(path.read_text())
    del older["fingerprint"]["data.repeat_share"]
    path.write_text(json.dumps(older))
    before = snapshot(out)
    assert recover(root, out, "data.repeat_share=0.1") == 2
    assert re.search(r"data\.repeat_share 0\.0 → 0\.1\); these change", one_error_line(capsys))
    assert snapshot(out) == before
    assert recover(root, out) == 0
    marker = json.loads(path.read_text())
    assert marker["fingerprint"]["data.repeat_share"] == 0.0
    assert marker["history"] == older["history"]  # brought up to date, not recorded as a change


def test_metrics_torn_line_and_trim(tmp_path):
    from cqil.evaluation.report import read_history

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    assert [h["step"] for h in read_history(path)] == [1, 2, 3]
    trim_metrics(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncate", "rank file", "empty rank file", "checksums"])
def test_a_damaged_checkpoint_falls_back_and_ends_bit_identical(root, finished, tmp_path, capsys, damage):
    out = copy_run(finished, tmp_path)
    latest = list_checkpoints(out)[-1]
    shutil.rmtree(out / "model")
    (out / "eval.json").unlink()
    if damage == "truncate":
        data = (latest / "trainable.safetensors").read_bytes()
        (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "rank file":
        (latest / "rank-000.pt").unlink()
    elif damage == "empty rank file":
        (latest / "rank-000.pt").write_bytes(b"")
    else:
        (latest / "checksums.json").unlink()
    (out / "checkpoints" / ".step-000009.tmp").mkdir()  # left by a killed run
    assert recover(root, out) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged" in err and "resumed from" in err and "step-000002" in err
    a = json.loads((finished / "eval.json").read_text())
    b = json.loads((out / "eval.json").read_text())
    assert a["trainable_digest"] == b["trainable_digest"]
    assert not (out / "checkpoints" / ".step-000009.tmp").exists()
    history = [json.loads(x)["step"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3, 4]  # no duplicates after the fallback


@pytest.mark.integration
def test_exploded_weights_are_never_checkpointed(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert recover(root, out, "train.lr=1.0e30") == 3
    err = capsys.readouterr().err
    assert "step 2" in err and ("exploded" in err or "not finite" in err or "non-finite" in err)
    assert list_checkpoints(out) == []


@pytest.mark.integration
def test_reset_optimizer_resumes_the_weights_with_the_new_schedule(root, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    assert recover(root, out, "train.max_steps=6", "train.lr=1.0e-3", "train.resume=reset_optimizer") == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["steps"] == 6
    assert results["resume"]["changed"] == {"train.lr": [0.003, 0.001], "train.max_steps": [4, 6]}
    marker = json.loads((out / "cqil_run.json").read_text())
    assert marker["fingerprint"]["train.lr"] == 0.001 and marker["history"][-1]["resume"] == "reset_optimizer"


@pytest.mark.integration
@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_disk_full_is_one_line_and_leaves_no_temporary(root, tmp_path, capsys, monkeypatch, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        import cqil.export.write

        monkeypatch.setattr(cqil.export.write, "export_model", full)
    out = tmp_path / "run"
    assert recover(root, out) == 2
    assert "no space left on the device" in one_error_line(capsys)
    assert not [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.integration
def test_sigterm_during_the_final_evaluation_exits_75_and_a_rerun_finishes(root, tmp_path, monkeypatch):
    import signal

    import cqil.recovery.finish as finish

    original = finish.run_perplexity

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(finish, "run_perplexity", interrupted)
    assert recover(root, out) == 75
    assert not (out / "model").exists()
    monkeypatch.setattr(finish, "run_perplexity", original)
    checkpoints = [p.name for p in list_checkpoints(out)]
    assert recover(root, out) == 0
    assert [p.name for p in list_checkpoints(out)] == checkpoints and (
        out / "model" / "config.json"
    ).is_file()


# ------------------------------------------------------------------------------ one run per folder
# Runs of 30 steps (a checkpoint every 10), long enough for a second run to meet a live one.
THIRTY = ("train.max_steps=30", "train.save_every_steps=10", "train.log_every_steps=10")


def recover_process(root: Path, out: Path, *overrides: str, **env: str) -> subprocess.Popen:
    """``train/recover.py`` in a process of its own (what a second terminal or a second job starts)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train/recover.py"), str(root / "recipe.yaml"), f"output_dir={out}"]
        + [*THIRTY, *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def digest(out: Path) -> str:
    return json.loads((out / "eval.json").read_text())["trainable_digest"]


def consistent_run(out: Path, lr: float) -> None:
    """One run's folder: its recipe, marker and step history agree, and no second run wrote there."""
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["lr"] == lr
    marker = json.loads((out / "cqil_run.json").read_text())
    assert marker["fingerprint"]["train.lr"] == lr and not marker.get("history")
    steps = [json.loads(x)["step"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert not (out / ".cqil.lock").exists()


@pytest.fixture(scope="module")
def thirty(root, tmp_path_factory):
    """The 30-step run, uninterrupted and alone: what every run below must end as."""
    out = tmp_path_factory.mktemp("thirty") / "run"
    assert recover(root, out, *THIRTY) == 0
    return out


@pytest.mark.integration
@pytest.mark.parametrize("lrs", [(3e-3, 3e-3), (1e-4, 5e-4)], ids=["same recipe", "another recipe"])
def test_two_runs_started_together_one_runs_the_other_refuses(root, thirty, tmp_path, lrs):
    out = tmp_path / "run"
    procs = [recover_process(root, out, f"train.lr={lr}") for lr in lrs]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, errs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = [line for line in errs[loser].splitlines() if "error" in line]
    assert len(lines) == 1 and errs[loser].strip().endswith(lines[0]), errs[loser]
    assert re.fullmatch(
        rf"error: output_dir {re.escape(str(out))} is in use by another run: pid {procs[winner].pid} on "
        rf"{re.escape(socket.gethostname())}, since \S+ \S+ UTC, heartbeat \d+ s ago \(.*\.cqil\.lock\); "
        "wait for it to end or stop it, or choose another output_dir",
        lines[0],
    ), lines[0]
    consistent_run(out, lrs[winner])
    if lrs[winner] == 3e-3:
        assert digest(out) == digest(thirty)


@pytest.mark.integration
def test_a_killed_run_leaves_a_stale_claim_that_the_next_run_takes_over(root, thirty, tmp_path, capsys):
    out = tmp_path / "run"
    first = recover_process(root, out)  # the default heartbeat (30 s): only its dead process frees it
    wait_for(out / "checkpoints" / "step-000010", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert json.loads((out / ".cqil.lock").read_text())["pid"] == first.pid  # SIGKILL leaves the claim
    assert recover(root, out, *THIRTY) == 0
    err = capsys.readouterr().err
    assert f"took over {out} from a stale claim (pid {first.pid} on" in err
    assert f"its process {first.pid} has ended" in err and "resumed from" in err
    assert digest(out) == digest(thirty) and not (out / ".cqil.lock").exists()


@pytest.mark.integration
def test_a_live_holder_is_never_disturbed_and_a_requeue_waits_for_the_old_attempt(
    root, thirty, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    job = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0", "CQIL_LOCK_HEARTBEAT_S": "0.5"}
    old = recover_process(root, out, **job)
    try:
        wait_for(out / "checkpoints" / "step-000010", old)
        # The old attempt lingers: alive, but (stopped) neither training nor beating. A process that
        # is alive on this machine keeps its claim whatever its heartbeat says.
        old.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # a write of its in flight lands before the snapshot
        before = snapshot(out)
        assert recover(root, out, *THIRTY, "train.lr=5.0e-4") == 2  # another recipe
        assert re.search(
            rf"in use by another run: pid {old.pid} on .*Slurm job 4242 attempt 0", one_error_line(capsys)
        )
        assert recover(root, out, *THIRTY) == 2  # the same recipe, outside Slurm
        assert "in use by another run" in one_error_line(capsys)
        for key, value in job.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job: same id, next attempt
        start = time.monotonic()
        assert recover(root, out, *THIRTY) == 2
        err = capsys.readouterr().err
        assert time.monotonic() - start > 3  # it gave the old attempt its stale timeout (6 x 0.5 s)
        assert "held by an earlier attempt of this job" in err
        assert "an earlier attempt of this job that is still running" in err
        assert snapshot(out) == before  # none of the three wrote anything
        old.send_signal(signal.SIGKILL)  # the old attempt is gone: the requeue takes over and resumes
        old.wait()
        assert recover(root, out, *THIRTY) == 0
        err = capsys.readouterr().err
        assert "took over" in err and "resumed from" in err
        assert digest(out) == digest(thirty)
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
