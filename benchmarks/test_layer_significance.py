"""Per-layer validation of refusal directions (seed 003), on held-out prompts.

The direction r_l = mu_H - mu_B is fitted on the train split (AdvBench vs the project's
harmless set) and tested on held-out prompts; in-sample figures are reported beside it only
for comparison with the seed, whose figures were in-sample.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from fixtures.workbench import Workbench
from probes.directions import LayerSignificance, layer_significance
from probes.stats import cohens_d


@cache
def _table(bench: Workbench) -> list[LayerSignificance]:
    harm_tr, safe_tr = bench.train_pair()
    harm_te, safe_te = bench.eval_pair()
    return layer_significance(
        bench.acts(harm_tr).numpy(), bench.acts(safe_tr).numpy(),
        bench.acts(harm_te).numpy(), bench.acts(safe_te).numpy(),
    )


def _d_interval(bench: Workbench, layer: int, n_boot: int) -> tuple[float, float]:
    """Bootstrap interval of held-out d at one layer (direction fixed from train)."""
    u = bench.refusal_directions.unit[layer].numpy()
    harm_te, safe_te = bench.eval_pair()
    a = bench.acts(harm_te, layers=[layer]).numpy()[:, 0] @ u
    b = bench.acts(safe_te, layers=[layer]).numpy()[:, 0] @ u
    rng = np.random.default_rng(bench.cfg.seed + layer)
    ia = rng.integers(0, len(a), size=(n_boot, len(a)))
    ib = rng.integers(0, len(b), size=(n_boot, len(b)))
    ds = np.array([cohens_d(a[i], b[j]) for i, j in zip(ia, ib, strict=True)])
    lo, hi = np.percentile(ds, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.claim("LAYER-VALID")
def test_layer_direction_is_valid(bench: Workbench, layer: int, measure) -> None:  # type: ignore[no-untyped-def]
    row = _table(bench)[layer]
    harm_te, safe_te = bench.eval_pair()
    bench.record_model(measure, harm_te, safe_te)
    lo, hi = _d_interval(bench, layer, bench.cfg.n_boot)
    measure.metric("cohens_d_heldout", row.cohens_d, ci=(lo, hi), n=len(harm_te) + len(safe_te))
    measure.metric("cohens_d_in_sample", row.cohens_d_in_sample)
    measure.metric("p_holm", row.p_holm)
    measure.metric("auc_heldout", row.auc)
    measure.check("LAYER-VALID", row.cohens_d, ci=(lo, hi), n=len(harm_te) + len(safe_te),
                  detail=f"Holm-adjusted p = {row.p_holm:.3g}")
