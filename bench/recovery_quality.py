"""Recovery quality per token and per second: the default recipe against the simpler ones.

For each recipe (``--recipes``; by default the embedded default ``recipes/smollm2_135m.yaml`` and the
two baselines ``recipes/lp_style.yaml`` and ``recipes/cqil_style.yaml``) and each multiple of the
default's tokens (``--scales``, by default 1/4, 1/2, 1, 2 and 4), one whole recovery run trains on
that many tokens (``train.max_steps`` and every step count of the recipe scaled alike, so the
schedule keeps its shape), and prints one JSON line:

* the held-out perplexity of the original, the rewritten (before training) and the recovered model,
  on the sample's held-out split (``--heldout-sequences`` blocks of the recipe's ``eval.seq_len``, drawn
  equally from the sources the recipe trains on), and the fraction of the gap closed, overall and
  per source;
* the same on **text from a domain the training data does not contain**, every document of each set
  (``data/other_domain/package_docs.jsonl.gz``, the READMEs of 21 packages, never trained or tuned
  on, with the gap closed per README) and on the three dev sets, the ones to compare recipe variants
  on: ``python_docs.jsonl.gz`` (the Python language reference, the same kind of text as the READMEs
  from another source), ``discussion_dev.jsonl.gz`` (mailing-list discussion from lists the
  sample's ``MailingLists`` source leaves out) and ``chat_dev.jsonl.gz`` (small talk from chat rounds
  the sample's ``Chat`` source leaves out); ``dev``: the gap closed over them pooled;
* the same on each **frozen out-of-domain set** (``dialogue``, ``science_docs``, ``project_readmes``
  of ``data/other_domain/``, committed before any model was measured on them; see
  ``data/README.md``), every document, with the gap closed per document; and ``out_of_domain``: the
  gap closed over the four test sets' tokens pooled, its lowest set and each set's
  (``--domains`` measures fewer sets, for a quicker look);
* ``copying``: in-context copying, the perplexity of the second half of blocks whose second half
  repeats the first (the first halves of the Python reference's blocks), measured with ``dev_domain``;
* the tokens trained, the wall time of the training loop and its threads.

``--cache DIR`` keeps the original's and the untrained rewrite's measurements in ``DIR`` and reuses
them: they depend on the model, the sets, the tasks and the code, not on what a recipe trains or on
what text, so a sweep over the training measures them once (about half of a run's time on 2 cores).
Each file is keyed by a hash of everything they depend on (the model's files, each set's bytes, the
rewrite's recipe keys, this script, the cqil package, the local tasks, the releases of torch,
transformers and lm-eval); a row lists under ``reused`` what it took from ``DIR``.

Every model is measured in blocks of the default's ``eval.seq_len`` (its ``train.seq_len``, 128
tokens): a recipe that trains on other lengths compares only with ``--set eval.seq_len=128``.

Each run is a child process of its own (a fresh accelerate state), with evaluation extras (lm-eval,
latency, the report, checkpoints, the recipe's own ``eval.other_domain``, which the sets above
include) switched off; everything else is the recipe's. A recipe whose
rewrite costs less (``cqil_style``'s bypass ``none``) starts from a smaller gap, so the recovered
perplexity itself is printed beside the fraction. Runs one after another; the whole default grid
takes about an hour on 2 cores. ``--out`` appends the JSON lines to a file as they come.

One run is one draw: ``train.seed`` orders the text and draws the mixture, and at the default's
length two seeds of the same recipe differ by several points of the gap closed on one set (a
difference between two recipes smaller than that says nothing). ``--seeds 0 1 2`` trains each recipe
and scale once per seed (each row names its ``seed``) and then prints a summary line per recipe and
scale: each set's gap closed over the seeds, its mean and sample standard deviation.

    python bench/recovery_quality.py                          # the whole grid
    python bench/recovery_quality.py --scales 1 --recipes recipes/smollm2_135m.yaml
    python bench/recovery_quality.py --scales 1 --recipes recipes/smollm2_135m.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/smollm2_135m.yaml", "recipes/lp_style.yaml", "recipes/cqil_style.yaml"]
# Text of a domain the training sample lacks: "other_domain" is the test set (never tuned on);
# "dev_domain" is the same kind of text from another source, "discussion_dev" mail from lists the
# sample does not train on and "chat_dev" chat from rounds it does not train on: recipe variants are
# compared on these three. The frozen sets are test sets
# like "other_domain" (see data/README.md).
DOMAINS = {
    "other_domain": ROOT / "data" / "other_domain" / "package_docs.jsonl.gz",
    "dev_domain": ROOT / "data" / "other_domain" / "python_docs.jsonl.gz",
    "discussion_dev": ROOT / "data" / "other_domain" / "discussion_dev.jsonl.gz",
    "chat_dev": ROOT / "data" / "other_domain" / "chat_dev.jsonl.gz",
    "dialogue": ROOT / "data" / "other_domain" / "dialogue.jsonl.gz",
    "science_docs": ROOT / "data" / "other_domain" / "science_docs.jsonl.gz",
    "project_readmes": ROOT / "data" / "other_domain" / "project_readmes.jsonl.gz",
}
# Sets nothing is chosen on; the pooled out-of-domain figure is over these (not the dev sets).
TEST_DOMAINS = ("other_domain", "dialogue", "science_docs", "project_readmes")
DEV_DOMAINS = ("dev_domain", "discussion_dev", "chat_dev")
# The first half of each dev_domain block twice over, scored on the second copy: in-context copying,
# the skill the rewrite damages most (measured whenever dev_domain is).
COPYING = "copying"


class DomainSet(NamedTuple):
    """A set's token blocks, each block's document title, and the position its scoring starts at."""

    blocks: Any  # torch.LongTensor (rows, eval.seq_len); torch is imported only where a model runs
    titles: list[str]
    score_from: int = 1


def domain_blocks(tokenizer, recipe, args) -> dict[str, DomainSet]:
    """Each domain set: every document packed on its own into ``eval.seq_len``-token blocks (a tail shorter
    than a block is dropped), the document's title beside each row, in file order;
    ``--other-sequences N`` keeps the first ``N`` blocks. With ``dev_domain``, the copying probe."""
    import torch

    from cqil.recovery.data import iter_records, pack_tokens

    sets = {}
    for name in args.domains:
        path = DOMAINS[name]
        blocks, titles = [], []
        for text, title in iter_records([path], source_field="meta.title"):
            rows = pack_tokens(tokenizer, [text], seq_len=recipe.eval_seq_len)
            blocks.append(rows)
            titles += [title] * len(rows)
        tokens = torch.cat(blocks)[: args.other_sequences]
        sets[name] = DomainSet(tokens, titles[: len(tokens)])
    if "dev_domain" in sets:
        dev = sets["dev_domain"]
        half = dev.blocks.shape[1] // 2
        # Only the second copy is scored, from its second token: the first cannot be told from the
        # text it repeats.
        sets[COPYING] = DomainSet(dev.blocks[:, :half].repeat(1, 2), dev.titles, score_from=half + 1)
    return sets


def domain_perplexity(model, sets: dict[str, DomainSet]) -> dict[str, dict]:
    """``{"ppl", "nll", "tokens", "by_document": {title: ppl}}`` of ``model`` on each domain set
    (``tokens``: the tokens scored)."""
    from cqil.evaluation.metrics import perplexity

    out = {}
    for name, s in sets.items():
        r = perplexity(
            model, s.blocks, sources=s.titles, batch_size=8, progress=False, score_from=s.score_from
        )
        out[name] = {
            "ppl": r["ppl"],
            "nll": r["nll"],
            "tokens": r["tokens"],
            "by_document": {t: v["ppl"] for t, v in r["by_source"].items()},
        }
    return out


# Step counts that scale with a run's length (warmup, the local phase); checkpoints are off.
SCALED_KEYS = ("warmup_steps", "local_steps")


def gap(original: float, before: float, after: float) -> float | None:
    return None if before <= original else (before - after) / (before - original)


def rounded(g: float | None) -> float | None:
    return None if g is None else round(g, 4)


def tokens_per_step(recipe) -> int:
    train = recipe.train
    return train.seq_len * train.micro_batch_size * train.grad_accum_steps


def scaled_overrides(recipe, scale: float, reference_tokens: int) -> list[str]:
    """Overrides that train ``scale`` x the reference recipe's tokens with ``recipe``'s own schedule
    (a recipe with smaller steps takes more of them)."""
    train = recipe.train
    steps = max(1, round(reference_tokens * scale / tokens_per_step(recipe)))
    ratio = steps / train.max_steps
    out = [f"train.max_steps={steps}"]
    for key in SCALED_KEYS:
        value = getattr(train, key)
        if value:
            out.append(f"train.{key}={min(steps, max(1, round(value * ratio)))}")
    return out


def domain_row(name: str, originals: dict, r: dict) -> dict:
    """One domain set's figures in a JSON line; the test set also gets the gap closed per document."""
    three = originals[name], r["before"][name], r["after"][name]
    row = {
        "original": round(three[0]["ppl"], 3),
        "rewritten": round(three[1]["ppl"], 3),
        "recovered": round(three[2]["ppl"], 3),
        "gap_closed": round(gap(*(x["ppl"] for x in three)), 4),
        "tokens": r["domain_tokens"][name],
        "scored_tokens": three[2]["tokens"],
        "documents": r["domain_documents"][name],
    }
    if name in TEST_DOMAINS:
        row["gap_closed_by_document"] = {
            title: None if (g := gap(*(x["by_document"][title] for x in three))) is None else round(g, 4)
            for title in three[2]["by_document"]
        }
    return row


