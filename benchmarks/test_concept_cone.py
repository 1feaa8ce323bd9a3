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
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.cross_layer import cross_layer_of, record_cross_layer
from fixtures.workbench import Workbench
from probes.geometry import (
    POLYHEDRAL_MAX_MEAN_ABS_COS,
    POLYHEDRAL_MIN_DIMENSION,
    AblationSpecificity,
    ConeStatistics,
    GeometryLabel,
    ablation_specificity,
    bootstrap_interval,
    category_directions,
    cone_statistics,
    label_share,
    layer_trend,
    most_linear_layer,
    most_polyhedral_layer,
)
from probes.interventions import ablate_direction
from probes.judges import refusal_logit_scores, refusal_token_ids
from probes.paths import atomic_write_bytes
from probes.stats import Estimate, holm, percentile_interval
from prompts import PromptSet

# Prompts per category for fitting d_c, by profile (balanced, >= 15 each).
N_PER_CATEGORY = {"quick": 16, "full": 24}
MIN_CATEGORIES = 4
# Permutation replicates: enough that a Holm-adjusted p over 24+ layers can reach 0.05
# (the smallest p is 1 / (N_PERM + 1)). Replicates only re-weight Gram matrices: cheap.
N_PERM = 999
# Held-out prompts per category for the causal check (test split), by profile.
N_CAUSAL = {"quick": 4, "full": 8}
# Layer whose d_c is ablated in the causal check: the middle of the network (OBLITERATUS report
# steered layers 8-15 of 24; refusal directions from mid-depth ablate best, Arditi et al.).
CAUSAL_LAYER_FRACTION = 0.5
SCORE_CACHE_VERSION = "1"
# The seed's sample: weapons 3, fraud 4, intrusion 4, cyber 9 prompts; 20 harmless.
SEED_SIZES = (3, 4, 4, 9)
SEED_HARMLESS = 20
# OBLITERATUS report figures (Qwen2.5-0.5B-Instruct, 4 categories of 3-9 prompts).
SEED = {"dimension": 3.96, "mean_cos": 0.132, "most_polyhedral_layer": 2,
        "most_linear_layer": 15, "mean_dimension_all_layers": 3.88, "cap_formula_3d": 2.89}


# --------------------------------------------------------------------------- data


def _concat(name: str, sets: Sequence[PromptSet]) -> PromptSet:
    keys = sorted(set.intersection(*(set(s.labels) for s in sets)))
    return PromptSet(name, tuple(t for s in sets for t in s.texts),
                     {k: tuple(v for s in sets for v in s.labels[k]) for k in keys})


def cone_prompts(bench: Workbench) -> PromptSet | None:
    """``n`` harmful prompts per category (train split first, then val), for every category
    that has ``n`` of them; ``n`` = ``N_PER_CATEGORY[profile]``. Seeded by ``--seed``.
    None when fewer than ``MIN_CATEGORIES`` categories qualify."""
    n = N_PER_CATEGORY.get(bench.cfg.profile, N_PER_CATEGORY["full"])
    split = bench.harmful_split
    rng = np.random.default_rng(bench.cfg.seed)
    parts: list[PromptSet] = []
    cats = sorted(set(split.train.label("category")) | set(split.val.label("category")))
    for cat in cats:
        pool: list[str] = []
        for part in (split.train, split.val):
            texts = [t for t, c in zip(part.texts, part.label("category"), strict=True)
                     if c == cat]
            pool += [texts[i] for i in rng.permutation(len(texts))]
        if len(pool) >= n:
            parts.append(PromptSet(cat, tuple(pool[:n]), {"category": (cat,) * n}))
    if len(parts) < MIN_CATEGORIES:
        return None
    return _concat(f"advbench/cone[{len(parts)}x{n},seed={bench.cfg.seed}]", parts)


@dataclass(frozen=True)
class Cone:
    harmful: PromptSet | None  # None: too few categories qualified
    harmless: PromptSet
    stats: list[ConeStatistics]  # every layer
    layers: list[int]  # selected layers (--layers) whose cone is defined
    p_holm: dict[int, float]  # permutation p of mean |cos|, Holm over ``layers``
    seconds: float


