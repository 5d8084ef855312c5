"""Measuring candidate plans on calibration tokens, reusing the hidden states they share.

:class:`PlanMeter` runs the original model once per calibration batch, keeps its hidden states
at the layer boundaries the candidates need, and runs each candidate only from the first layer
where it differs from the nearest trajectory already computed: layers before it are never
recomputed. A candidate is evaluated in place: the model's layer list is swapped for the
candidate's (the original layer modules, and groups that are views over them) and put back
afterwards; no weight is copied and the model is left bit-identical. :func:`measure_plans` and
:func:`measure_windows` are the one-shot entries (a list of plans, every window of ``degree``
layers alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cqil.rewrite.group import BYPASS_MODES, BranchGroup, effective_layers
from cqil.rewrite.plan import GroupPlan
from cqil.rewrite.surgery import check_supported, is_parallelized
from cqil.selection.plans import Groups


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
        variants: dict[str, Callable[[tuple[int, ...]], nn.Module]] | None = None,
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
        # A job may name a variant: how its groups are built (another bypass mode, an averaged
        # layer, ...) from the group's original layer indices; None is a BranchGroup view as above.
        self.variants = dict(variants or {})
        self._groups: dict[tuple[str | None, tuple[int, ...]], nn.Module] = {}
        self.original: dict | None = None  # {"ppl", "nll", "tokens"}, filled in by measure()
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
    def bypass_variant(self, bypass: str, bypass_distance: int = 1) -> Callable[[tuple[int, ...]], nn.Module]:
        """A variant (for ``variants``) whose groups are views with gates fixed at ``bypass``'s G."""
        if bypass not in BYPASS_MODES:
            raise ValueError(f"bypass must be one of {', '.join(map(repr, BYPASS_MODES))}; got {bypass!r}")
        options = dict(self.group_options, bypass=bypass, bypass_distance=bypass_distance)
        return lambda indices: self._branch_group(indices, options)

    def _branch_group(self, indices: tuple[int, ...], options: dict) -> nn.Module:
        attn = self.layers[indices[0]].self_attn
        # Mistral reads its window from the config; Qwen2/3 set it per layer (as in the surgery).
        window = getattr(attn, "sliding_window", getattr(self.config, "sliding_window", None))
        layers = [self.layers[i] for i in indices]
        return BranchGroup(layers, self.config, indices[0], indices, sliding_window=window, **options)

    def _module(self, indices: tuple[int, ...], variant: str | None = None) -> nn.Module:
        if len(indices) == 1:
            return self.layers[indices[0]]
        key = (variant, indices)
        if key not in self._groups:
            build = self.variants[variant] if variant is not None else None
            group = build(indices) if build else self._branch_group(indices, self.group_options)
            self._groups[key] = group.eval()
        return self._groups[key]

    @contextmanager
    def _rewired(self, effective: list[tuple[int, ...]], variant: str | None = None):
        base, config = self.model.model, self.config
        saved = base.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
        base.layers = nn.ModuleList([self._module(e, variant) for e in effective])
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

    def _run(
        self,
        state: torch.Tensor,
        effective: list[tuple[int, ...]],
        capture: set[int],
        logits: bool,
        variant: str | None = None,
    ):
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

        with self._rewired(effective, variant) as modules:
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
    def measure(self, jobs: Sequence[tuple], *, desc: str = "measure") -> list[dict]:
        """KL from the original and NLL on the tokens of each ``(plan, reference)``, in order.

        A job may be ``(plan, reference, variant)``: the plan's groups are then built by
        ``variants[variant]`` (the reference's trajectory is always the default one). The original
        model's perplexity on the tokens is left in :attr:`original`.
        """
        variant_of = [job[2] if len(job) > 2 else None for job in jobs]
        unknown = sorted({v for v in variant_of if v is not None and v not in self.variants})
        if unknown:
            raise ValueError(f"unknown variants {unknown}; this meter has {sorted(self.variants)}")
        jobs = [(job[0], job[1]) for job in jobs]
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
        count, original_nll = 0, 0.0
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
                # One sequence at a time: the float32 temporaries stay one sequence's (T x vocab).
                p = torch.empty(targets.shape + logits.shape[-1:], dtype=torch.float32, device=logits.device)
                neg_entropy = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
                for b in range(len(ids)):
                    logp = F.log_softmax(logits[b, :-1].float(), dim=-1)
                    p[b] = logp.exp()
                    neg_entropy[b] = (p[b] * logp).sum(-1)
                    original_nll -= logp.gather(-1, targets[b, :, None]).sum().item()
                    del logp
                del logits
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
                    out = self._run(source[s], tail, set(), logits=True, variant=variant_of[n])[1]
                    for b in range(len(ids)):
                        logq = F.log_softmax(out[b, :-1].float(), dim=-1)
                        sums[n][0] += (neg_entropy[b] - (p[b] * logq).sum(-1)).sum().item()
                        sums[n][1] -= logq.gather(-1, targets[b, :, None]).sum().item()
                        del logq
                    del out
                    bar.update(1)
                count += targets.numel()
                del states, trajectories, p, neg_entropy
        finally:
            bar.close()
            self.model.train(was_training)
        self.num_measured += len(jobs)
        self.original = {"ppl": math.exp(original_nll / count), "nll": original_nll / count, "tokens": count}
        return [{"kl": kl / count, "nll": nll / count, "ppl": math.exp(nll / count)} for kl, nll in sums]

    @torch.inference_mode()
    def measure_original(self) -> dict:
        """Perplexity of the original model on the tokens (``{"ppl", "nll"}``)."""
        total, count = 0.0, 0
        batches = range(0, len(self.tokens), self.batch_size)
        for begin in tqdm(batches, desc="original", unit="batch", disable=not self.progress, leave=False):
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
