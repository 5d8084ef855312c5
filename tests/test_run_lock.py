"""The claim a run holds on its output folder (cqil.recovery.run_lock), without any model.

Claim and refuse, release, a stale claim by heartbeat and by a dead process (PID reuse included), a
race of several processes for one stale claim (exactly one wins), a heartbeat that keeps a live claim
fresh, a holder that notices it lost its claim, a requeue of the same Slurm job, and the verdict the
main process gives the other ranks under ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cqil.errors import CqilError, OutputDirError
from cqil.recovery import run_lock
from cqil.recovery.run_lock import LOCK_NAME, ClaimRefused, claim, read_claim

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)


def foreign_claim(out: Path, *, age: float, stale_after: float = 60.0, **fields) -> dict:
    """A claim written by a run on another machine, its last heartbeat ``age`` seconds ago."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "host": "node-elsewhere",
        "pid": 4242,
        "since_utc": "2026-01-01 00:00:00 UTC",
        "slurm_job_id": "981",
        "slurm_restart_count": "0",
        "token": "f" * 32,
        "heartbeat_s": stale_after / 6,
        "stale_after_s": stale_after,
        **fields,
    }
    path = out / LOCK_NAME
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age, time.time() - age))
    return record


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_claim_refuse_release(tmp_path):
    out = tmp_path / "a" / "run"
    held = claim(out, heartbeat_s=5)
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["token"] == held.token and record["stale_after_s"] == 30
    before = files(out)
    with pytest.raises(ClaimRefused) as refused:
        claim(out, heartbeat_s=5)
    message = str(refused.value)
    assert isinstance(refused.value, OutputDirError) and isinstance(refused.value, CqilError)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "heartbeat 0 s ago" in message
    assert "\n" not in message and str(out) in message
    assert files(out) == before  # the refused run wrote nothing
    held.release()
    held.release()  # idempotent
    assert not (tmp_path / "a").exists()  # the folders the claim made, empty again, are removed
    again = claim(out, heartbeat_s=5)
    (out / "cqil_run.json").write_text("{}")
    again.release()
    assert files(out) == {"cqil_run.json": b"{}"}  # a folder with a run's files stays


def test_a_live_claim_on_another_machine_is_refused_a_stale_one_taken_over(tmp_path):
    out = tmp_path / "run"
    foreign_claim(out, age=5)
    with pytest.raises(
        ClaimRefused, match=r"pid 4242 on node-elsewhere, Slurm job 981 attempt 0, since 2026"
    ):
        claim(out, heartbeat_s=5)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == 4242
    foreign_claim(out, age=61)
    lines = []
    with claim(out, heartbeat_s=5, log=lines.append) as held:
        assert json.loads((out / LOCK_NAME).read_text())["token"] == held.token
    assert "took over" in lines[0] and "heartbeat stopped 61 s ago (stale after 60 s)" in lines[0]
    assert list(out.iterdir()) == []  # no takeover marker or moved claim left behind


HOLDER = """
import sys, time
from cqil.recovery.run_lock import claim
c = claim(sys.argv[1], heartbeat_s=float(sys.argv[2]))
print("claimed", flush=True)
time.sleep(float(sys.argv[3]))
c.release()
"""


