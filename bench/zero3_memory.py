"""Peak memory per rank of a ZeRO-3 recovery at 1, 2 and 4 ranks, against ZeRO-2's whole model per rank.

Builds the randomly initialised ~1.2B Llama of ``bench/analysis_memory.py`` (hidden 2048, 22 layers,
float32: 4.7 GB of weights), saves it, and runs a short recovery of it (two pairs, a few steps, the
before/after perplexities and the export) under ``accelerate launch`` with
``launch/accelerate/zero3.yaml`` at each ``--ranks`` count, then under ``zero2.yaml`` for comparison.
While a run goes, every rank's private resident memory (``RssAnon`` + ``RssShmem`` in ``/proc``,
every 50 ms; the checkpoint's memory-mapped file pages are left out: they are the node's page cache,
shared by the ranks) is sampled; on CPU the device memory *is* host memory, so this is both.
Printed per run, one JSON line: the peak of each rank up to the end of training (loading, surgery,
teacher copy, evaluation, steps) and over the whole run (the export included: the main process
gathers one whole copy of the recovered model to write it).

The last line fits ``peak = S / N + C`` to the ZeRO-3 peaks (least squares over the rank counts): S is
what partitioning divides (weights, teacher copy, gradients, optimizer states), C what every rank pays
whatever N (the Python and torch baseline, one group of whole weights, activations and buffers).
``launch/README.md`` turns S and C into the memory model of 7B and 70B runs.

    python bench/zero3_memory.py                          # ~1.2B model; about 15 minutes on 2 cores
    python bench/zero3_memory.py --layers 4 --hidden 256 --intermediate 688 --groups 1-3:2   # a quick check
    # launch/README.md's table (0.54B; run the rank counts one at a time on a 24 GB machine):
    python bench/zero3_memory.py --hidden 1536 --layers 16 --intermediate 4096 --heads 24 \
        --kv-heads 4 --groups 6-10:2 --ranks 1 2 4 --zero2-ranks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from _common import Stopwatch, emit
from analysis_memory import build

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "sample"
GB = 1024**3


def recipe(folder: Path, out: Path, args) -> str:
    return f"""
model: {{name_or_path: {folder}, dtype: float32}}
parallelize: {{groups: "{args.groups}"}}
train: {{max_steps: {args.steps}, seq_len: {args.seq_len}, micro_batch_size: 1, grad_accum_steps: 1,
        lr: 1.0e-4, warmup_steps: 1, log_every_steps: 1, save_every_steps: 0, trackers: [],
        loss: {{kd: 1.0, lm: 0.5}}}}
data: {{train: {DATA / "train.jsonl.gz"}, eval: {DATA / "heldout.jsonl.gz"}}}
eval: {{num_sequences: 2, batch_size: 1, tasks: [], latency: false, report: false}}
output_dir: {out}
"""


def _status(pid: int, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _ranks(root: int) -> dict[int, int]:
    """{pid: rank} of the training processes under ``root`` (the launcher itself excluded)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for row in rows.splitlines():
        pid, ppid = map(int, row.split())
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"recover.py") for c in cmd) and b"accelerate.commands.launch" not in cmd:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[pid] = int(rank[0][5:])
    return out


def tuned_config(tmp: Path, args) -> Path:
    """launch/accelerate/zero3.yaml with its DeepSpeed JSON changed as the arguments say.

    The shipped ``launch/deepspeed/zero3.json`` leaves the gradient reduce bucket, the prefetch bucket
    and the persistence threshold ``"auto"``: the trainer sizes them from the hidden size (h², 0.9 h²,
    10 h). ``--buckets deepspeed`` writes DeepSpeed's own defaults instead (a reduce bucket of 5e8
    elements: 2 GB in float32, part of every rank's constant). ``--max-live`` caps the gathered
    parameters a rank holds.
    """
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    launch = yaml.safe_load((REPO / "launch/accelerate/zero3.yaml").read_text())
    ds = json.loads((REPO / launch["deepspeed_config"]["deepspeed_config_file"]).read_text())
    zero = ds["zero_optimization"]
    if args.buckets == "deepspeed":
        for name in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"):
            field = DeepSpeedZeroConfig.model_fields[name]
            zero[field.alias or name] = field.default
    if args.max_live is not None:
        zero["stage3_max_live_parameters"] = args.max_live
    (tmp / "zero3_tuned.json").write_text(json.dumps(ds))
    launch["deepspeed_config"]["deepspeed_config_file"] = str(tmp / "zero3_tuned.json")
    path = tmp / "zero3_tuned.yaml"
    path.write_text(yaml.safe_dump(launch))
    return path


