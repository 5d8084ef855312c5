"""Export a parallelized model as a Hugging Face model folder, load one back, push one to the Hub.

An export folder holds::

    config.json                   model_type "cqil", auto_map -> the two files below
    configuration_cqil.py         CqilConfig            (cqil/modeling/configuration_cqil.py, verbatim)
    modeling_cqil.py              CqilForCausalLM       (cqil/modeling/modeling_cqil.py, verbatim)
    cqil_group.py                 the group math        (cqil/rewrite/group.py, verbatim; imported relatively)
    model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json
    tokenizer files               when a tokenizer is given
    README.md                     the model card: YAML metadata + what was done, results, how to load
    plots/*.png                   the report's plots, when given

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with transformers
alone; :func:`load_export` loads it with this package's classes (no remote code). The state dict
keys are those of the in-memory parallelized model, so weights are written as they are. Nothing is
ever pickled: weights are safetensors, everything else JSON, Python source or Markdown.

Every export is written into a hidden temporary sibling of ``out_dir`` and renamed into place at the
end, so a failure leaves no partial folder behind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cqil.rewrite.group import effective_layers
from cqil.rewrite.surgery import layers_prefix

if TYPE_CHECKING:
    from torch import nn

_PACKAGE = Path(__file__).resolve().parents[1]
# Export-folder name -> source file in the package.
CODE_FILES = {
    "configuration_cqil.py": _PACKAGE / "modeling" / "configuration_cqil.py",
    "modeling_cqil.py": _PACKAGE / "modeling" / "modeling_cqil.py",
    "cqil_group.py": _PACKAGE / "rewrite" / "group.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_cqil.CqilConfig",
    "AutoModelForCausalLM": "modeling_cqil.CqilForCausalLM",
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# What a model folder must never contain: every one of these is (or may be) a pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------- export


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    report: Mapping | str | os.PathLike | None = None,
    recipe: str | Mapping | os.PathLike | None = None,
    base_model: str | None = None,
    model_id: str | None = None,
    dtype: str | torch.dtype | None = None,
    fold: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` as a Hugging Face model folder at ``out_dir`` and return its path.

    Args:
        model: a model rewritten by :func:`cqil.parallelize` (any supported base class), or a
            :class:`~cqil.modeling.CqilForCausalLM` (e.g. from :func:`load_export`).
        out_dir: the folder to create. An existing non-empty folder is refused unless ``overwrite``.
        tokenizer: saved into the folder when given.
        report: the evaluation report, as a dict or the path of its JSON file (plots named in it, or
            every ``*.png`` beside the file, are copied to ``plots/``). Read keys, all optional:
            ``perplexity.{original,parallelized,recovered}`` (a number or ``{"ppl": ...}``),
            ``latency`` (a dict of numbers or of dicts), ``lm_eval`` (``{task: {metric: value}}`` for
            the exported model, or ``{"original"|"parallelized"|"recovered": {task: {metric: value}}}``),
            ``eval_dataset`` (name of the perplexity text), ``datasets`` (Hub ids of the training
            data), ``base_model``, ``license``, ``plots``.
        recipe: the recovery recipe (YAML text, a path to it, or a dict), quoted in the model card.
        base_model: Hub id of the original model for the card's ``base_model``; defaults to
            ``report["base_model"]``, then to the model's ``name_or_path`` when that is a Hub id.
        model_id: the name the card uses for the model (title, loading snippet), e.g. the Hub repo
            it will be pushed to; default: the folder's name.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; default: the
            model's own (training) dtype.
        fold: write every group as one plain wide decoder layer (P x heads, P x intermediate size,
            norm weights folded into the projections). Only for ``lp`` bypass with every gate at 1;
            the folded model computes the same function and still loads through ``modeling_cqil.py``,
            because one base-architecture config cannot give layers different widths.
        overwrite: replace an existing non-empty ``out_dir``.
        max_shard_size: safetensors shard size (``"5GB"``, ``"500MB"`` or bytes).
    """
    from cqil.modeling.configuration_cqil import CqilConfig

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    text_config, cqil = _split_config(model)
    _reset_runtime_settings(text_config)
    torch_dtype = _parse_dtype(dtype) if dtype is not None else _model_dtype(model)
    state = _export_state_dict(model, cqil, fold=fold)
    if fold:
        cqil["folded"] = True
    cpu = torch.device("cpu")
    state = {
        k: _owned(v.detach().to(cpu, torch_dtype if v.is_floating_point() else v.dtype))
        for k, v in state.items()
    }

    text_config.dtype = torch_dtype
    text_config.architectures = None  # text_config alone does not load these weights
    config = CqilConfig(
        text_config=text_config,
        cqil=cqil,
        architectures=["CqilForCausalLM"],
        auto_map=dict(AUTO_MAP),
        dtype=torch_dtype,
    )
    # What is written must load: compare with the model the config describes, before writing.
    _compare_shapes(
        _expected_shapes(config),
        {k: (f"{type(model).__name__}.state_dict()", tuple(v.shape)) for k, v in state.items()},
        where=f"{type(model).__name__}.state_dict()",
    )
    report_dict, plot_files = _read_report(report)
    recipe_text = _read_recipe(recipe)
    base_model = base_model or report_dict.get("base_model") or _hub_id(getattr(model, "name_or_path", ""))

    with staged_folder(out) as staging:
        config.save_pretrained(staging)
        for name, source in CODE_FILES.items():
            shutil.copyfile(source, staging / name)
        _save_weights(state, staging, max_shard_size)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        plots = []
        for path in plot_files:
            (staging / "plots").mkdir(exist_ok=True)
            shutil.copyfile(path, staging / "plots" / path.name)
            plots.append(f"plots/{path.name}")
        card = render_model_card(
            cqil,
            text_config,
            name=model_id or out.name,
            base_model=base_model,
            report=report_dict,
            recipe=recipe_text,
            plots=plots,
            dtype=str(torch_dtype).removeprefix("torch."),
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def _split_config(model: nn.Module) -> tuple[Any, dict]:
    """(a copy of the base config at the effective depth, a copy of the cqil dict) of ``model``."""
    config = model.config
    if getattr(config, "model_type", None) == "cqil":
        return copy.deepcopy(config.text_config), copy.deepcopy(config.cqil)
    cqil = getattr(config, "cqil", None)
    if not cqil:
        raise ValueError(
            f"{type(model).__name__} is not parallelized (its config has no 'cqil' entry): "
            "call cqil.parallelize(model, plan, ...) before exporting"
        )
    text_config = copy.deepcopy(config)
    del text_config.cqil
    return text_config, copy.deepcopy(dict(cqil))


def _reset_runtime_settings(text_config) -> None:
    # The attention implementation is chosen by whoever loads the export (it is never saved); the
    # exporting process may not have the one the model was trained with (flash attention on a CPU box).
    text_config._attn_implementation = None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {sorted(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _export_state_dict(model: nn.Module, cqil: dict, *, fold: bool) -> dict[str, torch.Tensor]:
    """The tensors to save: the model's state dict without tied copies, groups folded if asked."""
    from cqil.rewrite.group import MergedGroup, ParallelGroup

    state = dict(model.state_dict())
    # A tied output projection is the embedding matrix; save it once, as transformers does.
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state and state[target].data_ptr() == state[source].data_ptr():
            del state[target]
    if not fold or cqil.get("folded"):
        return state

    if cqil["bypass"] != "lp":
        raise ValueError(
            f"fold needs bypass 'lp' (every MLP reading all attention outputs); got {cqil['bypass']!r}"
        )
    prefix = layers_prefix(model)
    groups = [(idx, g) for idx, g in enumerate(model.model.layers) if isinstance(g, ParallelGroup)]
    if len(groups) != len(cqil["plan"]["groups"]):
        raise ValueError(
            f"fold: found {len(groups)} cqil.rewrite.group modules for the {len(cqil['plan']['groups'])} groups "
            "of the plan (a model loaded with trust_remote_code has its own copies of the group classes; "
            "load it with cqil.export.write.load_export instead)"
        )
    for idx, group in groups:
        where = f"group {list(group.original_indices)} ({prefix}.{idx})"
        gates = group.gate_matrix()
        if gates is not None and not bool((gates == 1).all()):
            raise ValueError(
                f"cannot fold {where}: its gates are not all 1 (min {gates.min().item():.4g}, "
                f"max {gates.max().item():.4g}); fold needs lp gates at 1"
            )
        if not isinstance(group, MergedGroup):
            group = MergedGroup.from_layers(
                list(group.branches),
                group.config,
                group.layer_idx,
                group.original_indices,
                bypass="lp",
                bypass_distance=group.bypass_distance,
                gates="fixed",
                gate_shape=group.gate_shape,
                sliding_window=group.sliding_window,
            )
        try:
            plain = group.plain_layer_state_dict()
        except ValueError as e:
            raise ValueError(f"cannot fold {where}: {e}") from e
        for key in [k for k in state if k.startswith(f"{prefix}.{idx}.")]:
            del state[key]
        state.update({f"{prefix}.{idx}.{name}": tensor for name, tensor in plain.items()})
    return state


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy when it is a view into a larger buffer (DeepSpeed keeps parameters in
    flat buffers), which safetensors refuses to save."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})


@contextlib.contextmanager
def staged_folder(out: Path, *, model: bool = True):
    """A hidden sibling of ``out`` to write a model folder (or, ``model=False``, any folder) into.

    When the block succeeds a model folder is checked — no pickle files (e.g. a tokenizer class
    that pickles: a model folder must stay safe to open), and every file gets the mode the user's
    umask gives ``config.json`` (some writers, safetensors among them, create mode-600 files) —
    and renamed to ``out``, replacing a previous ``out`` only then. On failure nothing is left.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "tmp")
    staging.mkdir()
    try:
        yield staging
        if model:
            pickles = [p.name for p in staging.rglob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ValueError(
                    f"refusing to write pickle files into an export: {', '.join(sorted(pickles))}"
                )
            mode = (staging / "config.json").stat().st_mode & 0o777
            for path in staging.rglob("*"):
                if path.is_file():
                    path.chmod(mode)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    # Hidden and unique, in the same folder, so the final rename stays on one filesystem.
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing a previous ``target`` only once the new one is in place."""
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
            raise FileNotFoundError(f"report {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"report {path}: not valid JSON ({e})") from None
        if not isinstance(report, dict):
            raise ValueError(f"report {path}: expected a JSON object")
        base = path.parent
    report = dict(report)
    names = report.get("plots")
    if names is None:
        plots = sorted(base.glob("*.png")) if base is not None else []
    else:
        plots = [Path(p) if Path(p).is_absolute() or base is None else base / p for p in names]
    for path in plots:
        if not path.is_file():
            raise FileNotFoundError(f"report plot {path}: no such file")
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
            raise FileNotFoundError(f"recipe {path}: no such file")
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
        "`cqil_group.py`), so transformers loads it with `trust_remote_code=True`; cqil itself is not needed.",
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
        "With cqil installed, `cqil.export.write.load_export(folder)` loads it with the package's own classes.",
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows] + [""]


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
        lines += _table(["model", "perplexity"], [[s, _fmt(ppl.get(s))] for s in _STAGES if s in ppl])
    latency = report.get("latency")
    if isinstance(latency, Mapping) and latency:
        lines += ["Latency:", ""]
        nested = {k: v for k, v in latency.items() if isinstance(v, Mapping)}
        if nested:
            columns = list(dict.fromkeys(c for v in nested.values() for c in v))
            rows = [[str(k)] + [_fmt(v.get(c)) for c in columns] for k, v in nested.items()]
            lines += _table([""] + columns, rows)
        flat = [[str(k), _fmt(v)] for k, v in latency.items() if not isinstance(v, Mapping)]
        if flat:
            lines += _table(["", "value"], flat)
    lm_eval = _lm_eval_by_stage(report.get("lm_eval") or {})
    if lm_eval:
        stages = [s for s in _STAGES if s in lm_eval] + [s for s in lm_eval if s not in _STAGES]
        keys = list(dict.fromkeys((t, m) for s in stages for t, ms in lm_eval[s].items() for m in ms))
        rows = [[t, m] + [_fmt(lm_eval[s].get(t, {}).get(m)) for s in stages] for t, m in keys]
        lines += ["lm-eval-harness:", ""] + _table(["task", "metric", *stages], rows)
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
        tmp = folder / "plots" / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, folder / "plots" / path.name)
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
    tmp = folder / ".README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, folder / "README.md")
    return folder / "README.md"


# ---------------------------------------------------------------------------------------------- load


def check_export(folder: str | os.PathLike):
    """Check that ``folder`` is a complete cqil export and return its :class:`CqilConfig`.

    Raises ``FileNotFoundError`` (a missing folder, config, code or weight file) or ``ValueError``
    (not a cqil export, a malformed ``cqil`` entry, a weight missing, unexpected or of the wrong
    shape), each with one message that names the file or key.
    """
    from safetensors import safe_open

    from cqil.modeling.configuration_cqil import CqilConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file; {folder} is not a model folder")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "cqil":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise ValueError(
            f"{config_path}: model_type is {found!r}, not 'cqil'; {folder} is not a cqil export "
            "(write one with `cqil export` or cqil.export_model)"
        )
    for key in ("cqil", "text_config"):
        if not isinstance(raw.get(key), dict):
            raise ValueError(f"{config_path}: '{key}' is missing or not an object")
    for key in ("plan", "bypass", "bypass_distance", "gates", "gate_shape", "form"):
        if key not in raw["cqil"]:
            raise ValueError(f"{config_path}: 'cqil.{key}' is missing")
    for name in CODE_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: no such file (the export's model code)")

    shapes = _checkpoint_shapes(folder, safe_open)
    try:
        config = CqilConfig.from_pretrained(folder)
        expected = _expected_shapes(config)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{config_path}: does not describe a model ({type(e).__name__}: {e})") from None
    _compare_shapes(
        expected, {k: (str(folder / f), shape) for k, (f, shape) in shapes.items()}, where=str(folder)
    )
    return config


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the weights a saved model with ``config`` has (tied copies left out)."""
    from cqil.modeling.modeling_cqil import CqilForCausalLM

    with torch.device("meta"), _without_zero3_init():  # shapes only: nothing allocated or initialised
        skeleton = CqilForCausalLM(config)
    tied = set(skeleton.all_tied_weights_keys)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k not in tied}


@contextlib.contextmanager
def _without_zero3_init():
    """Build a model as plain modules even inside a DeepSpeed ZeRO-3 run.

    There transformers builds every model inside ``deepspeed.zero.Init``, whose partitioning is a
    collective call: an export runs on the main process alone and would wait forever for the
    other ranks.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _compare_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[str, tuple[int, ...]]], *, where: str
) -> None:
    """Raise ``ValueError`` naming the first missing, mis-shaped or unexpected weight.

    ``found`` maps each key to (the file holding it, its shape).
    """
    for key, shape in expected.items():
        if key not in found:
            raise ValueError(f"{where}: weight {key!r} is missing (config.json has it)")
        file, got = found[key]
        if got != shape:
            raise ValueError(
                f"{file}: weight {key!r} has shape {list(got)} but config.json implies {list(shape)}"
            )
    for key, (file, _) in found.items():
        if key not in expected:
            raise ValueError(f"{file}: unexpected weight {key!r} (config.json has no such parameter)")


