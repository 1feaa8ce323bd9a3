"""Per-layer validation of refusal directions, on held-out prompts, at three sites.

The direction r_l = mu_H - mu_B is fitted on the train split of the run's contrast
(``--contrast``; by default AdvBench requests against their own harmless twins, worded
the same way) and tested on held-out prompts of that contrast: Welch t, Holm-adjusted p
over the layers analysed, Cohen's d (bootstrap interval over the held-out prompts,
direction fixed) and AUC. The in-sample d (fit and test on the same prompts, the seed's
protocol) is reported beside it only for comparison with the seed.

Wording control: the same direction is scored on held-out unmatched prompts (AdvBench
against the project's harmless set) and on held-out minimal pairs; the share of the
unmatched separation that matching removes, and a status per layer
(:func:`probes.wording.wording_control`), stand beside every layer's result.
LAYER-SURVIVES-MATCHING asks that at least one layer keep a matched separation.

Validity is the validation report's criterion split in two hypotheses, so a layer is valid when both
hold: LAYER-VALID (held-out d > 0.5, judged on the bootstrap lower bound) and
LAYER-SIGNIFICANT (Holm-adjusted p < 0.01). One test per (model, layer): a failing layer is
one failing test.

Layer 0 at ``resid_pre``: the suite captures the last prompt token after the chat template,
which is the same template token for every prompt, and ``resid_pre`` of block 0 is that
token's embedding. Every prompt has the same activation there, so no direction exists: the
layer is reported as an errored layer (value nan, with the reason), never dropped. The seed
saw d = 2.75 at its layer 0 because its capture differed (no template, or the output of
block 0); the first layer with information here is the output of block 0 (``resid_pre`` 1).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import pytest

from fixtures.workbench import Workbench
from probes import directions as D
from probes.capture import Site
from probes.layer_analysis import (
    LAYER_COLUMNS,
    SITES,
    WORDING_COLUMNS,
    SiteAnalysis,
    constant_detail,
    layer_table,
    probe_correct,
    site_analysis,
    site_wording,
    wording_cells,
    wording_driven_layers,
)
from probes.method_comparison import Refits, accuracy_bootstrap, refit
from probes.stats import (
    FloatArray,
    auc_interval,
    percentile_interval,
    spearman,
    wilson_interval,
)
from probes.wording import WordingRow, WordingStatus

NO_PAIRS = ("this run has no minimal pairs (--harmful without --pairs), so the wording "
            "control cannot be measured; pass --pairs FILE.jsonl with twins of its prompts")
SURVIVAL_ALPHA = 0.05  # family-wise, Bonferroni over the analysed layers

# The validation report's depth bands (28 layers): early 0-10, middle 11-17, late 18-27.
SEED_BANDS = (("early", 0.0, 11 / 28, "2.8-4.5"), ("middle", 11 / 28, 18 / 28, "4.3-8.8"),
              ("late", 18 / 28, 1.0 + 1e-9, "7.7-9.1"))
SEED_PEAK = "layer 18 of 28 (fraction 18/27 = 0.67), d = 9.05, in-sample"


def _seed(bench: Workbench, *parts: int) -> int:
    return int(np.random.SeedSequence([bench.cfg.seed, *parts]).generate_state(1)[0])


def _site_acts(bench: Workbench, site: Site) -> tuple[FloatArray, ...]:
    harm_tr, safe_tr = bench.train_pair()
    harm_te, safe_te = bench.eval_pair()
    return tuple(bench.acts(p, site=site, layers=bench.layers).numpy()
                 for p in (harm_tr, safe_tr, harm_te, safe_te))


@cache
def _analysis(bench: Workbench, site: Site = "resid_pre") -> SiteAnalysis:
    """Computed once per (model, site) and shared by every test of this module."""
    trp, trn, tep, ten = _site_acts(bench, site)
    return site_analysis(site, list(bench.layers), bench.lm.n_layers, trp, trn, tep, ten,
                         n_boot=bench.cfg.n_boot, seed=_seed(bench, SITES.index(site)))


def _wording_acts(bench: Workbench) -> tuple[FloatArray, ...]:
    """Held-out resid_pre activations: (harmful, harmless set) and (harmful, twins)."""
    sets = (*bench.eval_pair("unmatched"), *bench.eval_pair("matched"))
    return tuple(bench.acts(p, layers=bench.layers).numpy() for p in sets)


@cache
def _wording(bench: Workbench, conf: float = 0.95) -> list[WordingRow | None] | None:
    """The wording control of the resid_pre directions per analysed layer (None for a
    layer without a direction), or None when the run has no minimal pairs. Every ``conf``
    draws the same bootstrap replicates."""
    if bench.pairs_all is None:
        return None
    pu, nu, pm, nm = _wording_acts(bench)
    return site_wording(_analysis(bench), (pu, nu), (pm, nm), n_boot=bench.cfg.n_boot,
                        seed=_seed(bench, 7), conf=conf)


def _record_wording_sets(bench: Workbench, measure: Any) -> None:
    if bench.pairs_all is not None:
        bench.record_prompts(measure, *bench.eval_pair("unmatched"), *bench.eval_pair("matched"))


@cache
def _probe_correct(bench: Workbench, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """Held-out per-prompt correctness [n, k] of a probe fitted per layer (nan if constant)."""
    constant = _analysis(bench, site).constant
    bench.progress(f"[layers] probe per layer at {site} ({int((~constant).sum())} layers)",
                   force=True)
    trp, trn, tep, ten = _site_acts(bench, site)
    return probe_correct(trp, trn, tep, ten, constant, seed=bench.cfg.seed)


@cache
def _site_refits(bench: Workbench, site: Site, keep: tuple[bool, ...]) -> Refits:
    """The per-layer probe at ``site`` (layers ``keep``) refitted on N_REFIT resamples of the
    training prompts; the same seed draws the same resamples at every site."""
    mask = np.asarray(keep, dtype=bool)
    trp, trn, tep, ten = (a[:, mask] for a in _site_acts(bench, site))
    return refit("probe", trp, trn, tep, ten, seed=_seed(bench, 98))


# --------------------------------------------------------------------------- per layer


@pytest.mark.claim("LAYER-VALID", "LAYER-SIGNIFICANT")
def test_layer_direction_is_valid(bench: Workbench, layer: int, measure: Any) -> None:
    """The validation report's validity at one layer: held-out d > 0.5 and Holm p < 0.01."""
    a = _analysis(bench)
    i = a.layers.index(layer)
    row = a.rows[i]
    harm_te, safe_te = bench.eval_pair()
    bench.record_model(measure, *bench.train_pair(), harm_te, safe_te)
    n = a.n_test
    if a.constant[i]:
        detail = constant_detail(a, layer)
        measure.metric("constant_activation", 1.0)
        measure.check("LAYER-VALID", math.nan, n=n, detail=detail, hard=False)
        measure.check("LAYER-SIGNIFICANT", math.nan, n=n, detail=detail, hard=False)
        measure.assert_all()
        return
    lo, hi = a.d_ci(i)
    auc_est = auc_interval(a.pos_scores[:, i], a.neg_scores[:, i])
    measure.metric("cohens_d_heldout", row.cohens_d, ci=(lo, hi), n=n)
    n_all = n + sum(len(p) for p in bench.train_pair())
    measure.metric("cohens_d_in_sample", row.cohens_d_in_sample, n=n_all)
    measure.metric("welch_t", row.t, n=n)
    measure.metric("p_welch", row.p, n=n)
    measure.metric("p_holm", row.p_holm, n=n)
    measure.metric("auc_heldout", auc_est.value, ci=(auc_est.lo, auc_est.hi), n=n)
    measure.metric("direction_norm", row.norm)
    wording = _layer_wording(bench, measure, i)
    measure.check("LAYER-VALID", row.cohens_d, ci=(lo, hi), n=n, hard=False,
                  detail=f"held-out d {row.cohens_d:.3g} ({bench.contrast} contrast; in-sample "
                  f"{row.cohens_d_in_sample:.3g}), Holm over {len(a.layers)} layers p = "
                  f"{row.p_holm:.3g}{wording}")
    measure.check("LAYER-SIGNIFICANT", row.p_holm, n=n, hard=False,
                  detail=f"Welch t = {row.t:.3g}, unadjusted p = {row.p:.3g}, Holm over "
                  f"{len(a.layers)} layers")
    measure.assert_all()


