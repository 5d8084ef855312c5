"""The ``evaluate`` driver: an export (and optionally the original) measured and reported.

:func:`evaluate` loads a recovered export, rebuilds the rewrite before recovery from the original
model, measures each with :mod:`cqil.evaluation.metrics` and writes the report with
:func:`cqil.evaluation.report.write_report`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cqil.evaluation.metrics import (
    check_tasks,
    document_blocks,
    lm_eval_tasks,
    measure_latency,
    perplexity,
    task_manager,
)


def evaluate(
    model,
    *,
    tokenizer=None,
    original=None,
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    seq_len: int = 512,
    num_sequences: int = 32,
    other_domain: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int = 4,
    tasks: Sequence[str] = (),
    task_paths: Sequence[str | os.PathLike] = (),
    task_limit: int | float | None = None,
    num_fewshot: int | None = None,
    latency: bool = True,
    latency_reps: int = 3,
    source_field: str | None = "meta.redpajama_set_name",
    text_field: str = "text",
    dtype: str | None = None,
    device: str | torch.device | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a recovered model (and, given ``original``, the original and the rewrite before training).

    ``model``: a cqil export folder or a model rewritten by :func:`cqil.parallelize`. ``original``: the
    original model (a name for :func:`cqil.load_model`, or the model itself); with it, the
    ``parallelized`` stage is the original rewritten by the export's own plan and options with the
    gates at their initial values, i.e. the model before recovery. ``data``: held-out text for
    perplexity (overall and per source, :func:`cqil.recovery.data.heldout_blocks`); ``other_domain``:
    text the model was not trained on, every document packed on its own
    (:func:`cqil.evaluation.metrics.document_blocks`), whose perplexity and gap closed lead the
    report; ``tasks``: lm-eval tasks; ``latency``: time the original and the recovered model side by
    side. Returns the report
    (:mod:`cqil.evaluation.report` documents it) and, with ``out_dir``, writes it there. Bad input (an existing
    ``out_dir``, an unknown task, a folder that is not an export, text with nothing usable) fails
    before any model is evaluated, and nothing is written.
    """
    import copy

    from cqil.evaluation.report import build_report, plan_summary, write_report
    from cqil.export.load import check_export, load_export
    from cqil.files import check_out_dir
    from cqil.pretrained import EMBEDDED_MODELS, fetch_model, load_model
    from cqil.recovery.data import heldout_blocks
    from cqil.rewrite.plan import GroupPlan
    from cqil.rewrite.surgery import parallelize

    if out_dir is not None:
        check_out_dir(out_dir, overwrite)
    manager = task_manager(task_paths) if tasks else None
    if tasks:
        check_tasks(tasks, manager)
    folder = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if folder is not None:
        check_export(folder)  # not an export, missing or mismatched weights: fail before loading anything
        if tokenizer is None and (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer is None and isinstance(original, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            fetch_model(str(original)) if str(original) in EMBEDDED_MODELS else original
        )
    if tokenizer is None:
        raise ValueError(
            "a tokenizer is needed: pass tokenizer=, or an export folder or original that has one"
        )
    if data is not None:  # text with nothing usable fails here, before any model is loaded
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        tokens, sources = heldout_blocks(
            tokenizer,
            paths,
            paths,
            seq_len=seq_len,
            num_sequences=num_sequences,
            heldout_fraction=0.5,  # unused: the whole of ``data`` is held out
            source_field=source_field,
            text_field=text_field,
        )
    other_paths = None
    if other_domain is not None:  # the same: a missing file or one without a whole block fails now
        other_paths = [other_domain] if isinstance(other_domain, (str, os.PathLike)) else list(other_domain)
        other_tokens, other_sources = document_blocks(
            tokenizer, other_paths, seq_len=seq_len, source_field=source_field, text_field=text_field
        )
    if folder is not None:
        model = load_export(folder, dtype=dtype, device=device)
    device = next(model.parameters()).device
    cqil = model.config.cqil
    plan = GroupPlan(cqil["plan"]["groups"], cqil["plan"]["num_layers"])
    if isinstance(original, (str, os.PathLike)):
        original, _ = load_model(str(original), dtype=dtype or "float32", device=device)

    stages = {"recovered": model}
    if original is not None:
        rebuilt = parallelize(
            copy.deepcopy(original),
            plan,
            bypass=cqil["bypass"],
            bypass_distance=cqil.get("bypass_distance", 1),
            gates=cqil["gates"],
            gate_shape=cqil.get("gate_shape", "scalar"),
            form=cqil["form"],
        )
        stages = {"original": original, "parallelized": rebuilt, "recovered": model}
    perplexity_results = lm_eval = latency_result = None
    if data is not None:
        perplexity_results = {
            name: perplexity(m, tokens, sources=sources, batch_size=batch_size, progress=progress)
            for name, m in stages.items()
        }
    if other_paths is not None:
        perplexity_results = perplexity_results or {name: {} for name in stages}
        for name, m in stages.items():
            perplexity_results[name]["other_domain"] = perplexity(
                m, other_tokens, sources=other_sources, batch_size=batch_size, progress=progress
            )
    if tasks:
        lm_eval = {
            name: lm_eval_tasks(
                m,
                tokenizer,
                tasks,
                limit=task_limit,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                manager=manager,
            )
            for name, m in stages.items()
        }
    if latency and original is not None:
        latency_result = measure_latency(
            {"original": original, "recovered": model}, reps=latency_reps, progress=progress
        )
        latency_result["ideal"] = round(plan.ideal_speedup, 4)
    report = build_report(
        base_model=getattr(original, "name_or_path", None) if original is not None else None,
        plan=plan_summary(plan, cqil),
        perplexity_results=perplexity_results,
        eval_dataset=", ".join(map(str, paths)) if data is not None else None,
        other_domain_dataset=", ".join(map(str, other_paths)) if other_paths is not None else None,
        lm_eval=lm_eval,
        lm_eval_settings={"tasks": list(tasks), "limit": task_limit, "num_fewshot": num_fewshot}
        if tasks
        else None,
        latency=latency_result,
    )
    if out_dir is not None:
        sim = None
        if original is not None and data is not None:
            from cqil.selection.similarity import layer_input_similarity

            sim = layer_input_similarity(original, tokens[:8], progress=False)["matrix"]
        write_report(report, out_dir, similarity=sim, overwrite=overwrite)
    return report
