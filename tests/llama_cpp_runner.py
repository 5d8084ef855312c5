"""Run a GGUF in llama-cpp-python and save what it computed (runs in .venv-llama: no torch, no cqil).

    python llama_cpp_runner.py job.json out.npz

``job.json``: ``{"cases": [{"name", "model", "prompt": [ids], "new_tokens", "n_ctx", "texts": [...]}]}``.
For each case ``out.npz`` holds ``<name>.tokens`` (prompt + greedy continuation, int64),
``<name>.logprobs`` (float32, one row of log-probabilities over the vocabulary per position, the
last position excluded) and, for every text, ``<name>.text<i>`` (llama.cpp's token ids, no BOS).
The KV cache is F32 so that an F32 GGUF is compared with transformers without cache rounding.
"""

import json
import sys

import llama_cpp
import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def run(case: dict) -> dict:
    f32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
    llm = llama_cpp.Llama(
        model_path=case["model"],
        n_ctx=case["n_ctx"],
        n_batch=case["n_ctx"],
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        type_k=f32,
        type_v=f32,
        seed=0,
        verbose=False,
    )
    prompt = list(case["prompt"])
    llm.eval(prompt)
    tokens = list(prompt)
    for _ in range(case["new_tokens"]):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if len(tokens) - len(prompt) == case["new_tokens"]:
            break
        llm.eval([tokens[-1]])
    name = case["name"]
    out = {
        f"{name}.tokens": np.array(tokens, dtype=np.int64),
        f"{name}.logprobs": log_softmax(np.array(llm.scores[: len(tokens) - 1])),
    }
    for i, text in enumerate(case.get("texts", [])):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        out[f"{name}.text{i}"] = np.array(ids, dtype=np.int64)
    llm.close() if hasattr(llm, "close") else None
    return out


def main() -> None:
    # On stderr, which pytest shows beside a failure: the instruction sets this build compiled in.
    print("llama.cpp", llama_cpp.__version__, llama_cpp.llama_print_system_info().decode(), file=sys.stderr)
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    out = {}
    for case in job["cases"]:
        out.update(run(case))
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