@cache
def cone(bench: Workbench) -> Cone:
    """Cone statistics of every layer with bootstrap and permutation replicates."""
    harmful = cone_prompts(bench)
    harmless = bench.train_pair()[1]
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
    if data.harmful is not None:
        measure.prompts(data.harmful.name, data.harmful.sha256, len(data.harmful))
        return data.harmful
    n = N_PER_CATEGORY.get(bench.cfg.profile, N_PER_CATEGORY["full"])
    measure.skip(hyp, f"fewer than {MIN_CATEGORIES} harm categories with {n} prompts in "
                      "the train + val splits")
    raise AssertionError("unreachable: measure.skip raises")


def _ci(est: Estimate | None) -> tuple[float, float] | None:
    return None if est is None else (est.lo, est.hi)


def _null_summary(cs: ConeStatistics) -> dict[str, float]:
    assert cs.mean_abs_cos_perm is not None
    assert cs.dimension_perm is not None
    mac, dim = cs.mean_abs_cos_perm.null, cs.dimension_perm.null
    return {
        "mac_mean": float(mac.mean()),
        "mac_lo": float(np.quantile(mac, 0.025)),
        "mac_hi": float(np.quantile(mac, 0.975)),
        "dim_mean": float(dim.mean()),
        "dim_lo": float(np.quantile(dim, 0.025)),
        "dim_hi": float(np.quantile(dim, 0.975)),
        "polyhedral_share": label_share(mac, dim, GeometryLabel.POLYHEDRAL),
    }


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
    null = _null_summary(cs)
    n = int(cs.counts.sum()) + len(data.harmless)
    assert cs.mean_abs_cos_perm is not None
    assert cs.dimension_perm is not None
    measure.metric("n_categories", len(cs.categories))
    measure.metric("prompts_per_category", int(cs.counts.min()))
    measure.metric("mean_abs_cos", cs.mean_abs_cos, ci=_ci(cs.mean_abs_cos_ci), n=n)
    measure.metric("effective_dimension", cs.effective_dimension, ci=_ci(cs.dimension_ci), n=n)
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
    measure.check("CONE-POLYHEDRAL", cs.mean_abs_cos, ci=_ci(cs.mean_abs_cos_ci), n=n,
                  detail=f"geometry {cs.label.value}; null replicates POLYHEDRAL "
                         f"{null['polyhedral_share']:.0%}; {basic}", hard=False)
    measure.check("CONE-DIMENSION", cs.effective_dimension, ci=_ci(cs.dimension_ci), n=n,
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
    nulls = [_null_summary(cs) for cs in stats]
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

    _record_depth_plots(measure, layers, stats, nulls, data.p_holm)
    _record_representative_layers(measure, stats, layers)
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


def _record_depth_plots(measure: Any, layers: list[int], stats: list[ConeStatistics],
                        nulls: list[dict[str, float]], p_holm: dict[int, float]) -> None:
    k = len(stats[0].categories)

    def ci(est: Estimate | None, idx: int) -> float:
        return float("nan") if est is None else (est.lo, est.hi)[idx]

    measure.plot(
        "dimension_vs_layer", "line", x=layers,
        series={"observed": [cs.effective_dimension for cs in stats],
                "permutation null (mean)": [nl["dim_mean"] for nl in nulls]},
        bands={"observed": ([ci(cs.dimension_ci, 0) for cs in stats],
                            [ci(cs.dimension_ci, 1) for cs in stats]),
               "permutation null (mean)": ([nl["dim_lo"] for nl in nulls],
                                           [nl["dim_hi"] for nl in nulls])},
        hlines=[(POLYHEDRAL_MIN_DIMENSION, "POLYHEDRAL if above"), (k, f"k = {k} categories")],
        xlabel="layer", ylabel="effective dimension (s^2 entropy)",
        title="Cone dimension by layer (bands: bootstrap 95 %, null 2.5-97.5 %)")
    measure.plot(
        "mean_abs_cos_vs_layer", "line", x=layers,
        series={"observed": [cs.mean_abs_cos for cs in stats],
                "permutation null (mean)": [nl["mac_mean"] for nl in nulls]},
        bands={"observed": ([ci(cs.mean_abs_cos_ci, 0) for cs in stats],
                            [ci(cs.mean_abs_cos_ci, 1) for cs in stats]),
               "permutation null (mean)": ([nl["mac_lo"] for nl in nulls],
                                           [nl["mac_hi"] for nl in nulls])},
        hlines=[(POLYHEDRAL_MAX_MEAN_ABS_COS, "POLYHEDRAL if below")],
        xlabel="layer", ylabel="mean |cos| between category directions",
        title="Mean |cos| by layer vs random splits of the same prompts")
    rows = []
    for cs, nl in zip(stats, nulls, strict=True):
        assert cs.mean_abs_cos_perm is not None
        assert cs.mean_abs_cos_boot is not None
        assert cs.dimension_boot is not None
        mac_pct = percentile_interval(cs.mean_abs_cos_boot)
        dim_pct = percentile_interval(cs.dimension_boot)
        rows.append([cs.layer, cs.label.value, cs.mean_abs_cos, ci(cs.mean_abs_cos_ci, 0),
                     ci(cs.mean_abs_cos_ci, 1), *mac_pct, nl["mac_mean"],
                     cs.mean_abs_cos_perm.p_less, p_holm[cs.layer], cs.effective_dimension,
                     ci(cs.dimension_ci, 0), ci(cs.dimension_ci, 1), *dim_pct, nl["dim_mean"],
                     cs.effective_dimension_obliteratus, cs.cap_formula_3d,
                     nl["polyhedral_share"]])
    measure.table("per_layer", ["layer", "label", "mean |cos|", "basic lo", "basic hi",
                                "percentile lo", "percentile hi", "null mean |cos|", "perm p",
                                "perm p (Holm)", "dimension", "basic lo", "basic hi",
                                "percentile lo", "percentile hi", "null dimension",
                                "dimension (OBLITERATUS s-entropy)", "cap formula (3-D)",
                                "null POLYHEDRAL share"], rows)


def _short(category: str) -> str:
    """Initials of a multi-word category ("Human Rights and Civil Liberties" -> "HRCL")."""
    words = [w for w in category.split() if w[:1].isupper()]
    return "".join(w[0] for w in words) if len(words) > 1 else category[:4]


def _record_representative_layers(measure: Any, stats: list[ConeStatistics],
                                  layers: list[int]) -> None:
    by_layer = {cs.layer: cs for cs in stats}
    reps = {"most polyhedral": most_polyhedral_layer(stats),
            "most linear": most_linear_layer(stats),
            "middle": layers[len(layers) // 2]}
    rows = []
    for role, layer in reps.items():
        cs = by_layer[layer]
        measure.plot(f"category_cosines/{role.replace(' ', '_')}_L{layer}", "heatmap",
                     matrix=cs.cosines.tolist(), xlabels=[_short(c) for c in cs.categories],
                     ylabels=[_short(c) for c in cs.categories], vmin=-1.0, vmax=1.0,
                     cmap="RdBu_r", annotate=True, clabel="cos(d_c, d_c')",
                     title=f"L{layer} ({role}): dim {cs.effective_dimension:.2f}")
        for c, n, s, sp in zip(cs.categories, cs.counts, cs.strengths, cs.specificity,
                               strict=True):
            rows.append([role, layer, c, int(n), float(s), float(sp)])
    measure.table("categories_at_representative_layers",
                  ["role", "layer", "category", "n", "strength", "specificity"], rows)
    measure.table("category_abbreviations", ["abbreviation", "category"],
                  [[_short(c), c] for c in stats[0].categories])


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
    if data.harmful is None:
        pytest.skip(f"fewer than {MIN_CATEGORIES} harm categories for the concept cone")
    measure.prompts(data.harmful.name, data.harmful.sha256, len(data.harmful))
    cats, stats = seed_sized_cone(bench, data)
    layers = [ly for ly in data.layers if stats[ly].label is not GeometryLabel.UNDEFINED]
    rows, shares = [], []
    for ly in layers:
        cs = stats[ly]
        nl = _null_summary(cs)
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
    la = cross_layer_of(bench)
    record_cross_layer(measure, la)
    assert 0 <= la.settling_layer < bench.lm.n_layers


# --------------------------------------------------------------------------- causal check


def causal_layer(n_layers: int) -> int:
    return round(CAUSAL_LAYER_FRACTION * (n_layers - 1))


def causal_prompts(bench: Workbench, categories: Sequence[str]) -> PromptSet:
    """``N_CAUSAL[profile]`` held-out (test split) prompts of each category, seeded."""
    n = N_CAUSAL.get(bench.cfg.profile, N_CAUSAL["full"])
    test = bench.harmful_split.test
    parts = [test.where("category", c).sample(n, bench.cfg.seed) for c in categories]
    return _concat(f"advbench/test/cone-causal[{len(parts)}x{n},seed={bench.cfg.seed}]", parts)


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
    src = json.dumps({"v": SCORE_CACHE_VERSION, "fp": lm.fingerprint, "prompts": prompts.sha256,
                      "iv": intervention_key, "dtype": str(lm.dtype), "chat": lm.chat.mode,
                      "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]},
                     sort_keys=True)
    key = hashlib.sha256(src.encode()).hexdigest()[:32]
    path = bench.cache.root.parent / "refusal_scores" / f"{key}.json"
    if bench.cfg.use_cache and path.is_file():
        try:
            return np.asarray(json.loads(path.read_text(encoding="utf-8"))["scores"], float)
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"refusal score cache entry {path} is corrupt ({exc}); recomputing",
                          stacklevel=2)
    bench.progress(f"[scores] {lm.name} {prompts.name} {intervention_key}", force=True)
    with (intervention or nullcontext)():
        scores = refusal_logit_scores(lm.model, lm.tokenizer, lm.format(list(prompts.texts)),
                                      batch_size=bench.cfg.batch_size, token_ids=ids)
    if bench.cfg.use_cache:
        payload = {"key": json.loads(src), "scores": scores.tolist()}
        atomic_write_bytes(path, json.dumps(payload).encode())
    return scores


def _direction_hash(v: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(v, dtype=np.float32).tobytes()).hexdigest()[:16]


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
    held = causal_prompts(bench, cats)
    measure.prompts(held.name, held.sha256, len(held))
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
                                           f"{_direction_hash(dirs.units[a])}",
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
    _record_causal(measure, bench, layer, held, base, drops, drop_global, spec, geometry)
    measure.check("CONE-CAUSAL", spec.overall.value, ci=(spec.overall.lo, spec.overall.hi),
                  n=len(held), detail=f"d_c fitted at layer {layer}, ablated from every "
                                      f"residual write; causally_validated = {validated}")


def _record_causal(measure: Any, bench: Workbench, layer: int, held: PromptSet,
                   base: np.ndarray, drops: np.ndarray, drop_global: np.ndarray,
                   spec: AblationSpecificity, geometry: ConeStatistics) -> None:
    cats = list(spec.categories)
    labels = np.asarray(held.label("category"))
    n_boot, seed = bench.cfg.n_boot, bench.cfg.seed
    rng = np.random.default_rng(seed)
    g_idx = rng.integers(0, drop_global.size, size=(n_boot, drop_global.size))
    g_lo, g_hi = percentile_interval(drop_global[g_idx].mean(axis=1))
    measure.metric("causal_layer", layer)
    measure.metric("ablation_specificity", spec.overall.value,
                   ci=(spec.overall.lo, spec.overall.hi), n=len(held))
    measure.metric("causally_validated", int(geometry.causally_validated))
    measure.metric("baseline_refusal_logodds", float(base.mean()), n=len(held))
    measure.metric("baseline_refusal_share", float((base > 0).mean()), n=len(held))
    measure.metric("global_direction_drop", float(drop_global.mean()), ci=(g_lo, g_hi),
                   n=len(held), units="log-odds")
    measure.metric("mean_category_ablation_drop", float(drops.mean()), n=drops.size,
                   units="log-odds")
    measure.plot("ablation_drop_matrix", "heatmap", matrix=spec.drop_matrix.tolist(),
                 xlabels=[_short(c) for c in cats], ylabels=[f"-d {_short(c)}" for c in cats],
                 cmap="coolwarm", annotate=True, clabel="refusal log-odds drop",
                 vmin=-float(np.abs(spec.drop_matrix).max()),
                 vmax=float(np.abs(spec.drop_matrix).max()),
                 title=f"Refusal drop, d_c of L{layer} ablated")
    rows = []
    for a, c in enumerate(cats):
        est = spec.per_category[a]
        on = labels == c
        rows.append([c, int(on.sum()), float(base[on].mean()), float(spec.on_target[a]),
                     float(spec.off_target[a]), est.value, est.lo, est.hi,
                     float(drop_global[on].mean())])
    measure.table("causal_per_category", ["category", "n held out", "baseline log-odds",
                                          "on-target drop", "off-target drop",
                                          "specificity", "lo", "hi",
                                          "drop, global r̂ ablated"], rows)
    measure.table("geometry_causal_flag",
                  ["layer", "label", "mean |cos|", "dimension", "causally_validated"],
                  [[geometry.layer, geometry.label.value, geometry.mean_abs_cos,
                    geometry.effective_dimension, geometry.causally_validated]])