def pooled_row(originals: dict, r: dict, pool: tuple[str, ...] = TEST_DOMAINS) -> dict:
    """The sets of ``pool`` measured, pooled: perplexity over all their predicted tokens, the gap
    closed on that, the lowest set's gap and each set's."""
    names = [n for n in pool if n in r["after"]]

    def ppl(per_set: dict) -> float:
        tokens = sum(per_set[n]["tokens"] for n in names)
        return math.exp(sum(per_set[n]["nll"] * per_set[n]["tokens"] for n in names) / tokens)

    three = ppl(originals), ppl(r["before"]), ppl(r["after"])
    by_set = {n: gap(originals[n]["ppl"], r["before"][n]["ppl"], r["after"][n]["ppl"]) for n in names}
    closed = [g for g in by_set.values() if g is not None]  # None: the rewrite lost nothing there
    return {
        "sets": names,
        "original": round(three[0], 3),
        "rewritten": round(three[1], 3),
        "recovered": round(three[2], 3),
        "gap_closed": rounded(gap(*three)),
        "gap_closed_min": rounded(min(closed)) if closed else None,
        "gap_closed_by_set": {n: rounded(g) for n, g in by_set.items()},
    }


def _digest(paths, h=None) -> str:
    """sha256 over each file's name relative to its folder's parent and its bytes, in the given order."""
    h = h or hashlib.sha256()
    for path in paths:
        h.update(f"{path.parent.name}/{path.name}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _files(folder: Path, *patterns: str) -> list[Path]:
    found = {p for pattern in patterns for p in folder.rglob(pattern) if p.is_file()}
    return sorted(p for p in found if "__pycache__" not in p.parts)


def measurement_key(args, recipe, *, rewritten: bool) -> dict:
    """What the original's (``rewritten=False``) or the untrained rewrite's measurements on the sets
    and tasks depend on. The rewrite's recipe keys: the model, the plan and its form, LoRA (whose
    zero-initialised adapters still join the model), the seed; everything the trainer reads when the
    plan is searched (the search scores plans on the training text)."""
    from importlib.metadata import version

    from cqil.pretrained import resolve_model_path
    from cqil.recovery.fingerprint import run_fingerprint

    model = Path(resolve_model_path(recipe.model.name_or_path))
    if not model.is_dir():
        raise SystemExit(f"--cache: {recipe.model.name_or_path} is not a local model folder")
    sets = [*args.domains, *(["dev_domain"] if "dev_domain" in args.domains else [])]
    key = {
        "measured": "rewritten" if rewritten else "original",
        "model": _digest(_files(model, "*.json", "*.safetensors")),
        "sets": {name: _digest([DOMAINS[name]]) for name in dict.fromkeys(sets)},
        "blocks": args.other_sequences,
        "tasks": args.tasks,
        "task_limit": args.task_limit,
        "code": _digest([Path(__file__).resolve(), *_files(ROOT / "cqil", "*.py", "*.yaml", "*.json")])
        + _digest(_files(ROOT / "data" / "tasks", "*")),
        "releases": {p: version(p) for p in ("torch", "transformers", "lm_eval")},
    }
    fingerprint = run_fingerprint(recipe, world_size=1)
    if rewritten and recipe.parallelize.search is None:
        keep = ("model.", "parallelize.", "train.lora", "train.seed")
        fingerprint = {k: v for k, v in fingerprint.items() if k.startswith(keep)}
    elif not rewritten:
        fingerprint = {k: v for k, v in fingerprint.items() if k.startswith("model.")}
    key["recipe"] = fingerprint
    key["block_len"] = recipe.eval_seq_len
    return key


def reuse(cache: Path | None, key_of, measure, reused: list[str]):
    """``measure()``, or what it returned for the same key before, read from ``cache``.

    ``key_of()`` is called only with a cache: it hashes the model's weights and the code."""
    if cache is None:
        return measure()
    key = key_of()
    from cqil.files import write_atomic

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    path = cache / f"{key['measured']}-{digest[:20]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            stored["key"], stored["measures"]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SystemExit(
                f"--cache: {path} is not a measurement this script wrote ({e}); delete it"
            ) from e
        if stored["key"] == key:
            print(
                f"recovery_quality: the {key['measured']} model's measurements from {path}", file=sys.stderr
            )
            reused.append(key["measured"])
            return stored["measures"]
    measures = measure()
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "measures": measures}, indent=1))
    return json.loads(json.dumps(measures))  # as a reuse would return it (tuples as lists)


