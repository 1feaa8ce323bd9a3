"""Extraction methods compared per layer on held-out prompts (the trait-vector log's comparison).

mean_diff, probe, gradient, pca_diff and random (docs/science.md, "Extraction methods") are
fitted per layer on the train split (AdvBench vs English harmless, resid_pre, last token)
and evaluated on the held-out split: accuracy at the midpoint between the train class
means (the orientation is never flipped), Cohen's d and AUC of the projections, and
polarity (do held-out harmful prompts project higher than harmless ones?).

Layers where every prompt has the same activation (resid_pre of block 0 at the last
token, a template token) admit no direction for any method: they are excluded from the
comparison and named in every test's detail (test_layer_significance reports them as
errored layers). Accuracies are averaged over the remaining analysed layers; intervals
come from a bootstrap over held-out prompts (resampled within class, the same prompts for
every method) in which each replicate also refits the methods on a bootstrap resample of
the training prompts (``probes.method_comparison.refit``, N_REFIT resamples used in turn),
so a difference between methods is judged with the variance of both fits in it. The
random baseline is one seeded Gaussian direction per layer (as in the
seed), so wherever it enters, the bootstrap resamples the layers too: its spread comes
mostly from the draw of the directions, not from the prompts.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest

from fixtures.workbench import Workbench
from probes import directions as D
from probes.directions import Method
from probes.method_comparison import (
    ALL,
    FITTED,
    Comparison,
    MethodResult,
    accuracy_difference,
    excluded_note,
    mean_accuracy,
    polarity_d,
    refit,
)
from probes.stats import wilson_interval

# The trait-vector log's table (Gemma-2-2B-IT, 234 trait x layer combinations): polarity failures %,
# mean accuracy %, mean effect size, combinations with accuracy < 60 %.
SEED002: dict[str, tuple[float, float, float, str]] = {
    "probe": (0.0, 85.9, 2.94, "29/234"),
    "gradient": (11.5, 81.0, 2.58, "47/234"),
    "mean_diff": (28.6, 65.7, 1.35, "106/234"),
    "pca_diff": (46.2, 51.0, 0.72, "161/234"),
    "random": (55.1, 46.5, 0.79, "184/234"),
}


@cache
def _compare(bench: Workbench) -> Comparison:
    """Every method at every analysed layer, computed once per model."""
    harm_tr, safe_tr = bench.train_pair()
    harm_te, safe_te = bench.eval_pair()
    trp, trn, tep, ten = (bench.acts(p, layers=bench.layers).numpy()
                          for p in (harm_tr, safe_tr, harm_te, safe_te))
    constant = D.constant_layers(trp, trn, tep, ten)
    keep = np.flatnonzero(~constant)
    layers = [bench.layers[i] for i in keep]
    trp, trn, tep, ten = (a[:, keep] for a in (trp, trn, tep, ten))
    results: dict[str, MethodResult] = {}
    for method in ALL:
        bench.progress(f"[methods] {method}: {len(layers)} layers", force=True)
        u = D.fit_direction_per_layer(method, trp, trn, seed=bench.cfg.seed)
        evals = D.evaluate_per_layer(u, trp, trn, tep, ten)
        cp, cn = D.heldout_correct(u, trp, trn, tep, ten)
        fits = refit(method, trp, trn, tep, ten, seed=_seed(bench, 90 + ALL.index(method)))
        results[method] = MethodResult(method, layers, evals, cp, cn, fits)
    excluded = [bench.layers[i] for i in np.flatnonzero(constant)]
    return Comparison(results, excluded, len(tep) + len(ten), len(trp) + len(trn))


def _seed(bench: Workbench, *parts: int) -> int:
    return int(np.random.SeedSequence([bench.cfg.seed, 2, *parts]).generate_state(1)[0])


def _setup(bench: Workbench, measure: Any) -> Comparison:
    bench.record_model(measure, *bench.train_pair(), *bench.eval_pair())
    c = _compare(bench)
    if not next(iter(c.results.values())).layers:
        pytest.skip("no analysed layer has a direction (every prompt has the same activation)")
    return c


def test_methods_summary(bench: Workbench, measure: Any) -> None:
    """The trait-vector log's table (polarity failures / mean accuracy / mean effect per method) and
    the method x layer accuracy heatmap, beside the seed's figures."""
    c = _setup(bench, measure)
    methods = list(ALL)
    layers = next(iter(c.results.values())).layers
    rows = []
    for tag, m in enumerate(methods):
        r = c.results[m]
        k = len(r.layers)
        acc = mean_accuracy(r, n_boot=bench.cfg.n_boot, seed=_seed(bench, tag))
        fails = r.polarity_failures
        lo, hi = wilson_interval(fails, k)
        low_acc = int((r.accuracy < 0.6).sum())
        seed = SEED002[m]
        rows.append([m, f"{fails}/{k}", 100 * fails / k, f"{seed[0]:.1f}",
                     100 * acc.value, f"{seed[1]:.1f}", float(np.mean(r.d)),
                     float(np.mean(np.abs(r.d))), f"{seed[2]:.2f}", f"{low_acc}/{k}", seed[3]])
        measure.metric(f"{m}/polarity_failure_rate", fails / k, ci=(lo, hi), n=k)
        measure.metric(f"{m}/mean_accuracy", acc.value, ci=(acc.lo, acc.hi), n=c.n_test)
        measure.metric(f"{m}/mean_cohens_d", float(np.mean(r.d)), n=c.n_test)
        measure.metric(f"{m}/mean_abs_cohens_d", float(np.mean(np.abs(r.d))), n=c.n_test)
        measure.metric(f"{m}/mean_auc", float(np.mean([e.auc for e in r.evals])), n=c.n_test)
        measure.metric(f"{m}/layers_accuracy_below_60pct", low_acc, n=k)
    measure.table(
        "extraction methods on held-out prompts beside the trait log (Gemma-2-2B-IT, 234 trait x "
        "layer combinations; the seed's effect size looks like |d|: random's is 0.79)",
        ["method", "polarity failures", "polarity failures %", "seed %", "mean accuracy %",
         "seed accuracy %", "mean d", "mean |d|", "seed effect size", "accuracy < 60 %",
         "seed accuracy < 60 %"],
        rows,
    )
    measure.plot("held-out accuracy, method x layer", "heatmap",
                 matrix=[c.results[m].accuracy.tolist() for m in methods],
                 xlabels=[str(x) for x in layers], ylabels=methods, vmin=0.0, vmax=1.0,
                 annotate=True, clabel="accuracy", xlabel="layer", ylabel="method",
                 title="held-out accuracy at the train midpoint"
                 + (f" (no direction, excluded: layers {c.excluded})" if c.excluded else ""))
    measure.plot("held-out Cohen's d, method x layer", "heatmap",
                 matrix=[c.results[m].d.tolist() for m in methods],
                 xlabels=[str(x) for x in layers], ylabels=methods, cmap="RdBu_r",
                 annotate=True, clabel="Cohen's d", xlabel="layer", ylabel="method",
                 title="held-out Cohen's d (negative = inverted polarity)")
    measure.plot("held-out accuracy per layer and method", "line", x=layers,
                 series={m: c.results[m].accuracy.tolist() for m in methods},
                 hlines=[(0.5, "chance")], xlabel="layer", ylabel="accuracy (held-out)",
                 title="accuracy per layer")


