"""Intervals that include refitting the direction, the per-model coherence rule, and the
over-refusal trend judged only below degeneracy."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from probes import directions as D
from probes.dose_response import (
    COHERENCE_FACTOR,
    COHERENCE_QUANTILE,
    MIN_CALIBRATION_REPLIES,
    Judged,
    Sweep,
    analyse_side,
    calibrate_coherence,
    doses_below_degeneracy,
    with_coherence,
)
from probes.dose_response import Analysis as DoseAnalysis
from probes.method_comparison import (
    MethodResult,
    accuracy_difference,
    mean_accuracy,
    polarity_d,
    refit,
)
from probes.transfer import cross_matrix
from prompts import PromptSet

# --------------------------------------------------------------------------- refits


def _acts(rng: np.random.Generator, n: int, shift: float, d: int = 16, k: int = 2
          ) -> npt.NDArray[np.float64]:
    """[n, k, d] activations: Gaussian noise plus ``shift`` along the first axis."""
    x = rng.standard_normal((n, k, d))
    x[:, :, 0] += shift
    return x


def _result(method: str, trp: np.ndarray, trn: np.ndarray, tep: np.ndarray, ten: np.ndarray,
            n_refit: int) -> MethodResult:
    u = D.fit_direction_per_layer(method, trp, trn, seed=0)  # type: ignore[arg-type]
    evals = D.evaluate_per_layer(u, trp, trn, tep, ten)
    cp, cn = D.heldout_correct(u, trp, trn, tep, ten)
    fits = refit(method, trp, trn, tep, ten, n_refit=n_refit, seed=1)  # type: ignore[arg-type]
    return MethodResult(method, [0, 1], evals, cp, cn, fits)  # type: ignore[arg-type]


def test_refit_interval_keeps_the_value_and_adds_the_fit_variance() -> None:
    rng = np.random.default_rng(0)
    # Few training prompts and weak separation: the fitted direction varies a lot.
    trp, trn = _acts(rng, 8, 0.8), _acts(rng, 8, -0.8)
    tep, ten = _acts(rng, 200, 0.8), _acts(rng, 200, -0.8)
    md = _result("mean_diff", trp, trn, tep, ten, n_refit=40)
    rnd = _result("random", trp, trn, tep, ten, n_refit=40)
    plain = replace(md, refits=None)
    with_fit = mean_accuracy(md, n_boot=2000, seed=3)
    prompts_only = mean_accuracy(plain, n_boot=2000, seed=3)
    assert with_fit.value == prompts_only.value
    assert with_fit.hi - with_fit.lo > 1.5 * (prompts_only.hi - prompts_only.lo)
    assert "refitting on 40 training resamples" in with_fit.method
    diff = accuracy_difference(md, rnd, n_boot=2000, seed=4)
    diff0 = accuracy_difference(plain, replace(rnd, refits=None), n_boot=2000, seed=4)
    assert diff.value == diff0.value
    assert diff.hi - diff.lo >= diff0.hi - diff0.lo


def test_refit_interval_covers_the_expected_accuracy_of_the_method() -> None:
    """The target of a method comparison is the accuracy of the method fitted on a fresh
    training set of this size: the refit interval covers it near nominally, the
    held-out-only interval (which treats the one fit as fixed) far less often."""
    rng = np.random.default_rng(5)
    d, shift, n_train, n_test = 16, 0.6, 6, 60
    # Expected accuracy over training sets, by Monte Carlo on a large test set.
    big_p, big_n = _acts(rng, 4000, shift, d, 1), _acts(rng, 4000, -shift, d, 1)
    accs = []
    for _ in range(400):
        trp, trn = _acts(rng, n_train, shift, d, 1), _acts(rng, n_train, -shift, d, 1)
        u = D.fit_direction_per_layer("mean_diff", trp, trn, seed=0)
        cp, cn = D.heldout_correct(u, trp, trn, big_p, big_n)
        accs.append((cp.sum() + cn.sum()) / (cp.size + cn.size))
    truth = float(np.mean(accs))
    hit_refit = hit_plain = 0
    runs = 120
    for r in range(runs):
        trp, trn = _acts(rng, n_train, shift, d, 1), _acts(rng, n_train, -shift, d, 1)
        tep, ten = _acts(rng, n_test, shift, d, 1), _acts(rng, n_test, -shift, d, 1)
        u = D.fit_direction_per_layer("mean_diff", trp, trn, seed=0)
        evals = D.evaluate_per_layer(u, trp, trn, tep, ten)
        cp, cn = D.heldout_correct(u, trp, trn, tep, ten)
        fits = refit("mean_diff", trp, trn, tep, ten, n_refit=30, seed=r)
        res = MethodResult("mean_diff", [0], evals, cp, cn, fits)
        a = mean_accuracy(res, n_boot=600, seed=r)
        b = mean_accuracy(replace(res, refits=None), n_boot=600, seed=r)
        hit_refit += a.lo <= truth <= a.hi
        hit_plain += b.lo <= truth <= b.hi
    assert hit_refit / runs >= 0.85, hit_refit / runs
    assert hit_plain < hit_refit


def test_polarity_d_interval() -> None:
    rng = np.random.default_rng(1)
    trp, trn = _acts(rng, 30, 1.5), _acts(rng, 30, -1.5)
    tep, ten = _acts(rng, 40, 1.5), _acts(rng, 40, -1.5)
    res = _result("probe", trp, trn, tep, ten, n_refit=10)
    est = polarity_d(res, 0, n_boot=500, seed=2)
    assert est.value == pytest.approx(res.evals[0].cohens_d)
    assert 0.0 < est.lo <= est.value <= est.hi
    # No separation: the interval straddles 0, so "polarity right" is not claimed.
    flat = _result("probe", _acts(rng, 30, 0.0), _acts(rng, 30, 0.0), _acts(rng, 40, 0.0),
                   _acts(rng, 40, 0.0), n_refit=10)
    est0 = polarity_d(flat, 1, n_boot=500, seed=2)
    assert est0.lo < 0.0 < est0.hi
    with pytest.raises(ValueError, match="refits"):
        polarity_d(replace(res, refits=None), 0, n_boot=10, seed=0)


def test_cross_matrix_refit_keeps_the_matrix_and_widens_the_interval() -> None:
    rng = np.random.default_rng(2)
    d = 10
    axis = D.unit(rng.standard_normal(d))
    group_axes = D.unit(rng.standard_normal((3, d)))
    grp = np.repeat(np.arange(3), 30).astype(np.int64)
    args = (["a", "b", "c"],
            [rng.standard_normal((6, d)) + 1.5 * group_axes[g] for g in range(3)],
            rng.standard_normal((90, d)) + 1.5 * group_axes[grp], grp,
            rng.standard_normal((6, d)) + 1.5 * axis, rng.standard_normal((60, d)) + 1.5 * axis)
    plain = cross_matrix("g", "mean_diff", 0, *args, vary_is_pos=False, n_boot=1000, seed=0)
    fitted = cross_matrix("g", "mean_diff", 0, *args, vary_is_pos=False, n_boot=1000, seed=0,
                          n_refit=30)
    np.testing.assert_array_equal(plain.balanced, fitted.balanced)
    assert plain.drop.value == fitted.drop.value
    assert fitted.drop.hi - fitted.drop.lo > plain.drop.hi - plain.drop.lo
    assert "refitting on 30" in fitted.drop.method


# --------------------------------------------------------------------------- coherence


def test_coherence_rule_is_calibrated_on_the_models_own_replies() -> None:
    rng = np.random.default_rng(3)
    own = np.exp(rng.normal(0.6, 0.2, size=60))  # a model's unsteered perplexities
    rule = calibrate_coherence(np.concatenate([own, [np.nan] * 5]))
    assert rule.ok and rule.n == 60
    assert rule.reference == pytest.approx(np.quantile(own, COHERENCE_QUANTILE))
    assert rule.threshold == pytest.approx(COHERENCE_FACTOR * rule.reference)
    degenerate = np.array([False, False, True, False])
    ppl = np.array([rule.threshold * 0.99, rule.threshold * 1.01, 1.0, np.nan])
    np.testing.assert_array_equal(rule.coherent(degenerate, ppl), [True, False, False, False])
    assert "95% quantile" in rule.text()
    # A model whose perplexities are on another scale gets the same verdicts: the rule
    # moves with the model instead of skipping it.
    scaled = calibrate_coherence(own * 7.0)
    np.testing.assert_array_equal(scaled.coherent(degenerate, ppl * 7.0),
                                  rule.coherent(degenerate, ppl))


def test_coherence_rule_without_enough_unsteered_replies() -> None:
    rule = calibrate_coherence(np.array([1.5] * (MIN_CALIBRATION_REPLIES - 1) + [np.nan]))
    assert not rule.ok and "fewer than" in rule.reason
    degenerate = np.array([False, True])
    np.testing.assert_array_equal(rule.coherent(degenerate, np.array([1e6, 1.0])),
                                  [True, False])
    assert "no perplexity rule" in rule.text()
    j = Judged("k", ("p", "q"), ("a", "b"), np.zeros(2, bool), degenerate,
               np.array([1e6, 1.0]), np.zeros(2, bool), 0.0, 0)
    np.testing.assert_array_equal(with_coherence(j, rule).coherent, [True, False])


# --------------------------------------------------------------------------- below TD50


def _degenerating_sweep(td: float) -> Sweep:
    """Harmless refusal rises with alpha, every reply is degenerate at alpha >= ``td``."""
    alphas = np.linspace(-2.0, 2.0, 9)
    n = 20
    harm = PromptSet("harmful", tuple(f"h{i}" for i in range(n)))
    safe = PromptSet("harmless", tuple(f"s{i}" for i in range(n)))

    def arm(ps: PromptSet, a: float, refuse: float) -> Judged:
        refusal = np.arange(n) < round(refuse * n)
        degenerate = np.full(n, abs(a) >= td)
        return Judged(f"{a}", ps.texts, ps.texts, refusal & ~degenerate, degenerate,
                      np.full(n, np.nan), ~degenerate, 0.0, 0)

    return Sweep("raw", (0,), alphas,
                 tuple(arm(harm, a, 0.9) for a in alphas),
                 tuple(arm(safe, a, min(1.0, max(0.0, 0.3 * a))) for a in alphas),
                 harm, safe, 0.0)


def test_overrefusal_doses_stop_below_degeneracy() -> None:
    sw = _degenerating_sweep(1.5)
    sides = {s: analyse_side(sw, s) for s in ("negative", "positive")}
    an = DoseAnalysis(sw, sides, None, (None, None), "", "")  # type: ignore[arg-type]
    idx, how = doses_below_degeneracy(an, "positive")
    td = sides["positive"].degeneracy
    assert td.ok and td.value is not None
    assert np.all(np.abs(sw.alphas[idx]) < abs(td.value)) and sw.alphas[idx][0] == 0.0
    assert sw.alphas[idx].tolist() == [0.0, 0.5, 1.0]
    assert "below TD50_degeneracy" in how
    never = _degenerating_sweep(99.0)
    sides = {s: analyse_side(never, s) for s in ("negative", "positive")}
    an = DoseAnalysis(never, sides, None, (None, None), "", "")  # type: ignore[arg-type]
    idx, how = doses_below_degeneracy(an, "positive")
    assert never.alphas[idx].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert "every dose" in how


def test_every_glm_dose_resamples_prompts() -> None:
    """ED50, TD50 and the coherence breakdown all take their interval from the prompt
    bootstrap when ``n_boot`` is given (each prompt counts once, not once per dose)."""
    rng = np.random.default_rng(11)
    alphas = np.linspace(-2.0, 2.0, 17)
    n = 30
    harm = PromptSet("harmful", tuple(f"h{i}" for i in range(n)))
    safe = PromptSet("harmless", tuple(f"s{i}" for i in range(n)))
    u = rng.normal(0, 1.0, size=(n, 1))

    def arm(ps: PromptSet, j: int, sign: float) -> Judged:
        a = alphas[j]
        p_ref = 1 / (1 + np.exp(-(3.0 * sign * (a - sign * 0.8) + u[:, 0])))
        p_deg = 1 / (1 + np.exp(-(4.0 * (abs(a) - 1.5) + u[:, 0])))
        degenerate = rng.random(n) < p_deg
        refusal = (rng.random(n) < p_ref) & ~degenerate
        return Judged(f"{a}", ps.texts, ps.texts, refusal, degenerate, np.full(n, np.nan),
                      ~degenerate, 0.0, 0)

    sw = Sweep("raw", (0,), alphas, tuple(arm(harm, j, -1.0) for j in range(alphas.size)),
               tuple(arm(safe, j, 1.0) for j in range(alphas.size)), harm, safe, 0.0)
    for side in ("negative", "positive"):
        s = analyse_side(sw, side, n_boot=200, seed=0)  # type: ignore[arg-type]
        for d in (s.effect, s.degeneracy, s.incoherence):
            if d.method.startswith("logistic"):
                assert d.method == "logistic GLM, 95 % CI by resampling prompts", d
        assert s.degeneracy.method.startswith("logistic GLM"), s.degeneracy


def test_refit_bad_input_is_refused() -> None:
    rng = np.random.default_rng(6)
    trp, trn = _acts(rng, 8, 1.0), _acts(rng, 8, -1.0)
    tep, ten = _acts(rng, 10, 1.0), _acts(rng, 10, -1.0)
    with pytest.raises(ValueError, match="n_refit"):
        refit("mean_diff", trp, trn, tep, ten, n_refit=0, seed=0)
    fits = refit("mean_diff", trp, trn, tep, ten, n_refit=3, seed=0)
    assert fits.n == 3 and fits.proj_pos.shape == (3, 10, 2)
    from probes.method_comparison import accuracy_bootstrap

    pos, neg = np.ones((10, 2)), np.ones((10, 2))
    with pytest.raises(ValueError, match="do not match"):
        accuracy_bootstrap(pos, neg, n_boot=10, seed=0, resample_layers=False,
                           refits=(np.ones((3, 9, 2)), np.ones((3, 10, 2))))


def test_tis_interval_from_prompt_bootstrap_doses_covers_the_planted_index() -> None:
    """TI-S = ED50_overrefusal / |ED50_jailbreak| from two prompt-bootstrap doses (the
    delta method on log TI-S): over 200 seeded sweeps with per-prompt random intercepts
    its 95 % interval covers the planted index near nominally."""
    from probes.dose_response import Dose, SideResult, ti_s
    from probes.stats import ed_by_prompt

    rng = np.random.default_rng(30)
    a = np.linspace(0.0, 2.0, 9)
    ed_over, ed_jail, slope, spread, n = 1.2, 0.8, 3.0, 1.0, 24
    truth = ed_over / ed_jail
    covered = runs = 0
    for _ in range(200):
        sides = {}
        for side, ed in (("positive", ed_over), ("negative", ed_jail)):
            u = rng.normal(0.0, spread, size=(n, 1))
            y = rng.random((n, a.size)) < 1 / (1 + np.exp(-(slope * (a - ed) + u)))
            _, est = ed_by_prompt(a, y, n_boot=200, seed=rng)
            if not (est.reached and est.lo is not None and est.hi is not None):
                break
            sign = 1.0 if side == "positive" else -1.0
            lo, hi = sorted((sign * est.lo, sign * est.hi))
            assert est.value is not None
            d = Dose("x", side, "ok",  # type: ignore[arg-type]
                     "logistic GLM, 95 % CI by resampling prompts", "",
                     sign * est.value, lo, hi)
            sides[side] = SideResult(side, d, d, d, True, "", None, ())  # type: ignore[arg-type]
        else:
            tis, (lo_t, hi_t), _, why = ti_s(sides["positive"], sides["negative"])
            assert tis is not None and lo_t is not None and hi_t is not None, why
            runs += 1
            covered += lo_t <= truth <= hi_t
    assert runs >= 190
    assert 0.88 <= covered / runs <= 0.99, covered / runs
