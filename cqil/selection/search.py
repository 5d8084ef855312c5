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
one GPU. Memory per batch: the original's next-token log-probabilities (B x T x vocab, float32,
twice) and the kept hidden states (at most (beam_width + 1) x L x B x T x hidden).

The latency model (``speedup``): the original layers' times and the rest of a forward pass
(embeddings, final norm, LM head) are measured once on one calibration batch; a plan's time is
the rest plus, for every effective layer, the time of its slowest original layer: a group's
branches run concurrently (one rank or stream per branch, as :mod:`cqil.serving.concurrent` runs them)
and communication is free. So it estimates prefill latency at the calibration batch shape, and
is an upper bound on what a real concurrent run gains.

This module is longer than 500 lines because it holds the measurement, the beam search and the
report of the plan search together; a split is planned.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cqil.errors import CqilError
from cqil.files import check_out_dir, write_atomic
from cqil.rewrite.group import BYPASS_MODES, BranchGroup, effective_layers
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import check_supported, is_parallelized

Groups = tuple[tuple[int, ...], ...]
OBJECTIVES = ("kl", "ppl")
BUDGETS = ("target_depth", "speedup", "max_ppl_increase")  # search_plan takes exactly one


class BudgetError(CqilError, ValueError):
    """A budget that no plan can meet; ``budget`` names it (``target_depth``, ``speedup``, ...)."""

    def __init__(self, budget: str, value, reason: str) -> None:
        self.budget, self.value, self.reason = budget, value, reason
        super().__init__(f"{budget}={value}: {reason}")


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Candidate:
    """One measured plan: calibration quality and estimated speed."""

    groups: Groups
    num_layers: int
    kl: float  # mean KL(original || plan) of the next-token distributions, nats per token
    nll: float  # mean negative log-likelihood of the next token, nats
    speedup: float  # latency-model estimate, original time / plan time
    round: int  # search round that measured it (= number of groups)

    @property
    def plan(self) -> GroupPlan:
        return GroupPlan(self.groups, self.num_layers)

    @property
    def depth(self) -> int:
        return self.num_layers - sum(len(g) - 1 for g in self.groups)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def score(self, objective: str) -> float:
        return self.kl if objective == "kl" else self.nll

    def to_dict(self) -> dict:
        return {
            "groups": [list(g) for g in self.groups],
            "depth": self.depth,
            "speedup": round(self.speedup, 4),
            "kl": self.kl,
            "ppl": self.ppl,
            "nll": self.nll,
            "round": self.round,
        }


@dataclass
class SearchResult:
    """What :func:`search_plan` found: the chosen plan and the evidence for it."""

    plan: GroupPlan
    chosen: Candidate
    budget: dict  # {"target_depth": 26} (or speedup / max_ppl_increase)
    original: dict  # {"ppl", "nll"} of the original model on the calibration tokens
    candidates: list[Candidate]  # every measured plan, in measurement order
    eligible: list[Candidate]  # the plans meeting the budget in the deciding round, best first
    front: list[Candidate]  # Pareto front of depth vs the objective, deepest first
    rounds: list[dict]  # per search round: its best plan and the cumulative cost so far
    latency: dict  # {"layers_ms": [...], "other_ms": x, "total_ms": y, "batch": [B, T], "model": ...}
    cost: dict  # {"candidates", "forward_passes", "lm_head_passes", "timing_passes", "seconds"}
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "plan": self.plan.to_dict(),
            "chosen": self.chosen.to_dict(),
            "budget": self.budget,
            "original": self.original,
            "settings": self.settings,
            "cost": self.cost,
            "latency": self.latency,
            "eligible": [c.to_dict() for c in self.eligible],
            "front": [c.to_dict() for c in self.front],
            "rounds": self.rounds,
            "candidates": [c.to_dict() for c in self.candidates],
            "recipe": self.recipe_snippet(),
        }

    def recipe_snippet(self) -> str:
        """The chosen plan as the ``parallelize`` section of a recovery recipe (YAML)."""
        s, c = self.settings, self.chosen
        budget = ", ".join(f"{k} {v}" for k, v in self.budget.items())
        lines = [
            f"# cqil plan ({budget}): depth {self.plan.num_layers} -> {c.depth}, est. {c.speedup:.2f}x, "
            f"calibration KL {c.kl:.4f}, ppl {c.ppl:.2f} ({_increase(c.ppl, self.original['ppl'])})",
            "parallelize:",
            f"  groups: {json.dumps([list(g) for g in self.plan.groups])}",
            f"  bypass: {s.get('bypass', 'lp')}",
        ]
        if s.get("bypass") == "cqil":
            lines.append(f"  bypass_distance: {s.get('bypass_distance', 1)}")
        return "\n".join(lines) + "\n"

    def format_table(self, top: int = 10) -> str:
        """The plans meeting the budget (best first), then the best plan per depth."""
        base = self.original["ppl"]
        header = ["rank", "plan", "depth", "speedup", "KL", "ppl", "vs orig"]

        def row(rank: str, c: Candidate | None) -> list[str]:
            if c is None:
                n = self.plan.num_layers
                return [rank, "original", str(n), "1.00x", "0", f"{base:.2f}", "-"]
            return [
                rank,
                _plan_text(c.groups),
                str(c.depth),
                f"{c.speedup:.2f}x",
                f"{c.kl:.4f}",
                f"{c.ppl:.2f}",
                _increase(c.ppl, base),
            ]

        budget = ", ".join(f"{k}={v}" for k, v in self.budget.items())
        ranked = [row("-", None)] + [
            row(str(i + 1) + ("*" if c == self.chosen else ""), c) for i, c in enumerate(self.eligible[:top])
        ]
        front = [row("-", None)] + [row("*" if c == self.chosen else "", c) for c in self.front]
        cost = self.cost
        lines = [
            f"plans meeting {budget} (of {len(self.eligible)}), best first by calibration "
            f"{self.settings.get('objective', 'kl')}:",
            _columns(header, ranked),
            "",
            "Pareto front (depth vs calibration quality):",
            _columns(header, front),
            "",
            f"chosen: {self.plan}  ({cost['candidates']} plans measured, "
            f"{cost['forward_passes']:.1f} forward passes, {cost['seconds']:.0f} s)",
        ]
        return "\n".join(lines)


