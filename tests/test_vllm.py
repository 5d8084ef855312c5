"""vLLM serves cqil exports: greedy tokens and top-5 logprobs equal transformers' (cqil.export.load_export).

Exports are built here (tiny Llama, Mistral, Qwen2 and Qwen3 models from configs, every bypass mode,
both forms, a folded export, and the embedded SmolLM2 with plan ``14-26:2``), the reference is
computed here with transformers, and vLLM runs in its own environment (``.venv-vllm``, made by
``scripts/setup_engines.sh vllm``) through ``tests/vllm_child.py``: one subprocess for all cases,
JSON in and out, ``LLM(model=..., dtype="float32", tensor_parallel_size=tp, enforce_eager=True)``.

The tiny models use head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ... but not 16) and
plan [[1, 2], [3, 4, 5]]: under TP=2 the pair runs branch-local (one branch per rank, the
concurrent layout) and the triple falls back to ordinary tensor parallelism over its heads.

Tolerance: the greedy tokens are equal, and every logprob vLLM reports (top-5 plus the chosen
token, at every step) is within ``LOGPROB_ATOL`` of transformers' log-softmax for that token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cqil.testing import randomize_weights

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CHILD = Path(__file__).resolve().parent / "vllm_child.py"
MAX_TOKENS = 16
TOP_K = 5
LOGPROB_ATOL = 2e-3  # float32 on both sides; measured differences are reported by the test
PLAN = [[1, 2], [3, 4, 5]]
SMOLLM_PLAN = "14-26:2"

pytestmark = pytest.mark.engines


def _vllm_problem() -> str | None:
    """Why the vLLM environment cannot run, or None."""
    if not VENV_PYTHON.is_file():
        return f"{VENV_PYTHON} is missing: run scripts/setup_engines.sh vllm"
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c", "import vllm, cqil.serving.vllm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if probe.returncode != 0:
        return f"vllm or cqil.serving.vllm does not import in {VENV_PYTHON}: {probe.stderr.strip()[-500:]}"
    return None


# ------------------------------------------------------------------ the models

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_model(arch: str, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":  # all biases, llama3 RoPE scaling, tied embeddings
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        config = LlamaConfig(
            **COMMON,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters=rope,
        )
        model = LlamaForCausalLM(config)
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, head_dim=32, sliding_window=64))
    elif arch == "qwen2":  # q/k/v biases; head_dim is hidden_size / heads
        model = Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "hidden_size": 128}))
    elif arch == "qwen3":  # q/k norms
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32))
    else:
        raise ValueError(arch)
    randomize_weights(model)
    return model.eval()


def perturb_gates(model) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, gates in model.named_parameters():
            if name.endswith(".gates"):
                gates.add_(0.3 * torch.randn(gates.shape, generator=generator))


# (name, arch, bypass, gates, form, gate_shape, perturbed gates); "folded" is a folded lp export.
EXPORTS = [
    ("llama-lp-fixed-merged", "llama", "lp", "fixed", "merged", "scalar", False),
    ("llama-none-merged", "llama", "none", "learned", "merged", "scalar", False),
    ("qwen2-lp-learned-merged", "qwen2", "lp", "learned", "merged", "scalar", True),
    ("qwen3-cqil-merged", "qwen3", "cqil", "learned", "merged", "channel", True),
    ("mistral-lp-learned-branches", "mistral", "lp", "learned", "branches", "channel", True),
    ("qwen3-none-branches", "qwen3", "none", "learned", "branches", "scalar", False),
    ("llama-cqil-branches", "llama", "cqil", "learned", "branches", "scalar", True),
    ("mistral-lp-folded", "mistral", "lp", "fixed", "folded", "scalar", False),
]
# TP=2: the three layouts of a branch-local group (two all-reduces, one all-reduce, an all-gather
# and an all-reduce; the branches form loads into the same layout as the merged one) and Qwen3's
# per-branch head norms sharded by rank. Each TP=2 start costs about 45 s of worker start-up.
TP2 = ["llama-lp-fixed-merged", "llama-none-merged", "qwen3-cqil-merged"]
PROMPTS = [[3, 17, 42, 5, 88, 23, 61], [11, 4, 90, 33]]


def build_export(spec, root: Path) -> Path:
    import cqil
    from cqil.export.write import export_model

    name, arch, bypass, gates, form, gate_shape, perturb = spec
    model = tiny_model(arch)
    fold = form == "folded"
    cqil.parallelize(
        model,
        PLAN,
        bypass=bypass,
        bypass_distance=1,
        gates=gates,
        form="merged" if fold else form,
        gate_shape=gate_shape,
    )
    if perturb:
        perturb_gates(model)
    return export_model(model, root / name, fold=fold)


def reference(folder: Path, prompts) -> dict:
    """Greedy tokens and per-step log-softmax of transformers' logits for the export at ``folder``."""
    from cqil.export.load import load_export

    model = load_export(folder, dtype="float32")
    tokens, logprobs = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        tokens.append(out.sequences[0, len(ids) :].tolist())
        logprobs.append(torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits]))
    return {"tokens": tokens, "logprobs": logprobs}


