"""Refusal geometry (OBLITERATUS report, experiment 1): concept cones of harm categories, per layer.

Per AdvBench harm category c (label ``category``, the first/main harm category) the
direction d_c = unit(mu_H,c - mu_B) is fitted at ``resid_pre``/last token, at every layer.
Harmful prompts: an equal number per category (seeded), from the train split topped up
from the val split; categories without that many prompts are left out. Harmless prompts:
the train harmless set that also fits the refusal directions (``bench.train_pair()``).

The seed read "POLYHEDRAL" from 4 categories of 3-9 prompts each. Even without any
category structure, the mean differences of small random groups point in different
directions, so the seed's label may be noise. The key check here is the permutation
baseline. Category labels are shuffled among the same harmful prompts (sizes kept), and
the observed mean |cos| must fall below that null (Holm over layers). The depth trend
(early layers more polyhedral) is tested as reported and again on the excess over the
null: where the harmful-harmless signal is weak, random splits look polyhedral as well.

Geometry is descriptive. The causal check ablates d_c (fitted at one middle layer,
removed from every residual write) and asks whether refusal drops more on category c's
held-out prompts than on the other categories'. Refusal is measured with the first-token
refusal log-odds (one forward pass per prompt, cached on disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.workbench import Workbench
from probes.concept_cone import (
    MIN_CATEGORIES,
    N_PERM,
    SEED_HARMLESS,
    SEED_SIZES,
    Cone,
    causal_layer,
    causal_prompts,
    cone_prompts,
    direction_hash,
    estimate_ci,
    null_summary,
    record_causal,
    record_depth_plots,
    record_representative_layers,
)
from probes.geometry import (
    ConeStatistics,
    GeometryLabel,
    ablation_specificity,
    bootstrap_interval,
    category_directions,
    cone_statistics,
    layer_trend,
    most_linear_layer,
    most_polyhedral_layer,
)
from probes.interventions import ablate_direction
from probes.judges import refusal_logit_scores, refusal_token_ids
from probes.layer_alignment import layer_alignment, record_cross_layer
from probes.stats import holm
from prompts import PromptSet

SCORE_CACHE_VERSION = "2"  # 2: entries carry their key and a checksum
# OBLITERATUS report figures (Qwen2.5-0.5B-Instruct, 4 categories of 3-9 prompts).
SEED = {"dimension": 3.96, "mean_cos": 0.132, "most_polyhedral_layer": 2,
        "most_linear_layer": 15, "mean_dimension_all_layers": 3.88, "cap_formula_3d": 2.89}


NO_CATEGORIES = ("the concept cone needs harm categories: pass --category-column NAME with a "
                 "--harmful file that has that column")


@cache
def cone(bench: Workbench) -> Cone:
    """Cone statistics of every layer with bootstrap and permutation replicates."""
    harmless = bench.train_pair()[1]
    harmful = (None if bench.harmful_label is None else
               cone_prompts(bench.harmful_split, bench.cfg.defaults.cone_per_category,
                            bench.cfg.seed))
    if harmful is None:
        return Cone(None, harmless, [], [], {}, 0.0)
    h = bench.acts(harmful).numpy()  # [n, L, d]
    b = bench.acts(harmless).numpy()  # [m, L, d]
    t0 = time.perf_counter()
    stats = cone_statistics(h, harmful.label("category"), b, n_boot=bench.cfg.n_boot,
                            n_perm=N_PERM, seed=bench.cfg.seed, interval="basic")
    seconds = time.perf_counter() - t0
    layers = [ly for ly in bench.layers if stats[ly].label is not GeometryLabel.UNDEFINED]
    raw = []
    for layer in layers:
        pt = stats[layer].mean_abs_cos_perm
        raw.append(pt.p_less if pt is not None else float("nan"))
    adj = holm(raw) if raw else np.zeros(0)
    return Cone(harmful, harmless, stats, layers, dict(zip(layers, adj.tolist(), strict=True)),
                seconds)


def _start(bench: Workbench, data: Cone, measure: Any, hyp: str) -> PromptSet:
    """Record the model and prompts; skip (with the reason) when too few categories."""
    bench.record_model(measure, data.harmless)
    if bench.harmful_label is None:
        measure.skip(hyp, NO_CATEGORIES)
    if data.harmful is not None:
        bench.record_prompts(measure, data.harmful)
        return data.harmful
    n = bench.cfg.defaults.cone_per_category
    measure.skip(hyp, f"fewer than {MIN_CATEGORIES} harm categories with {n} prompts in "
                      "the train + val splits")
    raise AssertionError("unreachable: measure.skip raises")


# --------------------------------------------------------------------------- per layer


@pytest.mark.claim("CONE-POLYHEDRAL", "CONE-DIMENSION", "CONE-BEYOND-NULL")
def test_cone_layer(bench: Workbench, layer: int, measure: Any) -> None:
    """Is the refusal cone at this layer polyhedral, and more so than random splits?"""
    data = cone(bench)
    _start(bench, data, measure, "CONE-POLYHEDRAL")
    cs = data.stats[layer]
    if cs.label is GeometryLabel.UNDEFINED:
        measure.skip("CONE-POLYHEDRAL", f"layer {layer}: a category mean equals the harmless "
                     "mean, so d_c is undefined (at resid_pre of layer 0 the last token's "
                     "activation is the same template-token embedding for every prompt)")
    null = null_summary(cs)
    n = int(cs.counts.sum()) + len(data.harmless)
    assert cs.mean_abs_cos_perm is not None
    assert cs.dimension_perm is not None
    measure.metric("n_categories", len(cs.categories))
    measure.metric("prompts_per_category", int(cs.counts.min()))
    measure.metric("mean_abs_cos", cs.mean_abs_cos, ci=estimate_ci(cs.mean_abs_cos_ci), n=n)
    measure.metric("effective_dimension", cs.effective_dimension,
                   ci=estimate_ci(cs.dimension_ci), n=n)
    measure.metric("effective_dimension_obliteratus", cs.effective_dimension_obliteratus)
    measure.metric("cap_formula_3d_not_a_solid_angle", cs.cap_formula_3d, units="sr (3-D cap)")
    measure.metric("null_mean_abs_cos", null["mac_mean"], ci=(null["mac_lo"], null["mac_hi"]),
                   n=N_PERM)
    measure.metric("null_effective_dimension", null["dim_mean"],
                   ci=(null["dim_lo"], null["dim_hi"]), n=N_PERM)
    measure.metric("null_polyhedral_share", null["polyhedral_share"], n=N_PERM)
    measure.metric("perm_p_mean_abs_cos", cs.mean_abs_cos_perm.p_less, n=N_PERM)
    measure.metric("perm_p_holm_mean_abs_cos", data.p_holm[layer], n=N_PERM)
    measure.metric("perm_p_dimension", cs.dimension_perm.p_greater, n=N_PERM)
    measure.table("categories", ["category", "n", "strength", "specificity"],
                  [[c, int(k), float(s), float(sp)] for c, k, s, sp in
                   zip(cs.categories, cs.counts, cs.strengths, cs.specificity, strict=True)])
    basic = ("basic bootstrap interval: it undoes the resampling shift towards 'polyhedral' "
             "and need not contain the estimate")
    measure.check("CONE-POLYHEDRAL", cs.mean_abs_cos, ci=estimate_ci(cs.mean_abs_cos_ci), n=n,
                  detail=f"geometry {cs.label.value}; null replicates POLYHEDRAL "
                         f"{null['polyhedral_share']:.0%}; {basic}", hard=False)
    measure.check("CONE-DIMENSION", cs.effective_dimension, ci=estimate_ci(cs.dimension_ci), n=n,
                  detail=f"{len(cs.categories)} categories; null mean {null['dim_mean']:.3f}; "
                         f"{basic}", hard=False)
    measure.check("CONE-BEYOND-NULL", data.p_holm[layer], n=N_PERM,
                  detail=f"observed mean |cos| {cs.mean_abs_cos:.3f} vs null mean "
                         f"{null['mac_mean']:.3f} [{null['mac_lo']:.3f}, {null['mac_hi']:.3f}]; "
                         f"raw p {cs.mean_abs_cos_perm.p_less:.4f}, Holm over "
                         f"{len(data.p_holm)} layers", hard=False)


# --------------------------------------------------------------------------- depth profile


@pytest.mark.claim("CONE-EARLY-POLYHEDRAL", "CONE-EARLY-EXCESS")
def test_cone_depth_profile(bench: Workbench, measure: Any) -> None:
    """Are early layers more polyhedral than late ones (as reported, and beyond the null)?"""
    data = cone(bench)
    _start(bench, data, measure, "CONE-EARLY-POLYHEDRAL")
    layers = data.layers
    if len(layers) < 3:
        measure.skip("CONE-EARLY-POLYHEDRAL", f"a depth trend needs >= 3 layers with a "
                                              f"defined cone; --layers gave {len(layers)}")
    stats = [data.stats[layer] for layer in layers]
    nulls = [null_summary(cs) for cs in stats]
    dims = np.array([cs.effective_dimension for cs in stats])
    macs = np.array([cs.mean_abs_cos for cs in stats])
    null_dim = np.array([nl["dim_mean"] for nl in nulls])
    boot = np.stack([cs.dimension_boot for cs in stats if cs.dimension_boot is not None], axis=1)
    if boot.shape[1] != len(layers):
        raise RuntimeError("cone statistics were computed without bootstrap replicates")
    trend = layer_trend(layers, dims, boot, interval="basic")
    excess = layer_trend(layers, dims - null_dim, boot - null_dim[None, :], interval="basic")
    third = max(1, len(layers) // 3)
    diff_reps = boot[:, :third].mean(axis=1) - boot[:, -third:].mean(axis=1)
    diff = float(dims[:third].mean() - dims[-third:].mean())
    k = len(stats[0].categories)
    undefined = [ly for ly in bench.layers if ly not in layers]
    if undefined:
        measure.table("layers_left_out", ["layer", "reason"],
                      [[ly, "d_c undefined (a category mean equals the harmless mean)"]
                       for ly in undefined])

    measure.metric("cone_seconds", data.seconds, units="s")
    measure.metric("n_categories", k)
    measure.metric("prompts_per_category", int(stats[0].counts.min()))
    measure.metric("most_polyhedral_layer", most_polyhedral_layer(stats))
    measure.metric("most_linear_layer", most_linear_layer(stats))
    measure.metric("mean_dimension_all_layers", float(dims.mean()), n=len(layers))
    measure.metric("mean_abs_cos_all_layers", float(macs.mean()), n=len(layers))
    measure.metric("polyhedral_layers", int(sum(cs.label is GeometryLabel.POLYHEDRAL
                                                for cs in stats)), n=len(layers))
    measure.metric("layers_beyond_null", int(sum(data.p_holm[ly] < 0.05 for ly in layers)),
                   n=len(layers))
    measure.metric("spearman_rho_dimension_layer", trend.value, ci=(trend.lo, trend.hi),
                   n=len(layers))
    measure.metric("spearman_rho_excess_dimension_layer", excess.value,
                   ci=(excess.lo, excess.hi), n=len(layers))
    measure.metric("first_minus_last_third_dimension", diff,
                   ci=bootstrap_interval(diff, diff_reps, kind="basic"), n=third)

    record_depth_plots(measure, layers, stats, nulls, data.p_holm)
    record_representative_layers(measure, stats, layers)
    measure.table("seed_comparison", ["quantity", "OBLITERATUS report (Qwen2.5-0.5B, 4 cat. x 3-9)",
                                      f"this model ({k} cat. x {int(stats[0].counts.min())})"],
                  [["most polyhedral layer", SEED["most_polyhedral_layer"],
                    most_polyhedral_layer(stats)],
                   ["most linear layer", SEED["most_linear_layer"], most_linear_layer(stats)],
                   ["mean dimension, all layers", SEED["mean_dimension_all_layers"],
                    float(dims.mean())],
                   ["max dimension", SEED["dimension"], float(dims.max())],
                   ["mean |cos| at the most polyhedral layer", SEED["mean_cos"],
                    data.stats[most_polyhedral_layer(stats)].mean_abs_cos],
                   ["cap formula (3-D, not a solid angle), most polyhedral layer",
                    SEED["cap_formula_3d"],
                    data.stats[most_polyhedral_layer(stats)].cap_formula_3d]])
    measure.check("CONE-EARLY-POLYHEDRAL", trend.value, ci=(trend.lo, trend.hi),
                  n=len(layers), detail=f"first-third minus last-third dimension {diff:.3f}",
                  hard=False)
    measure.check("CONE-EARLY-EXCESS", excess.value, ci=(excess.lo, excess.hi), n=len(layers),
                  detail="excess = observed dimension - mean permutation-null dimension",
                  hard=False)


# --------------------------------------------------------------------------- seed-sized sample


def seed_sized_cone(bench: Workbench, data: Cone) -> tuple[tuple[str, ...], list[ConeStatistics]]:
    """The cone of a sample the size of the seed's (4 categories of 3, 4, 4 and 9 prompts,
    20 harmless), drawn (seeded) from this experiment's prompts, with its permutation null."""
    assert data.harmful is not None
    labels = np.asarray(data.harmful.label("category"))
    rng = np.random.default_rng(bench.cfg.seed)
    cats = tuple(sorted(rng.permutation(np.unique(labels))[: len(SEED_SIZES)].tolist()))
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), size, replace=False)
                          for c, size in zip(cats, SEED_SIZES, strict=True)])
    safe = rng.choice(len(data.harmless), min(SEED_HARMLESS, len(data.harmless)), replace=False)
    h = bench.acts(data.harmful).numpy()[idx]
    b = bench.acts(data.harmless).numpy()[safe]
    return cats, cone_statistics(h, labels[idx], b, n_perm=N_PERM, seed=bench.cfg.seed)