def end_with_parent(parent_pid: int) -> None:
    """Linux: let this process be killed when ``parent_pid``, its parent, ends, however it ends.

    A bench killed from outside (a SIGKILL, a test's timeout) would otherwise leave its training run
    holding both cores for up to an hour. SIGKILL, not SIGTERM: the trainer takes SIGTERM as a
    scheduler's preemption notice (checkpoint at the next step, then go on to measure), and a run
    whose bench is gone has nothing to keep (its folder is the bench's temporary one). Elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it ended before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def child(args) -> None:
    """One recovery run in this process; prints its JSON line."""
    if args.parent_pid is not None:
        end_with_parent(args.parent_pid)
    import torch

    from cqil.recovery.recipe import load_recipe
    from cqil.recovery.trainer import RecoveryTrainer

    overrides = [
        *args.set,
        "eval.tasks=[]",
        "eval.latency=false",
        "eval.report=false",
        "eval.other_domain=null",  # measured here on every set, three times over in the trainer
        "train.trackers=[]",
        "train.save_every_steps=0",
        f"eval.num_sequences={args.heldout_sequences}",
        f"output_dir={args.output_dir}",
    ]
    recipe = load_recipe(ROOT / args.recipe, overrides)
    trainer = RecoveryTrainer(recipe, source=args.recipe)
    try:
        trainer.setup()
        texts = domain_blocks(trainer.tokenizer, recipe, args)
        student = trainer.model.student
        # The rewritten model before any step, out of domain (the held-out split's is in results).
        reused: list[str] = []

        def measure():
            return domain_perplexity(student, texts), run_tasks(student, trainer.tokenizer, args)

        before, tasks_before = reuse(
            args.cache, lambda: measurement_key(args, recipe, rewritten=True), measure, reused
        )
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        results = trainer.finish(lambda *a, **k: None)
        after = domain_perplexity(student, texts)
        tasks_after = run_tasks(student, trainer.tokenizer, args)
    finally:
        trainer.cleanup()
    ppl = {k: results[k]["ppl"] for k in ("original", "parallelized", "recovered")}
    by_source = {
        s: gap(*(results[k]["by_source"][s]["ppl"] for k in ("original", "parallelized", "recovered")))
        for s in results["recovered"]["by_source"]
    }
    print(
        "RESULT "
        + json.dumps(
            {
                "before": before,
                "after": after,
                "tasks_before": tasks_before,
                "tasks_after": tasks_after,
                "ppl": ppl,
                "gap_closed_by_source": by_source,
                "train_s": round(train_s, 1),
                "threads": torch.get_num_threads(),
                "tokens": results.get("tokens_seen"),
                "heldout_tokens": results["recovered"]["tokens"],
                "domain_tokens": {k: int(s.blocks.numel()) for k, s in texts.items()},
                "domain_documents": {k: len(set(s.titles)) for k, s in texts.items()},
                "reused": reused,
            }
        ),
        flush=True,
    )


def run_tasks(model, tokenizer, args) -> dict:
    """The ``--tasks`` (lm-eval, zero-shot, at most ``--task-limit`` examples each) on ``model``."""
    if not args.tasks:
        return {}
    from cqil.evaluation.metrics import lm_eval_tasks

    return lm_eval_tasks(model, tokenizer, args.tasks, limit=args.task_limit, batch_size=8)


def original_measures(args, reused: list[str]) -> tuple[dict, dict]:
    """Perplexity of the untouched model on each domain set and its ``--tasks`` (the same for every
    recipe)."""
    from cqil.pretrained import load_model
    from cqil.recovery.recipe import load_recipe

    recipe = load_recipe(ROOT / RECIPES[0])

    def measure():
        model, tokenizer = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype)
        return domain_perplexity(model, domain_blocks(tokenizer, recipe, args)), run_tasks(
            model, tokenizer, args
        )

    return reuse(args.cache, lambda: measurement_key(args, recipe, rewritten=False), measure, reused)


def task_rows(originals: dict, before: dict, after: dict) -> dict:
    """Each task's accuracies (original, rewritten, recovered, each with its standard error), its
    size, its chance level and the share of the original's margin above chance each model keeps."""
    from cqil.evaluation.accuracy_report import kept

    rows = {}
    for task, metrics in originals.items():
        row = {"examples": metrics.get("samples")}
        chance = metrics.get("chance")  # lm_eval_tasks gives it where the task's kind tells it
        if chance is not None:
            row["chance"] = round(chance, 4)
        for metric in ("acc", "acc_norm"):
            if metric not in metrics:
                continue
            three = metrics[metric], before[task][metric], after[task][metric]
            row[metric] = dict(
                zip(("original", "rewritten", "recovered"), (round(v, 4) for v in three), strict=True)
            )
            row[f"{metric}_stderr"] = [
                round(m[task].get(f"{metric}_stderr", math.nan), 4) for m in (originals, before, after)
            ]
            if chance is not None:
                row[f"{metric}_kept"] = {
                    "rewritten": rounded(kept(three[0], three[1], chance)),
                    "recovered": rounded(kept(three[0], three[2], chance)),
                }
        rows[task] = row
    return rows


