"""The per-layer experiment end to end on the embedded model, --profile quick.

Runs benchmarks/test_layer_significance.py, test_extraction_methods.py and test_transfer.py
in a pytest subprocess and checks the JSON report's shape: every hypothesis is judged, the
metrics, tables and plots the README describes are there, and the one structural fact of
this capture (resid_pre of block 0 at the last template token has no direction) is an
errored layer with its reason, not a silent gap. Scientific verdicts (pass or fail) are not
asserted here: they are the benchmark's results. Needs the activation cache warm to stay
well under 90 s (the first run captures activations).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from probes.paths import cache_root

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1800  # a hang guard, as in the other integration tests (cold cache, loaded machine)
FILES = ("test_layer_significance.py", "test_extraction_methods.py", "test_transfer.py")
HYPOTHESES = {
    "LAYER-VALID", "LAYER-SIGNIFICANT", "LAYER-PEAK-LATE", "LAYER-GROWTH",
    "SITE-ATTN-BEATS-MLP", "PROBE-NO-POLARITY-FAIL", "PROBE-BEATS-MEANDIFF",
    "RANDOM-NEAR-CHANCE", "METHOD-BEATS-RANDOM", "PROBE-CROSS-TOPIC", "PROBE-CROSS-LANG",
    "PROBE-TRANSFER-HARMBENCH", "LAYER-SURVIVES-MATCHING",
}
N_LAYERS = 24  # the embedded Qwen2.5-Coder-0.5B-Instruct


@pytest.fixture(scope="module")
def cache_dir() -> str:
    """The real cache root, resolved before pytester points HOME at a temporary directory
    (a fresh HOME would mean converting the model and capturing every activation again)."""
    return str(cache_root())


def test_layer_benchmarks_report(
    pytester: pytest.Pytester, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One subprocess run of the three files; the report is checked part by part below."""
    out = pytester.path
    # Hundreds of small L-BFGS fits: a multi-threaded BLAS only adds contention on 2 cores.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    result = pytester.runpytest_subprocess(
        *(str(ROOT / "benchmarks" / f) for f in FILES), "--profile", "quick",
        "--cache-dir", cache_dir,
        "-p", "no:cacheprovider", "--report-json", str(out / "r.json"),
        "--report-html", str(out / "r.html"), timeout=TIMEOUT_S,
    )
    # Failing hypotheses fail tests (scientific results); anything else is a bug.
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    report: dict[str, Any] = json.loads((out / "r.json").read_text(encoding="utf-8"))
    assert (out / "r.html").stat().st_size > 0
    _every_hypothesis_is_judged(report)
    _one_validity_test_per_layer_and_layer_zero_is_reported(report)
    _profile_sites_and_methods_are_reported(report)
    _transfer_matrices_are_reported(report)
    _wording_control_is_reported(report)


def _tests(report: dict[str, Any], module: str) -> list[dict[str, Any]]:
    return [t for t in report["tests"] if t["module"].endswith(module)]


def _metrics(test: dict[str, Any]) -> dict[str, Any]:
    return {m["name"]: m for m in test["metrics"]}


def _every_hypothesis_is_judged(report: dict[str, Any]) -> None:
    checks = [c for t in report["tests"] for c in t["checks"]]
    assert {c["hypothesis"] for c in checks} >= HYPOTHESES
    assert not report["collection_errors"]
    for c in checks:
        assert c["verdict"] in ("pass", "fail", "error", "skipped"), c
        if c["verdict"] == "error":  # only the layer without a direction
            assert c["hypothesis"] in ("LAYER-VALID", "LAYER-SIGNIFICANT"), c
            assert "no direction" in c["detail"], c
    labels = {c["label"] for c in checks if c["hypothesis"] == "METHOD-BEATS-RANDOM"}
    assert labels == {"mean_diff", "probe", "gradient", "pca_diff"}


def _one_validity_test_per_layer_and_layer_zero_is_reported(report: dict[str, Any]) -> None:
    per_layer = [t for t in _tests(report, "test_layer_significance.py")
                 if t["name"].startswith("test_layer_direction_is_valid")]
    assert len(per_layer) == N_LAYERS
    by_layer = {int(t["name"].rsplit("-L", 1)[1].rstrip("]")): t for t in per_layer}
    zero = by_layer[0]
    assert zero["outcome"] == "failed"
    assert {c["verdict"] for c in zero["checks"]} == {"error"}
    for layer, t in by_layer.items():
        if layer == 0:
            continue
        names = set(_metrics(t))
        assert {"cohens_d_heldout", "cohens_d_in_sample", "p_holm", "auc_heldout"} <= names
        d = _metrics(t)["cohens_d_heldout"]
        assert d["ci"] is not None and d["ci"][0] <= d["value"] <= d["ci"][1]
        assert {c["hypothesis"] for c in t["checks"]} == {"LAYER-VALID", "LAYER-SIGNIFICANT"}
        assert {"cohens_d_unmatched", "cohens_d_matched", "wording_share"} <= names


