"""Direction extraction methods and their held-out evaluation (docs/science.md).

Shapes: a single site is ``[n, d]`` (prompts x d_model); per-layer activations
are ``[n, L, d]``; per-layer directions are ``[L, d]``. "pos" is the class the
direction should point to (harmful, H) and "neg" the other (harmless, B).

Methods (all return a unit vector):

* ``mean_diff``: r = mean(pos) - mean(neg), normalised.
* ``probe``: L2-regularised logistic regression (with an unpenalised intercept) on
  row-normalised activations x / ||x||, objective
  ``sum_i log(1 + exp(-y_i (w.x_i + b))) + ||w||^2 / (2 C)``, solved with
  L-BFGS; the direction is w / ||w||.
* ``gradient``: the unit vector u maximising the standardised projection gap
  ``J(u) = u.Delta / sqrt(u' S_g u)`` where Delta = mean(pos) - mean(neg),
  S = (S_pos + S_neg) / 2 (ddof=1 class covariances, i.e. J is Cohen's d of the
  projections with the suite's pooled SD) and S_g = (1 - g) S + g (tr S / d) I is
  shrunk towards a scaled identity (g from Ledoit–Wolf unless given; without
  shrinkage J is unbounded whenever d >= n). By Cauchy–Schwarz the maximiser is
  u ~ S_g^{-1} Delta, so it is computed exactly (eigendecomposition of S through
  the smaller of the d x d and n x n Gram matrices) instead of by iterative
  gradient ascent; g = 0 with a singular S gives the limit, the part of Delta
  outside the range of S. For every g in [0, 1] the
  unshrunk J of this u is >= J(mean_diff) (mean_diff is the g -> 1 limit and J
  decreases monotonically along the ridge path).
* ``pca_diff``: first principal component (centred PCA) of paired differences
  pos_i - neg_pi(i) over a seeded random pairing of min(n, m) pairs; the sign is
  chosen so that pos projects higher than neg on the training set.
* ``random``: a seeded Gaussian direction; no sign correction (a baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.special
import scipy.stats

from probes.stats import BoolArray, FloatArray, IntArray, auc, cohens_d, holm

Method = Literal["mean_diff", "probe", "gradient", "pca_diff", "random"]
METHODS: tuple[Method, ...] = get_args(Method)

# The validation report's validity criterion (docs/science.md, "Per-layer significance").
SEED003_P_MAX = 0.01
SEED003_ABS_D_MIN = 0.5
# gradient: relative size below which Delta's part outside the range of S is rounding noise.
_NULL_RTOL = 1e-8

__all__ = [
    "METHODS",
    "SEED003_ABS_D_MIN",
    "SEED003_P_MAX",
    "DirectionEval",
    "LayerSignificance",
    "Method",
    "bootstrap_d_profile",
    "cohens_d_columns",
    "constant_layers",
    "evaluate_direction",
    "evaluate_per_layer",
    "fit_direction",
    "fit_direction_per_layer",
    "gradient_direction",
    "heldout_correct",
    "layer_seed",
    "layer_significance",
    "ledoit_wolf_shrinkage",
    "mean_diff",
    "mean_diff_per_layer",
    "pca_diff_direction",
    "probe_direction",
    "profile_spearman",
    "project",
    "projection_gap",
    "random_direction",
    "train_test_split",
    "unit",
]


# --------------------------------------------------------------------------- helpers


def _as_2d(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _as_3d(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be [n, L, d], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _pair(pos: npt.ArrayLike, neg: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    p, q = _as_2d(pos, "pos"), _as_2d(neg, "neg")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"pos and neg differ in d: {p.shape[1]} vs {q.shape[1]}")
    return p, q


def unit(v: npt.ArrayLike) -> FloatArray:
    """v / ||v|| along the last axis (raises ``ValueError`` on a zero vector)."""
    a = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    if np.any(norm == 0.0) or not np.all(np.isfinite(norm)):
        raise ValueError("cannot normalise a zero or non-finite vector")
    return np.asarray(a / norm, dtype=np.float64)


def layer_seed(seed: int, layer: int) -> int:
    """Deterministic per-layer child seed derived from (seed, layer)."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1, dtype=np.uint64)[0])


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    """Seeded random split of range(n): (sorted train indices, sorted test indices).

    The test part has round(n * test_fraction) items, at least 1 and at most n - 1.
    """
    if n < 2:
        raise ValueError("need n >= 2 to split")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return (
        np.sort(perm[n_test:]).astype(np.int64),
        np.sort(perm[:n_test]).astype(np.int64),
    )