def spread(values: list[float | None]) -> dict:
    """The values over seeds, their mean and sample standard deviation (``None`` for one value, and
    both ``None`` where a seed has none: a gap the rewrite did not open, a task at chance)."""
    if any(v is None for v in values):
        return {"mean": None, "sd": None, "values": values}
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "values": values,
    }


def seed_summary(rows: list[dict]) -> dict:
    """One recipe and scale over its seeds: each set's gap closed (and each pooled figure's), their
    mean and spread; the lowest set's share, per seed and as the lowest of the sets' means (a rule that
    chooses on the lowest set reads the latter); each task's accuracy kept by the recovered model."""
    first = rows[0]
    summary = {
        "recipe": first["recipe"],
        **({"overrides": first["overrides"]} if "overrides" in first else {}),
        "scale": first["scale"],
        "seeds": [r["seed"] for r in rows],
        "train_s": round(statistics.fmean(r["train_s"] for r in rows), 1),
    }
    sets = [k for k in ("heldout", *DOMAINS, COPYING) if k in first]
    summary["gap_closed"] = {k: spread([r[k]["gap_closed"] for r in rows]) for k in sets}
    for pooled in ("dev", "out_of_domain"):
        if pooled not in first:
            continue
        # A pooled figure's sets are rows of their own: their means are above.
        means = {
            k: mean for k in first[pooled]["sets"] if (mean := summary["gap_closed"][k]["mean"]) is not None
        }
        summary[pooled] = {
            "sets": first[pooled]["sets"],
            "gap_closed": spread([r[pooled]["gap_closed"] for r in rows]),
            "gap_closed_min": spread([r[pooled]["gap_closed_min"] for r in rows]),
            "lowest_mean": (
                {"set": min(means, key=means.get), "gap_closed": min(means.values())} if means else None
            ),
        }
    if "tasks" in first:
        summary["acc_kept"] = {
            task: spread([r["tasks"][task][metric]["recovered"] for r in rows])
            for task, row in first["tasks"].items()
            for metric in ("acc_kept", "acc_norm_kept")
            if metric in row
        }
    return summary


