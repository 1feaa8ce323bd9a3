"""Transfer of refusal directions across topics, harm categories, languages and benchmarks
(the trait-vector log's cross-topic, cross-language and cross-distribution tests).

Design (resid_pre, last token, at the layer of the trait-vector log's relative depth: its "probe @
layer 16" of Gemma-2-2B's 26 layers, i.e. round(16/25 * (L - 1)); never chosen on our data):

* Cross-topic: the harmless side is split by topic (English harmless set: cooking,
  science, ...), the harmful side stays the whole train / held-out AdvBench split. Fold i
  fits on harmful-train vs topic-i harmless-train and is tested on the harmful held-out
  prompts vs the held-out harmless prompts of every topic j; cell (i, j) is the balanced
  accuracy. Cross-category: the same with the harmful side split by AdvBench's first harm
  category (categories with fewer than MIN_GROUP prompts in a split are pooled as
  "other"), the harmless side whole. Only one class changes between cells, so the drop
  in balanced accuracy is half the drop in the varying class's accuracy; both are reported.
* Cross-language: the harmful set (AdvBench) is English only, so only the harmless side
  can change language. The 36 harmless prompts that exist in all five languages (en, es,
  fr, de, zh) are split by translation group (train groups never appear, in any language,
  in the test); fold X fits on English harmful vs harmless-in-X and is tested against
  harmless-in-Y. This cannot show that a direction is language-invariant in the seed's
  sense (both classes in one language); what it measures is whether the direction
  confounds language with harm: a direction fitted with English harmful vs French
  harmless may have learned "English vs French", which still separates English harmful
  from German harmless, but fails on English harmless (the en column). The en-fitted
  direction's false-alarm rate on translated harmless prompts and the shift of a
  translation along the direction (as a fraction of the harmful-harmless gap) are
  reported for that reason.
* AdvBench -> HarmBench: the direction fitted on the train split (AdvBench vs harmless)
  classifies HarmBench prompts (no harmless counterpart) against the held-out harmless
  prompts; compared with held-out AdvBench against the same harmless prompts.

Every transfer here runs on the unmatched contrast (the harmless set), whatever
``--contrast`` says: topics, languages and a harmful-side change need the harmless set's
labels, which minimal pairs do not have.

Intervals: bootstrap over held-out prompts (within class, and within the varying groups);
the fitted directions are held fixed.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest

from fixtures.contrast import ContrastKind
from fixtures.workbench import Workbench
from probes import directions as D
from probes.directions import Method
from probes.method_comparison import N_REFIT, Refits, refit
from probes.stats import (
    FloatArray,
    auc,
    cohens_d,
    percentile_interval,
    wilson_interval,
)
from probes.transfer import (
    LANGUAGES,
    MIN_GROUP,
    CrossMatrix,
    cross_matrix,
    diagonal_drop,
    group_split,
    parallel_set,
    record_matrix,
    split_by_label,
)
from prompts import PromptSet

UNMATCHED: ContrastKind = "unmatched"  # the contrast of every transfer (module docstring)
SEED002_DEPTH = 16 / 25  # "probe @ layer 16" on Gemma-2-2B (26 layers)
METHODS: tuple[Method, ...] = ("probe", "mean_diff")
SEED_TOPIC = "trait-vector log (probe @ layer 16, Gemma-2-2B-IT): same-topic 100.0 %, cross 91.4 %"
SEED_LANG = ("trait-vector log (probe @ layer 16, Gemma-2-2B-IT, both classes in each language): "
             "same-language 100.0 %, cross 99.6 %; mean_diff ~50 % cross-language")


# --------------------------------------------------------------------------- data


def transfer_layer(bench: Workbench) -> int:
    """The analysed layer nearest the trait-vector log's relative depth that has a direction."""
    target = round(SEED002_DEPTH * (bench.lm.n_layers - 1))
    ok = [lay for lay in bench.layers if not _constant(bench)[lay]]
    if not ok:
        pytest.skip("no analysed layer has a direction")
    return min(ok, key=lambda lay: (abs(lay - target), lay))


