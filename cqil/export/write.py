"""Write a parallelized model as a cqil export folder (:func:`export_model`, optionally folded).

The folder format is described in :mod:`cqil.export.load`; the model card comes from
:mod:`cqil.export.card`. Every export is written into a hidden temporary sibling of ``out_dir``
(:func:`cqil.files.staged_folder`) and renamed into place at the end, so a failure leaves no partial
folder behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cqil.errors import ModelError
from cqil.export.card import _hub_id, _read_recipe, _read_report, render_model_card
from cqil.export.load import AUTO_MAP, CODE_FILES, _compare_shapes, _expected_shapes, _parse_dtype
from cqil.files import check_out_dir, staged_folder
from cqil.rewrite.surgery import layers_prefix, merged_lp_group

if TYPE_CHECKING:
    from torch import nn


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
    check_out_dir(out, overwrite)
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


def _split_config(model: nn.Module) -> tuple[Any, dict]:
    """(a copy of the base config at the effective depth, a copy of the cqil dict) of ``model``."""
    config = model.config
    if getattr(config, "model_type", None) == "cqil":
        return copy.deepcopy(config.text_config), copy.deepcopy(config.cqil)
    cqil = getattr(config, "cqil", None)
    if not cqil:
        raise ModelError(
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


def _export_state_dict(model: nn.Module, cqil: dict, *, fold: bool) -> dict[str, torch.Tensor]:
    """The tensors to save: the model's state dict without tied copies, groups folded if asked."""
    from cqil.rewrite.group import ParallelGroup

    state = dict(model.state_dict())
    # A tied output projection is the embedding matrix; save it once, as transformers does.
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state and source in state and state[target].data_ptr() == state[source].data_ptr():
            del state[target]
    if not fold or cqil.get("folded"):
        return state

    if cqil["bypass"] != "lp":
        raise ModelError(
            f"fold needs bypass 'lp' (every MLP reading all attention outputs); got {cqil['bypass']!r}"
        )
    prefix = layers_prefix(model)
    groups = [(idx, g) for idx, g in enumerate(model.model.layers) if isinstance(g, ParallelGroup)]
    if len(groups) != len(cqil["plan"]["groups"]):
        raise ModelError(
            f"fold: found {len(groups)} cqil.rewrite.group modules for the {len(cqil['plan']['groups'])} groups "
            "of the plan (a model loaded with trust_remote_code has its own copies of the group classes; "
            "load it with cqil.load_export instead)"
        )
    for idx, group in groups:
        where = f"group {list(group.original_indices)} ({prefix}.{idx})"
        gates = group.gate_matrix()
        if gates is not None and not bool((gates == 1).all()):
            raise ModelError(
                f"cannot fold {where}: its gates are not all 1 (min {gates.min().item():.4g}, "
                f"max {gates.max().item():.4g}); fold needs lp gates at 1"
            )
        group = merged_lp_group(group)
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