def label(stem: str, given: str | None, *, several: bool) -> str:
    """A JSON line's recipe name: ``--label`` names the only recipe or qualifies each of several."""
    if not given:
        return stem
    return f"{stem} {given}" if several else given


def run_child(args, path: str, sets: list[str], at: str) -> dict:
    """One recovery run of ``path`` with the overrides ``sets``, in a child process; its RESULT line."""
    with tempfile.TemporaryDirectory(prefix="cqil-quality-") as tmp:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--recipe",
            path,
            "--output-dir",
            str(Path(tmp) / "run"),
            "--parent-pid",
            str(os.getpid()),
        ]
        cmd += ["--heldout-sequences", str(args.heldout_sequences)]
        if args.other_sequences is not None:
            cmd += ["--other-sequences", str(args.other_sequences)]
        cmd += ["--domains", *args.domains]
        if args.tasks:
            cmd += ["--tasks", *args.tasks]
        if args.task_limit is not None:
            cmd += ["--task-limit", str(args.task_limit)]
        if args.cache is not None:
            cmd += ["--cache", str(args.cache.resolve())]
        for s in sets:
            cmd += ["--set", s]
        # The run's log (its steps, its measurements) goes to this stderr as it happens.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{path} at {at} failed (exit {proc.returncode}; its log is above)")
    return json.loads(lines[-1][len("RESULT ") :])


