"""Unit and property tests for probes.stats against scipy / statsmodels."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import scipy.special
import scipy.stats
import statsmodels.api as sm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from probes import stats
from probes.stats import DoseStatus, FitStatus

FAST = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


# --------------------------------------------------------------------------- rates


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (1, 1), (57, 200), (0, 1)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_wilson_and_clopper_pearson_match_statsmodels(k: int, n: int, conf: float) -> None:
    alpha = 1 - conf
    lo, hi = stats.wilson_interval(k, n, conf)
    ref = proportion_confint(k, n, alpha=alpha, method="wilson")
    assert lo == pytest.approx(ref[0], abs=1e-12)
    assert hi == pytest.approx(ref[1], abs=1e-12)
    lo, hi = stats.clopper_pearson(k, n, conf)
    ref = proportion_confint(k, n, alpha=alpha, method="beta")
    assert lo == pytest.approx(ref[0], abs=1e-10)
    assert hi == pytest.approx(ref[1], abs=1e-10)


@FAST
@given(n=st.integers(0, 500), frac=st.floats(0, 1), conf=st.floats(0.5, 0.999))
def test_intervals_contain_point_estimate(n: int, frac: float, conf: float) -> None:
    k = round(frac * n)
    for fn in (stats.wilson_interval, stats.clopper_pearson):
        lo, hi = fn(k, n, conf)
        assert 0.0 <= lo <= hi <= 1.0
        if n > 0:
            assert lo <= k / n <= hi


def test_rate_and_invalid_counts() -> None:
    est = stats.rate(3, 12)
    assert est.value == 0.25
    assert est.contains(0.25)
    assert est.method == "wilson"
    assert stats.rate(3, 12, method="clopper_pearson").lo < est.lo
    empty = stats.rate(0, 0)
    assert math.isnan(empty.value)
    assert (empty.lo, empty.hi) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 3)
    with pytest.raises(ValueError):
        stats.wilson_interval(1, 3, conf=1.0)


# --------------------------------------------------------------------------- two groups


def test_welch_t_matches_scipy_and_sign() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 3.0, 50)
    t, p = stats.welch_t(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue)
    assert stats.welch_t(b, a)[0] == pytest.approx(-t)
    assert all(math.isnan(v) for v in stats.welch_t([1.0, 1.0], [2.0, 2.0]))
    assert all(math.isnan(v) for v in stats.welch_t([1.0], [2.0, 3.0]))


def test_cohens_d_known_value() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, var 5/3
    b = np.array([0.0, 0.0, 2.0, 2.0])  # mean 1.0, var 4/3
    assert stats.cohens_d(a, b) == pytest.approx(1.5 / math.sqrt((5 / 3 + 4 / 3) / 2))
    assert stats.cohens_d([1.0, 1.0], [0.0, 0.0]) == math.inf
    assert math.isnan(stats.cohens_d([1.0, 1.0], [1.0, 1.0]))
    assert math.isnan(stats.cohens_d([1.0], [1.0, 2.0]))


@FAST
@given(seed=SEEDS, shift=st.floats(-1e3, 1e3), scale=st.floats(1e-3, 1e3))
def test_cohens_d_invariant_to_shift_and_scale(seed: int, shift: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.5, 1.0, 20), rng.normal(0.0, 2.0, 25)
    d = stats.cohens_d(a, b)
    assert stats.cohens_d(a + shift, b + shift) == pytest.approx(d, rel=1e-6, abs=1e-6)
    assert stats.cohens_d(a * scale, b * scale) == pytest.approx(d, rel=1e-9)
    assert stats.cohens_d(b, a) == pytest.approx(-d)


def _auc_bruteforce(x: np.ndarray, y: np.ndarray) -> float:
    diff = x[:, None] - y[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@FAST
@given(
    x=hnp.arrays(np.float64, st.integers(1, 15), elements=st.integers(-3, 3).map(float)),
    y=hnp.arrays(np.float64, st.integers(1, 15), elements=st.integers(-3, 3).map(float)),
)
def test_auc_matches_bruteforce_with_ties(x: np.ndarray, y: np.ndarray) -> None:
    a = stats.auc(x, y)
    assert a == pytest.approx(_auc_bruteforce(x, y))
    assert stats.auc(y, x) == pytest.approx(1.0 - a)


def test_auc_matches_mann_whitney() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.7, 1, 40), rng.normal(0, 1, 60)
    u = scipy.stats.mannwhitneyu(x, y).statistic
    assert stats.auc(x, y) == pytest.approx(u / (40 * 60))
    assert math.isnan(stats.auc([], [1.0]))


def test_auc_interval_methods() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(1.0, 1, 50), rng.normal(0, 1, 50)
    hm = stats.auc_interval(x, y)
    a = stats.auc(x, y)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + 49 * (q1 - a * a) + 49 * (q2 - a * a)) / 2500)
    assert hm.lo == pytest.approx(a - 1.959963984540054 * se)
    assert hm.method == "hanley_mcneil"
    bs = stats.auc_interval(x, y, method="bootstrap", n_boot=500, seed=3)
    assert bs.lo < a < bs.hi
    assert bs == stats.auc_interval(x, y, method="bootstrap", n_boot=500, seed=3)
    # The two methods agree roughly on the width.
    assert (bs.hi - bs.lo) == pytest.approx(hm.hi - hm.lo, rel=0.35)
    with pytest.raises(ValueError, match="seed"):
        stats.auc_interval(x, y, method="bootstrap")


def test_fisher_exact_matches_scipy() -> None:
    for alt in ("two-sided", "greater", "less"):
        odds, p = stats.fisher_exact(18, 20, 3, 20, alternative=alt)
        ref = scipy.stats.fisher_exact([[18, 2], [3, 17]], alternative=alt)
        assert odds == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue)
    assert stats.fisher_exact(18, 20, 3, 20, "greater")[1] < 0.001
    with pytest.raises(ValueError):
        stats.fisher_exact(5, 4, 1, 4)


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    rho, p = stats.spearman(x, y)
    ref = scipy.stats.spearmanr(x, y)
    assert (rho, p) == pytest.approx((ref.statistic, ref.pvalue))
    assert all(math.isnan(v) for v in stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- multiplicity


@FAST
@given(p=hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1)))
def test_benjamini_hochberg(p: np.ndarray) -> None:
    bh = stats.benjamini_hochberg(p)
    np.testing.assert_allclose(bh, multipletests(p, method="fdr_bh")[1])
    assert np.all(bh >= p - 1e-15)
    assert np.all(bh <= 1.0)


def _holm_reference(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    m = p.size
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


# Few examples: statsmodels' Holm branch calls gc.collect() on every call.
@settings(max_examples=6, deadline=None, database=None)
@given(p=hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1)))
def test_holm(p: np.ndarray) -> None:
    h = stats.holm(p)
    np.testing.assert_allclose(h, _holm_reference(p), rtol=1e-12)
    assert np.all(h >= p - 1e-15)
    assert np.all(h >= stats.benjamini_hochberg(p) - 1e-12)
    assert np.all(h <= 1.0)


def test_adjustment_counts_nan_as_a_test() -> None:
    adj = stats.holm([0.01, np.nan, 0.04])
    assert math.isnan(adj[1])
    np.testing.assert_allclose(
        adj[[0, 2]], multipletests([0.01, 1.0, 0.04], method="holm")[1][[0, 2]]
    )
    with pytest.raises(ValueError):
        stats.holm([1.5])
    assert stats.holm([]).shape == (0,)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_single_and_groups() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 1.0, 200)
    est = stats.bootstrap_ci(x, lambda v: float(np.mean(v)), n_boot=500, seed=0)
    assert est.value == pytest.approx(x.mean())
    assert est.lo < x.mean() < est.hi
    # Width close to the normal-theory interval.
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert (est.hi - est.lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert est == stats.bootstrap_ci(x, lambda v: float(np.mean(v)), n_boot=500, seed=0)
    y = rng.normal(0.0, 1.0, 150)
    two = stats.bootstrap_ci((x, y), stats.cohens_d, n_boot=300, seed=1)
    assert two.lo < stats.cohens_d(x, y) < two.hi
    assert two.n == 350
    vec = stats.mean_ci(x, n_boot=500, seed=0)
    assert vec.value == pytest.approx(x.mean())
    assert (vec.hi - vec.lo) == pytest.approx(est.hi - est.lo, rel=0.25)


def test_paired_bootstrap_uses_shared_indices() -> None:
    rng = np.random.default_rng(6)
    base = rng.normal(0, 5, 100)
    after = base + 0.3 + rng.normal(0, 0.1, 100)

    def mean_gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(b - a))

    paired = stats.bootstrap_ci((base, after), mean_gap, n_boot=400, seed=2, paired=True)
    unpaired = stats.bootstrap_ci((base, after), mean_gap, n_boot=400, seed=2)
    assert paired.lo > 0.25
    assert (paired.hi - paired.lo) < 0.1 * (unpaired.hi - unpaired.lo)
    with pytest.raises(ValueError, match="equal length"):
        stats.bootstrap_ci((base, after[:50]), mean_gap, n_boot=10, seed=0, paired=True)


def test_percentile_interval_nan_and_resampling_within_groups() -> None:
    assert all(math.isnan(v) for v in stats.percentile_interval([1.0, np.nan, 2.0]))
    groups = np.array([0, 0, 1, 1, 1, 2])
    idx = stats.resample_within_groups(groups, 50, 0)
    assert idx.shape == (50, 6)
    assert np.all(groups[idx] == groups[None, :])
    assert idx[:, 5].tolist() == [5] * 50
    with pytest.raises(TypeError):
        stats.rng_from(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- gini


@FAST
@given(v=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0, 1e3)))
def test_gini_equals_mean_absolute_difference_form(v: np.ndarray) -> None:
    if v.sum() <= 0:
        with pytest.raises(ValueError):
            stats.gini(v)
        return
    g = stats.gini(v)
    ref = np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size * v.sum())
    assert g == pytest.approx(ref, abs=1e-9)
    assert 0.0 <= g <= (v.size - 1) / v.size + 1e-12  # 0 exactly for equal values
    assert stats.gini(v * 7.5) == pytest.approx(g, abs=1e-9)


def test_gini_extremes() -> None:
    assert stats.gini([2.0, 2.0, 2.0]) == pytest.approx(0.0)
    assert stats.gini([0.0, 0.0, 0.0, 5.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        stats.gini([1.0, -1.0])


# --------------------------------------------------------------------------- dose-response

ALPHAS = np.array([-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])


def _simulate(b0: float, b1: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    p = scipy.special.expit(b0 + b1 * ALPHAS)
    k = np.random.default_rng(seed).binomial(n, p)
    return k, np.full(ALPHAS.size, n)


def test_dose_response_matches_statsmodels_and_recovers_ed50() -> None:
    b0, b1 = -1.2, 2.0  # ED50 = 0.6
    k, n = _simulate(b0, b1, 400, seed=0)
    fit = stats.fit_dose_response(ALPHAS, k, n)
    assert fit.ok
    assert fit.converged
    assert fit.params is not None
    assert fit.cov is not None
    ref = sm.GLM(np.c_[k, n - k], sm.add_constant(ALPHAS), family=sm.families.Binomial()).fit()
    np.testing.assert_allclose(fit.params, ref.params, rtol=1e-7)
    np.testing.assert_allclose(fit.cov, ref.cov_params(), rtol=1e-6)
    for method in ("delta", "fieller", "bootstrap"):
        est = fit.ed(0.5, method=method, seed=1, n_boot=400)
        assert est.status is DoseStatus.OK, est.reason
        assert est.value is not None
        assert est.lo is not None
        assert est.hi is not None
        assert est.value == pytest.approx(0.6, abs=0.1)
        assert est.lo < 0.6 < est.hi
        assert est.hi - est.lo < 0.3
    # ED at another level: logit(0.8) = b0 + b1 x.
    ed80 = fit.ed(0.8)
    assert ed80.value == pytest.approx((scipy.special.logit(0.8) - b0) / b1, abs=0.15)
    assert fit.predict(0.6) == pytest.approx(0.5, abs=0.05)


def test_decreasing_response_has_negative_slope_ed() -> None:
    # Harmful refusal falling as alpha gets more negative: ED50 at alpha = -1.
    k, n = _simulate(2.0, 2.0, 300, seed=3)
    est = stats.fit_dose_response(ALPHAS, k, n).ed(0.5, method="fieller")
    assert est.status is DoseStatus.OK
    assert est.value == pytest.approx(-1.0, abs=0.15)


def test_delta_interval_covers_truth_at_nominal_rate() -> None:
    hits = 0
    runs = 60
    for seed in range(runs):
        k, n = _simulate(-0.5, 1.5, 60, seed=seed)
        est = stats.fit_dose_response(ALPHAS, k, n).ed(0.5)
        assert est.status is DoseStatus.OK
        assert est.lo is not None
        assert est.hi is not None
        hits += est.lo <= 1 / 3 <= est.hi
    assert hits >= runs * 0.85  # nominal 0.95; binomial slack


@pytest.mark.parametrize(
    ("k", "n", "status"),
    [
        ([0, 0, 0, 0], [10, 10, 10, 10], FitStatus.ALL_ZERO),
        ([10, 10, 10, 10], [10, 10, 10, 10], FitStatus.ALL_ONE),
        ([0, 0, 10, 10], [10, 10, 10, 10], FitStatus.SEPARATION),
        ([10, 10, 0, 0], [10, 10, 10, 10], FitStatus.SEPARATION),
        ([0, 3, 10, 10], [10, 10, 10, 10], FitStatus.SEPARATION),  # quasi-complete
    ],
)
def test_ill_posed_fits_have_status_and_no_numbers(
    k: list[int], n: list[int], status: FitStatus
) -> None:
    fit = stats.fit_dose_response([-1.0, 0.0, 1.0, 2.0], k, n)
    assert fit.status is status
    assert fit.reason
    assert fit.params is None
    assert fit.cov is None
    est = fit.ed()
    assert est.status is DoseStatus.NO_FIT
    assert est.value is None
    assert est.lo is None
    assert est.hi is None
    with pytest.raises(ValueError, match="no fit"):
        fit.predict(0.0)


def test_too_few_doses_and_bad_input() -> None:
    assert stats.fit_dose_response([1.0, 1.0], [2, 3], [5, 5]).status is FitStatus.TOO_FEW_DOSES
    with pytest.raises(ValueError):
        stats.fit_dose_response([0.0, 1.0], [6, 1], [5, 5])
    with pytest.raises(ValueError):
        stats.fit_dose_response([0.0, 1.0], [1.5, 1], [5, 5])
    fit = stats.fit_dose_response([0.0, 1.0, 2.0], [1, 3, 6], [8, 8, 8])
    with pytest.raises(ValueError):
        fit.ed(1.0)
    with pytest.raises(ValueError, match="seed"):
        fit.ed(method="bootstrap")


def test_flat_response_is_not_a_dose() -> None:
    fit = stats.fit_dose_response(ALPHAS, [5, 4, 6, 5, 5, 6, 4, 5, 5], [10] * 9)
    assert fit.ok
    for method in ("delta", "fieller", "bootstrap"):
        est = fit.ed(method=method, seed=0)
        assert est.status is DoseStatus.SLOPE_NOT_SIGNIFICANT
        assert est.value is None


def test_dose_outside_tested_range_is_not_reached() -> None:
    # True ED50 = 4, tested range [-2, 2]; the slope is clearly non-zero.
    k, n = _simulate(-4.0, 1.0, 500, seed=7)
    fit = stats.fit_dose_response(ALPHAS, k, n)
    est = fit.ed(0.5)
    assert est.status is DoseStatus.NOT_REACHED
    assert est.value is None
    assert "outside the tested range" in est.reason
    assert fit.ed(0.05).status is DoseStatus.OK


def test_bootstrap_refit_matches_statsmodels() -> None:
    rng = np.random.default_rng(8)
    n = np.full(ALPHAS.size, 30)
    kb = rng.binomial(n, scipy.special.expit(0.3 + 0.8 * ALPHAS), size=(20, ALPHAS.size))
    params, conv = stats._irls_rows(ALPHAS, kb.astype(float), n.astype(float), np.zeros(2))
    assert conv.all()
    for row, p in zip(kb, params, strict=True):
        ref = sm.GLM(np.c_[row, n - row], sm.add_constant(ALPHAS), family=sm.families.Binomial())
        np.testing.assert_allclose(p, ref.fit().params, rtol=1e-6, atol=1e-9)


def test_bootstrap_with_separating_replicates_is_conservative_or_unstable() -> None:
    # Steep curve with few trials: many parametric replicates are separated.
    alphas = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    fit = stats.fit_dose_response(alphas, [0, 1, 2, 4, 5], [5, 5, 5, 5, 5])
    assert fit.ok
    est = fit.ed(method="bootstrap", seed=0, n_boot=300)
    assert est.status in (DoseStatus.BOOTSTRAP_UNSTABLE, DoseStatus.OK)
    if est.status is DoseStatus.BOOTSTRAP_UNSTABLE:
        assert est.value is None
        assert "bootstrap" in est.reason
    else:
        assert "±inf" in est.reason


@FAST
@given(
    k=hnp.arrays(np.int64, 5, elements=st.integers(0, 6)),
    order=st.permutations(range(5)),
)
def test_dose_fit_never_returns_a_silent_number(k: np.ndarray, order: list[int]) -> None:
    alphas = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[order]
    n = np.full(5, 6)
    fit = stats.fit_dose_response(alphas, k, n)
    if not fit.ok:
        assert fit.params is None
        assert fit.reason
        assert fit.ed().value is None
        return
    assert fit.params is not None
    assert np.all(np.isfinite(fit.params))
    est = fit.ed()
    if est.status is DoseStatus.OK:
        assert est.value is not None
        assert est.lo is not None
        assert est.hi is not None
        assert -2.0 <= est.value <= 2.0
        assert est.lo <= est.value <= est.hi
        assert fit.predict(est.value) == pytest.approx(0.5)
    else:
        assert est.value is None
        assert est.reason


def test_separation_checker_matches_definition() -> None:
    alphas = np.array([0.0, 1.0, 2.0])
    n = np.array([2, 2, 2])
    for ks in product(range(3), repeat=3):
        k = np.array(ks)
        fail_at = alphas[k < n]
        succ_at = alphas[k > 0]
        up = fail_at.size == 0 or succ_at.size == 0 or fail_at.max() <= succ_at.min()
        down = fail_at.size == 0 or succ_at.size == 0 or succ_at.max() <= fail_at.min()
        assert stats._separated_rows(alphas, k[None, :], n)[0] == (up or down)


def test_newcombe_difference_matches_statsmodels() -> None:
    from statsmodels.stats.proportion import confint_proportions_2indep

    for k1, n1, k2, n2 in [(12, 40, 25, 40), (0, 10, 3, 12), (9, 9, 1, 15)]:
        d, lo, hi = stats.newcombe_difference(k1, n1, k2, n2)
        ref_lo, ref_hi = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb",
                                                    compare="diff")
        assert d == pytest.approx(k1 / n1 - k2 / n2)
        assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=1e-9)


def test_mcnemar_one_sided_p_uses_only_discordant_pairs() -> None:
    before = np.array([True] * 10 + [False] * 5)
    after = np.array([False] * 10 + [False] * 5)
    assert stats.mcnemar_one_sided_p(before, after, "drop") == pytest.approx(0.5**10)
    assert stats.mcnemar_one_sided_p(before, after, "rise") == pytest.approx(1.0)
    assert stats.mcnemar_one_sided_p(before, before, "drop") == 1.0  # no discordant pair
