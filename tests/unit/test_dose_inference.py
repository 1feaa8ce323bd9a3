"""Inference that counts each prompt once: the prompt-level dose interval, the paired
difference over prompts, McNemar, and the judge-error (Rogan-Gladen) correction.

The simulations plant a known truth, draw seeded replicates and check how often the 95 %
interval covers it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
import scipy.special
from statsmodels.stats.contingency_tables import mcnemar

from probes import stats
from probes.dose_response import Judged, Sweep, analyse_side, is_refused, ti_s
from probes.stats import DoseStatus, Estimate
from prompts import PromptSet

ALPHAS = np.linspace(0.0, 2.0, 17)  # 17 doses, as in a steering sweep's side
ED50 = 1.0  # planted; symmetric prompt effects keep the population curve at 50 % here
SLOPE = 3.0  # per unit alpha, on the logit scale
SPREAD = 2.0  # SD of the per-prompt random intercept (prompt heterogeneity)
N_PROMPTS = 20


def planted_outcomes(rng: np.random.Generator, n_prompts: int = N_PROMPTS,
                     spread: float = SPREAD) -> npt.NDArray[np.bool_]:
    """[prompts, doses] replies from logit p = SLOPE (alpha - ED50) + u_prompt,
    u_prompt ~ N(0, spread^2): each prompt has its own threshold."""
    u = rng.normal(0.0, spread, size=n_prompts)
    p = scipy.special.expit(SLOPE * (ALPHAS[None, :] - ED50) + u[:, None])
    return np.asarray(rng.random(p.shape) < p)


def covers(est: stats.DoseEstimate, truth: float) -> bool:
    """Whether an estimate has an interval and it contains ``truth`` (no interval: miss)."""
    return (est.reached and est.lo is not None and est.hi is not None
            and est.lo <= truth <= est.hi)


def test_prompt_bootstrap_covers_planted_ed50_and_reply_level_does_not() -> None:
    rng = np.random.default_rng(20)
    runs = 400
    by_prompt = by_reply = 0
    for _ in range(runs):
        y = planted_outcomes(rng)
        fit, est = stats.ed_by_prompt(ALPHAS, y, n_boot=200, seed=rng)
        by_prompt += covers(est, ED50)
        by_reply += covers(fit.ed(0.5, method="delta"), ED50)
    prompt_cov, reply_cov = by_prompt / runs, by_reply / runs
    assert 0.90 <= prompt_cov <= 0.98, prompt_cov
    # The binomial interval treats 20 prompts x 17 doses as 340 independent trials.
    assert reply_cov < 0.80, reply_cov
    assert reply_cov < prompt_cov - 0.2, (reply_cov, prompt_cov)


def test_without_prompt_heterogeneity_both_intervals_are_near_nominal() -> None:
    rng = np.random.default_rng(21)
    runs = 300
    by_prompt = by_reply = 0
    for _ in range(runs):
        y = planted_outcomes(rng, spread=0.0)
        fit, est = stats.ed_by_prompt(ALPHAS, y, n_boot=200, seed=rng)
        by_prompt += covers(est, ED50)
        by_reply += covers(fit.ed(0.5, method="delta"), ED50)
    assert 0.88 <= by_prompt / runs <= 0.99
    assert 0.88 <= by_reply / runs <= 0.99


def test_ed_by_prompt_point_is_the_pooled_fit_and_is_seeded() -> None:
    y = planted_outcomes(np.random.default_rng(3))
    fit, est = stats.ed_by_prompt(ALPHAS, y, n_boot=300, seed=7)
    ref = stats.fit_dose_response(ALPHAS, y.sum(axis=0), np.full(ALPHAS.size, y.shape[0]))
    assert est.status is DoseStatus.OK, est.reason
    assert est.method == "prompt-bootstrap"
    assert ref.params is not None and fit.params is not None
    np.testing.assert_allclose(fit.params, ref.params)
    assert est.value == pytest.approx(ref.ed(0.5).value)
    assert est.lo is not None and est.hi is not None and est.value is not None
    assert est.lo < est.value < est.hi
    _, again = stats.ed_by_prompt(ALPHAS, y, n_boot=300, seed=7)
    assert (again.lo, again.hi) == (est.lo, est.hi)


def test_ed_by_prompt_is_wider_when_prompts_differ() -> None:
    rng = np.random.default_rng(4)
    y = planted_outcomes(rng, n_prompts=40, spread=3.0)
    fit, est = stats.ed_by_prompt(ALPHAS, y, n_boot=400, seed=1)
    old = fit.ed(0.5, method="delta")
    assert est.reached and old.reached
    assert est.lo is not None and est.hi is not None
    assert old.lo is not None and old.hi is not None
    assert est.hi - est.lo > 1.3 * (old.hi - old.lo)


def test_ed_by_prompt_statuses_and_bad_input() -> None:
    none = np.zeros((10, ALPHAS.size), dtype=bool)
    _, est = stats.ed_by_prompt(ALPHAS, none, seed=0)
    assert est.status is DoseStatus.NO_FIT and est.value is None
    # The curve crosses 50 % beyond the grid: not reached.
    rng = np.random.default_rng(5)
    p = scipy.special.expit(3.0 * (ALPHAS[None, :] - 3.0) + rng.normal(0, 1, (30, 1)))
    _, est = stats.ed_by_prompt(ALPHAS, rng.random(p.shape) < p, seed=0)
    assert est.status in (DoseStatus.NOT_REACHED, DoseStatus.NO_FIT)
    assert est.value is None
    # Two prompts that switch at opposite ends: most resamples separate -> unstable.
    two = np.zeros((2, ALPHAS.size), dtype=bool)
    two[0, 3:] = True
    two[1, 14:] = True
    two[1, 2] = True
    _, est = stats.ed_by_prompt(ALPHAS, two, n_boot=200, seed=0)
    assert est.status is DoseStatus.BOOTSTRAP_UNSTABLE, est
    with pytest.raises(ValueError, match="doses"):
        stats.ed_by_prompt(ALPHAS[:-1], none, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        stats.ed_by_prompt(ALPHAS, np.full((3, ALPHAS.size), 0.5), seed=0)
    with pytest.raises(ValueError, match="prompts"):
        stats.ed_by_prompt(ALPHAS, none[:1], seed=0)


# --------------------------------------------------------------------------- paired


def paired_arms(rng: np.random.Generator, n_prompts: int, repeats: int,
                diff: float) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Two arms on the same prompts: a shared per-prompt propensity (strong pairing) and
    a planted difference ``diff`` in the population rate (arm a minus arm b)."""
    base = rng.beta(0.6, 0.6, size=n_prompts)  # prompts differ a lot
    pa = np.clip(base + diff / 2, 0, 1)
    pb = np.clip(base - diff / 2, 0, 1)
    a = rng.random((n_prompts, repeats)) < pa[:, None]
    b = rng.random((n_prompts, repeats)) < pb[:, None]
    return a, b


