"""Bad input and faults of a recovery run, through the real ``cqil recover`` entry (in-process).

Bad input: one ``cqil: error: ...`` line naming the culprit, exit status 2, and ``output_dir`` exactly as
it was (same files, same bytes). Faults: damaged checkpoints fall back to the newest intact one and still
end bit-identical; exploded weights are never checkpointed; a full disk leaves no temporary folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
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
