"""How much of a layer's harmful/harmless separation is wording: a matched-pairs control.

The usual contrast (AdvBench against a hand-written harmless set) differs in harm *and*
in how the prompts are written. Minimal pairs (``prompts.minimal_pairs()``) differ in
harm only. Score both contrasts on the same per-layer direction; what the direction
loses on the pairs is the part of its separation that wording alone produced.

Definitions, per layer, with d = Cohen's d of the projections (harmful minus harmless,
:func:`probes.directions.cohens_d_columns`):

* ``d_unmatched``: harmful prompts against the harmless set;
* ``d_matched``: harmful prompts against their own twins (pair i is row i of both);
* wording share = clip(1 - d_matched / d_unmatched, 0, 1), undefined (``nan``) unless
  d_unmatched is finite and > 0 (:func:`wording_share`);
* intervals: percentile bootstrap; the unmatched contrast resamples its harmful and
  harmless prompts separately (:func:`probes.directions.bootstrap_d_profile`), the
  matched one resamples whole pairs, and the share is computed on each replicate
  pair of the two. The two contrasts are resampled independently: when they share
  harmful prompts this ignores a positive covariance and widens the share's interval;
* status: ``no_separation`` when d_unmatched's interval reaches 0 (nothing to explain),
  ``wording_driven`` when d_unmatched is significant but d_matched's lower bound is at
  or below 0, ``survives_matching`` otherwise.

Example:
    rows = wording_control(pos_u, neg_u, pos_m, neg_m, n_boot=2000, seed=0)
    [r.layer for r in rows if r.wording_driven]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from probes.directions import bootstrap_d_profile, cohens_d_columns
from probes.stats import Estimate, FloatArray, percentile_interval, resample_within_groups

NULL_D = 0.0
"""Cohen's d of a direction that does not separate the two sides."""


class WordingStatus(StrEnum):
    """What a layer's separation is made of, judged on the intervals."""

    NO_SEPARATION = "no_separation"
    WORDING_DRIVEN = "wording_driven"
    SURVIVES_MATCHING = "survives_matching"


@dataclass(frozen=True)
class WordingRow:
    """One layer of the wording control; every estimate carries its bootstrap interval."""

    layer: int
    d_unmatched: Estimate
    d_matched: Estimate
    share: Estimate
    status: WordingStatus

    @property
    def wording_driven(self) -> bool:
        """The harmful/harmless separation is significant but vanishes on matched pairs."""
        return self.status is WordingStatus.WORDING_DRIVEN


def wording_share(d_unmatched: npt.ArrayLike, d_matched: npt.ArrayLike) -> FloatArray:
    """clip(1 - d_matched / d_unmatched, 0, 1), elementwise.

    ``nan`` where d_unmatched is not finite and > 0 (no separation to share out, or an
    infinite one whose ratio means nothing) or d_matched is ``nan``. A matched
    separation larger than the unmatched one gives 0; one reversed in sign gives 1.
    """
    du = np.asarray(d_unmatched, dtype=np.float64)
    dm = np.asarray(d_matched, dtype=np.float64)
    defined = np.isfinite(du) & (du > 0.0) & ~np.isnan(dm)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip(1.0 - dm / np.where(defined, du, 1.0), 0.0, 1.0)
    return np.asarray(np.where(defined, share, np.nan), dtype=np.float64)


def wording_control(
    unmatched_pos: npt.ArrayLike,
    unmatched_neg: npt.ArrayLike,
    matched_pos: npt.ArrayLike,
    matched_neg: npt.ArrayLike,
    *,
    layers: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int,
    conf: float = 0.95,
) -> list[WordingRow]:
    """Per-layer wording share and status from projection scores (module docstring).

    ``unmatched_pos`` [n, L] and ``unmatched_neg`` [m, L]: held-out harmful and
    harmless-set prompts; ``matched_pos`` and ``matched_neg`` [k, L]: held-out harmful
    prompts and their twins, row i a pair. All are projections on the same per-layer
    directions (fitted on training prompts only), larger meaning more harmful.
    ``layers`` names the L columns (default 0..L-1).
    """
    pu, nu = _scores(unmatched_pos, "unmatched_pos"), _scores(unmatched_neg, "unmatched_neg")
    pm, nm = _scores(matched_pos, "matched_pos"), _scores(matched_neg, "matched_neg")
    if pm.shape != nm.shape:
        raise ValueError(f"matched_pos {pm.shape} and matched_neg {nm.shape} must be aligned "
                         "pairs of the same shape")
    n_layers = pu.shape[1]
    if any(a.shape[1] != n_layers for a in (nu, pm)):
        raise ValueError("every score array must have the same number of layers (columns)")
    names = list(range(n_layers)) if layers is None else list(layers)
    if len(names) != n_layers:
        raise ValueError(f"layers names {len(names)} columns, the scores have {n_layers}")
    rng = np.random.default_rng(seed)
    boot_u = bootstrap_d_profile(pu, nu, n_boot=n_boot, seed=int(rng.integers(2**63)))
    pairs = resample_within_groups(np.zeros(pm.shape[0]), n_boot, rng)
    boot_m = cohens_d_columns(pm[pairs], nm[pairs])
    d_u, d_m = cohens_d_columns(pu, nu), cohens_d_columns(pm, nm)
    share, boot_share = wording_share(d_u, d_m), wording_share(boot_u, boot_m)
    sizes = (pu.shape[0] + nu.shape[0], 2 * pm.shape[0])
    rows = []
    for j, layer in enumerate(names):
        eu = _estimate(float(d_u[j]), boot_u[:, j], sizes[0], conf)
        em = _estimate(float(d_m[j]), boot_m[:, j], sizes[1], conf)
        es = _estimate(float(share[j]), boot_share[:, j], sum(sizes), conf)
        rows.append(WordingRow(layer, eu, em, es, _status(eu, em)))
    return rows


def _scores(x: npt.ArrayLike, name: str) -> FloatArray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"{name} must be [prompts, layers] with at least 2 prompts, "
                         f"got shape {a.shape}")
    return a


def _estimate(value: float, replicates: FloatArray, n: int, conf: float) -> Estimate:
    lo, hi = percentile_interval(replicates, conf)
    return Estimate(value, lo, hi, n, "bootstrap-percentile", conf)


def _status(d_unmatched: Estimate, d_matched: Estimate) -> WordingStatus:
    """Significance read off the intervals; an undefined (nan) bound counts as not
    significant, so an unstable layer is never called harm-driven."""
    if not d_unmatched.lo > NULL_D:
        return WordingStatus.NO_SEPARATION
    if not d_matched.lo > NULL_D or math.isnan(d_matched.value):
        return WordingStatus.WORDING_DRIVEN
    return WordingStatus.SURVIVES_MATCHING
