"""Measurements of a recovery run's models: held-out perplexity and lm-eval tasks, logged as they finish."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from torch import nn

from cqil.errors import RecipeError

if TYPE_CHECKING:
    from cqil.recovery.trainer import RecoveryTrainer


def prepare_eval(trainer: RecoveryTrainer) -> None:
    """The held-out sequences (``trainer.eval_tokens``, ``eval_sources``), and the lm-eval tasks checked
    (an unknown one fails now, not after training)."""
    from cqil.recovery.data import heldout_blocks

    recipe, data = trainer.recipe, trainer.recipe.data
    trainer.eval_tokens, trainer.eval_sources = heldout_blocks(
        trainer.tokenizer,
        data.train,
        data.eval,
        seq_len=recipe.train.seq_len,
        num_sequences=recipe.eval.num_sequences,
        heldout_fraction=data.eval_fraction,
        source_field=data.source_field,
        text_field=data.text_field,
        hub_split=data.hub_split,
    )
    if recipe.eval.tasks:
        from cqil.evaluation.metrics import UnknownTaskError, check_tasks, task_manager

        try:
            trainer.task_manager = task_manager(recipe.eval.task_paths)
            check_tasks(recipe.eval.tasks, trainer.task_manager)
        except (UnknownTaskError, FileNotFoundError) as e:
            key = "eval.task_paths" if isinstance(e, FileNotFoundError) else "eval.tasks"
            raise RecipeError(trainer.source, key, str(e)) from None


def run_perplexity(trainer: RecoveryTrainer, model: nn.Module, label: str) -> dict:
    from cqil.evaluation.metrics import perplexity

    t0 = time.time()
    result = perplexity(
        model,
        trainer.eval_tokens,
        sources=trainer.eval_sources,
        batch_size=trainer.recipe.eval.batch_size,
        progress=False,
    )
    result["seconds"] = round(time.time() - t0, 1)
    sources = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in result["by_source"].items())
    trainer.log(
        f"cqil: held-out perplexity, {label}: {result['ppl']:.3f} ({result['tokens']} tokens; {sources})"
    )
    return result


def run_lm_eval(trainer: RecoveryTrainer, model: nn.Module, stage: str) -> None:
    """lm-eval-harness tasks of the recipe on ``model`` (main process; the others go on)."""
    settings = trainer.recipe.eval
    if not settings.tasks or not trainer.accelerator.is_main_process:
        return
    from cqil.evaluation.metrics import lm_eval_tasks

    t0 = time.time()
    results = lm_eval_tasks(
        model,
        trainer.tokenizer,
        settings.tasks,
        limit=settings.task_limit,
        num_fewshot=settings.num_fewshot,
        batch_size=settings.task_batch_size,
        manager=trainer.task_manager,
    )
    trainer.results.setdefault("lm_eval", {})[stage] = results
    summary = "; ".join(
        f"{task} " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items()) for task, ms in results.items()
    )
    trainer.log(f"cqil: lm-eval, {stage} ({time.time() - t0:.0f} s): {summary}")