def test_cone_at_seed_sample_size(bench: Workbench, measure: Any) -> None:
    """Descriptive: with the seed's prompt counts, how often do random splits of the same
    prompts already look POLYHEDRAL (the seed's label as a sampling artefact)?"""
    data = cone(bench)
    bench.record_model(measure, data.harmless)
    if bench.harmful_label is None:
        pytest.skip(NO_CATEGORIES)
    if data.harmful is None:
        pytest.skip(f"fewer than {MIN_CATEGORIES} harm categories for the concept cone")
    bench.record_prompts(measure, data.harmful)
    cats, stats = seed_sized_cone(bench, data)
    layers = [ly for ly in data.layers if stats[ly].label is not GeometryLabel.UNDEFINED]
    rows, shares = [], []
    for ly in layers:
        cs = stats[ly]
        nl = null_summary(cs)
        assert cs.mean_abs_cos_perm is not None
        shares.append(nl["polyhedral_share"])
        rows.append([ly, cs.label.value, cs.mean_abs_cos, nl["mac_mean"], cs.effective_dimension,
                     nl["dim_mean"], cs.effective_dimension_obliteratus,
                     nl["polyhedral_share"], cs.mean_abs_cos_perm.p_less])
    p_holm = holm([r[-1] for r in rows])
    measure.metric("seed_sized/categories", len(cats))
    measure.metric("seed_sized/polyhedral_layers",
                   sum(stats[ly].label is GeometryLabel.POLYHEDRAL for ly in layers),
                   n=len(layers))
    measure.metric("seed_sized/mean_null_polyhedral_share", float(np.mean(shares)), n=N_PERM)
    measure.metric("seed_sized/layers_beyond_null", int((p_holm < 0.05).sum()), n=len(layers))
    measure.metric("seed_sized/mean_abs_cos_all_layers",
                   float(np.mean([stats[ly].mean_abs_cos for ly in layers])), n=len(layers))
    measure.metric("seed_sized/mean_dimension_all_layers",
                   float(np.mean([stats[ly].effective_dimension for ly in layers])),
                   n=len(layers))
    measure.table("seed_sized/per_layer",
                  ["layer", "label", "mean |cos|", "null mean |cos|", "dimension",
                   "null dimension", "dimension (OBLITERATUS)", "null POLYHEDRAL share",
                   "perm p"], rows)
    measure.table("seed_sized/sample", ["category", "prompts"],
                  [[c, n] for c, n in zip(cats, SEED_SIZES, strict=True)]
                  + [["harmless", min(SEED_HARMLESS, len(data.harmless))]])


