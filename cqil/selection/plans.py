"""The plan search's results: measured candidates, the chosen plan and its report files.

:class:`Candidate` is one measured plan, :class:`SearchResult` what
:func:`cqil.selection.search.search_plan` returns (with the plain-text table and the recipe
snippet); :func:`write_report` writes ``plans.json``, ``plan.yaml``, ``table.txt`` and
``pareto.png``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cqil.export.engines import describe_engines
from cqil.files import check_out_dir, write_atomic
from cqil.rewrite.plan import GroupPlan

Groups = tuple[tuple[int, ...], ...]


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
            f"calibration KL {c.kl:.4f}, ppl {c.ppl:.2f} ({ppl_increase(c.ppl, self.original['ppl'])})",
            "parallelize:",
            f"  groups: {json.dumps([list(g) for g in self.plan.groups])}",
            f"  bypass: {s.get('bypass', 'lp')}",
        ]
        bypass = s.get("bypass", "lp")
        if bypass == "cqil":
            lines.append(f"  bypass_distance: {s.get('bypass_distance', 1)}")
        # The search measured every gate at the mode's value; with lp, keeping them there is what lets
        # each group fold into one plain layer, the only form llama.cpp and Ollama run.
        gates = "fixed" if bypass == "lp" else "learned"
        if bypass == "lp":
            lines.append("  gates: fixed")
        lines.insert(1, f"# {describe_engines(bypass, gates)}")
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
                plan_text(c.groups),
                str(c.depth),
                f"{c.speedup:.2f}x",
                f"{c.kl:.4f}",
                f"{c.ppl:.2f}",
                ppl_increase(c.ppl, base),
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


def plan_text(groups: Groups) -> str:
    return " ".join(f"{g[0]}-{g[-1]}" for g in groups)


def ppl_increase(ppl: float, base: float) -> str:
    return f"{100 * (ppl / base - 1):+.1f}%"


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the plan column (1) reads better left-aligned
        return "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(r) for r in [header, *rows])


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
            plan_text(c.groups),
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