@cache
def _constant(bench: Workbench) -> dict[int, bool]:
    sets = (*bench.train_pair(UNMATCHED), *bench.eval_pair(UNMATCHED))
    acts = [bench.acts(p, layers=bench.layers).numpy() for p in sets]
    return dict(zip(bench.layers, D.constant_layers(*acts).tolist(), strict=True))


def _layer_acts(bench: Workbench, ps: PromptSet, layer: int) -> FloatArray:
    acts: FloatArray = bench.acts(ps, layers=[layer]).numpy()[:, 0]
    return acts


@cache
def _topic(bench: Workbench, method: Method) -> CrossMatrix:
    layer = transfer_layer(bench)
    (h_tr, s_tr), (h_te, s_te) = bench.train_pair(UNMATCHED), bench.eval_pair(UNMATCHED)
    assert bench.harmless_label is not None  # checked by the test (_needs)
    names, vary_train, vary_test, grp = split_by_label(
        s_tr, s_te, bench.harmless_label, _layer_acts(bench, s_tr, layer),
        _layer_acts(bench, s_te, layer))
    return cross_matrix("harmless topic", method, layer, names, vary_train, vary_test, grp,
                        _layer_acts(bench, h_tr, layer), _layer_acts(bench, h_te, layer),
                        vary_is_pos=False, n_boot=bench.cfg.n_boot, seed=bench.cfg.seed + 11,
                        n_refit=N_REFIT)


@cache
def _category(bench: Workbench, method: Method) -> CrossMatrix:
    layer = transfer_layer(bench)
    (h_tr, s_tr), (h_te, s_te) = bench.train_pair(UNMATCHED), bench.eval_pair(UNMATCHED)
    assert bench.harmful_label is not None  # checked by the test (_needs)
    names, vary_train, vary_test, grp = split_by_label(
        h_tr, h_te, bench.harmful_label, _layer_acts(bench, h_tr, layer),
        _layer_acts(bench, h_te, layer))
    return cross_matrix("harmful category", method, layer, names, vary_train, vary_test, grp,
                        _layer_acts(bench, s_tr, layer), _layer_acts(bench, s_te, layer),
                        vary_is_pos=True, n_boot=bench.cfg.n_boot, seed=bench.cfg.seed + 13,
                        n_refit=N_REFIT)


@cache
def _language(bench: Workbench, method: Method) -> CrossMatrix:
    layer = transfer_layer(bench)
    par = parallel_set(bench.harmless_all)
    x = _layer_acts(bench, par, layer)
    train_groups, _ = group_split(par, bench.cfg.seed)
    in_train = np.array([g in train_groups for g in par.label("group")])
    lang = np.array(par.label("language"))
    vary_train = [x[in_train & (lang == lg)] for lg in LANGUAGES]
    test_idx = np.flatnonzero(~in_train)
    grp = np.array([LANGUAGES.index(lg) for lg in lang[test_idx]], dtype=np.int64)
    (h_tr, _), (h_te, _) = bench.train_pair(UNMATCHED), bench.eval_pair(UNMATCHED)
    return cross_matrix("harmless language", method, layer, list(LANGUAGES), vary_train,
                        x[test_idx], grp, _layer_acts(bench, h_tr, layer),
                        _layer_acts(bench, h_te, layer), vary_is_pos=False,
                        n_boot=bench.cfg.n_boot, seed=bench.cfg.seed + 17,
                        n_refit=N_REFIT)


def _harmbench_set(bench: Workbench) -> PromptSet:
    extra = bench.extra_harmful
    assert extra is not None  # checked by the test (_needs)
    return extra.sample(bench.cfg.n_eval, bench.cfg.seed)


def _needs(bench: Workbench, measure: Any, hyp: str, what: str) -> None:
    """Skip ``hyp`` (recorded, with the reason) when the run's prompt sets lack what it
    needs: labels a ``--harmful``/``--harmless`` set may not have, or HarmBench."""
    reasons = {
        "harmful categories": (bench.harmful_label is None,
                               "needs harm categories: pass --category-column NAME with a "
                               "--harmful file that has that column"),
        "harmless topics": (bench.harmless_label is None,
                            "needs harmless topics: pass --category-column NAME with a "
                            "--harmless file that has that column"),
        "languages": (not bench.has_languages,
                      "needs the harmless set's language and translation-group labels, which "
                      "the built-in harmless set has and a --harmless set does not"),
        "harmbench": (bench.extra_harmful is None,
                      "needs HarmBench as a second harmful set beside AdvBench; --harmful "
                      "replaced AdvBench, so there is no second set to transfer to"),
    }
    missing, reason = reasons[what]
    if missing:
        bench.record_model(measure, *bench.train_pair(UNMATCHED))
        measure.skip(hyp, reason)


