"""Cross-group transfer of a refusal direction: fit on one group, test on every group.

:func:`cross_matrix` fits one direction per group (topic, harm category or language) and
scores it on every group's held-out prompts, with a bootstrap interval of the drop from
same-group to cross-group balanced accuracy; the helpers split prompt sets into groups.

Example:
    names, vary_train, vary_test, grp = split_by_label(train, test, "topic", tr, te)
    m = cross_matrix("topic", "probe", 12, names, vary_train, vary_test, grp, ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from probes import directions as D
from probes.directions import Method
from probes.stats import Estimate, FloatArray, IntArray, percentile_interval, resample_within_groups
from prompts import PromptSet

MIN_GROUP = 5  # fewer prompts in a train or test cell is not a measurement
LANGUAGES = ("en", "es", "fr", "de", "zh")


@dataclass(frozen=True)
class CrossMatrix:
    """Train-group x test-group transfer of one method at one layer."""

    kind: str
    groups: list[str]
    method: Method
    layer: int
    balanced: FloatArray  # [G, G] balanced accuracy, rows = fitted on, columns = tested on
    vary: FloatArray  # [G, G] accuracy on the varying class only
    fixed: FloatArray  # [G] accuracy on the fixed class, per fitted fold
    drop: Estimate  # mean diagonal - mean off-diagonal of ``balanced``
    vary_scores: FloatArray  # [G, Nv] projections of the varying class's test prompts
    fixed_scores: FloatArray  # [G, Nf]
    vary_group: IntArray  # [Nv]
    thresholds: FloatArray  # [G] midpoint between the fold's train class means
    n_train: list[int]
    n_test: list[int]


def _fit_fold(method: Method, vt: FloatArray, fixed_train: FloatArray, vary_is_pos: bool,
              seed: int) -> tuple[FloatArray, float]:
    """One fold's direction and its threshold (midpoint between the train class means)."""
    pos, neg = (vt, fixed_train) if vary_is_pos else (fixed_train, vt)
    u = D.fit_direction(method, pos, neg, seed=seed)
    return u, (float((pos @ u).mean()) + float((neg @ u).mean())) / 2.0


