"""Unit and property tests for probes.directions on synthetic activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import directions as D
from probes import stats

FAST = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
DETERMINISTIC = ("mean_diff", "probe", "gradient")


def _data(
    seed: int, n: int = 30, m: int = 25, d: int = 12, gap: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic Gaussian classes separated along a random axis, plus a common offset."""
    rng = np.random.default_rng(seed)
    axis = D.unit(rng.standard_normal(d))
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    offset = rng.normal(0.0, 3.0, d)
    pos = rng.standard_normal((n, d)) @ mix + offset + gap * axis
    neg = rng.standard_normal((m, d)) @ mix + offset
    return pos, neg


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- basics


def test_mean_diff_and_unit() -> None:
    pos = np.array([[1.0, 0.0], [3.0, 2.0]])
    neg = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    np.testing.assert_allclose(D.mean_diff(pos, neg), [2.0, 0.0])
    np.testing.assert_allclose(D.fit_direction("mean_diff", pos, neg, seed=0), [1.0, 0.0])
    with pytest.raises(ValueError):
        D.unit(np.zeros(3))
    with pytest.raises(ValueError):
        D.mean_diff(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError):
        D.fit_direction("ica", pos, neg, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", D.METHODS)
def test_every_method_returns_a_reproducible_unit_vector(method: D.Method) -> None:
    pos, neg = _data(0)
    u = D.fit_direction(method, pos, neg, seed=3)
    assert u.shape == (12,)
    assert np.linalg.norm(u) == pytest.approx(1.0)
    np.testing.assert_array_equal(u, D.fit_direction(method, pos, neg, seed=3))
    if method != "random":
        # Every fitted method points from neg to pos on the training set.
        assert (pos @ u).mean() > (neg @ u).mean()


def test_random_direction_depends_only_on_seed() -> None:
    a, b = D.random_direction(50, 1), D.random_direction(50, 2)
    assert abs(_cos(a, b)) < 0.9
    np.testing.assert_array_equal(a, D.random_direction(50, 1))


@FAST
@given(seed=SEEDS, scale=st.floats(1e-2, 1e3))
def test_directions_invariant_to_scaling_activations(seed: int, scale: float) -> None:
    pos, neg = _data(seed % 1000)
    for method in D.METHODS:
        u = D.fit_direction(method, pos, neg, seed=seed)
        v = D.fit_direction(method, pos * scale, neg * scale, seed=seed)
        assert _cos(u, v) == pytest.approx(1.0, abs=1e-6), method


@FAST
@given(seed=SEEDS, shift_scale=st.floats(0.0, 100.0))
def test_shift_invariant_methods(seed: int, shift_scale: float) -> None:
    # mean_diff, gradient and pca_diff use only differences and within-class spread.
    pos, neg = _data(seed % 1000)
    shift = np.random.default_rng(seed).standard_normal(pos.shape[1]) * shift_scale
    for method in ("mean_diff", "gradient", "pca_diff"):
        u = D.fit_direction(method, pos, neg, seed=seed)
        v = D.fit_direction(method, pos + shift, neg + shift, seed=seed)
        assert _cos(u, v) == pytest.approx(1.0, abs=1e-6), method


@FAST
@given(seed=SEEDS)
def test_polarity_flips_when_labels_flip(seed: int) -> None:
    pos, neg = _data(seed % 1000)
    for method in DETERMINISTIC:
        u = D.fit_direction(method, pos, neg, seed=seed)  # type: ignore[arg-type]
        v = D.fit_direction(method, neg, pos, seed=seed)  # type: ignore[arg-type]
        assert _cos(u, v) == pytest.approx(-1.0, abs=1e-6), method
    # pca_diff pairs differently after the swap, but its sign rule still holds.
    v = D.pca_diff_direction(neg, pos, seed=seed)
    assert (neg @ v).mean() >= (pos @ v).mean()


# --------------------------------------------------------------------------- gradient


def _ledoit_wolf_reference(x: np.ndarray) -> float:
    """Textbook Ledoit–Wolf intensity from the d x d covariance."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / (n * n * d)
    return float(min(beta, delta) / delta)


def test_ledoit_wolf_matches_definition() -> None:
    rng = np.random.default_rng(0)
    for n, d in ((10, 30), (40, 8)):
        x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, d)
        x -= x.mean(axis=0)
        assert D.ledoit_wolf_shrinkage(x) == pytest.approx(_ledoit_wolf_reference(x), rel=1e-9)
    assert D.ledoit_wolf_shrinkage(np.eye(4)) == 1.0


@FAST
@given(seed=SEEDS, d=st.integers(2, 60), shrink=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_gradient_gap_at_least_mean_diff_on_train(seed: int, d: int, shrink: float | None) -> None:
    pos, neg = _data(seed % 1000, n=15, m=12, d=d, gap=0.5)
    g = D.gradient_direction(pos, neg, shrinkage=shrink)
    md = D.unit(D.mean_diff(pos, neg))
    assert D.projection_gap(g, pos, neg) >= D.projection_gap(md, pos, neg) - 1e-9


def _shrunk_objective(pos: np.ndarray, neg: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    delta = pos.mean(0) - neg.mean(0)
    s = (np.cov(pos, rowvar=False) + np.cov(neg, rowvar=False)) / 2
    d = s.shape[0]
    return delta, (1 - g) * s + g * np.trace(s) / d * np.eye(d)


def test_gradient_is_the_maximiser_found_by_gradient_ascent() -> None:
    pos, neg = _data(4, n=20, m=20, d=30)
    shrink = 0.3
    delta, s_g = _shrunk_objective(pos, neg, shrink)

    def neg_j(v: np.ndarray) -> tuple[float, np.ndarray]:
        num, den = v @ delta, math.sqrt(v @ s_g @ v)
        grad = delta / den - num * (s_g @ v) / den**3
        return -num / den, -grad

    start = D.unit(delta)
    res = scipy.optimize.minimize(
        neg_j, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-12}
    )
    closed = D.gradient_direction(pos, neg, shrinkage=shrink)
    assert -res.fun == pytest.approx(-neg_j(closed)[0], rel=1e-6)
    assert -neg_j(closed)[0] >= -res.fun - 1e-9
    assert _cos(D.unit(res.x), closed) == pytest.approx(1.0, abs=1e-4)


def test_gradient_beats_mean_diff_under_correlated_noise() -> None:
    # Noise along the mean-difference axis hides the signal from mean_diff.
    rng = np.random.default_rng(5)
    n, d = 400, 5
    noise = rng.standard_normal((2 * n, d)) * np.array([5.0, 0.3, 1, 1, 1])
    signal = np.array([1.0, 0.5, 0, 0, 0])
    pos, neg = noise[:n] + signal, noise[n:]
    tr, te = slice(0, 300), slice(300, 400)
    g = D.gradient_direction(pos[tr], neg[tr])
    md = D.unit(D.mean_diff(pos[tr], neg[tr]))
    eg = D.evaluate_direction(g, pos[tr], neg[tr], pos[te], neg[te])
    em = D.evaluate_direction(md, pos[tr], neg[tr], pos[te], neg[te])
    assert eg.cohens_d > em.cohens_d + 0.3


# --------------------------------------------------------------------------- probe


def _ridge_logistic_newton(x: np.ndarray, y01: np.ndarray, c: float) -> np.ndarray:
    """Independent reference: Newton's method on [w, b] with penalty ||w||^2 / (2c)."""
    xa = np.c_[x, np.ones(len(x))]
    theta = np.zeros(xa.shape[1])
    pen = np.eye(xa.shape[1]) / c
    pen[-1, -1] = 0.0
    for _ in range(100):
        p = scipy.special.expit(xa @ theta)
        grad = xa.T @ (p - y01) + pen @ theta
        hess = xa.T @ (xa * (p * (1 - p))[:, None]) + pen
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    return theta[:-1]


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_probe_matches_newton_reference(c: float) -> None:
    pos, neg = _data(7, d=6)
    x = np.concatenate([pos, neg])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    ref = D.unit(_ridge_logistic_newton(x, y, c))
    got = D.probe_direction(pos, neg, c=c)
    assert _cos(got, ref) == pytest.approx(1.0, abs=1e-7)


def test_probe_raises_on_indistinguishable_classes() -> None:
    x = np.ones((4, 3))
    with pytest.raises(ValueError):
        D.probe_direction(x, x)


# --------------------------------------------------------------------------- pca_diff


def test_pca_diff_recovers_dominant_difference_axis() -> None:
    rng = np.random.default_rng(8)
    n, d = 200, 10
    # Paired differences vary mostly along e0 (the spread of the signal itself).
    strength = rng.uniform(0.0, 6.0, n)
    pos = rng.standard_normal((n, d)) * 0.2 + np.outer(strength, np.eye(d)[0])
    neg = rng.standard_normal((n, d)) * 0.2
    u = D.pca_diff_direction(pos, neg, seed=0)
    assert u[0] == pytest.approx(1.0, abs=1e-2)
    unc = D.pca_diff_direction(pos, neg, seed=0, center=False)
    assert unc[0] > 0.99


# --------------------------------------------------------------------------- evaluation


def test_evaluate_direction_by_hand() -> None:
    u = np.array([1.0, 0.0])
    train_pos = np.array([[2.0, 5.0], [4.0, -1.0]])  # mean projection 3
    train_neg = np.array([[0.0, 0.0], [-2.0, 1.0]])  # mean projection -1 -> threshold 1
    test_pos = np.array([[3.0, 0.0], [0.5, 0.0], [2.0, 9.0]])  # 2 of 3 above 1
    test_neg = np.array([[0.0, 0.0], [1.5, 0.0]])  # 1 of 2 at or below 1
    ev = D.evaluate_direction(u, train_pos, train_neg, test_pos, test_neg)
    assert ev.threshold == 1.0
    assert ev.accuracy == pytest.approx(3 / 5)
    assert ev.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ev.polarity_correct
    assert ev.auc == pytest.approx(stats.auc([3.0, 0.5, 2.0], [0.0, 1.5]))
    assert ev.cohens_d == pytest.approx(stats.cohens_d([3.0, 0.5, 2.0], [0.0, 1.5]))
    assert ev.n_test == 5
    flipped = D.evaluate_direction(-u, train_pos, train_neg, test_pos, test_neg)
    assert not flipped.polarity_correct
    assert flipped.accuracy == pytest.approx(1 - ev.accuracy)
    assert flipped.auc == pytest.approx(1 - ev.auc)
    assert flipped.cohens_d == pytest.approx(-ev.cohens_d)


def test_method_ranking_on_easy_data() -> None:
    pos, neg = _data(9, n=120, m=120, d=20, gap=2.0)
    tr, te = slice(0, 80), slice(80, 120)
    evals = {
        m: D.evaluate_direction(
            D.fit_direction(m, pos[tr], neg[tr], seed=0), pos[tr], neg[tr], pos[te], neg[te]
        )
        for m in D.METHODS
    }
    for m in ("mean_diff", "probe", "gradient"):
        assert evals[m].polarity_correct
        assert evals[m].accuracy > 0.75
        assert evals[m].auc > 0.85
    assert evals["gradient"].cohens_d >= evals["random"].cohens_d


# --------------------------------------------------------------------------- per layer


def _layers(seed: int, n: int = 24, n_layers: int = 4, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gaps = np.linspace(0.0, 3.0, n_layers)
    axes = D.unit(rng.standard_normal((n_layers, d)))
    pos = rng.standard_normal((n, n_layers, d)) + gaps[None, :, None] * axes[None]
    neg = rng.standard_normal((n, n_layers, d))
    return pos, neg


@pytest.mark.parametrize("method", D.METHODS)
def test_per_layer_equals_per_slice(method: D.Method) -> None:
    pos, neg = _layers(0)
    per_layer = D.fit_direction_per_layer(method, pos, neg, seed=11)
    assert per_layer.shape == (4, 8)
    for layer in range(4):
        single = D.fit_direction(method, pos[:, layer], neg[:, layer], seed=D.layer_seed(11, layer))
        np.testing.assert_allclose(per_layer[layer], single, atol=1e-12)
    evals = D.evaluate_per_layer(per_layer, pos, neg, pos, neg)
    assert evals[2] == D.evaluate_direction(
        per_layer[2], pos[:, 2], neg[:, 2], pos[:, 2], neg[:, 2]
    )
    np.testing.assert_allclose(
        D.project(pos, per_layer)[:, 1], pos[:, 1] @ per_layer[1], atol=1e-12
    )


def test_train_test_split() -> None:
    tr, te = D.train_test_split(10, 0.3, seed=0)
    assert len(te) == 3
    assert len(tr) == 7
    assert sorted(np.r_[tr, te].tolist()) == list(range(10))
    np.testing.assert_array_equal(te, D.train_test_split(10, 0.3, seed=0)[1])
    assert len(D.train_test_split(3, 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        D.train_test_split(1, 0.5, seed=0)


def test_layer_significance_matches_scipy_and_flags_layers() -> None:
    rng = np.random.default_rng(12)
    n, n_layers, d = 60, 5, 6
    gaps = np.array([0.0, 0.0, 1.5, 3.0, 6.0])
    axis = D.unit(rng.standard_normal(d))
    pos = rng.standard_normal((n, n_layers, d)) + gaps[None, :, None] * axis
    neg = rng.standard_normal((n, n_layers, d))
    tr, te = slice(0, 40), slice(40, 60)
    rows = D.layer_significance(pos[tr], neg[tr], pos[te], neg[te])
    assert [r.layer for r in rows] == list(range(n_layers))
    u = D.unit(D.mean_diff_per_layer(pos[tr], neg[tr]))
    pvals = []
    for r in rows:
        a, b = pos[te, r.layer] @ u[r.layer], neg[te, r.layer] @ u[r.layer]
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
        assert r.t == pytest.approx(ref.statistic)
        assert r.p == pytest.approx(ref.pvalue)
        assert r.cohens_d == pytest.approx(stats.cohens_d(a, b))
        assert r.auc == pytest.approx(stats.auc(a, b))
        assert r.norm == pytest.approx(
            np.linalg.norm(D.mean_diff(pos[tr, r.layer], neg[tr, r.layer]))
        )
        pvals.append(ref.pvalue)
    np.testing.assert_allclose([r.p_holm for r in rows], stats.holm(pvals))
    assert [r.valid for r in rows] == [False, False, True, True, True]
    for r in rows:
        assert r.valid == (r.p_holm < D.SEED003_P_MAX and abs(r.cohens_d) > D.SEED003_ABS_D_MIN)


def test_in_sample_effect_size_is_inflated_on_pure_noise() -> None:
    # d >> n: a direction fitted on the same prompts separates them anyway (circularity).
    rng = np.random.default_rng(13)
    pos, neg = rng.standard_normal((40, 1, 400)), rng.standard_normal((40, 1, 400))
    row = D.layer_significance(pos[:20], neg[:20], pos[20:], neg[20:])[0]
    assert row.cohens_d_in_sample > 2.0
    assert abs(row.cohens_d) < 1.0
    assert not row.valid
