"""Direction-extraction methods compared on held-out prompts, layer by layer.

:class:`MethodResult` holds one method's held-out evaluation at every analysed layer;
:func:`accuracy_bootstrap` gives a mean accuracy (or a difference of two methods) with a
percentile interval that resamples prompts within class, and the layers for the random
baseline.

Example:
    est = mean_accuracy(result, n_boot=1000, seed=0)
    diff = accuracy_difference(probe, mean_diff, n_boot=1000, seed=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes.directions import DirectionEval, Method
from probes.stats import Estimate, FloatArray, percentile_interval

FITTED: tuple[Method, ...] = ("mean_diff", "probe", "gradient", "pca_diff")
ALL: tuple[Method, ...] = (*FITTED, "random")


@dataclass(frozen=True)
class MethodResult:
    """One method's held-out evaluation at every analysed layer that has a direction."""

    method: Method
    layers: list[int]
    evals: list[DirectionEval]
    correct_pos: np.ndarray  # [n_pos_test, k] bool
    correct_neg: np.ndarray  # [n_neg_test, k] bool

    @property
    def accuracy(self) -> FloatArray:
        return np.array([e.accuracy for e in self.evals])

    @property
    def d(self) -> FloatArray:
        return np.array([e.cohens_d for e in self.evals])

    @property
    def polarity_failures(self) -> int:
        return sum(not e.polarity_correct for e in self.evals)


@dataclass(frozen=True)
class Comparison:
    """Every method's result, the layers left out (no direction) and the sample sizes."""

    results: dict[str, MethodResult]
    excluded: list[int]  # analysed layers without a direction
    n_test: int
    n_train: int


def accuracy_bootstrap(
    pos: FloatArray, neg: FloatArray, *, n_boot: int, seed: int, resample_layers: bool
) -> Estimate:
    """Mean over held-out prompts and layers of per-prompt, per-layer scores ([n, k], [m, k]:
    correctness, or a difference of two methods' correctness), with a percentile bootstrap
    that resamples prompts within class and, if ``resample_layers``, the layers too (for the
    random baseline, whose directions are a random draw per layer)."""
    n, k = pos.shape
    m = neg.shape[0]
    rng = np.random.default_rng(seed)
    if resample_layers:
        weights = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).T / k  # [k, B]
    else:
        weights = np.full((k, n_boot), 1.0 / k)
    wp, wn = pos @ weights, neg @ weights  # [n, B], [m, B] per-prompt means over layers
    cols = np.arange(n_boot)[:, None]
    ip = rng.integers(0, n, size=(n_boot, n))
    ineg = rng.integers(0, m, size=(n_boot, m))
    reps = (wp[ip, cols].sum(axis=1) + wn[ineg, cols].sum(axis=1)) / (n + m)
    lo, hi = percentile_interval(reps)
    value = float((pos.sum() + neg.sum()) / ((n + m) * k))
    return Estimate(value, lo, hi, n + m, "bootstrap-percentile")


def excluded_note(c: Comparison) -> str:
    """How many layers were compared, and which were left out and why."""
    if not c.excluded:
        return f"{len(next(iter(c.results.values())).layers)} layers"
    return (f"{len(next(iter(c.results.values())).layers)} layers; excluded (every prompt has "
            f"the same activation, no direction exists): {c.excluded}")


def mean_accuracy(r: MethodResult, *, n_boot: int, seed: int) -> Estimate:
    """Mean held-out accuracy of ``r`` over prompts and layers, with its interval."""
    return accuracy_bootstrap(r.correct_pos.astype(float), r.correct_neg.astype(float),
                              n_boot=n_boot, seed=seed,
                              resample_layers=r.method == "random")


def accuracy_difference(a: MethodResult, b: MethodResult, *, n_boot: int, seed: int
                        ) -> Estimate:
    """Mean accuracy of a minus b over layers, bootstrapped over the same held-out prompts
    (and over layers when either is the random baseline)."""
    return accuracy_bootstrap(
        a.correct_pos.astype(float) - b.correct_pos, a.correct_neg.astype(float) - b.correct_neg,
        n_boot=n_boot, seed=seed,
        resample_layers="random" in (a.method, b.method))