def _checkpoint_shapes(folder: Path, safe_open) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (file name, shape)}`` of every tensor in the folder's safetensors, read from headers only."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (missing weight files)")
    shapes = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing weight file (listed in {WEIGHTS_INDEX_NAME})")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    shapes[key] = (name, tuple(f.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes


def load_export(
    folder: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """Load an export with this package's classes (no remote code), after :func:`check_export`.

    ``dtype`` defaults to the dtype the weights were saved in. The groups of the returned model are
    :mod:`cqil.rewrite.group` modules, so :mod:`cqil.rewrite.surgery`'s helpers work on it.
    """
    from cqil.modeling.modeling_cqil import CqilForCausalLM

    config = check_export(folder)
    model = CqilForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=_parse_dtype(dtype) if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )
    if device is not None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- hub


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an export folder to the Hub model repo ``repo_id`` in one commit; return the commit URL.

    The repo is created when missing (``private`` applies only then; an existing repo keeps its
    visibility); ``revision`` names a branch, created from the default branch when missing. The
    token is ``token``, else ``$HF_TOKEN``, else the user's ``hf auth login``; it is never printed:
    any failure is re-raised as one ``OSError`` whose message has the token masked out.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'}: no such file; push an export folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    secret = token or get_token()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in files
        ]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {folder.name} (cqil export)",
            repo_type="model",
            revision=revision,
        )
    except Exception as e:  # whatever failed, its message must not carry the token
        message = " ".join(str(e).split())
        if secret:
            message = message.replace(secret, "***")
        raise OSError(f"pushing {folder} to {repo_id} failed: {type(e).__name__}: {message}") from None
    return info.commit_url
