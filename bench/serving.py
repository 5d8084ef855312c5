"""The parallelized model against the original in the serving engines: llama.cpp and vLLM, side by side.

Sections (each one JSON line; the engines run in their own environments through bench/serving_child.py,
which times inside the child, after loading and a warmup round):

  llama.cpp   SmolLM2-135M, original and plan 14-26:2 (bypass lp, gates fixed: foldable), both as F32
              GGUFs (cqil.export.gguf.write_gguf), 1 thread: prefill (1 x 512 tokens) and greedy decode
              (batch 1, 64 tokens after an untimed 32-token prompt). Both models are loaded at once and
              every repetition times both, the order alternating; speedup = median of per-repetition
              ratios original / parallelized.
  vllm tp1    the same two models served by vLLM (float32, enforce_eager, no prefix cache): prefill,
              decode and the throughput of a batch of 16 prompts x 64 new tokens (tokens/s).
  vllm tp1/2  "random-llama-30L": SmolLM2's 9 heads do not divide by 2, so a randomly initialised
              30-layer Llama of SmolLM2-like size (hidden 512, 8 heads of 64, 4 KV heads, intermediate
              1536, SmolLM2's vocabulary) with the same plan, at TP=1 and TP=2: Layer Parallelism's own
              comparison, the parallelized model against the original under the same tensor parallelism.
  vllm gpu    where the vLLM environment sees a CUDA device, the vLLM sections again in bfloat16 with
              absolute tokens/s; otherwise a line saying it was skipped.

A vLLM engine holds worker processes and a KV cache, and an idle one spins on a 2-core machine, so its
instances run one at a time in rounds A B, B A (``--rounds``), each timed ``--reps`` times; speedups are
ratios of medians over all repetitions. Every rank is a worker process on its own core (``--vllm-threads``
cores each): TP=1 computes on one core, TP=2 on two. vLLM's decode is the time of a 32-token prompt plus
65 tokens less that of the prompt plus 1 token; its prefill a 512-token prompt plus 1 token.

The ideals. The depth ratio is L / L_eff = 30 / 24 = 1.25. On one thread a group is one wide layer with
the same FLOPs and weights as its two layers, so the honest single-thread ideal is ~1.0 (fewer, larger
matrix products: only per-layer overhead goes). Under tensor parallelism a plain layer does 2
all-reduces per forward and an lp group with gates at 1 does 2 for the whole group, so at TP=2 the
original does 60 and the parallelized model 48 (the embedding's all-reduce and the logits' gather are
the same for both and not counted): 1.25 is the ideal when the collectives dominate, 1.0 when compute
does. Gates keep their initial values: this measures speed only (a recovered model has the same
speed), and the random model's tokens mean nothing.

    python bench/serving.py --llama-python /path/venv/bin/python --vllm-python /path/venv/bin/python
    python bench/serving.py --tiny        # tiny random models, 1 repetition, a few tokens (smoke test)

Runtime on 2 shared CPU cores: about 12 minutes (vLLM's TP=2 start-up is ~45 s per instance); --tiny
about 3. Every line printed to stdout is one JSON object; the last one is the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cqil
from cqil.export.gguf import write_gguf
from cqil.export.write import export_model
from cqil.pretrained import fetch_model, load_model

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().with_name("serving_child.py")
PLAN = "14-26:2"
TINY_PLAN = "2-6:2"
BYPASS, GATES = "lp", "fixed"


# ------------------------------------------------------------------ models


def random_llama(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, tokenizer, seed=0):
    """A randomly initialised Llama with SmolLM2's vocabulary and RoPE (head_dim = hidden / heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def parallelized(model, spec: str):
    return cqil.parallelize(copy.deepcopy(model), spec, bypass=BYPASS, gates=GATES).eval()