def compare(ref: dict, got: dict) -> tuple[float, float, list[str]]:
    """(share of equal greedy tokens, max |logprob diff| over the agreeing prefix, problems)."""
    problems, equal, total, max_diff = [], 0, 0, 0.0
    for p, (ref_tokens, got_tokens) in enumerate(zip(ref["tokens"], got["tokens"], strict=True)):
        total += len(ref_tokens)
        agree = 0
        while agree < len(ref_tokens) and agree < len(got_tokens) and ref_tokens[agree] == got_tokens[agree]:
            agree += 1
        equal += agree
        if agree < len(ref_tokens):
            problems.append(
                f"prompt {p}: tokens differ from step {agree}: vllm {got_tokens} vs transformers {ref_tokens}"
            )
        for t in range(min(agree + 1, len(got_tokens))):
            for tok, lp in got["logprobs"][p][t].items():
                max_diff = max(max_diff, abs(lp - ref["logprobs"][p][t, int(tok)].item()))
    return equal / total, max_diff, problems


# ------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Build every export and its reference, run vLLM once over all cases; {case: (ref, got)}."""
    problem = _vllm_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("vllm")
    runs, refs = [], {}
    for spec in EXPORTS:
        name = spec[0]
        folder = build_export(spec, root)
        ref = reference(folder, PROMPTS)
        for tp in (1, 2) if name in TP2 else (1,):
            case = f"{name}-tp{tp}"
            refs[case] = ref
            runs.append(
                dict(
                    name=case,
                    model=str(folder),
                    tp=tp,
                    prompts=PROMPTS,
                    max_tokens=MAX_TOKENS,
                    logprobs=TOP_K,
                )
            )

    # The real model: SmolLM2-135M with plan 14-26:2 (lp, learned gates at their initial 1), its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cqil
    from cqil.export.write import export_model
    from cqil.pretrained import fetch_model

    source = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    cqil.parallelize(model, SMOLLM_PLAN, bypass="lp")
    folder = export_model(model, root / "smollm2-lp", tokenizer=tokenizer)
    del model
    prompts = [
        tokenizer("The capital of France is")["input_ids"],
        tokenizer("def fibonacci(n):")["input_ids"],
    ]
    refs["smollm2-lp-tp1"] = reference(folder, prompts)
    runs.append(
        dict(
            name="smollm2-lp-tp1",
            model=str(folder),
            tp=1,
            prompts=prompts,
            max_tokens=MAX_TOKENS,
            logprobs=TOP_K,
            tokenizer=True,
        )
    )

    request, result = root / "request.json", root / "result.json"
    request.write_text(json.dumps({"runs": runs}))
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in the child process itself: faster starts
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB
        VLLM_NO_USAGE_STATS="1",
        PYTHONPATH="",
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [str(VENV_PYTHON), str(CHILD), str(request), str(result)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - start
    assert result.is_file(), f"vLLM child failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    got = json.loads(result.read_text())
    print(f"\nvLLM child: {seconds:.0f} s for {len(runs)} cases")
    return {case: (refs[case], got.get(case)) for case in refs}


CASES = [f"{spec[0]}-tp1" for spec in EXPORTS] + [f"{n}-tp2" for n in TP2] + ["smollm2-lp-tp1"]


@pytest.mark.parametrize("case", CASES)
def test_vllm_matches_transformers(case, served):
    ref, got = served[case]
    assert got is not None, f"{case}: vLLM did not run it"
    assert "error" not in got, f"{case}: {got['error']}\n{got.get('traceback', '')}"
    agreement, max_diff, problems = compare(ref, got)
    print(
        f"{case}: greedy tokens equal {agreement:.0%}, max |logprob diff| {max_diff:.2e}, {got.get('seconds')}"
    )
    assert not problems, f"{case}: " + "; ".join(problems)
    assert max_diff <= LOGPROB_ATOL, f"{case}: max |logprob diff| {max_diff:.2e} > {LOGPROB_ATOL}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "engines", "-s", "-q"]))
