"""Refusal geometry: concept cone, alignment imprint, cross-layer alignment (docs/science.md).

Everything here is descriptive (numpy, scipy ranks). Shapes: harmful activations
``[n, L, d]`` (or ``[n, d]`` for one site), harmless ``[m, L, d]``, per-layer
directions ``[L, d]``, category directions ``[k, d]``.

Speed: every statistic of a set of unit vectors used here (cosines, effective
dimension, the 3-D cap formula) is a function of their k x k Gram matrix, and the
Gram matrix of category mean differences is a quadratic form in the n x n
(harmful), n x m and m x m prompt Gram matrices. Bootstrap and permutation
replicates therefore only re-weight small precomputed Gram matrices.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.stats

from probes.stats import (
    BoolArray,
    Estimate,
    FloatArray,
    IntArray,
    Seed,
    auc,
    gini,
    percentile_interval,
    resample_within_groups,
    rng_from,
    spearman,
)

# docs/science.md, "Concept cone": geometry label thresholds.
LINEAR_MIN_MEAN_ABS_COS = 0.9
LINEAR_MAX_DIMENSION = 1.5
POLYHEDRAL_MAX_MEAN_ABS_COS = 0.8
POLYHEDRAL_MIN_DIMENSION = 2.0
# docs/science.md, "DETECTED_PROCEEDS": cross-layer clusters at |cos| >= 0.85.
ALIGNMENT_ABS_COS_THRESHOLD = 0.85
# docs/science.md, "Alignment imprint": tail bias uses the last 25 % of layers.
TAIL_FRACTION = 0.25
# Permutation statistics within this relative distance of the observed value are
# ties (they differ only by floating-point rounding in the Gram computation).
TIE_RTOL = 1e-9
# A category mean difference whose squared norm is below this fraction of
# ||mu_c||^2 + ||mu_B||^2 is zero within rounding (relative norm 1e-5, below what float32
# activations resolve): its direction is undefined, not whatever the rounding gives.
GRAM_ZERO_RTOL = 1e-10

__all__ = [
    "ALIGNMENT_ABS_COS_THRESHOLD",
    "GRAM_ZERO_RTOL",
    "IMPRINT_FEATURES",
    "LINEAR_MAX_DIMENSION",
    "LINEAR_MIN_MEAN_ABS_COS",
    "POLYHEDRAL_MAX_MEAN_ABS_COS",
    "POLYHEDRAL_MIN_DIMENSION",
    "TAIL_FRACTION",
    "TIE_RTOL",
    "AblationSpecificity",
    "AlignmentImprint",
    "CategoryDirections",
    "ConeStatistics",
    "CrossLayerAlignment",
    "GeometryLabel",
    "IntervalKind",
    "PermutationTest",
    "ProceedBootstrap",
    "ProceedLayers",
    "ProceedLocalisation",
    "ablation_specificity",
    "alignment_imprint",
    "alignment_imprint_from_activations",
    "alignment_imprint_replicates",
    "bootstrap_alignment_imprint",
    "bootstrap_interval",
    "bootstrap_proceed_layers",
    "cap_formula_3d",
    "category_directions",
    "cone_statistics",
    "cosine_matrix",
    "cross_layer_alignment",
    "decision_p_values",
    "detected_proceeds_localisation",
    "detection_peak_layer",
    "effective_dimension",
    "effective_dimension_obliteratus",
    "feature_scale",
    "geometry_label",
    "informative_layers",
    "label_share",
    "layer_trend",
    "mean_abs_cos",
    "midpoint_thresholds",
    "most_linear_layer",
    "most_polyhedral_layer",
    "onset_layer",
    "permutation_test",
    "proceed_layers",
    "provider_distances",
    "provider_effect_untestable",
    "saturation_layer",
    "specificity",
]


# --------------------------------------------------------------------------- input helpers


def _as_float(x: npt.ArrayLike, ndim: tuple[int, ...], name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dims, got {a.shape}")
    return a


def _encode_labels(labels: npt.ArrayLike, n: int) -> tuple[tuple[str, ...], IntArray]:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    names, codes = np.unique(lab, return_inverse=True)
    return tuple(str(v) for v in names), np.asarray(codes, dtype=np.int64).ravel()


# --------------------------------------------------------------------------- Gram-based kernels


def _cos_from_gram(gram: FloatArray) -> FloatArray:
    """Cosine matrices from Gram matrices [..., k, k] (nan where a vector is zero)."""
    diag = np.sqrt(np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0.0, None))
    outer = diag[..., :, None] * diag[..., None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / outer
    cos = np.where(outer > 0, cos, np.nan)
    return np.asarray(np.clip(cos, -1.0, 1.0), dtype=np.float64)


def _offdiag_mean_abs(cos: FloatArray) -> FloatArray:
    k = cos.shape[-1]
    if k < 2:
        return np.full(cos.shape[:-2], np.nan)
    iu = np.triu_indices(k, 1)
    return np.asarray(np.abs(cos[..., iu[0], iu[1]]).mean(axis=-1), dtype=np.float64)


def _entropy_dim(weights: FloatArray) -> FloatArray:
    """exp(entropy) of weights normalised along the last axis (0 log 0 = 0)."""
    total = weights.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = weights / total
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.asarray(np.exp(-terms.sum(axis=-1)), dtype=np.float64)


def _dims_from_cos(cos: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(corrected, OBLITERATUS) effective dimensions from unit-vector Gram matrices.

    The eigenvalues of the Gram matrix of unit rows are their squared singular
    values. NaN cosines (zero vectors) give NaN.
    """
    bad = np.isnan(cos).any(axis=(-2, -1))
    safe = np.where(np.isnan(cos), 0.0, cos)
    lam = np.clip(np.linalg.eigvalsh(safe), 0.0, None)
    corrected = _entropy_dim(lam)
    published = _entropy_dim(np.sqrt(lam))
    corrected[bad] = np.nan
    published[bad] = np.nan
    return corrected, published


def _cap_from_cos(cos: FloatArray) -> FloatArray:
    """2 pi (1 - min_c |cos(d_c, mean d)|) from unit-vector Gram matrices [..., k, k]."""
    row = cos.sum(axis=-1)
    total = row.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = row / np.sqrt(total)
    c = np.where(total > 0, c, np.nan)
    return np.asarray(2.0 * math.pi * (1.0 - np.abs(c).min(axis=-1)), dtype=np.float64)


# --------------------------------------------------------------------------- vector-level API


def cosine_matrix(vectors: npt.ArrayLike) -> FloatArray:
    """Signed cosine matrix of the rows of [k, d] (scale-invariant; rows need not be unit)."""
    v = _as_float(vectors, (2,), "vectors")
    return _cos_from_gram(v @ v.T)


def mean_abs_cos(cos: npt.ArrayLike) -> float:
    """Mean |cos| over the k (k-1) / 2 distinct pairs of a cosine matrix (nan if k < 2)."""
    c = _as_float(cos, (2,), "cos")
    return float(_offdiag_mean_abs(c))


