"""Evaluation of original, parallelized and recovered models.

* :func:`perplexity`: held-out perplexity on packed token blocks, overall and per source;
  :func:`document_blocks` packs text the run did not train on (``eval.other_domain``) for it;
* :func:`lm_eval_tasks`: lm-eval-harness tasks on an in-memory model (no re-loading), Hub tasks by
  name or the small local tasks shipped in ``data/tasks/`` (:data:`LOCAL_TASKS`);
* :func:`measure_latency`: prefill and decode speed of several models, interleaved, in the decode
  modes engines use (:mod:`cqil.evaluation.latency`, re-exported here).

:func:`cqil.evaluation.report.write_report` turns their results into the run's report.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cqil.errors import CqilError, DataNotFoundError
from cqil.evaluation.accuracy_report import CHANCE_METRICS

# Latency lives in its own module; its entry points stay importable from here.
from cqil.evaluation.latency import device_name, measure_latency, time_decode, time_prefill  # noqa: F401

# The local tasks built from the shipped held-out text (data/tasks/build_tasks.py); a source
# checkout or an editable install finds them here.
LOCAL_TASKS = Path(__file__).resolve().parents[2] / "data" / "tasks"


class UnknownTaskError(CqilError, ValueError):
    """An lm-eval task name that no task folder defines."""


def perplexity(
    model,
    tokens: torch.LongTensor,
    *,
    sources: Sequence[str] | None = None,
    batch_size: int = 4,
    progress: bool = True,
    score_from: int = 1,
) -> dict:
    """Perplexity of a causal LM on packed sequences ``tokens`` of shape (N, T).

    Every position from ``score_from`` on (by default every one but the first) of each row is
    predicted from the tokens before it in that row (rows are independent, no sliding window).
    Returns ``{"ppl", "nll", "tokens"}`` where ``nll`` is the mean negative log-likelihood per
    predicted token (nats) and ``tokens`` the number of predicted tokens, N * (T - score_from). With
    ``sources`` (one name per row, as :func:`cqil.recovery.data.heldout_blocks` gives), ``"by_source"``
    maps each name to the same three numbers over its rows.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (N, T) with T >= 2, got {tuple(tokens.shape)}")
    if not 1 <= score_from < tokens.shape[1]:
        raise ValueError(f"score_from must be in [1, {tokens.shape[1]}), got {score_from}")
    if sources is not None and len(sources) != len(tokens):
        raise ValueError(f"{len(sources)} source names for {len(tokens)} sequences")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    row_nll = torch.zeros(len(tokens), dtype=torch.float64)
    try:
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(tokens), batch_size), desc="perplexity", unit="batch", disable=not progress
            ):
                batch = tokens[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Cross-entropy in float32 even for half-precision models: the sum runs over
                # the whole vocabulary and bf16 loses the small probabilities.
                nll = F.cross_entropy(
                    logits[:, score_from - 1 : -1].transpose(1, 2).float(),
                    batch[:, score_from:],
                    reduction="none",
                ).sum(1)
                row_nll[start : start + len(batch)] = nll.double().cpu()
    finally:
        model.train(was_training)
    per_row = tokens.shape[1] - score_from

    def summary(rows: torch.Tensor) -> dict:
        mean = float(rows.sum()) / (len(rows) * per_row)
        return {"ppl": math.exp(mean), "nll": mean, "tokens": len(rows) * per_row}

    result = summary(row_nll)
    if sources is not None:
        names = list(dict.fromkeys(sources))
        result["by_source"] = {
            name: summary(row_nll[[i for i, s in enumerate(sources) if s == name]]) for name in names
        }
    return result


def document_blocks(
    tokenizer,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    seq_len: int,
    source_field: str | None = "meta.redpajama_set_name",
    text_field: str = "text",
) -> tuple[torch.LongTensor, list[str]]:
    """Every document of the files under ``paths``, each packed on its own into ``seq_len``-token blocks
    (a tail shorter than a block is dropped), and each block's source label (the file's name where a
    record has none), in file order: the whole of a set, with no block spanning two documents.

    Raises :class:`~cqil.errors.DataNotFoundError` for a path that matches nothing and
    :class:`~cqil.errors.DataError` when no document fills a block.
    """
    from cqil.errors import DataError
    from cqil.recovery.data import expand_paths, iter_records, pack_tokens

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    blocks, labels = [], []
    for file in expand_paths(paths):
        for text, source in iter_records([file], source_field=source_field, text_field=text_field):
            rows = pack_tokens(tokenizer, [text], seq_len=seq_len)
            blocks.append(rows)
            labels += [source or file.name] * len(rows)
    if not labels:
        raise DataError(f"{', '.join(map(str, paths))}: no document of {seq_len} tokens or more")
    return torch.cat(blocks), labels


# ---------------------------------------------------------------------------------------------- lm-eval


def task_manager(paths: Sequence[str | os.PathLike] = ()):
    """An lm-eval ``TaskManager`` that knows the harness's tasks, the shipped local ones and ``paths``."""
    include = [str(LOCAL_TASKS)] if LOCAL_TASKS.is_dir() else []
    for path in paths:
        if not Path(path).is_dir():
            raise DataNotFoundError(f"lm-eval task folder {path}: no such folder")
        include.append(str(Path(path).resolve()))
    return _task_manager(tuple(include))


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...]):
    # Indexing the harness's few thousand task YAMLs takes seconds; the index does not change.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def check_tasks(tasks: Sequence[str], manager) -> None:
    """Raise :class:`UnknownTaskError` naming the first task (or group/tag) ``manager`` does not know."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            local = sorted(t for t in known if t.startswith("cqil_"))
            raise UnknownTaskError(
                f"unknown lm-eval task {task!r} (local tasks: {', '.join(local) or 'none'}; "
                "the harness's own tasks are listed by `lm-eval ls tasks`)"
            )


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    paths: Sequence[str | os.PathLike] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    manager=None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval-harness ``tasks`` on the in-memory ``model``; returns ``{task: {metric: value}}``.

    Metric names are the harness's without the filter suffix (``"acc"``, ``"acc_norm"``,
    ``"perplexity"``). Each accuracy (a mean of 0/1 scores: :data:`BINARY_METRICS`) has its standard
    error beside it as ``"<metric>_stderr"``, and ``"samples"`` is the number of examples the task
    ran. ``"chance"`` is the score of random guessing on the task's :data:`CHANCE_METRICS` over the
    same examples (:func:`chance_level`), where the task's kind defines one. ``limit`` caps the
    examples per task (a count, or a fraction below 1). Unknown task names raise
    :class:`UnknownTaskError` before anything runs.
    """
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(paths)
    check_tasks(tasks, manager)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # The harness warns on every call that an in-memory model is used (on purpose here) and that
    # the local tasks load their data with a function; its errors still show.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(
            pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size, device=str(device)
        )
        out = lm_eval.simple_evaluate(
            lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=True,  # each example's requests give its number of choices (chance_level)
            bootstrap_iters=0,  # stderr by bootstrap costs minutes per task and is left out
        )
    finally:
        logger.setLevel(level)
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    counts = (out or {}).get("n-samples", {})
    samples = (out or {}).get("samples") or {}
    for task, metrics in (out or {}).get("results", {}).items():
        n = (counts.get(task) or {}).get("effective") or metrics.get("sample_len")
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if "," in key and "stderr" not in metric and isinstance(value, (int, float)):
                results.setdefault(task, {})[metric] = float(value)
                if metric in BINARY_METRICS and n and n > 1:
                    results[task][f"{metric}_stderr"] = binary_stderr(float(value), int(n))
        if task in results and n:
            results[task]["samples"] = int(n)
        chance = chance_level((out or {}).get("configs", {}).get(task, {}), samples.get(task, ()))
        if chance is not None and CHANCE_METRICS & results.get(task, {}).keys():
            results[task]["chance"] = chance
    return results


