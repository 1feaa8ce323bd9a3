"""probes.method_comparison: the accuracy bootstrap against scipy's stratified bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from probes.method_comparison import accuracy_bootstrap


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
