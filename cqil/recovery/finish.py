"""The end of a recovery run: the export of the recovered model and the run's report.

:func:`export_recovered` is the default export (``output_dir/model/``; a coalesced model goes out as
a plain Hugging Face folder through :func:`export_coalesced`), and :func:`write_run_report` measures
the export as users load it (lm-eval, latency) and writes ``output_dir/report/``. :func:`finish_run`
is the end of the training: the frozen weights checked, the final evaluation, ``eval.json`` and the
export. Each takes the model, the recipe, the paths and the results it reads, and returns what it made.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cqil._compat import zero3_init_disabled
from cqil.errors import CqilError, OutputDirError, StorageError
from cqil.files import staged_folder, write_atomic
from cqil.recovery import sharded
from cqil.recovery.checkpoint import (
    Preempted,
    check_weights,
    frozen_weights,
    state_digest,
    trainable_state,
    weights_digest,
)
from cqil.recovery.lora import merge_lora
from cqil.recovery.measure import HeldOut, before_label, run_lm_eval, run_perplexity
from cqil.recovery.progress import Log
from cqil.recovery.recipe import Recipe, recipe_to_dict
from cqil.recovery.state import Processes, RunState
from cqil.rewrite.plan import GroupPlan

# The export seam: ``export_fn(student, trainable_state)``, called once, on the main process, after the
# final evaluation (inside the ZeRO-3 gather): the student to write (under sharded ZeRO-3 the main
# process's whole copy) and CPU copies of the trained weights by name.
ExportFn = Callable[[nn.Module, dict[str, torch.Tensor]], object]


def export_recovered(
    student: nn.Module, out_dir: Path, *, recipe: Recipe, plan: GroupPlan, tokenizer, results: dict, log: Log
) -> Path:
    """The default end of a run: the recovered ``student`` as a Hugging Face folder at ``out_dir``
    (``output_dir/model/``), its card from ``results``. In coalesce mode the model is a standard
    architecture and goes out as a plain folder (:func:`export_coalesced`)."""
    from cqil.export.write import export_model

    if recipe.train.lora is not None:
        merge_lora(student)  # the end of the run: the student is not trained any further
    if recipe.parallelize.mode == "coalesce":
        card = coalesced_card(recipe, plan, results, name=Path(out_dir).parent.name)
        return export_coalesced(student, out_dir, tokenizer=tokenizer, card=card)
    report = {
        "perplexity": {k: results[k] for k in ("original", "parallelized", "recovered") if k in results},
        "tokens_trained": results.get("tokens_seen"),
        "base_model": recipe.model.name_or_path,
    }
    out = export_model(
        student,
        out_dir,
        tokenizer=tokenizer,
        report=report,
        recipe=recipe_to_dict(recipe),
        overwrite=True,  # output_dir belongs to this run; a resumed run replaces its own export
    )
    if recipe.export.gguf is not None:
        from cqil.export.gguf import write_gguf

        path = write_gguf(student, tokenizer, out / "model.gguf", dtype=recipe.export.gguf)
        log(f"cqil: wrote {path}")
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


def coalesced_card(recipe: Recipe, plan: GroupPlan, results: dict, *, name: str) -> str:
    """A short model card (titled ``name``, the run folder's name) for a recovered coalesced model:
    what was done and the three perplexities."""
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
        f"# {name}",
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


def _update_coalesced_card(model_dir: Path, report_dir: Path, card: str) -> None:
    """The coalesced model's ``card`` with the report's tables and plots (copied to ``model/plots/``)."""
    from cqil.evaluation.report import headline, results_markdown

    report = json.loads((report_dir / "report.json").read_text())
    (model_dir / "plots").mkdir(exist_ok=True)
    for name in report.get("plots", []):
        shutil.copyfile(report_dir / name, model_dir / "plots" / name)
    lines = [card, "## Results", "", f"**{headline(report)}.**", ""]
    lines += results_markdown(report, plot_dir="plots/")
    write_atomic(model_dir / "README.md", "\n".join(lines))


def write_run_report(
    output_dir: Path,
    *,
    recipe: Recipe,
    plan: GroupPlan,
    results: dict,
    tokenizer,
    task_manager,
    device: torch.device,
    log: Log,
    plan_search: dict | None = None,
) -> tuple[Path, dict | None]:
    """lm-eval and latency on the export in ``output_dir/model`` (loaded on ``device``), then
    ``output_dir/report/`` from them and ``results``. Returns the report folder and the export's
    lm-eval results (None when no task ran). ``plan_search``: the record of a ``groups: auto`` search."""
    from cqil.evaluation.report import build_report, headline, plan_summary, read_history, write_report

    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    searched_plans = None
    if plan_search is not None:  # groups: auto: every plan the search measured
        searched = json.loads((output_dir / plan_search["plans_json"]).read_text())
        keys = ("groups", "depth", "speedup", "ppl")
        searched_plans = [{k: c[k] for k in keys} for c in searched["candidates"]]
    lm_eval = dict(results.get("lm_eval") or {})
    recovered_lm_eval = None
    latency = None
    exported = (model_dir / "config.json").is_file()
    if exported and (recipe.eval.tasks or recipe.eval.latency):
        recovered = load_exported(
            model_dir, mode=recipe.parallelize.mode, dtype=recipe.model.dtype, device=device
        )
        if recipe.eval.tasks:
            recovered_lm_eval = run_lm_eval(
                recovered, tokenizer, recipe.eval, task_manager=task_manager, stage="recovered", log=log
            )
            lm_eval["recovered"] = recovered_lm_eval
        if recipe.eval.latency:
            latency = run_latency(recovered, recipe=recipe, plan=plan, device=device, log=log)
        del recovered
    settings = recipe.eval
    report = build_report(
        base_model=recipe.model.name_or_path,
        plan=plan_summary(plan, vars(recipe.parallelize), mode=recipe.parallelize.mode),
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
        plan_search=searched_plans,
    )
    metrics = output_dir / "logs" / "metrics.jsonl"
    similarity = results.get("similarity")
    out = write_report(
        report,
        output_dir / "report",
        similarity=torch.tensor(similarity) if similarity else None,
        history=read_history(metrics) if metrics.is_file() else None,
        overwrite=True,  # output_dir belongs to this run
    )
    if exported and recipe.parallelize.mode == "parallel":
        from cqil.export.card import update_model_card

        update_model_card(model_dir, out / "report.json", recipe=recipe_to_dict(recipe))
    elif exported:
        card = coalesced_card(recipe, plan, results, name=output_dir.name)
        _update_coalesced_card(model_dir, out, card)
    log(f"cqil: report {out / 'report.md'}: {headline(report)}")
    return out, recovered_lm_eval


def load_exported(folder: Path, *, mode: str, dtype: str, device: torch.device) -> nn.Module:
    """The export as users load it (``mode``: the recipe's ``parallelize.mode``), on this (the main)
    process alone, even under ZeRO-3."""
    from cqil.export.load import load_export

    with zero3_init_disabled():  # ZeRO-3's init would wait for the ranks that have exited
        if mode == "coalesce":  # a plain checkpoint of the base architecture
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        return load_export(folder, dtype=dtype, device=device)


def run_latency(
    recovered: nn.Module, *, recipe: Recipe, plan: GroupPlan, device: torch.device, log: Log
) -> dict:
    """Prefill and decode speed of the original (reloaded from ``recipe.model``) and the recovered
    model on ``device``, side by side, with the plan's ideal speed-up beside them."""
    from cqil.evaluation.metrics import measure_latency
    from cqil.pretrained import load_model

    settings, m = recipe.eval, recipe.model
    with zero3_init_disabled():  # the main process alone, after the other ranks are done
        original, _ = load_model(m.name_or_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
    original.to(device)
    latency = measure_latency(
        {"original": original, "recovered": recovered},
        prefill_len=settings.latency_prefill_len,
        new_tokens=settings.latency_new_tokens,
        reps=settings.latency_reps,
        progress=False,
    )
    latency["ideal"] = round(plan.ideal_speedup, 4)
    speed = latency["speedup"]["recovered"]
    log(
        f"cqil: latency on {latency['device']}: prefill {speed['prefill']:.3f}x, decode "
        f"{speed['decode']:.3f}x the original (ideal L/L_eff {latency['ideal']:.3f}x)"
    )
    return latency


def finish_run(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    processes: Processes,
    *,
    recipe: Recipe,
    output_dir: Path,
    plan: GroupPlan,
    tokenizer,
    heldout: HeldOut,
    results: dict,
    run: RunState,
    frozen_digest: str,
    sharded_load: bool,
    gather_whole: bool,
    stop_signal: Callable[[], int | None],
    log: Log,
    plan_search: dict | None = None,
    export_fn: ExportFn | None = None,
) -> dict:
    """Check the frozen weights, evaluate the recovered model, write ``eval.json`` and export it.

    ``model`` is the run's :class:`~cqil.recovery.model.RecoveryModel` and ``trainable`` its trained
    weights by name; ``frozen_digest`` the digest of its frozen weights before training;
    ``sharded_load``: the model was loaded partitioned (ZeRO-3), so the export reads a whole copy
    gathered into the main process; ``gather_whole``: ZeRO-3 partitioned a whole-loaded model, gathered
    whole again around the digests and the export. ``stop_signal()`` is the signal that asked the run
    to stop, if any. Returns ``results`` with the final evaluation and the run's record added.
    """
    results = dict(results)
    output_dir = Path(output_dir)
    model.eval()
    # Never export what no checkpoint would have been written of.
    check_weights(trainable.values(), run, output_dir)
    # Under ZeRO-3 every rank enters the gathered contexts; only the main process writes. The
    # evaluation runs outside them: ZeRO-3's forward hooks release what a forward gathered.
    main = processes.is_main_process
    with sharded.whole_model(model, gather=gather_whole):
        after = weights_digest(frozen_weights(model, trainable))
        state = sharded.gathered_state(trainable, main=main) if sharded_load else trainable_state(trainable)
    if after != frozen_digest:
        raise RuntimeError("frozen weights changed during training (they must stay bit-identical)")
    results["recovered"] = run_perplexity(
        model.student, heldout, batch_size=recipe.eval.batch_size, label="recovered", log=log
    )
    stop_if_signalled(stop_signal(), "the final evaluation", run.step)
    student = model.student
    if sharded_load:  # the export reads a whole copy, gathered into the main process's memory
        student = sharded.main_process_copy(model.student, main=main)
    with sharded.whole_model(model, gather=gather_whole):
        results |= {
            "steps": run.step,
            "tokens_seen": run.tokens_seen,
            "frozen_digest": after,
            "trainable_digest": state_digest(state),
            "plan": plan.to_dict(),
            "mode": recipe.parallelize.mode,  # coalesce: "parallelized" holds the coalesced model
        }
        if plan_search is not None:  # groups: auto; the search's report is under plan/
            results["plan_search"] = plan_search
        if main:
            write_atomic(output_dir / "eval.json", json.dumps(results, indent=1))
            if export_fn is None:

                def export_fn(student: nn.Module, _: dict) -> Path:
                    return export_recovered(
                        student,
                        output_dir / "model",
                        recipe=recipe,
                        plan=plan,
                        tokenizer=tokenizer,
                        results=results,
                        log=log,
                    )

            try:
                export_fn(student, state)
            except CqilError:
                raise
            except OSError as e:  # disk full, quota: the staging folder is already gone
                cause = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise StorageError(f"cannot write the export {output_dir / 'model'}: {cause}") from e
            labels = {
                "original": "original",
                "parallelized": before_label(recipe.parallelize.mode),
                "recovered": "recovered",
            }
            log(
                "cqil: held-out perplexity "
                + ", ".join(f"{v} {results[k]['ppl']:.3f}" for k, v in labels.items() if k in results)
            )
    processes.wait_for_everyone()
    return results


def stop_if_signalled(signal: int | None, stage: str, step: int) -> None:
    """A SIGTERM / SIGUSR1 (``signal``) during the end of a run: stop now; the last checkpoint (at
    ``step``) is complete, so the same command finishes the evaluation and export without training again."""
    if signal is not None:
        raise Preempted(
            f"signal {signal} during {stage}: the training is checkpointed at step "
            f"{step}; run again to finish the evaluation and export"
        )
