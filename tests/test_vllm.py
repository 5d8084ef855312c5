"""vLLM serves cqil exports: greedy tokens and top-5 logprobs equal transformers' (cqil.export.load_export).

Exports are built here (tiny Llama, Mistral, Qwen2 and Qwen3 models from configs, every bypass mode,
both forms, a folded export, and the embedded SmolLM2 with plan ``14-26:2`` as lp and cqil), the
reference is computed here with transformers, and vLLM runs in its own environment (``.venv-vllm``,
made by ``scripts/setup_engines.sh vllm``) through ``tests/vllm_child.py``: one subprocess for all
cases, JSON in and out, ``LLM(model=..., dtype="float32", tensor_parallel_size=tp)``, eager
(``enforce_eager=True``, quick to start) or compiled as vLLM deploys a model (``COMPILED``, the SmolLM2
lp-fixed and cqil cases).

The tier fails, not skips, when the vLLM environment exists but vLLM or the plugin does not import or
register there (``test_the_plugin_registers``); it skips only without the environment.

The tiny models use head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ... but not 16) and
plan [[1, 2], [3, 4, 5]]: under TP=2 the pair runs branch-local (one branch per rank, the
concurrent layout) and the triple falls back to ordinary tensor parallelism over its heads.

Tolerance: the greedy tokens are equal (or part only at a tie: transformers rates vLLM's token within
``LOGPROB_ATOL`` of its own, see ``compare``), and every logprob vLLM reports (top-5 plus the chosen
token, at every step up to the first difference) is within ``LOGPROB_ATOL`` of transformers'
log-softmax for that token.
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

PLUGIN_PROBE = """
from transformers import AutoConfig
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins

load_general_plugins()  # what every vLLM process does: runs the entry point cqil.serving.vllm:register
assert "CqilForCausalLM" in ModelRegistry.get_supported_archs(), "CqilForCausalLM is not registered"
AutoConfig.for_model("cqil")  # the config class of model_type cqil
import cqil.serving.vllm.model  # the model module vLLM imports by name when it builds a model
"""


def vllm_problem(python: Path = VENV_PYTHON) -> tuple[str, str] | None:
    """None when vLLM runs the plugin in ``python``'s environment; otherwise ("skip", why) when there
    is no vLLM environment at all, ("fail", why) when there is one and vLLM or the plugin is broken."""
    if not python.is_file():
        return "skip", f"{python} is missing: run scripts/setup_engines.sh vllm"
    env = dict(os.environ, PYTHONPATH="", VLLM_NO_USAGE_STATS="1")
    probe = subprocess.run(
        [str(python), "-c", PLUGIN_PROBE], capture_output=True, text=True, timeout=300, env=env
    )
    if probe.returncode != 0:
        return "fail", (
            f"the cqil plugin does not import or register in {python} (rerun scripts/setup_engines.sh vllm): "
            f"{probe.stderr.strip()[-1500:]}"
        )
    return None


def require_vllm() -> None:
    """Skip without a vLLM environment; fail when it exists and vLLM or the plugin does not work."""
    problem = vllm_problem()
    if problem is None:
        return
    kind, why = problem
    if kind == "skip":
        pytest.skip(why)
    pytest.fail(why)


def test_a_broken_vllm_environment_fails_and_a_missing_one_skips(tmp_path):
    assert vllm_problem(tmp_path / "absent" / "python")[0] == "skip"
    broken = tmp_path / "python"
    broken.write_text(
        "#!/bin/sh\necho 'ModuleNotFoundError: No module named cqil.serving.vllm' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    kind, why = vllm_problem(broken)
    assert kind == "fail" and "cqil.serving.vllm" in why


@pytest.mark.engines
def test_the_plugin_registers():
    require_vllm()


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
# Compiled as vLLM deploys a model (no enforce_eager: on CPU dynamo traces it once and inductor
# compiles it): one vLLM decoder layer per group (lp, fixed), a CqilGroup with gates (cqil, Qwen3 head
# norms) and one without (none). The other cases run eager, which starts in seconds.
COMPILED = ["llama-lp-fixed-merged", "qwen3-cqil-merged", "llama-none-merged"]
# SmolLM2-135M with plan 14-26:2: (name, bypass, gates, compiled). lp with learned gates at their
# initial 1 runs as a CqilGroup whose MLPs share their input; lp with fixed gates as vLLM's
# LlamaDecoderLayer; cqil as a CqilGroup with gates.
SMOLLM = [
    ("smollm2-lp-learned", "lp", "learned", False),
    ("smollm2-lp-fixed", "lp", "fixed", True),
    ("smollm2-cqil", "cqil", "learned", True),
]
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
    """(share of equal greedy tokens, max |logprob diff| over the agreeing prefix and the step where
    the tokens part, problems).

    Two correct implementations part where the top two tokens tie to within float rounding: there
    each picks one and the continuations no longer compare (vLLM's own tests stop at the first
    difference for the same reason). A difference is accepted only as such a tie: transformers'
    log-probability of vLLM's token is within ``LOGPROB_ATOL`` of its own choice's."""
    problems, equal, total, max_diff = [], 0, 0, 0.0
    for p, (ref_tokens, got_tokens) in enumerate(zip(ref["tokens"], got["tokens"], strict=True)):
        total += len(ref_tokens)
        agree = 0
        while agree < len(ref_tokens) and agree < len(got_tokens) and ref_tokens[agree] == got_tokens[agree]:
            agree += 1
        equal += agree
        if agree < len(ref_tokens):
            step = ref["logprobs"][p][agree]
            margin = (
                None
                if agree >= len(got_tokens)
                else (step[ref_tokens[agree]] - step[got_tokens[agree]]).item()
            )
            if margin is None or margin > LOGPROB_ATOL:
                problems.append(
                    f"prompt {p}: tokens differ from step {agree} (transformers prefers its token by "
                    f"{margin if margin is None else f'{margin:.2e}'}): vllm {got_tokens} vs transformers {ref_tokens}"
                )
        for t in range(min(agree + 1, len(got_tokens))):
            for tok, lp in got["logprobs"][p][t].items():
                max_diff = max(max_diff, abs(lp - ref["logprobs"][p][t, int(tok)].item()))
    return equal / total, max_diff, problems


def test_compare_accepts_a_parting_only_at_a_tie():
    ref_lp = torch.log_softmax(torch.tensor([[5.0, 1.0, 0.0], [2.0, 2.0 - 1e-4, 0.0], [3.0, 0.0, 0.0]]), -1)
    ref = {"tokens": [[0, 0, 0]], "logprobs": [ref_lp]}

    def got(tokens, shift=0.0):
        return {
            "tokens": [tokens],
            "logprobs": [[{t: ref_lp[i, t].item() + shift} for i, t in enumerate(tokens)]],
        }

    assert compare(ref, got([0, 0, 0])) == (1.0, 0.0, [])
    agreement, _, problems = compare(ref, got([0, 1, 2]))  # step 1: token 1 is 1e-4 below token 0
    assert agreement == 1 / 3 and problems == []
    agreement, _, problems = compare(ref, got([1, 0, 0]))  # step 0: a clear preference ignored
    assert agreement == 0 and len(problems) == 1 and "step 0" in problems[0]
    assert compare(ref, got([0, 0, 0], shift=0.01))[1] == pytest.approx(0.01)


# ------------------------------------------------------------------ the run


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """Build the selected cases' exports and references, run vLLM once over them; {case: (ref, got)}."""
    require_vllm()
    # Only the cases this session runs (``-k`` selects some): a vLLM start costs seconds to minutes.
    selected = {
        item.callspec.params["case"]
        for item in request.session.items
        if "case" in getattr(getattr(item, "callspec", None), "params", {})
    }
    root = tmp_path_factory.mktemp("vllm")
    runs, refs = [], {}
    for spec in EXPORTS:
        name = spec[0]
        modes = [(tp, True) for tp in ((1, 2) if name in TP2 else (1,))]
        modes += [(1, False)] if name in COMPILED else []
        cases = [(tp, eager, f"{name}-tp{tp}" + ("" if eager else "-compiled")) for tp, eager in modes]
        cases = [c for c in cases if c[2] in selected]
        if not cases:
            continue
        folder = build_export(spec, root)
        ref = reference(folder, PROMPTS)
        for tp, eager, case in cases:
            refs[case] = ref
            runs.append(
                dict(
                    name=case,
                    model=str(folder),
                    tp=tp,
                    eager=eager,
                    prompts=PROMPTS,
                    max_tokens=MAX_TOKENS,
                    logprobs=TOP_K,
                )
            )

    # The real model with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cqil
    from cqil.export.write import export_model
    from cqil.pretrained import fetch_model

    source = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompts = [
        tokenizer("The capital of France is")["input_ids"],
        tokenizer("def fibonacci(n):")["input_ids"],
    ]
    for name, bypass, gates, compiled in SMOLLM:
        case = f"{name}-tp1" + ("-compiled" if compiled else "")
        if case not in selected:
            continue
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        cqil.parallelize(model, SMOLLM_PLAN, bypass=bypass, gates=gates)
        folder = export_model(model, root / name, tokenizer=tokenizer)
        del model
        refs[case] = reference(folder, prompts)
        runs.append(
            dict(
                name=case,
                model=str(folder),
                tp=1,
                eager=not compiled,
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
        timeout=2400,
    )
    seconds = time.perf_counter() - start
    assert result.is_file(), f"vLLM child failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    got = json.loads(result.read_text())
    print(f"\nvLLM child: {seconds:.0f} s for {len(runs)} cases")
    return {case: (refs[case], got.get(case)) for case in refs}


CASES = (
    [f"{spec[0]}-tp1" for spec in EXPORTS]
    + [f"{n}-tp2" for n in TP2]
    + [f"{n}-tp1-compiled" for n in COMPILED]
    + [f"{name}-tp1" + ("-compiled" if compiled else "") for name, _, _, compiled in SMOLLM]
)


@pytest.mark.engines
@pytest.mark.parametrize("case", CASES)
def test_vllm_matches_transformers(case, served):
    ref, got = served[case]
    assert got is not None, f"{case}: vLLM did not run it"
    assert "error" not in got, f"{case}: {got['error']}\n{got.get('traceback', '')}"
    # Compiled cases ran as vLLM deploys a model; eager ones with compilation off.
    assert (got["compilation"] != "NONE") == case.endswith("-compiled"), got["compilation"]
    agreement, max_diff, problems = compare(ref, got)
    print(
        f"{case}: greedy tokens equal {agreement:.0%}, max |logprob diff| {max_diff:.2e}, {got.get('seconds')}"
    )
    assert not problems, f"{case}: " + "; ".join(problems)
    assert max_diff <= LOGPROB_ATOL, f"{case}: max |logprob diff| {max_diff:.2e} > {LOGPROB_ATOL}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "engines", "-s", "-q"]))
