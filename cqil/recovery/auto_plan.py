"""``parallelize.groups: auto`` in a recovery run: search the plan once and record it under ``output_dir/plan/``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cqil.errors import RecipeError
from cqil.recovery.checkpoint import list_checkpoints
from cqil.recovery.data import in_heldout, iter_records, pack_tokens
from cqil.recovery.progress import Log
from cqil.recovery.recipe import Recipe
from cqil.recovery.state import Processes


def search_run_plan(
    model: nn.Module,
    tokenizer,
    recipe: Recipe,
    *,
    source: str,
    output_dir: Path,
    processes: Processes,
    device: torch.device,
    log: Log,
) -> tuple[list[list[int]], dict]:
    """``groups: auto``: the main process searches the plan on calibration text of the train split
    (never the held-out documents), measuring on ``device``, and records it under ``output_dir/plan/``;
    every process then reads the groups from ``plan/plans.json``. A resumed run reuses the recorded plan.

    Returns the groups and the record of the search that results and reports keep (``plan_search``)."""
    from cqil.selection.search import BudgetError, search_plan, write_report

    par = recipe.parallelize
    search = par.search
    output_dir = Path(output_dir)
    folder = output_dir / "plan"
    report = folder / "plans.json"
    reused = report.is_file()
    if not reused and list_checkpoints(output_dir):
        raise RecipeError(
            source,
            "parallelize.groups",
            f"{output_dir} has checkpoints but no recorded plan ({report}); a new search could "
            "choose other groups than the ones they were trained with",
        )
    failure: Exception | None = None
    if processes.is_main_process and not reused:
        try:
            tokens = calibration_tokens(tokenizer, recipe, search.num_sequences, source=source, log=log)
            log(
                f"cqil: plan search (degree {search.degree}, "
                + ", ".join(
                    f"{k} {getattr(search, k)}" for k in search.BUDGETS if getattr(search, k) is not None
                )
                + f") on {tokens.shape[0]} sequences of {tokens.shape[1]} tokens"
            )
            # Measured on the accelerator, then back where it was loaded: what follows (the teacher
            # copy, the surgery, accelerate.prepare) runs as it does with explicit groups.
            home = next(model.parameters()).device
            model.to(device)
            result = search_plan(
                model,
                tokens,
                degree=search.degree,
                bypass=par.bypass,
                bypass_distance=par.bypass_distance,
                target_depth=search.target_depth,
                speedup=search.speedup,
                max_ppl_increase=search.max_ppl_increase,
                beam_width=search.beam_width,
                pool_size=search.pool_size,
                batch_size=search.batch_size,
                seed=recipe.train.seed,
                progress=True,
            )
            model.to(home)
            write_report(result, folder, overwrite=True)
            log(result.format_table())
        except BudgetError as e:
            failure = RecipeError(source, f"parallelize.search.{e.budget}", e.reason)
        except Exception as e:  # raised after the barrier, so that no other rank waits forever
            failure = e
    processes.wait_for_everyone()
    if failure is not None:
        raise failure
    if not report.is_file():
        raise RuntimeError(f"the plan search of the main process wrote no {report}; see its log")
    data = json.loads(report.read_text())
    if reused:
        log(f"cqil: reusing the recorded plan {report}")
    record = {
        "dir": "plan",
        "plans_json": "plan/plans.json",
        "table": "plan/table.txt",
        "budget": data.get("budget"),
        "reused": reused,
    }
    return data["plan"]["groups"], record


def calibration_tokens(
    tokenizer, recipe: Recipe, num_sequences: int, *, source: str, log: Log
) -> torch.Tensor:
    """The first packed sequences of the train split (without the hash-held-out documents when
    data.eval is absent): the text the plan search measures plans on."""
    data = recipe.data
    records = iter_records(
        data.train, source_field=data.source_field, text_field=data.text_field, hub_split=data.hub_split
    )
    texts = (t for t, _ in records if data.eval or not in_heldout(t, data.eval_fraction))
    tokens = pack_tokens(tokenizer, texts, seq_len=recipe.train.seq_len, max_sequences=num_sequences)
    if tokens.shape[0] == 0:
        raise RecipeError(
            source,
            "data.train",
            f"not enough training text for one sequence of {recipe.train.seq_len} tokens",
        )
    if tokens.shape[0] < num_sequences:
        log(
            f"cqil: only {tokens.shape[0]} of {num_sequences} calibration sequences "
            "(parallelize.search.num_sequences) in the train split"
        )
    return tokens
