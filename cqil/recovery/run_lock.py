"""One run owns its output folder: an exclusive claim, made atomically, kept fresh by a heartbeat.

The claim is ``output_dir/.cqil.lock``, created with ``O_CREAT | O_EXCL``, atomic on a local disk and
on the shared filesystems clusters use (NFS v3 and later, Lustre, GPFS): of two runs started at the
same moment exactly one creates it. Its JSON record (:func:`identity`) names host, PID, the process's
start time, boot and PID-namespace ids (a live process, not a reused PID), when the run started, its
Slurm job id, array task and restart count, its command, a token unique to the claim, and the
heartbeat interval and stale timeout it promises. A daemon thread touches the file every
``heartbeat_s`` seconds (the mtime is the heartbeat) and checks it still carries its token. A claim is
**stale** when

- its holder ran on this machine (same host, boot and PID namespace) and that process has ended (no
  such PID, a zombie, or a PID reused by a process that started at another time), or the machine
  has rebooted since; a holder process still alive here is never stale, however old its heartbeat;
- otherwise (another machine, or one that cannot be checked), when its heartbeat is older than the
  stale timeout it wrote (:data:`STALE_HEARTBEATS` heartbeats; clocks are assumed to agree to well
  under that, as NTP keeps them).

A stale claim is taken over without a race: the taker first creates ``.cqil.lock.<token>.takeover``
with ``O_EXCL`` (only one run may take over a given stale claim), renames the lock to a unique name,
checks that what it moved is the claim it judged stale (else it links it back: it was a new holder's)
and only then creates a new lock with ``O_EXCL``. Every loser refuses. A holder whose heartbeat finds
another token in the file has lost the folder and stops its process (``KeyboardInterrupt`` in the
main thread) before it writes more; the trainer turns that into one :class:`ClaimLost` line.

A second run refuses with one line naming the holder (:class:`ClaimRefused`, an
:class:`~cqil.errors.OutputDirError`: exit status 2) and writes nothing. One exception waits first:
an earlier attempt of the *same* Slurm job (same ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``,
i.e. a requeue whose old process still holds the folder) is given one stale timeout to stop; if its
claim is released or goes stale meanwhile the new attempt takes over, otherwise it refuses too.

This module imports nothing from the trainer; :func:`claim_checked` is the entry a multi-process run
uses (only the main process claims; the other ranks receive its verdict). It is a little
longer than 500 lines because the claim, its stale rules, the takeover and the ranks' verdict are one
protocol, best read and changed in one place.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cqil.errors import CqilError, OutputDirError, StorageError

LOCK_NAME = ".cqil.lock"
HEARTBEAT_ENV = "CQIL_LOCK_HEARTBEAT_S"  # the heartbeat interval, seconds (tests shorten it)
DEFAULT_HEARTBEAT_S = 30.0
STALE_HEARTBEATS = 6  # missed heartbeats before a claim on another machine counts as abandoned
TAKEOVER_EXPIRES_S = 60.0  # a takeover marker older than this was left by a taker that died
UNREADABLE_GRACE_S = 2.0  # how long a claim may stay unreadable while its creator writes it
VERDICT_BYTES = 4096  # the main process's verdict, sent to the other ranks as UTF-8 JSON


class ClaimRefused(OutputDirError):
    """``output_dir`` is held by another live run; the message names the holder."""


class ClaimLost(OutputDirError):
    """This run's claim on ``output_dir`` passed to another run while it ran; it stopped writing."""


def raise_if_lost(claim: Claim | None) -> None:
    """Raise :class:`ClaimLost` if ``claim`` was lost (its heartbeat then interrupted the main thread)."""
    if claim is not None and claim.lost is not None:
        raise ClaimLost(
            f"{claim.out}: this run lost its claim on the folder ({claim.lost}) and stopped writing"
        ) from None


def is_lock_file(name: str) -> bool:
    """Whether a file name in ``output_dir`` is the claim or one of its transient companions."""
    return name == LOCK_NAME or name.startswith(LOCK_NAME + ".")


