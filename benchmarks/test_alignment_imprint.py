"""Alignment imprint (OBLITERATUS report, exp. 3): the refusal direction's shape across layers.

Per model, six features of the per-layer refusal directions r_l = mu_H,l - mu_B,l
(``resid_pre``, last token, the train split, the same prompts as
``bench.refusal_directions``; docs/science.md "Alignment imprint"): Gini of ||r_l||, effective
rank and spectral decay of the stacked r̂_l, cross-layer smoothness, tail bias and
pairwise orthogonality. Each gets a basic (reverse-percentile) bootstrap interval,
prompts resampled. Resampling noise pushes effective rank and orthogonality up and
smoothness down, and the observed values carry the same push, so the basic interval,
which undoes it to first order, is the honest one. A layer whose r_l is zero (``resid_pre``
of layer 0: the last token is the same template token for every prompt) has no direction
and is left out.

The published method classifier (Gaussian scores around hand-set DPO/RLHF/CAI/SFT
prototypes) is not reproduced: the seed gives neither its prototypes nor its widths, and
it is unvalidated. The testable claim is the provider effect: models of one provider lie
closer in feature space than models of different providers. It needs every ``--model`` of
the session at once, two providers, and one provider with two models.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from typing import Any

import numpy as np
import pytest

from fixtures.plugin import get_bench, session_models
from fixtures.workbench import BenchConfig, Workbench
from probes.geometry import (
    IMPRINT_FEATURES,
    bootstrap_interval,
    feature_scale,
    provider_distances,
    provider_effect_untestable,
)
from probes.imprint import Imprint, imprint_of
from probes.stats import spearman

# OBLITERATUS report, experiment 3 (Qwen2.5-0.5B-Instruct, 20 + 20 prompts, 24 layers).
SEED_FEATURES = {"gini": 0.315, "effective_rank": 14.38, "spectral_decay": 3.20,
                 "smoothness": 0.912, "tail_bias": 0.478, "orthogonality": 0.333}
SEED_MODEL = "OBLITERATUS report (Qwen2.5-0.5B-Instruct)"
UNIT_FEATURES = ("gini", "smoothness", "tail_bias", "orthogonality")  # values in [0, 1]
SCALE_FEATURES = ("effective_rank", "spectral_decay")


@cache
def imprint(bench: Workbench) -> Imprint:
    harm, safe = bench.train_pair()
    return imprint_of(bench.acts(harm).numpy(), bench.acts(safe).numpy(),
                      n_boot=bench.cfg.n_boot, seed=bench.cfg.seed)


def _record(bench: Workbench, imp: Imprint, measure: Any) -> None:
    harm, safe = bench.train_pair()
    bench.record_model(measure, harm, safe)
    n = imp.n_harmful + imp.n_harmless
    for f in IMPRINT_FEATURES:
        measure.metric(f, float(getattr(imp.features, f)), ci=imp.intervals[f], n=n)


def test_imprint_features(bench: Workbench, measure: Any) -> None:
    """Descriptive: the six imprint features of this model with bootstrap intervals."""
    imp = imprint(bench)
    _record(bench, imp, measure)
    name = bench.lm.name
    strengths = imp.features.strengths
    rho, _ = spearman(np.array(imp.layers, dtype=float), strengths)
    measure.metric("layers_used", len(imp.layers))
    measure.metric("spearman_rho_strength_layer", rho, n=len(imp.layers))
    measure.metric("strength_first_layer_used", float(strengths[0]))
    measure.metric("strength_last_layer", float(strengths[-1]))
    rows = []
    for f in IMPRINT_FEATURES:
        reps = imp.replicates[f]
        finite = reps[np.isfinite(reps)]
        rows.append([f, float(getattr(imp.features, f)), *imp.intervals[f],
                     float(finite.mean()) if finite.size else math.nan, SEED_FEATURES[f]])
    measure.table("imprint_features", ["feature", "value", "basic lo", "basic hi",
                                       "bootstrap mean", SEED_MODEL], rows)
    for group, names in (("unit_interval", UNIT_FEATURES), ("rank_and_decay", SCALE_FEATURES)):
        measure.plot(
            f"imprint_features/{group}", "bar", categories=list(names),
            series={name: [float(getattr(imp.features, f)) for f in names],
                    SEED_MODEL: [SEED_FEATURES[f] for f in names]},
            errors={name: ([imp.intervals[f][0] for f in names],
                           [imp.intervals[f][1] for f in names])},
            ylabel="feature value", title=f"Imprint features, {name} (bootstrap 95 %)")
    measure.plot("refusal_strength_by_layer", "line", x=list(imp.layers),
                 series={"||r_l||": strengths.tolist()}, xlabel="layer",
                 ylabel="||mu_H - mu_B||", title="Per-layer refusal strength")
    if imp.excluded:
        measure.table("layers_left_out", ["layer", "reason"],
                      [[i, "zero refusal direction (identical activations)"]
                       for i in imp.excluded])


@pytest.mark.claim("IMPRINT-PROVIDER-EFFECT")
def test_provider_effect(pytestconfig: pytest.Config, bench_config: BenchConfig,
                         measure: Any) -> None:
    """Do models of one provider lie closer in imprint feature space than of different ones?"""
    # Each model's imprint was computed by its own tests: the Workbenches answer from their
    # cached activations, without reloading a model the pool has evicted.
    benches = [get_bench(pytestconfig, spec) for spec in session_models(pytestconfig)]
    providers = [b.provider or None for b in benches]
    rows = []
    for b, prov in zip(benches, providers, strict=True):
        imp = imprint(b)
        _record(b, imp, measure)
        rows.append([b.name, prov or "unknown", *imp.vector(IMPRINT_FEATURES).tolist()])
    fps = "".join(b.fingerprint for b in benches)
    measure.model(" + ".join(b.name for b in benches),
                  hashlib.sha256(fps.encode()).hexdigest(), kind="all models of the session",
                  providers=[p or "unknown" for p in providers])
    measure.table("models", ["model", "provider", *IMPRINT_FEATURES], rows)
    reason = provider_effect_untestable(providers)
    if reason is not None:
        measure.skip("IMPRINT-PROVIDER-EFFECT", f"{len(benches)} model(s): {reason}")
    known = [i for i, p in enumerate(providers) if p]
    provs = [str(providers[i]) for i in known]
    imps = [imprint(benches[i]) for i in known]
    feats = tuple(f for f in IMPRINT_FEATURES
                  if all(np.isfinite(m.replicates[f]).all() and
                         math.isfinite(float(getattr(m.features, f))) for m in imps))
    obs = np.stack([m.vector(feats) for m in imps])  # [M, F]
    reps = np.stack([m.replicate_matrix(feats) for m in imps], axis=1)  # [B, M, F]
    scale = feature_scale(obs)
    within, between = provider_distances(obs, provs, scale)
    w_r, b_r = provider_distances(reps, provs, scale)
    ratio = float(within / between)
    lo, hi = bootstrap_interval(ratio, w_r / b_r, kind="basic", limits=(0.0, math.inf))
    measure.metric("within_provider_distance", float(within), n=len(imps))
    measure.metric("between_provider_distance", float(between), n=len(imps))
    measure.metric("within_between_distance_ratio", ratio, ci=(lo, hi), n=len(imps))
    measure.metric("features_used", len(feats))
    measure.check("IMPRINT-PROVIDER-EFFECT", ratio, ci=(lo, hi), n=len(imps),
                  detail=f"{len(imps)} models, {len(set(provs))} providers; features "
                         f"{', '.join(feats)} scaled by their SD across models")