def _fold_correct(method: Method, vary_train: list[FloatArray], vary_test: FloatArray,
                  fixed_train: FloatArray, fixed_test: FloatArray, vary_is_pos: bool,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per fold, held-out correctness of the varying and the fixed class ([G, Nv], [G, Nf])."""
    g = len(vary_train)
    cv = np.empty((g, len(vary_test)), dtype=bool)
    cf = np.empty((g, len(fixed_test)), dtype=bool)
    for i, vt in enumerate(vary_train):
        u, thr = _fit_fold(method, vt, fixed_train, vary_is_pos, seed + i)
        sv, sf = vary_test @ u, fixed_test @ u
        cv[i] = sv > thr if vary_is_pos else sv <= thr
        cf[i] = sf <= thr if vary_is_pos else sf > thr
    return cv, cf


def _resampled_training(vary_train: list[FloatArray], fixed_train: FloatArray,
                        rng: np.random.Generator) -> tuple[list[FloatArray], FloatArray]:
    """Training prompts drawn with replacement within each group and the fixed class."""
    vt = [v[rng.integers(0, len(v), size=len(v))] for v in vary_train]
    return vt, fixed_train[rng.integers(0, len(fixed_train), size=len(fixed_train))]


def cross_matrix(
    kind: str,
    method: Method,
    layer: int,
    groups: list[str],
    vary_train: list[FloatArray],
    vary_test: FloatArray,
    vary_group: IntArray,
    fixed_train: FloatArray,
    fixed_test: FloatArray,
    *,
    vary_is_pos: bool,
    n_boot: int,
    seed: int,
    n_refit: int = 0,
) -> CrossMatrix:
    """Fit one direction per group (varying class from that group, fixed class whole) and
    test it on every group's held-out prompts; bootstrap the diagonal-minus-off-diagonal
    drop over the held-out prompts. With ``n_refit`` > 0 the folds are also refitted on
    that many resamples of the training prompts and replicate b uses refit b mod n_refit,
    so the interval includes the variance of the fit."""
    g = len(groups)
    sv = np.empty((g, len(vary_test)))
    sf = np.empty((g, len(fixed_test)))
    thresholds = np.empty(g)
    for i, vt in enumerate(vary_train):
        u, thresholds[i] = _fit_fold(method, vt, fixed_train, vary_is_pos, seed + i)
        sv[i], sf[i] = vary_test @ u, fixed_test @ u
    cv, cf = _fold_correct(method, vary_train, vary_test, fixed_train, fixed_test,
                           vary_is_pos, seed)
    onehot = (vary_group[:, None] == np.arange(g)[None, :]).astype(float)
    onehot /= onehot.sum(axis=0, keepdims=True)
    vary = cv.astype(float) @ onehot  # [G, G]
    fixed = cf.mean(axis=1)
    balanced = 0.5 * fixed[:, None] + 0.5 * vary
    rng = np.random.default_rng(seed)
    idx_f = rng.integers(0, len(fixed_test), size=(n_boot, len(fixed_test)))
    idx_v = resample_within_groups(vary_group, n_boot, rng)
    fits = [(cv, cf)]
    refit_rng = np.random.default_rng([seed, 1])
    for r in range(n_refit):
        vt_r, ft_r = _resampled_training(vary_train, fixed_train, refit_rng)
        fits.append(_fold_correct(method, vt_r, vary_test, ft_r, fixed_test, vary_is_pos,
                                  seed + 1000 * (r + 1)))
    if n_refit:
        fits = fits[1:]
    cv_all = np.stack([f[0] for f in fits])  # [R, G, Nv]
    cf_all = np.stack([f[1] for f in fits])  # [R, G, Nf]
    which = np.arange(n_boot) % len(fits)
    fb = np.take_along_axis(cf_all[which], idx_f[:, None, :], axis=2).mean(axis=-1)  # [B, G]
    vb = np.take_along_axis(cv_all[which], idx_v[:, None, :], axis=2).astype(float) @ onehot
    mb = 0.5 * fb[..., None] + 0.5 * vb  # [B, G, G]
    drops = np.array([diagonal_drop(mb[b]) for b in range(n_boot)])
    lo, hi = percentile_interval(drops)
    how = "bootstrap-percentile" + (f", refitting on {n_refit} training resamples"
                                    if n_refit else "")
    drop = Estimate(diagonal_drop(balanced), lo, hi, len(vary_test) + len(fixed_test), how)
    return CrossMatrix(kind, groups, method, layer, balanced, vary, fixed, drop, sv, sf,
                       vary_group, thresholds, [len(v) for v in vary_train],
                       [int((vary_group == j).sum()) for j in range(g)])


def diagonal_drop(m: FloatArray) -> float:
    """Mean diagonal minus mean off-diagonal of a square transfer matrix."""
    g = m.shape[0]
    off = ~np.eye(g, dtype=bool)
    return float(np.mean(np.diag(m)) - np.mean(m[off]))


def groups_with_min_size(train: PromptSet, test: PromptSet, label: str
                         ) -> tuple[list[str], list[str]]:
    """Groups with >= MIN_GROUP prompts in both splits, and the rest (to pool)."""
    ok: list[str] = []
    rest: list[str] = []
    for v in sorted(set(train.label(label)) | set(test.label(label))):
        n_tr, n_te = train.label(label).count(v), test.label(label).count(v)
        (ok if min(n_tr, n_te) >= MIN_GROUP else rest).append(v)
    return ok, rest


def split_by_label(
    train: PromptSet, test: PromptSet, label: str, tr: FloatArray, te: FloatArray
) -> tuple[list[str], list[FloatArray], FloatArray, IntArray]:
    """Group names, per-group training rows of ``tr`` and the held-out rows of ``te`` with
    their group index, by ``label``; small groups are pooled into "other" if large enough."""
    ok, rest = groups_with_min_size(train, test, label)
    mapping = {v: i for i, v in enumerate(ok)}
    names = list(ok)
    if rest:
        n_tr = sum(train.label(label).count(v) for v in rest)
        n_te = sum(test.label(label).count(v) for v in rest)
        if min(n_tr, n_te) >= MIN_GROUP:
            mapping.update({v: len(names) for v in rest})
            names.append(f"other ({len(rest)} categories)")
    lab_tr = np.array([mapping.get(v, -1) for v in train.label(label)])
    lab_te = np.array([mapping.get(v, -1) for v in test.label(label)])
    vary_train = [tr[lab_tr == i] for i in range(len(names))]
    keep = lab_te >= 0
    return names, vary_train, te[keep], lab_te[keep].astype(np.int64)


def parallel_set(harmless: PromptSet) -> PromptSet:
    """The harmless prompts whose translation group exists in every language."""
    langs: dict[str, set[str]] = {}
    for grp, lang in zip(harmless.label("group"), harmless.label("language"), strict=True):
        langs.setdefault(grp, set()).add(lang)
    idx = [i for i, grp in enumerate(harmless.label("group")) if langs[grp] >= set(LANGUAGES)]
    return harmless.subset(idx, "harmless/parallel")


def group_split(ps: PromptSet, seed: int) -> tuple[set[str], set[str]]:
    """Translation groups halved into train / test, stratified by topic (seeded)."""
    by_topic: dict[str, list[str]] = {}
    for grp, topic in sorted(set(zip(ps.label("group"), ps.label("topic"), strict=True))):
        by_topic.setdefault(topic, []).append(grp)
    rng = np.random.default_rng(seed)
    train: set[str] = set()
    for topic in sorted(by_topic):
        groups = by_topic[topic]
        train.update(rng.permutation(groups)[: len(groups) // 2].tolist())
    return train, set(ps.label("group")) - train


def record_matrix(measure: Any, m: CrossMatrix, seed_note: str) -> None:
    """Record the transfer heatmap, both matrices and the drop metrics of ``m``."""
    title = (f"{m.method} @ layer {m.layer}: balanced accuracy, fitted on (rows) x tested on "
             f"(columns) {m.kind}")
    measure.plot(f"{m.kind} transfer, {m.method}", "heatmap", matrix=m.balanced.tolist(),
                 xlabels=m.groups, ylabels=m.groups, vmin=0.5, vmax=1.0, annotate=True,
                 clabel="balanced accuracy", xlabel=f"tested on {m.kind}",
                 ylabel=f"fitted on {m.kind}", title=title)
    measure.table(f"{m.kind} transfer matrix, {m.method} @ layer {m.layer} ({seed_note})",
                  ["fitted on \\ tested on", *m.groups, "n fit", "fixed-class accuracy"],
                  [[g, *m.balanced[i].tolist(), m.n_train[i], float(m.fixed[i])]
                   for i, g in enumerate(m.groups)])
    measure.table(f"{m.kind} transfer, {m.method}: accuracy on the varying class only",
                  ["fitted on \\ tested on", *m.groups],
                  [[g, *m.vary[i].tolist()] for i, g in enumerate(m.groups)])
    off = ~np.eye(len(m.groups), dtype=bool)
    measure.metric(f"{m.method}/same_group_accuracy", float(np.mean(np.diag(m.balanced))))
    measure.metric(f"{m.method}/cross_group_accuracy", float(np.mean(m.balanced[off])))
    measure.metric(f"{m.method}/drop", m.drop.value, ci=(m.drop.lo, m.drop.hi), n=m.drop.n)
    measure.metric(f"{m.method}/varying_class_drop", diagonal_drop(m.vary))
