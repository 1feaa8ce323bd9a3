"""Cross-layer alignment of a model's refusal directions: computed once, recorded alike.

Shared by the experiments that need it (the concept cone, DETECTED_PROCEEDS layer
localisation): call :func:`layer_alignment` for the numbers and
:func:`record_cross_layer` to put them in a report, instead of re-deriving either.
Definitions: docs/science.md, "DETECTED_PROCEEDS" (|cos| matrix of r̂_l, persistence, clusters
at |cos| >= 0.85); the function is :func:`probes.geometry.cross_layer_alignment`.

Layers whose r_l is zero (``resid_pre`` of layer 0 at the last token is the embedding of
the same template token for every prompt) have no direction and are left out; the
result says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.geometry import (
    ALIGNMENT_ABS_COS_THRESHOLD,
    CrossLayerAlignment,
    cross_layer_alignment,
    informative_layers,
)

__all__ = ["LayerAlignment", "layer_alignment", "record_cross_layer"]


@dataclass(frozen=True)
class LayerAlignment:
    """:class:`CrossLayerAlignment` over ``layers`` (its indices are positions in
    ``layers``); ``excluded`` layers had a zero direction."""

    layers: tuple[int, ...]
    excluded: tuple[int, ...]
    alignment: CrossLayerAlignment

    @property
    def clusters(self) -> tuple[tuple[int, int], ...]:
        """Clusters as (first layer, last layer), in model layer numbers."""
        return tuple((self.layers[s], self.layers[e]) for s, e in self.alignment.clusters)

    @property
    def settling_layer(self) -> int:
        """First layer of the last cluster: from here to the top every pair of layer
        directions has |cos| >= the threshold (where the representation settles)."""
        return self.clusters[-1][0]

    def persistence(self) -> dict[int, int]:
        return dict(zip(self.layers, self.alignment.persistence.tolist(), strict=True))


def layer_alignment(
    raw: np.ndarray, model_name: str, threshold: float = ALIGNMENT_ABS_COS_THRESHOLD
) -> LayerAlignment:
    """Cross-layer alignment of the per-layer refusal directions ``raw`` [L, d] of
    ``model_name`` (resid_pre, last token, train split), at ``threshold``."""
    keep = informative_layers(raw)
    if len(keep) < 2:
        raise ValueError(f"{model_name}: fewer than two layers have a refusal direction")
    excluded = tuple(i for i in range(raw.shape[0]) if i not in keep)
    return LayerAlignment(tuple(keep), excluded, cross_layer_alignment(raw[keep], threshold))


def record_cross_layer(measure: Any, la: LayerAlignment, prefix: str = "cross_layer") -> None:
    """Record the |cos| heatmap, persistence per layer, clusters and summary metrics."""
    cla = la.alignment
    n = len(la.layers)
    names = [f"L{i}" for i in la.layers]
    adjacent = np.array([cla.abs_cos[i, i + 1] for i in range(n - 1)])
    sizes = [end - start + 1 for start, end in cla.clusters]
    measure.metric(f"{prefix}/threshold", cla.threshold)
    measure.metric(f"{prefix}/layers_analysed", n)
    measure.metric(f"{prefix}/layers_excluded_zero_direction", len(la.excluded))
    measure.metric(f"{prefix}/n_clusters", len(cla.clusters), n=n)
    measure.metric(f"{prefix}/largest_cluster_size", max(sizes), units="layers")
    measure.metric(f"{prefix}/settling_layer", la.settling_layer)
    measure.metric(f"{prefix}/mean_persistence", float(cla.persistence.mean()), units="layers")
    measure.metric(f"{prefix}/mean_adjacent_abs_cos", float(adjacent.mean()), n=n - 1)
    measure.plot(f"{prefix}/abs_cos", "heatmap", matrix=cla.abs_cos.tolist(), xlabels=names,
                 ylabels=names, vmin=0.0, vmax=1.0, clabel="|cos|",
                 title=f"|cos| between per-layer refusal directions (clusters at >= "
                       f"{cla.threshold:g})")
    measure.plot(f"{prefix}/persistence", "line", x=list(la.layers),
                 series={"persistence": cla.persistence.tolist()},
                 xlabel="layer", ylabel="following layers with |cos| >= threshold",
                 title="Persistence of each layer's refusal direction")
    measure.table(f"{prefix}/clusters", ["first layer", "last layer", "layers",
                                         "min |cos| inside"],
                  [[la.layers[s], la.layers[e], e - s + 1,
                    float(cla.abs_cos[s : e + 1, s : e + 1].min())] for s, e in cla.clusters])
    if la.excluded:
        measure.table(f"{prefix}/excluded_layers", ["layer", "reason"],
                      [[i, "zero refusal direction (identical activations)"]
                       for i in la.excluded])
