"""Statistics used everywhere in the suite (numpy / scipy / statsmodels only).

Conventions
-----------
* Every interval is two-sided at confidence ``conf`` (default 0.95).
* Random state enters only through an explicit ``seed`` (an ``int`` or a
  ``numpy.random.Generator``); no function touches global random state.
* Functions never return a silently wrong number: an undefined quantity is
  ``nan`` (documented per function) or, for the dose-response fit, an explicit
  status with a reason and no value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.special
import scipy.stats
import statsmodels.api as sm
from statsmodels.stats.multitest import multipletests
from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Seed = int | np.random.Generator

__all__ = [
    "BoolArray",
    "DoseEstimate",
    "DoseResponseFit",
    "DoseStatus",
    "Estimate",
    "FitStatus",
    "FloatArray",
    "IntArray",
    "Seed",
    "auc",
    "auc_interval",
    "benjamini_hochberg",
    "bootstrap_ci",
    "clopper_pearson",
    "cohens_d",
    "ed_by_prompt",
    "fisher_exact",
    "fit_dose_response",
    "gini",
    "holm",
    "mcnemar_exact_p",
    "mean_ci",
    "paired_rate_difference",
    "percentile_interval",
    "rate",
    "resample_within_groups",
    "rng_from",
    "rogan_gladen",
    "spearman",
    "welch_t",
    "wilson_interval",
]


# --------------------------------------------------------------------------- basics


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval.

    ``n`` is the number of observations behind the estimate (trials for a rate,
    pooled sample size for a two-group statistic); ``method`` names how the
    interval was obtained (e.g. ``"wilson"``, ``"bootstrap-percentile"``).
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str
    conf: float = 0.95

    def contains(self, x: float) -> bool:
        """True when ``lo <= x <= hi``."""
        return self.lo <= x <= self.hi


def rng_from(seed: Seed) -> np.random.Generator:
    """A Generator from an explicit seed; a Generator passes through unchanged."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int or numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


