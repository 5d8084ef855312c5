"""Group plans: which consecutive layers of a model run as one parallel group.

A plan is plain data: a list of groups, each a list of consecutive original layer indices.
Layers in no group stay sequential. Plans are written either as range specs ("12-30:2", layers
12..29 cut into consecutive pairs; several ranges joined by commas) or as explicit lists
(``[[12, 13], [14, 15, 16]]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cqil.errors import PlanError

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class GroupPlan:
    """A validated grouping of a model's ``num_layers`` decoder layers.

    ``groups`` holds tuples of original layer indices, sorted by position. Build plans with
    :meth:`parse`; the constructor validates too, so a ``GroupPlan`` is always consistent.
    """

    groups: tuple[tuple[int, ...], ...]
    num_layers: int

    def __post_init__(self) -> None:
        groups = tuple(tuple(int(i) for i in g) for g in self.groups)
        object.__setattr__(self, "groups", tuple(sorted(groups, key=lambda g: g[0] if g else -1)))
        _validate(self.groups, self.num_layers)

    # ----------------------------------------------------------------- construction
    @classmethod
    def parse(cls, spec: str | Sequence[Sequence[int]] | GroupPlan, num_layers: int) -> GroupPlan:
        """Parse ``"S-E:P"`` (commas join several ranges), a list of index lists, or ``[]``."""
        if isinstance(spec, GroupPlan):
            if spec.num_layers != num_layers:
                raise PlanError(f"plan was made for {spec.num_layers} layers but the model has {num_layers}")
            return spec
        if isinstance(spec, str):
            return cls(_parse_ranges(spec), num_layers)
        if isinstance(spec, Iterable):
            groups = []
            for n, group in enumerate(spec):
                if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                    raise PlanError(f"group #{n} must be a list of layer indices, got {group!r}")
                indices = list(group)
                for i in indices:
                    if isinstance(i, bool) or not isinstance(i, int):
                        raise PlanError(f"group #{n} {indices}: layer index {i!r} is not an integer")
                groups.append(tuple(indices))
            return cls(tuple(groups), num_layers)
        raise PlanError(f"a plan is a 'S-E:P' string or a list of layer-index lists, got {spec!r}")

    @classmethod
    def from_dict(cls, data: dict) -> GroupPlan:
        return cls(tuple(tuple(g) for g in data["groups"]), int(data["num_layers"]))

    def to_dict(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "num_layers": self.num_layers}

    # ----------------------------------------------------------------- views
    @property
    def num_layers_after(self) -> int:
        """Effective (sequential) depth once every group runs as one layer."""
        return self.num_layers - sum(len(g) - 1 for g in self.groups)

    @property
    def ideal_speedup(self) -> float:
        """L / L_eff: the depth ratio, an upper bound on the latency gain of the layers alone."""
        return self.num_layers / self.num_layers_after

    def effective_layers(self) -> list[tuple[int, ...]]:
        """One entry per effective layer, in order: the original indices it runs (one for ungrouped layers)."""
        # Imported here: cqil.rewrite.group needs torch and transformers, which reading a plan (or a recipe) does not.
        from cqil.rewrite.group import effective_layers

        return effective_layers(self.groups, self.num_layers)

    def is_identity(self) -> bool:
        return all(len(g) == 1 for g in self.groups)

    def layers_after(self, n: int) -> list[int]:
        """The original indices of the ``n`` layers right after the last group (ungrouped: each is
        an effective layer of its own)."""
        if n <= 0:
            return []
        start = max(i for g in self.groups for i in g) + 1
        if start + n > self.num_layers:
            raise PlanError(
                f"{n} layers after the last group: the plan {self} leaves {self.num_layers - start} of "
                f"the model's {self.num_layers} after it"
            )
        return list(range(start, start + n))

    def __str__(self) -> str:
        return str([list(g) for g in self.groups])


def _parse_ranges(spec: str) -> tuple[tuple[int, ...], ...]:
    spec = spec.strip()
    if spec in ("", "[]", "none"):
        return ()
    groups: list[tuple[int, ...]] = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise PlanError(f"plan range {part.strip()!r} is not of the form 'S-E:P' (e.g. '12-30:2')")
        start, end, degree = (int(x) for x in m.groups())
        if degree < 1:
            raise PlanError(f"plan range {part.strip()!r}: degree P={degree} must be at least 1")
        if end <= start:
            raise PlanError(f"plan range {part.strip()!r}: end {end} must be greater than start {start}")
        if (end - start) % degree:
            raise PlanError(
                f"plan range {part.strip()!r}: {end - start} layers ({start}..{end - 1}) "
                f"are not a multiple of the degree {degree}"
            )
        groups.extend(tuple(range(s, s + degree)) for s in range(start, end, degree))
    return tuple(groups)


def _validate(groups: tuple[tuple[int, ...], ...], num_layers: int) -> None:
    if num_layers < 1:
        raise PlanError(f"num_layers must be positive, got {num_layers}")
    owner: dict[int, tuple[int, ...]] = {}
    for group in groups:
        if not group:
            raise PlanError("a plan group is empty: every group needs at least one layer")
        for i in group:
            if not 0 <= i < num_layers:
                raise PlanError(
                    f"group {list(group)}: layer index {i} is out of range (the model has layers 0..{num_layers - 1})"
                )
        for a, b in zip(group[:-1], group[1:], strict=True):
            if b != a + 1:
                raise PlanError(f"group {list(group)}: layers must be consecutive ({a} is followed by {b})")
        for i in group:
            if i in owner:
                raise PlanError(f"groups {list(owner[i])} and {list(group)} overlap at layer {i}")
            owner[i] = group
