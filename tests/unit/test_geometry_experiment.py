"""Tests of the geometry pieces the concept-cone and imprint experiments add:
bootstrap intervals, layer filtering, depth trends, ablation specificity, provider
distances, invariances of the cone statistics, and the experiments' prompt selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes import geometry as G
from probes import stats
from probes.geometry import GeometryLabel

FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _cone_data(seed: int, n_per: tuple[int, ...] = (6, 6, 6, 6), d: int = 12,
               spread: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"c{i}" for i in range(len(n_per))], n_per)
    codes = np.unique(labels, return_inverse=True)[1]
    offsets = rng.standard_normal((len(n_per), 3, d)) * spread
    harmful = rng.standard_normal((labels.size, 3, d)) + 2.0 + offsets[codes]
    harmless = rng.standard_normal((10, 3, d))
    return harmful, harmless, labels


# --------------------------------------------------------------------------- intervals


def test_bootstrap_interval_basic_reverses_percentile_and_clips() -> None:
    reps = np.linspace(0.0, 1.0, 101)
    lo, hi = stats.percentile_interval(reps)
    assert G.bootstrap_interval(0.3, reps) == pytest.approx((lo, hi))
    assert G.bootstrap_interval(0.3, reps, kind="basic") == pytest.approx((0.6 - hi, 0.6 - lo))
    # basic = (0.6 - 0.975, 0.6 - 0.025) = (-0.375, 0.575), clipped to the limits
    assert G.bootstrap_interval(0.3, reps, kind="basic", limits=(0.0, 0.5)) == pytest.approx(
        (0.0, 0.5))
    assert all(math.isnan(v) for v in G.bootstrap_interval(0.3, [0.1, np.nan], kind="basic"))
    with pytest.raises(ValueError, match="kind"):
        G.bootstrap_interval(0.3, reps, kind="bca")  # type: ignore[arg-type]


def test_basic_interval_undoes_a_resampling_shift() -> None:
    # Replicates shifted by +b from the estimate (as noise shifts the dimension up):
    # the basic interval is centred at estimate - b, the percentile one at estimate + b.
    rng = np.random.default_rng(0)
    reps = 2.5 + 0.4 + rng.normal(0, 0.05, 2000)
    lo, hi = G.bootstrap_interval(2.5, reps, kind="basic")
    assert (lo + hi) / 2 == pytest.approx(2.1, abs=0.02)
    plo, phi = G.bootstrap_interval(2.5, reps)
    assert (plo + phi) / 2 == pytest.approx(2.9, abs=0.02)


def test_cone_statistics_basic_interval_uses_the_stored_replicates() -> None:
    harmful, harmless, labels = _cone_data(1)
    pct = G.cone_statistics(harmful, labels, harmless, n_boot=40, seed=3)
    basic = G.cone_statistics(harmful, labels, harmless, n_boot=40, seed=3, interval="basic")
    for a, b in zip(pct, basic, strict=True):
        assert a.dimension_boot is not None
        assert b.dimension_boot is not None
        assert a.mean_abs_cos_boot is not None
        np.testing.assert_array_equal(a.dimension_boot, b.dimension_boot)
        assert a.dimension_ci is not None
        assert b.dimension_ci is not None
        assert b.mean_abs_cos_ci is not None
        assert (a.dimension_ci.lo, a.dimension_ci.hi) == pytest.approx(
            stats.percentile_interval(a.dimension_boot))
        assert (b.dimension_ci.lo, b.dimension_ci.hi) == pytest.approx(G.bootstrap_interval(
            b.effective_dimension, b.dimension_boot, kind="basic", limits=(1.0, 4.0)))
        assert (b.mean_abs_cos_ci.lo, b.mean_abs_cos_ci.hi) == pytest.approx(
            G.bootstrap_interval(b.mean_abs_cos, a.mean_abs_cos_boot, kind="basic",
                                 limits=(0.0, 1.0)))
        assert b.dimension_ci.method == "bootstrap-basic-within-category"
        assert 1.0 <= b.dimension_ci.lo <= b.dimension_ci.hi <= 4.0


def test_imprint_replicates_match_bootstrap_intervals() -> None:
    rng = np.random.default_rng(2)
    harmful = rng.standard_normal((20, 5, 8)) + np.linspace(0.5, 3, 5)[None, :, None]
    harmless = rng.standard_normal((15, 5, 8))
    reps = G.alignment_imprint_replicates(harmful, harmless, n_boot=60, seed=1, chunk=7)
    assert set(reps) == set(G.IMPRINT_FEATURES)
    assert all(v.shape == (60,) for v in reps.values())
    for kind in ("percentile", "basic"):
        est = G.bootstrap_alignment_imprint(harmful, harmless, n_boot=60, seed=1,
                                            interval=kind)  # type: ignore[arg-type]
        for f in G.IMPRINT_FEATURES:
            assert (est[f].lo, est[f].hi) == pytest.approx(
                G.bootstrap_interval(est[f].value, reps[f], kind=kind))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- layers


def test_informative_layers_drop_zero_directions() -> None:
    r = np.ones((5, 3))
    r[0] = 0.0
    r[3] = 1e-12
    assert G.informative_layers(r) == [1, 2, 4]
    assert G.informative_layers(np.zeros((3, 2))) == []


def test_constant_layer_is_undefined_not_an_error() -> None:
    # resid_pre of layer 0 at the last token: every prompt has the same activation.
    harmful, harmless, labels = _cone_data(4)
    harmful[:, 0] = 0.5
    harmless[:, 0] = 0.5
    out = G.cone_statistics(harmful, labels, harmless, n_boot=5, n_perm=5, seed=0)
    assert out[0].label is GeometryLabel.UNDEFINED
    assert math.isnan(out[0].effective_dimension)
    assert out[1].label is not GeometryLabel.UNDEFINED


def test_label_share() -> None:
    assert G.label_share([0.5, 0.95, 0.85], [3.0, 1.2, 1.6]) == pytest.approx(1 / 3)
    assert G.label_share([0.95], [1.2], GeometryLabel.LINEAR) == 1.0
    with pytest.raises(ValueError):
        G.label_share([0.5], [1.0, 2.0])


@FAST
@given(seed=SEEDS, n_layers=st.integers(3, 12))
def test_layer_trend_matches_scipy_per_replicate(seed: int, n_layers: int) -> None:
    rng = np.random.default_rng(seed)
    layers = np.arange(n_layers)
    values = rng.standard_normal(n_layers)
    reps = rng.standard_normal((30, n_layers))
    est = G.layer_trend(layers, values, reps)
    assert est.value == pytest.approx(scipy.stats.spearmanr(layers, values).statistic)
    direct = [scipy.stats.spearmanr(layers, row).statistic for row in reps]
    assert (est.lo, est.hi) == pytest.approx(stats.percentile_interval(direct))
    basic = G.layer_trend(layers, values, reps, interval="basic")
    assert -1.0 <= basic.lo <= basic.hi <= 1.0


def test_layer_trend_sign_and_no_replicates() -> None:
    falling = G.layer_trend([0, 1, 2, 3], [4.0, 3.0, 2.5, 1.0])
    assert falling.value == pytest.approx(-1.0)
    assert math.isnan(falling.lo)
    with pytest.raises(ValueError):
        G.layer_trend([0, 1], [1.0, 2.0])
    with pytest.raises(ValueError):
        G.layer_trend([0, 1, 2], [1.0, 2.0, 3.0], np.zeros((4, 2)))


# --------------------------------------------------------------------------- invariances


@FAST
@given(seed=SEEDS, scale=st.floats(0.01, 100.0), shift=st.floats(-5.0, 5.0))
def test_cone_invariant_to_common_scale_and_offset(seed: int, scale: float, shift: float) -> None:
    # A common offset cancels in every mu_H,c - mu_B; a positive scale leaves cosines alone.
    harmful, harmless, labels = _cone_data(seed)
    ref = G.cone_statistics(harmful, labels, harmless)
    out = G.cone_statistics(harmful * scale + shift, labels, harmless * scale + shift)
    for a, b in zip(ref, out, strict=True):
        np.testing.assert_allclose(b.cosines, a.cosines, atol=1e-6)
        assert b.effective_dimension == pytest.approx(a.effective_dimension, rel=1e-6)
        np.testing.assert_allclose(b.strengths, a.strengths * scale, rtol=1e-6)


@FAST
@given(seed=SEEDS)
def test_cone_invariant_to_renaming_and_reordering(seed: int) -> None:
    # Renaming categories (a bijection) and reordering prompts changes no observed number;
    # the statistics follow the categories (sorted order) and cosine rows move with them.
    harmful, harmless, labels = _cone_data(seed, n_per=(5, 7, 6))
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.size)
    rename = {"c0": "z", "c1": "a", "c2": "m"}
    new_labels = np.array([rename[x] for x in labels[order]])
    ref = G.cone_statistics(harmful, labels, harmless)[1]
    out = G.cone_statistics(harmful[order], new_labels, harmless[rng.permutation(10)])[1]
    assert out.mean_abs_cos == pytest.approx(ref.mean_abs_cos, rel=1e-9)
    assert out.effective_dimension == pytest.approx(ref.effective_dimension, rel=1e-9)
    idx = [list(out.categories).index(rename[c]) for c in ref.categories]
    np.testing.assert_allclose(out.cosines[np.ix_(idx, idx)], ref.cosines, atol=1e-9)
    np.testing.assert_allclose(out.strengths[idx], ref.strengths, rtol=1e-9)


def test_permutation_null_is_symmetric_in_the_categories() -> None:
    # Relabelling categories by a bijection draws the same permutations of codes, so the
    # null distribution of mean |cos| is unchanged (the null ignores label names).
    harmful, harmless, labels = _cone_data(5)
    a = G.cone_statistics(harmful, labels, harmless, n_perm=50, seed=9)[2]
    renamed = np.array([{"c0": "c1", "c1": "c0"}.get(x, x) for x in labels])
    b = G.cone_statistics(harmful, renamed, harmless, n_perm=50, seed=9)[2]
    assert a.mean_abs_cos_perm is not None
    assert b.mean_abs_cos_perm is not None
    np.testing.assert_allclose(np.sort(a.mean_abs_cos_perm.null),
                               np.sort(b.mean_abs_cos_perm.null), atol=1e-9)
    assert a.mean_abs_cos_perm.p_less == pytest.approx(b.mean_abs_cos_perm.p_less)


# --------------------------------------------------------------------------- causal check


def test_ablation_specificity_by_hand() -> None:
    # drops[a, i]: prompt i's drop under ablation a. Categories a (2 prompts), b (1), c (1).
    drops = np.array([[4.0, 2.0, 1.0, 1.0],
                      [0.0, 0.0, 3.0, 1.0],
                      [1.0, 1.0, 1.0, 2.0]])
    labels = ["a", "a", "b", "c"]
    spec = G.ablation_specificity(drops, labels, n_boot=50, seed=0)
    expected = np.array([[3.0, 1.0, 1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 2.0]])
    np.testing.assert_allclose(spec.drop_matrix, expected)
    np.testing.assert_allclose(spec.on_target, [3.0, 3.0, 2.0])
    np.testing.assert_allclose(spec.off_target, [1.0, 0.5, 1.0])
    assert [e.value for e in spec.per_category] == pytest.approx([2.0, 2.5, 1.0])
    assert spec.overall.value == pytest.approx((2.0 + 2.5 + 1.0) / 3)
    np.testing.assert_array_equal(spec.counts, [2, 1, 1])
    # Categories of one prompt cannot vary under resampling within category.
    assert spec.per_category[1].lo == spec.per_category[1].hi == pytest.approx(2.5)
    with pytest.raises(ValueError):
        G.ablation_specificity(drops[:2], labels, n_boot=5, seed=0)


def test_ablation_specificity_bootstrap_equals_direct_recomputation() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(["a", "b", "c"], [4, 5, 3])
    drops = rng.standard_normal((3, 12))
    spec = G.ablation_specificity(drops, labels, n_boot=25, seed=11)
    codes = np.unique(labels, return_inverse=True)[1]
    idx = stats.resample_within_groups(codes, 25, np.random.default_rng(11))
    overall = []
    for row in idx:
        m = np.array([[drops[a, row][codes == c].mean() for c in range(3)] for a in range(3)])
        on = np.diag(m)
        off = (m.sum(axis=1) - on) / 2
        overall.append(float((on - off).mean()))
    assert (spec.overall.lo, spec.overall.hi) == pytest.approx(
        stats.percentile_interval(overall))


def test_uniform_ablation_has_zero_specificity() -> None:
    # Every ablation lowers every category equally: on = off, specificity exactly 0.
    drops = np.ones((4, 12)) * 1.7
    spec = G.ablation_specificity(drops, np.repeat(list("abcd"), 3), n_boot=20, seed=0)
    assert spec.overall.value == pytest.approx(0.0, abs=1e-12)
    assert spec.overall.lo == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- provider effect


def test_provider_effect_untestable_reasons() -> None:
    assert "fewer than two providers" in str(G.provider_effect_untestable(["A"]))
    assert "fewer than two providers" in str(G.provider_effect_untestable(["A", "A", None]))
    reason = G.provider_effect_untestable(["Alibaba Qwen", "Hugging Face"])
    assert reason is not None
    assert "exactly one model per provider" in reason
    assert "undefined" in reason
    assert G.provider_effect_untestable(["A", "A", "B"]) is None
    assert "fewer than two" in str(G.provider_effect_untestable(["A", "", None]))


def test_provider_distances_by_hand() -> None:
    feats = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0]])
    within, between = G.provider_distances(feats, ["A", "A", "B"], np.array([1.0, 2.0]))
    assert within == pytest.approx(1.0)
    assert between == pytest.approx((2.0 + math.sqrt(1 + 4)) / 2)
    stacked = np.stack([feats, feats * 2])
    w, b = G.provider_distances(stacked, ["A", "A", "B"], np.array([1.0, 2.0]))
    np.testing.assert_allclose(w, [1.0, 2.0])
    np.testing.assert_allclose(b, [between, 2 * between])
    with pytest.raises(ValueError):
        G.provider_distances(feats, ["A", "B", "C"], np.ones(2))
    np.testing.assert_allclose(G.feature_scale(np.array([[1.0, 3.0], [3.0, 3.0]])),
                               [math.sqrt(2.0), 1.0])


def test_clustered_providers_give_a_ratio_below_one() -> None:
    rng = np.random.default_rng(0)
    centres = {"A": np.zeros(6), "B": np.full(6, 3.0)}
    provs = ["A", "A", "A", "B", "B"]
    feats = np.stack([centres[p] + rng.normal(0, 0.3, 6) for p in provs])
    w, b = G.provider_distances(feats, provs, G.feature_scale(feats))
    assert w / b < 0.5


# --------------------------------------------------------------------------- prompt selection


def test_cone_and_causal_prompts_are_balanced_and_held_out(tmp_path: Path) -> None:
    from fixtures.options import PROFILES
    from fixtures.workbench import Progress, Workbench
    from probes.cache import ActivationCache
    from probes.concept_cone import (
        MIN_CATEGORIES,
        causal_layer,
        causal_prompts,
        cone_prompts,
    )
    from probes.models import load
    from tests.helpers import tiny_config

    for profile in ("quick", "full"):
        cfg = tiny_config(profile, cache_dir=tmp_path, use_cache=False, batch_size=8)
        bench = Workbench(load("tiny-llama"), cfg, ActivationCache(tmp_path, enabled=False),
                          Progress(lambda _m: None))
        split = bench.harmful_split
        cone = cone_prompts(split, PROFILES[profile].cone_per_category, 0)
        assert cone is not None
        cats = cone.label("category")
        counts = {c: cats.count(c) for c in set(cats)}
        assert len(counts) >= MIN_CATEGORIES
        assert set(counts.values()) == {PROFILES[profile].cone_per_category}
        assert min(counts.values()) >= 15
        fit_pool = set(split.train.texts) | set(split.val.texts)
        assert set(cone.texts) <= fit_pool
        n = PROFILES[profile].cone_per_category
        assert cone_prompts(split, n, 0) == cone  # seeded: the same prompts again
        held = causal_prompts(split.test, sorted(counts),
                              PROFILES[profile].cone_causal_per_category, 0)
        assert not set(held.texts) & set(cone.texts)
        assert set(held.texts) <= set(split.test.texts)
        held_counts = {c: held.label("category").count(c) for c in counts}
        assert set(held_counts.values()) == {PROFILES[profile].cone_causal_per_category}
    assert causal_layer(24) == 12
    assert causal_layer(30) == 14
