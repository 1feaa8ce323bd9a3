"""Per-layer significance of the mean-difference refusal direction at one capture site.

:func:`site_analysis` fits r_l on training activations of every analysed layer, tests it on
held-out ones (Welch t, Holm over layers, Cohen's d with a bootstrap interval) and keeps
the projections; :func:`probe_correct` scores a per-layer probe on the same prompts;
:func:`site_wording` scores the same directions on unmatched and on matched held-out
prompts (:func:`probes.wording.wording_control`). Layers where every prompt has the same
activation have no direction and stay as rows.

Example:
    a = site_analysis("resid_pre", layers, n_layers, trp, trn, tep, ten, n_boot=1000, seed=0)
    rows = layer_table(a)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes import directions as D
from probes.capture import Site
from probes.directions import LayerSignificance
from probes.stats import FloatArray, percentile_interval
from probes.wording import WordingRow, WordingStatus, wording_control

SITES: tuple[Site, ...] = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class SiteAnalysis:
    """Per-layer significance of the mean-difference direction at one site."""

    site: Site
    layers: list[int]  # analysed layers (--layers), model indices
    n_layers: int  # the model's depth
    rows: list[LayerSignificance]  # one per analysed layer (Holm over these)
    constant: np.ndarray  # [k] bool: every prompt has the same activation
    d_boot: FloatArray  # [n_boot, k] held-out d per bootstrap replicate (nan if constant)
    pos_scores: FloatArray  # [n_pos_test, k] projections of held-out harmful prompts
    neg_scores: FloatArray  # [n_neg_test, k]
    n_test: int
    units: FloatArray  # [k, d] unit directions (nan rows where constant)

    @property
    def d(self) -> FloatArray:
        return np.array([r.cohens_d for r in self.rows])

    def d_ci(self, i: int) -> tuple[float, float]:
        return percentile_interval(self.d_boot[:, i]) if not self.constant[i] else (
            math.nan, math.nan)


def constant_detail(a: SiteAnalysis, layer: int) -> str:
    """Why ``layer`` of ``a`` has no direction, for a report."""
    why = ("the last prompt token is the chat template's final token, the same for every "
           "prompt, and resid_pre of block 0 is its embedding"
           if (a.site, layer) == ("resid_pre", 0) else "the capture does not depend on the prompt")
    return (f"no direction at {a.site} layer {layer}: every prompt has the same activation "
            f"({why}), so r_l = 0 and d, t, p are undefined; this capture cannot validate the "
            "layer")


LAYER_COLUMNS = ["layer", "||r_l||", "Welch t", "p", "p Holm", "d", "d lo", "d hi",
                 "d in-sample", "AUC", "validity (p Holm < 0.01, |d| > 0.5)"]
WORDING_COLUMNS = ["d unmatched", "d unmatched lo", "d matched", "d matched lo",
                   "wording share", "share lo", "share hi", "wording control"]


def layer_table(a: SiteAnalysis, wording: list[WordingRow | None] | None = None
                ) -> list[list[Any]]:
    """One report row per analysed layer: norm, t, p, Holm p, d with interval, AUC and,
    given ``wording`` (:func:`site_wording`), the wording control beside them (columns
    :data:`WORDING_COLUMNS`); a wording-driven layer's validity is marked as such."""
    out = []
    for i, (layer, r) in enumerate(zip(a.layers, a.rows, strict=True)):
        lo, hi = a.d_ci(i)
        validity = "no direction" if a.constant[i] else ("valid" if r.valid else "not valid")
        row: list[Any] = [layer, r.norm, r.t, r.p, r.p_holm, r.cohens_d, lo, hi,
                          r.cohens_d_in_sample, r.auc, validity]
        if wording is not None:
            w = wording[i]
            if w is not None and w.wording_driven:
                row[-1] = f"{validity}; WORDING-DRIVEN"
            row += wording_cells(w)
        out.append(row)
    return out


def wording_cells(w: WordingRow | None) -> list[Any]:
    """The :data:`WORDING_COLUMNS` of one layer (nan and "no direction" without one)."""
    if w is None:
        return [math.nan] * 7 + ["no direction"]
    return [w.d_unmatched.value, w.d_unmatched.lo, w.d_matched.value, w.d_matched.lo,
            w.share.value, w.share.lo, w.share.hi, str(w.status)]


def site_wording(a: SiteAnalysis, unmatched: tuple[FloatArray, FloatArray],
                 matched: tuple[FloatArray, FloatArray], *, n_boot: int, seed: int,
                 conf: float = 0.95) -> list[WordingRow | None]:
    """The wording control of ``a``'s directions at every analysed layer (None where the
    layer has no direction): ``unmatched`` = held-out (harmful, harmless-set) activations
    and ``matched`` = held-out (harmful, twin) activations [n, k, d], row i of both
    matched arrays a pair."""
    keep = np.flatnonzero(~a.constant)
    out: list[WordingRow | None] = [None] * len(a.layers)
    if not len(keep):
        return out
    u = a.units[keep]
    scores = [D.project(x[:, keep], u) for x in (*unmatched, *matched)]
    rows = wording_control(*scores, layers=[a.layers[i] for i in keep], n_boot=n_boot,
                           seed=seed, conf=conf)
    for i, row in zip(keep, rows, strict=True):
        out[i] = row
    return out


def wording_driven_layers(rows: list[WordingRow | None]) -> list[int]:
    """The layers whose separation vanishes on matched pairs."""
    return [r.layer for r in rows if r is not None and r.status is WordingStatus.WORDING_DRIVEN]


def pooled_mean(a: FloatArray, b: FloatArray) -> float:
    """Mean over all prompts of both classes (accuracy's weighting)."""
    return float((a.sum() + b.sum()) / (a.size + b.size))


def site_analysis(site: Site, layers: list[int], n_layers: int, trp: FloatArray,
                  trn: FloatArray, tep: FloatArray, ten: FloatArray, *, n_boot: int,
                  seed: int) -> SiteAnalysis:
    """Significance of r_l at ``site`` from train and held-out activations [n, k, d] of the
    analysed ``layers``; ``seed`` drives the bootstrap of held-out d."""
    rows = D.layer_significance(trp, trn, tep, ten)
    constant = D.constant_layers(trp, trn, tep, ten)
    r = D.mean_diff_per_layer(trp, trn)
    norm = np.linalg.norm(r, axis=1, keepdims=True)
    u = np.where(constant[:, None], np.nan, r / np.where(norm == 0.0, 1.0, norm))
    pos, neg = D.project(tep, u), D.project(ten, u)
    boot = D.bootstrap_d_profile(pos, neg, n_boot=n_boot, seed=seed)
    return SiteAnalysis(site, list(layers), n_layers, rows, constant, boot,
                        pos, neg, len(tep) + len(ten), u)


def probe_correct(trp: FloatArray, trn: FloatArray, tep: FloatArray, ten: FloatArray,
                  constant: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out per-prompt correctness [n, k] of a probe fitted per layer (nan where the
    layer is ``constant``)."""
    keep = np.flatnonzero(~constant)
    u = D.fit_direction_per_layer("probe", trp[:, keep], trn[:, keep], seed=seed)
    cp_k, cn_k = D.heldout_correct(u, trp[:, keep], trn[:, keep], tep[:, keep], ten[:, keep])
    cp = np.full((len(tep), len(constant)), np.nan)
    cn = np.full((len(ten), len(constant)), np.nan)
    cp[:, keep], cn[:, keep] = cp_k, cn_k
    return cp, cn
