"""An adaptive dose design for a steering sweep: a coarse grid, then doses next to the
fitted doses whose intervals are widest, within a fixed budget of generations.

The rule is fixed before any reply is seen and never looks at a claim's verdict:

1. **Coarse grid.** alpha = 0 and, on each side of it, the configured grid's extreme dose E
   and the grid doses nearest to E * j / COARSE_POINTS (j = 1 .. COARSE_POINTS - 1): the
   same range as the grid, with a fraction of its doses; plus any doses the caller
   requires (the benchmark's claims that read rates at fixed doses).
2. **Budget.** At most BUDGET_FRACTION of the generations the whole grid would cost (each
   dose's cost is the number of replies generated at it, so the arms generated on one side
   only count where they are generated). When the coarse grid alone does not leave room for
   one more dose, the design is the grid.
3. **Rounds.** After each round every fitted quantity (the doses at 50 % of each side, with
   their intervals) is read; on each side the quantity with the widest interval (an
   interval open on one end counts as infinitely wide) gets one new dose: the untried
   dose nearest to its point estimate on the lattice of multiples of half the grid's finest
   spacing, strictly inside the side's tried range (the next widest quantity when no
   lattice dose is left). Quantities that are not located (not reached, or already past
   50 % at alpha = 0) get no dose. The new
   doses of both sides are generated together in one batched call. Rounds stop when no
   dose fits the budget, none is asked for, or after MAX_ROUNDS.
4. **Fallback.** When no quantity is located on the coarse grid (nothing to refine: the
   fit failed or every dose is unreached), the remaining grid doses are generated and the
   design is the full grid.

Example:
    record = run_design(grid, cost, observe, targets_of)
    record.doses, record.rounds  # every dose tried and its round (0 = coarse)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from probes.errors import BenchError

DoseDesign = Literal["adaptive", "grid"]
DESIGNS: tuple[DoseDesign, ...] = ("adaptive", "grid")
Side = Literal["negative", "positive"]
BUDGET_FRACTION = 0.7
"""The adaptive design generates at most this share of the full grid's replies."""
COARSE_POINTS = 2
"""Coarse doses per side (beyond 0): at E/2 and E, so that most of the budget is left for
the doses placed where the fits are least certain."""
MAX_ROUNDS = 4
"""Rounds of added doses at most (each is one batched generation call)."""
GRID_ROUND = -1
"""The round recorded for every dose of a grid design (no coarse/adaptive split)."""


class DoseDesignError(BenchError):
    """A dose design that cannot run on the given grid."""


@dataclass(frozen=True)
class Target:
    """One fitted quantity (a dose at 50 % on one side) as the design reads it."""

    name: str
    side: Side
    value: float | None  # None: not located (not reached, baseline)
    lo: float | None
    hi: float | None

    @property
    def located(self) -> bool:
        return self.value is not None and math.isfinite(self.value)

    @property
    def width(self) -> float:
        """The interval's width in alpha (inf when a bound is missing)."""
        if self.lo is None or self.hi is None:
            return math.inf
        return abs(self.hi - self.lo)


@dataclass(frozen=True)
class DesignRecord:
    """What a design generated: every dose tried (sorted) and its round (0 coarse, k the
    k-th adaptive round, GRID_ROUND for a grid design), the budget and what was spent (in
    replies), and why the design fell back to the grid ("" when it did not)."""

    design: DoseDesign
    doses: tuple[float, ...]
    rounds: tuple[int, ...]
    budget: int
    spent: int
    full_cost: int
    fallback: str = ""
    steps: tuple[str, ...] = ()

    def round_of(self, dose: float) -> int:
        return self.rounds[self.doses.index(dose)]

    def doses_text(self, round_: int) -> str:
        """The doses of one round, comma-separated."""
        return ", ".join(f"{d:g}" for d, r in zip(self.doses, self.rounds, strict=True)
                         if r == round_)

    def text(self) -> str:
        """One line for reports: design, doses per round, cost against the grid's."""
        if self.design == "grid" or self.fallback:
            why = f" ({self.fallback})" if self.fallback else ""
            return (f"grid{why}: {len(self.doses)} doses, {self.spent} replies "
                    f"(the full grid costs {self.full_cost})")
        per_round = "; ".join(f"round {r}: {self.doses_text(r)}"
                              for r in sorted(set(self.rounds)))
        return (f"adaptive: {len(self.doses)} doses ({per_round}), {self.spent} of a "
                f"budget of {self.budget} replies ({BUDGET_FRACTION:.0%} of the full grid's "
                f"{self.full_cost})")


def check_design(name: str) -> DoseDesign:
    """``name`` as a design, or a clear error listing the designs."""
    for design in DESIGNS:
        if name == design:
            return design
    raise DoseDesignError(f"unknown dose design {name!r}",
                          f"write one of: {', '.join(DESIGNS)}")


def side_doses(grid: Sequence[float], side: Side) -> list[float]:
    """The grid's doses strictly on ``side`` of 0, ordered by |alpha|."""
    chosen = [float(a) for a in grid if (a < 0.0 if side == "negative" else a > 0.0)]
    return sorted(chosen, key=abs)