def project(acts: npt.ArrayLike, directions: npt.ArrayLike) -> FloatArray:
    """Projections <h, u>: [n, d] x [d] -> [n], or [n, L, d] x [L, d] -> [n, L]."""
    a = np.asarray(acts, dtype=np.float64)
    u = np.asarray(directions, dtype=np.float64)
    if a.ndim == 2 and u.ndim == 1:
        return np.asarray(a @ u, dtype=np.float64)
    if a.ndim == 3 and u.ndim == 2:
        return np.asarray(np.einsum("nld,ld->nl", a, u), dtype=np.float64)
    raise ValueError(f"shapes {a.shape} and {u.shape} do not match [n,d]x[d] or [n,L,d]x[L,d]")


def projection_gap(direction: npt.ArrayLike, pos: npt.ArrayLike, neg: npt.ArrayLike) -> float:
    """Cohen's d of the projections on ``direction`` (the ``gradient`` objective, unshrunk)."""
    p, q = _pair(pos, neg)
    u = np.asarray(direction, dtype=np.float64)
    return cohens_d(p @ u, q @ u)


# --------------------------------------------------------------------------- methods


def mean_diff(pos: npt.ArrayLike, neg: npt.ArrayLike) -> FloatArray:
    """Unnormalised difference of means r = mean(pos) - mean(neg), [d]."""
    p, q = _pair(pos, neg)
    return np.asarray(p.mean(axis=0) - q.mean(axis=0), dtype=np.float64)


def mean_diff_per_layer(pos: npt.ArrayLike, neg: npt.ArrayLike) -> FloatArray:
    """Unnormalised r_l = mean(pos_l) - mean(neg_l) for [n, L, d] inputs -> [L, d]."""
    p, q = _as_3d(pos, "pos"), _as_3d(neg, "neg")
    if p.shape[1:] != q.shape[1:]:
        raise ValueError(f"pos {p.shape} and neg {q.shape} differ in [L, d]")
    return np.asarray(p.mean(axis=0) - q.mean(axis=0), dtype=np.float64)


def probe_direction(
    pos: npt.ArrayLike,
    neg: npt.ArrayLike,
    *,
    c: float = 1.0,
    max_iter: int = 500,
) -> FloatArray:
    """Unit weight vector of an L2 logistic regression (inverse strength ``c``) on
    row-normalised activations; points towards ``pos``. See the module docstring."""
    p, q = _pair(pos, neg)
    if c <= 0:
        raise ValueError("c must be positive")
    x = np.concatenate([p, q], axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0.0, 1.0, norms)
    y = np.concatenate([np.ones(p.shape[0]), -np.ones(q.shape[0])])
    d = x.shape[1]

    def objective(theta: FloatArray) -> tuple[float, FloatArray]:
        w, b = theta[:d], theta[d]
        margin = y * (x @ w + b)
        loss = float(np.logaddexp(0.0, -margin).sum() + w @ w / (2.0 * c))
        g = -y * scipy.special.expit(-margin)
        grad = np.empty(d + 1)
        grad[:d] = x.T @ g + w / c
        grad[d] = g.sum()
        return loss, grad

    res = scipy.optimize.minimize(
        objective,
        np.zeros(d + 1),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": 1e-9, "ftol": 1e-15},
    )
    w = np.asarray(res.x[:d], dtype=np.float64)
    if not np.any(w):
        raise ValueError("probe weight vector is zero: the classes are indistinguishable")
    return unit(w)


