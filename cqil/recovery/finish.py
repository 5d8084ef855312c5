"""The end of a recovery run: the export of the recovered model and the run's report.

:func:`export_recovered` is the default export (``output_dir/model/``; a coalesced model goes out as
a plain Hugging Face folder through :func:`export_coalesced`), and :func:`write_run_report` measures
the export as users load it (lm-eval, latency) and writes ``output_dir/report/``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cqil._compat import zero3_init_disabled
from cqil.errors import CqilError, OutputDirError, StorageError
from cqil.files import staged_folder, write_atomic
from cqil.recovery import sharded
from cqil.recovery.checkpoint import Preempted, check_weights, state_digest
from cqil.recovery.lora import merge_lora
from cqil.recovery.measure import run_lm_eval, run_perplexity
from cqil.recovery.recipe import recipe_to_dict

if TYPE_CHECKING:
    from cqil.recovery.trainer import RecoveryTrainer


def export_recovered(trainer: RecoveryTrainer, trainable: dict[str, torch.Tensor]) -> Path:
    """The default end of a run: the recovered model as a Hugging Face folder, ``output_dir/model/``.

    This is the export seam: :func:`run` takes ``export_fn(trainer, trainable_state)`` and calls it
    once, on the main process, after the final evaluation (inside the ZeRO-3 gather). In coalesce mode
    the model is a standard architecture and goes out as a plain folder (:func:`export_coalesced`).
    """
    from cqil.export.write import export_model

    student = trainer.model.student if trainer.export_student is None else trainer.export_student
    if trainer.recipe.train.lora is not None:
        merge_lora(student)  # the end of the run: the student is not trained any further
    if trainer.recipe.parallelize.mode == "coalesce":
        return export_coalesced(
            student,
            trainer.output_dir / "model",
            tokenizer=trainer.tokenizer,
            card=_coalesced_card(trainer),
        )
    results = trainer.results
    report = {
        "perplexity": {k: results[k] for k in ("original", "parallelized", "recovered") if k in results},
        "tokens_trained": results.get("tokens_seen"),
        "base_model": trainer.recipe.model.name_or_path,
    }
    out = export_model(
        student,
        trainer.output_dir / "model",
        tokenizer=trainer.tokenizer,
        report=report,
        recipe=recipe_to_dict(trainer.recipe),
        overwrite=True,  # output_dir belongs to this run; a resumed run replaces its own export
    )
    if trainer.recipe.export.gguf is not None:
        from cqil.export.gguf import write_gguf

        path = write_gguf(student, trainer.tokenizer, out / "model.gguf", dtype=trainer.recipe.export.gguf)
        trainer.log(f"cqil: wrote {path}")
    return out


def export_coalesced(
    model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, card: str | None = None
) -> Path:
    """Save a coalesced model (a standard architecture) as a plain Hugging Face folder at ``out_dir``.

    ``save_pretrained`` (safetensors, no remote code: ``AutoModelForCausalLM.from_pretrained`` loads it
    with transformers alone), the tokenizer and a model card, written into a hidden sibling and renamed
    into place as :func:`cqil.export.write.export_model` does, replacing a previous folder only at the end.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # replaced whole: only its non-folder form is refused
        raise OutputDirError(f"{out} exists and is not a folder")
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def _coalesced_card(trainer: RecoveryTrainer) -> str:
    """A short model card for a recovered coalesced model: what was done and the three perplexities."""
    recipe, plan, results = trainer.recipe, trainer.plan, trainer.results
    rows = [
        ("original", "the original model"),
        ("parallelized", "coalesced, before training"),
        ("recovered", "coalesced, after recovery (this model)"),
    ]
    table = [f"| {what} | {results[k]['ppl']:.3f} |" for k, what in rows if k in results]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cqil, depth-coalescing]",
        "---",
        "",
        f"# {Path(trainer.output_dir).name}",
        "",
        f"`{recipe.model.name_or_path}` made shallower by depth coalescing (`cqil.coalesce`): each group of "
        f"the plan `{plan}` is one standard decoder layer whose weights started as the mean of the group's "
        f"layers ({plan.num_layers} -> {plan.num_layers_after} layers), then recovered for "
        f"{results.get('steps', 0)} steps ({results.get('tokens_seen', 0):,} tokens) with only those layers "
        "trained. It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(folder)`.",
    ]
    if table:
        n = results.get("recovered", {}).get("tokens")
        lines += ["", f"Held-out perplexity ({n} tokens):", "", "| model | perplexity |", "|---|---|", *table]
    return "\n".join(lines) + "\n"


