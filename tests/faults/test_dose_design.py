"""Faults around the adaptive dose design of the dose-response sweeps: an unknown design,
a grid too small for a coarse grid plus one dose, a coarse grid on which nothing is
located, fits whose intervals never close, and the sweep on a tiny model. Each test
performs the fault and asserts the clear error, the fallback to the grid with its reason,
or the budget that holds."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.options import PROFILES, parse_alphas, parse_layers
from fixtures.workbench import BenchConfig, Progress, Workbench
from probes import dose_design as dd
from probes.cache import ActivationCache
from probes.models import LoadedModel, load

ROOT = Path(__file__).resolve().parents[2]
FULL = tuple(round(-2.0 + 0.25 * i, 10) for i in range(17))  # the full profile's raw grid
QUICK = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)  # the quick profile's raw grid


def side_cost(alpha: float) -> int:
    """Replies per dose as in the raw sweep: 20 + 20 prompts, and 20 alarming at alpha >= 0."""
    return 60 if alpha >= 0.0 else 40


class Recorder:
    """``observe`` and ``targets_of`` callbacks that log every call."""

    def __init__(self, targets: Any) -> None:
        self.calls: list[list[float]] = []
        self.tried: set[float] = set()
        self.make_targets = targets

    def observe(self, doses: list[float]) -> None:
        self.calls.append(list(doses))
        self.tried.update(doses)

    def targets_of(self, doses: tuple[float, ...]) -> list[dd.Target]:
        assert set(doses) <= self.tried, "a fit read a dose that was never generated"
        result: list[dd.Target] = self.make_targets(doses)
        return result


def test_unknown_design_is_a_clear_error() -> None:
    with pytest.raises(dd.DoseDesignError, match="unknown dose design 'banana'") as info:
        dd.check_design("banana")
    assert "adaptive" in info.value.hint and "grid" in info.value.hint


@pytest.fixture
def this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester subprocesses import the plugins of this checkout, not of an installed copy."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def test_unknown_design_option_is_a_usage_error(pytester: pytest.Pytester,
                                                this_checkout: None) -> None:
    pytester.makeconftest('pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n')
    pytester.makepyfile(test_b="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess("--dose-design", "banana", "--no-report",
                                           "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = result.stderr.str() + result.stdout.str()
    assert "--dose-design" in out and "adaptive" in out and "grid" in out
    assert "Traceback" not in out


def test_profiles_choose_their_design() -> None:
    # adaptive is opt-in: it misses its coverage target in the planted-curve simulation
    assert PROFILES["full"].dose_design == "grid"
    assert PROFILES["quick"].dose_design == "grid"
    for profile in PROFILES.values():
        dd.check_design(profile.dose_design)


def test_grid_too_small_for_a_coarse_grid_plus_one_dose_falls_back_to_the_grid() -> None:
    rec = Recorder(lambda doses: pytest.fail("no fit is needed when the grid is generated"))
    record = dd.run_design(QUICK, side_cost, rec.observe, rec.targets_of)
    assert record.doses == QUICK and rec.calls == [list(QUICK)]
    assert record.fallback and "no room for an adaptive dose" in record.fallback
    assert set(record.rounds) == {dd.GRID_ROUND}
    assert "grid (" in record.text()


def test_nothing_located_on_the_coarse_grid_falls_back_to_the_full_grid() -> None:
    """Every fitted dose not reached (a flat model): the design generates the rest of the
    grid, so the sweep is the grid's."""
    rec = Recorder(lambda doses: [dd.Target("ED50", "positive", None, None, None),
                                  dd.Target("TD50", "negative", None, None, None)])
    record = dd.run_design(FULL, side_cost, rec.observe, rec.targets_of)
    assert record.doses == FULL and sorted(rec.tried) == list(FULL)
    assert len(rec.calls) == 2  # the coarse grid, then every other grid dose at once
    assert rec.calls[0] == list(dd.coarse_doses(FULL))
    assert "nothing to refine" in record.fallback
    assert record.spent == record.full_cost == sum(side_cost(a) for a in FULL)


