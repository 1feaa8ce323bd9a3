"""Causal localisation of the refusal layers (``probes.causal``).

Per informative layer l of ``--layers``: r̂_l projected out of the input of block l on held-out
harmful prompts (harmful *test* part), and r_l added there (alpha 1, the suite's raw unit) on
held-out harmless prompts (harmless *val* part), ``max(12, n_eval // 4)`` each, at most 12
evenly spaced layers (the deepest included). The outcome per
prompt is the first-token refusal score (log-odds of the refusal-opening tokens, one forward
pass; no reply is generated or judged). One-sided Wilcoxon signed-rank tests on the per-prompt
change, Holm-adjusted over both arms of every layer; a layer is causal when an arm is
significant and its mean change is at least ln 2 (the refusal odds halved or doubled). The
reference causal layer (largest mean
drop + mean rise among the causal layers) is where DETECTED_PROCEEDS and the per-token
monitor judge their claims, on prompts disjoint from these.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.workbench import Workbench
from probes.causal import ADD_ALPHA, record_causal_layers


@pytest.mark.claim("CAUSAL-LAYER-EXISTS")
def test_causal_layer_exists(bench: Workbench, measure: Any) -> None:
    causal = bench.causal_layers
    harm, safe = bench.causal_pair()
    bench.record_model(measure, harm, safe, *bench.train_pair())
    record_causal_layers(measure, causal)
    measure.metric("add_alpha (raw units)", ADD_ALPHA)
    if not causal.layers:
        measure.skip("CAUSAL-LAYER-EXISTS", causal.no_layer_reason() or "no layer tested")
    p = causal.min_p_holm
    best = causal.layers[int(causal.p_holm.argmin())]
    measure.metric("causal_p_holm_min", p, n=len(harm) + len(safe))
    measure.check("CAUSAL-LAYER-EXISTS", p, n=len(harm) + len(safe), label=f"layer {best}",
                  detail=f"{len(causal.causal_layers)} of {len(causal.layers)} layers causal "
                         f"(Holm over {2 * len(causal.layers)} one-sided signed-rank tests of "
                         f"the first-token refusal score; {len(harm)} harmful prompts ablated, "
                         f"{len(safe)} harmless steered); reference layer "
                         f"{causal.reference_layer}")