def _layer_wording(bench: Workbench, measure: Any, i: int) -> str:
    """Record the wording control of analysed layer ``i`` beside its significance; return
    it as a clause for the check's detail ("" without one)."""
    rows = _wording(bench)
    w = rows[i] if rows is not None else None
    if w is None:
        return ""
    _record_wording_sets(bench, measure)
    measure.metric("cohens_d_unmatched", w.d_unmatched.value,
                   ci=(w.d_unmatched.lo, w.d_unmatched.hi), n=w.d_unmatched.n)
    measure.metric("cohens_d_matched", w.d_matched.value, ci=(w.d_matched.lo, w.d_matched.hi),
                   n=w.d_matched.n)
    measure.metric("wording_share", w.share.value, ci=(w.share.lo, w.share.hi), n=w.share.n)
    measure.metric("wording_driven", float(w.wording_driven))
    return (f"; wording control: {w.status} (d unmatched {w.d_unmatched.value:.3g}, matched "
            f"{w.d_matched.value:.3g} [{w.d_matched.lo:.3g}, {w.d_matched.hi:.3g}], share "
            f"{w.share.value:.2f})")


# --------------------------------------------------------------------------- profile


@pytest.mark.claim("LAYER-PEAK-LATE")
def test_peak_layer_is_late(bench: Workbench, measure: Any) -> None:
    """Where is held-out separation strongest? The validation report: layer 18 of 28."""
    a = _analysis(bench)
    bench.record_model(measure, *bench.train_pair(), *bench.eval_pair())
    d = a.d
    if np.all(np.isnan(d)):
        measure.skip("LAYER-PEAK-LATE", "no analysed layer has a direction")
    depth = max(a.n_layers - 1, 1)
    layers = np.array(a.layers)
    peak = int(layers[np.nanargmax(d)])
    ok = ~np.isnan(a.d_boot).any(axis=0)
    boot_peaks = layers[ok][np.argmax(a.d_boot[:, ok], axis=1)] / depth
    lo, hi = percentile_interval(boot_peaks)
    n_valid = sum(r.valid for r in a.rows)
    k = len(a.rows)
    measure.metric("peak_layer", peak)
    measure.metric("peak_layer_fraction", peak / depth, ci=(lo, hi))
    measure.metric("peak_cohens_d_heldout", float(np.nanmax(d)))
    measure.metric("n_valid_layers", n_valid, n=k)
    measure.metric("valid_layer_fraction", n_valid / k, ci=wilson_interval(n_valid, k), n=k)
    measure.metric("n_layers_without_direction", int(a.constant.sum()), n=k)
    wording = _wording(bench)
    _record_wording_sets(bench, measure)
    measure.table(
        f"per-layer significance (resid_pre, last token; {bench.contrast} contrast; held-out "
        "unless marked; wording control: the same direction on unmatched and matched "
        "held-out prompts)",
        LAYER_COLUMNS + (WORDING_COLUMNS if wording is not None else []),
        layer_table(a, wording),
    )
    d_lo = [a.d_ci(i)[0] for i in range(k)]
    d_hi = [a.d_ci(i)[1] for i in range(k)]
    series = {f"held-out d ({bench.contrast} contrast)": d.tolist(),
              "in-sample d (seed protocol)": [r.cohens_d_in_sample for r in a.rows]}
    bands = {f"held-out d ({bench.contrast} contrast)": (d_lo, d_hi)}
    marks: list[Any] = []
    if wording is not None:
        for label, (ys, band) in _wording_curves(wording).items():
            series[label], bands[label] = ys, band
        driven = wording_driven_layers(wording)
        if driven:
            marks = [("unmatched d (harmless set)", driven, "wording-driven layer")]
    measure.plot(
        "Cohen's d per layer (resid_pre)", "line", x=a.layers, series=series, bands=bands,
        marks=marks, shade=[(depth / 2, depth, "second half of depth")],
        hlines=[(0.5, "|d| = 0.5")], xlabel="layer", ylabel="Cohen's d",
        title=f"peak at layer {peak}; seed: {SEED_PEAK}",
    )
    measure.check("LAYER-PEAK-LATE", peak / depth, ci=(lo, hi), n=a.n_test,
                  detail=f"peak at layer {peak} of {a.n_layers} (d = {np.nanmax(d):.3g}); "
                  f"bootstrap peak fraction [{lo:.2f}, {hi:.2f}]; seed: {SEED_PEAK}")