def ledoit_wolf_shrinkage(x: npt.ArrayLike) -> float:
    """Ledoit–Wolf (2004) shrinkage intensity in [0, 1] for already-centred rows [n, d].

    Computed from the n x n Gram matrix, so it is cheap when d >> n.
    """
    a = _as_2d(x, "x")
    n, d = a.shape
    gram = a @ a.T
    trace = float(np.trace(gram)) / n
    fro2 = float(np.sum(gram * gram)) / (n * n)  # ||S||_F^2, S = X'X / n
    delta = (fro2 - trace * trace / d) / d
    if delta <= 0.0:
        return 1.0
    fourth = float(np.sum(np.diag(gram) ** 2)) / n
    beta = min((fourth - fro2) / (n * d), delta)
    return float(min(max(beta / delta, 0.0), 1.0))


def gradient_direction(
    pos: npt.ArrayLike,
    neg: npt.ArrayLike,
    *,
    shrinkage: float | None = None,
) -> FloatArray:
    """Unit maximiser of the shrunk standardised projection gap (module docstring).

    ``shrinkage`` is g in [0, 1]; ``None`` uses the Ledoit–Wolf intensity of the
    class-centred pooled rows.
    """
    p, q = _pair(pos, neg)
    if p.shape[0] < 2 or q.shape[0] < 2:
        raise ValueError("gradient needs >= 2 rows per class (a within-class SD)")
    delta = p.mean(axis=0) - q.mean(axis=0)
    if not np.any(delta):
        raise ValueError("class means are equal: no direction separates them")
    pc, qc = p - p.mean(axis=0), q - q.mean(axis=0)
    z = np.concatenate(
        [pc / math.sqrt(2.0 * (p.shape[0] - 1)), qc / math.sqrt(2.0 * (q.shape[0] - 1))]
    )  # S = z' z
    d = p.shape[1]
    tau = float(np.sum(z * z)) / d
    if tau == 0.0:
        return unit(delta)
    g = ledoit_wolf_shrinkage(np.concatenate([pc, qc])) if shrinkage is None else shrinkage
    if not 0.0 <= g <= 1.0:
        raise ValueError("shrinkage must be in [0, 1]")
    if g == 1.0:
        return unit(delta)
    mu = g * tau / (1.0 - g)  # S_g ~ S + mu I
    lam, w = _within_class_eigen(z)
    coef = w.T @ delta  # components of Delta on the non-null eigenvectors of S
    null_part = delta - w @ coef
    if np.linalg.norm(null_part) > _NULL_RTOL * np.linalg.norm(delta):
        # S is singular and Delta leaves its range: weight 1/mu on the null part;
        # multiplied through by mu so that mu -> 0 has the limit null_part.
        u = w @ (coef * (mu / (lam + mu))) + null_part
    else:
        u = w @ (coef / (lam + mu))
    return unit(u)


