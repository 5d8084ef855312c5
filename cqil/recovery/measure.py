"""Measurements of a recovery run's models: held-out perplexity and lm-eval tasks, logged as they finish.

:func:`prepare_eval` returns the run's :class:`HeldOut` set; the measurements take it, the model and
the recipe's ``eval`` settings, and return their results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cqil.errors import RecipeError
from cqil.recovery.progress import Log
from cqil.recovery.recipe import EvalConfig, Recipe


@dataclass
class HeldOut:
    """What a run measures its models on: the held-out sequences, each one's source label, the
    lm-eval task manager of the recipe's tasks (None without tasks), and the blocks of
    ``eval.other_domain`` with their source labels and its paths (None without it)."""

    tokens: torch.Tensor
    sources: list[str]
    task_manager: Any = None
    other_domain: tuple[torch.Tensor, list[str]] | None = None
    other_domain_name: str | None = None


# The measurements before training, in output_dir: a resumed run reads them back (read_before).
BEFORE = "eval_before.json"


def before_label(mode: str) -> str:
    """What the "parallelized" (before training) entry of a run's results measured, by ``parallelize.mode``."""
    return "coalesced" if mode == "coalesce" else "parallelized"


def prepare_eval(recipe: Recipe, source: str, tokenizer) -> HeldOut:
    """The held-out sequences, and the lm-eval tasks checked (an unknown one fails now, not after
    training, as a :class:`RecipeError` naming ``source``'s key)."""
    from cqil.recovery.data import heldout_blocks

    data = recipe.data
    tokens, sources = heldout_blocks(
        tokenizer,
        data.train,
        data.eval,
        seq_len=recipe.eval_seq_len,
        num_sequences=recipe.eval.num_sequences,
        heldout_fraction=data.eval_fraction,
        source_field=data.source_field,
        text_field=data.text_field,
        hub_split=data.hub_split,
        only_sources=list(data.mixture) if data.mixture else None,
    )
    heldout = HeldOut(tokens, sources)
    if recipe.eval.tasks:
        from cqil.evaluation.metrics import UnknownTaskError, check_tasks, task_manager

        try:
            heldout.task_manager = task_manager(recipe.eval.task_paths)
            check_tasks(recipe.eval.tasks, heldout.task_manager)
        except (UnknownTaskError, FileNotFoundError) as e:
            key = "eval.task_paths" if isinstance(e, FileNotFoundError) else "eval.tasks"
            raise RecipeError(source, key, str(e)) from None
    if recipe.eval.other_domain:  # every document of text the run does not train on
        from cqil.evaluation.metrics import document_blocks

        try:
            heldout.other_domain = document_blocks(
                tokenizer,
                recipe.eval.other_domain,
                seq_len=recipe.eval_seq_len,
                source_field=data.source_field,
                text_field=data.text_field,
            )
        except (ValueError, FileNotFoundError) as e:  # DataError, DataNotFoundError, a file of no record
            raise RecipeError(source, "eval.other_domain", str(e)) from None
        heldout.other_domain_name = ", ".join(recipe.eval.other_domain)
    return heldout


def measured_on(recipe: Recipe) -> dict:
    """The settings the measurements before training depend on besides the model: the ``eval`` keys
    that choose the blocks and the tasks. They are outside the run's fingerprint (a resume may change
    them), so a resumed run reuses its first attempt's measurements only where they match."""
    e = recipe.eval
    settings = {
        "seq_len": recipe.eval_seq_len,
        "num_sequences": e.num_sequences,
        "other_domain": e.other_domain,
        "tasks": e.tasks,
        "task_paths": e.task_paths,
        "task_limit": e.task_limit,
        "num_fewshot": e.num_fewshot,
    }
    return json.loads(json.dumps(settings))  # as read back from disk


def read_before(output_dir: Path, recipe: Recipe, log: Log) -> dict | None:
    """What a run's first attempt measured before training (written by :func:`write_before`), or None
    when there is none, it was measured on other settings than ``recipe``'s, or it cannot be read.

    The untrained models can always be measured again, so a damaged record costs minutes, not the run:
    it is logged by path and replaced when the run writes its own."""
    path = Path(output_dir) / BEFORE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
    except ValueError as e:  # also not JSON, or not UTF-8
        log(f"cqil: {path} cannot be read ({e}); measuring the untrained models again")
        return None
    # An older cqil recorded no settings: measured again, once.
    return stored if stored.pop("measured_on", None) == measured_on(recipe) else None


def write_before(output_dir: Path, results: dict, recipe: Recipe) -> None:
    from cqil.files import write_atomic

    write_atomic(
        Path(output_dir) / BEFORE, json.dumps(results | {"measured_on": measured_on(recipe)}, indent=1)
    )


def run_perplexity(model: nn.Module, heldout: HeldOut, *, batch_size: int, label: str, log: Log) -> dict:
    """Perplexity of ``model`` on the held-out sequences, overall and by source, logged under ``label``."""
    from cqil.evaluation.metrics import perplexity

    t0 = time.time()
    result = perplexity(
        model,
        heldout.tokens,
        sources=heldout.sources,
        batch_size=batch_size,
        progress=False,
    )
    result["seconds"] = round(time.time() - t0, 1)
    sources = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in result["by_source"].items())
    log(f"cqil: held-out perplexity, {label}: {result['ppl']:.3f} ({result['tokens']} tokens; {sources})")
    if heldout.other_domain is not None:  # the report's headline (cqil.evaluation.report)
        tokens, labels = heldout.other_domain
        other = perplexity(model, tokens, sources=labels, batch_size=batch_size, progress=False)
        result["other_domain"] = other | {"dataset": heldout.other_domain_name}
        log(f"cqil: out-of-domain perplexity, {label}: {other['ppl']:.3f} ({other['tokens']} tokens)")
    return result


def run_lm_eval(
    model: nn.Module, tokenizer, settings: EvalConfig, *, task_manager, stage: str, log: Log
) -> dict | None:
    """The recipe's lm-eval-harness tasks (``settings.tasks``) on ``model``: task -> metric -> value,
    or None without tasks. The caller runs it on the main process alone."""
    if not settings.tasks:
        return None
    from cqil.evaluation.metrics import lm_eval_tasks

    t0 = time.time()
    results = lm_eval_tasks(
        model,
        tokenizer,
        settings.tasks,
        limit=settings.task_limit,
        num_fewshot=settings.num_fewshot,
        batch_size=settings.task_batch_size,
        manager=task_manager,
    )
    summary = "; ".join(
        f"{task} " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items()) for task, ms in results.items()
    )
    log(f"cqil: lm-eval, {stage} ({time.time() - t0:.0f} s): {summary}")
    return results