def _wording_curves(rows: list[WordingRow | None]
                    ) -> dict[str, tuple[list[float], tuple[list[float], list[float]]]]:
    """The unmatched and matched d per layer, with their intervals, for the profile plot."""
    nan = math.nan
    curves = {}
    for label, matched in (("unmatched d (harmless set)", False), ("matched d (twins)", True)):
        est = [None if w is None else w.d_matched if matched else w.d_unmatched for w in rows]
        curves[label] = ([e.value if e is not None else nan for e in est],
                         ([e.lo if e is not None else nan for e in est],
                          [e.hi if e is not None else nan for e in est]))
    return curves


@pytest.mark.claim("LAYER-SURVIVES-MATCHING")
def test_separation_survives_matching(bench: Workbench, measure: Any) -> None:
    """Does any layer's direction still separate harmful requests from their own twins?
    Judged on the best layer's matched-d lower bound, Bonferroni-adjusted over layers."""
    a = _analysis(bench)
    bench.record_model(measure, *bench.train_pair(), *bench.eval_pair())
    rows = _wording(bench)
    if rows is None:
        measure.skip("LAYER-SURVIVES-MATCHING", NO_PAIRS)
        return
    live = [w for w in rows if w is not None]
    if not live:
        measure.skip("LAYER-SURVIVES-MATCHING", "no analysed layer has a direction")
    _record_wording_sets(bench, measure)
    conf = 1.0 - SURVIVAL_ALPHA / len(live)
    adjusted = _wording(bench, conf)
    assert adjusted is not None
    best = max((w for w in adjusted if w is not None),
               key=lambda w: (-math.inf if math.isnan(w.d_matched.lo) else w.d_matched.lo))
    plain = rows[a.layers.index(best.layer)]
    assert plain is not None
    statuses = [w.status for w in live]
    driven = wording_driven_layers(rows)
    measure.metric("n_layers_survives_matching", statuses.count(WordingStatus.SURVIVES_MATCHING),
                   n=len(live))
    measure.metric("n_layers_wording_driven", len(driven), n=len(live))
    measure.metric("n_layers_no_separation", statuses.count(WordingStatus.NO_SEPARATION),
                   n=len(live))
    measure.metric("best_matched_layer", best.layer)
    measure.metric("best_matched_wording_share", plain.share.value,
                   ci=(plain.share.lo, plain.share.hi), n=plain.share.n)
    measure.metric("best_matched_cohens_d_unmatched", plain.d_unmatched.value,
                   ci=(plain.d_unmatched.lo, plain.d_unmatched.hi), n=plain.d_unmatched.n)
    shares = [w.share.value for w in live]
    measure.metric("median_wording_share", float(np.nanmedian(shares))
                   if not np.all(np.isnan(shares)) else math.nan, n=len(live))
    measure.table("wording control per layer (resid_pre; the same direction on unmatched "
                  "and matched held-out prompts)", ["layer", *WORDING_COLUMNS],
                  [[layer, *wording_cells(w)] for layer, w in zip(a.layers, rows, strict=True)])
    measure.metric("best_cohens_d_matched", best.d_matched.value,
                   ci=(best.d_matched.lo, best.d_matched.hi), n=best.d_matched.n)
    measure.check("LAYER-SURVIVES-MATCHING", best.d_matched.value,
                  ci=(best.d_matched.lo, best.d_matched.hi), n=best.d_matched.n,
                  detail=f"best layer {best.layer}: matched d {best.d_matched.value:.3g} "
                  f"({conf:.4g} interval [{best.d_matched.lo:.3g}, {best.d_matched.hi:.3g}], "
                  f"Bonferroni over {len(live)} layers), unmatched d "
                  f"{plain.d_unmatched.value:.3g}, wording share {plain.share.value:.2f} "
                  f"[{plain.share.lo:.2f}, {plain.share.hi:.2f}]; wording-driven layers: "
                  f"{driven or 'none'}")