def coarse_doses(grid: Sequence[float]) -> tuple[float, ...]:
    """0 and, per side, the grid doses nearest to E * j / COARSE_POINTS (E the side's
    extreme), sorted."""
    chosen = {0.0}
    sides: tuple[Side, ...] = ("negative", "positive")
    for side in sides:
        doses = side_doses(grid, side)
        if not doses:
            continue
        for j in range(1, COARSE_POINTS + 1):
            chosen.add(nearest(doses, doses[-1] * j / COARSE_POINTS))
    return tuple(sorted(chosen))


def nearest(doses: Sequence[float], aim: float) -> float:
    """The dose nearest to ``aim`` (the smaller |dose| on a tie)."""
    return min(doses, key=lambda d: (abs(d - aim), abs(d)))


def min_gap(grid: Sequence[float]) -> float:
    """The spacing of the lattice added doses lie on: half the grid's finest spacing."""
    values = sorted({0.0, *(float(a) for a in grid)})
    spacing = min((b - a for a, b in itertools.pairwise(values)), default=0.0)
    return spacing / 2.0


def lattice_dose(target: Target, tried: Sequence[float], smallest: float) -> float | None:
    """The dose nearest to the target's estimate on the lattice of multiples of
    ``smallest`` (on its side, strictly between 0 and the side's farthest tried dose) that
    is not tried yet, or None when there is none."""
    if not target.located or smallest <= 0.0:
        return None
    assert target.value is not None
    sign = -1.0 if target.side == "negative" else 1.0
    mags = {round(abs(d), 10) for d in tried if d * sign >= 0.0}
    top = max(mags)
    steps = round(top / smallest)
    where = abs(target.value) / smallest
    free = [i for i in range(1, steps) if round(i * smallest, 10) not in mags]
    if not free:
        return None
    best = min(free, key=lambda i: (abs(i - where), i))
    return sign * round(best * smallest, 10)


def next_doses(targets: Sequence[Target], tried: Sequence[float], smallest: float,
               cost: Callable[[float], int], left: int) -> list[float]:
    """One round: per side, the widest located target's lattice dose (the next widest when
    it has none left), while the budget ``left`` allows."""
    chosen: list[float] = []
    for side in ("negative", "positive"):
        ranked = sorted((t for t in targets if t.side == side and t.located),
                        key=lambda t: (-t.width, t.name))
        for t in ranked:
            dose = lattice_dose(t, [*tried, *chosen], smallest)
            if dose is None or dose in chosen:
                continue
            if cost(dose) <= left:
                chosen.append(dose)
                left -= cost(dose)
            break
    return sorted(chosen)


def grid_record(grid: Sequence[float], cost: Callable[[float], int],
                fallback: str = "") -> DesignRecord:
    """The record of a design that generated every grid dose."""
    doses = tuple(sorted({0.0, *(float(a) for a in grid)}))
    total = sum(cost(d) for d in doses)
    design: DoseDesign = "adaptive" if fallback else "grid"
    return DesignRecord(design, doses, tuple(GRID_ROUND for _ in doses), total, total, total,
                        fallback)


def run_design(grid: Sequence[float], cost: Callable[[float], int],
               observe: Callable[[list[float]], None],
               targets_of: Callable[[tuple[float, ...]], Sequence[Target]],
               fraction: float = BUDGET_FRACTION, max_rounds: int = MAX_ROUNDS,
               required: Sequence[float] = ()) -> DesignRecord:
    """Run the adaptive design on ``grid``: ``observe(doses)`` generates and judges the
    doses (one batched call per round), ``targets_of(tried)`` fits the quantities on the
    doses tried so far. ``required`` grid doses join the coarse grid (doses that claims
    read at fixed positions). Falls back to the grid as the module docstring says."""
    full = tuple(sorted({0.0, *(float(a) for a in grid)}))
    full_cost = sum(cost(d) for d in full)
    budget = math.floor(fraction * full_cost)
    coarse = tuple(sorted({*coarse_doses(full), *(float(a) for a in required
                                                   if float(a) in full)}))
    spent = sum(cost(d) for d in coarse)
    smallest = min_gap(full)
    if spent + min((cost(d) for d in full if d not in coarse), default=full_cost) > budget:
        observe(list(full))
        return grid_record(full, cost, f"the coarse grid ({len(coarse)} of {len(full)} "
                                       f"doses) leaves no room for an adaptive dose within "
                                       f"{fraction:.0%} of the grid's replies")
    observe(list(coarse))
    tried = {d: 0 for d in coarse}
    targets = targets_of(tuple(sorted(tried)))
    if not any(t.located for t in targets):
        observe([d for d in full if d not in tried])
        return grid_record(full, cost, "no dose at 50 % is located on the coarse grid: "
                                       "nothing to refine")
    steps: list[str] = []
    for r in range(1, max_rounds + 1):
        new = next_doses(targets, tuple(tried), smallest, cost, budget - spent)
        if not new:
            break
        widest = max((t for t in targets if t.located), key=lambda t: t.width)
        steps.append(f"round {r}: {', '.join(f'{d:g}' for d in new)} (widest interval: "
                     f"{widest.name} {widest.side}, width {widest.width:.3g})")
        observe(new)
        spent += sum(cost(d) for d in new)
        tried.update({d: r for d in new})
        targets = targets_of(tuple(sorted(tried)))
    doses = tuple(sorted(tried))
    return DesignRecord("adaptive", doses, tuple(tried[d] for d in doses), budget, spent,
                        full_cost, "", tuple(steps))