def heartbeat_interval() -> float:
    value = os.environ.get(HEARTBEAT_ENV) or str(DEFAULT_HEARTBEAT_S)
    with contextlib.suppress(ValueError):
        if 0.05 <= float(value) <= 3600:
            return float(value)
    raise OutputDirError(f"{HEARTBEAT_ENV}={value!r}: expected seconds between 0.05 and 3600")


# ------------------------------------------------------------------------------ who holds it
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from /proc, or None if unreadable."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _machine() -> dict:
    """What tells this machine and PID space apart: two processes with all three equal share PIDs."""
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
    }


def identity(heartbeat_s: float) -> dict:
    """The record this process writes in its claim."""
    now = time.time()
    started = _start_ticks(os.getpid())
    env = os.environ
    return {
        **_machine(),
        "pid": os.getpid(),
        "pid_start": started[1] if started else None,
        "since": now,
        "since_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT"),
        "command": shlex.join([sys.executable, *sys.argv])[:2000],
        "token": uuid.uuid4().hex,
        "heartbeat_s": heartbeat_s,
        "stale_after_s": STALE_HEARTBEATS * heartbeat_s,
    }


def read_claim(path: Path) -> tuple[dict | None, float] | None:
    """(record, heartbeat age in seconds) of the claim at ``path``; None if there is none.

    The record is None while its creator is still writing it (or if a run died in between); the
    age, from the file's mtime, still tells how long ago. Opening the file (rather than a plain
    stat) makes an NFS client fetch fresh attributes.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise StorageError(f"cannot read the claim {path} ({e.strerror or e})") from None
    try:
        age = max(0.0, time.time() - os.fstat(fd).st_mtime)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, age
    return (record if isinstance(record, dict) and "token" in record else None), age


def _same_machine(record: dict, here: dict) -> bool:
    return all(record.get(k) is not None and record.get(k) == v for k, v in here.items())


def _process_gone(record: dict) -> bool | None:
    """Whether the holder's process has ended (True), is alive (False), or cannot be told (None)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    started = _start_ticks(pid)
    if started is not None:
        state, ticks = started
        if state in ("Z", "X"):
            return True
        if record.get("pid_start") is not None:
            return ticks != record["pid_start"]  # another start time: the PID was reused
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's, and its start time is hidden from us (/proc hidepid)
    return None


def stale_reason(record: dict | None, age: float, default_heartbeat_s: float) -> str | None:
    """Why the claim is stale, or None while its holder may still be alive."""
    if record is not None and record.get("host") == socket.gethostname():
        here = _machine()
        if record.get("boot_id") and here["boot_id"] and record["boot_id"] != here["boot_id"]:
            return "this machine has restarted since it was made"
        if _same_machine(record, here):
            gone = _process_gone(record)
            if gone is True:
                return f"its process {record.get('pid')} has ended"
            if gone is False:
                return None
    limit = STALE_HEARTBEATS * default_heartbeat_s
    if record is not None:
        with contextlib.suppress(TypeError, ValueError):
            limit = float(record.get("stale_after_s") or limit)
    if age > limit:
        return f"its heartbeat stopped {age:.0f} s ago (stale after {limit:.0f} s)"
    return None


def describe(record: dict | None, age: float) -> str:
    """The holder in a few words: pid, host, Slurm job, since when, heartbeat age."""
    if record is None:
        return f"a run still writing its claim (heartbeat {age:.0f} s ago)"
    job = ""
    if record.get("slurm_job_id"):
        job = f", Slurm job {record['slurm_job_id']}"
        if record.get("slurm_array_task_id") is not None:
            job += f" (array {record.get('slurm_array_job_id')}_{record['slurm_array_task_id']})"
        if record.get("slurm_restart_count") is not None:
            job += f" attempt {record['slurm_restart_count']}"
    return (
        f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('since_utc')}, "
        f"heartbeat {age:.0f} s ago"
    )