def test_paired_difference_value_and_coverage() -> None:
    rng = np.random.default_rng(30)
    a, b = paired_arms(rng, 20, 3, 0.1)
    est = stats.paired_rate_difference(a, b, n_boot=500, seed=1)
    assert est.value == pytest.approx(a.mean() - b.mean())
    assert est.n == 20 and est.lo <= est.value <= est.hi
    # Coverage of a planted difference near nominal. The truth is the expectation of the
    # clipped per-prompt rates, estimated by a large draw.
    big = rng.beta(0.6, 0.6, size=2_000_000)
    truth = float(np.clip(big + 0.05, 0, 1).mean() - np.clip(big - 0.05, 0, 1).mean())
    runs, hits = 300, 0
    for _ in range(runs):
        a, b = paired_arms(rng, 30, 3, 0.1)
        e = stats.paired_rate_difference(a, b, n_boot=400, seed=rng)
        hits += e.lo <= truth <= e.hi
    assert 0.90 <= hits / runs <= 0.99, hits / runs


def test_paired_difference_is_narrower_than_independent_newcombe() -> None:
    """One reply per prompt and arm: the pairing alone narrows the interval (Newcombe's
    treats the arms as independent samples)."""
    rng = np.random.default_rng(31)
    a, b = paired_arms(rng, 60, 1, 0.05)
    est = stats.paired_rate_difference(a, b, n_boot=1000, seed=2)
    n = a.size
    _, lo, hi = stats.newcombe_difference(int(a.sum()), n, int(b.sum()), n)
    assert est.hi - est.lo < 0.8 * (hi - lo)


