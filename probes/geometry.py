"""Refusal geometry: concept cone, alignment imprint, cross-layer alignment (SCIENCE.md).

Everything here is descriptive (numpy only). Shapes: harmful activations
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
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

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
)

# SCIENCE.md, "Concept cone": geometry label thresholds.
LINEAR_MIN_MEAN_ABS_COS = 0.9
LINEAR_MAX_DIMENSION = 1.5
POLYHEDRAL_MAX_MEAN_ABS_COS = 0.8
POLYHEDRAL_MIN_DIMENSION = 2.0
# SCIENCE.md, "DETECTED_PROCEEDS": cross-layer clusters at |cos| >= 0.85.
ALIGNMENT_ABS_COS_THRESHOLD = 0.85
# SCIENCE.md, "Alignment imprint": tail bias uses the last 25 % of layers.
TAIL_FRACTION = 0.25
# Permutation statistics within this relative distance of the observed value are
# ties (they differ only by floating-point rounding in the Gram computation).
TIE_RTOL = 1e-9

__all__ = [
    "ALIGNMENT_ABS_COS_THRESHOLD",
    "IMPRINT_FEATURES",
    "LINEAR_MAX_DIMENSION",
    "LINEAR_MIN_MEAN_ABS_COS",
    "POLYHEDRAL_MAX_MEAN_ABS_COS",
    "POLYHEDRAL_MIN_DIMENSION",
    "TAIL_FRACTION",
    "TIE_RTOL",
    "AlignmentImprint",
    "CategoryDirections",
    "ConeStatistics",
    "CrossLayerAlignment",
    "GeometryLabel",
    "PermutationTest",
    "ProceedLocalisation",
    "alignment_imprint",
    "alignment_imprint_from_activations",
    "bootstrap_alignment_imprint",
    "cap_formula_3d",
    "category_directions",
    "cone_statistics",
    "cosine_matrix",
    "cross_layer_alignment",
    "detected_proceeds_localisation",
    "effective_dimension",
    "effective_dimension_obliteratus",
    "geometry_label",
    "mean_abs_cos",
    "most_linear_layer",
    "most_polyhedral_layer",
    "permutation_test",
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
    """Concept-cone summary of one layer (SCIENCE.md, "Concept cone").

    Intervals and permutation tests are ``None`` when not requested. Bootstrap:
    prompts are resampled with replacement within each harmful category and,
    separately, within the harmless set; percentile intervals. Permutation:
    category labels are shuffled among the harmful prompts (category sizes kept,
    harmless set fixed). ``causally_validated`` is never set here (geometry is
    descriptive); the causal test sets it with ``dataclasses.replace``.

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
) -> list[ConeStatistics]:
    """Concept-cone statistics per layer for harmful [n, L, d] (labels [n]) and
    harmless [m, L, d]; [n, d] inputs are treated as one layer (index 0).

    ``n_boot`` / ``n_perm`` > 0 add bootstrap intervals and permutation tests for
    mean |cos| and the corrected effective dimension (``seed`` required). The same
    resampled prompts are used at every layer.
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
        cos = _cos_from_gram(gram)
        mac = _offdiag_mean_abs(cos)
        dim, dim_pub = _dims_from_cos(cos)
        cap = _cap_from_cos(cos)
        c0 = cos[0]
        obs_mac, obs_dim = float(mac[0]), float(dim[0])
        mac_ci = dim_ci = None
        mac_perm = dim_perm = None
        if n_boot > 0:
            sl = slice(1, 1 + n_boot)
            lo, hi = percentile_interval(mac[sl], conf)
            mac_ci = Estimate(obs_mac, lo, hi, n + m, "bootstrap-percentile-within-category", conf)
            lo, hi = percentile_interval(dim[sl], conf)
            dim_ci = Estimate(obs_dim, lo, hi, n + m, "bootstrap-percentile-within-category", conf)
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


# --------------------------------------------------------------------------- alignment imprint


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class AlignmentImprint:
    """Geometric features of per-layer refusal directions r_l (SCIENCE.md).

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
    s = np.linalg.svd(u, compute_uv=False)  # [R, min(L, d)]
    rank_tol = s[..., :1] * max(n_layers, d) * np.finfo(np.float64).eps
    s_min = s[..., -1]
    with np.errstate(divide="ignore"):
        decay = np.where(
            (s_min > rank_tol[..., 0]) & (n_layers <= d),
            np.log(s[..., 0] / np.where(s_min > 0, s_min, 1.0)),
            np.inf,
        )
    cos = np.abs(np.einsum("rld,rmd->rlm", u, u))
    adjacent = np.abs(np.einsum("rld,rld->rl", u[:, :-1], u[:, 1:]))
    iu = np.triu_indices(n_layers, 1)
    n_tail = math.ceil(TAIL_FRACTION * n_layers)
    return {
        "gini": _gini_rows(strengths),
        "effective_rank": _entropy_dim(s * s),
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


def bootstrap_alignment_imprint(
    harmful: npt.ArrayLike,
    harmless: npt.ArrayLike,
    *,
    n_boot: int,
    seed: Seed,
    conf: float = 0.95,
    chunk: int = 64,
) -> dict[str, Estimate]:
    """Percentile bootstrap intervals for each imprint feature.

    Harmful and harmless prompts are resampled independently with replacement
    (a prompt keeps all its layers). Keys are :data:`IMPRINT_FEATURES`.
    Resampling adds noise to every r_l, which biases replicates of the effective
    rank and orthogonality upwards and smoothness downwards when ||r_l|| is small
    against the sampling noise; the percentile interval can then exclude the
    point estimate, which is itself a warning that the feature is noise-dominated.
    """
    h, b = _check_pair_3d(harmful, harmless)
    n, n_layers, d = h.shape
    m = b.shape[0]
    obs = alignment_imprint(h.mean(axis=0) - b.mean(axis=0))
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
        r = (wh @ hf - wb @ bf).reshape(size, n_layers, d)
        for key, val in _imprint_rows(r).items():
            reps[key].append(val)
    out: dict[str, Estimate] = {}
    for key in IMPRINT_FEATURES:
        lo, hi = percentile_interval(np.concatenate(reps[key]), conf)
        out[key] = Estimate(float(getattr(obs, key)), lo, hi, n + m, "bootstrap-percentile", conf)
    return out


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
    """One layer of the DETECTED_PROCEEDS localisation (SCIENCE.md).

    ``detection_auc``: AUC of the projection, harmful vs harmless.
    ``decision_auc``: among harmful prompts, AUC refused vs complied (nan when one
    group is empty). ``threshold``: midpoint between the harmful and harmless mean
    projections; ``detected_proceeds``: harmful prompts above it that complied.
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
) -> list[ProceedLocalisation]:
    """Per-layer detection vs decision AUCs for unit directions [L, d], harmful
    [n, L, d] with boolean ``refused`` [n], and harmless [m, L, d]."""
    h, b = _check_pair_3d(harmful, harmless)
    u = _as_float(directions, (2,), "directions")
    if u.shape != h.shape[1:]:
        raise ValueError("directions must be [L, d] matching the activations")
    ref = np.asarray(refused, dtype=np.bool_)
    if ref.shape != (h.shape[0],):
        raise ValueError("refused must be a boolean array over the harmful prompts")
    ph = np.einsum("nld,ld->nl", h, u)
    pb = np.einsum("nld,ld->nl", b, u)
    out: list[ProceedLocalisation] = []
    for layer in range(u.shape[0]):
        a, z = ph[:, layer], pb[:, layer]
        thr = float((a.mean() + z.mean()) / 2.0)
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