def holder(out: Path, heartbeat_s: float = 30, hold_s: float = 60, **env) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(heartbeat_s), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_stale_by_a_dead_process_on_this_machine(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)  # a heartbeat every 30 s: only the process check can find it dead soon
    try:
        with pytest.raises(ClaimRefused, match=f"pid {proc.pid} on"):
            claim(out, heartbeat_s=5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = []
    with claim(out, heartbeat_s=5, log=lines.append):
        pass
    assert f"its process {proc.pid} has ended" in lines[0]


def test_a_reused_pid_does_not_keep_a_claim(tmp_path):
    out = tmp_path / "run"
    held = claim(out, heartbeat_s=5)
    record = json.loads((out / LOCK_NAME).read_text())
    held._stop.set()  # as if this process had died, and its PID now belonged to another process
    record |= {"pid_start": record["pid_start"] + 1, "token": "e" * 32}
    (out / LOCK_NAME).write_text(json.dumps(record))
    lines = []
    with claim(out, heartbeat_s=5, log=lines.append):
        pass
    assert f"its process {os.getpid()} has ended" in lines[0]


RACER = """
import sys, time
from cqil.recovery.run_lock import ClaimRefused, claim
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    c = claim(sys.argv[1], heartbeat_s=5, log=lambda line: None)
except ClaimRefused as e:
    print("refused", e, flush=True)
else:
    print("won", flush=True)
    sys.stdin.read()  # held until every racer has answered, however slow the machine
    c.release()
"""


@pytest.mark.parametrize("round_", range(3))
def test_racing_for_a_stale_claim_exactly_one_wins(tmp_path, round_):
    out = tmp_path / "run"
    foreign_claim(out, age=120)
    start = time.time() + 0.7  # every racer started and imported by then
    racer = [sys.executable, "-c", RACER, str(out), str(start)]
    procs = [
        subprocess.Popen(racer, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    results = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.communicate(timeout=60)
    assert sorted(r.split()[0] for r in results) == ["refused", "refused", "refused", "won"], results
    assert not list(out.iterdir())  # the winner released; nobody left a takeover marker behind


def test_the_heartbeat_keeps_a_live_claim_fresh(tmp_path):
    out = tmp_path / "run"
    held = claim(out, heartbeat_s=0.2)
    try:
        time.sleep(1.6)  # longer than the 1.2 s stale timeout
        record, age = read_claim(out / LOCK_NAME)
        elsewhere = record | {"host": "node-elsewhere"}  # judged by its heartbeat alone
        assert run_lock.stale_reason(elsewhere, age, 0.2) is None, age
        held._stop.set()  # a hung holder: no more heartbeats
        time.sleep(1.6)
        record, age = read_claim(out / LOCK_NAME)
        assert "heartbeat stopped" in run_lock.stale_reason(elsewhere, age, 0.2)
        assert run_lock.stale_reason(record, age, 0.2) is None  # here its process is alive: never stale
    finally:
        held._stop.set()
        (out / LOCK_NAME).unlink()


def test_a_holder_that_lost_its_claim_stops_and_leaves_the_new_one(tmp_path):
    out = tmp_path / "run"
    lost = threading.Event()
    held = claim(out, heartbeat_s=0.1, on_lost=lambda c: lost.set())
    other = foreign_claim(out, age=0)
    assert lost.wait(5)
    assert "pid 4242 on node-elsewhere" in held.lost
    held.release()
    assert json.loads((out / LOCK_NAME).read_text())["token"] == other["token"]


def test_an_unreadable_claim_is_judged_by_its_age(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")  # a creator killed between creating the file and writing it
    monkeypatch.setattr(run_lock, "UNREADABLE_GRACE_S", 0.2)
    with pytest.raises(ClaimRefused, match="a run still writing its claim"):
        claim(out, heartbeat_s=5)
    old = time.time() - 31
    os.utime(out / LOCK_NAME, (old, old))
    with claim(out, heartbeat_s=5, log=lambda line: None) as held:
        assert read_claim(out / LOCK_NAME)[0]["token"] == held.token


def test_a_requeue_of_the_same_job_waits_for_the_old_attempt(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    old = claim(out, heartbeat_s=0.2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lines = []
    t = time.monotonic()
    with pytest.raises(ClaimRefused, match="attempt 0.*an earlier attempt of this job that is still running"):
        claim(out, heartbeat_s=0.2, log=lines.append)
    assert time.monotonic() - t >= 1.2  # it waited one stale timeout for the old attempt to stop
    assert "earlier attempt of this job" in lines[0]
    run_lock.refuse_if_claimed(out)  # the read-only check lets a requeue through to that wait
    threading.Timer(0.3, old.release).start()  # the old attempt ends while the new one waits
    with claim(out, heartbeat_s=0.2, log=lines.append) as new:
        assert read_claim(out / LOCK_NAME)[0]["slurm_restart_count"] == "1" and new.token != old.token
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with claim(out, heartbeat_s=0.2), pytest.raises(ClaimRefused):
        claim(out, heartbeat_s=0.2)  # the same attempt twice (two runs in one allocation): no wait


def test_refuse_if_claimed_covers_the_folders_inside_a_held_one(tmp_path):
    out = tmp_path / "run"
    with claim(out, heartbeat_s=5):
        for path in (out, out / "evaluation", out / "model" / "sub"):
            with pytest.raises(ClaimRefused, match=str(out)):
                run_lock.refuse_if_claimed(path)
    run_lock.refuse_if_claimed(out / "evaluation")


class OneProcess:
    num_processes, is_main_process, device = 1, True, "cpu"


def test_claim_checked_checks_then_claims(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    calls = []
    held, checked = run_lock.claim_checked(out, OneProcess(), lambda: calls.append(1) or "checked")
    assert calls == [1] and checked == "checked" and (out / LOCK_NAME).is_file()
    with pytest.raises(ClaimRefused):  # refused before the checks, which would read a busy folder
        run_lock.claim_checked(out, OneProcess(), lambda: calls.append(2))
    assert calls == [1]
    held.release()

    def check_while_another_run_writes():  # a holder that ended between the checks and the claim
        calls.append(3)
        if len(calls) == 2:
            (out / "cqil_run.json").write_text("{}")

    held, _ = run_lock.claim_checked(out, OneProcess(), check_while_another_run_writes)
    assert calls == [1, 3, 3]  # checked again, under the claim
    held.release()

    def bad_input():
        if len(calls) > 3:
            raise OutputDirError("bad")
        calls.append(4)
        (out / "eval.json").write_text("{}")

    with pytest.raises(OutputDirError, match="bad"):
        run_lock.claim_checked(out, OneProcess(), bad_input)
    assert not (out / LOCK_NAME).exists()  # released when the second check refuses


def test_a_run_that_claims_during_the_checks_is_reported_not_its_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    racing = []

    def check_while_another_run_starts():  # it claims and begins its marker while these checks read
        racing.append(claim(out, heartbeat_s=5))
        (out / ".cqil_run.json.tmp").write_text("{")
        raise OutputDirError(f"output_dir {out} is not empty and is not a cqil run")

    with pytest.raises(ClaimRefused, match=rf"is in use by another run: pid {os.getpid()} "):
        run_lock.claim_checked(out, OneProcess(), check_while_another_run_starts)
    racing[0].release()

    def foreign_folder():
        raise OutputDirError(f"output_dir {out} is not empty and is not a cqil run")

    with pytest.raises(OutputDirError, match="is not a cqil run") as refused:  # no holder: its own error
        run_lock.claim_checked(out, OneProcess(), foreign_folder)
    assert type(refused.value) is OutputDirError and not (out / LOCK_NAME).exists()


def test_heartbeat_setting(monkeypatch):
    monkeypatch.setenv(run_lock.HEARTBEAT_ENV, "0.5")
    assert run_lock.heartbeat_interval() == 0.5
    monkeypatch.setenv(run_lock.HEARTBEAT_ENV, "soon")
    with pytest.raises(OutputDirError, match="CQIL_LOCK_HEARTBEAT_S='soon'"):
        run_lock.heartbeat_interval()
    assert run_lock.is_lock_file(".cqil.lock") and run_lock.is_lock_file(".cqil.lock.ab.takeover")
    assert not run_lock.is_lock_file("cqil_run.json")


RANKS = """
import os, sys
from accelerate import Accelerator
from cqil.errors import CqilError
from cqil.recovery.run_lock import claim_checked
acc = Accelerator()
try:
    held, _ = claim_checked(sys.argv[1], acc, lambda: None)
except CqilError as e:
    os.write(1, f"rank {acc.process_index} refused: {e}\\n".encode())  # one write: lines never interleave
    sys.exit(2)
os.write(1, f"rank {acc.process_index} holds: {held is not None}\\n".encode())
acc.wait_for_everyone()
if held is not None:
    held.release()
"""


@pytest.mark.distributed
def test_only_the_main_process_claims_and_every_rank_hears_its_verdict(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "launch/accelerate/cpu_ddp.yaml"), "--num_processes", "2", str(script), str(out),
    ]  # fmt: skip
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert sorted(line for line in ok.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 holds: True",
        "rank 1 holds: False",
    ]
    with claim(out, heartbeat_s=5):
        refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0
    lines = sorted(line for line in refused.stdout.splitlines() if line.startswith("rank"))
    assert [line.split(":")[0] for line in lines] == ["rank 0 refused", "rank 1 refused"]
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]  # the same message on every rank


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_and_export_do_not_write_into_a_live_run(tmp_path, capsys, command):
    from cqil.cli import main

    out = tmp_path / "run"
    with claim(out, heartbeat_s=5):
        before = files(out)
        target = out / ("evaluation" if command == "evaluate" else "model")
        assert main([command, str(tmp_path / "anything"), "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"cqil: error: output_dir {out} is in use by another run: pid {os.getpid()}")
        assert "\n" not in err and files(out) == before
