"""Direction-extraction methods compared on held-out prompts, layer by layer.

:class:`MethodResult` holds one method's held-out evaluation at every analysed layer;
:func:`accuracy_bootstrap` gives a mean accuracy (or a difference of two methods) with a
percentile interval that resamples prompts within class, and the layers for the random
baseline. :func:`refit` refits a method on bootstrap resamples of the training prompts, so
an interval can include the variance of the fit as well as that of the held-out prompts.

Example:
    est = mean_accuracy(result, n_boot=1000, seed=0)
    diff = accuracy_difference(probe, mean_diff, n_boot=1000, seed=1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probes import directions as D
from probes.directions import DirectionEval, Method
from probes.stats import Estimate, FloatArray, percentile_interval

FITTED: tuple[Method, ...] = ("mean_diff", "probe", "gradient", "pca_diff")
ALL: tuple[Method, ...] = (*FITTED, "random")
N_REFIT = 20
"""Refits on resampled training prompts per method: each bootstrap replicate of a held-out
statistic uses one of them in turn, so the interval carries the fit's variance (the fits
are mean differences or small probes on cached activations: no forward pass)."""


@dataclass(frozen=True)
class Refits:
    """A method refitted on ``R`` bootstrap resamples of the training prompts (within
    class), evaluated on the same held-out prompts: per-prompt correctness and projections
    ([R, n_pos_test, k], [R, n_neg_test, k])."""

    correct_pos: np.ndarray
    correct_neg: np.ndarray
    proj_pos: FloatArray
    proj_neg: FloatArray

    @property
    def n(self) -> int:
        return int(self.correct_pos.shape[0])


def refit(method: Method, train_pos: np.ndarray, train_neg: np.ndarray, test_pos: np.ndarray,
          test_neg: np.ndarray, *, n_refit: int = N_REFIT, seed: int) -> Refits:
    """Refit ``method`` per layer on ``n_refit`` resamples (with replacement, within class)
    of the training activations ([n, k, d]) and score each refit on the held-out ones."""
    if n_refit < 1:
        raise ValueError("n_refit must be >= 1")
    rng = np.random.default_rng(seed)
    cps, cns, sps, sns = [], [], [], []
    for r in range(n_refit):
        ip = rng.integers(0, train_pos.shape[0], size=train_pos.shape[0])
        ineg = rng.integers(0, train_neg.shape[0], size=train_neg.shape[0])
        trp, trn = train_pos[ip], train_neg[ineg]
        u = D.fit_direction_per_layer(method, trp, trn, seed=seed + 1 + r)
        cp, cn = D.heldout_correct(u, trp, trn, test_pos, test_neg)
        cps.append(cp)
        cns.append(cn)
        sps.append(D.project(test_pos, u))
        sns.append(D.project(test_neg, u))
    return Refits(np.stack(cps), np.stack(cns), np.stack(sps), np.stack(sns))


@dataclass(frozen=True)
class MethodResult:
    """One method's held-out evaluation at every analysed layer that has a direction."""

    method: Method
    layers: list[int]
    evals: list[DirectionEval]
    correct_pos: np.ndarray  # [n_pos_test, k] bool
    correct_neg: np.ndarray  # [n_neg_test, k] bool
    refits: Refits | None = None  # the fit's variance; None: intervals over prompts only

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
    pos: FloatArray, neg: FloatArray, *, n_boot: int, seed: int, resample_layers: bool,
    refits: tuple[FloatArray, FloatArray] | None = None,
) -> Estimate:
    """Mean over held-out prompts and layers of per-prompt, per-layer scores ([n, k], [m, k]:
    correctness, or a difference of two methods' correctness), with a percentile bootstrap
    that resamples prompts within class and, if ``resample_layers``, the layers too (for the
    random baseline, whose directions are a random draw per layer). With ``refits``, the
    same scores after refitting on resampled training prompts ([R, n, k], [R, m, k]),
    replicate b is drawn from refit b mod R: the interval then includes the variance of
    the fit, not only that of the held-out prompts (the value stays the full fit's)."""
    n, k = pos.shape
    m = neg.shape[0]
    rp, rn = (pos[None], neg[None]) if refits is None else refits
    if rp.shape[1:] != pos.shape or rn.shape[1:] != neg.shape:
        raise ValueError(f"refit scores {rp.shape}, {rn.shape} do not match {pos.shape}, "
                         f"{neg.shape}")
    rng = np.random.default_rng(seed)
    if resample_layers:
        weights = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).T / k  # [k, B]
    else:
        weights = np.full((k, n_boot), 1.0 / k)
    which = np.arange(n_boot) % rp.shape[0]
    cols = np.arange(n_boot)[:, None]
    ip = rng.integers(0, n, size=(n_boot, n))
    ineg = rng.integers(0, m, size=(n_boot, m))
    # Per-prompt means over the replicate's layer weights, for its refit: [B, n], [B, m].
    wp = np.einsum("bnk,kb->bn", rp[which], weights)
    wn = np.einsum("bmk,kb->bm", rn[which], weights)
    reps = (wp[cols, ip].sum(axis=1) + wn[cols, ineg].sum(axis=1)) / (n + m)
    lo, hi = percentile_interval(reps)
    value = float((pos.sum() + neg.sum()) / ((n + m) * k))
    method = "bootstrap-percentile" + ("" if refits is None else
                                       f", refitting on {rp.shape[0]} training resamples")
    return Estimate(value, lo, hi, n + m, method)


