"""The layer experiment's wording control on planted activations: a layer that carries only
a style feature (shared by harmful requests and their twins, absent from the harmless set)
is flagged wording-driven; a layer that carries a harm feature is not. The arrays go
through the same path the experiment uses (site_analysis -> site_wording -> layer_table)."""

from __future__ import annotations

import numpy as np

from probes.layer_analysis import (
    LAYER_COLUMNS,
    WORDING_COLUMNS,
    layer_table,
    site_analysis,
    site_wording,
    wording_driven_layers,
)
from probes.wording import WordingStatus
from reports.plots import render_plot

D_MODEL = 6
LAYERS = [0, 1, 2, 3]  # 0: no direction; 1: style only; 2: harm only; 3: both


def _acts(rng: np.random.Generator, n: int, style: float, harm: float) -> np.ndarray:
    """[n, 4 layers, d]: noise plus the planted features of each layer."""
    x = rng.normal(size=(n, len(LAYERS), D_MODEL))
    x[:, 0] = 0.0  # every prompt alike: no direction at this layer
    x[:, 1, 0] += 3.0 * style
    x[:, 2, 1] += 3.0 * harm
    x[:, 3, 0] += 3.0 * style
    x[:, 3, 1] += 3.0 * harm
    return x


def _planted(seed: int = 0) -> tuple[list, object]:
    rng = np.random.default_rng(seed)
    harmful = {"style": 1.0, "harm": 1.0}
    twin = {"style": 1.0, "harm": 0.0}
    harmless_set = {"style": 0.0, "harm": 0.0}
    # directions fitted on the unmatched contrast, where wording and harm are confounded
    trp, trn = _acts(rng, 60, **harmful), _acts(rng, 60, **harmless_set)
    tep, ten = _acts(rng, 50, **harmful), _acts(rng, 50, **harmless_set)
    a = site_analysis("resid_pre", LAYERS, len(LAYERS), trp, trn, tep, ten, n_boot=300, seed=1)
    pm, nm = _acts(rng, 50, **harmful), _acts(rng, 50, **twin)
    return site_wording(a, (tep, ten), (pm, nm), n_boot=300, seed=2), a


def test_style_layer_is_wording_driven_and_harm_layer_is_not() -> None:
    rows, _ = _planted()
    assert rows[0] is None  # no direction: no wording control either
    style, harm, both = rows[1], rows[2], rows[3]
    assert style is not None and harm is not None and both is not None
    assert style.status is WordingStatus.WORDING_DRIVEN
    assert style.d_unmatched.lo > 1.0 and style.d_matched.lo <= 0.0
    assert style.share.value > 0.8
    assert harm.status is WordingStatus.SURVIVES_MATCHING
    assert harm.d_matched.lo > 1.0 and harm.share.hi < 0.5
    assert both.status is WordingStatus.SURVIVES_MATCHING
    assert 0.2 < both.share.value < 0.8  # half of the fitted direction is style
    assert wording_driven_layers(rows) == [1]


def test_layer_table_marks_wording_driven_layers() -> None:
    rows, a = _planted()
    table = layer_table(a, rows)  # type: ignore[arg-type]
    assert all(len(r) == len(LAYER_COLUMNS) + len(WORDING_COLUMNS) for r in table)
    validity = LAYER_COLUMNS.index("validity (p Holm < 0.01, |d| > 0.5)")
    status = len(LAYER_COLUMNS) + WORDING_COLUMNS.index("wording control")
    assert table[0][validity] == "no direction" and table[0][status] == "no direction"
    assert "WORDING-DRIVEN" in table[1][validity] and table[1][status] == "wording_driven"
    assert "WORDING-DRIVEN" not in table[2][validity]
    assert table[2][status] == "survives_matching"
    assert len(layer_table(a)[0]) == len(LAYER_COLUMNS)  # without the control: as before


def test_profile_plot_draws_both_curves_and_marks() -> None:
    plot = {"kind": "line", "data": {
        "x": [1, 2, 3], "series": {"unmatched": [2.0, 2.5, 3.0], "matched": [0.0, 2.4, 1.5]},
        "bands": {"matched": [[-0.3, 2.0, 1.0], [0.3, 2.8, 2.0]]},
        "marks": [["unmatched", [1], "wording-driven layer"]]}}
    uri, error = render_plot(plot)
    assert error is None and uri is not None and uri.startswith("data:image/svg+xml")
    bad = {"kind": "line", "data": {**plot["data"], "marks": [["nope", [1], "x"]]}}
    uri, error = render_plot(bad)
    assert uri is None and error is not None and "marks" in error