def emit(row: dict, out: Path | None) -> None:
    """Print one JSON line and append it to ``out``."""
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def seed_number(text: str) -> int:
    """An argparse type: a train.seed, a non-negative integer."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {n}")
    return n


def block_count(text: str) -> int:
    """An argparse type: a number of blocks, at least one."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--scales", nargs="+", type=float, default=[0.25, 0.5, 1, 2, 4])
    parser.add_argument("--heldout-sequences", type=block_count, default=48)
    parser.add_argument(
        "--other-sequences",
        type=block_count,
        default=None,
        help="blocks of each domain set (default: all of them, every document)",
    )
    parser.add_argument(
        "--domains",
        nargs="+",
        choices=list(DOMAINS),
        default=list(DOMAINS),
        help="the out-of-domain sets to measure (default: all)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        help="lm-eval tasks to run on the original, the rewritten and every recovered model",
    )
    parser.add_argument(
        "--task-limit", type=block_count, default=None, help="at most this many examples per task"
    )
    parser.add_argument("--threads", type=int, default=None, help="train.cpu_threads of every run")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the original's and the untrained rewrite's measurements here and reuse them when "
        "nothing they depend on changed (off by default)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every run (repeatable; dotted keys, as `cqil recover RECIPE key=value`)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=seed_number,
        default=None,
        metavar="SEED",
        help="train each recipe and scale once per train.seed and add a summary line over them (mean "
        "and standard deviation of each set's gap closed); default: the recipes' own seed, one run",
    )
    parser.add_argument(
        "--label",
        help="the JSON lines' recipe name (default: the recipe file's stem; with several recipes, "
        "'<stem> <label>')",
    )
    # One run (internal): the child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from cqil.errors import CqilError
    from cqil.pretrained import EMBEDDED_MODELS
    from cqil.recovery.recipe import load_recipe

    reference = load_recipe(ROOT / RECIPES[0])
    reference_tokens = reference.train.max_steps * tokens_per_step(reference)
    recipes = {}
    for path in args.recipes:  # every recipe checked before any model loads
        try:  # --set applies before the scaling, so an overridden step count is scaled too
            recipe = recipes[path] = load_recipe(ROOT / path, args.set)
        except CqilError as e:
            parser.exit(2, f"error: {e}\n")
        # Every model is measured on the same blocks: a longer one would read more context. A recipe
        # that trains on other lengths sets eval.seq_len to the default's.
        if recipe.eval_seq_len != reference.eval_seq_len:
            parser.exit(
                2,
                f"error: {path}: measures in blocks of {recipe.eval_seq_len} tokens, the default in "
                f"{reference.eval_seq_len} (set eval.seq_len={reference.eval_seq_len})\n",
            )
        if args.cache is not None and not (
            recipe.model.name_or_path in EMBEDDED_MODELS or Path(recipe.model.name_or_path).is_dir()
        ):
            parser.exit(2, f"error: {path}: --cache needs a local model; model.name_or_path is a Hub id\n")
        if reference_tokens * min(args.scales) < tokens_per_step(recipe):
            parser.exit(2, f"error: {path}: one step is more tokens than the smallest scale trains\n")
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds):
            parser.exit(2, f"error: --seeds: a seed given twice: {' '.join(map(str, args.seeds))}\n")
        if any(s.split("=", 1)[0].strip() == "train.seed" for s in args.set):
            parser.exit(2, "error: --seeds and --set train.seed=...: give the seeds one way\n")
    if args.cache is not None and args.cache.exists() and not args.cache.is_dir():
        parser.exit(2, f"error: --cache: {args.cache} exists and is not a folder\n")
    if args.tasks:  # an unknown name is refused before any model loads
        from cqil.evaluation.metrics import check_tasks, task_manager

        try:
            check_tasks(args.tasks, task_manager())
        except CqilError as e:
            parser.exit(2, f"error: --tasks: {e}\n")
    reused_originals: list[str] = []
    originals, original_tasks = original_measures(args, reused_originals)
    for path, recipe in recipes.items():
        for scale in args.scales:
            rows = []
            for seed in args.seeds or [None]:
                sets = [*args.set, *scaled_overrides(recipe, scale, reference_tokens)]  # the later wins
                if seed is not None:
                    sets.append(f"train.seed={seed}")
                if args.threads is not None:
                    sets.append(f"train.cpu_threads={args.threads}")
                r = run_child(args, path, sets, f"{scale}x" if seed is None else f"{scale}x, seed {seed}")
                ppl = r["ppl"]
                row = {
                    "recipe": label(Path(path).stem, args.label, several=len(recipes) > 1),
                    **({"overrides": args.set} if args.set else {}),
                    "scale": scale,
                    **({"seed": seed} if seed is not None else {}),
                    "tokens": r["tokens"],
                    "train_s": r["train_s"],
                    "threads": r["threads"],
                    "heldout": {
                        "original": round(ppl["original"], 3),
                        "rewritten": round(ppl["parallelized"], 3),
                        "recovered": round(ppl["recovered"], 3),
                        "gap_closed": round(gap(ppl["original"], ppl["parallelized"], ppl["recovered"]), 4),
                        "gap_closed_by_source": {
                            k: None if v is None else round(v, 4)
                            for k, v in r["gap_closed_by_source"].items()
                        },
                        "tokens": r["heldout_tokens"],
                    },
                    **{k: domain_row(k, originals, r) for k in args.domains},
                    **({COPYING: domain_row(COPYING, originals, r)} if COPYING in r["after"] else {}),
                }
                if any(k in TEST_DOMAINS for k in args.domains):
                    row["out_of_domain"] = pooled_row(originals, r)
                if any(k in DEV_DOMAINS for k in args.domains):
                    row["dev"] = pooled_row(originals, r, DEV_DOMAINS)
                if args.tasks:
                    row["tasks"] = task_rows(original_tasks, r["tasks_before"], r["tasks_after"])
                if args.cache is not None:
                    row["reused"] = [*reused_originals, *r["reused"]]
                emit(row, args.out)
                assert math.isfinite(ppl["recovered"])
                rows.append(row)
            if len(rows) > 1:
                emit({"seed_summary": seed_summary(rows)}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
