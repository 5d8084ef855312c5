"""The plan search's options: one dataclass for the library, the command line and the recipe.

:func:`cqil.selection.search.search_plan` takes a :class:`SearchOptions`; ``cqil plan`` builds one
from its arguments (its defaults are the argument defaults) and the recipe's
``parallelize.search`` section converts to one (``PlanSearchConfig.options``). This module imports
nothing heavy, so the recipe can use it before torch loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OBJECTIVES = ("kl", "ppl")
BUDGETS = ("target_depth", "speedup", "max_ppl_increase")  # a search takes exactly one


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """What a plan search looks for and how hard it looks (see :func:`~cqil.selection.search.search_plan`).

    Attributes:
        degree: layers per group (P >= 2).
        bypass, bypass_distance: the bypass mode the plan will be parallelized with
            (see :func:`cqil.parallelize`); candidates are measured with gates at its G.
        target_depth: budget: the effective depth to reach exactly (each group removes P - 1 layers).
        speedup: budget: the least estimated speedup (latency model, :mod:`cqil.selection.latency`).
        max_ppl_increase: budget: the most calibration perplexity may rise, in percent.
        beam_width: plans kept from one round to the next.
        pool_size: windows (lowest round-1 cost first) tried as the next group of each kept plan.
        objective: ``"kl"`` (KL from the original's next-token distribution) or ``"ppl"``.
        batch_size: calibration sequences per forward pass.
        seed: seeds torch's generator during the search.
    """

    degree: int = 2
    bypass: str = "lp"
    bypass_distance: int = 1
    target_depth: int | None = None
    speedup: float | None = None
    max_ppl_increase: float | None = None
    beam_width: int = 2
    pool_size: int = 8
    objective: str = "kl"
    batch_size: int = 4
    seed: int = 0

    BUDGETS = BUDGETS
    OBJECTIVES = OBJECTIVES

    @property
    def budgets(self) -> dict:
        """The budgets that are set, ``{name: value}`` (a valid search has exactly one)."""
        return {k: getattr(self, k) for k in BUDGETS if getattr(self, k) is not None}

    def replace(self, **changes) -> SearchOptions:
        """A copy with ``changes``; an unknown name raises ``TypeError`` naming it."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown plan search options {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **changes)