def _plan_text(groups: Groups) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in groups)


def _increase(ppl: float, base: float) -> str:
    return f"{100 * (ppl / base - 1):+.1f}%"


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the plan column (1) reads better left-aligned
        return "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(r) for r in [header, *rows])


# ---------------------------------------------------------------------------------------- measuring
class PlanMeter:
    """Measures plans on calibration tokens, reusing the hidden states the plans share.

    ``measure(jobs)`` takes ``(plan groups, reference groups)`` pairs; the reference is a plan
    whose trajectory is computed once per batch (``()`` is the original model), and each plan runs
    only from the first layer where it differs from its reference. The model is temporarily
    rewired while a batch runs (its layer list and ``config.num_hidden_layers`` /
    ``config.layer_types`` are swapped and restored); its weights are never changed.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: torch.LongTensor,
        *,
        bypass: str = "lp",
        bypass_distance: int = 1,
        batch_size: int = 4,
        progress: bool = True,
    ) -> None:
        check_supported(model)
        if is_parallelized(model):
            raise ValueError("model is already parallelized (config.cqil is set); search on the original")
        if bypass not in BYPASS_MODES:
            raise ValueError(f"bypass must be one of {', '.join(map(repr, BYPASS_MODES))}; got {bypass!r}")
        if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
            raise ValueError(
                f"tokens must have shape (N, T) with N >= 1 and T >= 2, got {tuple(tokens.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.tokens = tokens
        self.batch_size = batch_size
        self.progress = progress
        self.config = model.config
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        self.layer_types = list(getattr(self.config, "layer_types", None) or [])
        self.device = next(model.parameters()).device
        self.group_options = dict(
            bypass=bypass, bypass_distance=bypass_distance, gates="fixed", gate_shape="scalar"
        )
        self._groups: dict[tuple[int, ...], nn.Module] = {}
        self.layer_rows = 0  # sum over runs of (original layers run) x (sequences)
        self.head_rows = 0  # sequences whose logits were computed
        self.num_measured = 0

    # -------------------------------------------------------------- what a plan may contain
    def windows(self, degree: int) -> list[tuple[int, ...]]:
        """Every run of ``degree`` consecutive layers of one attention type, by first layer."""
        out = []
        for start in range(self.num_layers - degree + 1):
            window = tuple(range(start, start + degree))
            if self.layer_types and len({self.layer_types[i] for i in window}) > 1:
                continue
            out.append(window)
        return out

    def check_types(self, groups: Groups) -> None:
        """Refuse a group that mixes attention types, as :func:`cqil.parallelize` does."""
        for group in groups:
            kinds = {self.layer_types[i] for i in group} if self.layer_types else set()
            if len(kinds) > 1:
                raise ValueError(
                    f"group {list(group)} mixes attention types {sorted(kinds)}; group layers of one type"
                )

    @property
    def forward_passes(self) -> float:
        return self.layer_rows / (self.num_layers * len(self.tokens))

    @property
    def lm_head_passes(self) -> float:
        return self.head_rows / len(self.tokens)

    # -------------------------------------------------------------- running layers
    def _module(self, indices: tuple[int, ...]) -> nn.Module:
        if len(indices) == 1:
            return self.layers[indices[0]]
        if indices not in self._groups:
            attn = self.layers[indices[0]].self_attn
            # Mistral reads its window from the config; Qwen2/3 set it per layer (as in the surgery).
            window = getattr(attn, "sliding_window", getattr(self.config, "sliding_window", None))
            group = BranchGroup(
                [self.layers[i] for i in indices],
                self.config,
                indices[0],
                indices,
                sliding_window=window,
                **self.group_options,
            )
            self._groups[indices] = group.eval()
        return self._groups[indices]

    @contextmanager
    def _rewired(self, effective: list[tuple[int, ...]]):
        base, config = self.model.model, self.config
        saved = base.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
        base.layers = nn.ModuleList([self._module(e) for e in effective])
        config.num_hidden_layers = len(effective)
        if self.layer_types:
            config.layer_types = [self.layer_types[e[0]] for e in effective]
        try:
            yield base.layers
        finally:
            base.layers = saved[0]
            config.num_hidden_layers = saved[1]
            if self.layer_types:
                config.layer_types = saved[2]

    def _run(self, state: torch.Tensor, effective: list[tuple[int, ...]], capture: set[int], logits: bool):
        """Run ``effective`` layers on ``state``; returns ({boundary: state}, logits or None).

        Boundary b is the input of original layer b, i.e. the output of the effective layer
        that ends at layer b - 1.
        """
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def saver(boundary: int):
            def hook(module, args, output):
                captured[boundary] = output[0] if isinstance(output, tuple) else output

            return hook

        with self._rewired(effective) as modules:
            for indices, module in zip(effective, modules, strict=True):
                if indices[-1] + 1 in capture:
                    handles.append(module.register_forward_hook(saver(indices[-1] + 1)))
            try:
                if logits:
                    out = self.model(inputs_embeds=state, use_cache=False).logits
                else:
                    self.model.model(inputs_embeds=state, use_cache=False)
                    out = None
            finally:
                for handle in handles:
                    handle.remove()
        self.layer_rows += sum(len(e) for e in effective) * len(state)
        self.head_rows += len(state) if logits else 0
        return captured, out

    # -------------------------------------------------------------- measuring plans
    def effective(self, groups: Groups) -> list[tuple[int, ...]]:
        return effective_layers(groups, self.num_layers)

    def divergence(self, a: Groups, b: Groups) -> int:
        """The first original layer where plans ``a`` and ``b`` compute differently (L if never)."""
        for x, y in zip(self.effective(a), self.effective(b), strict=False):
            if x != y:
                return min(x[0], y[0])
        return self.num_layers

    @torch.inference_mode()
    def measure(self, jobs: Sequence[tuple[Groups, Groups]], *, desc: str = "measure") -> list[dict]:
        """KL from the original and NLL on the tokens of each ``(plan, reference)``, in order."""
        starts = [self.divergence(plan, ref) for plan, ref in jobs]
        if any(s >= self.num_layers for s in starts):
            bad = jobs[starts.index(self.num_layers)][0]
            raise ValueError(f"plan {[list(g) for g in bad]} computes the same as its reference")
        refs = sorted({ref for _, ref in jobs if ref})
        ref_start = {ref: self.divergence(ref, ()) for ref in refs}
        # Which boundary states each trajectory must keep: a plan diverging from its reference at
        # s reads the reference's state at s, which is the original's while s <= the reference's
        # own divergence from the original.
        needed: dict[Groups, set[int]] = {(): set()} | {ref: set() for ref in refs}
        for (_, ref), s in zip(jobs, starts, strict=True):
            owner = ref if ref and s > ref_start[ref] else ()
            needed[owner].add(s)
        for ref in refs:
            needed[()].add(ref_start[ref])

        sums = [[0.0, 0.0] for _ in jobs]  # KL, NLL summed over predicted tokens
        count = 0
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(
            total=len(jobs) * math.ceil(len(self.tokens) / self.batch_size),
            desc=desc,
            unit="plan",
            disable=not self.progress,
            leave=False,
        )
        try:
            for begin in range(0, len(self.tokens), self.batch_size):
                ids = self.tokens[begin : begin + self.batch_size].to(self.device)
                targets = ids[:, 1:]
                embeds = self.model.get_input_embeddings()(ids)
                states, logits = self._run(embeds, self.effective(()), needed[()], logits=True)
                states[0] = embeds
                # The original's next-token distribution, in float32 (bf16 loses small probabilities).
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                p = logp.exp()
                neg_entropy = (p * logp).sum(-1)
                del logits, logp
                trajectories = {(): states}
                for ref in refs:
                    s0 = ref_start[ref]
                    last = max(needed[ref], default=s0)
                    tail = [e for e in self.effective(ref) if e[0] >= s0 and e[-1] < last]
                    traj = {b: st for b, st in states.items() if b <= s0}
                    if tail:
                        traj |= self._run(states[s0], tail, needed[ref], logits=False)[0]
                    trajectories[ref] = traj
                for n, ((plan, ref), s) in enumerate(zip(jobs, starts, strict=True)):
                    source = trajectories[ref] if ref and s > ref_start[ref] else states
                    tail = [e for e in self.effective(plan) if e[0] >= s]
                    out = self._run(source[s], tail, set(), logits=True)[1]
                    logq = F.log_softmax(out[:, :-1].float(), dim=-1)
                    del out
                    sums[n][0] += (neg_entropy - (p * logq).sum(-1)).sum().item()
                    sums[n][1] -= logq.gather(-1, targets[..., None]).sum().item()
                    del logq
                    bar.update(1)
                count += targets.numel()
                del states, trajectories, p, neg_entropy
        finally:
            bar.close()
            self.model.train(was_training)
        self.num_measured += len(jobs)
        return [{"kl": kl / count, "nll": nll / count, "ppl": math.exp(nll / count)} for kl, nll in sums]

    @torch.inference_mode()
    def measure_original(self) -> dict:
        """Perplexity of the original model on the tokens (``{"ppl", "nll"}``)."""
        total, count = 0.0, 0
        for begin in range(0, len(self.tokens), self.batch_size):
            ids = self.tokens[begin : begin + self.batch_size].to(self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            ).item()
            count += ids[:, 1:].numel()
            self.layer_rows += self.num_layers * len(ids)
            self.head_rows += len(ids)
        return {"ppl": math.exp(total / count), "nll": total / count}


def measure_plans(
    model: nn.Module,
    tokens: torch.LongTensor,
    plans: Sequence[GroupPlan | Sequence[Sequence[int]] | str],
    *,
    bypass: str = "lp",
    bypass_distance: int = 1,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Calibration KL (from the original) and perplexity of each plan, sharing the original's prefix.

    Each plan runs from its first group on; everything before it is the original model's, computed
    once per batch. Returns ``([{"plan", "kl", "nll", "ppl"} per plan], cost)`` where ``cost`` has
    ``candidates``, ``forward_passes`` (decoder-layer work in full passes over ``tokens``) and
    ``lm_head_passes``. ``model`` is left unchanged.
    """
    meter = PlanMeter(
        model,
        tokens,
        bypass=bypass,
        bypass_distance=bypass_distance,
        batch_size=batch_size,
        progress=progress,
    )
    parsed = [GroupPlan.parse(p, meter.num_layers) for p in plans]
    for plan in parsed:
        meter.check_types(plan.groups)
    real = [p for p in parsed if not p.is_identity()]
    scores = iter(meter.measure([(p.groups, ()) for p in real], desc="plans")) if real else iter(())
    results = []
    for plan in parsed:
        score = next(scores) if not plan.is_identity() else None
        results.append({"plan": plan.to_dict(), **(score or {})})
    if any(p.is_identity() for p in parsed):
        original = meter.measure_original()
        for plan, entry in zip(parsed, results, strict=True):
            if plan.is_identity():
                entry |= {"kl": 0.0, **original}
    cost = {
        "candidates": meter.num_measured,
        "forward_passes": meter.forward_passes,
        "lm_head_passes": meter.lm_head_passes,
    }
    return results, cost


