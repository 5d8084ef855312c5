"""launch/slurm/*.sbatch on a real Slurm cluster started on this machine.

The module installs Debian's Slurm and MUNGE (``apt-get``, as root; nothing to do when they are
there), writes a ``slurm.conf`` (``tests/slurm/slurm.conf.in``) for two nodes that are both this
host (one ``slurmd`` each, addressed 127.0.0.1, the machine's CPUs and memory from ``slurmd -C``
split between them), starts munged, slurmctld and the slurmds as background processes and stops
them at the end. Then ``sbatch`` runs the script as a user would, on CPU: 2 nodes x 1 process,
gloo, a tiny random Llama:

1. an uninterrupted run ends with the exported model and its report in the run's folder, and each
   node's launcher got its own machine rank;
2. a second run gets USR1 as ``--signal=B:USR1@...`` delivers it (to the batch shell only) once its
   first checkpoint exists: it must checkpoint, exit 75, requeue itself, resume from that
   checkpoint in the next attempt and end with the trainable weights of the uninterrupted run,
   bit for bit;
3. evaluate.sbatch and export.sbatch, side by side on the two nodes, turn the first run's export
   into a report and a bf16 copy.

Skipped, with the reason, only where Slurm cannot be installed (no root, no apt) or its daemons do
not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cqil.testing import make_model, make_tokenizer, write_corpus

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
CONF_TEMPLATE = Path(__file__).parent / "slurm/slurm.conf.in"
# In the job's order: the first node is where the ranks meet (the script's main process address), so
# its name must resolve.
NODE_NAMES = ["localhost", "node1"]
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
COMMANDS = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo"]
STEPS = 80  # long enough that USR1, sent after the first checkpoint, lands mid-run
SAVE_EVERY = 10
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


# ---------------------------------------------------------------------------------------- cluster
def _run(cmd: list[str], env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def install_slurm() -> str | None:
    """Install Slurm and MUNGE with apt-get unless present; ``None`` when ready, else why not."""
    path = f"{os.environ.get('PATH', '')}:{SBIN}"
    if all(shutil.which(c, path=path) for c in COMMANDS):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed, and installing it (apt-get) needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    proc = _run(install, env, timeout=600)
    if proc.returncode != 0:  # a machine that has never fetched the package lists
        _run(["apt-get", "update", "-q"], env, timeout=600)
        proc = _run(install, env, timeout=600)
    if proc.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {(proc.stdout + proc.stderr)[-1500:]}"
    missing = [c for c in COMMANDS if not shutil.which(c, path=path)]
    return f"installed slurm-wlm and munge but {missing} are missing" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_resources(env: dict) -> tuple[int, int]:
    """(CPUs, RealMemory in MB) of this machine as slurmd sees them."""
    out = _run(["slurmd", "-C"], env).stdout
    cpus, memory = re.search(r"\bCPUs=(\d+)", out), re.search(r"\bRealMemory=(\d+)", out)
    if not (cpus and memory):
        pytest.skip(f"slurmd -C did not describe this machine: {out!r}")
    return int(cpus.group(1)), int(memory.group(1))


def job_info(job_id: str, env: dict) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...); {} once the job is gone."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], env)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


@dataclass
class Cluster:
    root: Path
    env: dict
    nodes: list[str]
    cpus_per_node: int
    procs: list[subprocess.Popen] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with (self.root / "log" / f"{name}.out").open("w") as log:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """The tail of every daemon log, for a failure message."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(
                f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            )
        return "\n".join(parts)

    def stop(self) -> None:
        for job in self.jobs:
            _run(["scancel", job], self.env)
        _run(["scontrol", "shutdown"], self.env)  # slurmctld and every slurmd; munged stays up
        for proc in reversed(self.procs):
            if proc.args[0] != "munged":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    # A folder of our own under /tmp: munged refuses a socket whose folders others cannot enter
    # (pytest's tmp folders are 0700).
    root = Path(tempfile.mkdtemp(prefix="cqil-slurm-"))
    root.chmod(0o755)
    for sub in ["munge", "run", "log", "state"] + [f"spool/{n}" for n in NODE_NAMES]:
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:{SBIN}", SLURM_CONF=str(root / "slurm.conf"))
    cpus, memory = node_resources(env)
    per_node = max(1, cpus // len(NODE_NAMES))
    ports: list[int] = []
    while len(ports) < len(NODE_NAMES) + 1:  # slurmctld's, then each slurmd's
        if (port := free_port()) not in ports:
            ports.append(port)
    nodes = "\n".join(
        f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={per_node} "
        f"RealMemory={memory // len(NODE_NAMES)} State=UNKNOWN"
        # slurmctld 22.05 refuses "localhost" followed by another node ("Duplicated NodeHostName").
        for name, port in reversed(list(zip(NODE_NAMES, ports[1:], strict=True)))
    )
    munge_socket = root / "run" / "munge.socket"
    conf = string.Template(CONF_TEMPLATE.read_text()).substitute(
        root=root,
        controller=NODE_NAMES[0],
        controller_port=ports[0],
        munge_socket=munge_socket,
        nodes=nodes,
        node_names=",".join(NODE_NAMES),
    )
    (root / "slurm.conf").write_text(conf)

    c = Cluster(root=root, env=env, nodes=NODE_NAMES, cpus_per_node=per_node)
    try:
        c.start("munged", [
            "munged", "-F", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={root / 'run/munged.pid'}", f"--log-file={root / 'log/munged.log'}",
            f"--seed-file={root / 'munge/munged.seed'}",
        ])  # fmt: skip
        _wait_for(lambda: munge_socket.exists(), 20, "munged did not create its socket", c)
        c.start("slurmctld", ["slurmctld", "-D", "-f", str(root / "slurm.conf")])
        _wait_for(
            lambda: _run(["scontrol", "ping"], env).stdout.count("UP") > 0, 30, "slurmctld is not up", c
        )
        for name in NODE_NAMES:
            c.start(f"slurmd-{name}", ["slurmd", "-D", "-f", str(root / "slurm.conf"), "-N", name])

        def idle() -> bool:
            return _run(["sinfo", "-h", "-N", "-o", "%T"], env).stdout.split() == ["idle"] * len(NODE_NAMES)

        _wait_for(idle, 30, "the nodes did not come up idle", c)
    except BaseException:
        c.stop()
        raise
    yield c
    c.stop()


def _wait_for(ready, timeout: float, what: str, c: Cluster) -> None:
    deadline = time.time() + timeout
    while not ready():
        exited = [p.args[0] for p in c.procs if p.poll() is not None]
        if exited or time.time() > deadline:
            pytest.skip(f"{what} (exited: {exited}); the Slurm daemons cannot run here:\n{c.logs()}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    model = make_model("llama")
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    write_corpus(root / "train.jsonl.gz", repeats=40)
    (root / "recipe.yaml").write_text(
        f"""
model: {{name_or_path: {root / "model"}}}
parallelize: {{groups: "2-6:2"}}
train: {{max_steps: {STEPS}, seq_len: 16, micro_batch_size: 2, grad_accum_steps: 2, lr: 3.0e-3, warmup_steps: 1,
        log_every_steps: 10, save_every_steps: {SAVE_EVERY}, keep_checkpoints: 2, trackers: [],
        loss: {{kd: 1.0, lm: 0.5, hidden: 0.1}}}}
data: {{train: {root / "train.jsonl.gz"}, eval_fraction: 0.2}}
eval: {{num_sequences: 4}}
output_dir: {root / "unused"}
"""
    )
    return root


def sbatch(cluster: Cluster, script: str, options: list[str], args: list[str], log_dir: Path, **env) -> str:
    """Submit ``launch/slurm/<script>`` from the repository root as a user would; returns the job id."""
    env = dict(
        cluster.env,
        PATH=f"{Path(sys.executable).parent}:{cluster.env['PATH']}",
        VENV=sys.prefix if sys.prefix != sys.base_prefix else "",  # this interpreter's environment
        TOKENIZERS_PARALLELISM="false",
        **env,
    )
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={log_dir}/%x-%j.out",
        *options,
    ]
    proc = subprocess.run(
        [*cmd, str(ROOT / "launch/slurm" / script), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr + cluster.logs()
    job = proc.stdout.strip().split(";")[0]
    cluster.jobs.append(job)
    return job


def submit_recovery(cluster: Cluster, setup: Path, out: Path) -> str:
    """recover.sbatch on CPU: one process per node, the tiny recipe, ``output_dir=out``."""
    options = [f"--nodes={len(cluster.nodes)}", f"--cpus-per-task={cluster.cpus_per_node}"]
    return sbatch(
        cluster, "recover.sbatch", options, [f"output_dir={out}"], setup,
        RECIPE=str(setup / "recipe.yaml"),
        ACCEL_CONFIG="launch/accelerate/cpu_ddp.yaml",
        ACCELERATE_USE_CPU="1",  # with the config's multi-GPU mode: N CPU processes
        GPUS_PER_NODE="1",
    )  # fmt: skip


def wait_job(cluster: Cluster, job: str, out: Path, timeout: float = 240) -> dict[str, str]:
    deadline = time.time() + timeout
    while (info := job_info(job, cluster.env)).get("JobState") not in FINAL_STATES:
        assert info, f"job {job} vanished\n{run_logs(out)}"
        assert time.time() < deadline, (
            f"job {job} still {info.get('JobState')}\n{run_logs(out)}{cluster.logs()}"
        )
        time.sleep(0.5)
    return info


def attempt_log(out: Path, job: str, attempt: int) -> Path:
    return out / "slurm" / f"recover-{job}-{attempt}.log"


def run_logs(out: Path) -> str:
    logs = sorted((out / "slurm").glob("*.log")) + sorted(out.parent.glob("*.out"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


@pytest.fixture(scope="module")
def uninterrupted(cluster, setup):
    out = setup / "full"
    job = submit_recovery(cluster, setup, out)
    return job, out, wait_job(cluster, job, out)


def test_recover_sbatch_trains_on_two_nodes_and_exports(uninterrupted):
    job, out, info = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), run_logs(out)
    log = attempt_log(out, job, 0).read_text()
    for rank, name in enumerate(NODE_NAMES):  # each node's launcher read its own SLURM_NODEID
        expected = (
            f"node {rank} of {len(NODE_NAMES)} ({name}): machine_rank {rank}, {len(NODE_NAMES)} processes"
        )
        assert f"{expected}, main {NODE_NAMES[0]}:" in log, log
    assert "cqil: 2 process(es)" in log and f"step {STEPS}/{STEPS}" in log, log
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "report" / "report.json").is_file() and (out / "report" / "report.md").is_file()
    assert json.loads((out / "eval.json").read_text())["steps"] == STEPS


def test_usr1_checkpoints_requeues_and_resumes_bit_identically(cluster, setup, uninterrupted):
    out = setup / "preempted"
    job = submit_recovery(cluster, setup, out)
    deadline = time.time() + 180
    while not any(p.name.startswith("step-") for p in (out / "checkpoints").glob("*")):
        assert job_info(job, cluster.env).get("JobState") in {"PENDING", "CONFIGURING", "RUNNING"}, run_logs(
            out
        )
        assert time.time() < deadline, run_logs(out)
        time.sleep(0.05)
    # What --signal=B:USR1@120 does at the time limit: USR1 to the batch shell alone.
    signal = _run(["scancel", "--batch", "--signal=USR1", job], cluster.env)
    assert signal.returncode == 0, signal.stderr

    info = wait_job(cluster, job, out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), run_logs(out)
    first, second = attempt_log(out, job, 0).read_text(), attempt_log(out, job, 1).read_text()
    assert "USR1" in first and "requeueing job" in first, first
    assert re.search(r"exitcode +: 75 ", first), first  # the ranks' own exit code, through the launcher
    stopped = re.search(r"checkpoint written at step (\d+); exiting with code 75", first)
    assert stopped and int(stopped.group(1)) < STEPS, first  # stopped mid-run, not at the end
    resumed = re.search(r"resumed from \S+/step-(\d+) at step (\d+)", second)
    assert resumed and int(resumed.group(2)) == int(stopped.group(1)), second

    _, full, _ = uninterrupted
    reference = json.loads((full / "eval.json").read_text())
    result = json.loads((out / "eval.json").read_text())
    assert result["steps"] == STEPS
    assert result["trainable_digest"] == reference["trainable_digest"]
    assert result["frozen_digest"] == reference["frozen_digest"]
    assert (out / "model" / "model.safetensors").is_file()


def test_evaluate_and_export_sbatch(cluster, setup, uninterrupted):
    _, full, _ = uninterrupted
    small = ["--nodes=1", "--cpus-per-task=1", "--mem=1G"]  # both fit side by side, one per node
    evaluation, exported = setup / "evaluation", setup / "exported"
    jobs = [
        sbatch(
            cluster, "evaluate.sbatch", small, ["--seq-len", "16", "--num-sequences", "4", "--no-latency"], setup,
            MODEL=str(full / "model"), DATA=str(setup / "train.jsonl.gz"), OUT=str(evaluation), DEVICE="cpu",
        ),
        sbatch(cluster, "export.sbatch", small, [], setup, MODEL=str(full / "model"), OUT=str(exported)),
    ]  # fmt: skip
    for job in jobs:
        info = wait_job(cluster, job, full)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), run_logs(full)
    report = json.loads((evaluation / "report.json").read_text())
    assert report["perplexity"]["recovered"]["ppl"] > 0, report
    assert (full / "slurm" / f"evaluate-{jobs[0]}.log").is_file() and (
        full / "slurm" / f"export-{jobs[1]}.log"
    ).is_file()

    import torch
    from safetensors.torch import load_file

    weights = load_file(exported / "model.safetensors")  # in the script's default DTYPE
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "cqil" in (exported / "README.md").read_text()