@pytest.mark.claim("PROBE-NO-POLARITY-FAIL")
def test_probe_has_no_polarity_failures(bench: Workbench, measure: Any) -> None:
    """Per layer, the probe's held-out Cohen's d with an interval that refits the probe on
    resampled training prompts: the polarity is right with confidence when its lower end is
    above 0 (a failure count of 0 has no conservative bound below any positive rate)."""
    c = _setup(bench, measure)
    r = c.results["probe"]
    k = len(r.layers)
    fails = r.polarity_failures
    bad = [lay for lay, e in zip(r.layers, r.evals, strict=True) if not e.polarity_correct]
    measure.metric("probe_polarity_failures", fails, n=k)
    measure.metric("probe_polarity_failure_rate", fails / k, ci=wilson_interval(fails, k), n=k)
    for i, layer in enumerate(r.layers):
        est = polarity_d(r, i, n_boot=bench.cfg.n_boot, seed=_seed(bench, 40, i))
        measure.metric(f"probe_heldout_cohens_d/L{layer}", est.value, ci=(est.lo, est.hi),
                       n=est.n)
        measure.check("PROBE-NO-POLARITY-FAIL", est.value, ci=(est.lo, est.hi), n=est.n,
                      label=f"layer {layer}", hard=False,
                      detail=f"{est.method}; point polarity inverted at layers {bad or 'none'} "
                      f"of {excluded_note(c)}; the trait-vector log: probe 0/234")
    measure.assert_all()


