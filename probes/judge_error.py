"""Judge error carried into the behavioural rates: Rogan-Gladen corrected rates.

A refusal rate is what a judge says, not what people would say. :func:`judge_error` is the
one source of a judge's sensitivity and specificity: its verdicts on the held-out half of
pyrit's human-labelled replies (:mod:`prompts.labelled`, the half no judge rule was
designed on; ``benchmarks/test_judges.py`` reports the same split). A new judge plugs in by
adding a name to :data:`probes.reply_judges.JUDGES` (or through ``--judge``).
:func:`corrected_rate` and :func:`corrected_share` turn a
judged count into the rate the labels define, (p + spec - 1) / (sens + spec - 1) clipped to
[0, 1] (Rogan & Gladen 1978), with an interval that draws the judged rate and the judge's
two error rates from their posteriors (Jeffreys Beta), so both the prompts' and the
validation labels' uncertainty are in it. :func:`corrected_paired_difference` does the same
for a difference of rates on the same prompts, :func:`corrected_group_difference` for a
difference of means between replies the judge calls refusals and the rest (divided by
PPV + NPV - 1).

Example:
    err = judge_error("keyword")
    est = corrected_rate(k_refused, n, err, seed=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.reply_judges import DEFAULT_JUDGE, ReplyJudge, resolve_judge
from probes.stats import Estimate, percentile_interval, wilson_interval

CONF = 0.95
N_DRAWS = 4000
EXPERIMENT_JUDGE = DEFAULT_JUDGE
"""The judge the experiments use unless ``--judge`` names another
(:data:`probes.reply_judges.DEFAULT_JUDGE`); :func:`judge_error` defaults to it."""


@dataclass(frozen=True)
class JudgeErrorRates:
    """A judge's confusion counts against human labels (refusal is the positive class)."""

    judge: str
    source: str
    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def sensitivity(self) -> Estimate:
        """P(judged refusal | human refusal), with its Wilson interval."""
        return _wilson(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Estimate:
        """P(judged not refusal | human not refusal), with its Wilson interval."""
        return _wilson(self.tn, self.tn + self.fp)

    @property
    def correctable(self) -> bool:
        """Whether sens + spec > 1 (a judge at or below chance cannot be corrected)."""
        return self.sensitivity.value + self.specificity.value > 1.0

    def text(self) -> str:
        se, sp = self.sensitivity, self.specificity
        return (f"{self.judge} judge on {self.source}: sensitivity {se.value:.3f} "
                f"[{se.lo:.3f}, {se.hi:.3f}] ({self.tp}/{self.tp + self.fn}), specificity "
                f"{sp.value:.3f} [{sp.lo:.3f}, {sp.hi:.3f}] ({self.tn}/{self.tn + self.fp})")


def _wilson(k: int, n: int) -> Estimate:
    lo, hi = wilson_interval(k, n, CONF)
    return Estimate(k / n if n else math.nan, lo, hi, n, "wilson", CONF)


def error_rates(judge: str, predicted: npt.ArrayLike, labels: npt.ArrayLike,
                source: str) -> JudgeErrorRates:
    """Confusion counts of ``predicted`` against human ``labels`` (booleans, refusal True)."""
    pred = np.asarray(predicted, dtype=np.bool_)
    lab = np.asarray(labels, dtype=np.bool_)
    if pred.shape != lab.shape:
        raise ValueError(f"{pred.shape} verdicts for {lab.shape} labels")
    if not lab.any() or lab.all():
        raise ValueError("the labels need both refusals and non-refusals to give "
                         "sensitivity and specificity")
    return JudgeErrorRates(judge, source, int((pred & lab).sum()), int((~pred & lab).sum()),
                           int((~pred & ~lab).sum()), int((pred & ~lab).sum()))


@cache
def judge_error(judge: str | ReplyJudge = EXPERIMENT_JUDGE) -> JudgeErrorRates:
    """The held-out sensitivity and specificity of ``judge`` (a name in
    :data:`probes.reply_judges.JUDGES` or a resolved judge, e.g. the ``--judge`` of the run)
    on pyrit's human-labelled replies, refusal against every other class: the single source
    every corrected rate uses."""
    from prompts.labelled import refusal_labels, split_labelled

    chosen = resolve_judge(judge) if isinstance(judge, str) else judge
    held = split_labelled(refusal_labels()).heldout
    pred = chosen([r.response for r in held], [r.objective for r in held]).refusal
    return error_rates(chosen.name, pred, [r.is_refusal for r in held],
                       f"the held-out half of pyrit's labelled replies (n={len(held)})")


def _posterior(k: int | npt.NDArray[np.int64], n: int | npt.NDArray[np.int64],
               rng: np.random.Generator, size: int) -> npt.NDArray[np.float64]:
    """Jeffreys Beta(k + 1/2, n - k + 1/2) draws of a binomial proportion."""
    return rng.beta(np.asarray(k) + 0.5, np.asarray(n) - np.asarray(k) + 0.5, size=size)


def rogan_gladen_point(p: float, err: JudgeErrorRates) -> float:
    """(p + spec - 1) / (sens + spec - 1) clipped to [0, 1]; nan when sens + spec <= 1."""
    se, sp = err.sensitivity.value, err.specificity.value
    if se + sp <= 1.0:
        return math.nan
    return min(1.0, max(0.0, (p + sp - 1.0) / (se + sp - 1.0)))


def _corrected_draws(p: npt.NDArray[np.float64], err: JudgeErrorRates,
                     rng: np.random.Generator) -> tuple[npt.NDArray[np.float64],
                                                        npt.NDArray[np.bool_]]:
    """Corrected refusal rates for judged-rate draws ``p``, each with its own sensitivity
    and specificity draw; the mask marks draws with sens + spec <= 1 (no correction)."""
    se = _posterior(err.tp, err.tp + err.fn, rng, p.size)
    sp = _posterior(err.tn, err.tn + err.fp, rng, p.size)
    denom = se + sp - 1.0
    bad = denom <= 0.0
    corr = np.clip((p + sp - 1.0) / np.where(bad, 1.0, denom), 0.0, 1.0)
    return corr, bad


def _interval(draws: npt.NDArray[np.float64], bad: npt.NDArray[np.bool_],
              value: float) -> tuple[float, float]:
    """Percentile interval; draws without a correction count as 0 for the lower and 1 for
    the upper end (conservative)."""
    lo, _ = percentile_interval(np.where(bad, 0.0, draws), CONF)
    _, hi = percentile_interval(np.where(bad, 1.0, draws), CONF)
    return min(lo, value), max(hi, value)


def corrected_rate(k: int, n: int, err: JudgeErrorRates, *, refusal: bool = True,
                   n_draws: int = N_DRAWS, seed: int = 0) -> Estimate:
    """The refusal rate (``refusal=False``: the non-refusal rate) that the human labels
    define, from ``k`` judged refusals (resp. non-refusals) of ``n`` replies: Rogan-Gladen
    with an interval over the judged rate's and the judge's error rates' uncertainty.
    Value nan with interval [0, 1] when the judge is no better than chance."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    rng = np.random.default_rng(seed)
    k_ref = k if refusal else n - k
    value = rogan_gladen_point(k_ref / n, err)
    how = f"rogan-gladen, posterior draws ({err.judge} judge)"
    if math.isnan(value):
        return Estimate(math.nan, 0.0, 1.0, n, how + ": sens + spec <= 1", CONF)
    draws, bad = _corrected_draws(_posterior(k_ref, n, rng, n_draws), err, rng)
    if not refusal:
        value, draws = 1.0 - value, 1.0 - draws
    lo, hi = _interval(draws, bad, value)
    return Estimate(value, lo, hi, n, how, CONF)


def corrected_share(k_refused: int, m_selected: int, n: int, err: JudgeErrorRates, *,
                    n_draws: int = N_DRAWS, seed: int = 0) -> Estimate:
    """The share of all ``n`` prompts that are selected (by a judge-free rule, e.g. a
    projection threshold) and NOT refused, when ``k_refused`` of the ``m_selected`` were
    judged refusals: (m / n) x (1 - corrected refusal rate among the selected)."""
    if not (0 <= k_refused <= m_selected <= n and n >= 1):
        raise ValueError(f"need 0 <= k <= m <= n, n >= 1; got {k_refused}, {m_selected}, {n}")
    how = f"rogan-gladen on the selected prompts, posterior draws ({err.judge} judge)"
    if m_selected == 0:
        return Estimate(0.0, 0.0, _wilson(0, n).hi, n, how, CONF)
    rg = rogan_gladen_point(k_refused / m_selected, err)
    if math.isnan(rg):
        return Estimate(math.nan, 0.0, 1.0, n, how + ": sens + spec <= 1", CONF)
    value = (m_selected / n) * (1.0 - rg)
    rng = np.random.default_rng(seed)
    sel = _posterior(m_selected, n, rng, n_draws)
    draws, bad = _corrected_draws(_posterior(k_refused, m_selected, rng, n_draws), err, rng)
    lo, hi = _interval(sel * (1.0 - draws), bad, value)
    return Estimate(value, lo, hi, n, how, CONF)


def flips(raw_verdict: str, corrected_verdict: str) -> bool:
    """Whether a claim's verdict changes under the correction (pass <-> fail)."""
    return {raw_verdict, corrected_verdict} == {"pass", "fail"}


def corrected_name(name: str) -> str:
    """The metric name of ``name``'s judge-corrected value."""
    return f"{name} (judge-corrected)"


def record_corrected_rate(measure: Any, name: str, k: int, n: int, err: JudgeErrorRates,
                          *, refusal: bool = True, seed: int = 0) -> Estimate:
    """Record the judge-corrected value of the judged rate ``name`` (k of n) beside it."""
    est = corrected_rate(k, n, err, refusal=refusal, seed=seed)
    measure.metric(corrected_name(name), est.value, ci=(est.lo, est.hi), n=n)
    return est


def corrected_paired_difference(refused_a: npt.ArrayLike, refused_b: npt.ArrayLike,
                                intact_a: npt.ArrayLike, intact_b: npt.ArrayLike,
                                err: JudgeErrorRates, *, refusal: bool, n_boot: int = N_DRAWS,
                                seed: int = 0) -> Estimate:
    """Judge-corrected difference (arm a minus arm b) of the rate of intact replies that
    are refusals (``refusal=True``) or not refusals (``refusal=False``), the same prompts
    in both arms ([prompts] or [prompts, repeats] booleans; ``refused`` are the judge's
    verdicts, ``intact`` a judge-free condition such as "not degenerate").

    Among intact replies the judged refusal rate is sens r + (1 - spec)(i - r), with r the
    true intact-refusal rate and i the intact rate, so the true difference is
    (d_judged - (1 - spec) d_intact) / (sens + spec - 1) for refusals, and d_intact minus
    that for non-refusals. Interval: prompts resampled (pairs kept) together with draws
    of sens and spec; draws with sens + spec <= 1 count as -1 / +1 (conservative)."""
    ra, rb, ia, ib = (np.asarray(x, dtype=np.bool_) for x in (refused_a, refused_b,
                                                              intact_a, intact_b))
    ra, rb, ia, ib = (x[:, None] if x.ndim == 1 else x for x in (ra, rb, ia, ib))
    if not ra.shape == rb.shape == ia.shape == ib.shape:
        raise ValueError(f"arms disagree in shape: {ra.shape}, {rb.shape}, {ia.shape}, "
                         f"{ib.shape}")
    n = ra.shape[0]
    # Per prompt: judged intact refusals and intact replies, arm a minus arm b.
    d_ref = ((ra & ia).mean(axis=1) - (rb & ib).mean(axis=1)).astype(np.float64)
    d_int = (ia.mean(axis=1) - ib.mean(axis=1)).astype(np.float64)
    how = f"rogan-gladen on a paired difference, prompts resampled ({err.judge} judge)"

    def true_diff(dr: npt.NDArray[np.float64] | float, di: npt.NDArray[np.float64] | float,
                  se: npt.NDArray[np.float64] | float, sp: npt.NDArray[np.float64] | float
                  ) -> npt.NDArray[np.float64]:
        denom = np.asarray(se) + np.asarray(sp) - 1.0
        r = (np.asarray(dr) - (1.0 - np.asarray(sp)) * np.asarray(di)) / np.where(
            denom > 0, denom, 1.0)
        return np.asarray(r if refusal else np.asarray(di) - r, dtype=np.float64)

    if not err.correctable:
        return Estimate(math.nan, -1.0, 1.0, n, how + ": sens + spec <= 1", CONF)
    value = float(true_diff(d_ref.mean(), d_int.mean(), err.sensitivity.value,
                            err.specificity.value))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=(n_boot, n))
    se = _posterior(err.tp, err.tp + err.fn, rng, n_boot)
    sp = _posterior(err.tn, err.tn + err.fp, rng, n_boot)
    draws = true_diff(d_ref[pick].mean(axis=1), d_int[pick].mean(axis=1), se, sp)
    bad = se + sp <= 1.0
    lo, _ = percentile_interval(np.where(bad, -1.0, draws), CONF)
    _, hi = percentile_interval(np.where(bad, 1.0, draws), CONF)
    return Estimate(value, min(lo, value), max(hi, value), n, how, CONF)