def _earlier_attempt_of_this_job(record: dict | None) -> bool:
    """A claim made by another attempt of this very Slurm job (a requeue whose old process lingers)."""
    job = os.environ.get("SLURM_JOB_ID")
    return (
        record is not None
        and bool(job)
        and record.get("slurm_job_id") == job
        and record.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT")
    )


def _refusal(out: Path, record: dict | None, age: float, note: str = "") -> ClaimRefused:
    return ClaimRefused(
        f"output_dir {out} is in use by another run: {describe(record, age)}{note} "
        f"({out / LOCK_NAME}); wait for it to end or stop it, or choose another output_dir"
    )


def refuse_if_claimed(path: str | os.PathLike, *, heartbeat_s: float | None = None) -> None:
    """Raise :class:`ClaimRefused` if ``path`` or a folder above it is held by a live run (reads only).

    An earlier attempt of this Slurm job is let through: :func:`claim` waits for it.
    """
    heartbeat_s = heartbeat_s or heartbeat_interval()
    folder = Path(os.path.abspath(path))
    for d in (folder, *folder.parents):
        found = read_claim(d / LOCK_NAME)
        if found is None:
            continue
        record, age = found
        if stale_reason(record, age, heartbeat_s) is None and not _earlier_attempt_of_this_job(record):
            raise _refusal(d, record, age)


# ------------------------------------------------------------------------------ the claim
def _tidy(takeover: Path | None, created: list[Path]) -> None:
    """Remove this run's takeover marker and the folders it made for its claim, if they are empty."""
    if takeover is not None:
        with contextlib.suppress(OSError):
            takeover.unlink(missing_ok=True)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