def measure_windows(
    model: nn.Module,
    tokens: torch.LongTensor,
    *,
    degree: int = 2,
    bypass: str = "lp",
    bypass_distance: int = 1,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The per-group costs (round 1 of :func:`search_plan`): every window of ``degree`` layers alone.

    Returns ``([{"layers", "kl", "nll", "ppl"} by first layer], cost)``; windows that mix attention
    types are left out. ``model`` is left unchanged.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
        raise ValueError(f"degree must be an integer of at least 2 (layers per group), got {degree!r}")
    meter = PlanMeter(
        model,
        tokens,
        bypass=bypass,
        bypass_distance=bypass_distance,
        batch_size=batch_size,
        progress=progress,
    )
    windows = meter.windows(degree)
    scores = meter.measure([((w,), ()) for w in windows], desc="groups") if windows else []
    cost = {
        "candidates": meter.num_measured,
        "forward_passes": meter.forward_passes,
        "lm_head_passes": meter.lm_head_passes,
    }
    return [{"layers": list(w), **s} for w, s in zip(windows, scores, strict=True)], cost


# ---------------------------------------------------------------------------------------- latency
@torch.inference_mode()
def measure_layer_times(model: nn.Module, ids: torch.LongTensor, *, reps: int = 3) -> dict:
    """Per-layer forward times (ms, median of ``reps`` after one warm-up) on one batch ``ids``.

    Returns ``{"layers_ms": [...], "other_ms": embeddings + final norm + LM head, "total_ms",
    "batch": [B, T]}``. Forward hooks time each decoder layer (synchronizing a GPU around it).
    """
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    layers = list(model.model.layers)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    starts: dict[int, float] = {}
    times: list[list[float]] = [[] for _ in layers]
    totals: list[float] = []

    def before(i):
        def hook(module, args):
            sync()
            starts[i] = time.perf_counter()

        return hook

    def after(i):
        def hook(module, args, output):
            sync()
            times[i].append((time.perf_counter() - starts[i]) * 1e3)

        return hook

    was_training = model.training
    model.eval()
    model(input_ids=ids, use_cache=False)  # warm-up: allocator, kernels
    handles = [layer.register_forward_pre_hook(before(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    try:
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            totals.append((time.perf_counter() - start) * 1e3)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers_ms = [statistics.median(t) for t in times]
    total = statistics.median(totals)
    return {
        "layers_ms": layers_ms,
        "other_ms": max(total - sum(layers_ms), 0.0),
        "total_ms": total,
        "batch": list(ids.shape),
    }


def plan_time_ms(groups: Groups, latency: dict) -> float:
    """The latency model: the rest of the model plus each effective layer's slowest original layer."""
    t = latency["layers_ms"]
    return latency["other_ms"] + sum(max(t[i] for i in e) for e in effective_layers(groups, len(t)))


def estimate_speedup(groups: Groups, latency: dict) -> float:
    return plan_time_ms((), latency) / plan_time_ms(groups, latency)


def _fastest_times(windows: list[tuple[int, ...]], latency: dict) -> list[float]:
    """Least plan time (ms) with exactly k groups drawn from ``windows``, for k = 0, 1, ... (inf: none)."""
    t = latency["layers_ms"]
    n = len(t)
    cost = {w[0]: (len(w), max(t[i] for i in w)) for w in windows}
    kmax = n
    inf = math.inf
    # best[i][k]: least time of layers i.. with exactly k groups among them.
    best = [[inf] * (kmax + 1) for _ in range(n + 1)]
    best[n][0] = 0.0
    for i in range(n - 1, -1, -1):
        for k in range(kmax + 1):
            value = t[i] + best[i + 1][k]
            if k and i in cost:
                size, c = cost[i]
                if i + size <= n:
                    value = min(value, c + best[i + size][k - 1])
            best[i][k] = value
    return [latency["other_ms"] + b for b in best[0]]


# ---------------------------------------------------------------------------------------- the search
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
            best = plan_time_ms((), latency) / min(_fastest_times(windows, latency))
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
    *,
    degree: int = 2,
    bypass: str = "lp",
    bypass_distance: int = 1,
    target_depth: int | None = None,
    speedup: float | None = None,
    max_ppl_increase: float | None = None,
    beam_width: int = 2,
    pool_size: int = 8,
    objective: str = "kl",
    batch_size: int = 4,
    latency: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SearchResult:
    """The best plan of groups of ``degree`` layers that meets one budget, by measured quality.

    Args:
        model: the original ``*ForCausalLM`` (not parallelized); it is not modified.
        tokens: calibration sequences ``(N, T)`` (e.g. :func:`cqil.recovery.data.calibration_tokens`).
        degree: layers per group (P >= 2).
        bypass, bypass_distance: the bypass mode the plan will be parallelized with
            (see :func:`cqil.parallelize`); candidates are measured with gates at its G.
        target_depth: the effective depth to reach exactly (each group removes P - 1 layers).
        speedup: the least estimated speedup (latency model, see the module docstring); the
            fewest groups that reach it, placed where they cost least.
        max_ppl_increase: the most calibration perplexity may rise, in percent; the shallowest
            plan within it.
        beam_width: plans kept from one round to the next.
        pool_size: windows (lowest round-1 cost first) tried as the next group of each kept plan.
        objective: ``"kl"`` (KL from the original's next-token distribution) or ``"ppl"``.
        batch_size: calibration sequences per forward pass.
        latency: per-layer times as :func:`measure_layer_times` returns them; measured on the first
            batch when ``None`` (pass them to make a ``speedup`` search independent of timing noise).
        seed: seeds torch's generator during the search (eval-mode models are deterministic; this
            pins any stochastic module). Ties are broken by layer index, so equal inputs give
            the same result.
        progress: show tqdm bars.

    Raises:
        BudgetError: (a ``ValueError``) naming the budget when no plan can meet it.
    """
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
        fastest = _fastest_times(windows, latency)
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
                    f"cqil plan: {k} group{'s' * (k > 1)} ({len(round_)} plans): best {_plan_text(best.groups)} "
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
                f"{_plan_text(cheapest.groups)} at {_increase(cheapest.ppl, original['ppl'])}",
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


# ---------------------------------------------------------------------------------------- the report
def write_report(
    result: SearchResult, out_dir, *, overwrite: bool = False, extra: dict | None = None
) -> Path:
    """Write ``plans.json``, ``plan.yaml`` (the recipe snippet), ``table.txt`` and ``pareto.png``."""
    out = check_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict() | (extra or {})
    write_atomic(out / "plans.json", (json.dumps(data, indent=2) + "\n").encode())
    write_atomic(out / "plan.yaml", result.recipe_snippet().encode())
    write_atomic(out / "table.txt", (result.format_table() + "\n").encode())
    write_atomic(out / "pareto.png", pareto_png(result))
    return out


def pareto_png(result: SearchResult) -> bytes:
    """Calibration KL and perplexity against effective depth: every measured plan, the front, the choice."""
    import io

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    objective = result.settings.get("objective", "kl")
    base_ppl = result.original["ppl"]
    n = result.plan.num_layers
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("kl", "ppl"), strict=True):

        def y(c: Candidate, metric=metric) -> float:
            return c.kl if metric == "kl" else c.ppl

        ax.scatter(
            [c.depth for c in result.candidates],
            [y(c) for c in result.candidates],
            s=12,
            color="0.65",
            label="measured plans",
        )
        front = sorted(result.front, key=lambda c: -c.depth)
        fx = [n] + [c.depth for c in front]
        fy = [0.0 if metric == "kl" else base_ppl] + [y(c) for c in front]
        if metric == "kl":
            fx, fy = fx[1:], fy[1:]  # KL 0 has no place on a log axis
        ax.plot(fx, fy, "-o", color="tab:blue", ms=4, label=f"Pareto front (by {objective})")
        c = result.chosen
        ax.scatter([c.depth], [y(c)], marker="*", s=220, color="tab:red", zorder=5, label="chosen")
        ax.annotate(
            _plan_text(c.groups),
            (c.depth, y(c)),
            textcoords="offset points",
            xytext=(-8, 8),
            ha="right",
            fontsize=7,
        )
        ax.set_yscale("log")
        if metric == "ppl":
            ax.axhline(base_ppl, color="0.3", ls=":", lw=1, label=f"original {base_ppl:.2f}")
            # A group at the first layers can cost orders of magnitude; keep the front readable.
            top = 2 * max(fy + [y(c)])
            hidden = sum(y(p) > top for p in result.candidates)
            ax.set_ylim(min(fy + [y(c)]) / 1.1, top)
            if hidden:
                ax.set_title(
                    f"{hidden} measured plan{'s' * (hidden > 1)} above {top:.0f} not shown", fontsize=8
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.invert_xaxis()
        ax.set_xlabel("effective depth (layers)")
        ax.set_ylabel(
            "calibration KL from the original (nats/token)" if metric == "kl" else "calibration perplexity"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    budget = ", ".join(f"{k}={v}" for k, v in result.budget.items())
    s = result.settings
    fig.suptitle(
        f"plan search: degree {s.get('degree')}, bypass {s.get('bypass')}, {budget}; "
        f"chosen depth {result.chosen.depth}, est. {result.chosen.speedup:.2f}x",
        fontsize=10,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
