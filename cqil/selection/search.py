"""Plan search: which layers to group, chosen by measured quality under a depth or speed budget.

Which layers go into groups decides most of the final quality, and the similarity of layer
inputs (:mod:`cqil.selection.similarity`) is a poor guide on some models. :func:`search_plan` measures
instead: every candidate plan runs on calibration tokens and is scored by the KL divergence of
its next-token distribution from the original model's (and by its perplexity), and the best
plan that meets the budget wins.

The search (a beam search over sets of groups):

1. Round 1 measures every window of ``degree`` consecutive layers as a plan of its own: the
   per-group costs, measured once.
2. Round k extends each of the ``beam_width`` best plans of round k-1 by one more group, taken
   from its ``pool_size`` compatible windows with the lowest round-1 cost, and measures every
   such plan again as a whole (groups interact: the cost of two groups is not the sum of theirs).
3. The rounds stop once the budget is met (``target_depth``, ``speedup``) or can no longer be
   met (``max_ppl_increase``). Groups may go anywhere, first and last layers included; only a
   window that mixes attention types (sliding and full) is never a candidate.

Measuring is cheap because plans share prefixes. In each round, per calibration batch, the
original model runs once and keeps its hidden states at the layer boundaries the round needs, and
so does every plan of the beam (only up to the last boundary needed). A new plan then runs only
from the first layer where it differs from the nearest of those trajectories (for an extension,
the new group's first layer): layers before it are never recomputed. Groups are
:class:`~cqil.rewrite.group.BranchGroup` views over the original layer modules (no weight is copied) with
gates fixed at the bypass mode's G, which is what :func:`cqil.parallelize` builds before any
training.

Cost, in forward passes over the calibration tokens (decoder-layer work / num_layers, which is
what ``cost["forward_passes"]`` counts; every measured plan also needs one LM-head pass): round 1
about 2 + L / 2, each later round about 1 + beam_width * pool_size * (mean layers after the
new group) / L. On SmolLM2-135M (L = 30) six pairs took 66 passes and 105 plans
(``bench/plan_search.py``); a 32-layer 7B model is the same count of passes, each a forward of
the model over the calibration set: a few hundred sequences of 2k tokens, so tens of minutes on
one GPU. Memory per batch: the original's next-token probabilities (B x T x vocab, float32), one
candidate's logits, one sequence's float32 log-probabilities at a time, and the kept hidden
states (at most (beam_width + 1) x L x B x T x hidden).

The latency model behind ``speedup`` lives in :mod:`cqil.selection.latency`, the measurement in
:mod:`cqil.selection.meter`, the result and its report files in :mod:`cqil.selection.plans`, and
the options in :mod:`cqil.selection.options` (:class:`SearchOptions`, shared by ``cqil plan`` and
the recipe's ``parallelize.search``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cqil.errors import CqilError
from cqil.selection.latency import estimate_speedup, fastest_times, measure_layer_times, plan_time_ms
from cqil.selection.meter import PlanMeter, measure_plans, measure_windows
from cqil.selection.options import BUDGETS, OBJECTIVES, SearchOptions
from cqil.selection.plans import (
    Candidate,
    Groups,
    SearchResult,
    pareto_png,
    plan_text,
    ppl_increase,
    write_report,
)

__all__ = [
    "BUDGETS",
    "OBJECTIVES",
    "BudgetError",
    "Candidate",
    "Groups",
    "PlanMeter",
    "SearchOptions",
    "SearchResult",
    "estimate_speedup",
    "measure_layer_times",
    "measure_plans",
    "measure_windows",
    "pareto_png",
    "plan_time_ms",
    "search_plan",
    "write_report",
]


class BudgetError(CqilError, ValueError):
    """A budget that no plan can meet; ``budget`` names it (``target_depth``, ``speedup``, ...)."""

    def __init__(self, budget: str, value, reason: str) -> None:
        self.budget, self.value, self.reason = budget, value, reason
        super().__init__(f"{budget}={value}: {reason}")


def _max_disjoint(windows: list[tuple[int, ...]]) -> int:
    count, free_from = 0, 0
    for w in sorted(windows, key=lambda w: w[-1]):  # earliest end first is optimal for intervals
        if w[0] >= free_from:
            count, free_from = count + 1, w[-1] + 1
    return count


def _check_budget(
    num_layers: int,
    degree: int,
    windows: list[tuple[int, ...]],
    latency: dict | None,
    target_depth,
    speedup,
    max_ppl_increase,
) -> tuple[str, float]:
    values = dict(zip(BUDGETS, (target_depth, speedup, max_ppl_increase), strict=True))
    given = {k: v for k, v in values.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one budget of {', '.join(BUDGETS)}; got {sorted(given) or 'none'}")
    ((name, value),) = given.items()
    max_groups = _max_disjoint(windows)
    shallowest = num_layers - max_groups * (degree - 1)
    if name == "target_depth":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BudgetError(name, value, "the target depth must be an integer number of layers")
        if value >= num_layers:
            raise BudgetError(
                name, value, f"the model has {num_layers} layers; a target depth must be below that"
            )
        if value < shallowest:
            raise BudgetError(
                name,
                value,
                f"below the shallowest depth degree {degree} allows on {num_layers} layers: "
                f"{shallowest} ({max_groups} groups of {degree})",
            )
        if (num_layers - value) % (degree - 1):
            lower = value - (degree - 1 - (num_layers - value) % (degree - 1))
            upper = lower + degree - 1
            raise BudgetError(
                name,
                value,
                f"each group of {degree} removes {degree - 1} layers, so depth {value} is not reachable "
                f"from {num_layers}; the nearest depths are {max(lower, shallowest)} and {upper}",
            )
    elif name == "speedup":
        ideal = num_layers / shallowest
        if not value > 1:
            raise BudgetError(name, value, "a speedup must be above 1")
        if value > ideal:
            raise BudgetError(
                name,
                value,
                f"above the ideal speedup {ideal:.3f}x of degree {degree} on {num_layers} layers "
                f"(every layer grouped: depth {shallowest})",
            )
        if latency is not None:
            best = plan_time_ms((), latency) / min(fastest_times(windows, latency))
            if value > best:
                raise BudgetError(
                    name,
                    value,
                    f"above the most the measured latency model allows, {best:.3f}x: the embeddings and "
                    f"LM head ({latency['other_ms']:.1f} of {latency['total_ms']:.1f} ms) do not shrink",
                )
    else:
        if not value > 0:
            raise BudgetError(name, value, "the allowed perplexity increase (percent) must be positive")
    return name, float(value)


def _front(points: list[Candidate], objective: str) -> list[Candidate]:
    """The candidates no other beats on both depth (lower) and the objective (lower), deepest first."""
    out, best = [], math.inf
    for c in sorted(points, key=lambda c: (c.depth, c.score(objective), c.groups)):
        if c.score(objective) < best:
            out.append(c)
            best = c.score(objective)
    return sorted(out, key=lambda c: -c.depth)


def search_plan(
    model: nn.Module,
    tokens: torch.LongTensor,
    options: SearchOptions | None = None,
    *,
    latency: dict | None = None,
    progress: bool = True,
    **changes,
) -> SearchResult:
    """The best plan of groups of ``degree`` layers that meets one budget, by measured quality.

    Args:
        model: the original ``*ForCausalLM`` (not parallelized); it is not modified.
        tokens: calibration sequences ``(N, T)`` (e.g. :func:`cqil.recovery.data.calibration_tokens`).
        options: what to search (:class:`~cqil.selection.options.SearchOptions`: degree, bypass,
            exactly one budget of ``target_depth`` / ``speedup`` / ``max_ppl_increase``, beam width,
            pool size, objective, batch size, seed); its defaults when ``None``.
        latency: per-layer times as :func:`measure_layer_times` returns them; measured on the first
            batch when ``None`` (pass them to make a ``speedup`` search independent of timing noise).
        progress: show tqdm bars.
        **changes: any field of :class:`SearchOptions` by name, overriding ``options``
            (``search_plan(model, tokens, target_depth=26)``).

    ``speedup`` asks for the fewest groups that reach it, placed where they cost least;
    ``max_ppl_increase`` for the shallowest plan within it. ``seed`` seeds torch's generator during
    the search (eval-mode models are deterministic; this pins any stochastic module). Ties are
    broken by layer index, so equal inputs give the same result.

    Raises:
        BudgetError: (a ``ValueError``) naming the budget when no plan can meet it.
    """
    options = (options or SearchOptions()).replace(**changes)
    degree, bypass, bypass_distance = options.degree, options.bypass, options.bypass_distance
    target_depth, speedup, max_ppl_increase = options.target_depth, options.speedup, options.max_ppl_increase
    beam_width, pool_size, objective = options.beam_width, options.pool_size, options.objective
    batch_size, seed = options.batch_size, options.seed
    started = time.perf_counter()
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
        raise ValueError(f"degree must be an integer of at least 2 (layers per group), got {degree!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if beam_width < 1 or pool_size < 1:
        raise ValueError(f"beam_width and pool_size must be positive, got {beam_width} and {pool_size}")
    meter = PlanMeter(
        model,
        tokens,
        bypass=bypass,
        bypass_distance=bypass_distance,
        batch_size=batch_size,
        progress=progress,
    )
    num_layers = meter.num_layers
    windows = meter.windows(degree)
    if not windows:
        raise BudgetError(
            "degree", degree, f"no run of {degree} layers of one attention type in {num_layers} layers"
        )
    # The cheap checks first: an impossible depth or ideal speedup needs no measurement.
    _check_budget(num_layers, degree, windows, None, target_depth, speedup, max_ppl_increase)
    timing_passes = 0.0
    if latency is None:
        reps = 3
        latency = measure_layer_times(model, tokens[:batch_size], reps=reps)
        timing_passes = (reps + 1) * min(batch_size, len(tokens)) / len(tokens)
    elif len(latency["layers_ms"]) != num_layers:
        raise ValueError(f"latency has {len(latency['layers_ms'])} layer times for {num_layers} layers")
    budget, value = _check_budget(
        num_layers, degree, windows, latency, target_depth, speedup, max_ppl_increase
    )
    max_groups = _max_disjoint(windows)
    last_round = (num_layers - int(value)) // (degree - 1) if budget == "target_depth" else max_groups
    min_round = 1
    if budget == "speedup":
        fastest = fastest_times(windows, latency)
        reference = plan_time_ms((), latency)
        min_round = next(k for k, t in enumerate(fastest) if t > 0 and reference / t >= value - 1e-12)

    with torch.random.fork_rng(devices=[meter.device] if meter.device.type == "cuda" else []):
        torch.manual_seed(seed)
        original = meter.measure_original()
        ppl_limit = original["ppl"] * (1 + value / 100) if budget == "max_ppl_increase" else math.inf

        def key(c: Candidate):
            return (c.score(objective), c.groups)

        def meets(c: Candidate) -> bool:
            if budget == "speedup":
                return c.speedup >= value - 1e-12
            if budget == "max_ppl_increase":
                return c.ppl <= ppl_limit
            return c.depth == int(value)

        measured: list[Candidate] = []
        rounds: list[dict] = []
        single: dict[tuple[int, ...], float] = {}
        beam: list[Candidate] = []
        chosen_round: list[Candidate] | None = None
        for k in range(1, last_round + 1):
            if k == 1:
                jobs = {(w,): () for w in windows}
            else:
                jobs = {}
                for parent in beam:
                    used = {i for g in parent.groups for i in g}
                    free = [w for w in windows if not used & set(w)]
                    free.sort(key=lambda w: (single[w], w))
                    for w in free[:pool_size]:
                        child = tuple(sorted(parent.groups + (w,)))
                        jobs.setdefault(child, ())
                # Each plan runs from where it leaves the nearest trajectory already computed.
                refs = [()] + [p.groups for p in beam]
                for child in jobs:
                    jobs[child] = max(refs, key=lambda r: (meter.divergence(child, r), r))
            if not jobs:
                break
            scores = meter.measure(list(jobs.items()), desc=f"{k} group{'s' * (k > 1)}: {len(jobs)} plans")
            round_ = [
                Candidate(
                    plan,
                    num_layers,
                    kl=s["kl"],
                    nll=s["nll"],
                    speedup=estimate_speedup(plan, latency),
                    round=k,
                )
                for plan, s in zip(jobs, scores, strict=True)
            ]
            measured += round_
            rounds.append(
                {
                    "groups": k,
                    "measured": len(round_),
                    "best": min(round_, key=key).to_dict(),
                    # Cumulative: what a search stopping after this round has cost.
                    "candidates": meter.num_measured,
                    "forward_passes": round(meter.forward_passes, 3),
                    "lm_head_passes": round(meter.lm_head_passes, 3),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            if k == 1:
                single = {c.groups[0]: c.score(objective) for c in round_}
            ok = sorted((c for c in round_ if meets(c)), key=key)
            ranked = sorted(round_, key=key)
            if progress:
                best = ranked[0]
                tqdm.write(
                    f"cqil plan: {k} group{'s' * (k > 1)} ({len(round_)} plans): best {plan_text(best.groups)} "
                    f"KL {best.kl:.4f} ppl {best.ppl:.2f} depth {best.depth} est. {best.speedup:.2f}x"
                )
            if budget == "max_ppl_increase":
                if not ok:
                    break
                chosen_round, beam = ok, ok[:beam_width]
                continue
            beam = ranked[:beam_width]
            if k >= min_round and ok:
                chosen_round = ok
                break

    if chosen_round is None:
        if budget == "max_ppl_increase":
            cheapest = min(measured, key=lambda c: c.ppl)
            raise BudgetError(
                budget,
                value,
                f"every plan of one group raises calibration perplexity more; the least is "
                f"{plan_text(cheapest.groups)} at {ppl_increase(cheapest.ppl, original['ppl'])}",
            )
        raise BudgetError(budget, value, "no plan the search reached meets it; widen beam_width or pool_size")
    chosen = chosen_round[0]
    return SearchResult(
        plan=chosen.plan,
        chosen=chosen,
        budget={budget: int(value) if budget == "target_depth" else value},
        original=original,
        candidates=measured,
        eligible=chosen_round,
        rounds=rounds,
        front=_front(measured, objective),
        latency={**latency, "model": "other + sum over effective layers of the slowest original layer"},
        cost={
            "candidates": meter.num_measured,
            "forward_passes": round(meter.forward_passes, 3),
            "lm_head_passes": round(meter.lm_head_passes, 3),
            "timing_passes": round(timing_passes, 3),
            "seconds": round(time.perf_counter() - started, 1),
        },
        settings={
            "degree": degree,
            "bypass": bypass,
            "bypass_distance": bypass_distance,
            "objective": objective,
            "beam_width": beam_width,
            "pool_size": pool_size,
            "batch_size": batch_size,
            "seed": seed,
            "num_sequences": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "num_layers": num_layers,
        },
    )