def test_paired_difference_bad_input() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_rate_difference(np.ones(5, bool), np.ones(4, bool), seed=0)
    with pytest.raises(ValueError, match="0/1"):
        stats.paired_rate_difference(np.full(5, 2), np.ones(5), seed=0)


def test_mcnemar_exact_matches_statsmodels() -> None:
    rng = np.random.default_rng(32)
    a, b = rng.random(60) < 0.5, rng.random(60) < 0.3
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)),
                                                           int(np.sum(~a & ~b))]]
    ref = mcnemar(table, exact=True).pvalue
    assert stats.mcnemar_exact_p(a, b) == pytest.approx(ref)
    assert stats.mcnemar_exact_p(a, a) == 1.0


# --------------------------------------------------------------------------- judge error


def test_rogan_gladen_known_value_and_clipping() -> None:
    def point(v: float) -> Estimate:
        return Estimate(v, v, v, 100, "exact")

    # 0.5 judged, sens 0.9, spec 0.8: (0.5 + 0.8 - 1) / (0.9 + 0.8 - 1) = 3/7.
    est = stats.rogan_gladen(point(0.5), point(0.9), point(0.8))
    assert est.value == pytest.approx(3 / 7)
    assert est.lo == pytest.approx(3 / 7) and est.hi == pytest.approx(3 / 7)
    assert stats.rogan_gladen(point(0.05), point(0.9), point(0.8)).value == 0.0
    assert stats.rogan_gladen(point(0.99), point(0.9), point(0.8)).value == 1.0
    with pytest.raises(ValueError, match="no better than chance"):
        stats.rogan_gladen(point(0.5), point(0.5), point(0.5))
    # Input intervals that reach sens + spec <= 1 leave the result unbounded.
    wide = Estimate(0.7, 0.3, 0.9, 10, "wilson")
    assert (stats.rogan_gladen(point(0.5), wide, wide).lo,
            stats.rogan_gladen(point(0.5), wide, wide).hi) == (0.0, 1.0)
    with pytest.raises(ValueError, match="lo <= value"):
        stats.rogan_gladen(Estimate(0.5, 0.6, 0.7, 10, "bad"), point(0.9), point(0.9))


@pytest.mark.parametrize(("truth", "sens", "spec"),
                         [(0.1, 0.85, 0.85), (0.1, 0.9, 0.95), (0.7, 0.95, 0.7)])
def test_rogan_gladen_recovers_true_rate_under_a_noisy_judge(truth: float, sens: float,
                                                             spec: float) -> None:
    """A judge with known error labels n replies whose true rate is ``truth``; its
    sensitivity and specificity are measured on labelled validation sets. The corrected
    rate's interval covers ``truth`` in at least 90 % of seeded replicates, while the raw
    judged rate is biased."""
    rng = np.random.default_rng(40)
    runs, n, n_val = 300, 1000, 100
    hits = raw_hits = 0
    values = []
    for _ in range(runs):
        positive = rng.random(n) < truth
        judged = np.where(positive, rng.random(n) < sens, rng.random(n) >= spec)
        k_sens = int((rng.random(n_val) < sens).sum())
        k_spec = int((rng.random(n_val) < spec).sum())
        raw = stats.rate(int(judged.sum()), n)
        est = stats.rogan_gladen(raw, stats.rate(k_sens, n_val), stats.rate(k_spec, n_val))
        hits += est.contains(truth)
        values.append(est.value)
        raw_hits += raw.contains(truth)
    assert hits / runs >= 0.90, hits / runs
    assert float(np.mean(values)) == pytest.approx(truth, abs=0.02)
    assert raw_hits / runs < 0.5  # the uncorrected judge misses the true rate