# --------------------------------------------------------------------------- reporting


def _cross_check(bench: Workbench, measure: Any, hyp: str, label: str, metric: str,
                 build: Any, seed_note: str, *extra: PromptSet) -> None:
    bench.record_model(measure, *bench.train_pair(UNMATCHED), *bench.eval_pair(UNMATCHED), *extra)
    mats = {method: build(bench, method) for method in METHODS}
    probe = mats["probe"]
    if len(probe.groups) < 2:
        measure.skip(hyp, f"fewer than two {probe.kind}s with >= {MIN_GROUP} prompts in both "
                     "splits (use a larger profile)")
    for m in mats.values():
        record_matrix(measure, m, seed_note)
    measure.metric("transfer_layer", probe.layer)
    measure.metric(metric, probe.drop.value, ci=(probe.drop.lo, probe.drop.hi), n=probe.drop.n)
    off = ~np.eye(len(probe.groups), dtype=bool)
    measure.check(hyp, probe.drop.value, ci=(probe.drop.lo, probe.drop.hi), n=probe.drop.n,
                  label=label,
                  detail=f"probe @ layer {probe.layer}: same-{label} "
                  f"{np.mean(np.diag(probe.balanced)):.3f}, cross "
                  f"{np.mean(probe.balanced[off]):.3f} over {len(probe.groups)} {probe.kind}s "
                  f"(held-out prompts per group {probe.n_test}); varying-class drop "
                  f"{diagonal_drop(probe.vary):.3f}; mean_diff drop "
                  f"{mats['mean_diff'].drop.value:.3f}; {seed_note}")


# --------------------------------------------------------------------------- tests


@pytest.mark.claim("PROBE-CROSS-TOPIC")
def test_cross_topic_harmless(bench: Workbench, measure: Any) -> None:
    """Fit with one harmless topic, test on the others (harmful side: whole AdvBench split)."""
    _needs(bench, measure, "PROBE-CROSS-TOPIC", "harmless topics")
    _cross_check(bench, measure, "PROBE-CROSS-TOPIC", "harmless topic", "probe_cross_topic_drop",
                 _topic, SEED_TOPIC)


@pytest.mark.claim("PROBE-CROSS-TOPIC")
def test_cross_category_harmful(bench: Workbench, measure: Any) -> None:
    """Fit with one AdvBench harm category, test on the others (harmless side: whole split)."""
    _needs(bench, measure, "PROBE-CROSS-TOPIC", "harmful categories")
    _cross_check(bench, measure, "PROBE-CROSS-TOPIC", "harmful category",
                 "probe_cross_topic_drop", _category, SEED_TOPIC)