# --------------------------------------------------------------------------- cross-layer


def test_cross_layer_alignment(bench: Workbench, measure: Any) -> None:
    """Descriptive: |cos| of the per-layer refusal directions, persistence, clusters."""
    bench.record_model(measure, *bench.train_pair())
    la = layer_alignment(bench.refusal_directions.raw.numpy(), bench.lm.name)
    record_cross_layer(measure, la)
    assert 0 <= la.settling_layer < bench.lm.n_layers


# --------------------------------------------------------------------------- causal check


def refusal_scores(
    bench: Workbench,
    prompts: PromptSet,
    intervention_key: str = "none",
    intervention: Callable[[], AbstractContextManager[Any]] | None = None,
) -> np.ndarray:
    """First-token refusal log-odds of ``prompts`` under an intervention, cached on disk
    (like ``bench.generate``) by model, prompts, intervention key and refusal token set."""
    lm = bench.lm
    ids = refusal_token_ids(lm.tokenizer)

    def compute() -> dict[str, Any]:
        bench.progress(f"[scores] {lm.name} {prompts.name} {intervention_key}", force=True)
        with (intervention or nullcontext)():
            scores = refusal_logit_scores(lm.model, lm.tokenizer,
                                          lm.format(list(prompts.texts)),
                                          batch_size=bench.cfg.batch_size, token_ids=ids)
        return {"scores": scores.tolist()}

    def fits(payload: dict[str, Any]) -> None:
        if len(payload["scores"]) != len(prompts):
            raise ValueError(f"{len(payload['scores'])} scores for {len(prompts)} prompts")

    key = {"v": SCORE_CACHE_VERSION, "prompts": prompts.sha256, "iv": intervention_key,
           "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}
    data = bench.cached_json("refusal_scores", "scores", key, compute, fits)
    return np.asarray(data["scores"], float)


@pytest.mark.claim("CONE-CAUSAL")
def test_cone_causal(bench: Workbench, measure: Any) -> None:
    """Does ablating d_c lower refusal on category c more than on the other categories?"""
    if bench.lm.refuses is False:
        bench.record_model(measure)
        measure.skip("CONE-CAUSAL", f"{bench.lm.name} does not refuse harmful requests: "
                                    "there is no refusal for an ablation to lower")
    data = cone(bench)
    harmful = _start(bench, data, measure, "CONE-CAUSAL")
    layer = causal_layer(bench.lm.n_layers)
    cats = list(data.stats[layer].categories)
    held = causal_prompts(bench.harmful_split.test, cats,
                          bench.cfg.defaults.cone_causal_per_category, bench.cfg.seed)
    bench.record_prompts(measure, held)
    h = bench.acts(harmful, layers=[layer]).numpy()[:, 0]
    b = bench.acts(data.harmless, layers=[layer]).numpy()[:, 0]
    dirs = category_directions(h, harmful.label("category"), b)
    assert list(dirs.categories) == cats
    layout = bench.lm.layout

    def ablation(v: np.ndarray) -> Callable[[], AbstractContextManager[None]]:
        t = torch.from_numpy(np.asarray(v, dtype=np.float32))
        return lambda: ablate_direction(layout, t)

    base = refusal_scores(bench, held)
    drops = np.stack([
        base - refusal_scores(bench, held, f"ablate-all-writes:cone-d_c:{c}:L{layer}:"
                                           f"{direction_hash(dirs.units[a])}",
                              ablation(dirs.units[a]))
        for a, c in enumerate(cats)])  # [k, n]
    glob = bench.refusal_directions.unit[layer].numpy()
    drop_global = base - refusal_scores(
        bench, held, f"ablate-all-writes:refusal:L{layer}:{bench.refusal_directions.key(layer)}",
        ablation(glob))
    spec = ablation_specificity(drops, held.label("category"), n_boot=bench.cfg.n_boot,
                                seed=bench.cfg.seed)
    validated = bool(spec.overall.lo > 0)
    geometry = dataclasses.replace(data.stats[layer], causally_validated=validated)
    record_causal(measure, bench.cfg.n_boot, bench.cfg.seed, layer, held, base, drops,
                  drop_global, spec, geometry)
    measure.check("CONE-CAUSAL", spec.overall.value, ci=(spec.overall.lo, spec.overall.hi),
                  n=len(held), detail=f"d_c fitted at layer {layer}, ablated from every "
                                      f"residual write; causally_validated = {validated}")
