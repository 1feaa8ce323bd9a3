"""DETECTED_PROCEEDS layer localisation and per-token monitoring.

The model replies (greedy, ``max_new_tokens`` of the profile, 48 in full) to held-out harmful
prompts: AdvBench validation prompts (never used to fit the directions; the first part is
``bench.gen_pair()``'s harmful set, so the dose-response experiment's alpha = 0 replies are
the same cached replies) and HarmBench behaviours. The refusal judge labels every reply. One
teacher-forced forward over prompt + reply (:func:`probes.monitoring.forced_trajectories`)
then projects the activation of every step at ``resid_pre`` on the unit refusal direction of
each layer: the numbers a :class:`probes.monitoring.TokenMonitor` records during generation
(up to float rounding), read from the replies every experiment shares.

Per layer l (layers whose direction is zero are left out: ``resid_pre`` of layer 0 at the last
token is the same template embedding for every prompt), with p_l(i) the projection of prompt
i's last token on r̂_l:

* detection AUC: harmful (these prompts) vs harmless (held-out test split);
* decision AUC: refused vs complied among the harmful prompts;
* detected: p_l(i) above the midpoint of the *train* split's class means (the prompts r̂_l was
  fitted on; never these prompts); DETECTED_PROCEEDS: detected and complied.

Layers (definitions in ``probes.geometry``, "proceed layers"): detection saturation = first
layer with AUC - 0.5 >= 95 % of (max AUC - 0.5); detection peak = largest detection AUC (ties:
larger Cohen's d); decision onset = first layer whose one-sided Mann-Whitney p (refused
project higher), Holm-adjusted over layers, is < 0.05 (a point estimate: a first-significant
layer is biased early under the bootstrap); decision saturation = the 95 % rule applied to
the decision AUC; decision peak = largest decision AUC. Gaps (decision saturation - detection
saturation, decision peak - detection peak) carry stratified bootstrap intervals (prompts
resampled within refused / complied / harmless).

Where the claims are judged: at the reference causal layer (``bench.causal_layers``,
``probes.causal``): the layer whose refusal direction, ablated at its own block, lowers the
first-token refusal score of harmful prompts and, added there, raises that of harmless ones,
most. It is selected on harmful *test*-part and harmless *val*-part prompts, disjoint from the
prompts judged here (harmful val part and HarmBench, harmless test part; checked), never on
the max-AUC layer of these data. When no layer is causal the claims are not evaluable and
are skipped with the reason. The detection peak and the middle layer are still reported,
and the per-token comparison has every layer in a Holm table beside the judged one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from functools import cache, partial
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.workbench import Workbench
from probes.cache import read_json_entry, write_json_entry
from probes.causal import check_disjoint_selection, record_causal_layers
from probes.detected_proceeds import (
    DECISION_ALPHA,
    MONITOR_DEPTH,
    SATURATION_FRACTION,
    SITE,
    WINDOW,
    Part,
    Study,
    check_trajectory_part,
    record_examples,
    record_group_means,
    skip_reason,
)
from probes.geometry import (
    bootstrap_proceed_layers,
    detected_proceeds_localisation,
    informative_layers,
    midpoint_thresholds,
    proceed_layers,
)
from probes.judge_error import (
    corrected_group_difference,
    corrected_name,
    corrected_share,
    record_corrected_rate,
)
from probes.layer_alignment import layer_alignment, record_cross_layer
from probes.monitoring import Trajectory, forced_trajectories, window_mean
from probes.stats import (
    auc_interval,
    bootstrap_ci,
    holm,
    percentile_interval,
    rate,
    welch_t,
)
from prompts import PromptSet

# 2: entries carry their key and a checksum; 3: read by a teacher-forced pass over the replies
TRAJECTORY_CACHE_VERSION = "3"
N_EXAMPLE_TEXTS = 8


# --------------------------------------------------------------------------- generation


def _harmful_parts(bench: Workbench) -> list[tuple[str, PromptSet]]:
    seed, n_gen = bench.cfg.seed, bench.cfg.n_gen
    extra_val, extra_hb = bench.cfg.defaults.proceeds_extra_per_gen
    shared = bench.gen_pair()[0]
    val = bench.harmful_split.val
    taken = set(shared.texts)
    rest_idx = [i for i, t in enumerate(val.texts) if t not in taken]
    name = bench.harmful_all.name
    parts = [(f"{name}-val", shared)]
    if rest_idx and extra_val:
        rest = val.subset(rest_idx, f"{name}/val-rest")
        parts.append((f"{name}-val", bench.sample_harmful(rest, extra_val * n_gen)))
    extra = bench.extra_harmful  # HarmBench, unless --harmful replaced AdvBench
    if extra_hb and extra is not None:
        parts.append((extra.name, extra.sample(extra_hb * n_gen, seed)))
    return parts


def _trajectory_key(bench: Workbench, prompts: PromptSet, layers: list[int], n_new: int
                    ) -> dict[str, Any]:
    return {"v": TRAJECTORY_CACHE_VERSION, "fp": bench.lm.fingerprint,
            "prompts": prompts.sha256, "n": n_new, "site": SITE, "layers": layers,
            "directions": bench.refusal_directions.key(), "dtype": str(bench.lm.dtype),
            "chat": bench.lm.chat.mode, **bench.contrast_key()}


def _generate_part(bench: Workbench, source: str, prompts: PromptSet, layers: list[int]) -> Part:
    """Replies and trajectories of one prompt set: from the cache, else the unsteered replies
    (``bench.generate`` with key "none", shared with every experiment) read back by one
    teacher-forced pass (:func:`probes.monitoring.forced_trajectories`)."""
    n_new = bench.cfg.max_new_tokens
    key = _trajectory_key(bench, prompts, layers, n_new)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = bench.cache.root.parent / "trajectories" / f"{digest}.json"
    data = (read_json_entry(path, key, partial(check_trajectory_part, layers, len(prompts)),
                            bench.cache.stats)
            if bench.cfg.use_cache else None)
    cached = data is not None
    if data is None:
        unit = bench.refusal_directions.unit
        gens = bench.generate(prompts, "none", max_new_tokens=n_new)
        t0 = time.perf_counter()
        trajs = forced_trajectories(bench.lm.layout, bench.lm.tokenizer, gens.prompts,
                                    gens.token_ids, gens.new_tokens,
                                    {layer: unit[layer] for layer in layers}, SITE,
                                    batch_size=bench.cfg.batch_size)
        bench.progress(f"[detected_proceeds] {prompts.name}: {len(trajs)} trajectories by "
                       f"teacher forcing in {time.perf_counter() - t0:.1f}s", force=True)
        data = {"layers": layers, "texts": gens.texts, "new_tokens": gens.new_tokens,
                "seconds": gens.seconds,
                "rows": [{"ids": list(t.token_ids), "proj": t.projections.tolist()}
                         for t in trajs]}
        if bench.cfg.use_cache:
            write_json_entry(path, key, data)
    trajectories = [Trajectory(i, tuple(layers), tuple(r["ids"]),
                               np.asarray(r["proj"], dtype=np.float64).reshape(-1, len(layers)))
                    for i, r in enumerate(data["rows"])]
    return Part(source, prompts, list(data["texts"]), list(data["new_tokens"]), trajectories,
                float(data["seconds"]), cached)


def _acts(bench: Workbench, prompts: PromptSet, layers: list[int]) -> torch.Tensor:
    return bench.acts(prompts, site=SITE, layers=layers).data  # [n, k, d], last token


def _projections(bench: Workbench, prompts: PromptSet, layers: list[int]) -> np.ndarray:
    unit = bench.refusal_directions.unit[layers]  # [k, d]
    return torch.einsum("nkd,kd->nk", _acts(bench, prompts, layers), unit).double().numpy()


@cache
def _study(bench: Workbench) -> Study:
    t0 = time.perf_counter()
    layers = informative_layers(bench.refusal_directions.raw.numpy())
    parts = [_generate_part(bench, src, ps, layers) for src, ps in _harmful_parts(bench)]
    texts = [t for p in parts for t in p.texts]
    prompts = [t for p in parts for t in p.prompts.texts]
    sources = [p.source for p in parts for _ in p.texts]
    offset, trajs = 0, []
    for p in parts:
        trajs += [Trajectory(offset + t.prompt_index, t.layers, t.token_ids, t.projections)
                  for t in p.trajectories]
        offset += len(p.texts)
    refused = bench.judge(prompts, texts).refusal
    unit = bench.refusal_directions.unit[layers].double().numpy()  # [k, d]
    harm_acts = torch.cat([_acts(bench, p.prompts, layers) for p in parts]).double().numpy()
    harmless = bench.eval_pair()[1]
    safe_acts = _acts(bench, harmless, layers).double().numpy()
    ph = np.einsum("nkd,kd->nk", harm_acts, unit)
    pb = np.einsum("nkd,kd->nk", safe_acts, unit)
    harm_tr, safe_tr = bench.train_pair()
    thresholds = midpoint_thresholds(_projections(bench, harm_tr, layers),
                                     _projections(bench, safe_tr, layers))
    step0 = np.array([t.projections[0] for t in trajs])  # [n, k]
    dp = detected_proceeds_localisation(unit, harm_acts, safe_acts, refused, thresholds)
    dp_in = detected_proceeds_localisation(unit, harm_acts, safe_acts, refused)
    loc = proceed_layers(ph, pb, refused, layers, fraction=SATURATION_FRACTION,
                         alpha=DECISION_ALPHA)
    bench.progress(f"[detected_proceeds] {bench.lm.name}: {len(texts)} harmful replies, "
                   f"{int(refused.sum())} refused, analysed in {time.perf_counter() - t0:.0f}s",
                   force=True)
    return Study(parts, sources, prompts, texts, refused, tuple(layers), ph, pb, thresholds,
                 loc, dp, dp_in, trajs, harmless, float(np.abs(step0 - ph).max()))


def _record_common(bench: Workbench, measure: Any, st: Study) -> None:
    bench.record_model(measure, *[p.prompts for p in st.parts], st.harmless, *bench.train_pair())
    fresh = [p for p in st.parts if not p.cached]
    measure.metric("generation/harmful_prompts", st.n)
    measure.metric("generation/max_new_tokens", bench.cfg.max_new_tokens, units="tokens")
    measure.metric("generation/seconds", sum(p.seconds for p in st.parts), units="s")
    measure.metric("generation/parts_generated_this_run", len(fresh), n=len(st.parts))
    measure.metric("generation/new_tokens", sum(sum(p.new_tokens) for p in st.parts),
                   units="tokens")
    for src in dict.fromkeys(st.sources):
        sel = np.array([s == src for s in st.sources])
        r = rate(int(st.refused[sel].sum()), int(sel.sum()))
        measure.metric(f"refusal_rate/{src}", r.value, ci=(r.lo, r.hi), n=r.n)
        record_corrected_rate(measure, f"refusal_rate/{src}", int(st.refused[sel].sum()),
                              int(sel.sum()), bench.judge_error(), seed=bench.cfg.seed)
    r = rate(st.n_refused, st.n)
    measure.metric("refusal_rate/all", r.value, ci=(r.lo, r.hi), n=r.n)
    record_corrected_rate(measure, "refusal_rate/all", st.n_refused, st.n, bench.judge_error(),
                          seed=bench.cfg.seed)
    measure.metric("monitor/step0_vs_capture_max_abs_diff", st.step0_max_abs_diff)


def causal_reference(bench: Workbench, measure: Any, st: Study, claim: str) -> int:
    """The reference causal layer at which ``claim`` is judged, after checking that the
    prompts that selected it are disjoint from the judged ones; skips ``claim`` (not
    evaluable, with the reason) when no layer is causal, never falling back to another one."""
    causal = bench.causal_layers
    check_disjoint_selection(list(bench.causal_pair()),
                             [*(p.prompts for p in st.parts), st.harmless], claim)
    record_causal_layers(measure, causal)
    reason = causal.no_layer_reason()
    layer = causal.reference_layer
    if reason is None and layer not in st.layers:
        reason = (f"the reference causal layer {layer} is not among the analysed layers "
                  f"{list(st.layers)}")
    if reason is not None or layer is None:
        measure.skip(claim, reason or "no reference causal layer")
        raise AssertionError("measure.skip returned")  # it raises; for the type checker
    return layer


# --------------------------------------------------------------------------- tests


@pytest.mark.claim("DP-SHARE-NONZERO")
def test_detected_proceeds_share(bench: Workbench, measure: Any) -> None:
    st = _study(bench)
    _record_common(bench, measure, st)
    ref_layer = st.loc.detection_peak_layer
    complied = ~st.refused
    rows = []
    shares, los, his = [], [], []
    for row, row_in in zip(st.dp, st.dp_in_sample, strict=True):
        layer = st.layers[row.layer]
        detected = st.ph[:, row.layer] > row.threshold
        share = rate(row.n_detected_proceeds, st.n)
        shares.append(share.value)
        los.append(share.lo)
        his.append(share.hi)
        among = rate(row.n_detected_proceeds, int(complied.sum()))
        rows.append([layer, row.threshold, float(detected.mean()), row.n_detected_proceeds,
                     share.value, share.lo, share.hi, among.value,
                     row_in.n_detected_proceeds / st.n])
    measure.table("detected_proceeds_by_layer",
                  ["layer", "threshold (train midpoint)", "detected share", "detected_proceeds",
                   "share of harmful", "wilson lo", "wilson hi", "share of complied",
                   "share, in-sample threshold (comparison)"], rows)
    measure.plot("detected_proceeds_share", "line", x=list(st.layers),
                 series={"DETECTED_PROCEEDS / harmful": shares},
                 bands={"DETECTED_PROCEEDS / harmful": (los, his)},
                 hlines=[(1.0 - st.n_refused / st.n, "complied share")],
                 xlabel="layer", ylabel="share of harmful prompts",
                 title="Detected at the train threshold yet complied")
    measure.metric("detection_peak_layer", ref_layer)
    ref_layer = causal_reference(bench, measure, st, "DP-SHARE-NONZERO")
    c = st.col(ref_layer)
    row = st.dp[c]
    share = rate(row.n_detected_proceeds, st.n)
    measure.metric("reference_layer (causal)", ref_layer)
    measure.metric("detected_proceeds_share", share.value, ci=(share.lo, share.hi), n=st.n)
    among = rate(row.n_detected_proceeds, int(complied.sum()))
    measure.metric("detected_proceeds_share_of_complied", among.value, ci=(among.lo, among.hi),
                   n=among.n)
    idx = np.flatnonzero(row.detected_proceeds)[:N_EXAMPLE_TEXTS]
    measure.texts("detected_proceeds_examples",
                  [{"source": st.sources[i], "prompt": st.prompts[i], "reply": st.texts[i],
                    "projection": f"{st.ph[i, c]:.3f} > {row.threshold:.3f}"} for i in idx])
    detected = st.ph[:, c] > row.threshold
    err = bench.judge_error()
    corr = corrected_share(int((detected & st.refused).sum()), int(detected.sum()), st.n, err,
                           seed=bench.cfg.seed)
    measure.metric(corrected_name("detected_proceeds_share"), corr.value,
                   ci=(corr.lo, corr.hi), n=st.n)
    measure.check("DP-SHARE-NONZERO", share.value, ci=(share.lo, share.hi), n=st.n,
                  label=f"layer {ref_layer}",
                  judge_corrected=(corr.value, (corr.lo, corr.hi),
                                   f"Rogan-Gladen on the detected prompts' refusal rate; "
                                   f"{err.text()}"),
                  detail=f"{row.n_detected_proceeds} of {st.n} harmful prompts detected at layer "
                         f"{ref_layer} (reference causal layer; train threshold "
                         f"{row.threshold:.3f}) yet complied")


@pytest.mark.claim("DP-DETECT-EXCEEDS-DECISION")
def test_detection_exceeds_decision(bench: Workbench, measure: Any) -> None:
    st = _study(bench)
    _record_common(bench, measure, st)
    loc = st.loc
    det_ci = [auc_interval(st.ph[:, j], st.pb[:, j]) for j in range(len(st.layers))]
    measure.metric("saturation_layer", loc.saturation_layer)
    measure.metric("detection_peak_layer", loc.detection_peak_layer)
    la = layer_alignment(bench.refusal_directions.raw.numpy(), bench.lm.name)
    record_cross_layer(measure, la)
    reason = skip_reason(st)
    if reason is not None:
        measure.plot("auc_by_layer", "line", x=list(st.layers),
                     series={"detection": loc.detection_auc.tolist()},
                     bands={"detection": ([e.lo for e in det_ci], [e.hi for e in det_ci])},
                     hlines=[(0.5, "chance")], xlabel="layer", ylabel="AUC")
        measure.skip("DP-DETECT-EXCEEDS-DECISION", reason)
    refused, complied = st.refused, ~st.refused
    dec_ci = [auc_interval(st.ph[refused, j], st.ph[complied, j]) for j in range(len(st.layers))]
    measure.plot("auc_by_layer", "line", x=list(st.layers),
                 series={"detection (harmful vs harmless)": loc.detection_auc.tolist(),
                         "decision (refused vs complied)": loc.decision_auc.tolist()},
                 bands={"detection (harmful vs harmless)": ([e.lo for e in det_ci],
                                                            [e.hi for e in det_ci]),
                        "decision (refused vs complied)": ([e.lo for e in dec_ci],
                                                           [e.hi for e in dec_ci])},
                 hlines=[(0.5, "chance")], xlabel="layer", ylabel="AUC",
                 title="Where the direction detects harm and where it predicts refusal")
    measure.table("auc_by_layer",
                  ["layer", "detection AUC", "lo", "hi", "Cohen's d", "decision AUC", "lo", "hi",
                   "one-sided p", "Holm p"],
                  [[layer, loc.detection_auc[j], det_ci[j].lo, det_ci[j].hi, loc.detection_d[j],
                    loc.decision_auc[j], dec_ci[j].lo, dec_ci[j].hi, loc.decision_p[j],
                    loc.decision_p_holm[j]] for j, layer in enumerate(st.layers)])
    peak = loc.detection_peak_layer
    boot = bootstrap_proceed_layers(st.ph, st.pb, st.refused, st.layers, at_layer=peak,
                                    n_boot=bench.cfg.n_boot, seed=bench.cfg.seed,
                                    fraction=SATURATION_FRACTION)
    n_all = st.n + len(st.pb)
    measure.metric("saturation_layer_boot", loc.saturation_layer,
                   ci=percentile_interval(boot.saturation), n=n_all)
    measure.metric("detection_peak_layer_boot", peak,
                   ci=percentile_interval(boot.detection_peak), n=n_all)
    # Decision onset: a point estimate (no bootstrap; see probes.geometry "proceed layers").
    measure.metric("decision_onset_layer",
                   math.nan if loc.decision_onset_layer is None else loc.decision_onset_layer,
                   n=st.n)
    if loc.decision_onset_layer is not None:
        measure.metric("gap_decision_onset_minus_saturation",
                       loc.decision_onset_layer - loc.saturation_layer, units="layers")
    measure.metric("decision_peak_layer", loc.decision_peak_layer,
                   ci=percentile_interval(boot.decision_peak), n=st.n)
    measure.metric("gap_decision_peak_minus_detection_peak",
                   (loc.decision_peak_layer or 0) - peak,
                   ci=percentile_interval(boot.decision_peak - boot.detection_peak), n=n_all,
                   units="layers")
    defined = ~np.isnan(boot.decision_saturation)
    measure.metric("decision_saturation_defined_share_boot", float(defined.mean()),
                   n=len(defined))
    if loc.decision_saturation_layer is not None:
        gap = (boot.decision_saturation - boot.saturation)[defined]
        measure.metric("decision_saturation_layer", loc.decision_saturation_layer,
                       ci=percentile_interval(boot.decision_saturation[defined]), n=st.n)
        measure.metric("gap_decision_saturation_minus_detection_saturation",
                       loc.decision_saturation_layer - loc.saturation_layer,
                       ci=percentile_interval(gap), n=n_all, units="layers")
    rows = []
    for rule, layer in (("decision onset (Holm)", loc.decision_onset_layer),
                        ("decision saturation (95 %)", loc.decision_saturation_layer),
                        ("decision peak", loc.decision_peak_layer),
                        ("detection saturation (95 %)", loc.saturation_layer),
                        ("detection peak", peak),
                        ("reference causal layer", bench.causal_layers.reference_layer)):
        if layer is None:
            continue
        cluster = next(((a, b) for a, b in la.clusters if a <= layer <= b), None)
        rows.append([rule, layer, None if cluster is None else cluster[0],
                     None if cluster is None else cluster[1], la.settling_layer,
                     layer - la.settling_layer])
    measure.table("cross_layer/cluster_of_each_layer",
                  ["layer of", "layer", "cluster first", "cluster last", "settling layer",
                   "layer - settling layer"], rows)
    if loc.decision_saturation_layer is not None:
        measure.metric("decision_saturation_minus_settling_layer",
                       loc.decision_saturation_layer - la.settling_layer, units="layers")
    ref_layer = causal_reference(bench, measure, st, "DP-DETECT-EXCEEDS-DECISION")
    if ref_layer != peak:  # the AUC difference's interval at the judged layer
        boot = bootstrap_proceed_layers(st.ph, st.pb, st.refused, st.layers,
                                        at_layer=ref_layer, n_boot=bench.cfg.n_boot,
                                        seed=bench.cfg.seed, fraction=SATURATION_FRACTION)
    c = st.col(ref_layer)
    diff = float(loc.detection_auc[c] - loc.decision_auc[c])
    lo, hi = percentile_interval(boot.auc_difference)
    measure.metric("detection_auc_at_reference", loc.detection_auc[c], ci=(det_ci[c].lo,
                                                                          det_ci[c].hi))
    measure.metric("decision_auc_at_reference", loc.decision_auc[c], ci=(dec_ci[c].lo,
                                                                        dec_ci[c].hi))
    measure.metric("detection_minus_decision_auc", diff, ci=(lo, hi), n=n_all)
    measure.check("DP-DETECT-EXCEEDS-DECISION", diff, ci=(lo, hi), n=n_all,
                  label=f"layer {ref_layer}",
                  detail=f"reference causal layer {ref_layer}: "
                         f"detection AUC {loc.detection_auc[c]:.3f} vs decision AUC "
                         f"{loc.decision_auc[c]:.3f} ({st.n_refused} refused, "
                         f"{st.n - st.n_refused} complied; paired stratified bootstrap, "
                         f"{bench.cfg.n_boot} replicates)")


def _monitor_layer(bench: Workbench, st: Study) -> int:
    """The analysed layer nearest to ``MONITOR_DEPTH`` of the model's depth."""
    target = round(MONITOR_DEPTH * bench.lm.n_layers)
    return min(st.layers, key=lambda layer: (abs(layer - target), layer))


