"""The accuracy part of a run's report: each lm-eval task's size, its chance level, each stage's
scores with their standard errors, and the share of the original's accuracy above chance that the
parallelized and the recovered model keep.

A raw accuracy hides how much a model lost: on a 4-way task the original's 0.40 is only 0.15 above
the 0.25 that guessing scores, so a recovered 0.325 keeps half of what the original knows, not 81 %.
:mod:`cqil.evaluation.report` puts these entries in ``report.json`` and the section in ``report.md``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cqil.evaluation.markdown import num, table

# The accuracies whose chance level a task's kind defines (cqil.evaluation.metrics.chance_level): the
# share of examples whose gold answer a model picks among the choices (by log-likelihood, per
# character, per byte or against the answer's own likelihood), or, for a loglikelihood task, whose
# greedy continuation is the target.
CHANCE_METRICS = frozenset({"acc", "acc_norm", "acc_bytes", "acc_mutual_info"})

ORIGINAL = "original"
STAGES = (ORIGINAL, "parallelized", "recovered")
KEPT_NOTE = (
    "chance: what random guessing scores (1 / the number of choices, averaged over the examples; 0 "
    "where the model must generate the target greedily). kept: the share of the original's accuracy "
    "above chance that the model keeps, (accuracy − chance) / (original − chance); "
    "– where the chance level is unknown or the original is not above it."
)


def kept(original: float | None, model: float | None, chance: float | None) -> float | None:
    """``(model - chance) / (original - chance)``: the share of the original's margin above chance
    that ``model`` keeps (1.0: all of it; below 0: under chance). None where a number is missing or
    the original is not above chance (no margin to keep)."""
    if original is None or model is None or chance is None or original <= chance:
        return None
    return (model - chance) / (original - chance)


def lm_eval_entries(lm_eval: Mapping[str, Mapping]) -> dict:
    """The report's lm-eval entries from :func:`cqil.evaluation.metrics.lm_eval_tasks` results by
    stage: ``lm_eval`` ``{stage: {task: {metric: value}}}`` (scores and their standard errors),
    ``lm_eval_samples`` ``{task: examples run}``, ``lm_eval_chance`` ``{task: chance level}`` where
    known, and ``lm_eval_kept`` ``{stage: {task: {metric: share kept}}}`` for each stage but the
    original, on :data:`CHANCE_METRICS` whose share is defined (:func:`kept`)."""
    scores: dict = {}
    samples: dict = {}
    chance: dict = {}
    for stage, tasks in lm_eval.items():
        scores[stage] = {}
        for task, metrics in (tasks or {}).items():
            if "samples" in metrics:
                samples.setdefault(task, metrics["samples"])
            if metrics.get("chance") is not None:
                chance.setdefault(task, metrics["chance"])
            scores[stage][task] = {m: v for m, v in metrics.items() if m not in ("samples", "chance")}
    out: dict = {"lm_eval": scores}
    if samples:
        out["lm_eval_samples"] = samples
    if chance:
        out["lm_eval_chance"] = chance
    share: dict = {}
    for stage in (s for s in scores if s != ORIGINAL):
        for task, metrics in scores[stage].items():
            original = scores.get(ORIGINAL, {}).get(task, {})
            for metric in CHANCE_METRICS & metrics.keys():
                value = kept(original.get(metric), metrics[metric], chance.get(task))
                if value is not None:
                    share.setdefault(stage, {}).setdefault(task, {})[metric] = value
    if share:
        out["lm_eval_kept"] = share
    return out


def _percent(fraction: float | None) -> str:
    """A share kept to the whole percent: a task's standard error moves it by more."""
    return "–" if fraction is None else f"{100 * fraction:.0f} %"


def _with_stderr(metrics: Mapping, metric: str) -> str:
    value = metrics.get(metric)
    if value is None:
        return "–"
    if metric == "perplexity" or metric.endswith("perplexity"):
        return num(value, 2)
    stderr = metrics.get(f"{metric}_stderr")
    return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def lm_eval_markdown(report: Mapping) -> list[str]:
    """The lm-eval section: each task's size, each score with its standard error and, where a task's
    chance level is known, the chance level and the share of the original's margin above it that
    each other model keeps."""
    lm_eval = report.get("lm_eval") or {}
    stages = [s for s in STAGES if s in lm_eval]
    if not stages:
        return []
    settings = report.get("lm_eval_settings") or {}
    samples = report.get("lm_eval_samples") or {}
    chance = report.get("lm_eval_chance") or {}
    share = report.get("lm_eval_kept") or {}
    limit = settings.get("limit")
    note = f", at most {limit} examples per task" if limit else ""
    shots = settings.get("num_fewshot") or 0
    keys = list(
        dict.fromkeys(
            (t, m) for s in stages for t, ms in lm_eval[s].items() for m in ms if not m.endswith("_stderr")
        )
    )
    # The chance and kept columns where a chance level and the original's scores are known.
    keeping = [s for s in stages if s != ORIGINAL] if chance and ORIGINAL in stages else []

    def chance_cells(task: str, metric: str) -> list[str]:
        if not keeping:
            return []
        applies = metric in CHANCE_METRICS and task in chance
        return [num(chance[task]) if applies else "–"]

    rows = [
        [
            t,
            num(samples.get(t), 0),
            m,
            *chance_cells(t, m),
            *[_with_stderr(lm_eval[s].get(t, {}), m) for s in stages],
            *[_percent(share.get(s, {}).get(t, {}).get(m)) for s in keeping],
        ]
        for t, m in keys
    ]
    header = ["task", "examples", "metric", *(["chance"] if keeping else []), *stages]
    header += [f"kept, {s}" for s in keeping]
    return [
        f"### lm-eval-harness ({shots}-shot{note})",
        "",
        "Accuracies ± one standard error over the task's examples (the three models answer the same "
        "examples: a difference within about two standard errors is noise).",
        "",
        *table(header, rows),
        *([KEPT_NOTE, ""] if keeping else []),
    ]
