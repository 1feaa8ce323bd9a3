"""Unit and property tests for probes.geometry."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import geometry as G
from probes import stats
from probes.geometry import GeometryLabel

FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _orthonormal(k: int, d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    return q.T


def _dims_by_svd(vectors: np.ndarray) -> tuple[float, float]:
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    s = np.linalg.svd(u, compute_uv=False)

    def ent(p: np.ndarray) -> float:
        return float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))

    return ent(s**2 / np.sum(s**2)), ent(s / np.sum(s))


def _cone_data(
    seed: int, n_per: tuple[int, ...] = (5, 7, 4), d: int = 16, spread: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Harmful [n, L=3, d] with category offsets, harmless [m, 3, d], labels [n]."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"cat{i}" for i in range(len(n_per))], n_per)
    n = labels.size
    offsets = rng.standard_normal((len(n_per), 3, d)) * spread
    codes = np.unique(labels, return_inverse=True)[1]
    harmful = rng.standard_normal((n, 3, d)) + 1.0 + offsets[codes]
    harmless = rng.standard_normal((9, 3, d))
    return harmful, harmless, labels


# --------------------------------------------------------------------------- vector-level


def test_category_directions_by_hand() -> None:
    harmful = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    harmless = np.array([[0.0, 0.0], [0.0, 2.0]])  # mean (0, 1)
    cd = G.category_directions(harmful, ["b", "b", "a"], harmless)
    assert cd.categories == ("a", "b")
    np.testing.assert_array_equal(cd.counts, [1, 2])
    np.testing.assert_allclose(cd.strengths, [2.0, math.sqrt(10.0)])
    np.testing.assert_allclose(cd.units, [[0.0, 1.0], [3 / math.sqrt(10), -1 / math.sqrt(10)]])
    with pytest.raises(ValueError):
        G.category_directions(np.zeros((2, 2)), ["a", "b"], np.zeros((3, 2)))


@FAST
@given(seed=SEEDS, k=st.integers(2, 6))
def test_cosines_invariant_to_positive_scaling_and_odd_in_sign(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((k, 10))
    c = G.cosine_matrix(v)
    scales = rng.uniform(1e-3, 1e3, k)
    np.testing.assert_allclose(G.cosine_matrix(v * scales[:, None]), c, atol=1e-12)
    flip = np.ones(k)
    flip[0] = -1.0
    np.testing.assert_allclose(G.cosine_matrix(v * flip[:, None]), c * np.outer(flip, flip))
    ref = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
    np.testing.assert_allclose(c, ref, atol=1e-12)
    iu = np.triu_indices(k, 1)
    assert G.mean_abs_cos(c) == pytest.approx(np.abs(ref[iu]).mean())
    # Effective dimensions are functions of |cos| structure: invariant too.
    assert G.effective_dimension(v * scales[:, None] * flip[:, None]) == pytest.approx(
        G.effective_dimension(v)
    )


@FAST
@given(seed=SEEDS, k=st.integers(1, 8), d=st.integers(8, 40))
def test_effective_dimension_is_1_for_identical_and_k_for_orthonormal(
    seed: int, k: int, d: int
) -> None:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(d)
    same = np.outer(rng.uniform(0.1, 10, k) * rng.choice([-1.0, 1.0], k), v)
    assert G.effective_dimension(same) == pytest.approx(1.0, abs=1e-6)
    assert G.effective_dimension_obliteratus(same) == pytest.approx(1.0, abs=1e-4)
    ortho = _orthonormal(k, d, seed)
    assert G.effective_dimension(ortho) == pytest.approx(k, rel=1e-9)
    assert G.effective_dimension_obliteratus(ortho) == pytest.approx(k, rel=1e-9)


@FAST
@given(seed=SEEDS, k=st.integers(2, 7))
def test_effective_dimensions_match_svd(seed: int, k: int) -> None:
    v = np.random.default_rng(seed).standard_normal((k, 12)) + 0.7
    corrected, published = _dims_by_svd(v)
    assert G.effective_dimension(v) == pytest.approx(corrected, rel=1e-9)
    assert G.effective_dimension_obliteratus(v) == pytest.approx(published, rel=1e-9)
    assert 1.0 <= G.effective_dimension(v) <= k + 1e-9
    # The s-weighted (published) entropy is always at least the s^2-weighted one.
    assert G.effective_dimension_obliteratus(v) >= G.effective_dimension(v) - 1e-9


def test_specificity_cap_formula_and_labels() -> None:
    c = np.array([[1.0, 0.2, -0.4], [0.2, 1.0, 0.0], [-0.4, 0.0, 1.0]])
    np.testing.assert_allclose(G.specificity(c), [1 - 0.3, 1 - 0.1, 1 - 0.2])
    assert math.isnan(G.mean_abs_cos(np.ones((1, 1))))
    # Identical directions: the cap formula is 0; three orthonormal axes in 3-D:
    # |cos(e_i, mean)| = 1/sqrt(3).
    assert G.cap_formula_3d(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-12)
    assert G.cap_formula_3d(np.eye(3)) == pytest.approx(2 * math.pi * (1 - 1 / math.sqrt(3)))
    v = np.random.default_rng(0).standard_normal((4, 9))
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    m = u.mean(axis=0) / np.linalg.norm(u.mean(axis=0))
    assert G.cap_formula_3d(v) == pytest.approx(2 * math.pi * (1 - np.abs(u @ m).min()))
    assert G.geometry_label(0.95, 1.2) is GeometryLabel.LINEAR
    assert G.geometry_label(0.95, 1.7) is GeometryLabel.INTERMEDIATE
    assert G.geometry_label(0.85, 1.2) is GeometryLabel.INTERMEDIATE
    assert G.geometry_label(0.85, 2.5) is GeometryLabel.POLYHEDRAL
    assert G.geometry_label(0.13, 3.96) is GeometryLabel.POLYHEDRAL
    assert G.geometry_label(math.nan, 1.0) is GeometryLabel.UNDEFINED


# --------------------------------------------------------------------------- cone statistics


def test_cone_statistics_equal_direct_computation_per_layer() -> None:
    harmful, harmless, labels = _cone_data(0)
    out = G.cone_statistics(harmful, labels, harmless)
    assert len(out) == 3
    for layer, cs in enumerate(out):
        cd = G.category_directions(harmful[:, layer], labels, harmless[:, layer])
        cos = G.cosine_matrix(cd.units)
        assert cs.layer == layer
        assert cs.categories == cd.categories
        np.testing.assert_array_equal(cs.counts, cd.counts)
        np.testing.assert_allclose(cs.strengths, cd.strengths, rtol=1e-9)
        np.testing.assert_allclose(cs.cosines, cos, atol=1e-9)
        assert cs.mean_abs_cos == pytest.approx(G.mean_abs_cos(cos), abs=1e-9)
        assert cs.effective_dimension == pytest.approx(G.effective_dimension(cd.units), rel=1e-9)
        assert cs.effective_dimension_obliteratus == pytest.approx(
            G.effective_dimension_obliteratus(cd.units), rel=1e-9
        )
        np.testing.assert_allclose(cs.specificity, G.specificity(cos), atol=1e-9)
        assert cs.cap_formula_3d == pytest.approx(G.cap_formula_3d(cd.units), abs=1e-9)
        assert cs.label is G.geometry_label(cs.mean_abs_cos, cs.effective_dimension)
        assert cs.mean_abs_cos_ci is None
        assert cs.dimension_perm is None
        assert not cs.causally_validated
    # A 2-D input is one layer.
    single = G.cone_statistics(harmful[:, 1], labels, harmless[:, 1])
    assert len(single) == 1
    assert single[0].mean_abs_cos == pytest.approx(out[1].mean_abs_cos)
    assert G.most_polyhedral_layer(out) in (0, 1, 2)
    dims = [cs.effective_dimension for cs in out]
    assert G.most_linear_layer(out) == int(np.argmin(dims))
    assert G.most_polyhedral_layer(out) == int(np.argmax(dims))


def test_cone_replicates_equal_direct_recomputation() -> None:
    harmful, harmless, labels = _cone_data(1)
    n_boot, n_perm, seed = 7, 6, 123
    out = G.cone_statistics(harmful, labels, harmless, n_boot=n_boot, n_perm=n_perm, seed=seed)
    # Re-draw the documented resampling scheme with the same generator sequence.
    codes = np.unique(labels, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    idx_h = stats.resample_within_groups(codes, n_boot, rng)
    idx_b = rng.integers(0, harmless.shape[0], size=(n_boot, harmless.shape[0]))
    perms = [codes[rng.permutation(codes.size)] for _ in range(n_perm)]
    for layer in (0, 2):
        cs = out[layer]
        boot_mac, boot_dim = [], []
        for b in range(n_boot):
            cd = G.category_directions(harmful[idx_h[b], layer], labels, harmless[idx_b[b], layer])
            boot_mac.append(G.mean_abs_cos(G.cosine_matrix(cd.units)))
            boot_dim.append(G.effective_dimension(cd.units))
        assert cs.mean_abs_cos_ci is not None
        assert cs.dimension_ci is not None
        lo, hi = stats.percentile_interval(boot_mac)
        assert (cs.mean_abs_cos_ci.lo, cs.mean_abs_cos_ci.hi) == pytest.approx((lo, hi))
        lo, hi = stats.percentile_interval(boot_dim)
        assert (cs.dimension_ci.lo, cs.dimension_ci.hi) == pytest.approx((lo, hi))
        null_mac = []
        for perm in perms:
            cd = G.category_directions(harmful[:, layer], perm, harmless[:, layer])
            null_mac.append(G.mean_abs_cos(G.cosine_matrix(cd.units)))
        assert cs.mean_abs_cos_perm is not None
        np.testing.assert_allclose(cs.mean_abs_cos_perm.null, null_mac, atol=1e-9)
    again = G.cone_statistics(harmful, labels, harmless, n_boot=n_boot, n_perm=n_perm, seed=seed)
    assert again[1].dimension_ci == out[1].dimension_ci
    with pytest.raises(ValueError, match="seed"):
        G.cone_statistics(harmful, labels, harmless, n_boot=3)


def test_permutation_test_arithmetic() -> None:
    pt = G.permutation_test(0.5, [0.1, 0.2, 0.5, 0.9])
    assert pt.percentile == pytest.approx((2 + 0.5) / 4)
    assert pt.p_less == pytest.approx((1 + 3) / 5)
    assert pt.p_greater == pytest.approx((1 + 2) / 5)
    assert math.isnan(G.permutation_test(0.5, [0.1, np.nan]).p_less)


def test_permutation_null_collapses_on_identical_harmful_prompts() -> None:
    # Every relabelling of identical prompts gives the observed cone exactly: the
    # null is a point mass at the observed value, percentile 1/2, both p-values 1.
    rng = np.random.default_rng(2)
    harmful = np.repeat(rng.standard_normal((1, 2, 6)), 12, axis=0)
    harmless = rng.standard_normal((5, 2, 6))
    labels = np.repeat(["a", "b", "c"], 4)
    for cs in G.cone_statistics(harmful, labels, harmless, n_perm=30, seed=0):
        for pt in (cs.mean_abs_cos_perm, cs.dimension_perm):
            assert pt is not None
            assert pt.percentile == 0.5
            assert pt.p_less == 1.0
            assert pt.p_greater == 1.0
            np.testing.assert_allclose(pt.null, pt.observed, atol=1e-9)


def test_permutation_p_values_are_calibrated_under_exchangeable_labels() -> None:
    # Under H0 (harmful prompts i.i.d., so labels are exchangeable) the observed
    # statistic is exchangeable with its permutation replicates: its mid-rank
    # percentile has mean 1/2 and P(p <= a) <= a. Checked over many null datasets.
    n_sets, n_perm = 120, 39
    pct, p_less, p_greater = [], [], []
    labels = np.repeat(["a", "b", "c"], 4)
    for s in range(n_sets):
        rng = np.random.default_rng(1000 + s)
        harmful = rng.standard_normal((12, 1, 5)) + 0.5
        harmless = rng.standard_normal((6, 1, 5))
        cs = G.cone_statistics(harmful, labels, harmless, n_perm=n_perm, seed=s)[0]
        assert cs.mean_abs_cos_perm is not None
        pct.append(cs.mean_abs_cos_perm.percentile)
        p_less.append(cs.mean_abs_cos_perm.p_less)
        p_greater.append(cs.mean_abs_cos_perm.p_greater)
    se = math.sqrt(1 / 12 / n_sets)
    assert abs(np.mean(pct) - 0.5) < 4 * se
    for p in (np.array(p_less), np.array(p_greater)):
        rate = float(np.mean(p <= 0.1))
        assert rate <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / n_sets)


def test_real_category_structure_is_detected_against_permutations() -> None:
    # Strong, orthogonal category offsets: real categories are far less aligned
    # (and higher-dimensional) than random splits of the same prompts.
    harmful, harmless, labels = _cone_data(3, n_per=(8, 8, 8), d=30, spread=4.0)
    cs = G.cone_statistics(harmful, labels, harmless, n_boot=50, n_perm=99, seed=0)[0]
    assert cs.mean_abs_cos_perm is not None
    assert cs.dimension_perm is not None
    assert cs.mean_abs_cos_perm.p_less == pytest.approx(0.01)
    assert cs.dimension_perm.p_greater == pytest.approx(0.01)
    assert cs.dimension_ci is not None
    assert cs.dimension_ci.lo <= cs.dimension_ci.hi


def test_cone_statistics_is_fast_at_seed_scale() -> None:
    rng = np.random.default_rng(4)
    n, n_layers, d = 100, 24, 896
    harmful = rng.standard_normal((n, n_layers, d), dtype=np.float32)
    harmless = rng.standard_normal((n, n_layers, d), dtype=np.float32)
    labels = np.repeat(["w", "f", "i", "c"], 25)
    start = time.perf_counter()
    out = G.cone_statistics(harmful, labels, harmless, n_boot=200, n_perm=200, seed=0)
    elapsed = time.perf_counter() - start
    assert len(out) == n_layers
    assert elapsed < 15.0  # typically well under 1 s


# --------------------------------------------------------------------------- alignment imprint


def test_alignment_imprint_matches_definitions() -> None:
    rng = np.random.default_rng(5)
    r = rng.standard_normal((8, 20)) * np.linspace(1, 4, 8)[:, None] + 0.5
    imp = G.alignment_imprint(r)
    norms = np.linalg.norm(r, axis=1)
    u = r / norms[:, None]
    s = np.linalg.svd(u, compute_uv=False)
    cos = np.abs(u @ u.T)
    np.testing.assert_allclose(imp.strengths, norms)
    assert imp.gini == pytest.approx(stats.gini(norms))
    assert imp.effective_rank == pytest.approx(_dims_by_svd(r)[0])
    assert imp.spectral_decay == pytest.approx(math.log(s.max() / s.min()))
    assert imp.smoothness == pytest.approx(np.mean([cos[i, i + 1] for i in range(7)]))
    assert imp.tail_bias == pytest.approx(norms[-2:].sum() / norms.sum())
    assert imp.orthogonality == pytest.approx(np.mean(1 - cos[np.triu_indices(8, 1)]))


def test_alignment_imprint_extremes() -> None:
    v = np.random.default_rng(6).standard_normal(12)
    same = np.outer(np.ones(6), v)
    imp = G.alignment_imprint(same)
    assert imp.gini == pytest.approx(0.0)
    assert imp.effective_rank == pytest.approx(1.0)
    assert imp.smoothness == pytest.approx(1.0)
    assert imp.orthogonality == pytest.approx(0.0, abs=1e-12)
    assert imp.spectral_decay == math.inf  # rank 1 stack
    assert imp.tail_bias == pytest.approx(2 / 6)  # ceil(6 / 4) = 2 tail layers
    ortho = G.alignment_imprint(_orthonormal(5, 12, 0) * 3.0)
    assert ortho.effective_rank == pytest.approx(5.0)
    assert ortho.spectral_decay == pytest.approx(0.0, abs=1e-9)
    assert ortho.smoothness == pytest.approx(0.0, abs=1e-12)
    assert ortho.orthogonality == pytest.approx(1.0)
    # More layers than dimensions: necessarily rank-deficient.
    assert G.alignment_imprint(np.random.default_rng(0).standard_normal((6, 4))).spectral_decay == (
        math.inf
    )
    with pytest.raises(ValueError):
        G.alignment_imprint(np.ones((1, 4)))


def test_bootstrap_alignment_imprint() -> None:
    rng = np.random.default_rng(7)
    n_layers, d = 6, 10
    signal = np.linspace(1.0, 5.0, n_layers)[:, None] * G.cosine_matrix(np.eye(d))[0]
    harmful = rng.standard_normal((30, n_layers, d)) * 0.3 + signal
    harmless = rng.standard_normal((25, n_layers, d)) * 0.3
    obs = G.alignment_imprint_from_activations(harmful, harmless)
    boot = G.bootstrap_alignment_imprint(harmful, harmless, n_boot=120, seed=0, chunk=50)
    assert set(boot) == set(G.IMPRINT_FEATURES)
    for key, est in boot.items():
        assert est.value == pytest.approx(getattr(obs, key))
        assert est.lo <= est.hi
    assert boot["tail_bias"].contains(obs.tail_bias)
    assert boot["gini"].contains(obs.gini)
    again = G.bootstrap_alignment_imprint(harmful, harmless, n_boot=120, seed=0, chunk=7)
    assert again == boot  # chunking does not change the replicates


# --------------------------------------------------------------------------- cross-layer


def test_cross_layer_alignment_clusters_and_persistence() -> None:
    rng = np.random.default_rng(8)
    a, b = _orthonormal(2, 16, 1)
    noise = rng.standard_normal((6, 16)) * 0.05
    dirs = np.stack([a, a, a, b, b, b]) + noise
    cla = G.cross_layer_alignment(dirs)
    assert cla.threshold == G.ALIGNMENT_ABS_COS_THRESHOLD
    assert cla.clusters == ((0, 2), (3, 5))
    np.testing.assert_array_equal(cla.persistence, [2, 1, 0, 2, 1, 0])
    np.testing.assert_allclose(cla.abs_cos, np.abs(G.cosine_matrix(dirs)))
    # Sign does not matter: |cos|.
    flipped = dirs * np.array([1, -1, 1, 1, -1, 1])[:, None]
    assert G.cross_layer_alignment(flipped).clusters == cla.clusters


def test_cross_layer_clusters_need_every_pair_above_threshold() -> None:
    # A slow drift: neighbours stay close but the ends do not.
    angles = np.linspace(0, 1.2, 7)
    dirs = np.c_[np.cos(angles), np.sin(angles), np.zeros(7)]
    cla = G.cross_layer_alignment(dirs, threshold=0.9)
    for start, end in cla.clusters:
        block = cla.abs_cos[start : end + 1, start : end + 1]
        assert block.min() >= 0.9
    assert [i for c in cla.clusters for i in range(c[0], c[1] + 1)] == list(range(7))
    assert len(cla.clusters) > 1


def test_detected_proceeds_localisation() -> None:
    rng = np.random.default_rng(9)
    d = 5
    u = np.tile(np.eye(d)[0], (2, 1))  # [L=2, d]
    harmful = rng.standard_normal((40, 2, d)) * 0.1
    harmful[:, 0, 0] += 2.0  # layer 0 detects harm
    harmful[:, 1, 0] += np.r_[np.full(20, 2.0), np.full(20, -2.0)]  # layer 1 decides
    harmless = rng.standard_normal((30, 2, d)) * 0.1
    refused = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    loc = G.detected_proceeds_localisation(u, harmful, harmless, refused)
    assert loc[0].detection_auc == pytest.approx(1.0)
    assert loc[0].decision_auc == pytest.approx(0.5, abs=0.2)
    assert loc[0].n_detected_proceeds == 20  # flagged as harmful, yet complied
    assert loc[1].decision_auc == pytest.approx(1.0)
    assert loc[1].n_detected_proceeds == 0
    assert loc[1].n_complied == 20
    only_refused = G.detected_proceeds_localisation(u, harmful, harmless, np.ones(40, bool))
    assert math.isnan(only_refused[0].decision_auc)
