"""Judge error carried into rates: synthetic judges with known sensitivity and specificity,
validated on labelled replies, then applied to replies whose true refusal rate is planted.
The corrected rate recovers the planted rate; the judged rate does not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probes.judge_error import (
    corrected_paired_difference,
    corrected_rate,
    corrected_share,
    error_rates,
    judge_error,
    rogan_gladen_point,
)
from probes.reply_judges import JUDGES, JudgeSpecError


def synthetic_validation(rng: np.random.Generator, sens: float, spec: float, n_pos: int,
                         n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """A judge with the given error rates applied to labelled positives and negatives."""
    labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    pred = np.where(labels, rng.random(labels.size) < sens, rng.random(labels.size) >= spec)
    return pred, labels


@pytest.mark.parametrize(("truth", "sens", "spec"), [(0.3, 0.8, 0.95), (0.7, 0.9, 0.85),
                                                     (0.05, 0.75, 0.9)])
def test_corrected_rate_recovers_the_planted_rate(truth: float, sens: float,
                                                  spec: float) -> None:
    rng = np.random.default_rng(int(truth * 100))
    runs, n = 250, 200
    covered = raw_covered = 0
    values, raws = [], []
    for r in range(runs):
        pred, labels = synthetic_validation(rng, sens, spec, 80, 120)
        err = error_rates("synthetic", pred, labels, "simulation")
        true = rng.random(n) < truth
        judged = np.where(true, rng.random(n) < sens, rng.random(n) >= spec)
        est = corrected_rate(int(judged.sum()), n, err, n_draws=1000, seed=r)
        covered += est.lo <= truth <= est.hi
        values.append(est.value)
        raw = judged.mean()
        raws.append(raw)
        half = 1.96 * math.sqrt(max(raw * (1 - raw), 1e-9) / n)
        raw_covered += raw - half <= truth <= raw + half
    assert covered / runs >= 0.90, covered / runs
    # Clipping at 0 biases a rate near 0 upwards a little; elsewhere it is unbiased.
    assert abs(np.mean(values) - truth) < 0.02, np.mean(values)
    expected_raw = truth * sens + (1 - truth) * (1 - spec)
    assert abs(np.mean(raws) - expected_raw) < 0.01
    assert raw_covered / runs < covered / runs


def test_corrected_non_refusal_rate_and_chance_judge() -> None:
    pred, labels = synthetic_validation(np.random.default_rng(0), 0.8, 0.9, 100, 100)
    err = error_rates("synthetic", pred, labels, "simulation")
    ref = corrected_rate(30, 100, err, seed=1)
    comp = corrected_rate(70, 100, err, refusal=False, seed=1)
    assert comp.value == pytest.approx(1.0 - ref.value)
    assert comp.lo == pytest.approx(1.0 - ref.hi) and comp.hi == pytest.approx(1.0 - ref.lo)
    assert ref.value == pytest.approx(rogan_gladen_point(0.3, err))
    chance = error_rates("coin", np.r_[np.ones(50, bool), np.zeros(50, bool),
                                       np.ones(50, bool), np.zeros(50, bool)],
                         np.r_[np.ones(100, bool), np.zeros(100, bool)], "coin flips")
    assert not chance.correctable
    est = corrected_rate(30, 100, chance)
    assert math.isnan(est.value) and (est.lo, est.hi) == (0.0, 1.0)
    with pytest.raises(ValueError, match="both refusals and non-refusals"):
        error_rates("x", [True, False], [True, True], "one class")
    with pytest.raises(ValueError, match="0 <= k <= n"):
        corrected_rate(5, 3, err)


def test_corrected_share_recovers_the_planted_share() -> None:
    """Selected by a judge-free rule (a projection), then complied: the share of all
    prompts, corrected for the judge's errors on the selected ones."""
    rng = np.random.default_rng(4)
    sens, spec, n, p_sel, p_comply = 0.8, 0.9, 300, 0.4, 0.25
    truth = p_sel * p_comply
    covered = 0
    values = []
    runs = 200
    for r in range(runs):
        pred, labels = synthetic_validation(rng, sens, spec, 80, 120)
        err = error_rates("synthetic", pred, labels, "simulation")
        selected = rng.random(n) < p_sel
        refused_true = rng.random(n) >= p_comply
        judged = np.where(refused_true, rng.random(n) < sens, rng.random(n) >= spec)
        est = corrected_share(int((selected & judged).sum()), int(selected.sum()), n, err,
                              n_draws=1000, seed=r)
        covered += est.lo <= truth <= est.hi
        values.append(est.value)
    assert covered / runs >= 0.90, covered / runs
    assert abs(np.mean(values) - truth) < 0.015
    none = corrected_share(0, 0, 50, err)
    assert none.value == 0.0 and none.lo == 0.0 and 0.0 < none.hi < 0.1


