"""The geometry benchmarks run end to end on the real packaged models.

Each run is a pytest subprocess on ``benchmarks/test_concept_cone.py`` and
``benchmarks/test_alignment_imprint.py`` with ``--profile quick``; the checks read its JSON
report. Hypothesis verdicts are scientific results and are not asserted here: what is
asserted is that every claim was evaluated (pass/fail with finite numbers) or skipped with
its stated reason, never an error. With a warm activation cache each run takes well under
a minute; the first run on a machine computes the activations (a few minutes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONE = ROOT / "benchmarks" / "test_concept_cone.py"
IMPRINT = ROOT / "benchmarks" / "test_alignment_imprint.py"
TIMEOUT_S = 1800  # generous: a cold cache on a loaded machine


def _run(pytester: pytest.Pytester, *args: str) -> dict[str, Any]:
    out = pytester.path / "report.json"
    pytester.runpytest_subprocess(*args, "--profile", "quick", "-p", "no:cacheprovider",
                                  "--report-json", str(out), timeout=TIMEOUT_S)
    assert out.is_file(), "the run wrote no JSON report"
    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert not doc["collection_errors"], doc["collection_errors"]
    return doc


def _tests(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [t for t in doc["tests"] if t["name"].startswith(name)]


def _metric(test: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in test["metrics"] if m["name"] == name]
    assert found, f"{test['nodeid']} recorded no metric {name!r}"
    return found[0]


def _evaluated(check: dict[str, Any]) -> None:
    assert check["verdict"] in ("pass", "fail"), check["message"]
    assert check["value"] is not None and math.isfinite(check["value"])
    if check["bound"] != "point":
        lo, hi = check["ci"]
        assert lo is not None and hi is not None and lo <= hi


def test_geometry_benchmarks_on_the_embedded_model(pytester: pytest.Pytester) -> None:
    doc = _run(pytester, str(CONE), str(IMPRINT), "--layers", "0,1,2,12,23")
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"] for t in doc["tests"]}
    assert "error" not in outcomes.values(), outcomes

    layers = {t["name"]: t for t in _tests(doc, "test_cone_layer")}
    assert set(layers) == {f"test_cone_layer[default-L{i:02d}]" for i in (0, 1, 2, 12, 23)}
    # resid_pre of layer 0 at the last token is prompt-independent: a stated skip.
    assert layers["test_cone_layer[default-L00]"]["outcome"] == "skipped"
    assert "undefined" in layers["test_cone_layer[default-L00]"]["skip_reason"]
    for name, test in layers.items():
        if name.endswith("L00]"):
            continue
        checks = {c["hypothesis"]: c for c in test["checks"]}
        assert set(checks) == {"CONE-POLYHEDRAL", "CONE-DIMENSION", "CONE-BEYOND-NULL"}
        for check in checks.values():
            _evaluated(check)
        assert 0.0 < checks["CONE-BEYOND-NULL"]["value"] <= 1.0
        assert _metric(test, "n_categories")["value"] >= 4
        assert _metric(test, "prompts_per_category")["value"] >= 15
        null = _metric(test, "null_mean_abs_cos")
        assert null["n"] == 999

    (depth,) = _tests(doc, "test_cone_depth_profile")
    for check in depth["checks"]:
        _evaluated(check)
    assert {c["hypothesis"] for c in depth["checks"]} == {"CONE-EARLY-POLYHEDRAL",
                                                          "CONE-EARLY-EXCESS"}
    plots = {p["name"]: p["kind"] for p in depth["plots"]}
    assert plots["dimension_vs_layer"] == "line"
    assert sum(kind == "heatmap" for kind in plots.values()) >= 2
    assert _metric(depth, "cone_seconds")["value"] < 60

    (seed_sized,) = _tests(doc, "test_cone_at_seed_sample_size")
    assert seed_sized["outcome"] == "passed"
    share = _metric(seed_sized, "seed_sized/mean_null_polyhedral_share")["value"]
    assert 0.0 <= share <= 1.0

    (cross,) = _tests(doc, "test_cross_layer_alignment")
    assert cross["outcome"] == "passed"
    assert _metric(cross, "cross_layer/layers_excluded_zero_direction")["value"] == 1
    assert any(p["kind"] == "heatmap" for p in cross["plots"])

    (causal,) = _tests(doc, "test_cone_causal")
    (check,) = causal["checks"]
    _evaluated(check)
    assert _metric(causal, "causally_validated")["value"] in (0, 1)
    assert {t["name"] for t in causal["tables"]} >= {"causal_per_category",
                                                     "geometry_causal_flag"}

    (features,) = _tests(doc, "test_imprint_features")
    assert features["outcome"] == "passed"
    for name in ("gini", "effective_rank", "spectral_decay", "smoothness", "tail_bias",
                 "orthogonality"):
        m = _metric(features, name)
        assert m["value"] is not None and m["ci"] is not None and None not in m["ci"]

    (provider,) = _tests(doc, "test_provider_effect")
    assert provider["outcome"] == "skipped"
    assert "fewer than two providers" in provider["skip_reason"]
    assert provider["checks"][0]["verdict"] == "skipped"


def test_geometry_benchmarks_with_two_providers(pytester: pytest.Pytester) -> None:
    # The embedded Qwen and SmolLM2: two providers with one model each, so the provider
    # effect is untestable (no within-provider distance); SmolLM2 never refuses, so the
    # causal check skips on it.
    doc = _run(pytester, str(CONE), str(IMPRINT), "-k", "causal or imprint or provider",
               "--model", "default", "--model", "smollm2-135m-instruct")
    (provider,) = _tests(doc, "test_provider_effect")
    assert provider["outcome"] == "skipped"
    assert "exactly one model per provider" in provider["skip_reason"]
    assert len(provider["models"]) == 3  # both models and the pair
    features = {t["name"]: t for t in _tests(doc, "test_imprint_features")}
    assert set(features) == {"test_imprint_features[default]",
                             "test_imprint_features[smollm2-135m-instruct]"}
    assert all(t["outcome"] == "passed" for t in features.values())
    causal = {t["name"]: t for t in _tests(doc, "test_cone_causal")}
    smol = causal["test_cone_causal[smollm2-135m-instruct]"]
    assert smol["outcome"] == "skipped"
    assert "does not refuse" in smol["skip_reason"]
    assert causal["test_cone_causal[default]"]["outcome"] in ("passed", "failed")