def _update_coalesced_card(trainer: RecoveryTrainer, report_dir: Path) -> None:
    """The coalesced model's card with the report's tables and plots (copied to ``model/plots/``)."""
    from cqil.evaluation.report import headline, results_markdown

    model_dir = trainer.output_dir / "model"
    report = json.loads((report_dir / "report.json").read_text())
    (model_dir / "plots").mkdir(exist_ok=True)
    for name in report.get("plots", []):
        shutil.copyfile(report_dir / name, model_dir / "plots" / name)
    lines = [_coalesced_card(trainer), "## Results", "", f"**{headline(report)}.**", ""]
    lines += results_markdown(report, plot_dir="plots/")
    write_atomic(model_dir / "README.md", "\n".join(lines))


def write_run_report(trainer: RecoveryTrainer) -> Path:
    """lm-eval and latency on the export in ``output_dir/model``, then ``output_dir/report/``."""
    from cqil.evaluation.report import build_report, headline, plan_summary, read_history, write_report

    recipe, results = trainer.recipe, trainer.results
    model_dir = trainer.output_dir / "model"
    plan_search = None
    if trainer.plan_search is not None:  # groups: auto: every plan the search measured
        searched = json.loads((trainer.output_dir / trainer.plan_search["plans_json"]).read_text())
        keys = ("groups", "depth", "speedup", "ppl")
        plan_search = [{k: c[k] for k in keys} for c in searched["candidates"]]
    lm_eval = dict(results.get("lm_eval") or {})
    latency = None
    exported = (model_dir / "config.json").is_file()
    if exported and (recipe.eval.tasks or recipe.eval.latency):
        recovered = load_exported(trainer, model_dir)
        if recipe.eval.tasks:
            run_lm_eval(trainer, recovered, "recovered")
            lm_eval["recovered"] = results["lm_eval"]["recovered"]
        if recipe.eval.latency:
            latency = run_latency(trainer, recovered)
        del recovered
    settings = recipe.eval
    report = build_report(
        base_model=recipe.model.name_or_path,
        plan=plan_summary(trainer.plan, vars(recipe.parallelize), mode=recipe.parallelize.mode),
        perplexity_results={k: results[k] for k in ("original", "parallelized", "recovered") if k in results},
        eval_dataset=", ".join(
            recipe.data.eval or [f"{recipe.data.eval_fraction:.2%} hash split of data.train"]
        ),
        lm_eval=lm_eval,
        lm_eval_settings={
            "tasks": settings.tasks,
            "limit": settings.task_limit,
            "num_fewshot": settings.num_fewshot,
        },
        latency=latency,
        steps=results.get("steps"),
        tokens_trained=results.get("tokens_seen"),
        datasets=list(recipe.data.train),
        recipe=recipe_to_dict(recipe),
        resume=results.get("resume"),  # train.resume=reset_optimizer: what changed, and at which step
        plan_search=plan_search,
    )
    metrics = trainer.output_dir / "logs" / "metrics.jsonl"
    similarity = results.get("similarity")
    out = write_report(
        report,
        trainer.output_dir / "report",
        similarity=torch.tensor(similarity) if similarity else None,
        history=read_history(metrics) if metrics.is_file() else None,
        overwrite=True,  # output_dir belongs to this run
    )
    if exported and recipe.parallelize.mode == "parallel":
        from cqil.export.card import update_model_card

        update_model_card(model_dir, out / "report.json", recipe=recipe_to_dict(recipe))
    elif exported:
        _update_coalesced_card(trainer, out)
    trainer.log(f"cqil: report {out / 'report.md'}: {headline(report)}")
    return out


def load_exported(trainer: RecoveryTrainer, folder: Path) -> nn.Module:
    """The export as users load it, on this (the main) process alone, even under ZeRO-3."""
    from cqil.export.load import load_export

    device, dtype = trainer.accelerator.device, trainer.recipe.model.dtype
    with zero3_init_disabled():  # ZeRO-3's init would wait for the ranks that have exited
        if trainer.recipe.parallelize.mode == "coalesce":  # a plain checkpoint of the base architecture
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        return load_export(folder, dtype=dtype, device=device)


