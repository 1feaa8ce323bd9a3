"""The alignment imprint of one model with bootstrap intervals, from its activations.

Six features of the per-layer refusal directions (:data:`probes.geometry.IMPRINT_FEATURES`),
computed on the layers that have a direction, each with a basic bootstrap interval clipped
to the feature's range (:data:`LIMITS`).

Example:
    imp = imprint_of(harmful_acts, harmless_acts, n_boot=1000, seed=0)
    imp.intervals["gini"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from probes.geometry import (
    IMPRINT_FEATURES,
    AlignmentImprint,
    alignment_imprint,
    alignment_imprint_replicates,
    bootstrap_interval,
    informative_layers,
)

LIMITS = {"gini": (0.0, 1.0), "smoothness": (0.0, 1.0), "tail_bias": (0.0, 1.0),
          "orthogonality": (0.0, 1.0), "effective_rank": (1.0, math.inf),
          "spectral_decay": (0.0, math.inf)}


@dataclass(frozen=True)
class Imprint:
    """Imprint features, their bootstrap replicates and intervals, and the layers used."""

    layers: tuple[int, ...]  # layers with a direction
    excluded: tuple[int, ...]
    features: AlignmentImprint
    replicates: dict[str, np.ndarray]  # [n_boot] per feature
    intervals: dict[str, tuple[float, float]]  # basic bootstrap
    n_harmful: int
    n_harmless: int

    def vector(self, names: tuple[str, ...]) -> np.ndarray:
        return np.array([float(getattr(self.features, f)) for f in names])

    def replicate_matrix(self, names: tuple[str, ...]) -> np.ndarray:  # [n_boot, F]
        return np.stack([self.replicates[f] for f in names], axis=1)


def imprint_of(h: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> Imprint:
    """The imprint of harmful ``h`` and harmless ``b`` activations, both [n, L, d]; layers
    whose mean difference is zero are left out (and listed as ``excluded``)."""
    keep = informative_layers(h.mean(axis=0) - b.mean(axis=0))
    excluded = tuple(i for i in range(h.shape[1]) if i not in keep)
    n_harmful, n_harmless = h.shape[0], b.shape[0]
    h, b = h[:, keep], b[:, keep]
    obs = alignment_imprint(h.mean(axis=0) - b.mean(axis=0))
    reps = alignment_imprint_replicates(h, b, n_boot=n_boot, seed=seed)
    intervals = {f: bootstrap_interval(float(getattr(obs, f)), reps[f], kind="basic",
                                       limits=LIMITS[f]) for f in IMPRINT_FEATURES}
    return Imprint(tuple(keep), excluded, obs, reps, intervals, n_harmful, n_harmless)