def test_intervals_that_never_close_stay_within_the_budget() -> None:
    """Fits whose intervals stay open (infinitely wide) ask for doses every round: the
    rounds stop at the budget, each round's doses come in one call, none twice."""
    rec = Recorder(lambda doses: [dd.Target("ED50", "positive", 0.8, None, None),
                                  dd.Target("TD50", "positive", 1.3, 1.0, 1.6),
                                  dd.Target("ED50", "negative", -0.6, None, -0.1)])
    record = dd.run_design(FULL, side_cost, rec.observe, rec.targets_of)
    assert not record.fallback and record.design == "adaptive"
    assert record.spent <= record.budget == math.floor(0.7 * record.full_cost)
    assert record.spent == sum(side_cost(a) for a in record.doses)
    flat = [a for call in rec.calls for a in call]
    assert len(flat) == len(set(flat)) == len(record.doses)
    assert len(rec.calls) == 1 + max(record.rounds) <= 1 + dd.MAX_ROUNDS
    assert all(min(FULL) <= a <= max(FULL) for a in record.doses)
    added = [a for a, r in zip(record.doses, record.rounds, strict=True) if r > 0]
    assert added and all(abs(a) not in (1.0, 2.0) for a in added)
    assert len(record.steps) == max(record.rounds)


def test_design_targets_from_side_results_locate_only_ok_doses() -> None:
    from probes.dose_response import Dose, SideResult, design_targets

    ok = Dose("TD50_degeneracy", "positive", "ok", "m", "", 1.2, 1.0, 1.5)
    unreached = Dose("ED50_overrefusal", "positive", "not reached in the tested range", "", "")
    baseline = Dose("coherence_breakdown", "positive", "baseline", "observed", "", 0.0)
    side = SideResult("positive", unreached, ok, baseline, False, "", None, ())
    targets = {t.name: t for t in design_targets({"positive": side})}
    assert targets["TD50_degeneracy"].located and targets["TD50_degeneracy"].width == 0.5
    assert not targets["ED50_overrefusal"].located
    assert not targets["coherence_breakdown"].located  # past 50 % at alpha = 0: no dose


def _bench_module(name: str) -> ModuleType:
    """A benchmark module imported from its file (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}_design", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load("tiny-llama", dtype=torch.float64)


@pytest.mark.parametrize("design", ["adaptive", "grid"])
def test_sweep_on_a_tiny_model_records_its_design(tiny: LoadedModel, tmp_path: Path,
                                                  design: str) -> None:
    """The sweep holds exactly the doses its design generated, each with the round that
    added it; the over-refusal arm follows the sweep's doses at alpha >= 0."""
    cfg = BenchConfig(
        models=("tiny-llama",), layers=parse_layers("all"), alphas=parse_alphas("-2:2:0.25"),
        ratio_alphas=parse_alphas("0"), n_train=8, n_eval=8, n_gen=3, max_new_tokens=4,
        n_boot=20, seed=0, device="cpu", dtype="float64", cache_dir=str(tmp_path),
        use_cache=True, profile="quick", chat_template="auto", batch_size=8,
        defaults=PROFILES["quick"], dose_design=design)
    bench = Workbench(tiny, cfg, ActivationCache(tmp_path / "acts"), Progress(lambda _m: None))
    dose = _bench_module("test_dose_response")
    sw = dose.run_sweep(bench, "raw")
    record = sw.design
    assert record is not None and record.design == design
    assert tuple(float(a) for a in sw.alphas) == record.doses
    assert len(sw.harmful) == len(sw.harmless) == len(record.doses)
    assert record.spent <= record.budget or record.fallback or design == "grid"
    if design == "grid":
        assert set(record.rounds) == {dd.GRID_ROUND} and len(sw.alphas) == 17
    else:
        assert record.fallback or 0 in record.rounds
    al = dose.alarming_sweep(bench)
    if not isinstance(al, str):
        assert np.array_equal(al.alphas, sw.alphas[sw.alphas >= 0.0])
        assert al.design is record
