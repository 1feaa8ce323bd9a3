"""probes.transfer: the cross-group matrix by brute force, and the translation-group split."""

from __future__ import annotations

import numpy as np
import pytest

from probes import directions as D
from probes.transfer import cross_matrix, group_split, parallel_set
from prompts import PromptSet


def _grouped_data(seed: int, confound: float) -> dict[str, object]:
    """Three groups of the varying (neg) class; with ``confound`` each group is shifted
    along its own axis, so a direction fitted on one group transfers worse."""
    rng = np.random.default_rng(seed)
    d = 12
    axis = D.unit(rng.standard_normal(d))
    group_axes = D.unit(rng.standard_normal((3, d)))
    pos_tr = rng.standard_normal((40, d)) + 2.5 * axis
    pos_te = rng.standard_normal((40, d)) + 2.5 * axis
    vary_tr = [rng.standard_normal((15, d)) + confound * group_axes[g] for g in range(3)]
    grp = np.repeat(np.arange(3), 15)
    vary_te = rng.standard_normal((45, d)) + confound * group_axes[grp]
    return {"vary_train": vary_tr, "vary_test": vary_te, "grp": grp.astype(np.int64),
            "fixed_train": pos_tr, "fixed_test": pos_te}


def test_cross_matrix_by_brute_force() -> None:
    data = _grouped_data(9, confound=3.0)
    m = cross_matrix("g", "mean_diff", 0, ["a", "b", "c"], data["vary_train"],  # type: ignore[arg-type]
                     data["vary_test"], data["grp"], data["fixed_train"],  # type: ignore[arg-type]
                     data["fixed_test"], vary_is_pos=False, n_boot=300, seed=0)  # type: ignore[arg-type]
    pos_tr, pos_te = data["fixed_train"], data["fixed_test"]
    for i, vt in enumerate(data["vary_train"]):  # type: ignore[arg-type]
        u = D.fit_direction("mean_diff", pos_tr, vt, seed=0)  # type: ignore[arg-type]
        for j in range(3):
            neg_te = data["vary_test"][data["grp"] == j]  # type: ignore[index]
            e = D.evaluate_direction(u, pos_tr, vt, pos_te, neg_te)  # type: ignore[arg-type]
            assert m.balanced[i, j] == pytest.approx(e.balanced_accuracy)
    off = ~np.eye(3, dtype=bool)
    assert m.drop.value == pytest.approx(np.diag(m.balanced).mean() - m.balanced[off].mean())
    # One class fixed: the balanced-accuracy drop is half the varying class's drop.
    vary_drop = np.diag(m.vary).mean() - m.vary[off].mean()
    assert m.drop.value == pytest.approx(vary_drop / 2)
    assert m.drop.lo <= m.drop.value <= m.drop.hi
    assert m.drop.value > 0.05  # confounded groups transfer worse
    clean = _grouped_data(9, confound=0.0)
    m0 = cross_matrix("g", "mean_diff", 0, ["a", "b", "c"], clean["vary_train"],  # type: ignore[arg-type]
                      clean["vary_test"], clean["grp"], clean["fixed_train"],  # type: ignore[arg-type]
                      clean["fixed_test"], vary_is_pos=False, n_boot=300, seed=0)  # type: ignore[arg-type]
    assert m0.drop.lo < 0.0 < m0.drop.hi or abs(m0.drop.value) < 0.05


def test_group_split_keeps_translations_together() -> None:
    rows = [(g, lg, t) for t in ("a", "b") for g in (f"{t}1", f"{t}2", f"{t}3", f"{t}4")
            for lg in ("en", "es", "fr", "de", "zh")]
    rows.append(("solo", "en", "a"))  # English only: not part of the parallel set
    ps = PromptSet("h", tuple(f"{g}-{lg}" for g, lg, _ in rows),
                   {"group": tuple(r[0] for r in rows), "language": tuple(r[1] for r in rows),
                    "topic": tuple(r[2] for r in rows)})
    par = parallel_set(ps)
    assert len(par) == 40
    train, test = group_split(par, seed=0)
    assert not train & test
    assert train | test == set(par.label("group"))
    assert sum(g.startswith("a") for g in train) == 2  # stratified by topic
    assert group_split(par, seed=0) == (train, test)