def run_latency(trainer: RecoveryTrainer, recovered: nn.Module) -> dict:
    """Prefill and decode speed of the original (reloaded) and the recovered model, side by side."""
    from cqil.evaluation.metrics import measure_latency
    from cqil.pretrained import load_model

    settings, m = trainer.recipe.eval, trainer.recipe.model
    with zero3_init_disabled():  # the main process alone, after the other ranks are done
        original, _ = load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
    original.to(trainer.accelerator.device)
    latency = measure_latency(
        {"original": original, "recovered": recovered},
        prefill_len=settings.latency_prefill_len,
        new_tokens=settings.latency_new_tokens,
        reps=settings.latency_reps,
        progress=False,
    )
    latency["ideal"] = round(trainer.plan.ideal_speedup, 4)
    speed = latency["speedup"]["recovered"]
    trainer.log(
        f"cqil: latency on {latency['device']}: prefill {speed['prefill']:.3f}x, decode "
        f"{speed['decode']:.3f}x the original (ideal L/L_eff {latency['ideal']:.3f}x)"
    )
    return latency


def finish_run(trainer: RecoveryTrainer, export_fn: Callable | None = None) -> dict:
    """Check the frozen weights, evaluate the recovered model and export it. Returns the results."""
    acc = trainer.accelerator
    trainer.model.eval()
    check_weights(trainer)  # never export what no checkpoint would have been written of
    # Under ZeRO-3 every rank enters the gathered contexts; only the main process writes. The
    # evaluation runs outside them: ZeRO-3's forward hooks release what a forward gathered.
    with sharded.whole_model(trainer):
        after = trainer._digest_frozen()
        main = acc.is_main_process
        trainable = (
            sharded.gathered_state(trainer.trainable, main=main)
            if trainer.sharded
            else trainer._trainable_state()
        )
    if after != trainer.frozen_digest:
        raise RuntimeError("frozen weights changed during training (they must stay bit-identical)")
    trainer.results["recovered"] = run_perplexity(trainer, trainer.model.student, "recovered")
    _stop_if_signalled(trainer, "the final evaluation")
    if trainer.sharded:  # the export reads a whole copy, gathered into the main process's memory
        trainer.export_student = sharded.main_process_copy(trainer.model.student, main=main)
    with sharded.whole_model(trainer):
        trainer.results |= {
            "steps": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "frozen_digest": after,
            "trainable_digest": state_digest(trainable),
            "plan": trainer.plan.to_dict(),
            "mode": trainer.recipe.parallelize.mode,  # coalesce: "parallelized" holds the coalesced model
        }
        if trainer.plan_search is not None:  # groups: auto; the search's report is under plan/
            trainer.results["plan_search"] = trainer.plan_search
        if acc.is_main_process:
            write_atomic(trainer.output_dir / "eval.json", json.dumps(trainer.results, indent=1))
            try:
                (export_fn or export_recovered)(trainer, trainable)
            except CqilError:
                raise
            except OSError as e:  # disk full, quota: the staging folder is already gone
                cause = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise StorageError(f"cannot write the export {trainer.output_dir / 'model'}: {cause}") from e
            labels = {"original": "original", "parallelized": trainer.before_label, "recovered": "recovered"}
            trainer.log(
                "cqil: held-out perplexity "
                + ", ".join(
                    f"{v} {trainer.results[k]['ppl']:.3f}" for k, v in labels.items() if k in trainer.results
                )
            )
    acc.wait_for_everyone()
    if trainer.recipe.eval.report and acc.is_main_process:
        # The rest measures the exported model as users load it, on the main process alone: the
        # other processes are done and exit (no collective follows, so a long lm-eval run cannot
        # time one out). The optimizer state goes first, to make room for the two models.
        trainer.engine = trainer.prepared_optimizer = trainer.optimizer = None
        acc.free_memory()
        _stop_if_signalled(trainer, "the export")
        write_run_report(trainer)
    return trainer.results


def _stop_if_signalled(trainer: RecoveryTrainer, stage: str) -> None:
    """A SIGTERM / SIGUSR1 during the end of a run: stop now; the last checkpoint is complete, so the
    same command finishes the evaluation and export without training again."""
    if trainer._stop_signal is not None:
        raise Preempted(
            f"signal {trainer._stop_signal} during {stage}: the training is checkpointed at step "
            f"{trainer.step}; run again to finish the evaluation and export"
        )