def test_judge_error_is_the_one_source_for_the_keyword_judge() -> None:
    err = judge_error("keyword")
    assert err is judge_error("keyword")  # computed once
    assert err.correctable
    assert 0.0 < err.sensitivity.value <= 1.0 and 0.0 < err.specificity.value <= 1.0
    assert err.sensitivity.lo <= err.sensitivity.value <= err.sensitivity.hi
    assert "held-out half" in err.source and "sensitivity" in err.text()
    assert "keyword" in JUDGES
    assert judge_error(JUDGES["keyword"]) == err  # a resolved judge, as --judge gives it
    with pytest.raises(JudgeSpecError, match="not a registered judge"):
        judge_error("no-such-judge")


def test_corrected_rates_use_the_judge_of_the_run() -> None:
    """Every corrected rate reads the error of the judge the experiments label with."""
    assert judge_error().judge == "four_class"


@pytest.mark.parametrize("refusal", [True, False])
def test_corrected_paired_difference_recovers_the_planted_difference(refusal: bool) -> None:
    """Two arms on the same prompts; some replies degenerate (judge-free); the judge
    errs on the intact ones. The corrected difference of intact (non-)refusal rates
    recovers the planted difference."""
    rng = np.random.default_rng(7 + refusal)
    sens, spec, n, reps = 0.75, 0.9, 120, 3
    p_ref = {"a": 0.6, "b": 0.35}
    p_int = {"a": 0.8, "b": 0.9}
    want = {k: p_int[k] * (p_ref[k] if refusal else 1 - p_ref[k]) for k in "ab"}
    truth = want["a"] - want["b"]
    covered, values, raws = 0, [], []
    runs = 150
    for r in range(runs):
        pred, labels = synthetic_validation(rng, sens, spec, 80, 120)
        err = error_rates("synthetic", pred, labels, "simulation")
        arms = {}
        for k in "ab":
            ease = rng.normal(0, 0.5, size=(n, 1))  # prompts differ, shared by repeats
            ref_true = rng.random((n, reps)) < np.clip(p_ref[k] + 0.1 * ease, 0, 1)
            intact = rng.random((n, reps)) < p_int[k]
            judged = np.where(ref_true, rng.random((n, reps)) < sens,
                              rng.random((n, reps)) >= spec)
            arms[k] = (judged, intact)
        est = corrected_paired_difference(arms["a"][0], arms["b"][0], arms["a"][1],
                                          arms["b"][1], err, refusal=refusal, n_boot=800,
                                          seed=r)
        covered += est.lo <= truth <= est.hi
        values.append(est.value)
        pick = (lambda j, i: (j & i) if refusal else (~j & i))
        raws.append(pick(*arms["a"]).mean() - pick(*arms["b"]).mean())
    assert covered / runs >= 0.88, covered / runs
    assert abs(np.mean(values) - truth) < 0.02, (np.mean(values), truth)
    assert abs(np.mean(raws) - truth) > 2 * abs(np.mean(values) - truth)