@pytest.mark.claim("LAYER-GROWTH")
def test_effect_grows_with_depth(bench: Workbench, measure: Any) -> None:
    """The validation report: separation builds up from early to late layers (rho(d, layer) > 0)."""
    a = _analysis(bench)
    bench.record_model(measure, *bench.train_pair(), *bench.eval_pair())
    ok = ~a.constant
    if ok.sum() < 3:
        measure.skip("LAYER-GROWTH", f"only {int(ok.sum())} analysed layers have a direction")
    layers = np.array(a.layers, dtype=float)
    rho, p = spearman(layers[ok], a.d[ok])
    boot = D.profile_spearman(a.d_boot, layers)
    lo, hi = percentile_interval(boot)
    measure.metric("spearman_rho_d_layer", rho, ci=(lo, hi), n=int(ok.sum()))
    measure.metric("spearman_p_d_layer", p, n=int(ok.sum()))
    rho_in, _ = spearman(layers[ok], np.array([r.cohens_d_in_sample for r in a.rows])[ok])
    measure.metric("spearman_rho_d_in_sample_layer", rho_in, n=int(ok.sum()))
    depth = max(a.n_layers - 1, 1)
    rows = []
    for name, f0, f1, seed_range in SEED_BANDS:
        sel = [i for i, lay in enumerate(a.layers) if f0 <= lay / depth < f1 and ok[i]]
        if not sel:
            rows.append([name, "-", "-", "-", seed_range])
            continue
        dh = a.d[sel]
        di = np.array([a.rows[i].cohens_d_in_sample for i in sel])
        rows.append([name, f"{a.layers[sel[0]]}-{a.layers[sel[-1]]}",
                     f"{dh.min():.2f}-{dh.max():.2f}", f"{di.min():.2f}-{di.max():.2f}",
                     seed_range])
        measure.metric(f"mean_d_heldout/{name}", float(dh.mean()),
                       ci=percentile_interval(a.d_boot[:, sel].mean(axis=1)), n=a.n_test)
    measure.table("effect size by depth band beside the Qwen2.5-1.5B report (in-sample)",
                  ["band (seed's depth fractions)", "layers here", "held-out d range",
                   "in-sample d range", "seed d range"], rows)
    measure.check("LAYER-GROWTH", rho, ci=(lo, hi), n=int(ok.sum()),
                  detail=f"Spearman rho over {int(ok.sum())} layers with a direction, interval "
                  f"from {a.d_boot.shape[0]} bootstrap resamples of the held-out prompts "
                  f"(direction fixed); in-sample rho {rho_in:.3g}")