def chance_level(config: Mapping, samples: Sequence[Mapping]) -> float | None:
    """The score of random guessing on a task's :data:`CHANCE_METRICS`, from the harness's output of
    it: ``config`` is the task's entry of the output's ``"configs"``, ``samples`` its logged examples
    (``log_samples=True``). None where the task's kind does not define one.

    ``multiple_choice``: the mean over the examples of (gold answers) / (choices), the choices
    counted as the harness's log-likelihood requests of the example (its ``"arguments"``: one per
    choice, and one more per choice when the task scores ``acc_mutual_info``). ``loglikelihood``:
    0, since its ``acc`` is whether the greedy continuation is the target, which guessing among a
    vocabulary does not reach. A task that scores its examples with its own ``process_results``, or
    of any other kind, has no chance level here.
    """
    if not samples or config.get("process_results") is not None:
        return None
    kind = config.get("output_type")
    if kind == "loglikelihood":
        return 0.0
    if kind != "multiple_choice":
        return None
    metrics = {entry.get("metric") for entry in config.get("metric_list") or ()}
    per_choice = 2 if "acc_mutual_info" in metrics else 1
    guesses = []
    for sample in samples:
        choices = len(sample["arguments"]) // per_choice
        target = sample.get("target")
        golds = len(set(target)) if isinstance(target, (list, tuple)) else 1
        if choices < 1:
            return None
        guesses.append(min(golds, choices) / choices)
    return sum(guesses) / len(guesses)


# Metrics that are the mean of a 0/1 score per example.
BINARY_METRICS = frozenset({"acc", "acc_norm", "exact_match"})


def binary_stderr(mean: float, n: int) -> float:
    """Standard error of the mean of ``n`` scores of 0 or 1 whose mean is ``mean``: the harness's own
    ``mean_stderr`` (sample standard deviation over the square root of n) in closed form.

    The harness computes it only when bootstrapping is on (``bootstrap_iters > 0``), which would also
    bootstrap the perplexity metrics at a cost of minutes per task; for a 0/1 score the closed form
    is the same number, ``sqrt(p (1 - p) / (n - 1))``."""
    return math.sqrt(max(mean * (1 - mean), 0.0) / (n - 1))