@pytest.mark.claim("PROBE-CROSS-LANG")
def test_cross_language_harmless(bench: Workbench, measure: Any) -> None:
    """Harmless side in one language, tested against harmless prompts in the others (the
    harmful side is English only: this measures whether the direction confounds language)."""
    _needs(bench, measure, "PROBE-CROSS-LANG", "languages")
    par = parallel_set(bench.harmless_all)
    _cross_check(bench, measure, "PROBE-CROSS-LANG", "harmless language",
                 "probe_cross_language_drop", _language, SEED_LANG, par)
    _, test_groups = group_split(par, bench.cfg.seed)
    test_rows = [i for i, g in enumerate(par.label("group")) if g in test_groups]
    ids = np.array([par.label("group")[i] for i in test_rows])
    for method in METHODS:
        m = _language(bench, method)
        en = 0
        # Confound column: fitted with harmless-in-X, tested on English harmless.
        col = [float(m.balanced[i, i] - m.balanced[i, en]) for i in range(1, len(m.groups))]
        measure.metric(f"{method}/en_column_drop", float(np.mean(col)))
        # The English-fitted direction on translated harmless prompts.
        scores = m.vary_scores[en]
        en_sel = m.vary_group == en
        en_by_group = dict(zip(ids[en_sel], scores[en_sel], strict=True))
        gap = float(m.fixed_scores[en].mean() - scores[en_sel].mean())
        rows = []
        for j, lg in enumerate(m.groups):
            sel = m.vary_group == j
            n_sel = int(sel.sum())
            wrong = int((scores[sel] > m.thresholds[en]).sum())
            lo, hi = wilson_interval(wrong, n_sel)
            measure.metric(f"{method}/en_fitted_false_alarm/{lg}", wrong / n_sel,
                           ci=(lo, hi), n=n_sel)
            if j == en:
                rows.append([lg, wrong / n_sel, 0.0])
                continue
            # Each translation against its own English original (same translation group).
            shift = np.array([s - en_by_group[g] for s, g in
                              zip(scores[sel], ids[sel], strict=True)]) / gap
            boot = np.random.default_rng(bench.cfg.seed + j).integers(
                0, shift.size, size=(bench.cfg.n_boot, shift.size))
            slo, shi = percentile_interval(shift[boot].mean(axis=1))
            measure.metric(f"{method}/translation_shift_fraction/{lg}", float(shift.mean()),
                           ci=(slo, shi), n=int(shift.size))
            rows.append([lg, wrong / sel.sum(), float(shift.mean())])
        measure.table(
            f"English-fitted {method} direction on translated harmless prompts (held-out "
            "translation groups): false alarms, and the shift of a translation towards the "
            "harmful side as a fraction of the harmful-harmless gap",
            ["harmless language", "classified harmful", "shift / gap"], rows)


@cache
def _harmbench(bench: Workbench) -> dict[str, Any]:
    """Per analysed layer and method: held-out AdvBench vs HarmBench against the same harmless."""
    hb = _harmbench_set(bench)
    (h_tr, s_tr), (h_te, s_te) = bench.train_pair(UNMATCHED), bench.eval_pair(UNMATCHED)
    layers = [lay for lay in bench.layers if not _constant(bench)[lay]]
    trp, trn, tep, ten, tehb = (bench.acts(p, layers=layers).numpy()
                                for p in (h_tr, s_tr, h_te, s_te, hb))
    out: dict[str, Any] = {"layers": layers, "n_hb": len(hb)}
    for method in METHODS:
        bench.progress(f"[transfer] HarmBench {method}: {len(layers)} layers", force=True)
        u = D.fit_direction_per_layer(method, trp, trn, seed=bench.cfg.seed)
        cp, cn = D.heldout_correct(u, trp, trn, tep, ten)
        chb, _ = D.heldout_correct(u, trp, trn, tehb, ten)
        s_hb, s_safe = D.project(tehb, u), D.project(ten, u)
        out[method] = {
            "cp": cp, "cn": cn, "chb": chb,
            "acc_adv": 0.5 * cp.mean(axis=0) + 0.5 * cn.mean(axis=0),
            "acc_hb": 0.5 * chb.mean(axis=0) + 0.5 * cn.mean(axis=0),
            "d_hb": [cohens_d(s_hb[:, i], s_safe[:, i]) for i in range(len(layers))],
            "auc_hb": [auc(s_hb[:, i], s_safe[:, i]) for i in range(len(layers))],
        }
    return out


@cache
def _harmbench_refits(bench: Workbench, index: int, n_adv: int) -> Refits:
    """The probe at analysed layer ``index`` refitted on N_REFIT resamples of the training
    prompts, scored on held-out AdvBench (first ``n_adv`` rows) then HarmBench prompts."""
    hb = _harmbench_set(bench)
    (h_tr, s_tr), (h_te, s_te) = bench.train_pair(), bench.eval_pair()
    layers = [lay for lay in bench.layers if not _constant(bench)[lay]]
    trp, trn, tep, ten, tehb = (bench.acts(ps, layers=layers).numpy()[:, index : index + 1]
                                for ps in (h_tr, s_tr, h_te, s_te, hb))
    assert tep.shape[0] == n_adv
    return refit("probe", trp, trn, np.concatenate([tep, tehb]), ten,
                 seed=bench.cfg.seed + 29)