def excluded_note(c: Comparison) -> str:
    """How many layers were compared, and which were left out and why."""
    if not c.excluded:
        return f"{len(next(iter(c.results.values())).layers)} layers"
    return (f"{len(next(iter(c.results.values())).layers)} layers; excluded (every prompt has "
            f"the same activation, no direction exists): {c.excluded}")


def _refit_scores(r: MethodResult) -> tuple[FloatArray, FloatArray] | None:
    if r.refits is None:
        return None
    return r.refits.correct_pos.astype(float), r.refits.correct_neg.astype(float)


def mean_accuracy(r: MethodResult, *, n_boot: int, seed: int) -> Estimate:
    """Mean held-out accuracy of ``r`` over prompts and layers, with its interval (including
    the refits' variance when ``r`` has them)."""
    return accuracy_bootstrap(r.correct_pos.astype(float), r.correct_neg.astype(float),
                              n_boot=n_boot, seed=seed,
                              resample_layers=r.method == "random", refits=_refit_scores(r))


def accuracy_difference(a: MethodResult, b: MethodResult, *, n_boot: int, seed: int
                        ) -> Estimate:
    """Mean accuracy of a minus b over layers, bootstrapped over the same held-out prompts
    (and over layers when either is the random baseline). When both have refits, refit i
    of a is paired with refit i of b (independent fits of two methods), so the interval
    includes both fits' variance."""
    ra, rb = _refit_scores(a), _refit_scores(b)
    refits = None
    if ra is not None and rb is not None:
        r = min(ra[0].shape[0], rb[0].shape[0])
        refits = (ra[0][:r] - rb[0][:r], ra[1][:r] - rb[1][:r])
    return accuracy_bootstrap(
        a.correct_pos.astype(float) - b.correct_pos, a.correct_neg.astype(float) - b.correct_neg,
        n_boot=n_boot, seed=seed,
        resample_layers="random" in (a.method, b.method), refits=refits)


def _cohens_d_rows(x: FloatArray, y: FloatArray) -> FloatArray:
    """Row-wise Cohen's d (pooled SD) of [B, n] and [B, m]; 0 where both are constant."""
    n, m = x.shape[1], y.shape[1]
    pooled = ((n - 1) * x.var(axis=1, ddof=1) + (m - 1) * y.var(axis=1, ddof=1)) / (n + m - 2)
    diff = x.mean(axis=1) - y.mean(axis=1)
    sd = np.sqrt(pooled)
    return np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), 0.0)


def polarity_d(r: MethodResult, layer_index: int, *, n_boot: int, seed: int) -> Estimate:
    """Held-out Cohen's d of ``r``'s projections at one layer (positive: harmful prompts
    project higher, the right polarity) with a percentile interval whose replicate b
    refits on training resample b mod R and resamples the held-out prompts within class:
    both the fit's and the test prompts' variance are in it."""
    if r.refits is None:
        raise ValueError("polarity_d needs a MethodResult with refits")
    sp = r.refits.proj_pos[:, :, layer_index]
    sn = r.refits.proj_neg[:, :, layer_index]
    if sp.shape[1] < 2 or sn.shape[1] < 2:
        raise ValueError("polarity_d needs >= 2 held-out prompts per class")
    rng = np.random.default_rng(seed)
    which = np.arange(n_boot) % sp.shape[0]
    ip = rng.integers(0, sp.shape[1], size=(n_boot, sp.shape[1]))
    ineg = rng.integers(0, sn.shape[1], size=(n_boot, sn.shape[1]))
    reps = _cohens_d_rows(sp[which[:, None], ip], sn[which[:, None], ineg])
    lo, hi = percentile_interval(reps)
    d = float(r.evals[layer_index].cohens_d)
    return Estimate(d, min(lo, d), max(hi, d), sp.shape[1] + sn.shape[1],
                    f"bootstrap-percentile, refitting on {sp.shape[0]} training resamples")