# --------------------------------------------------------------------------- wiring


def synthetic_sweep(seed: int) -> Sweep:
    """A raw-units sweep on -2..2 whose harmless refusal rises with alpha with a strong
    per-prompt threshold, harmful refusal falls, and nothing degenerates."""
    rng = np.random.default_rng(seed)
    alphas = np.linspace(-2.0, 2.0, 17)
    n = 24
    harm_u, safe_u = rng.normal(0, SPREAD, n), rng.normal(0, SPREAD, n)
    harm_p = scipy.special.expit(-SLOPE * (-alphas[None, :] - ED50) + harm_u[:, None])
    safe_p = scipy.special.expit(SLOPE * (alphas[None, :] - ED50) + safe_u[:, None])
    harm_y, safe_y = rng.random(harm_p.shape) < harm_p, rng.random(safe_p.shape) < safe_p
    harm = PromptSet("harmful", tuple(f"harmful {i}" for i in range(n)))
    safe = PromptSet("harmless", tuple(f"harmless {i}" for i in range(n)))

    def judged(ps: PromptSet, refusal: npt.NDArray[np.bool_], key: str) -> Judged:
        m = len(ps)
        return Judged(key, ps.texts, ps.texts, refusal, np.zeros(m, bool),
                      np.full(m, np.nan), np.ones(m, bool), 0.0, 0)

    return Sweep("raw", (0,), alphas,
                 tuple(judged(harm, harm_y[:, j], f"a{j}") for j in range(alphas.size)),
                 tuple(judged(safe, safe_y[:, j], f"a{j}") for j in range(alphas.size)),
                 harm, safe, 0.0)


def test_analyse_side_resamples_prompts_when_asked() -> None:
    sw = synthetic_sweep(8)
    old = analyse_side(sw, "positive")
    new = analyse_side(sw, "positive", n_boot=300, seed=0)
    assert old.effect.method.startswith("logistic GLM, delta")
    assert new.effect.method == "logistic GLM, 95 % CI by resampling prompts"
    assert new.effect.value == pytest.approx(old.effect.value)
    assert None not in (new.effect.lo, new.effect.hi, old.effect.lo, old.effect.hi)
    assert new.effect.hi - new.effect.lo > old.effect.hi - old.effect.lo  # type: ignore[operator]
    assert new.effect.lo < new.effect.value < new.effect.hi  # type: ignore[operator]
    # Reproducible from the seed; the jailbreak side and TI-S go through the same path.
    again = analyse_side(sw, "positive", n_boot=300, seed=0)
    assert (again.effect.lo, again.effect.hi) == (new.effect.lo, new.effect.hi)
    neg = analyse_side(sw, "negative", n_boot=300, seed=0)
    assert neg.effect.ok and neg.effect.value is not None and neg.effect.value < 0
    tis, (lo, hi), method, reason = ti_s(new, neg)
    assert tis is not None and lo is not None and hi is not None, reason
    assert lo < tis < hi and method.startswith("delta method on log TI-S")


def test_per_prompt_matrix_and_mismatched_prompts() -> None:
    sw = synthetic_sweep(9)
    y = sw.per_prompt(is_refused, "both")
    assert y.shape == (48, sw.alphas.size)
    k, _ = sw.counts(is_refused, "both")
    np.testing.assert_array_equal(y.sum(axis=0), k)
    other = PromptSet("other", tuple(f"other {i}" for i in range(24)))
    j0 = sw.harmful[0]
    moved = Judged("x", other.texts, other.texts, j0.refusal, j0.degenerate, j0.perplexity,
                   j0.coherent, 0.0, 0)
    broken = replace(sw, harmful=(moved, *sw.harmful[1:]))
    with pytest.raises(ValueError, match="same prompts"):
        broken.per_prompt(is_refused, "harmful")