def _profile_sites_and_methods_are_reported(report: dict[str, Any]) -> None:
    layer_tests = {t["name"].split("[")[0]: t for t in _tests(report, "test_layer_significance.py")}
    peak = _metrics(layer_tests["test_peak_layer_is_late"])
    assert {"peak_layer_fraction", "valid_layer_fraction",
            "n_layers_without_direction"} <= set(peak)
    assert peak["n_layers_without_direction"]["value"] == 1
    growth = _metrics(layer_tests["test_effect_grows_with_depth"])
    assert growth["spearman_rho_d_layer"]["ci"] is not None
    sites = layer_tests["test_sites_side_by_side"]
    lines = {p["name"]: p for p in sites["plots"] if p["kind"] == "line"}
    for name in ("held-out Cohen's d per layer and site", "held-out AUC per layer and site"):
        assert set(lines[name]["data"]["series"]) == {"resid_pre", "attn_out", "mlp_out"}
    assert len(sites["tables"][0]["rows"]) == N_LAYERS

    methods = {t["name"].split("[")[0]: t for t in _tests(report, "test_extraction_methods.py")}
    summary = methods["test_methods_summary"]
    heat = next(p for p in summary["plots"] if p["name"] == "held-out accuracy, method x layer")
    assert heat["kind"] == "heatmap"
    assert heat["data"]["ylabels"] == ["mean_diff", "probe", "gradient", "pca_diff", "random"]
    assert len(heat["data"]["xlabels"]) == N_LAYERS - 1  # layer 0 has no direction
    table = summary["tables"][0]
    assert [r[0] for r in table["rows"]] == heat["data"]["ylabels"]
    assert "seed accuracy %" in table["columns"]
    assert "probe_minus_meandiff_accuracy" in _metrics(methods["test_probe_beats_mean_diff"])


def _transfer_matrices_are_reported(report: dict[str, Any]) -> None:
    tests = {t["name"].split("[")[0]: t for t in _tests(report, "test_transfer.py")}
    expected = {
        "test_cross_topic_harmless": "probe_cross_topic_drop",
        "test_cross_category_harmful": "probe_cross_topic_drop",
        "test_cross_language_harmless": "probe_cross_language_drop",
        "test_advbench_to_harmbench": "probe_harmbench_drop",
    }
    for name, metric in expected.items():
        t = tests[name]
        m = _metrics(t)[metric]
        assert m["ci"] is not None and m["ci"][0] <= m["value"] <= m["ci"][1]
    lang = tests["test_cross_language_harmless"]
    heat = next(p for p in lang["plots"] if p["kind"] == "heatmap")
    assert heat["data"]["xlabels"] == ["en", "es", "fr", "de", "zh"]
    assert "probe/en_column_drop" in _metrics(lang)
    assert any(p["kind"] == "heatmap" for p in tests["test_cross_topic_harmless"]["plots"])


def _wording_control_is_reported(report: dict[str, Any]) -> None:
    """The default run is measured on the matched contrast, says so, and sets the wording
    control beside every layer: table columns, both curves on the profile plot, a claim."""
    (model,) = report["provenance"]["models"]
    assert model["info"]["contrast"] == "matched"
    assert model["info"]["pairs"]["n"] == 175
    layer_tests = {t["name"].split("[")[0]: t for t in _tests(report, "test_layer_significance.py")}
    peak = layer_tests["test_peak_layer_is_late"]
    table = peak["tables"][0]
    assert "wording control" in table["columns"] and len(table["rows"]) == N_LAYERS
    status = table["columns"].index("wording control")
    assert {r[status] for r in table["rows"]} <= {
        "no direction", "no_separation", "wording_driven", "survives_matching"}
    series = set(peak["plots"][0]["data"]["series"])
    assert {"unmatched d (harmless set)", "matched d (twins)"} <= series
    survives = layer_tests["test_separation_survives_matching"]
    best = _metrics(survives)["best_cohens_d_matched"]
    assert best["ci"] is not None and best["ci"][0] <= best["value"] <= best["ci"][1]
    assert len(survives["tables"][0]["rows"]) == N_LAYERS