@pytest.mark.claim("PROBE-BEATS-MEANDIFF")
def test_probe_beats_mean_diff(bench: Workbench, measure: Any) -> None:
    c = _setup(bench, measure)
    probe, md = c.results["probe"], c.results["mean_diff"]
    est = accuracy_difference(probe, md, n_boot=bench.cfg.n_boot,
                               seed=_seed(bench, 10))
    better = int((probe.accuracy > md.accuracy).sum())
    worse = int((probe.accuracy < md.accuracy).sum())
    measure.metric("probe_mean_accuracy", float(probe.accuracy.mean()), n=c.n_test)
    measure.metric("mean_diff_mean_accuracy", float(md.accuracy.mean()), n=c.n_test)
    measure.metric("probe_minus_meandiff_accuracy", est.value, ci=(est.lo, est.hi), n=est.n)
    measure.metric("layers_probe_better", better, n=len(probe.layers))
    measure.metric("layers_probe_worse", worse, n=len(probe.layers))
    measure.check("PROBE-BEATS-MEANDIFF", est.value, ci=(est.lo, est.hi), n=est.n,
                  detail=f"probe {probe.accuracy.mean():.3f} vs mean_diff {md.accuracy.mean():.3f}"
                  f" mean accuracy over {excluded_note(c)}; probe better at {better}, worse at "
                  f"{worse} layers; the trait-vector log: 85.9 % vs 65.7 %")


@pytest.mark.claim("RANDOM-NEAR-CHANCE")
def test_random_is_near_chance(bench: Workbench, measure: Any) -> None:
    c = _setup(bench, measure)
    r = c.results["random"]
    est = mean_accuracy(r, n_boot=bench.cfg.n_boot, seed=_seed(bench, 20))
    k = len(r.layers)
    measure.metric("random_polarity_failure_rate", r.polarity_failures / k,
                   ci=wilson_interval(r.polarity_failures, k), n=k)
    measure.metric("random_accuracy_min", float(r.accuracy.min()), n=c.n_test)
    measure.metric("random_accuracy_max", float(r.accuracy.max()), n=c.n_test)
    measure.check("RANDOM-NEAR-CHANCE", est.value, ci=(est.lo, est.hi), n=est.n,
                  detail=f"one seeded Gaussian direction per layer, mean accuracy over "
                  f"{excluded_note(c)}; per-layer range {r.accuracy.min():.2f}-"
                  f"{r.accuracy.max():.2f}; the trait-vector log: 46.5 %")


@pytest.mark.claim("METHOD-BEATS-RANDOM")
@pytest.mark.parametrize("method", FITTED)
def test_method_beats_random(bench: Workbench, method: Method, measure: Any) -> None:
    c = _setup(bench, measure)
    r, rand = c.results[method], c.results["random"]
    est = accuracy_difference(r, rand, n_boot=bench.cfg.n_boot,
                               seed=_seed(bench, 30 + FITTED.index(method)))
    measure.metric("method_minus_random_accuracy", est.value, ci=(est.lo, est.hi), n=est.n)
    measure.check("METHOD-BEATS-RANDOM", est.value, ci=(est.lo, est.hi), n=est.n, label=method,
                  detail=f"{method} {r.accuracy.mean():.3f} vs random {rand.accuracy.mean():.3f}"
                  f" mean accuracy over {excluded_note(c)}; the trait-vector log: "
                  f"{SEED002[method][1]:.1f} % vs 46.5 %")
