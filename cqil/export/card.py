"""The model card of a cqil export: :func:`render_model_card` and :func:`update_model_card`."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cqil.errors import ModelError, ModelNotFoundError
from cqil.evaluation.markdown import table
from cqil.files import write_atomic
from cqil.rewrite.group import effective_layers

if TYPE_CHECKING:
    pass


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub model id (``org/name``) and is not a local path."""
    if name and _HUB_ID.match(name) and not Path(name).exists():
        return name
    return None


def _read_report(report: Mapping | str | os.PathLike | None) -> tuple[dict, list[Path]]:
    """The report dict and the plot files to copy (paths in ``plots`` are relative to the report file)."""
    if report is None:
        return {}, []
    base = None
    if not isinstance(report, Mapping):
        path = Path(report)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFoundError(f"report {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"report {path}: not valid JSON ({e})") from None
        if not isinstance(report, dict):
            raise ModelError(f"report {path}: expected a JSON object")
        base = path.parent
    report = dict(report)
    names = report.get("plots")
    if names is None:
        plots = sorted(base.glob("*.png")) if base is not None else []
    else:
        plots = [Path(p) if Path(p).is_absolute() or base is None else base / p for p in names]
    for path in plots:
        if not path.is_file():
            raise ModelNotFoundError(f"report plot {path}: no such file")
    return report, plots


def _read_recipe(recipe: str | Mapping | os.PathLike | None) -> str | None:
    if recipe is None:
        return None
    if isinstance(recipe, Mapping):
        import yaml

        return yaml.safe_dump(dict(recipe), sort_keys=False)
    if isinstance(recipe, os.PathLike) or ("\n" not in recipe and Path(recipe).suffix in (".yaml", ".yml")):
        path = Path(recipe)
        if not path.is_file():
            raise ModelNotFoundError(f"recipe {path}: no such file")
        return path.read_text(encoding="utf-8")
    return str(recipe)


# ---------------------------------------------------------------------------------------------- model card

_BYPASS_TEXT = {
    "lp": "Layer Parallelism (G = 1): every MLP of a group reads the sum of all the group's attention outputs",
    "none": "no bypass (G = 0): the layers of a group are independent branches on the same input",
    "cqil": "CQIL bypass: each MLP also reads the attention outputs of the {d} branch(es) before it",
}
_GATE_UNIT = {"scalar": "pair of branches", "channel": "pair of branches and hidden channel"}
_RECIPE_LINES = 80


def render_model_card(
    cqil: Mapping,
    text_config,
    *,
    name: str,
    base_model: str | None = None,
    report: Mapping | None = None,
    recipe: str | None = None,
    plots: list[str] = (),
    dtype: str | None = None,
) -> str:
    """The README.md of an export: YAML metadata, then what was done, the results and how to load it.

    The metadata carries ``base_model`` (when it is a Hub id), ``library_name: transformers``,
    ``tags`` (``cqil`` first), ``datasets`` (``report["datasets"]``), ``pipeline_tag`` and a
    ``model-index`` with the exported model's results (perplexity and lm-eval metrics).
    """
    from huggingface_hub import EvalResult, ModelCardData

    report = dict(report or {})
    plan = cqil["plan"]
    groups = [list(g) for g in plan["groups"]]
    depth, arch = plan["num_layers"], getattr(text_config, "model_type", "?")
    depth_after = depth - sum(len(g) - 1 for g in groups)
    datasets = report.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else datasets
    eval_results = _eval_results(report, EvalResult)
    data = ModelCardData(
        base_model=_hub_id(base_model),
        library_name="transformers",
        license=report.get("license"),
        tags=["cqil", "layer-parallelism", arch, "custom_code"],
        datasets=datasets or None,
        pipeline_tag="text-generation",
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )

    bypass = _BYPASS_TEXT.get(cqil["bypass"], cqil["bypass"]).format(d=cqil.get("bypass_distance", 1))
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"{'`' + base_model + '`' if base_model else f'A {arch} model'} with "
        f"{_count(len(groups), 'group')} of consecutive layers rewritten to run in parallel "
        f"(CQIL / Layer Parallelism): {depth} sequential layers become {depth_after} "
        f"(ideal speed-up of the layer stack {depth / depth_after:.2f}x), then recovered by fine-tuning "
        "the rewritten layers and their bypass gates. Made with cqil, a recovery trainer for parallelized LLMs.",
        "",
        "## What was parallelized",
        "",
        "| effective layer | original layers | runs as |",
        "|---:|---|---|",
    ]
    for idx, indices in enumerate(effective_layers(groups, depth)):
        if len(indices) > 1 or [indices[0]] in groups:
            how = (
                "one plain wide layer (folded)" if cqil.get("folded") else f"{len(indices)} parallel branches"
            )
            lines.append(f"| {idx} | {', '.join(map(str, indices))} | {how} |")
    if cqil["bypass"] == "none":
        gates = "none (the branches exchange nothing)"
    elif cqil.get("folded"):
        gates = "all 1, folded into the wide layers"
    elif cqil["gates"] == "learned":
        gates = f"learned, one per {_GATE_UNIT[cqil['gate_shape']]}; exported with their trained values"
    else:
        gates = f"fixed at the mode's G, one per {_GATE_UNIT[cqil['gate_shape']]}"
    if cqil.get("folded"):
        form = "each group folded into one plain decoder layer with P x heads and P x intermediate size"
    elif cqil["form"] == "merged":
        form = "merged: each group's attentions run as one wide attention, its MLPs from fused projections"
    else:
        form = "branches: each group keeps its original layers' modules"
    lines += [
        "",
        f"- Bypass: **{cqil['bypass']}** — {bypass}.",
        f"- Gates: {gates}.",
        f"- Form: {form}" + (f"; weights in {dtype}." if dtype else "."),
        "",
    ]
    if recipe:
        excerpt = recipe.rstrip().splitlines()
        more = len(excerpt) - _RECIPE_LINES
        lines += ["## How it was recovered", "", "The recipe (excerpt):" if more > 0 else "The recipe:", ""]
        lines += [
            "```yaml",
            *excerpt[:_RECIPE_LINES],
            *([f"# ... {more} more lines"] if more > 0 else []),
            "```",
            "",
        ]
    results = _results_markdown(report)
    if results or plots:
        lines += ["## Results", "", *results]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        lines += [""] if plots else []
    lines += [
        "## How to load",
        "",
        "The folder ships its own small modeling code (`modeling_cqil.py`, `configuration_cqil.py`, "
        "`cqil_group.py`, `cqil_compat.py`), so transformers loads it with `trust_remote_code=True`; cqil itself is not needed.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "With cqil installed, `cqil.load_export(folder)` loads it with the package's own classes.",
        "",
    ]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _number(value) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("ppl", value.get("value"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


_STAGES = ("original", "parallelized", "recovered")


def _lm_eval_by_stage(lm_eval: Mapping) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {task: {metric: value}}}`` from either accepted ``lm_eval`` layout (numbers only)."""
    if not isinstance(lm_eval, Mapping):
        return {}
    by_stage = dict(lm_eval) if set(lm_eval) & set(_STAGES) else {"recovered": dict(lm_eval)}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for stage, tasks in by_stage.items():
        if not isinstance(tasks, Mapping):
            continue
        for task, metrics in tasks.items():
            if not isinstance(metrics, Mapping):
                continue
            for metric, value in metrics.items():
                # lm-eval-harness names metrics "acc,none" and adds "acc_stderr,none" and an alias.
                metric = str(metric).split(",")[0]
                if "stderr" in metric or _number(value) is None:
                    continue
                out.setdefault(stage, {}).setdefault(str(task), {})[metric] = float(value)
    return out


def _eval_results(report: Mapping, EvalResult) -> list:
    """model-index entries for the exported (recovered) model."""
    results = []
    ppl = _number((report.get("perplexity") or {}).get("recovered"))
    if ppl is not None:
        dataset = str(report.get("eval_dataset") or "held-out text")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="perplexity",
                metric_value=round(ppl, 4),
                metric_name="perplexity",
            )
        )
    for task, metrics in _lm_eval_by_stage(report.get("lm_eval") or {}).get("recovered", {}).items():
        for metric, value in metrics.items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_value=round(value, 4),
                )
            )
    return results


def _fmt(value) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.4g}"


def _results_markdown(report: Mapping) -> list[str]:
    if report.get(
        "schema_version"
    ):  # a report written by cqil.evaluation.report: its own tables, plots added by the card
        from cqil.evaluation.report import headline, results_markdown

        return [f"**{headline(report)}.**", "", *results_markdown({**report, "plots": []})]
    lines: list[str] = []
    ppl = report.get("perplexity") or {}
    if isinstance(ppl, Mapping) and any(_number(ppl.get(s)) is not None for s in _STAGES):
        where = f" on {report['eval_dataset']}" if report.get("eval_dataset") else ""
        lines += [f"Perplexity{where} (lower is better):", ""]
        lines += table(["model", "perplexity"], [[s, _fmt(ppl.get(s))] for s in _STAGES if s in ppl])
    latency = report.get("latency")
    if isinstance(latency, Mapping) and latency:
        lines += ["Latency:", ""]
        nested = {k: v for k, v in latency.items() if isinstance(v, Mapping)}
        if nested:
            columns = list(dict.fromkeys(c for v in nested.values() for c in v))
            rows = [[str(k)] + [_fmt(v.get(c)) for c in columns] for k, v in nested.items()]
            lines += table([""] + columns, rows)
        flat = [[str(k), _fmt(v)] for k, v in latency.items() if not isinstance(v, Mapping)]
        if flat:
            lines += table(["", "value"], flat)
    lm_eval = _lm_eval_by_stage(report.get("lm_eval") or {})
    if lm_eval:
        stages = [s for s in _STAGES if s in lm_eval] + [s for s in lm_eval if s not in _STAGES]
        keys = list(dict.fromkeys((t, m) for s in stages for t, ms in lm_eval[s].items() for m in ms))
        rows = [[t, m] + [_fmt(lm_eval[s].get(t, {}).get(m)) for s in stages] for t, m in keys]
        lines += ["lm-eval-harness:", ""] + table(["task", "metric", *stages], rows)
    return lines


def update_model_card(
    folder: str | os.PathLike,
    report: Mapping | str | os.PathLike,
    *,
    recipe: str | Mapping | os.PathLike | None = None,
    model_id: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Re-render the model card of the export at ``folder`` with ``report`` (and copy its plots).

    For a report measured on the export itself (latency, lm-eval), which exists only after the weights
    were written. The weights and code are not touched; the card is written to a temporary name and
    renamed, plots first.
    """
    from cqil.modeling.configuration_cqil import CqilConfig

    folder = Path(folder)
    config = CqilConfig.from_pretrained(folder)
    report_dict, plot_files = _read_report(report)
    plots = []
    for path in plot_files:
        (folder / "plots").mkdir(exist_ok=True)
        write_atomic(folder / "plots" / path.name, path.read_bytes())
        plots.append(f"plots/{path.name}")
    card = render_model_card(
        config.cqil,
        config.get_text_config(),
        name=model_id or folder.name,
        base_model=base_model or report_dict.get("base_model"),
        report=report_dict,
        recipe=_read_recipe(recipe),
        plots=plots,
        dtype=str(config.dtype).removeprefix("torch.") if config.dtype else None,
    )
    return write_atomic(folder / "README.md", card)


# ---------------------------------------------------------------------------------------------- load