def effective_dimension(vectors: npt.ArrayLike) -> float:
    """Corrected effective dimension of the normalised rows of [k, d]:
    exp(entropy(p)), p_j = s_j^2 / sum s^2 over singular values s. 1 for identical
    (or antiparallel) rows, k for k orthonormal rows."""
    return float(_dims_from_cos(cosine_matrix(vectors))[0])


def effective_dimension_obliteratus(vectors: npt.ArrayLike) -> float:
    """The published OBLITERATUS variant: exp(entropy(p)) with p_j = s_j / sum s."""
    return float(_dims_from_cos(cosine_matrix(vectors))[1])


def specificity(cos: npt.ArrayLike) -> FloatArray:
    """Per category: 1 - mean_{c' != c} |cos(d_c, d_c')| (nan when k < 2)."""
    c = np.abs(_as_float(cos, (2,), "cos"))
    k = c.shape[0]
    if k < 2:
        return np.full(k, np.nan)
    off = (c.sum(axis=1) - np.diagonal(c)) / (k - 1)
    return np.asarray(1.0 - off, dtype=np.float64)


def cap_formula_3d(vectors: npt.ArrayLike) -> float:
    """The published "solid angle" 2 pi (1 - min_c |cos(d_c, mean d)|) of OBLITERATUS.

    This is the area of a spherical cap on the unit sphere in 3-D; it is NOT a
    solid angle of the cone in d dimensions and is reported only under this name.
    ``mean d`` is the mean of the normalised rows.
    """
    return float(_cap_from_cos(cosine_matrix(vectors)))


class GeometryLabel(StrEnum):
    LINEAR = "LINEAR"
    POLYHEDRAL = "POLYHEDRAL"
    INTERMEDIATE = "INTERMEDIATE"
    UNDEFINED = "UNDEFINED"


def geometry_label(mean_abs_cosine: float, dimension: float) -> GeometryLabel:
    """LINEAR if mean|cos| > 0.9 and dimension < 1.5; POLYHEDRAL if mean|cos| < 0.8 or
    dimension > 2; otherwise INTERMEDIATE (UNDEFINED for nan inputs, e.g. k < 2).
    ``dimension`` is the corrected effective dimension."""
    if math.isnan(mean_abs_cosine) or math.isnan(dimension):
        return GeometryLabel.UNDEFINED
    if mean_abs_cosine > LINEAR_MIN_MEAN_ABS_COS and dimension < LINEAR_MAX_DIMENSION:
        return GeometryLabel.LINEAR
    if mean_abs_cosine < POLYHEDRAL_MAX_MEAN_ABS_COS or dimension > POLYHEDRAL_MIN_DIMENSION:
        return GeometryLabel.POLYHEDRAL
    return GeometryLabel.INTERMEDIATE


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class CategoryDirections:
    """d_c = unit(mu_H,c - mu_B) per category (sorted label order), [k, d].

    ``strengths`` are ||mu_H,c - mu_B||, ``counts`` the prompts per category.
    """

    categories: tuple[str, ...]
    units: FloatArray
    strengths: FloatArray
    counts: IntArray


def category_directions(
    harmful: npt.ArrayLike, labels: npt.ArrayLike, harmless: npt.ArrayLike
) -> CategoryDirections:
    """Per-category refusal directions from harmful [n, d] (with labels [n]) and harmless [m, d]."""
    h = _as_float(harmful, (2,), "harmful")
    b = _as_float(harmless, (2,), "harmless")
    if h.shape[1] != b.shape[1]:
        raise ValueError("harmful and harmless differ in d")
    names, codes = _encode_labels(labels, h.shape[0])
    counts = np.bincount(codes, minlength=len(names)).astype(np.int64)
    sums = np.zeros((len(names), h.shape[1]))
    np.add.at(sums, codes, h)
    raw = sums / counts[:, None] - b.mean(axis=0)
    strengths = np.linalg.norm(raw, axis=1)
    if np.any(strengths == 0.0):
        raise ValueError("a category mean equals the harmless mean: its direction is undefined")
    return CategoryDirections(names, raw / strengths[:, None], strengths, counts)


# --------------------------------------------------------------------------- intervals

IntervalKind = Literal["percentile", "basic"]


