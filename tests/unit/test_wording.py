"""Wording control: planted style and harm features on synthetic per-layer scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probes.wording import WordingStatus, wording_control, wording_share


def _planted(n: int = 200, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Scores of three layers: 0 carries a pure style feature (AdvBench wording, shared by
    a request and its twin), 1 a pure harm feature, 2 nothing.

    Style: harmful requests and their twins score 2, the hand-written harmless set 0.
    Harm: harmful requests score 2, twins and the harmless set 0.
    """
    rng = np.random.default_rng(seed)

    def noise(k: int) -> np.ndarray:
        return rng.normal(size=(k, 3))

    style = np.array([2.0, 0.0, 0.0])
    harm = np.array([0.0, 2.0, 0.0])
    unmatched_pos = noise(n) + style + harm
    unmatched_neg = noise(n)
    matched_pos = noise(n) + style + harm
    matched_neg = noise(n) + style
    return unmatched_pos, unmatched_neg, matched_pos, matched_neg


def test_pure_style_feature_is_wording_driven_and_harm_feature_is_not() -> None:
    rows = wording_control(*_planted(), layers=[4, 5, 6], n_boot=500, seed=1)
    style, harm, nothing = rows
    assert [r.layer for r in rows] == [4, 5, 6]
    assert style.status is WordingStatus.WORDING_DRIVEN and style.wording_driven
    assert style.d_unmatched.lo > 1.0 and style.d_matched.lo <= 0.0
    assert style.share.value > 0.85 and style.share.hi == 1.0
    assert harm.status is WordingStatus.SURVIVES_MATCHING and not harm.wording_driven
    assert harm.d_matched.lo > 1.0 and harm.share.lo == 0.0 and harm.share.hi < 0.3
    assert nothing.status is WordingStatus.NO_SEPARATION and not nothing.wording_driven


def test_mixed_feature_shares_half_its_separation_with_wording() -> None:
    rng = np.random.default_rng(3)
    n = 400
    pu = rng.normal(size=(n, 1)) + 2.0  # style 1 + harm 1
    nu = rng.normal(size=(n, 1))
    pm = rng.normal(size=(n, 1)) + 2.0
    nm = rng.normal(size=(n, 1)) + 1.0  # the twin keeps the style
    (row,) = wording_control(pu, nu, pm, nm, n_boot=1000, seed=0)
    assert row.status is WordingStatus.SURVIVES_MATCHING
    assert row.share.contains(0.5) and row.share.lo > 0.2 and row.share.hi < 0.8
    assert row.d_matched.contains(1.0) and row.d_unmatched.contains(2.0)


def test_pairs_are_resampled_together() -> None:
    """A twin that tracks its request (shared pair effect) gives a tight paired interval
    only if rows stay paired in the bootstrap; the point estimate is unpaired d."""
    rng = np.random.default_rng(5)
    pair_effect = rng.normal(size=(100, 1)) * 5.0
    pm = pair_effect + 0.3 + rng.normal(size=(100, 1)) * 0.1
    nm = pair_effect + rng.normal(size=(100, 1)) * 0.1
    pu, nu = rng.normal(size=(100, 1)) + 3.0, rng.normal(size=(100, 1))
    a = wording_control(pu, nu, pm, nm, n_boot=300, seed=7)[0]
    b = wording_control(pu, nu, pm, nm, n_boot=300, seed=7)[0]
    assert a == b
    shuffled = wording_control(pu, nu, pm, rng.permutation(nm), n_boot=300, seed=7)[0]
    assert a.d_matched.value == pytest.approx(shuffled.d_matched.value)
    width = a.d_matched.hi - a.d_matched.lo
    assert width < 0.5 * (shuffled.d_matched.hi - shuffled.d_matched.lo)


def test_wording_share_definition_and_edges() -> None:
    got = wording_share([2.0, 2.0, 2.0, 2.0, 0.0, -1.0, math.inf, 2.0, math.nan],
                        [1.0, 0.0, 3.0, -1.0, 1.0, 1.0, 1.0, math.nan, 1.0])
    expected = [0.5, 1.0, 0.0, 1.0, math.nan, math.nan, math.nan, math.nan, math.nan]
    np.testing.assert_array_equal(got, expected)
    assert wording_share(2.0, math.inf) == 0.0


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((5, 3), (5, 3), (5, 3), (4, 3)), "aligned pairs"),
        (((5, 3), (5, 2), (5, 3), (5, 3)), "same number of layers"),
        (((5,), (5, 3), (5, 3), (5, 3)), r"unmatched_pos must be \[prompts, layers\]"),
        (((1, 3), (5, 3), (5, 3), (5, 3)), "at least 2 prompts"),
    ],
)
def test_bad_shapes_are_refused(shapes: tuple[tuple[int, ...], ...], match: str) -> None:
    arrays = [np.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        wording_control(*arrays, n_boot=10, seed=0)


def test_layer_names_must_match_columns() -> None:
    with pytest.raises(ValueError, match="layers names 2 columns"):
        wording_control(*_planted(20), layers=[0, 1], n_boot=10, seed=0)


def test_constant_layer_has_no_separation() -> None:
    pu, nu, pm, nm = (np.ones((10, 1)) for _ in range(4))
    (row,) = wording_control(pu, nu, pm, nm, n_boot=50, seed=0)
    assert row.status is WordingStatus.NO_SEPARATION and math.isnan(row.share.value)