class Claim:
    """A held claim on ``output_dir``; :meth:`release` gives it up (idempotent)."""

    def __init__(self, out: Path, record: dict, created: list[Path], takeover: Path | None, on_lost):
        self.out, self.path, self.record = out, out / LOCK_NAME, record
        self.token, self.pid = record["token"], os.getpid()
        self._created, self._takeover, self._on_lost = created, takeover, on_lost
        self.lost: str | None = None  # why the claim was lost, if it was
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cqil-run-lock", daemon=True)
        self._thread.start()
        # Also at an exit that skips the owner's cleanup; a SIGKILL skips this too: the heartbeat stops.
        atexit.register(self.release)

    def _still_mine(self) -> bool:
        found = read_claim(self.path)
        return found is not None and found[0] is not None and found[0].get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.record["heartbeat_s"]):
            try:
                if not self._still_mine():
                    found = read_claim(self.path)
                    self.lost = f"{self.path} now names {describe(*found) if found else 'no run'}"
                    self._on_lost(self)
                    return
                # A taker may have replaced the file since the check: touching its file is harmless.
                os.utime(self.path)
            except OSError as e:  # a filesystem hiccup: try again next beat; the timeout has slack
                print(f"cqil: could not refresh {self.path}: {e}", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still this run's (never another's)."""
        if self._stop.is_set() or os.getpid() != self.pid:  # a forked child never releases its parent's
            return
        self._stop.set()
        atexit.unregister(self.release)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if self._still_mine():
                os.unlink(self.path)
        _tidy(self._takeover, self._created)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stop_main_thread(claim: Claim) -> None:
    import _thread

    print(
        f"cqil: this run lost its claim on {claim.out} ({claim.lost}); stopping", file=sys.stderr, flush=True
    )
    _thread.interrupt_main()


def _make_dirs(out: Path) -> list[Path]:
    """Create ``out`` and its missing parents; the ones created, outermost first."""
    missing = []
    d = out
    while not d.exists() and d.parent != d:
        missing.append(d)
        d = d.parent
    out.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _try_takeover(out: Path, stale: dict | None) -> tuple[bool, Path | None]:
    """Remove the stale claim ``stale`` if no other run is doing so; (removed or gone, takeover marker)."""
    lock = out / LOCK_NAME
    marker = out / f"{LOCK_NAME}.{(stale or {}).get('token', 'unreadable')}.takeover"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        found = read_claim(marker)
        if found is not None and found[1] > TAKEOVER_EXPIRES_S:  # its taker died mid-way
            marker.unlink(missing_ok=True)
        return False, None
    aside = out / f"{LOCK_NAME}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True, marker
    moved = read_claim(aside)
    moved_token = moved[0].get("token") if moved and moved[0] else None
    if moved_token != (stale or {}).get("token"):
        # Not the claim judged stale but a new holder's, made after it vanished: put it back.
        with contextlib.suppress(OSError):  # EEXIST: yet another run claimed it in between
            os.link(aside, lock)
        aside.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        return False, None
    aside.unlink(missing_ok=True)
    return True, marker


def claim(
    output_dir: str | os.PathLike,
    *,
    heartbeat_s: float | None = None,
    log: Callable[[str], None] | None = None,
    on_lost: Callable[[Claim], None] = _stop_main_thread,
) -> Claim:
    """Claim ``output_dir`` (created if missing) for this process, or raise :class:`ClaimRefused`."""
    out = Path(output_dir)
    heartbeat_s = heartbeat_s or heartbeat_interval()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    record = identity(heartbeat_s)
    data = json.dumps(record, indent=1).encode("utf-8")
    try:
        created = _make_dirs(out)
    except OSError as e:
        raise StorageError(f"output_dir {out}: cannot create it ({e.strerror or e})") from None
    lock, takeover = out / LOCK_NAME, None
    waited_since = None
    unreadable_since = None
    for _ in range(10_000):  # every pass either ends or waits; a bound against a livelock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except FileNotFoundError:  # a holder that made the folder removed it, empty, on leaving
            created += _make_dirs(out)
            continue
        except OSError as e:
            _tidy(takeover, created)
            raise StorageError(f"output_dir {out}: cannot create {lock} ({e.strerror or e})") from None
        else:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            for p in out.glob(f"{LOCK_NAME}.*"):  # left by takers that died mid-way (not one at work)
                found = read_claim(p) if p != takeover else None
                if found is not None and found[1] > TAKEOVER_EXPIRES_S:
                    p.unlink(missing_ok=True)
            return Claim(out, record, created, takeover, on_lost)
        found = read_claim(lock)
        if found is None:  # released between our attempt and the read: try again at once
            continue
        holder, age = found
        if holder is None:  # its creator is writing it right now (or died doing so): look again shortly
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since < UNREADABLE_GRACE_S:
                time.sleep(0.05)
                continue
        reason = stale_reason(holder, age, heartbeat_s)
        if reason is None:
            if _earlier_attempt_of_this_job(holder):
                limit = float(holder.get("stale_after_s") or STALE_HEARTBEATS * heartbeat_s)
                if waited_since is None:
                    waited_since = time.monotonic()
                    log(
                        f"cqil: {out} is held by an earlier attempt of this job ({describe(holder, age)}); "
                        f"waiting up to {limit:.0f} s for it to stop"
                    )
                if time.monotonic() - waited_since < limit + heartbeat_s:
                    time.sleep(min(heartbeat_s, 1.0))
                    continue
                _tidy(takeover, created)
                raise _refusal(out, holder, age, ", an earlier attempt of this job that is still running")
            _tidy(takeover, created)  # a run that took over a stale claim lost the race for the new one
            raise _refusal(out, holder, age)
        removed, marker = _try_takeover(out, holder)
        if removed:
            takeover = marker
            log(f"cqil: took over {out} from a stale claim ({describe(holder, age)}): {reason}")
        else:
            time.sleep(0.05)  # another run is taking it over: its new claim decides the next pass
    raise ClaimRefused(f"output_dir {out}: could not claim {lock}: other runs keep contending for it")


# ------------------------------------------------------------------------------ several ranks
def folder_state(out: Path) -> list:
    """A cheap signature of what a run leaves in ``out``: the names two levels deep (checkpoints and
    exports appear by renaming) and the size and mtime of its top-level files (the marker). Files that
    grow in place (logs) do not count: a changed one would only cost a second check."""
    state = []
    with contextlib.suppress(OSError):
        for p in sorted(Path(out).iterdir()):
            if is_lock_file(p.name):
                continue
            with contextlib.suppress(OSError):
                if p.is_dir():
                    state.append([p.name, sorted(q.name for q in p.iterdir())])
                else:
                    st = p.stat()
                    state.append([p.name, st.st_size, st.st_mtime_ns])
    return state


def _share(accelerator, verdict: dict | None) -> dict:
    """The main process's verdict on every rank: JSON in a byte tensor, broadcast by accelerate."""
    if accelerator.num_processes == 1:
        return verdict
    import torch
    from accelerate.utils import broadcast

    buf = torch.zeros(VERDICT_BYTES, dtype=torch.uint8, device=accelerator.device)
    if accelerator.is_main_process:  # messages are capped well below VERDICT_BYTES (_verdict_of)
        data = json.dumps(verdict).encode("utf-8")
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    broadcast(buf, from_process=0)
    return json.loads(bytes(buf.cpu().tolist()).rstrip(b"\0").decode("utf-8"))


