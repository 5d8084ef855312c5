"""The latency part of a run's report: the headline's decode clause and the report's latency section.

Both name the decode mode and the device, give the ideal L / L_eff and the share of its gain reached,
call a ratio below 1 slower, and say where the hardware cannot show the depth reduction (a CPU), with
a pointer to the GPU figures; the latency plot draws perplexity against the decode speedup.
:mod:`cqil.evaluation.report` puts them in ``report.md`` and the report folder.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from cqil.evaluation.latency import share_of_ideal
from cqil.evaluation.markdown import num, table

MODE_NAMES = {"eager": "eager", "graph": "CUDA-graph"}
# The merged form's decode gain where decode is latency-bound per layer, measured on a GPU
# (bench/gpu_latency.py; the JSON lines are in bench/results/gpu-h200.jsonl).
GPU_REFERENCE = (
    "on a GPU with CUDA graphs, 1.20–1.46× measured (NVIDIA H200, bf16, batch 1, SmolLM2-135M to "
    "Llama-3-8B shapes; `bench/results/gpu-h200.jsonl`, measured with `bench/gpu_latency.py`)"
)


def _on_cpu(latency: Mapping) -> bool:
    return latency.get("device_type") == "cpu" or str(latency.get("device", "")).startswith("CPU")


def _where(latency: Mapping) -> str:
    mode = MODE_NAMES.get(latency.get("decode_mode") or "eager", "eager")
    device = "a CPU" if _on_cpu(latency) else latency.get("device", "?")
    return f"{mode} decode on {device}"


def latency_clause(latency: Mapping, model: str = "recovered") -> str | None:
    """The headline's decode clause: the ratio with its mode and device; a ratio below 1 is "slower"."""
    speedup = (latency.get("speedup") or {}).get(model, {}).get("decode")
    if speedup is None:
        return None
    if f"{speedup:.2f}" == "1.00":
        return f"decode at the original's speed (1.00×, {_where(latency)})"
    if speedup > 1:
        return f"{speedup:.2f}× faster decode ({_where(latency)})"
    return f"slower decode: {speedup:.2f}× the original's speed ({_where(latency)})"


def _phases(entry: Mapping, latency: Mapping) -> dict:
    """A model's phases, also from a report written before phases were recorded (flat keys only)."""
    if entry.get("phases"):
        return dict(entry["phases"])
    out = {}
    if entry.get("prefill_tokens_per_s") is not None:
        out[f"prefill_{latency.get('prefill_len')}"] = {"tokens_per_s": entry["prefill_tokens_per_s"]}
    if entry.get("decode_tokens_per_s") is not None:
        out["decode_eager"] = {"tokens_per_s": entry["decode_tokens_per_s"]}
    return out


def _phase_name(phase: str) -> tuple[str, str]:
    kind, _, rest = phase.partition("_")
    if kind == "prefill":
        return f"prefill {int(rest):,} tokens", "–"
    return "decode", MODE_NAMES.get(rest, rest)


def _ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}×" + (" (slower)" if x < 1 else "")


