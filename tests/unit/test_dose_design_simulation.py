"""The adaptive dose design (``probes.dose_design``) against the full grid, on planted
dose-response curves: numpy only, no model.

Each replicate plants, on one side of alpha = 0, two logistic curves per prompt (an
intended effect and degeneracy) with a random intercept per prompt, so that the
population curve crosses 50 % exactly at the planted ED50 / TD50. Both designs see the
same replies at the doses they share; the dose at 50 % and its interval come from
``probes.stats.ed_by_prompt`` (the benchmark's prompt bootstrap).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import scipy.special

from probes import dose_design as dd
from probes.dose_response import PromptResampling, dose50

GRID = tuple(round(0.25 * i, 10) for i in range(9))  # one side of the full profile's grid
N_PROMPTS = 20
SPREAD = 1.0  # SD of the per-prompt random intercept (logit scale)
SLOPES = (2.0, 8.0)  # planted slopes per unit alpha, drawn uniformly
CENTRES = (0.4, 1.6)  # planted ED50 / TD50, drawn uniformly inside the grid
N_BOOT = 200
REPLICATES = 200
QUANTITIES = ("ED50", "TD50")
WIDTH_RATIO_MAX = 1.0
"""The target: no wider than the grid's at the median, for at most 70 % of its replies."""
COVERAGE = (0.90, 0.98)
"""The target for a 95 % interval: cover the planted doses in 90-98 % of the replicates."""
SHORTFALL = ("the adaptive design misses this target (seed 7: median width ratio 1.01, "
             "coverage 0.873 against the grid's 0.925 on the same replies: the doses are placed "
             "where the same replies put the estimate, which the prompt bootstrap does not "
             "account for); that is why no profile uses it by default")


class Planted:
    """One replicate: per quantity a centre, a slope and per-prompt intercepts; replies at a
    dose are drawn once and shared by every design that asks for that dose."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.seed = int(rng.integers(2**31))
        self.truth = {q: (rng.uniform(*CENTRES), rng.uniform(*SLOPES),
                          rng.normal(0.0, SPREAD, N_PROMPTS)) for q in QUANTITIES}
        self.replies: dict[float, dict[str, npt.NDArray[np.bool_]]] = {}
        self.fits: dict[tuple[float, ...], list[dd.Target]] = {}

    def observe(self, doses: list[float]) -> None:
        for d in doses:
            if d not in self.replies:
                self.replies[d] = {
                    q: self.rng.random(N_PROMPTS) < scipy.special.expit(s * (d - c) + u)
                    for q, (c, s, u) in self.truth.items()}

    def targets(self, doses: tuple[float, ...]) -> list[dd.Target]:
        if doses not in self.fits:
            a = np.array(doses)
            out = []
            for q in QUANTITIES:
                y = np.stack([self.replies[d][q] for d in doses], axis=1)
                d = dose50(q, "positive", a, y.sum(axis=0), np.full(a.size, N_PROMPTS),
                           np.arange(a.size), by_prompt=PromptResampling(y, N_BOOT, self.seed))
                ok = d.ok and d.value is not None
                out.append(dd.Target(q, "positive", d.value if ok else None, d.lo, d.hi))
            self.fits[doses] = out
        return self.fits[doses]


def covers(t: dd.Target, truth: float) -> bool:
    """Whether a located target's interval (an open end counts as unbounded) holds truth."""
    lo = -np.inf if t.lo is None else t.lo
    hi = np.inf if t.hi is None else t.hi
    return t.located and lo <= truth <= hi


def simulate(seed: int, replicates: int) -> dict[str, Any]:
    """Per replicate and quantity: the width ratio (adaptive / grid; 1 when both are
    equally open) and whether each design's interval covers the planted dose; and the most
    replies the adaptive design generated in a replicate, and how often it fell back."""
    rng = np.random.default_rng(seed)
    ratios, cov_a, cov_g, spent, fallbacks = [], [], [], 0, 0
    for _ in range(replicates):
        sim = Planted(rng)
        record = dd.run_design(GRID, lambda _d: N_PROMPTS, sim.observe, sim.targets)
        spent = max(spent, record.spent)
        fallbacks += bool(record.fallback)
        adaptive = sim.targets(record.doses)
        sim.observe(list(GRID))
        grid = sim.targets(GRID)
        for a, g in zip(adaptive, grid, strict=True):
            truth = sim.truth[a.name][0]
            cov_a.append(covers(a, truth))
            cov_g.append(covers(g, truth))
            ratios.append(1.0 if a.width == g.width else a.width / g.width)
    return {"ratio": np.array(ratios), "cover_adaptive": np.array(cov_a),
            "cover_grid": np.array(cov_g), "spent": spent, "fallbacks": fallbacks}


pytestmark = pytest.mark.slow  # 200 replicates of prompt-bootstrap fits: about 30 s


@pytest.fixture(scope="module")
def simulated() -> dict[str, Any]:
    return simulate(7, REPLICATES)


def test_adaptive_design_stays_within_its_budget(simulated: dict[str, Any]) -> None:
    assert simulated["spent"] <= dd.BUDGET_FRACTION * len(GRID) * N_PROMPTS
    assert simulated["fallbacks"] < REPLICATES // 10


@pytest.mark.xfail(strict=True, reason=SHORTFALL)
def test_adaptive_intervals_are_no_wider_than_the_grids(simulated: dict[str, Any]) -> None:
    """Criterion: the median over replicates and quantities of (adaptive width / grid
    width) is at most WIDTH_RATIO_MAX, for at most 70 % of the grid's replies."""
    ratio = simulated["ratio"]
    assert np.median(ratio) <= WIDTH_RATIO_MAX, np.quantile(ratio, [0.25, 0.5, 0.75])


def test_grid_intervals_cover_the_planted_doses(simulated: dict[str, Any]) -> None:
    assert 0.90 <= simulated["cover_grid"].mean() <= 0.98, simulated["cover_grid"].mean()


@pytest.mark.xfail(strict=True, reason=SHORTFALL)
def test_adaptive_intervals_cover_the_planted_doses(simulated: dict[str, Any]) -> None:
    """Criterion: the adaptive design's 95 % intervals cover the planted ED50 and TD50 in
    COVERAGE of the replicates (a dose not located counts as a miss), and the grid's, on
    the same replies, in 90-98 %."""
    cover = simulated["cover_adaptive"]
    grid = simulated["cover_grid"]
    assert COVERAGE[0] <= cover.mean() <= COVERAGE[1], (cover.mean(), grid.mean())


if __name__ == "__main__":
    t0 = time.perf_counter()
    out = simulate(7, REPLICATES)
    r = out["ratio"]
    print(f"median ratio {np.median(r):.4f}, quartiles {np.quantile(r, [0.25, 0.75])}, "
          f"coverage adaptive {out['cover_adaptive'].mean():.3f} grid "
          f"{out['cover_grid'].mean():.3f}, spent {out['spent']} of {len(GRID) * N_PROMPTS}, "
          f"fallbacks {out['fallbacks']}, {time.perf_counter() - t0:.1f}s")