_KINDS = {"ClaimRefused": ClaimRefused, "StorageError": StorageError, "OutputDirError": OutputDirError}


def _raise_verdict(verdict: dict) -> None:
    if "error" in verdict:
        raise _KINDS.get(verdict.get("kind"), RuntimeError)(verdict["error"])


def _verdict_of(action: Callable[[], object]) -> tuple[dict, object]:
    try:
        return {}, action()
    except CqilError as e:
        kind = type(e).__name__ if type(e).__name__ in _KINDS else "OutputDirError"
        return {"error": str(e)[:1500], "kind": kind}, None
    except Exception as e:  # a bug: every rank must still hear of it, or the others wait forever
        return {
            "error": f"the main process failed to claim the output folder: {e!r}"[:1500],
            "kind": "bug",
        }, e


Checked = TypeVar("Checked")


def claim_checked(
    output_dir: str | os.PathLike, accelerator, check: Callable[[], Checked], *, log=None
) -> tuple[Claim | None, Checked]:
    """Check a run's input and claim ``output_dir`` for it, on every rank of ``accelerator``.

    In order: the main process refuses a folder held by a live run (reading only); every rank runs
    ``check`` (bad input, one error, nothing written; a run that claimed the folder meanwhile is
    reported instead, as its writes may be what ``check`` refused); the main process claims the folder; the other
    ranks receive its verdict and refuse with the same message when it refuses. If the folder changed
    between ``check`` and the claim (a holder that just stopped), ``check`` runs again under the claim.
    Returns the claim (on the main process; None on the others) and what the last ``check`` returned.
    """
    out, main = Path(output_dir), accelerator.is_main_process
    verdict, _ = _verdict_of(lambda: refuse_if_claimed(out)) if main else (None, None)
    _raise_verdict(_share(accelerator, verdict))
    before = folder_state(out) if main else None
    try:
        checked = check()
    except CqilError:
        # A run that claimed the folder while this one checked it may already have written there (the
        # temporary file of its marker): then the folder is busy, not foreign, and the holder is the news.
        refuse_if_claimed(out)
        raise
    held = bug = None
    if main:
        verdict, result = _verdict_of(lambda: claim(out, log=log))
        if isinstance(result, Claim):
            held = result
            verdict = {"changed": folder_state(out) != before}
        else:
            bug = result
    verdict = _share(accelerator, verdict)
    if bug is not None:
        raise bug
    _raise_verdict(verdict)
    if verdict.get("changed"):
        try:
            checked = check()
        except BaseException:
            if held is not None:
                held.release()
            raise
    return held, checked
