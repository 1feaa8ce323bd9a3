"""DETECTED_PROCEEDS localisation statistics (probes.geometry, "proceed layers")."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from probes.geometry import (
    bootstrap_proceed_layers,
    decision_p_values,
    detected_proceeds_localisation,
    detection_peak_layer,
    midpoint_thresholds,
    onset_layer,
    proceed_layers,
    saturation_layer,
)
from probes.stats import auc, holm


def _synthetic(seed: int = 0, n: int = 80, m: int = 60, n_layers: int = 10
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection appears from layer 2 on; refused prompts project higher from layer 6 on."""
    rng = np.random.default_rng(seed)
    refused = np.arange(n) < n // 2
    ph = rng.normal(size=(n, n_layers))
    pb = rng.normal(size=(m, n_layers))
    ph[:, 2:] += 4.0
    ph[refused, 6:] += 2.0
    return ph, pb, refused


def test_decision_p_values_match_scipy_mann_whitney() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.3, 1, 23), rng.normal(0, 1, 31)
    p = decision_p_values(auc(x, y), 23, 31)
    ref = scipy.stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue
    assert float(p) == pytest.approx(ref, rel=1e-9)
    assert np.isnan(decision_p_values(0.7, 0, 5))


def test_layer_rules() -> None:
    assert saturation_layer([0.5, 0.7, 0.98, 1.0, 0.99]) == 2  # 0.98 - 0.5 >= 0.95 * 0.5
    assert saturation_layer([0.5, 0.74, 0.76, 1.0], fraction=0.5) == 2
    assert detection_peak_layer([0.9, 1.0, 1.0, 0.99], [3.0, 4.0, 6.0, 9.0]) == 2
    assert onset_layer([0.5, 0.2, 0.01, 0.001]) == 2
    assert onset_layer([0.5, 0.2]) is None
    with pytest.raises(ValueError):
        saturation_layer([0.5, float("nan")])


def test_proceed_layers_find_the_planted_layers() -> None:
    ph, pb, refused = _synthetic()
    layers = tuple(range(1, 11))  # model layer numbers of the columns
    loc = proceed_layers(ph, pb, refused, layers)
    assert loc.saturation_layer == 3  # column 2
    assert loc.decision_onset_layer == 7  # column 6
    assert loc.decision_saturation_layer == 7
    assert loc.decision_peak_layer is not None and loc.decision_peak_layer >= 7
    np.testing.assert_allclose(loc.decision_p_holm, holm(loc.decision_p), rtol=1e-12)
    for j in (0, 5, 9):
        assert loc.detection_auc[j] == pytest.approx(auc(ph[:, j], pb[:, j]))
        assert loc.decision_auc[j] == pytest.approx(auc(ph[refused, j], ph[~refused, j]))


def test_proceed_layers_without_refusals_leave_the_decision_undefined() -> None:
    ph, pb, _ = _synthetic()
    loc = proceed_layers(ph, pb, np.zeros(len(ph), dtype=bool))
    assert loc.decision_onset_layer is None and loc.decision_peak_layer is None
    assert loc.decision_saturation_layer is None
    assert np.isnan(loc.decision_auc).all()
    with pytest.raises(ValueError, match="refused and complied"):
        bootstrap_proceed_layers(ph, pb, np.zeros(len(ph), dtype=bool), at_layer=3, n_boot=5,
                                 seed=0)


def test_bootstrap_is_seeded_and_centred() -> None:
    ph, pb, refused = _synthetic(2)
    a = bootstrap_proceed_layers(ph, pb, refused, at_layer=4, n_boot=200, seed=3)
    b = bootstrap_proceed_layers(ph, pb, refused, at_layer=4, n_boot=200, seed=3)
    np.testing.assert_array_equal(a.auc_difference, b.auc_difference)
    loc = proceed_layers(ph, pb, refused)
    point = loc.detection_auc[4] - loc.decision_auc[4]
    lo, hi = np.quantile(a.auc_difference, [0.025, 0.975])
    assert lo <= point <= hi
    assert set(np.unique(a.saturation)) <= {1.0, 2.0, 3.0}
    assert set(np.unique(a.decision_saturation)) <= {6.0, 7.0, 8.0, 9.0}  # the plateau


def test_train_thresholds_are_used_when_given() -> None:
    rng = np.random.default_rng(4)
    n, m, n_layers, d = 30, 20, 3, 5
    h = rng.normal(size=(n, n_layers, d)) + 1.0
    z = rng.normal(size=(m, n_layers, d))
    u = np.eye(n_layers, d)
    refused = rng.random(n) < 0.4
    thr = np.array([-10.0, 10.0, 0.5])
    rows = detected_proceeds_localisation(u, h, z, refused, thr)
    assert rows[0].n_detected_proceeds == int((~refused).sum())  # everything is detected
    assert rows[1].n_detected_proceeds == 0
    np.testing.assert_array_equal(rows[2].detected_proceeds, (h[:, 2, 2] > 0.5) & ~refused)
    in_sample = detected_proceeds_localisation(u, h, z, refused)
    mid = midpoint_thresholds(np.einsum("nld,ld->nl", h, u), np.einsum("nld,ld->nl", z, u))
    assert [r.threshold for r in in_sample] == pytest.approx(mid.tolist())
    with pytest.raises(ValueError, match="thresholds"):
        detected_proceeds_localisation(u, h, z, refused, thr[:2])