def run(kind: str, ranks: int, folder: Path, tmp: Path, args) -> dict:
    out = tmp / f"{kind}-{ranks}"
    path = tmp / f"{kind}-{ranks}.yaml"
    path.write_text(recipe(folder, out, args))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    config = REPO / f"launch/accelerate/{kind}.yaml"
    if kind == "zero3" and (args.max_live is not None or args.buckets == "deepspeed"):
        config = tuned_config(tmp, args)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config), "--num_processes", str(ranks),
        "--main_process_port", str(29500 + ranks + (10 if kind == "zero2" else 0)),
        str(REPO / "train/recover.py"), str(path),
    ]  # fmt: skip
    clock = Stopwatch()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    train_peak: dict[int, int] = {}
    hwm: dict[int, int] = {}
    trained = threading.Event()
    lines: list[str] = []
    phase = ["start"]  # the last progress line seen: where each rank's peak happened
    peak_phase: dict[int, str] = {}

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "cqil" in line:
                phase[0] = line.strip()[-90:]
            if "held-out perplexity, recovered" in line:
                trained.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid, rank in _ranks(proc.pid).items():
            # Private memory only: the checkpoint's mapped file pages are the node's page cache,
            # shared by every rank and reclaimable, and would otherwise count once per rank.
            anon = _status(pid, "RssAnon")
            shmem = _status(pid, "RssShmem")
            if anon is None or shmem is None:
                continue
            private = anon + shmem
            if private > hwm.get(rank, 0):
                hwm[rank] = private
                if not trained.is_set():
                    peak_phase[rank] = phase[0]
            if not trained.is_set():
                train_peak[rank] = max(train_peak.get(rank, 0), private)
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        sys.stderr.write("".join(lines[-60:]))
        raise SystemExit(f"{kind} with {ranks} ranks failed (exit {proc.returncode})")
    return {
        "config": kind,
        "buckets": args.buckets if kind == "zero3" else "deepspeed",
        "ranks": ranks,
        "peak_until_trained_gb": [round(train_peak[r] / GB, 3) for r in sorted(train_peak)],
        "peak_gb": [round(hwm[r] / GB, 3) for r in sorted(hwm)],
        "peak_after": [peak_phase[r] for r in sorted(peak_phase)],
        "seconds": round(clock.total(), 1),
        "sharded": any("loading the model partitioned" in line for line in lines),
    }


def fit(rows: list[dict]) -> dict:
    """Least squares of max-over-ranks peak = S / N + C over the ZeRO-3 runs."""
    xs = [1 / r["ranks"] for r in rows]
    ys = [max(r["peak_until_trained_gb"]) for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    s = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return {"divided_gb": round(s, 3), "constant_gb": round(my - s * mx, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--groups", default="8-12:2", help="parallelize.groups of the run")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--zero2-ranks", type=int, nargs="*", default=[1, 2])
    p.add_argument(
        "--max-live",
        type=int,
        default=None,
        help="stage3_max_live_parameters of the ZeRO-3 runs (default: launch/accelerate/zero3.yaml's, 1e9)",
    )
    p.add_argument(
        "--buckets",
        choices=["deepspeed", "hidden"],
        default="hidden",
        help="ZeRO-3 buffer sizes: from the hidden size (the shipped launch/deepspeed/zero3.json) or DeepSpeed's defaults",
    )
    p.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = p.parse_args()
    args.dtype = "float32"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        params, weight_bytes = build(tmp / "model", args)
        emit({"params": params, "weight_gb": round(weight_bytes / GB, 3)})
        rows = []
        for kind, counts in (("zero3", args.ranks), ("zero2", args.zero2_ranks)):
            for ranks in counts:
                row = run(kind, ranks, tmp / "model", tmp, args)
                row["weight_gb"] = round(weight_bytes / GB, 3)
                emit(row)
                rows.append(row)
    zero3 = [r for r in rows if r["config"] == "zero3"]
    if len(zero3) >= 2:
        emit({"fit": "zero3 peak until trained = S / N + C", **fit(zero3)})


if __name__ == "__main__":
    main()