@pytest.mark.claim("MONITOR-REFUSAL-HIGHER")
def test_refusal_tokens_project_higher(bench: Workbench, measure: Any) -> None:
    st = _study(bench)
    _record_common(bench, measure, st)
    middle = _monitor_layer(bench, st)
    measure.metric("middle_layer", middle)
    ref = bench.causal_layers.reference_layer
    record_examples(bench.lm.tokenizer, measure, st,
                    sorted({middle, st.loc.detection_peak_layer, st.layers[-1],
                            *([ref] if ref in st.layers else [])}))
    reason = skip_reason(st)
    if reason is not None:
        measure.skip("MONITOR-REFUSAL-HIGHER", reason)
    refused = st.refused
    rows, pvals, diffs = [], [], {}
    for layer in st.layers:
        w = np.array([window_mean(t, layer, *WINDOW) for t in st.trajectories])
        ok = ~np.isnan(w)
        a, b = w[ok & refused], w[ok & ~refused]
        if a.size < 2 or b.size < 2:
            continue
        est = bootstrap_ci((a, b), lambda x, y: float(x.mean() - y.mean()),
                           n_boot=bench.cfg.n_boot, seed=bench.cfg.seed + layer)
        t, p = welch_t(a, b)
        diffs[layer] = (est, a.size, b.size)
        pvals.append(p)
        rows.append([layer, float(a.mean()), float(b.mean()), est.value, est.lo, est.hi, t, p])
    adj = holm(pvals)
    signs = np.array([r[3] for r in rows])
    significant = np.asarray(adj) < DECISION_ALPHA
    measure.metric("layers_refusal_higher_holm", int(np.sum(significant & (signs > 0))),
                   n=len(rows))
    measure.metric("layers_refusal_lower_holm", int(np.sum(significant & (signs < 0))),
                   n=len(rows))
    measure.table("first5_projection_by_layer",
                  ["layer", "refusals mean", "compliances mean", "difference", "lo", "hi",
                   "Welch t", "p", "Holm p"],
                  [[*r, float(q)] for r, q in zip(rows, adj, strict=True)])
    if diffs:
        xs = sorted(diffs)
        measure.plot("first5_difference_by_layer", "line", x=xs,
                     series={"refusal - compliance": [diffs[x][0].value for x in xs]},
                     bands={"refusal - compliance": ([diffs[x][0].lo for x in xs],
                                                     [diffs[x][0].hi for x in xs])},
                     hlines=[(0.0, "no difference")], xlabel="layer",
                     ylabel="mean projection, steps 1-5",
                     title="Refusals vs compliant replies over their first five tokens")
    ref_layer = causal_reference(bench, measure, st, "MONITOR-REFUSAL-HIGHER")
    measure.metric("monitor_layer (reference causal)", ref_layer)
    record_group_means(bench.cfg.n_boot, bench.cfg.seed, measure, st, ref_layer)
    if ref_layer not in diffs:
        measure.skip("MONITOR-REFUSAL-HIGHER",
                     f"fewer than 2 replies with generated tokens in a group at layer {ref_layer}")
    est, n_a, n_b = diffs[ref_layer]
    measure.metric("refusal_minus_compliance_projection_first5", est.value, ci=(est.lo, est.hi),
                   n=n_a + n_b)
    w = np.array([window_mean(t, ref_layer, *WINDOW) for t in st.trajectories])
    ok = ~np.isnan(w)
    err = bench.judge_error()
    corr = corrected_group_difference(w[ok], refused[ok], err, n_boot=bench.cfg.n_boot,
                                      seed=bench.cfg.seed + ref_layer)
    measure.metric(corrected_name("refusal_minus_compliance_projection_first5"), corr.value,
                   ci=(corr.lo, corr.hi), n=n_a + n_b)
    measure.check("MONITOR-REFUSAL-HIGHER", est.value, ci=(est.lo, est.hi), n=n_a + n_b,
                  label=f"layer {ref_layer}",
                  judge_corrected=(corr.value, (corr.lo, corr.hi),
                                   "group difference / (PPV + NPV - 1) at the Rogan-Gladen "
                                   f"refusal prevalence; {err.text()}"),
                  detail=f"reference causal layer; {n_a} refusals vs {n_b} compliant replies, "
                         f"mean projection on r̂_"
                         f"{ref_layer} over generated tokens 1-5 ({SITE}); bootstrap interval")