def save_original(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def allreduces(plan: cqil.GroupPlan, tp: int) -> dict:
    """All-reduces per forward in the decoder layers: 2 per plain layer, 2 per lp group at gates 1."""
    if tp == 1:
        return {"original": 0, "parallelized": 0}
    return {"original": 2 * plan.num_layers, "parallelized": 2 * plan.num_layers_after}


# ------------------------------------------------------------------ children


def child_env(kind: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if kind == "vllm":
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in the child itself (TP=1: the model too)
            VLLM_CPU_KVCACHE_SPACE="1",  # GiB
            VLLM_NO_USAGE_STATS="1",
        )
    return env


def run_child(python: str, engine: str, job: dict, work: Path, name: str, timeout: int) -> dict:
    job_path, out_path, log_path = work / f"{name}.job.json", work / f"{name}.out.json", work / f"{name}.log"
    job_path.write_text(json.dumps(job))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [python, str(CHILD), engine, str(job_path), str(out_path)],
            cwd=work,
            env=child_env(engine),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    text = log_path.read_text()
    for line in text.splitlines():  # the child's progress lines, without the engine's own log
        if line.startswith(("llama.cpp rep", "vllm ")):
            print(line, file=sys.stderr, flush=True)
    if not out_path.is_file():
        raise RuntimeError(f"{name}: child failed (rc {proc.returncode}); log {log_path}:\n{text[-4000:]}")
    return json.loads(out_path.read_text())


def median(xs) -> float:
    return statistics.median(xs)


def r(x: float, nd: int = 4) -> float:
    return round(x, nd)


# ------------------------------------------------------------------ sections


def llama_section(args, models: dict, prompt, plan, model_name: str, work: Path) -> dict:
    start_load = os.getloadavg()
    job = dict(
        models={v: str(p) for v, p in models.items()},
        threads=1,
        reps=args.reps,
        prefill_len=args.prefill_len,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        prompt=prompt,
    )
    got = run_child(args.llama_python, "llama", job, work, "llama", timeout=1200)
    o, p = got["original"], got["parallelized"]

    def paired(kind):
        return median(a / b for a, b in zip(o[kind], p[kind], strict=True))

    return {
        "section": "llama.cpp",
        "model": model_name,
        "plan": args.plan,
        "layers": {"original": plan.num_layers, "parallelized": plan.num_layers_after},
        "gguf": "f32",
        "threads": 1,
        "prefill_speedup": r(paired("prefill_s")),
        "decode_speedup": r(paired("decode_s")),
        "ideal_depth": r(plan.ideal_speedup),
        "ideal_single_thread": 1.0,
        "prefill_ms": {v: r(median(t["prefill_s"]) * 1e3, 2) for v, t in got.items()},
        "decode_ms_per_token": {
            v: r(median(t["decode_s"]) * 1e3 / args.new_tokens, 3) for v, t in got.items()
        },
        "prefill_len": args.prefill_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "loadavg": {"start": start_load, "end": os.getloadavg(), "reps": o["loadavg"] + p["loadavg"]},
    }


def vllm_section(
    args,
    name: str,
    folders: dict,
    prompt,
    plan,
    model_name: str,
    tp: int,
    batch: int,
    work: Path,
    dtype: str = "float32",
) -> dict:
    start_load = os.getloadavg()
    order = ["original", "parallelized"]
    rounds = [order if i % 2 == 0 else order[::-1] for i in range(args.rounds)]
    instances = [
        {"variant": v, "model": str(folders[v]), "tp": tp, "dtype": dtype} for rnd in rounds for v in rnd
    ]
    job = dict(
        instances=instances,
        reps=args.reps_vllm,
        prefill_len=args.prefill_len,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch=batch,
        prompt=prompt,
        threads_per_rank=args.vllm_threads,
        max_model_len=max(args.prefill_len, args.prompt_len + args.new_tokens) + 16,
    )
    got = run_child(args.vllm_python, "vllm", job, work, name, timeout=1800)
    errors = [run for run in got["runs"] if "error" in run]
    if errors:
        raise RuntimeError(f"{name}: " + "\n".join(f"{e['variant']}: {e['traceback']}" for e in errors))
    times = {v: {"prefill_s": [], "decode_s": [], "batch_s": []} for v in order}
    for run in got["runs"]:
        for kind in times[run["variant"]]:
            times[run["variant"]][kind] += run[kind]

    def ratio(kind):  # original time / parallelized time, medians over every repetition of every round
        return median(times["original"][kind]) / median(times["parallelized"][kind])

    ars = allreduces(plan, tp)
    line = {
        "section": f"vllm tp{tp}" + ("" if dtype == "float32" else f" {dtype}"),
        "model": model_name,
        "plan": args.plan,
        "tp": tp,
        "dtype": dtype,
        "layers": {"original": plan.num_layers, "parallelized": plan.num_layers_after},
        "allreduces_per_forward": ars,
        "prefill_speedup": r(ratio("prefill_s")),
        "decode_speedup": r(ratio("decode_s")),
        "ideal_depth": r(plan.ideal_speedup),
        "ideal_allreduce": r(ars["original"] / ars["parallelized"]) if tp > 1 else None,
        "ideal_same_flops": 1.0,
        "prefill_ms": {v: r(median(t["prefill_s"]) * 1e3, 2) for v, t in times.items()},
        "decode_ms_per_token": {
            v: r(median(t["decode_s"]) * 1e3 / args.new_tokens, 3) for v, t in times.items()
        },
    }
    if batch:
        tok_s = {v: batch * args.new_tokens / median(t["batch_s"]) for v, t in times.items()}
        line.update(
            batch=batch,
            throughput_tok_s={v: r(x, 1) for v, x in tok_s.items()},
            throughput_speedup=r(tok_s["parallelized"] / tok_s["original"]),
        )
    line.update(
        threads_bind=got["runs"][0]["threads_bind"],
        build_s={v: r(median(x["build_s"] for x in got["runs"] if x["variant"] == v), 1) for v in order},
        prefill_len=args.prefill_len,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        reps=args.reps_vllm,
        loadavg={"start": start_load, "end": os.getloadavg(), "runs": [x["loadavg"] for x in got["runs"]]},
    )
    return line


def cuda_in(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        env=child_env("vllm"),
        timeout=300,
    )
    return probe.returncode == 0 and probe.stdout.strip().endswith("True")


JSON_OUT = sys.stdout  # main() sends everything else printed to stdout (libraries' logs) to stderr


def emit(line: dict, lines: list) -> None:
    lines.append(line)
    print(json.dumps(line), file=JSON_OUT, flush=True)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models, 1 repetition, few tokens")
    parser.add_argument("--llama-python", default=str(REPO / ".venv-llama" / "bin" / "python"))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["llama", "vllm-tp1", "vllm-tp2", "gpu"])
    parser.add_argument("--reps", type=int, help="llama.cpp repetitions (default 5; --tiny 1)")
    parser.add_argument("--reps-vllm", type=int, help="vLLM repetitions per instance (default 3; --tiny 1)")
    parser.add_argument("--rounds", type=int, help="vLLM rounds A B / B A (default 2; --tiny 1)")
    parser.add_argument("--prefill-len", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--batch", type=int, help="prompts in the throughput batch (default 16; --tiny 2)")
    parser.add_argument("--vllm-threads", type=int, default=1, help="cores per vLLM rank (default 1)")
    parser.add_argument(
        "--workdir", help="keep the GGUFs, exports and logs here (default: a temporary folder)"
    )
    args = parser.parse_args()
    defaults = (
        dict(reps=1, reps_vllm=1, rounds=1, prefill_len=32, prompt_len=8, new_tokens=4, batch=2)
        if args.tiny
        else dict(reps=5, reps_vllm=3, rounds=2, prefill_len=512, prompt_len=32, new_tokens=64, batch=16)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.plan = TINY_PLAN if args.tiny else PLAN
    torch.set_num_threads(1)

    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="cqil-serving-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines: list[dict] = []
        t0 = time.perf_counter()
        header = {
            "bench": "serving",
            "tiny": args.tiny,
            "cpus": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(),
            "torch_threads": 1,
        }
        emit(header, lines)

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))
        # The prompts: random ids (the same for every model), long enough for the prefill and the batch.
        generator = torch.Generator().manual_seed(0)
        n_ids = max(args.prefill_len, args.prompt_len + args.batch)
        prompt = torch.randint(1000, len(tokenizer), (n_ids,), generator=generator).tolist()

        # Model A (llama.cpp, vLLM TP=1 with the batch) and model B (vLLM TP=1 and TP=2).
        if args.tiny:
            name_a = name_b = "tiny-llama-8L"
            model_a = random_llama(8, 128, 4, 2, 256, tokenizer)
            tok_a = tokenizer
        else:
            name_a, name_b = "smollm2-135m", "random-llama-30L"
            model_a, tok_a = load_model("smollm2-135m")
            model_a.eval()
        plan_a = cqil.GroupPlan.parse(args.plan, model_a.config.num_hidden_layers)
        par_a = parallelized(model_a, args.plan)
        assert len(par_a.model.layers) == plan_a.num_layers_after

        if "llama" not in args.skip:
            ggufs = {
                "original": write_gguf(model_a, tok_a, work / f"{name_a}-original.gguf", overwrite=True),
                "parallelized": write_gguf(
                    par_a, tok_a, work / f"{name_a}-parallelized.gguf", overwrite=True
                ),
            }
            emit(llama_section(args, ggufs, prompt, plan_a, name_a, work), lines)

        vllm_skip = {"vllm-tp1", "vllm-tp2"} <= set(args.skip)
        folders_a = {
            "original": save_original(model_a, tok_a, work / f"{name_a}-original"),
            "parallelized": export_model(
                par_a, work / f"{name_a}-parallelized", tokenizer=tok_a, overwrite=True
            ),
        }
        del par_a
        if name_b == name_a:
            folders_b, plan_b = folders_a, plan_a
        else:
            model_b = random_llama(30, 512, 8, 4, 1536, tokenizer)
            plan_b = cqil.GroupPlan.parse(args.plan, model_b.config.num_hidden_layers)
            folders_b = {
                "original": save_original(model_b, tokenizer, work / f"{name_b}-original"),
                "parallelized": export_model(
                    parallelized(model_b, args.plan),
                    work / f"{name_b}-parallelized",
                    tokenizer=tokenizer,
                    overwrite=True,
                ),
            }
            del model_b
        del model_a

        if "vllm-tp1" not in args.skip:
            emit(
                vllm_section(args, "vllm-tp1-a", folders_a, prompt, plan_a, name_a, 1, args.batch, work),
                lines,
            )
            if name_b != name_a:
                emit(vllm_section(args, "vllm-tp1-b", folders_b, prompt, plan_b, name_b, 1, 0, work), lines)
        if "vllm-tp2" not in args.skip:
            emit(vllm_section(args, "vllm-tp2-b", folders_b, prompt, plan_b, name_b, 2, 0, work), lines)

        if "gpu" in args.skip or vllm_skip:
            emit({"section": "vllm gpu bfloat16", "skipped": "--skip"}, lines)
        elif not cuda_in(args.vllm_python):
            emit(
                {
                    "section": "vllm gpu bfloat16",
                    "skipped": f"no CUDA device: torch.cuda.is_available() is False in {args.vllm_python}",
                },
                lines,
            )
        else:
            gpu = vllm_section(
                args, "vllm-gpu", folders_a, prompt, plan_a, name_a, 1, args.batch, work, dtype="bfloat16"
            )
            gpu["decode_tok_s"] = {v: r(1e3 / ms, 1) for v, ms in gpu["decode_ms_per_token"].items()}
            emit(gpu, lines)

        summary = {"bench": "serving", "summary": True, "seconds": round(time.perf_counter() - t0, 1)}
        for line in lines[1:]:
            if "skipped" in line:
                summary[line["section"]] = "skipped"
                continue
            summary[f"{line['section']} {line['model']}"] = {
                k: line[k]
                for k in (
                    "model",
                    "prefill_speedup",
                    "decode_speedup",
                    "throughput_speedup",
                    "ideal_depth",
                    "ideal_single_thread",
                    "ideal_allreduce",
                )
                if line.get(k) is not None
            }
        summary["loadavg"] = os.getloadavg()
        emit(summary, lines)


if __name__ == "__main__":
    main()