# --------------------------------------------------------------------------- sites


@pytest.mark.claim("SITE-ATTN-BEATS-MLP")
def test_sites_side_by_side(bench: Workbench, measure: Any) -> None:
    """The same per-layer analysis at resid_pre, attn_out and mlp_out (trait-vector log: attn_out
    carried the trait best, 90 % vs 80 %); the claim compares probe accuracy attn vs mlp."""
    bench.record_model(measure, *bench.train_pair(), *bench.eval_pair())
    res = {site: _analysis(bench, site) for site in SITES}
    acc: dict[str, FloatArray] = {}
    for site in SITES:
        cp, cn = _probe_correct(bench, site)
        acc[site] = np.concatenate([cp, cn]).mean(axis=0)  # [k], nan where constant
    a0 = res["resid_pre"]
    rows = []
    for i, layer in enumerate(a0.layers):
        row: list[Any] = [layer]
        for site in SITES:
            r = res[site].rows[i]
            row += [r.cohens_d, r.auc, r.p_holm, acc[site][i]]
        rows.append(row)
    cols = ["layer"] + [f"{s} {m}" for s in SITES for m in ("d", "AUC", "p Holm", "probe acc")]
    measure.table("held-out separation per layer and site", cols, rows)
    for site in SITES:
        a = res[site]
        ok = ~a.constant
        measure.metric(f"{site}/n_valid_layers", sum(r.valid for r in a.rows), n=len(a.rows))
        measure.metric(f"{site}/mean_cohens_d_heldout", float(np.nanmean(a.d)),
                       ci=percentile_interval(a.d_boot[:, ok].mean(axis=1)), n=a.n_test)
        measure.metric(f"{site}/mean_probe_accuracy", float(np.nanmean(acc[site])), n=a.n_test)
        measure.metric(f"{site}/max_cohens_d_heldout", float(np.nanmax(a.d)))
    measure.plot("held-out Cohen's d per layer and site", "line", x=a0.layers,
                 series={s: res[s].d.tolist() for s in SITES}, hlines=[(0.5, "d = 0.5")],
                 xlabel="layer", ylabel="Cohen's d (held-out)", title="d per layer per site")
    measure.plot("held-out AUC per layer and site", "line", x=a0.layers,
                 series={s: [r.auc for r in res[s].rows] for s in SITES},
                 hlines=[(0.5, "chance")], xlabel="layer", ylabel="AUC (held-out)",
                 title="AUC per layer per site")
    measure.plot("held-out probe accuracy per layer and site", "line", x=a0.layers,
                 series={s: acc[s].tolist() for s in SITES}, hlines=[(0.5, "chance")],
                 xlabel="layer", ylabel="accuracy (held-out)",
                 title="probe accuracy per layer per site")
    # attn_out minus mlp_out probe accuracy, averaged over layers where both have a direction;
    # bootstrap over held-out prompts, resampled within class, the same prompts for both
    # sites, each replicate with the probes of both sites refitted on the same resample of
    # the training prompts (so the interval includes the variance of the fits).
    both = ~np.isnan(acc["attn_out"]) & ~np.isnan(acc["mlp_out"])
    cpa, cna = _probe_correct(bench, "attn_out")
    cpm, cnm = _probe_correct(bench, "mlp_out")
    keep = tuple(bool(b) for b in both)
    ra, rm = _site_refits(bench, "attn_out", keep), _site_refits(bench, "mlp_out", keep)
    est = accuracy_bootstrap(
        cpa[:, both] - cpm[:, both], cna[:, both] - cnm[:, both], n_boot=bench.cfg.n_boot,
        seed=_seed(bench, 99), resample_layers=False,
        refits=(ra.correct_pos.astype(float) - rm.correct_pos,
                ra.correct_neg.astype(float) - rm.correct_neg))
    measure.check("SITE-ATTN-BEATS-MLP", est.value, ci=(est.lo, est.hi), n=est.n,
                  detail=f"mean probe accuracy over {int(both.sum())} layers: attn_out "
                  f"{np.nanmean(acc['attn_out']):.3f}, mlp_out {np.nanmean(acc['mlp_out']):.3f},"
                  f" resid_pre {np.nanmean(acc['resid_pre']):.3f}; "
                  "the trait-vector log: 90 % vs 80 %")