@pytest.mark.claim("PROBE-TRANSFER-HARMBENCH")
def test_advbench_to_harmbench(bench: Workbench, measure: Any) -> None:
    """Fit on AdvBench (train split), test HarmBench vs held-out harmless prompts."""
    _needs(bench, measure, "PROBE-TRANSFER-HARMBENCH", "harmbench")
    hb = _harmbench_set(bench)
    bench.record_model(measure, *bench.train_pair(UNMATCHED), *bench.eval_pair(UNMATCHED), hb)
    r = _harmbench(bench)
    layers = r["layers"]
    layer = transfer_layer(bench)
    i = layers.index(layer)
    for method in METHODS:
        measure.metric(f"{method}/advbench_balanced_accuracy", float(r[method]["acc_adv"][i]))
        measure.metric(f"{method}/harmbench_balanced_accuracy", float(r[method]["acc_hb"][i]))
        measure.metric(f"{method}/harmbench_cohens_d", float(r[method]["d_hb"][i]))
        measure.metric(f"{method}/harmbench_auc", float(r[method]["auc_hb"][i]))
    measure.plot("AdvBench -> HarmBench per layer", "line", x=layers,
                 series={f"{m} {k}": list(map(float, r[m][f"acc_{k}"]))
                         for m in METHODS for k in ("adv", "hb")},
                 hlines=[(0.5, "chance")], xlabel="layer", ylabel="balanced accuracy",
                 title="held-out AdvBench (adv) vs HarmBench (hb), same held-out harmless")
    measure.table("AdvBench -> HarmBench per layer (balanced accuracy; d and AUC vs harmless)",
                  ["layer", *[f"{m} {k}" for m in METHODS for k in
                              ("AdvBench acc", "HarmBench acc", "HarmBench d", "HarmBench AUC")]],
                  [[lay, *[float(r[m][k][j]) for m in METHODS
                           for k in ("acc_adv", "acc_hb", "d_hb", "auc_hb")]]
                   for j, lay in enumerate(layers)])
    p = r["probe"]
    cp, cn, chb = p["cp"][:, i], p["cn"][:, i], p["chb"][:, i]
    # Replicate b refits the probe on training resample b mod N_REFIT (the fit's variance)
    # and resamples the held-out harmful prompts of both sets.
    fits = _harmbench_refits(bench, i, cp.size)
    rng = np.random.default_rng(bench.cfg.seed + 23)
    b = bench.cfg.n_boot
    which = np.arange(b) % fits.correct_pos.shape[0]
    ip = rng.integers(0, cp.size, size=(b, cp.size))
    ih = rng.integers(0, chb.size, size=(b, chb.size))
    rcp = fits.correct_pos[:, :cp.size, 0].astype(float)
    rhb = fits.correct_pos[:, cp.size:, 0].astype(float)
    # The harmless half of both balanced accuracies is the same prompts and fit: it cancels.
    drops = 0.5 * (rcp[which[:, None], ip].mean(axis=1) - rhb[which[:, None], ih].mean(axis=1))
    value = 0.5 * (float(cp.mean()) - float(chb.mean()))
    lo, hi = percentile_interval(drops)
    lo, hi = min(lo, value), max(hi, value)
    measure.metric("transfer_layer", layer)
    measure.metric("probe_harmbench_drop", value, ci=(lo, hi), n=cp.size + chb.size + cn.size)
    measure.check("PROBE-TRANSFER-HARMBENCH", value, ci=(lo, hi), n=cp.size + chb.size + cn.size,
                  detail=f"probe @ layer {layer}: held-out AdvBench {p['acc_adv'][i]:.3f}, "
                  f"HarmBench {p['acc_hb'][i]:.3f} (harmful recall {cp.mean():.3f} vs "
                  f"{chb.mean():.3f}, {r['n_hb']} HarmBench prompts); mean over layers "
                  f"{np.mean(p['acc_adv']):.3f} vs {np.mean(p['acc_hb']):.3f}")