def _as_1d(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _z(conf: float) -> float:
    _check_conf(conf)
    return float(scipy.stats.norm.ppf(0.5 + conf / 2.0))


def _check_conf(conf: float) -> None:
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must be in (0, 1), got {conf}")


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


# --------------------------------------------------------------------------- rates


def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n; (0, 1) when n == 0."""
    _check_counts(k, n)
    if n == 0:
        return (0.0, 1.0)
    z = _z(conf)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def clopper_pearson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval for k/n from beta quantiles; (0, 1) when n == 0."""
    _check_counts(k, n)
    _check_conf(conf)
    if n == 0:
        return (0.0, 1.0)
    a = (1.0 - conf) / 2.0
    lo = 0.0 if k == 0 else float(scipy.stats.beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(scipy.stats.beta.ppf(1.0 - a, k + 1, n - k))
    return (lo, hi)


def rate(
    k: int,
    n: int,
    conf: float = 0.95,
    method: Literal["wilson", "clopper_pearson"] = "wilson",
) -> Estimate:
    """k/n as an :class:`Estimate` (value ``nan`` when n == 0, interval (0, 1))."""
    lo, hi = wilson_interval(k, n, conf) if method == "wilson" else clopper_pearson(k, n, conf)
    value = k / n if n > 0 else math.nan
    return Estimate(value=value, lo=lo, hi=hi, n=n, method=method, conf=conf)


# --------------------------------------------------------------------------- two groups


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, conf: float = 0.95
                        ) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid score interval (method 10, from Wilson intervals).
    For positively correlated (paired) data it is conservative."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, conf)
    l2, u2 = wilson_interval(k2, n2, conf)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def mcnemar_one_sided_p(before: np.ndarray, after: np.ndarray, direction: str) -> float:
    """Exact one-sided McNemar p on paired outcomes (the same prompts before and after);
    ``direction`` "drop" tests fewer positives after, anything else more."""
    b = int(np.sum(before & ~after))  # refused before only
    c = int(np.sum(~before & after))  # refused after only
    if b + c == 0:
        return 1.0
    k = b if direction == "drop" else c
    return float(scipy.stats.binomtest(k, b + c, 0.5, alternative="greater").pvalue)


def welch_t(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[float, float]:
    """Welch's unequal-variance t-test, two-sided: (t, p). t > 0 when mean(a) > mean(b).

    ``nan`` when a group has fewer than 2 values or both variances are zero.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size < 2 or y.size < 2:
        return (math.nan, math.nan)
    if np.var(x) == 0.0 and np.var(y) == 0.0:
        return (math.nan, math.nan)
    res = scipy.stats.ttest_ind(x, y, equal_var=False)
    return (float(res.statistic), float(res.pvalue))


def cohens_d(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """(mean(a) - mean(b)) / sqrt((s_a^2 + s_b^2) / 2), sample SDs with ddof=1.

    The unweighted pooled SD of docs/science.md. ``nan`` when a group has < 2 values or
    when the pooled SD and the mean difference are both zero; ``±inf`` when only
    the pooled SD is zero.
    """
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if x.size < 2 or y.size < 2:
        return math.nan
    diff = float(x.mean() - y.mean())
    sd = math.sqrt((float(x.var(ddof=1)) + float(y.var(ddof=1))) / 2.0)
    if sd == 0.0:
        return math.nan if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / sd


def auc(pos_scores: npt.ArrayLike, neg_scores: npt.ArrayLike) -> float:
    """ROC AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann–Whitney U / (n_pos n_neg))."""
    x, y = _as_1d(pos_scores, "pos_scores"), _as_1d(neg_scores, "neg_scores")
    if x.size == 0 or y.size == 0:
        return math.nan
    return float(_auc_rows(x[None, :], y[None, :])[0])


def _auc_rows(x: FloatArray, y: FloatArray) -> FloatArray:
    """Row-wise AUC for [B, n_pos] and [B, n_neg] score arrays (mid-ranks for ties)."""
    n1, n2 = x.shape[1], y.shape[1]
    ranks = scipy.stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    u = ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0
    return np.asarray(u / (n1 * n2), dtype=np.float64)


def auc_interval(
    pos_scores: npt.ArrayLike,
    neg_scores: npt.ArrayLike,
    *,
    conf: float = 0.95,
    method: Literal["hanley_mcneil", "bootstrap"] = "hanley_mcneil",
    n_boot: int = 2000,
    seed: Seed | None = None,
) -> Estimate:
    """AUC with an interval.

    ``hanley_mcneil``: Wald interval with the Hanley & McNeil (1982) standard error,
    clipped to [0, 1] (degenerate, width 0, at AUC 0 or 1).
    ``bootstrap``: stratified percentile bootstrap (resample positives and
    negatives separately); needs ``seed``.
    """
    x, y = _as_1d(pos_scores, "pos_scores"), _as_1d(neg_scores, "neg_scores")
    a = auc(x, y)
    n = int(x.size + y.size)
    if math.isnan(a):
        return Estimate(math.nan, math.nan, math.nan, n, method, conf)
    if method == "hanley_mcneil":
        n1, n2 = x.size, y.size
        q1 = a / (2.0 - a)
        q2 = 2.0 * a * a / (1.0 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
        half = _z(conf) * math.sqrt(max(var, 0.0))
        return Estimate(a, max(0.0, a - half), min(1.0, a + half), n, "hanley_mcneil", conf)
    if seed is None:
        raise ValueError("auc_interval(method='bootstrap') needs an explicit seed")
    _check_conf(conf)
    rng = rng_from(seed)
    ix = rng.integers(0, x.size, size=(n_boot, x.size))
    iy = rng.integers(0, y.size, size=(n_boot, y.size))
    reps = _auc_rows(x[ix], y[iy])
    lo, hi = percentile_interval(reps, conf)
    return Estimate(a, lo, hi, n, "bootstrap-percentile", conf)


def fisher_exact(
    k1: int,
    n1: int,
    k2: int,
    n2: int,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> tuple[float, float]:
    """Fisher's exact test on [[k1, n1-k1], [k2, n2-k2]]: (sample odds ratio, p).

    ``alternative="greater"`` tests whether group 1 has the higher rate of
    "successes" (e.g. refusals before > refusals after abliteration). The odds
    ratio is the sample (unconditional) one, k1 (n2-k2) / ((n1-k1) k2), and may be
    0, inf or nan when a cell is zero.
    """
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    res = scipy.stats.fisher_exact(table, alternative=alternative)
    return (float(res.statistic), float(res.pvalue))


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Spearman rank correlation, two-sided p: (rho, p); nan for constant input."""
    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    if a.size != b.size:
        raise ValueError("x and y must have equal length")
    if a.size < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return (math.nan, math.nan)
    res = scipy.stats.spearmanr(a, b)
    return (float(res.statistic), float(res.pvalue))


# --------------------------------------------------------------------------- multiplicity


def _adjust(pvals: npt.ArrayLike, method: str) -> FloatArray:
    p = np.asarray(pvals, dtype=np.float64)
    shape = p.shape
    flat = p.ravel()
    if flat.size == 0:
        return np.zeros(shape, dtype=np.float64)
    if np.any((flat[~np.isnan(flat)] < 0) | (flat[~np.isnan(flat)] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    missing = np.isnan(flat)
    # A missing p-value still counts as a test (conservative): it enters as 1.0.
    filled = np.where(missing, 1.0, flat)
    adj = np.asarray(multipletests(filled, method=method)[1], dtype=np.float64)
    adj[missing] = np.nan
    return adj.reshape(shape)


def holm(pvals: npt.ArrayLike) -> FloatArray:
    """Holm step-down adjusted p-values (statsmodels ``multipletests``).

    NaN inputs count as tests with p = 1 and come back as NaN.
    """
    return _adjust(pvals, "holm")


def benjamini_hochberg(pvals: npt.ArrayLike) -> FloatArray:
    """Benjamini–Hochberg FDR-adjusted p-values (``multipletests``, ``fdr_bh``).

    NaN inputs count as tests with p = 1 and come back as NaN.
    """
    return _adjust(pvals, "fdr_bh")


# --------------------------------------------------------------------------- bootstrap


def percentile_interval(replicates: npt.ArrayLike, conf: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; (nan, nan) if any replicate is nan."""
    _check_conf(conf)
    r = np.asarray(replicates, dtype=np.float64).ravel()
    if r.size == 0 or np.any(np.isnan(r)):
        return (math.nan, math.nan)
    a = (1.0 - conf) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return (float(lo), float(hi))


def resample_within_groups(groups: npt.ArrayLike, n_boot: int, seed: Seed) -> IntArray:
    """[n_boot, n] bootstrap indices resampling with replacement inside each group.

    Row b lists, for every original position i, a random index drawn from the
    same group as i, so group sizes are preserved in every replicate.
    """
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError("groups must be 1-D")
    rng = rng_from(seed)
    out = np.empty((n_boot, g.size), dtype=np.int64)
    for label in np.unique(g):
        members = np.flatnonzero(g == label)
        draw = rng.integers(0, members.size, size=(n_boot, members.size))
        out[:, members] = members[draw]
    return out


def bootstrap_ci(
    data: npt.ArrayLike | tuple[npt.ArrayLike, ...],
    statistic: Callable[..., float],
    *,
    n_boot: int = 2000,
    seed: Seed,
    conf: float = 0.95,
    paired: bool = False,
) -> Estimate:
    """Percentile bootstrap interval for ``statistic``.

    ``data`` is one array (resampled along axis 0, ``statistic(x)``) or a tuple of
    arrays (``statistic(*arrays)``). For a tuple, each array is resampled
    independently (independent groups) unless ``paired=True``, in which case the
    same row indices are used for all arrays (they must have equal length).
    The interval is (nan, nan) if the statistic is nan on any replicate.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = rng_from(seed)
    arrays = (
        tuple(np.asarray(a, dtype=np.float64) for a in data)
        if isinstance(data, tuple)
        else (np.asarray(data, dtype=np.float64),)
    )
    sizes = [a.shape[0] for a in arrays]
    if any(s == 0 for s in sizes):
        raise ValueError("bootstrap_ci needs non-empty arrays")
    if paired and len(set(sizes)) != 1:
        raise ValueError("paired bootstrap needs arrays of equal length")
    value = float(statistic(*arrays))
    reps = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        if paired:
            idx = rng.integers(0, sizes[0], size=sizes[0])
            sample = tuple(a[idx] for a in arrays)
        else:
            sample = tuple(a[rng.integers(0, a.shape[0], size=a.shape[0])] for a in arrays)
        reps[b] = float(statistic(*sample))
    lo, hi = percentile_interval(reps, conf)
    return Estimate(value, lo, hi, int(sum(sizes)), "bootstrap-percentile", conf)


def mean_ci(x: npt.ArrayLike, *, n_boot: int = 2000, seed: Seed, conf: float = 0.95) -> Estimate:
    """Mean of a 1-D sample with a (vectorised) percentile bootstrap interval."""
    v = _as_1d(x, "x")
    if v.size == 0:
        raise ValueError("mean_ci needs a non-empty sample")
    rng = rng_from(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    lo, hi = percentile_interval(v[idx].mean(axis=1), conf)
    return Estimate(float(v.mean()), lo, hi, int(v.size), "bootstrap-percentile", conf)


# --------------------------------------------------------------------------- inequality


def gini(values: npt.ArrayLike) -> float:
    """Gini coefficient: sort ascending, sum_i (2i - n - 1) v_i / (n sum v), i = 1..n.

    Needs non-negative values with a positive sum (raises ``ValueError`` otherwise).
    0 for equal values; (n-1)/n when one value holds everything.
    """
    v = np.sort(_as_1d(values, "values"))
    if v.size == 0:
        raise ValueError("gini needs at least one value")
    if np.any(v < 0):
        raise ValueError("gini needs non-negative values")
    total = float(v.sum())
    if total <= 0.0:
        raise ValueError("gini is undefined when all values are zero")
    n = v.size
    i = np.arange(1, n + 1, dtype=np.float64)
    # Clipped at 0: equal values can round to -1e-17.
    return max(0.0, float(np.sum((2.0 * i - n - 1.0) * v) / (n * total)))


# --------------------------------------------------------------------------- dose-response


class FitStatus(StrEnum):
    """Whether a dose-response GLM has a finite maximum-likelihood fit."""

    OK = "ok"
    TOO_FEW_DOSES = "too_few_doses"
    ALL_ZERO = "all_zero"
    ALL_ONE = "all_one"
    SEPARATION = "separation"
    NOT_CONVERGED = "not_converged"


class DoseStatus(StrEnum):
    """Whether an effective dose can be reported."""

    OK = "ok"
    NO_FIT = "no_fit"
    SLOPE_NOT_SIGNIFICANT = "slope_not_significant"
    NOT_REACHED = "not_reached"
    BOOTSTRAP_UNSTABLE = "bootstrap_unstable"


@dataclass(frozen=True)
class DoseEstimate:
    """Dose at which the fitted response equals ``level``.

    ``value``, ``lo`` and ``hi`` are set only when ``status`` is ``OK``; otherwise
    they are ``None`` and ``reason`` says why.
    """

    level: float
    status: DoseStatus
    reason: str
    method: str
    conf: float
    value: float | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def reached(self) -> bool:
        return self.status is DoseStatus.OK


def _separation(alphas: FloatArray, k: IntArray, n: IntArray) -> tuple[bool, str]:
    """Whether one data set ([J] counts) is (quasi-)separated, and a reason."""
    sep = _separated_rows(alphas, k[None, :], n)
    if not sep[0]:
        return (False, "")
    return (
        True,
        "outcomes are (quasi-)completely separated by dose: every dose with a "
        "failure lies on one side of every dose with a success, so the maximum-"
        "likelihood slope is infinite",
    )


def _separated_rows(alphas: FloatArray, k: npt.NDArray[np.int64], n: IntArray) -> BoolArray:
    """True where the MLE of logit(p) = b0 + b1*alpha does not exist (finite).

    With one covariate the MLE exists iff neither max(alpha with a failure) <=
    min(alpha with a success) nor max(alpha with a success) <= min(alpha with a
    failure). This also covers all-zero and all-one data.
    """
    has_fail = k < n[None, :]
    has_succ = k > 0
    a = np.broadcast_to(alphas[None, :], k.shape)
    inf = np.inf
    max_fail = np.where(has_fail, a, -inf).max(axis=1)
    min_fail = np.where(has_fail, a, inf).min(axis=1)
    max_succ = np.where(has_succ, a, -inf).max(axis=1)
    min_succ = np.where(has_succ, a, inf).min(axis=1)
    return np.asarray((max_fail <= min_succ) | (max_succ <= min_fail), dtype=np.bool_)


def _irls_rows(
    alphas: FloatArray, k: FloatArray, n: FloatArray, start: FloatArray, max_iter: int = 100
) -> tuple[FloatArray, BoolArray]:
    """Vectorised Newton–Raphson for logit(p) = b0 + b1*alpha on [B, J] counts.

    Returns [B, 2] parameters and a [B] converged flag. Used for the parametric
    bootstrap; the main fit uses statsmodels.
    """
    b = np.repeat(start[None, :], k.shape[0], axis=0).astype(np.float64)
    converged = np.zeros(k.shape[0], dtype=np.bool_)
    x = alphas[None, :]
    for _ in range(max_iter):
        eta = b[:, :1] + b[:, 1:] * x
        p = scipy.special.expit(eta)
        w = n[None, :] * p * (1.0 - p)
        r = k - n[None, :] * p
        g0, g1 = r.sum(axis=1), (r * x).sum(axis=1)
        h00, h01, h11 = w.sum(axis=1), (w * x).sum(axis=1), (w * x * x).sum(axis=1)
        det = h00 * h11 - h01 * h01
        with np.errstate(divide="ignore", invalid="ignore"):
            d0 = (h11 * g0 - h01 * g1) / det
            d1 = (h00 * g1 - h01 * g0) / det
        step = np.stack([d0, d1], axis=1)
        step = np.where(np.isfinite(step), step, 0.0)
        active = ~converged
        b[active] += step[active]
        small = np.abs(step).max(axis=1) < 1e-10 * (1.0 + np.abs(b).max(axis=1))
        converged |= small & np.isfinite(det) & (det > 0)
        if converged.all():
            break
    return b, converged


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class DoseResponseFit:
    """Binomial GLM logit(p) = b0 + b1 * alpha fitted to k successes out of n per dose.

    ``params`` ([b0, b1]) and ``cov`` (2 x 2) are ``None`` unless ``status`` is
    ``OK``. The binomial model treats every trial as independent; the same
    prompts reused across doses make it optimistic (a known limitation).
    """

    alphas: FloatArray
    k: IntArray
    n: IntArray
    status: FitStatus
    reason: str
    converged: bool
    params: FloatArray | None = None
    cov: FloatArray | None = None

    @property
    def ok(self) -> bool:
        return self.status is FitStatus.OK

    def predict(self, alpha: npt.ArrayLike) -> FloatArray:
        """Fitted response probability at ``alpha`` (raises if there is no fit)."""
        if self.params is None:
            raise ValueError(f"no fit ({self.status}): {self.reason}")
        a = np.asarray(alpha, dtype=np.float64)
        return np.asarray(scipy.special.expit(self.params[0] + self.params[1] * a))

    def ed(
        self,
        level: float = 0.5,
        *,
        conf: float = 0.95,
        method: Literal["delta", "fieller", "bootstrap"] = "delta",
        n_boot: int = 1000,
        seed: Seed | None = None,
    ) -> DoseEstimate:
        """Dose where the fitted response equals ``level``, with a confidence interval.

        ``delta``: Wald interval from the delta method; ``fieller``: Fieller's
        interval for the ratio (logit(level) - b0) / b1; ``bootstrap``: parametric
        bootstrap (simulate k* ~ Binomial(n, p_hat) per dose, refit, percentile).
        Bootstrap replicates without a finite fit (separation) count as -inf for
        the lower and +inf for the upper bound (conservative); if that makes a
        bound infinite the status is ``BOOTSTRAP_UNSTABLE``.

        Statuses other than ``OK``: ``NO_FIT`` (the GLM is ill-posed),
        ``SLOPE_NOT_SIGNIFICANT`` (the slope's Wald interval at ``conf`` includes
        0, so Fieller's interval is unbounded: a flat response has no dose),
        ``NOT_REACHED`` (the fitted curve crosses ``level`` outside the tested
        alpha range).
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        z = _z(conf)
        if method == "bootstrap" and seed is None:
            raise ValueError("ed(method='bootstrap') needs an explicit seed")

        def fail(status: DoseStatus, reason: str) -> DoseEstimate:
            return DoseEstimate(level, status, reason, method, conf)

        if self.params is None or self.cov is None:
            return fail(DoseStatus.NO_FIT, f"no fit ({self.status.value}): {self.reason}")
        b0, b1 = float(self.params[0]), float(self.params[1])
        v00, v01, v11 = float(self.cov[0, 0]), float(self.cov[0, 1]), float(self.cov[1, 1])
        if b1 * b1 <= z * z * v11:
            return fail(
                DoseStatus.SLOPE_NOT_SIGNIFICANT,
                f"slope {b1:.4g} (SE {math.sqrt(v11):.3g}) is not distinguishable from 0 at "
                f"conf={conf}; the dose interval is unbounded",
            )
        target = float(scipy.special.logit(level))
        ed = (target - b0) / b1
        lo_a, hi_a = float(self.alphas.min()), float(self.alphas.max())
        if not lo_a <= ed <= hi_a:
            return fail(
                DoseStatus.NOT_REACHED,
                f"fitted curve reaches {level:.3g} at alpha={ed:.4g}, outside the tested "
                f"range [{lo_a:.4g}, {hi_a:.4g}]",
            )
        if method == "delta":
            g0, g1 = -1.0 / b1, -(target - b0) / (b1 * b1)
            var = g0 * g0 * v00 + 2.0 * g0 * g1 * v01 + g1 * g1 * v11
            half = z * math.sqrt(max(var, 0.0))
            return DoseEstimate(level, DoseStatus.OK, "", "delta", conf, ed, ed - half, ed + half)
        if method == "fieller":
            a = target - b0
            qa = b1 * b1 - z * z * v11
            qb = -2.0 * (a * b1 - z * z * v01)
            qc = a * a - z * z * v00
            disc = qb * qb - 4.0 * qa * qc
            root = math.sqrt(max(disc, 0.0))
            lo, hi = sorted(((-qb - root) / (2 * qa), (-qb + root) / (2 * qa)))
            return DoseEstimate(level, DoseStatus.OK, "", "fieller", conf, ed, lo, hi)
        assert seed is not None
        return self._bootstrap_ed(level, target, ed, conf, n_boot, rng_from(seed))

    def _bootstrap_ed(
        self,
        level: float,
        target: float,
        ed: float,
        conf: float,
        n_boot: int,
        rng: np.random.Generator,
    ) -> DoseEstimate:
        assert self.params is not None
        p_hat = self.predict(self.alphas)
        kb = rng.binomial(self.n[None, :], p_hat[None, :], size=(n_boot, self.n.size))
        return _refit_percentile_ed(self.alphas, kb.astype(np.int64), self.n, self.params,
                                    level, target, ed, conf, "parametric-bootstrap")


def _refit_percentile_ed(
    alphas: FloatArray,
    kb: IntArray,
    n: IntArray,
    start: FloatArray,
    level: float,
    target: float,
    ed: float,
    conf: float,
    method: str,
    same_sign_as: float | None = None,
) -> DoseEstimate:
    """Refit the logistic to every row of resampled counts ``kb`` ([B, J], trials ``n``)
    and return the percentile interval of the dose at ``level`` around the estimate ``ed``.

    Replicates without a finite fit (separation, no convergence, zero slope, or a slope
    whose sign differs from ``same_sign_as`` when given) count as -inf for the lower and
    +inf for the upper bound (conservative); if that leaves a bound infinite the status is
    ``BOOTSTRAP_UNSTABLE``.
    """
    n_boot = kb.shape[0]
    sep = _separated_rows(alphas, kb, n)
    params, conv = _irls_rows(alphas, kb.astype(np.float64), n.astype(np.float64), start)
    good = conv & ~sep & (params[:, 1] != 0.0)
    if same_sign_as is not None:
        good &= np.sign(params[:, 1]) == np.sign(same_sign_as)
    eds = np.where(good, (target - params[:, 0]) / np.where(good, params[:, 1], 1.0), 0.0)
    a = (1.0 - conf) / 2.0
    # Order statistics (no interpolation, which is undefined next to ±inf),
    # rounded outwards.
    lo = float(np.quantile(np.where(good, eds, -np.inf), a, method="lower"))
    hi = float(np.quantile(np.where(good, eds, np.inf), 1.0 - a, method="higher"))
    n_bad = int((~good).sum())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return DoseEstimate(
            level,
            DoseStatus.BOOTSTRAP_UNSTABLE,
            f"{n_bad}/{n_boot} bootstrap refits had no finite fit; a bound is unbounded",
            method,
            conf,
        )
    reason = f"{n_bad}/{n_boot} refits without a finite fit counted as ±inf" if n_bad else ""
    return DoseEstimate(level, DoseStatus.OK, reason, method, conf, ed, lo, hi)


def fit_dose_response(alphas: npt.ArrayLike, k: npt.ArrayLike, n: npt.ArrayLike) -> DoseResponseFit:
    """Fit logit(p) = b0 + b1 * alpha (binomial GLM, statsmodels) to k/n at each alpha.

    Checks, before fitting, for fewer than two distinct doses, all-zero and all-one
    data and (quasi-)complete separation; those return a :class:`DoseResponseFit`
    with the matching :class:`FitStatus`, a reason, and no parameters.
    """
    a = _as_1d(alphas, "alphas")
    kk = np.asarray(k)
    nn = np.asarray(n)
    if kk.shape != a.shape or nn.shape != a.shape:
        raise ValueError("alphas, k and n must have the same 1-D shape")
    if np.any(kk != np.round(kk)) or np.any(nn != np.round(nn)):
        raise ValueError("k and n must be integer counts")
    ki, ni = kk.astype(np.int64), nn.astype(np.int64)
    if np.any(ni <= 0) or np.any(ki < 0) or np.any(ki > ni):
        raise ValueError("need n > 0 and 0 <= k <= n at every dose")
    if not np.all(np.isfinite(a)):
        raise ValueError("alphas must be finite")

    def ill(status: FitStatus, reason: str) -> DoseResponseFit:
        return DoseResponseFit(a, ki, ni, status, reason, converged=False)

    if np.unique(a).size < 2:
        return ill(FitStatus.TOO_FEW_DOSES, "fewer than two distinct doses")
    if ki.sum() == 0:
        return ill(FitStatus.ALL_ZERO, "no successes at any dose: the response never rises")
    if ki.sum() == ni.sum():
        return ill(FitStatus.ALL_ONE, "successes at every trial: the response never falls")
    separated, why = _separation(a, ki, ni)
    if separated:
        return ill(FitStatus.SEPARATION, why)
    endog = np.column_stack([ki, ni - ki]).astype(np.float64)
    exog = np.column_stack([np.ones_like(a), a])
    with warnings.catch_warnings():
        # Separation was ruled out exactly above; statsmodels also warns on a
        # perfect *fit* (e.g. identical rates at every dose), which is harmless.
        warnings.simplefilter("ignore", PerfectSeparationWarning)
        res: Any = sm.GLM(endog, exog, family=sm.families.Binomial()).fit()
    params = np.asarray(res.params, dtype=np.float64)
    cov = np.asarray(res.cov_params(), dtype=np.float64)
    converged = bool(res.converged)
    if not converged or not (np.all(np.isfinite(params)) and np.all(np.isfinite(cov))):
        return ill(FitStatus.NOT_CONVERGED, "IRLS did not converge to finite estimates")
    return DoseResponseFit(a, ki, ni, FitStatus.OK, "", True, params, cov)


def _outcome_matrix(outcomes: npt.ArrayLike, name: str) -> IntArray:
    """A [prompts, doses] 0/1 matrix as integers (raises ``ValueError`` otherwise)."""
    y = np.asarray(outcomes)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"{name} must be a [prompts, doses] array with at least 2 prompts, "
                         f"got shape {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold 0/1 (or bool) outcomes, one per prompt and dose")
    return y.astype(np.int64)


def ed_by_prompt(
    alphas: npt.ArrayLike,
    outcomes: npt.ArrayLike,
    level: float = 0.5,
    *,
    n_boot: int = 1000,
    seed: Seed,
    conf: float = 0.95,
) -> tuple[DoseResponseFit, DoseEstimate]:
    """The logistic dose at ``level`` with a cluster bootstrap interval over prompts.

    ``outcomes`` is [prompts, doses]: the same prompts judged at every dose of ``alphas``.
    The point estimate is :func:`fit_dose_response` on the pooled counts. The interval
    resamples PROMPTS with replacement (each keeps its replies at all doses), refits the
    logistic to every resample and takes the percentile interval, so a prompt counts once
    rather than once per dose: the binomial intervals of :meth:`DoseResponseFit.ed` treat
    the replies as independent and are too narrow when prompts differ in how easily they
    flip. Resamples without a finite fit, or whose slope changes sign, count as ±inf
    (``BOOTSTRAP_UNSTABLE`` when a bound becomes infinite). Returns the fit and the dose.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _check_conf(conf)
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    a = _as_1d(alphas, "alphas")
    y = _outcome_matrix(outcomes, "outcomes")
    if y.shape[1] != a.size:
        raise ValueError(f"outcomes has {y.shape[1]} doses but alphas has {a.size}")
    n_p = y.shape[0]
    n = np.full(a.size, n_p, dtype=np.int64)
    fit = fit_dose_response(a, y.sum(axis=0), n)
    method = "prompt-bootstrap"

    def fail(status: DoseStatus, reason: str) -> tuple[DoseResponseFit, DoseEstimate]:
        return fit, DoseEstimate(level, status, reason, method, conf)

    if fit.params is None:
        return fail(DoseStatus.NO_FIT, f"no fit ({fit.status.value}): {fit.reason}")
    b0, b1 = float(fit.params[0]), float(fit.params[1])
    if b1 == 0.0:
        return fail(DoseStatus.SLOPE_NOT_SIGNIFICANT, "the fitted slope is exactly 0")
    target = float(scipy.special.logit(level))
    ed = (target - b0) / b1
    if not float(a.min()) <= ed <= float(a.max()):
        return fail(DoseStatus.NOT_REACHED,
                    f"fitted curve reaches {level:.3g} at alpha={ed:.4g}, outside the tested "
                    f"range [{a.min():.4g}, {a.max():.4g}]")
    pick = rng_from(seed).integers(0, n_p, size=(n_boot, n_p))
    kb = y[pick].sum(axis=1)
    return fit, _refit_percentile_ed(a, kb, n, fit.params, level, target, ed, conf, method,
                                     same_sign_as=b1)


# --------------------------------------------------------------------------- paired designs


def paired_rate_difference(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    n_boot: int = 2000,
    seed: Seed,
    conf: float = 0.95,
) -> Estimate:
    """Difference of rates mean(a) - mean(b) when the same prompts appear in both arms,
    with a percentile bootstrap over prompts.

    ``a`` and ``b`` are 0/1 outcomes, [prompts] or [prompts, repeats] (e.g. several doses
    pooled per arm); row i of both is prompt i. A resample draws prompts with replacement
    and keeps both arms' rows of each, so the pairing (prompts that flip in both arms) is
    kept instead of treating the arms as independent samples (Newcombe's interval).
    ``n`` is the number of prompts.
    """
    x, y = (np.asarray(v) for v in (a, b))
    x, y = (v[:, None] if v.ndim == 1 else v for v in (x, y))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"paired arms need the same prompts (rows): {x.shape[0]} vs "
                         f"{y.shape[0]}")
    xa, ya = _outcome_matrix(x, "a"), _outcome_matrix(y, "b")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    # Per-prompt sums: a resample's rate is sum over drawn prompts / (drawn prompts * repeats).
    sa, sb = xa.sum(axis=1).astype(np.float64), ya.sum(axis=1).astype(np.float64)
    ra, rb = xa.shape[1], ya.shape[1]
    n_p = xa.shape[0]
    value = float(sa.sum() / (n_p * ra) - sb.sum() / (n_p * rb))
    pick = rng_from(seed).integers(0, n_p, size=(n_boot, n_p))
    reps = sa[pick].sum(axis=1) / (n_p * ra) - sb[pick].sum(axis=1) / (n_p * rb)
    lo, hi = percentile_interval(reps, conf)
    return Estimate(value, lo, hi, n_p, "paired-bootstrap-prompts", conf)


def mcnemar_exact_p(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Exact two-sided McNemar p on paired 0/1 outcomes (prompt i in both arms): the
    binomial test of the discordant pairs; 1.0 when there are none."""
    x, y = np.asarray(a, dtype=bool).ravel(), np.asarray(b, dtype=bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes need equal shapes, got {x.shape} and {y.shape}")
    n10, n01 = int(np.sum(x & ~y)), int(np.sum(~x & y))
    if n10 + n01 == 0:
        return 1.0
    return float(scipy.stats.binomtest(n10, n10 + n01, 0.5).pvalue)


# --------------------------------------------------------------------------- judge error


def rogan_gladen(
    rate_ci: Estimate,
    sensitivity_ci: Estimate,
    specificity_ci: Estimate,
) -> Estimate:
    """Prevalence corrected for a judge's errors: (p + spec - 1) / (sens + spec - 1),
    clipped to [0, 1] (Rogan & Gladen 1978).

    ``rate_ci`` is the judged rate, ``sensitivity_ci`` and ``specificity_ci`` the judge's
    rates on labelled positives and negatives, each with its interval. The interval is
    interval arithmetic over the three input intervals: the map is linear-fractional, so
    its extremes over the box of inputs lie at the box's corners. It holds whenever all
    three input intervals hold, so it is conservative; for a joint guarantee at ``c``
    pass inputs at ``c ** (1 / 3)``. When the box reaches sens + spec <= 1 the bound on
    that side is unbounded and clipped to 0 or 1. ``ValueError`` when the point
    sens + spec <= 1 (the judge is no better than chance, so nothing can be corrected).
    """
    p, se, sp = rate_ci.value, sensitivity_ci.value, specificity_ci.value
    for name, e in (("rate", rate_ci), ("sensitivity", sensitivity_ci),
                    ("specificity", specificity_ci)):
        if not (0.0 <= e.lo <= e.value <= e.hi <= 1.0):
            raise ValueError(f"{name} must satisfy 0 <= lo <= value <= hi <= 1, got "
                             f"{e.value} [{e.lo}, {e.hi}]")
    if se + sp <= 1.0:
        raise ValueError(f"sensitivity + specificity = {se + sp:.4g} <= 1: the judge is no "
                         "better than chance and its rate cannot be corrected; validate a "
                         "better judge or report the raw rate")
    value = min(1.0, max(0.0, (p + sp - 1.0) / (se + sp - 1.0)))
    conf = min(rate_ci.conf, sensitivity_ci.conf, specificity_ci.conf)
    n = rate_ci.n
    if sensitivity_ci.lo + specificity_ci.lo <= 1.0:
        return Estimate(value, 0.0, 1.0, n, "rogan-gladen, unbounded (sens + spec may be "
                        "<= 1 within the input intervals)", conf)
    corners = [(pp + s2 - 1.0) / (s1 + s2 - 1.0)
               for pp in (rate_ci.lo, rate_ci.hi)
               for s1 in (sensitivity_ci.lo, sensitivity_ci.hi)
               for s2 in (specificity_ci.lo, specificity_ci.hi)]
    lo = min(1.0, max(0.0, min(corners)))
    hi = min(1.0, max(0.0, max(corners)))
    return Estimate(value, min(lo, value), max(hi, value), n,
                    "rogan-gladen, interval arithmetic", conf)
