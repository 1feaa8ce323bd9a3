"""The concept-cone experiment's prompt selection, result record and report helpers.

Harmful prompts are drawn balanced per category (:func:`cone_prompts`), held-out ones for
the causal check from the test split (:func:`causal_prompts`); :class:`Cone` holds the
per-layer :class:`probes.geometry.ConeStatistics` with Holm-adjusted permutation p-values.
The ``record_*`` functions put the figures in a report. Definitions: docs/science.md.

Example:
    harmful = cone_prompts(split, n=16, seed=0)
    held = causal_prompts(split.test, sorted(set(harmful.label("category"))), n=4, seed=0)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.geometry import (
    POLYHEDRAL_MAX_MEAN_ABS_COS,
    POLYHEDRAL_MIN_DIMENSION,
    AblationSpecificity,
    ConeStatistics,
    GeometryLabel,
    label_share,
    most_linear_layer,
    most_polyhedral_layer,
)
from probes.stats import Estimate, percentile_interval
from prompts import PromptSet, Split

MIN_CATEGORIES = 4
# Permutation replicates: enough that a Holm-adjusted p over 24+ layers can reach 0.05
# (the smallest p is 1 / (N_PERM + 1)). Replicates only re-weight Gram matrices: cheap.
N_PERM = 999
# Layer whose d_c is ablated in the causal check: the middle of the network (the OBLITERATUS report
# steered layers 8-15 of 24; refusal directions from mid-depth ablate best, Arditi et al.).
CAUSAL_LAYER_FRACTION = 0.5
# The seed's sample: weapons 3, fraud 4, intrusion 4, cyber 9 prompts; 20 harmless.
SEED_SIZES = (3, 4, 4, 9)
SEED_HARMLESS = 20


def concat_prompt_sets(name: str, sets: Sequence[PromptSet]) -> PromptSet:
    """One prompt set of all ``sets`` in order, keeping the labels they all have."""
    keys = sorted(set.intersection(*(set(s.labels) for s in sets)))
    return PromptSet(name, tuple(t for s in sets for t in s.texts),
                     {k: tuple(v for s in sets for v in s.labels[k]) for k in keys})


def cone_prompts(split: Split, n: int, seed: int) -> PromptSet | None:
    """``n`` harmful prompts per category (train split first, then val), for every category
    that has ``n`` of them (the profile's ``cone_per_category``). Seeded by ``seed``.
    None when fewer than ``MIN_CATEGORIES`` categories qualify."""
    rng = np.random.default_rng(seed)
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
    return concat_prompt_sets(f"advbench/cone[{len(parts)}x{n},seed={seed}]", parts)


@dataclass(frozen=True)
class Cone:
    harmful: PromptSet | None  # None: too few categories qualified
    harmless: PromptSet
    stats: list[ConeStatistics]  # every layer
    layers: list[int]  # selected layers (--layers) whose cone is defined
    p_holm: dict[int, float]  # permutation p of mean |cos|, Holm over ``layers``
    seconds: float


def estimate_ci(est: Estimate | None) -> tuple[float, float] | None:
    return None if est is None else (est.lo, est.hi)


def null_summary(cs: ConeStatistics) -> dict[str, float]:
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


def record_depth_plots(measure: Any, layers: list[int], stats: list[ConeStatistics],
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


def short_category(category: str) -> str:
    """Initials of a multi-word category ("Human Rights and Civil Liberties" -> "HRCL")."""
    words = [w for w in category.split() if w[:1].isupper()]
    return "".join(w[0] for w in words) if len(words) > 1 else category[:4]


def record_representative_layers(measure: Any, stats: list[ConeStatistics],
                                  layers: list[int]) -> None:
    by_layer = {cs.layer: cs for cs in stats}
    reps = {"most polyhedral": most_polyhedral_layer(stats),
            "most linear": most_linear_layer(stats),
            "middle": layers[len(layers) // 2]}
    rows = []
    for role, layer in reps.items():
        cs = by_layer[layer]
        measure.plot(f"category_cosines/{role.replace(' ', '_')}_L{layer}", "heatmap",
                     matrix=cs.cosines.tolist(), xlabels=[short_category(c) for c in cs.categories],
                     ylabels=[short_category(c) for c in cs.categories], vmin=-1.0, vmax=1.0,
                     cmap="RdBu_r", annotate=True, clabel="cos(d_c, d_c')",
                     title=f"L{layer} ({role}): dim {cs.effective_dimension:.2f}")
        for c, n, s, sp in zip(cs.categories, cs.counts, cs.strengths, cs.specificity,
                               strict=True):
            rows.append([role, layer, c, int(n), float(s), float(sp)])
    measure.table("categories_at_representative_layers",
                  ["role", "layer", "category", "n", "strength", "specificity"], rows)
    measure.table("category_abbreviations", ["abbreviation", "category"],
                  [[short_category(c), c] for c in stats[0].categories])


def causal_layer(n_layers: int) -> int:
    return round(CAUSAL_LAYER_FRACTION * (n_layers - 1))


def causal_prompts(test: PromptSet, categories: Sequence[str], n: int, seed: int) -> PromptSet:
    """``n`` held-out (test split) prompts of each category (the profile's
    ``cone_causal_per_category``), seeded."""
    parts = [test.where("category", c).sample(n, seed) for c in categories]
    return concat_prompt_sets(f"advbench/test/cone-causal[{len(parts)}x{n},seed={seed}]",
                              parts)


def direction_hash(v: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(v, dtype=np.float32).tobytes()).hexdigest()[:16]


def record_causal(measure: Any, n_boot: int, seed: int, layer: int, held: PromptSet,
                   base: np.ndarray, drops: np.ndarray, drop_global: np.ndarray,
                   spec: AblationSpecificity, geometry: ConeStatistics) -> None:
    cats = list(spec.categories)
    labels = np.asarray(held.label("category"))
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
                 xlabels=[short_category(c) for c in cats],
                 ylabels=[f"-d {short_category(c)}" for c in cats],
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
