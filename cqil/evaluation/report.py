"""The evaluation report of a recovery: ``report.json``, ``report.md`` and PNG plots in one folder.

``report.json`` (``schema_version`` 1); every key but ``schema_version`` and ``plan`` may be absent
when it was not measured:

``schema_version``
    1.
``base_model``
    the original model's name or path, as the recipe gave it.
``plan``
    ``{"spec", "groups", "num_layers", "num_layers_after", "ideal_speedup", "bypass", "bypass_distance",
    "gates", "gate_shape", "form", "mode"}``: the groups and how they run; ``ideal_speedup`` is
    ``num_layers / num_layers_after`` (L / L_eff).
``perplexity``
    ``{stage: {"ppl", "nll", "tokens"}}`` for the stages ``original``, ``parallelized`` (before
    training; in coalesce mode the coalesced model) and ``recovered``: held-out perplexity, mean
    negative log-likelihood per predicted token (nats) and the number of predicted tokens. All stages
    see the same tokens.
``perplexity_by_source``
    ``{source: {stage: {"ppl", "nll", "tokens"}}}``: the same, split by the records' source label.
``gap_closed``
    ``(ppl_parallelized - ppl_recovered) / (ppl_parallelized - ppl_original)``: the fraction of the
    perplexity lost by the rewrite that training won back (1.0: all of it).
``other_domain``, ``other_domain_by_source``, ``other_domain_gap_closed``, ``other_domain_gap_closed_by_source``
    the same on text the run did not train on (the recipe's ``eval.other_domain``: every document,
    each packed on its own), split by the records' source label; ``other_domain_dataset`` names it.
    The headline leads with these when they were measured.
``lm_eval``
    ``{stage: {task: {metric: value}}}`` from lm-eval-harness (metric names without the harness's
    filter suffix); each accuracy has its standard error as ``"<metric>_stderr"``;
    ``lm_eval_samples`` is ``{task: examples run}`` and ``lm_eval_settings``
    ``{"tasks", "limit", "num_fewshot"}``.
``lm_eval_chance``, ``lm_eval_kept``
    ``{task: chance}``: what random guessing scores on the task's accuracies, where its kind defines
    it; ``{stage: {task: {metric: share}}}`` for ``parallelized`` and ``recovered``: the share of the
    original's accuracy above chance the model keeps, ``(acc - chance) / (acc_original - chance)``,
    where the original is above chance (:mod:`cqil.evaluation.accuracy_report`).
``latency``
    batch-1 speed of the original and the recovered model measured side by side
    (:func:`cqil.evaluation.latency.measure_latency`): ``{"device", "device_type", "dtype", "prefill_lens",
    "prompt_len", "new_tokens", "reps", "baseline", "modes", "decode_mode", "models": {name: {"phases":
    {phase: {"ms", "tokens", "tokens_per_s"[, "ms_per_token"]}}, ...}}, "speedup": {name: {phase: x,
    "prefill", "decode"}}, "ideal"}``. Phases are ``prefill_<n>``, ``decode_eager`` and, on CUDA,
    ``decode_graph`` (a CUDA graph over a ``StaticCache``); ``decode`` is the ``decode_mode`` phase;
    ``speedup`` is the original's median time over the model's (the same medians as the tokens/s);
    ``ideal`` is L / L_eff.
``steps``, ``tokens_trained``
    optimizer steps and training tokens (all processes).
``plan_search``
    with ``groups: auto``: every plan the search measured, ``[{"groups", "depth", "speedup", "ppl"}]``
    (``speedup``: the search's estimate from measured per-layer times; ``ppl`` on its calibration text).
``eval_dataset``, ``datasets``
    the held-out text and the training data, as the recipe named them.
``recipe``
    the whole recipe as a dict.
``plots``
    the PNG files beside ``report.json``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cqil.evaluation.accuracy_report import lm_eval_entries, lm_eval_markdown
from cqil.evaluation.latency_report import latency_clause, latency_markdown, quality_latency_png
from cqil.evaluation.markdown import num, table
from cqil.export.engines import describe_engines
from cqil.files import check_out_dir, staged_folder

SCHEMA_VERSION = 1
STAGES = ("original", "parallelized", "recovered")
_STAGE_COLORS = {"original": "#4c72b0", "parallelized": "#dd8452", "recovered": "#55a868"}


_PLAN_OPTIONS = ("bypass", "bypass_distance", "gates", "gate_shape", "form")


def plan_summary(plan, options: Mapping, *, mode: str = "parallel") -> dict:
    """The report's ``plan`` entry for a :class:`cqil.GroupPlan` and the rewrite's options (a mapping
    with the keys of ``model.config.cqil`` or the recipe's ``parallelize`` section)."""
    return {
        "spec": str(plan),
        "groups": [list(g) for g in plan.groups],
        "num_layers": plan.num_layers,
        "num_layers_after": plan.num_layers_after,
        "ideal_speedup": round(plan.ideal_speedup, 4),
        "mode": mode,
        **{k: options.get(k) for k in _PLAN_OPTIONS},
    }


def build_report(
    *,
    base_model: str | None,
    plan: dict,
    perplexity_results: Mapping[str, Mapping] | None = None,
    eval_dataset: str | None = None,
    lm_eval: Mapping | None = None,
    lm_eval_settings: Mapping | None = None,
    latency: Mapping | None = None,
    other_domain_dataset: str | None = None,
    **extra,
) -> dict:
    """The ``report.json`` content (schema above) from what was measured; both the trainer and
    ``cqil evaluate`` build their reports here, so the two always have the same shape.

    ``perplexity_results`` are :func:`cqil.evaluation.metrics.perplexity` results by stage, each with
    the perplexity on the out-of-domain text under ``"other_domain"`` when it was measured (and the
    text's name under its ``"dataset"``, unless ``other_domain_dataset`` gives it); ``extra`` are
    further top-level keys of the schema (``steps``, ``tokens_trained``, ``datasets``, ...).
    """
    report: dict = {"schema_version": SCHEMA_VERSION, "base_model": base_model, "plan": plan}
    if perplexity_results:
        heldout = {s: r for s, r in perplexity_results.items() if "ppl" in r}
        if heldout:  # cqil evaluate may measure the out-of-domain text alone
            report |= _perplexity_entries(heldout, HELDOUT_KEYS)
        other = {s: r["other_domain"] for s, r in perplexity_results.items() if r.get("other_domain")}
        if other:
            report |= _perplexity_entries(other, OTHER_DOMAIN_KEYS)
            named = [r.get("dataset") for r in other.values() if r.get("dataset")]
            report["other_domain_dataset"] = other_domain_dataset or (named[0] if named else None)
    if eval_dataset is not None:
        report["eval_dataset"] = eval_dataset
    if lm_eval:
        report |= lm_eval_entries(lm_eval)
        report["lm_eval_settings"] = dict(lm_eval_settings or {})
    if latency is not None:
        report["latency"] = dict(latency)
    report |= {k: v for k, v in extra.items() if v is not None}
    return report


# The report's keys for one text's perplexity: by stage, by source, the gap closed, and by source.
HELDOUT_KEYS = ("perplexity", "perplexity_by_source", "gap_closed", "gap_closed_by_source")
OTHER_DOMAIN_KEYS = (
    "other_domain",
    "other_domain_by_source",
    "other_domain_gap_closed",
    "other_domain_gap_closed_by_source",
)


def _perplexity_entries(results: Mapping[str, Mapping], keys: Sequence[str]) -> dict:
    """One text's perplexity by stage and by source, and the gap closed, under ``keys``."""
    ppl = {
        stage: {n: results[stage][n] for n in ("ppl", "nll", "tokens")}
        for stage in STAGES
        if stage in results
    }
    sources = by_source(results)
    closed = {source: gap_closed(numbers) for source, numbers in sources.items()}
    return dict(zip(keys, (ppl, sources, gap_closed(ppl), closed), strict=True))


def gap_closed(perplexity: Mapping) -> float | None:
    """The fraction of the rewrite's perplexity loss that recovery won back, or None if unknown."""
    try:
        original, before, after = (float(perplexity[s]["ppl"]) for s in STAGES)
    except (KeyError, TypeError):
        return None
    if before - original <= 0:  # the rewrite lost nothing: there is no gap to close
        return None
    return (before - after) / (before - original)


def by_source(results: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
    """``{source: {stage: numbers}}`` from ``{stage: perplexity(...) result}`` (sources in first-seen order)."""
    out: dict[str, dict[str, dict]] = {}
    for stage in STAGES:
        for source, numbers in (results.get(stage) or {}).get("by_source", {}).items():
            out.setdefault(source, {})[stage] = dict(numbers)
    return out


IN_DOMAIN = "the in-domain held-out split of the training sources"
OTHER_DOMAIN = "text the run did not train on"


def percent(fraction: float | None) -> str:
    """A share of the gap to the whole percent: its noise (which tokens, which run) is larger."""
    return "–" if fraction is None else f"{100 * fraction:.0f} %"


def heldout_text(report: Mapping) -> str:
    """What the held-out perplexity was measured on: a run's held-out split of its own sources
    (``datasets`` names them), or the text ``cqil evaluate`` was given."""
    return IN_DOMAIN if report.get("datasets") is not None else "the held-out text"


def perplexity_clauses(report: Mapping) -> list[str]:
    """The headline's perplexity part: out of domain first (gap closed and recovered perplexity),
    then the held-out split, labelled as in-domain; a run without out-of-domain text says so."""
    parts = []
    other = report.get("other_domain") or {}
    if "recovered" in other:
        recovered, original = other["recovered"]["ppl"], (other.get("original") or {}).get("ppl")
        against = "" if original is None else f", original {original:.2f}"
        name = report.get("other_domain_dataset")
        what = f"{OTHER_DOMAIN} (recovered perplexity {recovered:.2f}{against}" + (
            f"; `{name}`)" if name else ")"
        )
        closed = report.get("other_domain_gap_closed")
        parts.append(
            f"{percent(closed)} of the perplexity gap closed on {what}" if closed is not None else what
        )
    closed = report.get("gap_closed")
    if closed is not None:
        where = heldout_text(report)
        if parts:
            parts.append(f"{percent(closed)} on {where}")
        else:
            unmeasured = " (no text outside the training sources measured: eval.other_domain)"
            parts.append(
                f"{percent(closed)} of the perplexity gap closed on {where}"
                + (unmeasured if where == IN_DOMAIN else "")
            )
    return parts


def headline(report: Mapping) -> str:
    """The gap closed out of domain, then in domain, then the decode speed (the parts that were measured):
    "X % of the perplexity gap closed on text the run did not train on (...); Y % on the in-domain
    held-out split of the training sources; Z× faster decode (mode, device)"."""
    parts = perplexity_clauses(report)
    decode = latency_clause(report.get("latency") or {})
    if decode is not None:
        parts.append(decode)
    if not parts:
        ppl = (report.get("perplexity") or {}).get("recovered", {}).get("ppl")
        parts.append(f"recovered perplexity {ppl:.2f}" if ppl is not None else "no results")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- markdown


def results_markdown(report: Mapping, *, plot_dir: str = "") -> list[str]:
    """The report's tables and plots as Markdown lines (the body of ``report.md`` and of the model card)."""
    lines: list[str] = []
    if report.get("other_domain"):
        name = report.get("other_domain_dataset")
        title = f"Out-of-domain perplexity, {OTHER_DOMAIN}" + (f" (`{name}`)" if name else "")
        lines += _perplexitytable(title, report, OTHER_DOMAIN_KEYS)
    if report.get("perplexity"):
        where = f" (`{report['eval_dataset']}`)" if report.get("eval_dataset") else ""
        lines += _perplexitytable(f"Perplexity on {heldout_text(report)}{where}", report, HELDOUT_KEYS)
    lines += lm_eval_markdown(report)
    lines += latency_markdown(report)
    names = [p for p in report.get("plots", [])]
    if names:
        lines += ["### Plots", ""]
        lines += [f"![{Path(p).stem}]({plot_dir}{p})" for p in names]
        lines += [""]
    return lines


def _perplexitytable(title: str, report: Mapping, keys: Sequence[str]) -> list[str]:
    """One text's perplexity by stage, overall and by source, with the gap closed: two decimals of
    perplexity and whole percents, the precision a few thousand tokens support."""
    ppl_key, sources_key, closed_key, closed_by_source_key = keys
    ppl = report.get(ppl_key) or {}
    stages = [s for s in STAGES if s in ppl]
    if not stages:
        return []
    tokens = next(iter(ppl.values())).get("tokens")
    lines = [f"### {title}", "", f"{tokens:,} predicted tokens; lower is better.", ""]
    # The share of each text's rewrite loss won back: sources recover unequally.
    closed = (report.get(closed_by_source_key) or {}) if report.get(closed_key) is not None else None
    gap = [] if closed is None else ["gap closed"]

    def pct(value):
        return [] if closed is None else [percent(value)]

    rows = [["all", *[num(ppl[s]["ppl"], 2) for s in stages], *pct(report.get(closed_key))]]
    for source, numbers in (report.get(sources_key) or {}).items():
        n = next(iter(numbers.values())).get("tokens")
        rows.append(
            [
                f"{source} ({n:,} tokens)",
                *[num(numbers.get(s, {}).get("ppl"), 2) for s in stages],
                *pct(None if closed is None else closed.get(source)),
            ]
        )
    return lines + table(["text", *stages, *gap], rows)


def render_markdown(report: Mapping) -> str:
    """``report.md``: the headline, what was done, then the tables and plots."""
    plan = report.get("plan") or {}
    lines = [f"# Recovery report: {report.get('base_model', 'model')}", "", f"**{headline(report)}.**", ""]
    if plan:
        mode = "coalesced" if plan.get("mode") == "coalesce" else "parallel"
        lines += [
            f"- Plan `{plan['spec']}`: {len(plan['groups'])} {mode} group(s), {plan['num_layers']} -> "
            f"{plan['num_layers_after']} sequential layers (ideal {plan['ideal_speedup']:.2f}×); bypass "
            f"`{plan.get('bypass')}`, gates `{plan.get('gates')}`, form `{plan.get('form')}`.",
        ]
        if mode == "parallel" and plan.get("bypass") and plan.get("gates"):
            lines.append(f"- Engines: {describe_engines(plan['bypass'], plan['gates'])}.")
    if report.get("tokens_trained") is not None:
        lines.append(f"- Trained {report.get('steps', 0)} steps on {report['tokens_trained']:,} tokens.")
    for key, text in (("other_domain", OTHER_DOMAIN), ("perplexity", heldout_text(report))):
        ppl = report.get(key) or {}
        if all(s in ppl for s in STAGES):
            lines.append(
                "- Perplexity on {}: original {:.2f}, parallelized {:.2f}, recovered {:.2f}.".format(
                    text, *(ppl[s]["ppl"] for s in STAGES)
                )
            )
    lines += ["", *results_markdown(report)]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def similarity_png(matrix, groups: Sequence[Sequence[int]]) -> bytes:
    """Heatmap of the original layers' input similarity with the plan's groups outlined."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(5.6, 4.8), layout="constrained")
    ax = fig.subplots()
    data = matrix.numpy() if hasattr(matrix, "numpy") else matrix
    image = ax.imshow(data, cmap="viridis", vmax=1.0)
    for group in groups:
        start, size = group[0], len(group)
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="red", lw=1.5))
    ax.set_title("cosine similarity of the original layers' inputs\n(red: the parallel groups)", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.85)
    return _png(fig)


def losses_png(history: Sequence[Mapping]) -> bytes:
    """Training loss curves, one panel per loss part (and the weighted total), against the step."""
    from matplotlib.figure import Figure

    parts = [k for k in dict.fromkeys(k for h in history for k in h) if k not in ("step", "lr", "tokens")]
    parts = ["loss"] + [k for k in parts if k != "loss"]
    fig = Figure(figsize=(4.2 * len(parts), 3.4), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts, strict=True):
        points = [(h["step"], h[part]) for h in history if part in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], color="#4c72b0", lw=1.2)
        ax.set_title("total (weighted)" if part == "loss" else part, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _png(fig)


def perplexity_png(perplexity: Mapping, sources: Mapping) -> bytes:
    """Grouped bars: perplexity of the three stages, on the held-out text overall ("held-out") and for
    each group of ``sources``."""
    from matplotlib.figure import Figure

    stages = [s for s in STAGES if s in perplexity]
    groups = {"held-out": perplexity, **sources}
    fig = Figure(figsize=(1.8 + 1.6 * len(groups), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(stages), 1)
    for i, stage in enumerate(stages):
        xs = [g + (i - (len(stages) - 1) / 2) * width for g in range(len(groups))]
        ys = [(numbers.get(stage) or {}).get("ppl", float("nan")) for numbers in groups.values()]
        bars = ax.bar(xs, ys, width, label=stage, color=_STAGE_COLORS[stage])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), [g.removeprefix("RedPajama") for g in groups], fontsize=8)
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- write


def write_report(
    report: Mapping,
    out_dir: str | os.PathLike,
    *,
    similarity=None,
    history: Sequence[Mapping] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; returns the folder.

    ``similarity``: the original model's layer-input similarity matrix (L, L), drawn with the groups;
    ``history``: training metrics, one mapping per step with ``"step"`` and each loss part. The folder is
    written beside the target and renamed into place; an existing non-empty ``out_dir`` is refused
    unless ``overwrite``.
    """
    out = check_out_dir(out_dir, overwrite)
    report = dict(report)
    pngs: dict[str, bytes] = {}
    groups = (report.get("plan") or {}).get("groups") or []
    if similarity is not None:
        pngs["similarity.png"] = similarity_png(similarity, groups)
    if history:
        pngs["losses.png"] = losses_png(history)
    if report.get("perplexity"):
        sources = dict(report.get("perplexity_by_source") or {})
        if report.get("other_domain"):  # beside the held-out sources: the text the run did not train on
            sources["out of domain"] = report["other_domain"]
        pngs["perplexity.png"] = perplexity_png(report["perplexity"], sources)
    if report.get("perplexity") and (report.get("latency") or report.get("plan_search")):
        pngs["quality_latency.png"] = quality_latency_png(report, _STAGE_COLORS)
    report["plots"] = list(pngs)
    with staged_folder(out, model=False) as staging:
        for name, data in pngs.items():
            (staging / name).write_bytes(data)
        (staging / "report.json").write_text(
            json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8"
        )
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return out


def read_history(path: str | os.PathLike) -> list[dict]:
    """Per-step training metrics from a ``metrics.jsonl``; a step logged twice (a resumed run) keeps its last entry.

    A line that does not parse (torn by a kill mid-write) is skipped."""
    steps: dict[int, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    entry = json.loads(line)
                    steps[int(entry["step"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue
    return [steps[s] for s in sorted(steps)]
