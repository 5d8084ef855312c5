"""The ``cqil`` console script: one-line input errors with exit status 2, and ``analyze`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cqil.cli import main
from cqil.testing import make_model, make_tokenizer, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny random Llama and its tokenizer saved as a Hugging Face folder."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def assert_one_line_error(capsys, *fragments: str) -> None:
    # Anything before the error line is transformers' own progress bars (loading the model).
    err = capsys.readouterr().err
    *before, last = err.splitlines()
    assert last.startswith("cqil: error: ") and err.endswith("\n"), err
    assert "Traceback" not in err and not any("error" in line for line in before), err
    for fragment in fragments:
        assert fragment in last, err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["fetch-model", "gpt5"], "invalid choice: 'gpt5'"),
        (["analyze", "--model", "m"], "required: --data, --out"),
        (["analyze", "--model", "m", "--data", "x", "--out", "o", "--groups", "two"], "invalid int value"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert_one_line_error(capsys, fragment)


def test_missing_data_file(capsys, tmp_path):
    argv = [
        "analyze",
        "--model",
        "smollm2-135m",
        "--data",
        str(tmp_path / "nope.jsonl"),
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert_one_line_error(capsys, "nope.jsonl", "no such file")


def test_unknown_model(capsys, tmp_path):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    argv = [
        "analyze",
        "--model",
        str(tmp_path / "missing-model"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert_one_line_error(capsys, "missing-model", "not an embedded model")


def test_non_empty_out_is_refused_before_loading(capsys, tmp_path):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "similarity.json").write_text("{}")
    argv = ["analyze", "--model", str(tmp_path / "missing-model"), "--data", str(data), "--out", str(out)]
    assert main(argv) == 2
    assert_one_line_error(capsys, "out", "not empty")
    assert (out / "similarity.json").read_text() == "{}"


def test_impossible_plan(capsys, tmp_path, tiny_model_dir):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    out = tmp_path / "out"
    argv = [
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--groups",
        "5",
    ]
    assert main(argv) == 2
    assert_one_line_error(capsys, "5 groups of 2 layers need 10 layers but the model has 8")
    assert not out.exists()  # refused before any measurement


@pytest.mark.integration
def test_analyze_end_to_end(tmp_path, tiny_model_dir):
    data = write_corpus(tmp_path / "calib.jsonl.gz")
    out = tmp_path / "report"
    argv = ["analyze", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--groups", "1", "3", "--seq-len", "16", "--num-sequences", "4", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "cqil", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "similarity.json").read_text())
    assert [p["num_groups"] for p in report["plans"]] == [1, 3]
    assert (out / "similarity.png").stat().st_size > 0
    # The table: a header, the original model, then one row per group count.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["groups", "plan"])
    assert lines[header].split()[5:] == ["ppl", "lp", "ppl", "none", "ppl", "cqil", "ppl", "coalesce"]
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert rows[0][1] == "original" and rows[1][0] == "1x2" and rows[2][0] == "3x2"
    assert rows[2][1] == report["plans"][1]["spec"]