def _within_class_eigen(z: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Non-null eigenpairs (lam [r], w [d, r]) of S = z' z, via the smaller Gram matrix."""
    n, d = z.shape
    if n < d:
        lam, v = np.linalg.eigh(z @ z.T)
        keep = lam > lam.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
        lam, v = lam[keep], v[:, keep]
        return lam, (z.T @ v) / np.sqrt(lam)
    lam, w = np.linalg.eigh(z.T @ z)
    keep = lam > lam.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    return lam[keep], w[:, keep]


def pca_diff_direction(
    pos: npt.ArrayLike,
    neg: npt.ArrayLike,
    *,
    seed: int,
    center: bool = True,
) -> FloatArray:
    """First principal component of seeded random pairs pos_i - neg_j (module docstring).

    ``center=False`` takes the first right singular vector of the uncentred
    differences instead (that keeps the mean difference in the data).
    """
    p, q = _pair(pos, neg)
    rng = np.random.default_rng(seed)
    k = min(p.shape[0], q.shape[0])
    diffs = p[rng.permutation(p.shape[0])[:k]] - q[rng.permutation(q.shape[0])[:k]]
    if center:
        diffs = diffs - diffs.mean(axis=0)
    if not np.any(diffs):
        raise ValueError("paired differences are all zero after centring")
    if diffs.shape[0] < diffs.shape[1]:
        # Top right singular vector via the small k x k Gram matrix.
        _, vecs = np.linalg.eigh(diffs @ diffs.T)
        u = diffs.T @ vecs[:, -1]
    else:
        u = np.linalg.svd(diffs, full_matrices=False)[2][0]
    if float(p.mean(axis=0) @ u) < float(q.mean(axis=0) @ u):
        u = -u
    return unit(u)


def random_direction(d: int, seed: int) -> FloatArray:
    """A seeded random unit vector in R^d (standard Gaussian, normalised)."""
    if d < 1:
        raise ValueError("d must be >= 1")
    return unit(np.random.default_rng(seed).standard_normal(d))


def fit_direction(
    method: Method, pos: npt.ArrayLike, neg: npt.ArrayLike, *, seed: int
) -> FloatArray:
    """Unit direction from ``method`` with default settings; ``seed`` is used by
    ``pca_diff`` (pairing) and ``random`` and ignored by the deterministic methods."""
    if method == "mean_diff":
        return unit(mean_diff(pos, neg))
    if method == "probe":
        return probe_direction(pos, neg)
    if method == "gradient":
        return gradient_direction(pos, neg)
    if method == "pca_diff":
        return pca_diff_direction(pos, neg, seed=seed)
    if method == "random":
        p, _ = _pair(pos, neg)
        return random_direction(p.shape[1], seed)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def fit_direction_per_layer(
    method: Method, pos: npt.ArrayLike, neg: npt.ArrayLike, *, seed: int
) -> FloatArray:
    """Unit directions per layer, [n, L, d] -> [L, d].

    Layer l uses ``layer_seed(seed, l)``, so it equals
    ``fit_direction(method, pos[:, l], neg[:, l], seed=layer_seed(seed, l))``.
    """
    p, q = _as_3d(pos, "pos"), _as_3d(neg, "neg")
    if p.shape[1:] != q.shape[1:]:
        raise ValueError(f"pos {p.shape} and neg {q.shape} differ in [L, d]")
    if method == "mean_diff":
        return unit(mean_diff_per_layer(p, q))
    return np.stack(
        [
            fit_direction(method, p[:, layer], q[:, layer], seed=layer_seed(seed, layer))
            for layer in range(p.shape[1])
        ]
    )


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class DirectionEval:
    """Held-out quality of a direction (the trait-vector log's table, docs/science.md).

    ``threshold`` is the midpoint between the train-class means of the projection;
    a test prompt is predicted "pos" when its projection is > threshold (the
    orientation is never flipped, so a reversed direction scores below 0.5).
    ``polarity_correct``: mean test projection of pos > that of neg.
    """

    threshold: float
    accuracy: float
    balanced_accuracy: float
    cohens_d: float
    auc: float
    polarity_correct: bool
    train_cohens_d: float
    n_test: int


def evaluate_direction(
    direction: npt.ArrayLike,
    train_pos: npt.ArrayLike,
    train_neg: npt.ArrayLike,
    test_pos: npt.ArrayLike,
    test_neg: npt.ArrayLike,
) -> DirectionEval:
    """Accuracy at the train midpoint threshold, Cohen's d, AUC and polarity on test."""
    u = np.asarray(direction, dtype=np.float64)
    trp, trn = _pair(train_pos, train_neg)
    tep, ten = _pair(test_pos, test_neg)
    if u.shape != (trp.shape[1],) or tep.shape[1] != trp.shape[1]:
        raise ValueError("direction and activations disagree in d")
    a_tr, b_tr = trp @ u, trn @ u
    a_te, b_te = tep @ u, ten @ u
    thr = float((a_tr.mean() + b_tr.mean()) / 2.0)
    hit_pos = float(np.mean(a_te > thr))
    hit_neg = float(np.mean(b_te <= thr))
    n_test = a_te.size + b_te.size
    return DirectionEval(
        threshold=thr,
        accuracy=(hit_pos * a_te.size + hit_neg * b_te.size) / n_test,
        balanced_accuracy=(hit_pos + hit_neg) / 2.0,
        cohens_d=cohens_d(a_te, b_te),
        auc=auc(a_te, b_te),
        polarity_correct=bool(a_te.mean() > b_te.mean()),
        train_cohens_d=cohens_d(a_tr, b_tr),
        n_test=int(n_test),
    )


def evaluate_per_layer(
    directions: npt.ArrayLike,
    train_pos: npt.ArrayLike,
    train_neg: npt.ArrayLike,
    test_pos: npt.ArrayLike,
    test_neg: npt.ArrayLike,
) -> list[DirectionEval]:
    """:func:`evaluate_direction` per layer for [L, d] directions and [n, L, d] data."""
    u = np.asarray(directions, dtype=np.float64)
    arrays = [
        _as_3d(a, name)
        for a, name in (
            (train_pos, "train_pos"),
            (train_neg, "train_neg"),
            (test_pos, "test_pos"),
            (test_neg, "test_neg"),
        )
    ]
    if u.ndim != 2 or any(a.shape[1:] != u.shape for a in arrays):
        raise ValueError("directions must be [L, d] matching the activations' [L, d]")
    return [
        evaluate_direction(u[layer], *(a[:, layer] for a in arrays)) for layer in range(u.shape[0])
    ]


# --------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class LayerSignificance:
    """One row of the per-layer significance table (docs/science.md, Per-layer significance).

    Held-out columns use r_l fitted (mean_diff) on the train split and tested on
    the test split; ``*_in_sample`` columns fit and test on train + test together
    (the seed's circular protocol, for comparison only). ``norm`` is ||r_l|| on
    train. ``valid``: Holm-adjusted held-out p < p_max and |held-out d| > abs_d_min.
    """

    layer: int
    norm: float
    t: float
    p: float
    p_holm: float
    cohens_d: float
    auc: float
    t_in_sample: float
    p_in_sample: float
    cohens_d_in_sample: float
    valid: bool


def _welch_cols(a: FloatArray, b: FloatArray) -> tuple[FloatArray, FloatArray]:
    res = scipy.stats.ttest_ind(a, b, axis=0, equal_var=False)
    return (
        np.asarray(res.statistic, dtype=np.float64),
        np.asarray(res.pvalue, dtype=np.float64),
    )


def _cohens_d_cols(a: FloatArray, b: FloatArray) -> FloatArray:
    return cohens_d_columns(a, b)


def _unit_or_nan(r: FloatArray) -> FloatArray:
    """Row-normalise; rows with (numerically) zero norm become NaN instead of raising."""
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    scale = np.max(np.abs(r)) if r.size else 0.0
    tiny = norm <= 1e-9 * max(float(scale), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(tiny, np.nan, r / np.where(tiny, 1.0, norm))
    return np.asarray(out, dtype=np.float64)


def layer_significance(
    train_pos: npt.ArrayLike,
    train_neg: npt.ArrayLike,
    test_pos: npt.ArrayLike,
    test_neg: npt.ArrayLike,
    *,
    p_max: float = SEED003_P_MAX,
    abs_d_min: float = SEED003_ABS_D_MIN,
) -> list[LayerSignificance]:
    """Per-layer Welch t, Holm-adjusted p, Cohen's d, AUC and validity ([n, L, d] inputs).

    Defaults are the validation report's criterion (p < 0.01 and |d| > 0.5), judged on the
    Holm-adjusted held-out p-values.
    """
    trp, trn = _as_3d(train_pos, "train_pos"), _as_3d(train_neg, "train_neg")
    tep, ten = _as_3d(test_pos, "test_pos"), _as_3d(test_neg, "test_neg")
    shape = trp.shape[1:]
    if any(a.shape[1:] != shape for a in (trn, tep, ten)):
        raise ValueError("all inputs must share [L, d]")
    r = mean_diff_per_layer(trp, trn)
    norms = np.linalg.norm(r, axis=1)
    # A layer where every prompt has the same activation (e.g. resid_pre of block 0 at the
    # last token, which is always the same template token) has no direction: NaN row.
    u = _unit_or_nan(r)
    a_te, b_te = project(tep, u), project(ten, u)
    t, p = _welch_cols(a_te, b_te)
    p_adj = holm(p)
    d_te = _cohens_d_cols(a_te, b_te)
    all_pos = np.concatenate([trp, tep])
    all_neg = np.concatenate([trn, ten])
    u_all = _unit_or_nan(mean_diff_per_layer(all_pos, all_neg))
    a_in, b_in = project(all_pos, u_all), project(all_neg, u_all)
    t_in, p_in = _welch_cols(a_in, b_in)
    d_in = _cohens_d_cols(a_in, b_in)
    rows = []
    for layer in range(shape[0]):
        valid = bool(np.isfinite(d_te[layer]) and p_adj[layer] < p_max
                     and abs(d_te[layer]) > abs_d_min)
        rows.append(
            LayerSignificance(
                layer=layer,
                norm=float(norms[layer]),
                t=float(t[layer]),
                p=float(p[layer]),
                p_holm=float(p_adj[layer]),
                cohens_d=float(d_te[layer]),
                auc=auc(a_te[:, layer], b_te[:, layer]),
                t_in_sample=float(t_in[layer]),
                p_in_sample=float(p_in[layer]),
                cohens_d_in_sample=float(d_in[layer]),
                valid=valid,
            )
        )
    return rows


# --------------------------------------------------------------------------- layer profiles


def cohens_d_columns(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """:func:`probes.stats.cohens_d` of every column, vectorised.

    ``a`` is [..., n, k] and ``b`` [..., m, k] (rows are prompts, the axis before the
    last; leading axes, e.g. bootstrap replicates, broadcast); returns [..., k]. Same
    conventions as ``cohens_d``: ddof=1, pooled SD sqrt((s_a^2 + s_b^2) / 2), ``nan``
    when a group has < 2 rows or when the pooled SD and the mean difference are both
    zero (or either is ``nan``), ``±inf`` when only the pooled SD is zero.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"need [..., n, k] arrays, got shapes {x.shape} and {y.shape}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"a and b differ in columns: {x.shape[-1]} vs {y.shape[-1]}")
    out_shape = (*np.broadcast_shapes(x.shape[:-2], y.shape[:-2]), x.shape[-1])
    if x.shape[-2] < 2 or y.shape[-2] < 2:
        return np.full(out_shape, np.nan)
    diff = x.mean(axis=-2) - y.mean(axis=-2)
    sd = np.sqrt((x.var(axis=-2, ddof=1) + y.var(axis=-2, ddof=1)) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / sd
    zero_sd = sd == 0.0
    d = np.where(zero_sd & (diff == 0.0), np.nan, d)
    d = np.where(zero_sd & (diff != 0.0), np.copysign(np.inf, diff), d)
    return np.asarray(np.broadcast_to(d, out_shape), dtype=np.float64)


def constant_layers(*acts: npt.ArrayLike, rtol: float = 1e-6) -> BoolArray:
    """[L] True where every prompt of all the given [n, L, d] arrays has the same activation.

    Such a layer has no direction at all (every method's fit is undefined). It happens
    for real: ``resid_pre`` of block 0 at the last prompt token is the embedding of the
    chat template's final token, the same token for every prompt. "The same" means
    max_i ||h_i - h_0|| <= rtol * max(||h_0||, 1).
    """
    if not acts:
        raise ValueError("constant_layers needs at least one array")
    arrays = [_as_3d(a, f"acts[{i}]") for i, a in enumerate(acts)]
    if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        raise ValueError("all arrays must share [L, d]")
    ref = arrays[0][0]  # [L, d]
    spread = np.max([np.linalg.norm(a - ref, axis=-1).max(axis=0) for a in arrays], axis=0)
    scale = np.maximum(np.linalg.norm(ref, axis=-1), 1.0)
    return np.asarray(spread <= rtol * scale, dtype=np.bool_)


def bootstrap_d_profile(
    pos_scores: npt.ArrayLike, neg_scores: npt.ArrayLike, *, n_boot: int, seed: int
) -> FloatArray:
    """[n_boot, L] Cohen's d per layer on bootstrap resamples of the prompts.

    ``pos_scores`` [n, L] and ``neg_scores`` [m, L] are projections of fixed
    directions; each replicate resamples the pos rows and the neg rows independently
    (with replacement) and uses the same rows at every layer, so a replicate is a
    whole per-layer profile (for intervals of the peak layer or of a trend).
    """
    a = np.asarray(pos_scores, dtype=np.float64)
    b = np.asarray(neg_scores, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need [n, L] and [m, L] scores, got {a.shape} and {b.shape}")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    ib = rng.integers(0, b.shape[0], size=(n_boot, b.shape[0]))
    return cohens_d_columns(a[ia], b[ib])


def profile_spearman(profiles: npt.ArrayLike, x: npt.ArrayLike | None = None) -> FloatArray:
    """Spearman correlation of each row of ``profiles`` [B, L] with ``x`` [L] (default 0..L-1).

    Columns where any row is ``nan`` are dropped for all rows (a layer without a
    value is not a layer of the trend); ``nan`` for a row or ``x`` that is constant
    after that, or when fewer than 2 columns remain. Average ranks for ties, as
    ``scipy.stats.spearmanr``.
    """
    y = np.asarray(profiles, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2:
        raise ValueError(f"profiles must be [B, L], got shape {y.shape}")
    xs = np.arange(y.shape[1], dtype=np.float64) if x is None else np.asarray(x, np.float64)
    if xs.shape != (y.shape[1],):
        raise ValueError(f"x must have {y.shape[1]} values, got shape {xs.shape}")
    keep = ~np.isnan(y).any(axis=0) & ~np.isnan(xs)
    if keep.sum() < 2:
        return np.full(y.shape[0], np.nan)
    ry = scipy.stats.rankdata(y[:, keep], axis=1)
    rx = scipy.stats.rankdata(xs[keep])
    ry = ry - ry.mean(axis=1, keepdims=True)
    rx = rx - rx.mean()
    den = np.sqrt((ry * ry).sum(axis=1) * float(rx @ rx))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (ry @ rx) / den
    return np.asarray(np.where(den > 0.0, rho, np.nan), dtype=np.float64)


def heldout_correct(
    directions: npt.ArrayLike,
    train_pos: npt.ArrayLike,
    train_neg: npt.ArrayLike,
    test_pos: npt.ArrayLike,
    test_neg: npt.ArrayLike,
) -> tuple[BoolArray, BoolArray]:
    """Per-prompt correctness of [L, d] directions at the train midpoint threshold.

    Activations are [n, L, d]. Returns ([n_test_pos, L], [n_test_neg, L]) booleans:
    a test pos prompt is correct when its projection is > the midpoint between the
    train class means, a neg prompt when it is <= (as :func:`evaluate_direction`, whose
    ``accuracy`` is the mean of both arrays together). Kept per prompt so accuracies
    of several methods or layers can be bootstrapped over the same prompts.
    """
    u = np.asarray(directions, dtype=np.float64)
    trp, trn = _as_3d(train_pos, "train_pos"), _as_3d(train_neg, "train_neg")
    tep, ten = _as_3d(test_pos, "test_pos"), _as_3d(test_neg, "test_neg")
    if u.ndim != 2 or any(a.shape[1:] != u.shape for a in (trp, trn, tep, ten)):
        raise ValueError("directions must be [L, d] matching the activations' [L, d]")
    thr = (project(trp, u).mean(axis=0) + project(trn, u).mean(axis=0)) / 2.0
    return (
        np.asarray(project(tep, u) > thr, dtype=np.bool_),
        np.asarray(project(ten, u) <= thr, dtype=np.bool_),
    )