def bootstrap_interval(
    value: float,
    replicates: npt.ArrayLike,
    conf: float = 0.95,
    kind: IntervalKind = "percentile",
    limits: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[float, float]:
    """Bootstrap interval from replicates: ``"percentile"`` (q_a, q_1-a) or ``"basic"``,
    the reverse percentile (2 v - q_1-a, 2 v - q_a), clipped to ``limits``.

    Why "basic" for the geometry statistics: resampling adds noise to directions that
    are already noisy, and noise moves mean |cos| down and the effective dimension up
    (towards "polyhedral"). The observed value is moved the same way from the truth, so
    the percentile interval is shifted twice in that direction, while the basic
    interval undoes the shift to first order. (nan, nan) if any replicate is nan.
    """
    if kind == "percentile":
        lo, hi = percentile_interval(replicates, conf)
    elif kind == "basic":
        q_lo, q_hi = percentile_interval(replicates, conf)
        lo, hi = 2.0 * value - q_hi, 2.0 * value - q_lo
    else:
        raise ValueError(f"kind must be 'percentile' or 'basic', got {kind!r}")
    if math.isnan(lo) or math.isnan(hi):
        return (math.nan, math.nan)
    return (float(min(max(lo, limits[0]), limits[1])), float(min(max(hi, limits[0]), limits[1])))


def informative_layers(directions: npt.ArrayLike, rel_tol: float = 1e-6) -> list[int]:
    """Layers whose direction has a norm above ``rel_tol`` times the largest norm.

    At ``resid_pre`` of layer 0 and the last prompt token every prompt has the same
    activation (the embedding of the chat template's final token), so r_0 is exactly
    zero and has no direction; such layers must be left out, not normalised.
    """
    norms = np.linalg.norm(_as_float(directions, (2,), "directions"), axis=1)
    top = float(norms.max()) if norms.size else 0.0
    return [int(i) for i in np.flatnonzero(norms > rel_tol * top)] if top > 0 else []


# --------------------------------------------------------------------------- cone statistics


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class PermutationTest:
    """Observed statistic against its permutation null distribution.

    ``percentile`` = (#null < observed + 0.5 #ties) / n_perm; ``p_less`` and
    ``p_greater`` are the one-sided permutation p-values (1 + #null <= obs) /
    (1 + n_perm) and (1 + #null >= obs) / (1 + n_perm). Under exchangeable
    labels both are valid (P(p <= a) <= a). For the cone, "categories are more
    distinct than random splits of the same prompts" is ``mean_abs_cos`` with
    ``p_less`` and ``dimension`` with ``p_greater``.
    """

    observed: float
    null: FloatArray
    percentile: float
    p_less: float
    p_greater: float


def permutation_test(observed: float, null: npt.ArrayLike) -> PermutationTest:
    """Summarise ``observed`` against null replicates (ties within ``TIE_RTOL``)."""
    z = np.asarray(null, dtype=np.float64).ravel()
    if z.size == 0:
        raise ValueError("empty null distribution")
    if math.isnan(observed) or np.any(np.isnan(z)):
        return PermutationTest(observed, z, math.nan, math.nan, math.nan)
    tol = TIE_RTOL * max(1.0, abs(observed))
    tie = np.abs(z - observed) <= tol
    below = (z < observed) & ~tie
    above = (z > observed) & ~tie
    n = z.size
    return PermutationTest(
        observed=observed,
        null=z,
        percentile=float((below.sum() + 0.5 * tie.sum()) / n),
        p_less=float((1 + below.sum() + tie.sum()) / (1 + n)),
        p_greater=float((1 + above.sum() + tie.sum()) / (1 + n)),
    )


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ConeStatistics:
    """Concept-cone summary of one layer (docs/science.md, "Concept cone").

    Intervals and permutation tests are ``None`` when not requested. Bootstrap:
    prompts are resampled with replacement within each harmful category and,
    separately, within the harmless set; percentile intervals. Permutation:
    category labels are shuffled among the harmful prompts (category sizes kept,
    harmless set fixed). ``causally_validated`` is never set here (geometry is
    descriptive); the causal test sets it with ``dataclasses.replace``.
    ``mean_abs_cos_boot`` / ``dimension_boot`` hold the bootstrap replicates; replicate
    r uses the same resampled prompts at every layer, so replicates are joint across
    layers (for statistics of the depth profile, see :func:`layer_trend`).

    Caveat: a bootstrap replicate adds resampling noise to directions that are
    already noisy (a category of 3 prompts), so replicates of mean |cos| drift
    towards larger values when the true cosines are near 0 and the dimension
    towards k; the percentile interval then need not contain the point
    estimate. Read it together with the permutation baseline, which shares the
    observed data's noise level.
    """

    layer: int
    categories: tuple[str, ...]
    counts: IntArray
    strengths: FloatArray
    cosines: FloatArray
    mean_abs_cos: float
    effective_dimension: float
    effective_dimension_obliteratus: float
    specificity: FloatArray
    label: GeometryLabel
    cap_formula_3d: float
    mean_abs_cos_ci: Estimate | None = None
    dimension_ci: Estimate | None = None
    mean_abs_cos_perm: PermutationTest | None = None
    dimension_perm: PermutationTest | None = None
    causally_validated: bool = False
    mean_abs_cos_boot: FloatArray | None = None
    dimension_boot: FloatArray | None = None


def _category_weights(codes: IntArray, k: int, idx: IntArray) -> FloatArray:
    """[R, k, n] weights: row (r, c) averages the prompts idx[r, i] over i in category c."""
    r, n = idx.shape
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    w = np.zeros((r, k, n))
    rows = np.repeat(np.arange(r), n)
    cats = np.tile(codes, r)
    np.add.at(w, (rows, cats, idx.ravel()), 1.0 / counts[cats])
    return w


def _mean_weights(idx: IntArray, m: int) -> FloatArray:
    r, size = idx.shape
    w = np.zeros((r, m))
    np.add.at(w, (np.repeat(np.arange(r), size), idx.ravel()), 1.0 / size)
    return w


def cone_statistics(
    harmful: npt.ArrayLike,
    labels: npt.ArrayLike,
    harmless: npt.ArrayLike,
    *,
    n_boot: int = 0,
    n_perm: int = 0,
    seed: Seed | None = None,
    conf: float = 0.95,
    interval: IntervalKind = "percentile",
) -> list[ConeStatistics]:
    """Concept-cone statistics per layer for harmful [n, L, d] (labels [n]) and
    harmless [m, L, d]; [n, d] inputs are treated as one layer (index 0).

    ``n_boot`` / ``n_perm`` > 0 add bootstrap intervals and permutation tests for
    mean |cos| and the corrected effective dimension (``seed`` required). The same
    resampled prompts are used at every layer. ``interval`` chooses the bootstrap
    interval (:func:`bootstrap_interval`; "basic" is clipped to [0, 1] and [1, k]).
    A layer where a category mean equals the harmless mean (e.g. ``resid_pre`` of layer
    0 at the last token) gets nan statistics and the label UNDEFINED.
    """
    h = _as_float(harmful, (2, 3), "harmful")
    b = _as_float(harmless, (2, 3), "harmless")
    if h.ndim == 2:
        h = h[:, None, :]
    if b.ndim == 2:
        b = b[:, None, :]
    if h.shape[1:] != b.shape[1:]:
        raise ValueError(f"harmful {h.shape} and harmless {b.shape} differ in [L, d]")
    n, n_layers, _ = h.shape
    m = b.shape[0]
    names, codes = _encode_labels(labels, n)
    k = len(names)
    counts = np.bincount(codes, minlength=k).astype(np.int64)
    if (n_boot > 0 or n_perm > 0) and seed is None:
        raise ValueError("bootstrap / permutation replicates need an explicit seed")

    # Replicate 0 is the observed data; then n_boot bootstrap, then n_perm permutations.
    wh = [_category_weights(codes, k, np.arange(n, dtype=np.int64)[None, :])]
    wb = [np.full((1, m), 1.0 / m)]
    if seed is not None:
        rng = rng_from(seed)
        if n_boot > 0:
            wh.append(_category_weights(codes, k, resample_within_groups(codes, n_boot, rng)))
            wb.append(_mean_weights(rng.integers(0, m, size=(n_boot, m)), m))
        if n_perm > 0:
            perm_codes = np.stack([codes[rng.permutation(n)] for _ in range(n_perm)])
            wp = np.zeros((n_perm, k, n))
            rows = np.repeat(np.arange(n_perm), n)
            np.add.at(
                wp,
                (rows, perm_codes.ravel(), np.tile(np.arange(n), n_perm)),
                1.0 / counts[perm_codes.ravel()],
            )
            wh.append(wp)
            wb.append(np.full((n_perm, m), 1.0 / m))
    w_h = np.concatenate(wh)  # [R, k, n]
    w_b = np.concatenate(wb)  # [R, m]

    ht = np.ascontiguousarray(h.transpose(1, 0, 2))  # [L, n, d]
    bt = np.ascontiguousarray(b.transpose(1, 0, 2))  # [L, m, d]
    w_h_t = np.ascontiguousarray(w_h.transpose(0, 2, 1))  # [R, n, k]
    w_h_flat = w_h.reshape(-1, n)  # [R * k, n]: one GEMM instead of R small ones
    out: list[ConeStatistics] = []
    for layer in range(n_layers):
        hh = ht[layer] @ ht[layer].T  # [n, n]
        hb = ht[layer] @ bt[layer].T  # [n, m]
        bb = bt[layer] @ bt[layer].T  # [m, m]
        quad = (w_h_flat @ hh).reshape(w_h.shape) @ w_h_t  # [R, k, k] = W_h K W_h'
        cross = (w_h @ (w_b @ hb.T)[:, :, None])[..., 0]  # [R, k]: <mu_c, mu_B>
        base = np.sum((w_b @ bb) * w_b, axis=1)  # [R]: ||mu_B||^2
        gram = quad - cross[:, :, None] - cross[:, None, :] + base[:, None, None]
        # ||mu_c - mu_B||^2 computed as a difference of large terms: below the rounding
        # level of those terms it is zero (no direction), not a random unit vector.
        sq = np.diagonal(gram, axis1=-2, axis2=-1)
        zero = sq <= GRAM_ZERO_RTOL * (np.diagonal(quad, axis1=-2, axis2=-1) + base[:, None])
        gram = np.where(zero[:, :, None] | zero[:, None, :], 0.0, gram)
        cos = _cos_from_gram(gram)
        mac = _offdiag_mean_abs(cos)
        dim, dim_pub = _dims_from_cos(cos)
        cap = _cap_from_cos(cos)
        c0 = cos[0]
        obs_mac, obs_dim = float(mac[0]), float(dim[0])
        mac_ci = dim_ci = None
        mac_perm = dim_perm = None
        mac_boot = dim_boot = None
        if n_boot > 0:
            sl = slice(1, 1 + n_boot)
            mac_boot, dim_boot = mac[sl].copy(), dim[sl].copy()
            method = f"bootstrap-{interval}-within-category"
            lo, hi = bootstrap_interval(obs_mac, mac[sl], conf, interval, (0.0, 1.0))
            mac_ci = Estimate(obs_mac, lo, hi, n + m, method, conf)
            lo, hi = bootstrap_interval(obs_dim, dim[sl], conf, interval, (1.0, float(k)))
            dim_ci = Estimate(obs_dim, lo, hi, n + m, method, conf)
        if n_perm > 0:
            sl = slice(1 + n_boot, 1 + n_boot + n_perm)
            mac_perm = permutation_test(obs_mac, mac[sl])
            dim_perm = permutation_test(obs_dim, dim[sl])
        out.append(
            ConeStatistics(
                layer=layer,
                categories=names,
                counts=counts,
                strengths=np.sqrt(np.clip(np.diagonal(gram[0]), 0.0, None)),
                cosines=c0,
                mean_abs_cos=obs_mac,
                effective_dimension=obs_dim,
                effective_dimension_obliteratus=float(dim_pub[0]),
                specificity=specificity(c0),
                label=geometry_label(obs_mac, obs_dim),
                cap_formula_3d=float(cap[0]),
                mean_abs_cos_ci=mac_ci,
                dimension_ci=dim_ci,
                mean_abs_cos_perm=mac_perm,
                dimension_perm=dim_perm,
                mean_abs_cos_boot=mac_boot,
                dimension_boot=dim_boot,
            )
        )
    return out


def most_polyhedral_layer(stats: list[ConeStatistics]) -> int:
    """Layer with the largest corrected effective dimension (ties: lower mean |cos|)."""
    best = max(stats, key=lambda s: (s.effective_dimension, -s.mean_abs_cos))
    return best.layer


def most_linear_layer(stats: list[ConeStatistics]) -> int:
    """Layer with the smallest corrected effective dimension (ties: higher mean |cos|)."""
    best = min(stats, key=lambda s: (s.effective_dimension, -s.mean_abs_cos))
    return best.layer


def label_share(
    mean_abs_cosines: npt.ArrayLike,
    dimensions: npt.ArrayLike,
    label: GeometryLabel = GeometryLabel.POLYHEDRAL,
) -> float:
    """Share of (mean |cos|, dimension) pairs that :func:`geometry_label` calls ``label``.

    Applied to the permutation replicates of one layer (``mean_abs_cos_perm.null`` and
    ``dimension_perm.null`` share their replicate order) it says how often random
    splits of the same prompts would earn the label: near 1 means the label is what
    sampling noise alone gives, not evidence of category structure.
    """
    m = np.asarray(mean_abs_cosines, dtype=np.float64).ravel()
    d = np.asarray(dimensions, dtype=np.float64).ravel()
    if m.shape != d.shape or m.size == 0:
        raise ValueError("need equally long, non-empty arrays of mean |cos| and dimension")
    hits = sum(geometry_label(float(a), float(b)) is label for a, b in zip(m, d, strict=True))
    return hits / m.size


def _ranks_rows(x: FloatArray) -> FloatArray:
    return np.asarray(scipy.stats.rankdata(x, axis=-1), dtype=np.float64)


def layer_trend(
    layers: npt.ArrayLike,
    values: npt.ArrayLike,
    replicates: npt.ArrayLike | None = None,
    *,
    conf: float = 0.95,
    interval: IntervalKind = "percentile",
) -> Estimate:
    """Spearman rho between layer index and a per-layer statistic (negative: it falls
    with depth), with a percentile interval from joint replicates ``[R, L]``: each row
    is one replicate of the whole depth profile (e.g. ``dimension_boot`` of every
    layer's :class:`ConeStatistics`, which share their resampled prompts). Without
    replicates, or when any replicate row is constant, the interval is (nan, nan).
    ``interval``: see :func:`bootstrap_interval` ("basic" is clipped to [-1, 1]).
    """
    x = np.asarray(layers, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if x.size != v.size or x.size < 3:
        raise ValueError("layer_trend needs >= 3 layers with one value each")
    rho = spearman(x, v)[0]
    lo = hi = math.nan
    if replicates is not None:
        r = np.asarray(replicates, dtype=np.float64)
        if r.ndim != 2 or r.shape[1] != x.size:
            raise ValueError(f"replicates must be [R, {x.size}], got {r.shape}")
        rx = _ranks_rows(x)
        rx = rx - rx.mean()
        ry = _ranks_rows(r)
        ry = ry - ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx * rx).sum()) * np.sqrt((ry * ry).sum(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = np.where(den > 0, (ry @ rx) / den, np.nan)
        lo, hi = bootstrap_interval(rho, reps, conf, interval, (-1.0, 1.0))
    return Estimate(rho, lo, hi, int(x.size), f"bootstrap-{interval}-joint-layers", conf)


# --------------------------------------------------------------------------- causal check


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class AblationSpecificity:
    """Does ablating d_c lower refusal on category c more than on the others?

    ``drop_matrix[a, c]``: mean refusal-score drop (baseline minus ablated) of the
    prompts of category c under the ablation of category a's direction.
    ``on_target[a]`` is its diagonal, ``off_target[a]`` the mean of row a over the other
    categories (each category weighted equally). ``per_category[a]`` is
    on_target - off_target and ``overall`` their mean over categories, with percentile
    bootstrap intervals (prompts resampled within their category; a prompt keeps its
    drops under every ablation, so the comparison is paired).
    """

    categories: tuple[str, ...]
    counts: IntArray
    drop_matrix: FloatArray
    on_target: FloatArray
    off_target: FloatArray
    per_category: tuple[Estimate, ...]
    overall: Estimate


def _specificity_rows(mats: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(on-target [..., k], off-target [..., k]) from drop matrices [..., k, k]."""
    k = mats.shape[-1]
    on = np.diagonal(mats, axis1=-2, axis2=-1)
    off = (mats.sum(axis=-1) - on) / (k - 1)
    return np.asarray(on), np.asarray(off)


def ablation_specificity(
    drops: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    n_boot: int,
    seed: Seed,
    conf: float = 0.95,
) -> AblationSpecificity:
    """Category specificity of direction ablations.

    ``drops[a, i]`` is prompt i's refusal score at baseline minus under the ablation of
    the direction of the a-th category in sorted label order; ``labels[i]`` is prompt
    i's category. Needs >= 2 categories; every category must have an ablation row.
    """
    dr = _as_float(drops, (2,), "drops")
    names, codes = _encode_labels(labels, dr.shape[1])
    k = len(names)
    if k < 2 or dr.shape[0] != k:
        raise ValueError(f"drops must be [k, n] with one row per category (k = {k} >= 2)")
    counts = np.bincount(codes, minlength=k).astype(np.int64)
    rng = rng_from(seed)
    idx = np.concatenate(
        [np.arange(codes.size, dtype=np.int64)[None, :], resample_within_groups(codes, n_boot, rng)]
    )  # [1 + B, n]: row 0 is the observed sample
    onehot = np.zeros((k, codes.size))
    onehot[codes, np.arange(codes.size)] = 1.0 / counts[codes]
    mats = np.einsum("ian,cn->iac", dr[:, idx].transpose(1, 0, 2), onehot)  # [1 + B, k, k]
    on, off = _specificity_rows(mats)
    spec = on - off  # [1 + B, k]
    overall = spec.mean(axis=1)
    n = int(codes.size)
    method = "bootstrap-percentile-within-category"
    per_cat = tuple(
        Estimate(float(spec[0, a]), *percentile_interval(spec[1:, a], conf), n, method, conf)
        for a in range(k)
    )
    lo, hi = percentile_interval(overall[1:], conf)
    return AblationSpecificity(
        categories=names,
        counts=counts,
        drop_matrix=mats[0],
        on_target=on[0],
        off_target=off[0],
        per_category=per_cat,
        overall=Estimate(float(overall[0]), lo, hi, n, method, conf),
    )


# --------------------------------------------------------------------------- alignment imprint


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class AlignmentImprint:
    """Geometric features of per-layer refusal directions r_l (docs/science.md).

    ``gini``: Gini of ||r_l||; ``effective_rank``: exp(entropy) of s^2 / sum s^2
    of the stacked unit r̂_l; ``spectral_decay``: ln(s_max / s_min) (inf when the
    stack is rank-deficient, e.g. L > d); ``smoothness``: mean |cos(r̂_l, r̂_l+1)|;
    ``tail_bias``: share of sum ||r_l|| in the last ceil(L / 4) layers;
    ``orthogonality``: mean (1 - |cos|) over the L (L - 1) / 2 layer pairs.
    """

    strengths: FloatArray
    gini: float
    effective_rank: float
    spectral_decay: float
    smoothness: float
    tail_bias: float
    orthogonality: float


IMPRINT_FEATURES: tuple[str, ...] = (
    "gini",
    "effective_rank",
    "spectral_decay",
    "smoothness",
    "tail_bias",
    "orthogonality",
)


def _gini_rows(v: FloatArray) -> FloatArray:
    s = np.sort(v, axis=-1)
    n = s.shape[-1]
    i = np.arange(1, n + 1, dtype=np.float64)
    return np.asarray(((2 * i - n - 1) * s).sum(axis=-1) / (n * s.sum(axis=-1)))


def _imprint_rows(r: FloatArray) -> dict[str, FloatArray]:
    """Batched imprint features for directions [R, L, d] -> dict of [R] arrays."""
    n_layers, d = r.shape[-2], r.shape[-1]
    if n_layers < 2:
        raise ValueError("the alignment imprint needs at least 2 layers")
    strengths = np.linalg.norm(r, axis=-1)
    if np.any(strengths == 0.0):
        raise ValueError("a layer direction is zero")
    u = r / strengths[..., None]
    # The squared singular values of the stacked unit rows are the eigenvalues of their
    # Gram (cosine) matrix [L, L]: 50-100x faster than a batched SVD of [L, d]. A stack
    # counts as rank-deficient (spectral decay inf) when lam_min <= lam_max * max(L, d) *
    # eps, i.e. s_min / s_max below ~sqrt(max(L, d) eps) ~ 5e-7, beneath what float32
    # activations resolve anyway.
    gram = u @ np.swapaxes(u, -1, -2)  # [R, L, L]
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)  # ascending, [R, L]
    lam_max, lam_min = lam[..., -1], lam[..., max(0, n_layers - d)]
    rank_tol = lam_max * max(n_layers, d) * np.finfo(np.float64).eps
    with np.errstate(divide="ignore"):
        decay = np.where(
            (lam_min > rank_tol) & (n_layers <= d),
            0.5 * np.log(lam_max / np.where(lam_min > 0, lam_min, 1.0)),
            np.inf,
        )
    cos = np.abs(gram)
    adjacent = np.abs(np.einsum("rld,rld->rl", u[:, :-1], u[:, 1:]))
    iu = np.triu_indices(n_layers, 1)
    n_tail = math.ceil(TAIL_FRACTION * n_layers)
    return {
        "gini": _gini_rows(strengths),
        "effective_rank": _entropy_dim(lam),
        "spectral_decay": np.asarray(decay, dtype=np.float64),
        "smoothness": np.clip(adjacent, 0.0, 1.0).mean(axis=-1),
        "tail_bias": strengths[..., -n_tail:].sum(axis=-1) / strengths.sum(axis=-1),
        "orthogonality": (1.0 - np.clip(cos[..., iu[0], iu[1]], 0.0, 1.0)).mean(axis=-1),
    }


def alignment_imprint(directions: npt.ArrayLike) -> AlignmentImprint:
    """Imprint features from per-layer (unnormalised) directions r_l, [L, d]."""
    r = _as_float(directions, (2,), "directions")
    feats = _imprint_rows(r[None])
    strengths = np.linalg.norm(r, axis=1)
    g = gini(strengths)
    return AlignmentImprint(
        strengths=strengths,
        gini=g,
        effective_rank=float(feats["effective_rank"][0]),
        spectral_decay=float(feats["spectral_decay"][0]),
        smoothness=float(feats["smoothness"][0]),
        tail_bias=float(feats["tail_bias"][0]),
        orthogonality=float(feats["orthogonality"][0]),
    )


def _check_pair_3d(
    harmful: npt.ArrayLike, harmless: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    h = _as_float(harmful, (3,), "harmful")
    b = _as_float(harmless, (3,), "harmless")
    if h.shape[1:] != b.shape[1:]:
        raise ValueError(f"harmful {h.shape} and harmless {b.shape} differ in [L, d]")
    return h, b


def alignment_imprint_from_activations(
    harmful: npt.ArrayLike, harmless: npt.ArrayLike
) -> AlignmentImprint:
    """Imprint of r_l = mean(harmful_l) - mean(harmless_l) for [n, L, d] inputs."""
    h, b = _check_pair_3d(harmful, harmless)
    return alignment_imprint(h.mean(axis=0) - b.mean(axis=0))


def alignment_imprint_replicates(
    harmful: npt.ArrayLike,
    harmless: npt.ArrayLike,
    *,
    n_boot: int,
    seed: Seed,
    chunk: int = 64,
) -> dict[str, FloatArray]:
    """Bootstrap replicates ``[n_boot]`` of each imprint feature (keys
    :data:`IMPRINT_FEATURES`): harmful and harmless prompts resampled independently with
    replacement, a prompt keeping all its layers. ``chunk`` bounds memory only."""
    h, b = _check_pair_3d(harmful, harmless)
    n, n_layers, d = h.shape
    m = b.shape[0]
    rng = rng_from(seed)
    # All indices are drawn first so that ``chunk`` (memory only) never changes results.
    idx_h = rng.integers(0, n, size=(n_boot, n))
    idx_b = rng.integers(0, m, size=(n_boot, m))
    hf, bf = h.reshape(n, -1), b.reshape(m, -1)
    reps: dict[str, list[FloatArray]] = {f: [] for f in IMPRINT_FEATURES}
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        wh = _mean_weights(idx_h[start : start + size], n)
        wb = _mean_weights(idx_b[start : start + size], m)
        # Row by row (vector-matrix products), so that the rounding of a replicate never
        # depends on how many replicates share a chunk.
        r = np.stack([wh[i] @ hf - wb[i] @ bf for i in range(size)]).reshape(size, n_layers, d)
        for key, val in _imprint_rows(r).items():
            reps[key].append(val)
    return {key: np.concatenate(reps[key]) for key in IMPRINT_FEATURES}


def bootstrap_alignment_imprint(
    harmful: npt.ArrayLike,
    harmless: npt.ArrayLike,
    *,
    n_boot: int,
    seed: Seed,
    conf: float = 0.95,
    chunk: int = 64,
    interval: IntervalKind = "percentile",
) -> dict[str, Estimate]:
    """Bootstrap intervals for each imprint feature (``interval``: see
    :func:`bootstrap_interval`; the basic interval is not clipped here).

    Replicates as in :func:`alignment_imprint_replicates`. Keys are
    :data:`IMPRINT_FEATURES`.
    Resampling adds noise to every r_l, which biases replicates of the effective
    rank and orthogonality upwards and smoothness downwards when ||r_l|| is small
    against the sampling noise; the percentile interval can then exclude the
    point estimate, which is itself a warning that the feature is noise-dominated.
    """
    h, b = _check_pair_3d(harmful, harmless)
    n, m = h.shape[0], b.shape[0]
    obs = alignment_imprint(h.mean(axis=0) - b.mean(axis=0))
    reps = alignment_imprint_replicates(h, b, n_boot=n_boot, seed=seed, chunk=chunk)
    out: dict[str, Estimate] = {}
    for key in IMPRINT_FEATURES:
        value = float(getattr(obs, key))
        lo, hi = bootstrap_interval(value, reps[key], conf, interval)
        out[key] = Estimate(value, lo, hi, n + m, f"bootstrap-{interval}", conf)
    return out


# --------------------------------------------------------------------------- provider effect


def provider_effect_untestable(providers: Sequence[str | None]) -> str | None:
    """Why the provider-effect comparison cannot be made for these models (None: it can).

    Models with an unknown provider (None or empty) do not count. The comparison needs
    two providers (a between-provider distance) and one provider with two models (a
    within-provider distance).
    """
    known = [p for p in providers if p]
    counts = Counter(known)
    if len(counts) < 2:
        return (
            f"fewer than two providers among the models with a known provider "
            f"({', '.join(sorted(counts)) or 'none'}): no between-provider distance exists"
        )
    if max(counts.values()) < 2:
        return (
            f"exactly one model per provider ({', '.join(sorted(counts))}): the "
            "within-provider distance is undefined, so the provider effect is untestable"
        )
    return None


def feature_scale(features: npt.ArrayLike) -> FloatArray:
    """Per-feature spread across models ``[M, F] -> [F]`` (sample SD; 1 where the SD is 0,
    a feature equal for every model adding no distance anyway)."""
    f = _as_float(features, (2,), "features")
    if f.shape[0] < 2:
        raise ValueError("feature_scale needs at least two models")
    sd = f.std(axis=0, ddof=1)
    return np.asarray(np.where(sd > 0, sd, 1.0), dtype=np.float64)


def provider_distances(
    features: npt.ArrayLike, providers: Sequence[str], scale: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Mean Euclidean distance between models of one provider and of different providers.

    ``features`` is ``[..., M, F]`` (leading axes: e.g. bootstrap replicates), each
    feature divided by ``scale`` [F] (see :func:`feature_scale`). Returns (within,
    between), each of shape ``[...]``; every model pair counts once.
    """
    f = np.asarray(features, dtype=np.float64)
    s = np.asarray(scale, dtype=np.float64)
    if f.ndim < 2 or f.shape[-2] != len(providers) or f.shape[-1:] != s.shape:
        raise ValueError(f"features must be [..., {len(providers)}, {s.size}], got {f.shape}")
    reason = provider_effect_untestable(list(providers))
    if reason is not None or not all(providers):
        raise ValueError(reason or "every model needs a known provider")
    z = f / s
    iu = np.triu_indices(len(providers), 1)
    dist = np.linalg.norm(z[..., iu[0], :] - z[..., iu[1], :], axis=-1)  # [..., pairs]
    same = np.array(
        [providers[int(i)] == providers[int(j)] for i, j in zip(*iu, strict=True)], dtype=bool
    )
    return (np.asarray(dist[..., same].mean(axis=-1)), np.asarray(dist[..., ~same].mean(axis=-1)))


# --------------------------------------------------------------------------- cross-layer


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class CrossLayerAlignment:
    """|cos| between per-layer directions and where they settle.

    ``persistence[l]``: the number of consecutive following layers l+1, l+2, ...
    whose |cos| with layer l stays >= ``threshold`` (stops at the first one below).
    ``clusters``: a greedy left-to-right partition of the layers into contiguous
    (start, end) inclusive runs in which every pair has |cos| >= ``threshold``;
    singleton runs are included.
    """

    abs_cos: FloatArray
    threshold: float
    persistence: IntArray
    clusters: tuple[tuple[int, int], ...]


def cross_layer_alignment(
    directions: npt.ArrayLike, threshold: float = ALIGNMENT_ABS_COS_THRESHOLD
) -> CrossLayerAlignment:
    """|cos| matrix, persistence and clusters for per-layer directions [L, d]."""
    c = np.abs(cosine_matrix(directions))
    if np.any(np.isnan(c)):
        raise ValueError("a layer direction is zero")
    n_layers = c.shape[0]
    persistence = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers):
        run = 0
        for other in range(layer + 1, n_layers):
            if c[layer, other] < threshold:
                break
            run += 1
        persistence[layer] = run
    clusters: list[tuple[int, int]] = []
    start = 0
    for layer in range(1, n_layers + 1):
        if layer == n_layers or np.any(c[layer, start:layer] < threshold):
            clusters.append((start, layer - 1))
            start = layer
    return CrossLayerAlignment(c, threshold, persistence, tuple(clusters))


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ProceedLocalisation:
    """One layer of the DETECTED_PROCEEDS localisation (docs/science.md).

    ``detection_auc``: AUC of the projection, harmful vs harmless.
    ``decision_auc``: among harmful prompts, AUC refused vs complied (nan when one
    group is empty). ``threshold``: midpoint between the harmful and harmless mean
    projections (of training prompts when given, else of these prompts);
    ``detected_proceeds``: harmful prompts above it that complied.
    """

    layer: int
    detection_auc: float
    decision_auc: float
    threshold: float
    detected_proceeds: BoolArray
    n_detected_proceeds: int
    n_complied: int


def detected_proceeds_localisation(
    directions: npt.ArrayLike,
    harmful: npt.ArrayLike,
    harmless: npt.ArrayLike,
    refused: npt.ArrayLike,
    thresholds: npt.ArrayLike | None = None,
) -> list[ProceedLocalisation]:
    """Per-layer detection vs decision AUCs for unit directions [L, d], harmful
    [n, L, d] with boolean ``refused`` [n], and harmless [m, L, d].

    ``thresholds`` [L]: the detection threshold of each layer, fitted on other (training)
    prompts, e.g. :func:`midpoint_thresholds` of the prompts the directions were fitted
    on. Without it the midpoint of *these* prompts is used: an in-sample threshold, for
    comparison only."""
    h, b = _check_pair_3d(harmful, harmless)
    u = _as_float(directions, (2,), "directions")
    if u.shape != h.shape[1:]:
        raise ValueError("directions must be [L, d] matching the activations")
    ref = np.asarray(refused, dtype=np.bool_)
    if ref.shape != (h.shape[0],):
        raise ValueError("refused must be a boolean array over the harmful prompts")
    ph = np.einsum("nld,ld->nl", h, u)
    pb = np.einsum("nld,ld->nl", b, u)
    if thresholds is None:
        thr_all = midpoint_thresholds(ph, pb)
    else:
        thr_all = np.asarray(thresholds, dtype=np.float64)
        if thr_all.shape != (u.shape[0],):
            raise ValueError(f"thresholds must be [L] = [{u.shape[0]}], got {thr_all.shape}")
    out: list[ProceedLocalisation] = []
    for layer in range(u.shape[0]):
        a, z = ph[:, layer], pb[:, layer]
        thr = float(thr_all[layer])
        dp = (a > thr) & ~ref
        decision = auc(a[ref], a[~ref]) if ref.any() and (~ref).any() else math.nan
        out.append(
            ProceedLocalisation(
                layer=layer,
                detection_auc=auc(a, z),
                decision_auc=decision,
                threshold=thr,
                detected_proceeds=np.asarray(dp, dtype=np.bool_),
                n_detected_proceeds=int(dp.sum()),
                n_complied=int((~ref).sum()),
            )
        )
    return out


# --------------------------------------------------------------------------- proceed layers
#
# Where the representation detects harm and where the decision to refuse separates, from
# per-layer projections: harmful ``ph`` [n, L], harmless ``pb`` [m, L], ``refused`` [n]
# (the model refused harmful prompt i). Definitions (documented in the DETECTED_PROCEEDS
# benchmark and the README):
#
# * detection AUC_l: harmful vs harmless; decision AUC_l: refused vs complied;
# * saturation layer: the first layer whose detection AUC reaches ``fraction`` of the
#   largest detection AUC's excess over chance, AUC_l - 0.5 >= fraction (max AUC - 0.5);
# * detection peak layer: the largest detection AUC, ties (AUC 1.0 at several layers is
#   common) broken by the larger Cohen's d of the same projections;
# * decision onset layer: the first layer whose one-sided Mann-Whitney p-value for
#   "refused prompts project higher" (decision AUC > 0.5), Holm-adjusted over the layers,
#   is below ``alpha``; None when no layer is. A point estimate only: a "first significant
#   layer" is biased early under the bootstrap (resampled null layers cross the threshold
#   far more often than fresh samples would), so no interval is computed for it;
# * decision saturation layer: the detection rule applied to the decision AUC (first layer
#   with AUC - 0.5 >= fraction (max AUC - 0.5)); it has bootstrap intervals;
# * decision peak layer: the largest decision AUC.


def midpoint_thresholds(proj_harmful: npt.ArrayLike, proj_harmless: npt.ArrayLike) -> FloatArray:
    """Per-layer midpoint between the mean harmful and mean harmless projections,
    [n, L] and [m, L] -> [L] (fit it on the prompts the directions were fitted on)."""
    a = _as_float(proj_harmful, (2,), "proj_harmful")
    z = _as_float(proj_harmless, (2,), "proj_harmless")
    if a.shape[1] != z.shape[1]:
        raise ValueError(f"harmful {a.shape} and harmless {z.shape} differ in L")
    return np.asarray((a.mean(axis=0) + z.mean(axis=0)) / 2.0, dtype=np.float64)


def _auc_last_axis(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """AUC over the last axis for [..., n1] positives and [..., n2] negatives (mid-ranks)."""
    n1, n2 = pos.shape[-1], neg.shape[-1]
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    u = ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0
    return np.asarray(u / (n1 * n2), dtype=np.float64)


def decision_p_values(aucs: npt.ArrayLike, n_pos: int, n_neg: int) -> FloatArray:
    """One-sided p-values for AUC > 0.5: the Mann-Whitney normal approximation with
    continuity correction (scipy's ``mannwhitneyu(..., alternative="greater",
    method="asymptotic")`` without ties), elementwise; nan when a group is empty."""
    a = np.asarray(aucs, dtype=np.float64)
    if n_pos < 1 or n_neg < 1:
        return np.full(a.shape, math.nan)
    mu = n_pos * n_neg / 2.0
    sigma = math.sqrt(n_pos * n_neg * (n_pos + n_neg + 1) / 12.0)
    z = (a * n_pos * n_neg - mu - 0.5) / sigma
    return np.asarray(scipy.stats.norm.sf(z), dtype=np.float64)


def _holm_last_axis(p: FloatArray) -> FloatArray:
    """Holm step-down adjustment along the last axis (same values as statsmodels)."""
    k = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * (k - np.arange(k))
    adj_sorted = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    out = np.empty_like(adj_sorted)
    np.put_along_axis(out, order, adj_sorted, axis=-1)
    return out


def _cohens_d_last_axis(a: FloatArray, z: FloatArray) -> FloatArray:
    sd = np.sqrt((a.var(axis=-1, ddof=1) + z.var(axis=-1, ddof=1)) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray((a.mean(axis=-1) - z.mean(axis=-1)) / sd, dtype=np.float64)


def saturation_layer(detection_auc: npt.ArrayLike, fraction: float = 0.95) -> int:
    """Index of the first entry with AUC - 0.5 >= ``fraction`` (max AUC - 0.5)."""
    a = np.asarray(detection_auc, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or np.any(np.isnan(a)):
        raise ValueError("detection_auc must be a non-empty 1-D array without nan")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    target = 0.5 + fraction * (a.max() - 0.5)
    return int(np.flatnonzero(a >= target - 1e-12)[0])


def detection_peak_layer(detection_auc: npt.ArrayLike, cohens_d: npt.ArrayLike) -> int:
    """Index of the largest AUC; among tied entries, the one with the largest d."""
    a = np.asarray(detection_auc, dtype=np.float64)
    d = np.asarray(cohens_d, dtype=np.float64)
    tied = np.flatnonzero(a >= a.max() - 1e-12)
    return int(tied[np.argmax(d[tied])])


def onset_layer(p_adjusted: npt.ArrayLike, alpha: float = 0.05) -> int | None:
    """Index of the first adjusted p-value below ``alpha`` (None when there is none)."""
    p = np.asarray(p_adjusted, dtype=np.float64)
    hits = np.flatnonzero(p < alpha)
    return int(hits[0]) if hits.size else None


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ProceedLayers:
    """Layer localisation of detection and decision (see the definitions above).

    Arrays are over ``layers`` (model layer numbers); the ``*_layer`` fields are model
    layer numbers. Decision fields are nan / None when a group (refused or complied)
    is empty.
    """

    layers: tuple[int, ...]
    detection_auc: FloatArray
    detection_d: FloatArray
    decision_auc: FloatArray
    decision_p: FloatArray
    decision_p_holm: FloatArray
    saturation_layer: int
    detection_peak_layer: int
    decision_onset_layer: int | None
    decision_saturation_layer: int | None
    decision_peak_layer: int | None
    fraction: float
    alpha: float


def _check_projections(
    ph: npt.ArrayLike, pb: npt.ArrayLike, refused: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, BoolArray]:
    a = _as_float(ph, (2,), "ph")
    z = _as_float(pb, (2,), "pb")
    if a.shape[1] != z.shape[1]:
        raise ValueError(f"harmful {a.shape} and harmless {z.shape} differ in L")
    ref = np.asarray(refused, dtype=np.bool_)
    if ref.shape != (a.shape[0],):
        raise ValueError("refused must be a boolean array over the harmful prompts")
    if np.any(np.isnan(a)) or np.any(np.isnan(z)):
        raise ValueError("projections contain nan (a zero direction? see informative_layers)")
    return a, z, ref


def proceed_layers(
    ph: npt.ArrayLike,
    pb: npt.ArrayLike,
    refused: npt.ArrayLike,
    layers: Sequence[int] | None = None,
    *,
    fraction: float = 0.95,
    alpha: float = 0.05,
) -> ProceedLayers:
    """Detection and decision per layer from projections ``ph`` [n, L], ``pb`` [m, L]."""
    a, z, ref = _check_projections(ph, pb, refused)
    lay = tuple(range(a.shape[1])) if layers is None else tuple(int(x) for x in layers)
    if len(lay) != a.shape[1]:
        raise ValueError(f"{len(lay)} layer numbers for {a.shape[1]} projection columns")
    det = _auc_last_axis(a.T, np.broadcast_to(z.T, (a.shape[1], z.shape[0])))
    d = _cohens_d_last_axis(a.T, z.T)
    n_pos, n_neg = int(ref.sum()), int((~ref).sum())
    if n_pos and n_neg:
        dec = _auc_last_axis(a[ref].T, a[~ref].T)
        p = decision_p_values(dec, n_pos, n_neg)
        p_holm = _holm_last_axis(p)
        onset = onset_layer(p_holm, alpha)
        onset_l: int | None = None if onset is None else lay[onset]
        peak_l: int | None = lay[int(np.argmax(dec))]
        dsat_l: int | None = (lay[saturation_layer(dec, fraction)] if dec.max() > 0.5
                              else None)
    else:
        dec = p = p_holm = np.full(len(lay), math.nan)
        onset_l = peak_l = dsat_l = None
    return ProceedLayers(
        layers=lay, detection_auc=det, detection_d=d, decision_auc=dec, decision_p=p,
        decision_p_holm=p_holm, saturation_layer=lay[saturation_layer(det, fraction)],
        detection_peak_layer=lay[detection_peak_layer(det, d)],
        decision_onset_layer=onset_l, decision_saturation_layer=dsat_l,
        decision_peak_layer=peak_l,
        fraction=fraction, alpha=alpha,
    )


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ProceedBootstrap:
    """Bootstrap replicates ``[R]`` of the localisation layers (model layer numbers; nan
    where a replicate's decision AUC never exceeds 0.5) and of detection AUC - decision
    AUC at the fixed layer ``at_layer`` (paired: both AUCs from the same resampled
    prompts). The decision onset has no replicates (see the definitions above).

    Resampling is stratified: refused, complied and harmless prompts are each resampled
    with replacement within their group, so every replicate has both decision groups.
    """

    saturation: FloatArray
    detection_peak: FloatArray
    decision_saturation: FloatArray
    decision_peak: FloatArray
    at_layer: int
    auc_difference: FloatArray


def bootstrap_proceed_layers(
    ph: npt.ArrayLike,
    pb: npt.ArrayLike,
    refused: npt.ArrayLike,
    layers: Sequence[int] | None = None,
    *,
    at_layer: int,
    n_boot: int,
    seed: Seed,
    fraction: float = 0.95,
) -> ProceedBootstrap:
    """Replicates of :func:`proceed_layers`' layers and of the AUC difference at
    ``at_layer`` (a model layer number in ``layers``). Needs refused and complied prompts."""
    a, z, ref = _check_projections(ph, pb, refused)
    lay = tuple(range(a.shape[1])) if layers is None else tuple(int(x) for x in layers)
    n_pos, n_neg = int(ref.sum()), int((~ref).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"the bootstrap needs refused and complied prompts ({n_pos} refused, "
                         f"{n_neg} complied)")
    col = lay.index(at_layer)
    n, m = a.shape[0], z.shape[0]
    groups = np.concatenate([np.where(ref, 0, 1), np.full(m, 2)])
    idx = resample_within_groups(groups, n_boot, seed)  # [R, n + m]
    ih, ib = idx[:, :n], idx[:, n:] - n
    refused_cols = np.flatnonzero(ref)
    complied_cols = np.flatnonzero(~ref)
    big = np.concatenate([a, z], axis=0)  # [n + m, L]
    sat = np.empty(n_boot)
    peak = np.empty(n_boot)
    dsat = np.empty(n_boot)
    dpeak = np.empty(n_boot)
    diff = np.empty(n_boot)
    for start in range(0, n_boot, 64):
        sl = slice(start, min(start + 64, n_boot))
        rh = big[ih[sl]]  # [r, n, L]
        rb = big[n + ib[sl]]  # [r, m, L]
        det = _auc_last_axis(rh.transpose(0, 2, 1), rb.transpose(0, 2, 1))  # [r, L]
        d = _cohens_d_last_axis(rh.transpose(0, 2, 1), rb.transpose(0, 2, 1))
        pos = rh[:, refused_cols].transpose(0, 2, 1)  # positions of refused rows are fixed
        neg = rh[:, complied_cols].transpose(0, 2, 1)
        dec = _auc_last_axis(pos, neg)  # [r, L]
        for j, r in enumerate(range(sl.start, sl.stop)):
            sat[r] = lay[saturation_layer(det[j], fraction)]
            peak[r] = lay[detection_peak_layer(det[j], d[j])]
            dsat[r] = (lay[saturation_layer(dec[j], fraction)] if dec[j].max() > 0.5
                       else math.nan)
            dpeak[r] = lay[int(np.argmax(dec[j]))]
        diff[sl] = det[:, col] - dec[:, col]
    return ProceedBootstrap(sat, peak, dsat, dpeak, at_layer, diff)
