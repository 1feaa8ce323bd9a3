"""Statistics of the per-layer experiment against scipy / statsmodels, and the
invariances the issue asks for, as property tests on synthetic activations.

Already covered elsewhere (not repeated): Cohen's d of two samples is invariant to a
common shift and a positive scale (tests/unit/test_stats.py); every extraction method's
direction is invariant to scaling the activations, and mean_diff / probe / gradient flip
when the labels flip (tests/unit/test_directions.py). Here: the same invariances for the
whole held-out pipeline (layer_significance, heldout_correct, evaluate_direction), which is
what a per-layer table reports.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from benchmarks.test_extraction_methods import accuracy_bootstrap
from benchmarks.test_transfer import cross_matrix, group_split, parallel_set
from probes import directions as D
from probes import stats
from prompts import PromptSet

FAST = settings(max_examples=10, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _layers(seed: int, n: int = 24, m: int = 20, n_layers: int = 4, d: int = 7,
            gaps: tuple[float, ...] = (0.0, 0.8, 1.5, 3.0)) -> tuple[np.ndarray, ...]:
    """train_pos, train_neg, test_pos, test_neg: [n, L, d] with a growing gap per layer."""
    rng = np.random.default_rng(seed)
    axis = D.unit(rng.standard_normal((n_layers, d)))
    offset = rng.normal(0.0, 2.0, (n_layers, d))
    g = np.asarray(gaps)[:, None] * axis

    def draw(k: int, shift: np.ndarray) -> np.ndarray:
        return rng.standard_normal((k, n_layers, d)) + offset + shift

    return draw(n, g), draw(m, 0.0), draw(n, g), draw(m, 0.0)


# --------------------------------------------------------------------------- against scipy


def test_cohens_d_columns_matches_the_scalar_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (15, 6)), rng.normal(0.0, 1.0, (11, 6))
    got = D.cohens_d_columns(a, b)
    for j in range(6):
        assert got[j] == pytest.approx(stats.cohens_d(a[:, j], b[:, j]), rel=1e-12)
        # Definition by hand, with scipy's moments.
        sd = math.sqrt((scipy.stats.tvar(a[:, j]) + scipy.stats.tvar(b[:, j])) / 2.0)
        assert got[j] == pytest.approx((a[:, j].mean() - b[:, j].mean()) / sd, rel=1e-12)
    # Leading (bootstrap) axes broadcast.
    batch = D.cohens_d_columns(np.stack([a, a[::-1]]), b)
    np.testing.assert_allclose(batch, np.stack([got, got]), rtol=1e-12)


def test_cohens_d_columns_edge_cases_follow_the_scalar_function() -> None:
    a = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 1.0]])
    b = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    got = D.cohens_d_columns(a, b)
    assert math.isnan(got[0])  # no spread, no difference
    assert got[1] == math.inf  # no spread, a difference
    assert got[2] == pytest.approx(0.0)
    for j in range(3):
        ref = stats.cohens_d(a[:, j], b[:, j])
        assert (math.isnan(ref) and math.isnan(got[j])) or ref == got[j]
    assert np.isnan(D.cohens_d_columns(a[:1], b)).all()  # a group of one
    assert np.isnan(D.cohens_d_columns(np.full((3, 1), np.nan), b[:, :1])).all()
    with pytest.raises(ValueError):
        D.cohens_d_columns(a, b[:, :2])


def test_layer_significance_matches_scipy_and_statsmodels_with_a_constant_layer() -> None:
    trp, trn, tep, ten = _layers(1)
    # Layer 0 is the same vector for every prompt (a chat-template token at resid_pre 0).
    for arr in (trp, trn, tep, ten):
        arr[:, 0] = np.linspace(-1.0, 1.0, arr.shape[2])
    assert D.constant_layers(trp, trn, tep, ten).tolist() == [True, False, False, False]
    rows = D.layer_significance(trp, trn, tep, ten)
    assert math.isnan(rows[0].cohens_d) and math.isnan(rows[0].p) and not rows[0].valid
    u = D.unit(D.mean_diff_per_layer(trp[:, 1:], trn[:, 1:]))
    p_raw = [1.0]  # the constant layer still counts as a test (conservative)
    for i, row in enumerate(rows[1:]):
        a, b = tep[:, i + 1] @ u[i], ten[:, i + 1] @ u[i]
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
        assert row.t == pytest.approx(ref.statistic)
        assert row.p == pytest.approx(ref.pvalue)
        assert row.cohens_d == pytest.approx(stats.cohens_d(a, b))
        mw = scipy.stats.mannwhitneyu(a, b).statistic / (a.size * b.size)
        assert row.auc == pytest.approx(mw)
        p_raw.append(ref.pvalue)
    holm = multipletests(p_raw, method="holm")[1]
    np.testing.assert_allclose([r.p_holm for r in rows[1:]], holm[1:], rtol=1e-12)


def test_constant_layers_tolerance() -> None:
    x = np.ones((5, 3, 4))
    x[:, 1] += np.arange(5)[:, None]  # layer 1 varies
    x[:, 2] += 1e-9 * np.arange(5)[:, None]  # layer 2: rounding noise only
    assert D.constant_layers(x).tolist() == [True, False, True]
    assert D.constant_layers(x, x[:2]).tolist() == [True, False, True]
    y = x.copy()
    y[0, 0, 0] += 1.0
    assert D.constant_layers(x, y).tolist() == [False, False, True]


def test_bootstrap_d_profile_replicates_are_d_of_resampled_rows() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 1.0, (12, 5)), rng.normal(0.0, 1.0, (9, 5))
    reps = D.bootstrap_d_profile(a, b, n_boot=40, seed=7)
    assert reps.shape == (40, 5)
    draw = np.random.default_rng(7)
    ia, ib = draw.integers(0, 12, size=(40, 12)), draw.integers(0, 9, size=(40, 9))
    for r in (0, 17, 39):
        for j in range(5):
            ref = stats.cohens_d(a[ia[r], j], b[ib[r], j])
            assert reps[r, j] == pytest.approx(ref, rel=1e-10)
    # The same rows at every layer: a replicate is a whole profile.
    same = D.bootstrap_d_profile(np.repeat(a[:, :1], 5, axis=1),
                                 np.repeat(b[:, :1], 5, axis=1), n_boot=10, seed=1)
    np.testing.assert_allclose(same, np.repeat(same[:, :1], 5, axis=1))
    # Percentile interval close to scipy's percentile bootstrap of the same statistic.
    big = D.bootstrap_d_profile(a[:, :1], b[:, :1], n_boot=20000, seed=3)[:, 0]
    ref_ci = scipy.stats.bootstrap((a[:, 0], b[:, 0]), stats.cohens_d, method="percentile",
                                   n_resamples=20000, vectorized=False,
                                   random_state=np.random.default_rng(4)).confidence_interval
    lo, hi = stats.percentile_interval(big)
    assert lo == pytest.approx(ref_ci.low, abs=0.08)
    assert hi == pytest.approx(ref_ci.high, abs=0.08)


def test_profile_spearman_matches_scipy_with_ties_and_missing_layers() -> None:
    rng = np.random.default_rng(5)
    profiles = np.round(rng.normal(0.0, 1.0, (30, 9)), 1)  # rounding makes ties
    x = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    got = D.profile_spearman(profiles, x)
    for r in range(30):
        assert got[r] == pytest.approx(scipy.stats.spearmanr(x, profiles[r]).statistic)
    with_nan = profiles.copy()
    with_nan[3, 0] = np.nan  # a layer without a value is dropped for every row
    got = D.profile_spearman(with_nan, x)
    for r in (0, 3):
        ref = scipy.stats.spearmanr(x[1:], with_nan[r, 1:]).statistic
        assert got[r] == pytest.approx(ref)
    assert np.isnan(D.profile_spearman(np.ones((2, 4)))).all()
    assert D.profile_spearman(np.arange(5.0))[0] == pytest.approx(1.0)


def test_heldout_correct_agrees_with_evaluate_direction() -> None:
    trp, trn, tep, ten = _layers(6)
    u = D.fit_direction_per_layer("probe", trp[:, 1:], trn[:, 1:], seed=0)
    cp, cn = D.heldout_correct(u, trp[:, 1:], trn[:, 1:], tep[:, 1:], ten[:, 1:])
    evals = D.evaluate_per_layer(u, trp[:, 1:], trn[:, 1:], tep[:, 1:], ten[:, 1:])
    for j, e in enumerate(evals):
        assert np.concatenate([cp[:, j], cn[:, j]]).mean() == pytest.approx(e.accuracy)
        assert (cp[:, j].mean() + cn[:, j].mean()) / 2 == pytest.approx(e.balanced_accuracy)


def test_accuracy_bootstrap_matches_scipy_stratified_percentile_bootstrap() -> None:
    rng = np.random.default_rng(8)
    pos = (rng.random(40) < 0.8).astype(float)
    neg = (rng.random(30) < 0.6).astype(float)
    est = accuracy_bootstrap(pos[:, None], neg[:, None], n_boot=20000, seed=1,
                             resample_layers=False)
    assert est.value == pytest.approx((pos.sum() + neg.sum()) / 70)

    def pooled(a: np.ndarray, b: np.ndarray) -> float:
        return float((a.sum() + b.sum()) / (a.size + b.size))

    ref = scipy.stats.bootstrap((pos, neg), pooled, method="percentile", n_resamples=20000,
                                vectorized=False, random_state=np.random.default_rng(2))
    assert est.lo == pytest.approx(ref.confidence_interval.low, abs=0.015)
    assert est.hi == pytest.approx(ref.confidence_interval.high, abs=0.015)
    # Resampling layers widens the interval when layers disagree, never changes the value.
    per_layer = np.stack([pos, 1 - pos, pos], axis=1)
    neg_layer = np.stack([neg, 1 - neg, neg], axis=1)
    fixed = accuracy_bootstrap(per_layer, neg_layer, n_boot=4000, seed=3, resample_layers=False)
    both = accuracy_bootstrap(per_layer, neg_layer, n_boot=4000, seed=3, resample_layers=True)
    assert fixed.value == both.value
    assert both.hi - both.lo > fixed.hi - fixed.lo


def _grouped_data(seed: int, confound: float) -> dict[str, object]:
    """Three groups of the varying (neg) class; with ``confound`` each group is shifted
    along its own axis, so a direction fitted on one group transfers worse."""
    rng = np.random.default_rng(seed)
    d = 12
    axis = D.unit(rng.standard_normal(d))
    group_axes = D.unit(rng.standard_normal((3, d)))
    pos_tr = rng.standard_normal((40, d)) + 2.5 * axis
    pos_te = rng.standard_normal((40, d)) + 2.5 * axis
    vary_tr = [rng.standard_normal((15, d)) + confound * group_axes[g] for g in range(3)]
    grp = np.repeat(np.arange(3), 15)
    vary_te = rng.standard_normal((45, d)) + confound * group_axes[grp]
    return {"vary_train": vary_tr, "vary_test": vary_te, "grp": grp.astype(np.int64),
            "fixed_train": pos_tr, "fixed_test": pos_te}


def test_cross_matrix_by_brute_force() -> None:
    data = _grouped_data(9, confound=3.0)
    m = cross_matrix("g", "mean_diff", 0, ["a", "b", "c"], data["vary_train"],  # type: ignore[arg-type]
                     data["vary_test"], data["grp"], data["fixed_train"],  # type: ignore[arg-type]
                     data["fixed_test"], vary_is_pos=False, n_boot=300, seed=0)  # type: ignore[arg-type]
    pos_tr, pos_te = data["fixed_train"], data["fixed_test"]
    for i, vt in enumerate(data["vary_train"]):  # type: ignore[arg-type]
        u = D.fit_direction("mean_diff", pos_tr, vt, seed=0)  # type: ignore[arg-type]
        for j in range(3):
            neg_te = data["vary_test"][data["grp"] == j]  # type: ignore[index]
            e = D.evaluate_direction(u, pos_tr, vt, pos_te, neg_te)  # type: ignore[arg-type]
            assert m.balanced[i, j] == pytest.approx(e.balanced_accuracy)
    off = ~np.eye(3, dtype=bool)
    assert m.drop.value == pytest.approx(np.diag(m.balanced).mean() - m.balanced[off].mean())
    # One class fixed: the balanced-accuracy drop is half the varying class's drop.
    vary_drop = np.diag(m.vary).mean() - m.vary[off].mean()
    assert m.drop.value == pytest.approx(vary_drop / 2)
    assert m.drop.lo <= m.drop.value <= m.drop.hi
    assert m.drop.value > 0.05  # confounded groups transfer worse
    clean = _grouped_data(9, confound=0.0)
    m0 = cross_matrix("g", "mean_diff", 0, ["a", "b", "c"], clean["vary_train"],  # type: ignore[arg-type]
                      clean["vary_test"], clean["grp"], clean["fixed_train"],  # type: ignore[arg-type]
                      clean["fixed_test"], vary_is_pos=False, n_boot=300, seed=0)  # type: ignore[arg-type]
    assert m0.drop.lo < 0.0 < m0.drop.hi or abs(m0.drop.value) < 0.05


def test_group_split_keeps_translations_together() -> None:
    rows = [(g, lg, t) for t in ("a", "b") for g in (f"{t}1", f"{t}2", f"{t}3", f"{t}4")
            for lg in ("en", "es", "fr", "de", "zh")]
    rows.append(("solo", "en", "a"))  # English only: not part of the parallel set
    ps = PromptSet("h", tuple(f"{g}-{lg}" for g, lg, _ in rows),
                   {"group": tuple(r[0] for r in rows), "language": tuple(r[1] for r in rows),
                    "topic": tuple(r[2] for r in rows)})
    par = parallel_set(ps)
    assert len(par) == 40
    train, test = group_split(par, seed=0)
    assert not train & test
    assert train | test == set(par.label("group"))
    assert sum(g.startswith("a") for g in train) == 2  # stratified by topic
    assert group_split(par, seed=0) == (train, test)


# --------------------------------------------------------------------------- properties


@FAST
@given(seed=SEEDS, shift_scale=st.floats(0.0, 50.0))
def test_heldout_statistics_invariant_to_shifting_both_groups(
    seed: int, shift_scale: float
) -> None:
    trp, trn, tep, ten = _layers(seed % 10_000)
    shift = np.random.default_rng(seed).standard_normal(trp.shape[1:]) * shift_scale
    base = D.layer_significance(trp, trn, tep, ten)
    moved = D.layer_significance(trp + shift, trn + shift, tep + shift, ten + shift)
    for r0, r1 in zip(base, moved, strict=True):
        assert r1.cohens_d == pytest.approx(r0.cohens_d, rel=1e-6, abs=1e-9)
        assert r1.cohens_d_in_sample == pytest.approx(r0.cohens_d_in_sample, rel=1e-6, abs=1e-9)
        assert r1.t == pytest.approx(r0.t, rel=1e-6, abs=1e-9)
        assert r1.auc == pytest.approx(r0.auc)
    u = D.unit(D.mean_diff_per_layer(trp, trn))
    c0 = D.heldout_correct(u, trp, trn, tep, ten)
    c1 = D.heldout_correct(u, trp + shift, trn + shift, tep + shift, ten + shift)
    for a, b in zip(c0, c1, strict=True):
        assert np.mean(a != b) <= 0.05  # only prompts within rounding of the threshold


@FAST
@given(seed=SEEDS, scale=st.floats(1e-2, 1e3))
def test_heldout_statistics_invariant_to_scaling_activations(seed: int, scale: float) -> None:
    trp, trn, tep, ten = _layers(seed % 10_000)
    base = D.layer_significance(trp, trn, tep, ten)
    scaled = D.layer_significance(trp * scale, trn * scale, tep * scale, ten * scale)
    for r0, r1 in zip(base, scaled, strict=True):
        assert r1.cohens_d == pytest.approx(r0.cohens_d, rel=1e-6, abs=1e-9)
        assert r1.p == pytest.approx(r0.p, rel=1e-5, abs=1e-300)
        assert r1.norm == pytest.approx(r0.norm * scale, rel=1e-9)
    for method in ("mean_diff", "gradient"):  # probe: scale-invariant by construction (rows
        # are normalised), tested in test_directions; its L-BFGS fits are slow here
        u0 = D.fit_direction_per_layer(method, trp, trn, seed=0)  # type: ignore[arg-type]
        u1 = D.fit_direction_per_layer(method, trp * scale, trn * scale, seed=0)  # type: ignore[arg-type]
        e0 = D.evaluate_per_layer(u0, trp, trn, tep, ten)
        e1 = D.evaluate_per_layer(u1, trp * scale, trn * scale, tep * scale, ten * scale)
        for a, b in zip(e0, e1, strict=True):
            assert b.cohens_d == pytest.approx(a.cohens_d, rel=1e-4, abs=1e-6)
            assert abs(b.accuracy - a.accuracy) <= 1.0 / a.n_test + 1e-12


@FAST
@given(seed=SEEDS)
def test_polarity_and_signs_flip_when_labels_flip(seed: int) -> None:
    trp, trn, tep, ten = _layers(seed % 10_000)
    base = D.layer_significance(trp, trn, tep, ten)
    # Labels flipped in the fit only (test groups as before): every sign inverts.
    fit_flipped = D.layer_significance(trn, trp, tep, ten)
    # Labels flipped everywhere: direction and groups both flip, nothing changes.
    all_flipped = D.layer_significance(trn, trp, ten, tep)
    for r0, r1, r2 in zip(base, fit_flipped, all_flipped, strict=True):
        assert r1.cohens_d == pytest.approx(-r0.cohens_d, rel=1e-9, abs=1e-12)
        assert r1.t == pytest.approx(-r0.t, rel=1e-9, abs=1e-12)
        assert r1.p == pytest.approx(r0.p, rel=1e-9, abs=1e-300)
        assert r1.auc == pytest.approx(1.0 - r0.auc)
        assert r2.cohens_d == pytest.approx(r0.cohens_d, rel=1e-9, abs=1e-12)
        assert r2.auc == pytest.approx(r0.auc)
    for method in ("mean_diff", "gradient"):  # the probe's flip: test_directions
        u = D.fit_direction_per_layer(method, trp, trn, seed=0)  # type: ignore[arg-type]
        v = D.fit_direction_per_layer(method, trn, trp, seed=0)  # type: ignore[arg-type]
        for layer in range(trp.shape[1]):
            fit = D.evaluate_direction(u[layer], trp[:, layer], trn[:, layer],
                                       tep[:, layer], ten[:, layer])
            # The label-flipped fit, tested with the original labels: polarity inverts.
            flipped = D.evaluate_direction(v[layer], trp[:, layer], trn[:, layer],
                                           tep[:, layer], ten[:, layer])
            if abs(fit.cohens_d) > 1e-6:
                assert flipped.polarity_correct != fit.polarity_correct
            assert flipped.cohens_d == pytest.approx(-fit.cohens_d, rel=1e-4, abs=1e-6)
            assert flipped.auc == pytest.approx(1.0 - fit.auc, abs=1e-9)