def latency_markdown(report: Mapping) -> list[str]:
    """The report's latency section: every phase and mode, the ideal, the share of the ideal gain, and
    what this hardware can show."""
    latency = report.get("latency") or {}
    models = latency.get("models") or {}
    if not models:
        return []
    plan = report.get("plan") or {}
    ideal = latency.get("ideal") or plan.get("ideal_speedup")
    baseline = latency.get("baseline") or next(iter(models))
    base = _phases(models.get(baseline, {}), latency)
    lines = [f"### Latency (batch 1, {latency.get('device', '?')})", ""]
    prompt = f" after a {latency['prompt_len']}-token prompt" if latency.get("prompt_len") else ""
    lines += [
        f"Greedy decoding of {latency.get('new_tokens')} tokens with the KV cache{prompt} and prefill, "
        f"medians of {latency.get('reps')} interleaved repetitions. Decode modes: eager is a `generate()` "
        "loop over a dynamic cache; CUDA-graph replays one captured decode step over a `StaticCache`, as "
        "vLLM, TensorRT-LLM and SGLang decode. The speedup is the original's median time over the model's, "
        "from the same medians as the tokens/s"
        + (
            f"; the ideal is L / L_eff = {ideal:.3f}×, and the share of the ideal gain is "
            "(speedup − 1) / (ideal − 1)."
            if ideal
            else "."
        ),
        "",
    ]
    rows = []
    for name, entry in models.items():
        if name == baseline:
            continue
        phases = _phases(entry, latency)
        speedups = (latency.get("speedup") or {}).get(name, {})
        for phase, numbers in phases.items():
            what, mode = _phase_name(phase)
            x = speedups.get(phase)
            if x is None and phase == f"prefill_{latency.get('prefill_len')}":
                x = speedups.get("prefill")
            if x is None and phase == "decode_eager":
                x = speedups.get("decode")
            share = share_of_ideal(x, ideal)
            rows.append(
                [
                    what,
                    mode,
                    name,
                    num((base.get(phase) or {}).get("tokens_per_s"), 1),
                    num(numbers.get("tokens_per_s"), 1),
                    _ratio(x),
                    "–" if share is None else f"{100 * share:.0f} %",
                ]
            )
    lines += table(
        [
            "phase",
            "mode",
            "model",
            f"{baseline} tokens/s",
            "model tokens/s",
            "speedup",
            "share of ideal gain",
        ],
        rows,
    )
    if plan.get("mode", "parallel") == "parallel":
        lines += [
            "The merged form runs each group as one wide layer (P× the heads and the intermediate size, the "
            "same weights as the group's layers), which is faster where decode is latency-bound per layer: "
            + GPU_REFERENCE
            + ".",
            "",
        ]
        if _on_cpu(latency):
            lines += [
                "This hardware cannot show that gain: on a CPU each core streams the same weights whatever "
                "the depth, so batch-1 decode of the merged form can at best match the original here (about "
                "1.0×); the GPU figures above show the depth reduction at work.",
                "",
            ]
        elif "graph" not in (latency.get("modes") or []):
            lines += [
                "Eager decode on a GPU is dominated by Python overhead per step; the CUDA-graph mode is the "
                "figure engines reach.",
                "",
            ]
    return lines


def quality_latency_png(report: Mapping, colors: Mapping[str, str]) -> bytes:
    """The report's latency plot: perplexity against decode speedup (in the report's decode mode) for
    each evaluated model, the recovered model at the ideal L / L_eff, and the searched plans; ``colors``
    by stage."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ppl = report.get("perplexity") or {}
    latency = report.get("latency") or {}
    speedup = {name: s.get("decode") for name, s in (latency.get("speedup") or {}).items()}
    ideal = (report.get("plan") or {}).get("ideal_speedup")
    points = {"original": 1.0}
    if "recovered" in speedup:  # the parallelized model is the same network, before training
        points |= {"parallelized": speedup["recovered"], "recovered": speedup["recovered"]}
    for stage, x in points.items():
        if stage in ppl:
            ax.scatter([x], [ppl[stage]["ppl"]], s=60, color=colors[stage], label=f"{stage} (measured)")
    if ideal and "recovered" in ppl:
        ax.scatter(
            [ideal],
            [ppl["recovered"]["ppl"]],
            marker="*",
            s=120,
            color=colors["recovered"],
            edgecolor="black",
            label="recovered at L / L_eff",
        )
    searched = report.get("plan_search") or []
    if searched:
        ax.scatter(
            [p["speedup"] for p in searched],
            [p["ppl"] for p in searched],
            marker="x",
            color="gray",
            label="searched plans (estimated speedup, calibration ppl)",
        )
    mode = MODE_NAMES.get(latency.get("decode_mode") or "eager", "eager")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")  # left of it: slower than the original
    ax.set_xlabel(f"decode speedup over the original (×, {mode} decode)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