def _disattenuation(p: npt.NDArray[np.float64], se: npt.NDArray[np.float64],
                    sp: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """PPV + NPV - 1 of a judge at judged rate ``p``: the factor by which judge error
    shrinks a difference of group means (nan where it is not identified)."""
    denom = se + sp - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        pi = np.clip((p + sp - 1.0) / denom, 0.0, 1.0)
        ppv = se * pi / (se * pi + (1.0 - sp) * (1.0 - pi))
        npv = sp * (1.0 - pi) / (sp * (1.0 - pi) + (1.0 - se) * pi)
        factor = ppv + npv - 1.0
    return np.asarray(np.where((denom > 0) & (factor > 0), factor, np.nan), dtype=np.float64)


def corrected_group_difference(values: npt.ArrayLike, judged: npt.ArrayLike,
                               err: JudgeErrorRates, *, n_boot: int = N_DRAWS,
                               seed: int = 0) -> Estimate:
    """Mean of ``values`` over replies the judge calls refusals minus the mean over the
    rest, corrected for the judge's errors: judged groups mix the true ones with weights
    PPV and NPV (from the Rogan-Gladen prevalence), so the true difference is the judged
    one divided by PPV + NPV - 1 (the judge's errors assumed unrelated to ``values``
    within a true class). Interval: prompts resampled with draws of sens and spec; draws
    where the factor is not identified count as -inf / +inf."""
    v = np.asarray(values, dtype=np.float64)
    j = np.asarray(judged, dtype=np.bool_)
    if v.shape != j.shape or v.ndim != 1:
        raise ValueError(f"values {v.shape} and verdicts {j.shape} must be equal 1-d arrays")
    if j.sum() < 2 or (~j).sum() < 2:
        raise ValueError("need >= 2 replies in each judged group")
    how = f"group difference / (PPV + NPV - 1), prompts resampled ({err.judge} judge)"
    raw = float(v[j].mean() - v[~j].mean())
    point = _disattenuation(np.array([j.mean()]), np.array([err.sensitivity.value]),
                            np.array([err.specificity.value]))[0]
    if not math.isfinite(point):
        return Estimate(math.nan, -math.inf, math.inf, int(v.size), how + ": not identified",
                        CONF)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, v.size, size=(n_boot, v.size))
    jb, vb = j[pick], v[pick]
    n_a, n_b = jb.sum(axis=1), (~jb).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = (np.where(jb, vb, 0.0).sum(axis=1) / n_a
                - np.where(~jb, vb, 0.0).sum(axis=1) / n_b)
    se = _posterior(err.tp, err.tp + err.fn, rng, n_boot)
    sp = _posterior(err.tn, err.tn + err.fp, rng, n_boot)
    draws = diff / _disattenuation(jb.mean(axis=1), se, sp)
    bad = ~np.isfinite(draws)
    value = raw / point
    tail = (1.0 - CONF) / 2.0
    lo = float(np.quantile(np.where(bad, -np.inf, draws), tail, method="lower"))
    hi = float(np.quantile(np.where(bad, np.inf, draws), 1.0 - tail, method="higher"))
    return Estimate(value, min(lo, value), max(hi, value), int(v.size), how, CONF)