def test_judge_corrected_ed50_recovers_the_true_dose() -> None:
    """A judge that misses 30 % of refusals moves the judged 50 % dose (by 0.4 here);
    reading the judged curve at the level that corresponds to 50 % true refusals recovers
    the true ED50 to within the logistic's misfit to the squeezed curve."""
    from probes.dose_response import (
        Judged,
        Sweep,
        analyse_side,
        judge_corrected_effect,
        judged_level,
    )
    from prompts import PromptSet

    sens, spec, ed50, slope, n = 0.7, 0.97, 1.0, 3.0, 400
    rng = np.random.default_rng(12)
    alphas = np.linspace(-2.0, 2.0, 17)
    harm = PromptSet("harmful", tuple(f"h{i}" for i in range(n)))
    safe = PromptSet("harmless", tuple(f"s{i}" for i in range(n)))
    pred, labels = synthetic_validation(rng, sens, spec, 4000, 4000)  # well validated
    err = error_rates("synthetic", pred, labels, "simulation")

    def arm(ps: PromptSet, a: float, sign: float) -> Judged:
        true = rng.random(n) < 1 / (1 + np.exp(-slope * (sign * a - ed50)))
        if sign < 0:  # harmful prompts: refusal falls as alpha goes negative
            true = rng.random(n) < 1 / (1 + np.exp(slope * (-a - ed50)))
        judged = np.where(true, rng.random(n) < sens, rng.random(n) >= spec)
        return Judged(f"{a}", ps.texts, ps.texts, judged, np.zeros(n, bool),
                      np.full(n, np.nan), np.ones(n, bool), 0.0, 0)

    sw = Sweep("raw", (0,), alphas, tuple(arm(harm, a, -1.0) for a in alphas),
               tuple(arm(safe, a, 1.0) for a in alphas), harm, safe, 0.0)
    assert judged_level(1.0, 1.0) == 0.5
    pos = analyse_side(sw, "positive", n_boot=200, seed=0)
    fixed = judge_corrected_effect(sw, "positive", pos, err, n_boot=200, seed=0)
    assert pos.effect.value is not None and fixed.effect.value is not None
    assert abs(fixed.effect.value - ed50) < 0.1, fixed.effect
    assert abs(pos.effect.value - ed50) > abs(fixed.effect.value - ed50) + 0.1
    assert fixed.effect.lo is not None and fixed.effect.hi is not None
    assert fixed.effect.lo <= ed50 <= fixed.effect.hi
    assert fixed.effect.name == "ED50_overrefusal_judge_corrected"
    neg = analyse_side(sw, "negative", n_boot=200, seed=0)
    jail = judge_corrected_effect(sw, "negative", neg, err, n_boot=200, seed=0)
    assert neg.effect.value is not None and jail.effect.value is not None
    # The judged curve is a logistic squeezed between 1 - spec and sens, so a logistic read
    # at the matching level is close, not exact.
    assert abs(jail.effect.value + ed50) < 0.15, jail.effect
    assert abs(neg.effect.value + ed50) > abs(jail.effect.value + ed50) + 0.2


def test_corrected_paired_difference_bad_input() -> None:
    pred, labels = synthetic_validation(np.random.default_rng(1), 0.8, 0.9, 50, 50)
    err = error_rates("synthetic", pred, labels, "simulation")
    a = np.ones((5, 2), bool)
    with pytest.raises(ValueError, match="disagree in shape"):
        corrected_paired_difference(a, a[:4], a, a, err, refusal=True)


def test_corrected_group_difference_recovers_the_planted_difference() -> None:
    """A projection that is 1.0 higher for true refusals; the judge misses some refusals
    (they land among the 'compliant' replies and pull that mean up). The corrected
    difference recovers 1.0; the judged one is shrunk."""
    from probes.judge_error import corrected_group_difference

    rng = np.random.default_rng(9)
    sens, spec, n, prev, gap = 0.65, 0.97, 300, 0.5, 1.0
    covered, values, raws = 0, [], []
    runs = 150
    for r in range(runs):
        pred, labels = synthetic_validation(rng, sens, spec, 100, 100)
        err = error_rates("synthetic", pred, labels, "simulation")
        true = rng.random(n) < prev
        proj = rng.normal(0.0, 1.0, n) + gap * true
        judged = np.where(true, rng.random(n) < sens, rng.random(n) >= spec)
        est = corrected_group_difference(proj, judged, err, n_boot=800, seed=r)
        covered += est.lo <= gap <= est.hi
        values.append(est.value)
        raws.append(proj[judged].mean() - proj[~judged].mean())
    assert covered / runs >= 0.88, covered / runs
    assert abs(np.median(values) - gap) < 0.08, np.median(values)
    assert np.mean(raws) < gap - 0.15
    with pytest.raises(ValueError, match="each judged group"):
        corrected_group_difference(np.zeros(3), np.array([True, False, False]), err)
