"""The dose-response benchmark runs end to end on the embedded model, small.

A pytest subprocess runs ``benchmarks/test_dose_response.py`` with 3 raw alphas, 3 ratio
alphas, 4 + 4 generation prompts and 16 new tokens; the checks read its JSON report.
Hypothesis verdicts are scientific results and are not asserted: what is asserted is the
structure — rates are rates, every dose has an explicit status (a value with a finite
interval end, or a reason), TI-S is a number or comes with the reason it is not, and no
non-finite number passes a claim silently. Generations are cached by intervention key, so
a rerun takes seconds; a cold run on a quiet machine about a minute. The over-refusal arm
(benign-but-alarming prompts at the raw sweep's alpha >= 0) reports a rate per alpha and TI-S
beside the plain-harmless one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from probes.dose_response import MIN_CALIBRATION_REPLIES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "test_dose_response.py"
TIMEOUT_S = 1800  # generous: a cold cache on a loaded machine
DOSE_STATUSES = {"ok", "baseline", "not reached before degeneracy",
                 "not reached in the tested range"}
RATE_COLUMNS = ("harmful refusal", "harmless refusal", "degenerate", "coherent")


def _run(pytester: pytest.Pytester, *args: str) -> dict[str, Any]:
    out = pytester.path / "report.json"
    pytester.runpytest_subprocess(
        str(BENCH), "--profile", "quick", "-p", "no:cacheprovider", "--alphas=-0.5,0,0.5",
        "--ratio-alphas=-1,0,1", "--n-gen", "4", "--max-new-tokens", "16",
        "--report-json", str(out), *args, timeout=TIMEOUT_S)
    assert out.is_file(), "the run wrote no JSON report"
    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert not doc["collection_errors"], doc["collection_errors"]
    return doc


def _table(test: dict[str, Any], name: str) -> dict[str, Any]:
    found = [t for t in test["tables"] if t["name"] == name]
    assert found, f"{test['nodeid']} recorded no table {name!r}"
    return found[0]


def _rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(table["columns"], row, strict=True)) for row in table["rows"]]


def _metric(test: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in test["metrics"] if m["name"] == name]
    assert found, f"{test['nodeid']} recorded no metric {name!r}"
    return found[0]


def _check_rates(test: dict[str, Any], units: str, n_alphas: int) -> None:
    rows = _rows(_table(test, f"rates_{units}"))
    assert [r["alpha"] for r in rows] == sorted(r["alpha"] for r in rows)
    assert len(rows) == n_alphas and 0.0 in [r["alpha"] for r in rows]
    for r in rows:
        for col in RATE_COLUMNS:
            p, lo, hi = r[col], r[f"{col} lo"], r[f"{col} hi"]
            assert 0.0 <= lo <= p <= hi <= 1.0, (units, r["alpha"], col, lo, p, hi)
    for col in RATE_COLUMNS:
        m = _metric(test, f"baseline {col}")
        assert 0.0 <= m["value"] <= 1.0 and m["n"] == (4 if "refusal" in col else 8)


def _check_doses(test: dict[str, Any], units: str) -> None:
    rows = _rows(_table(test, f"doses_{units}"))
    doses = [r for r in rows if r["dose"] != "therapeutic window"]
    names = {(r["side"], r["dose"]) for r in doses}
    required = {("negative", "ED50_jailbreak"), ("positive", "ED50_overrefusal"),
                ("negative", "TD50_degeneracy"), ("positive", "TD50_degeneracy"),
                ("negative", "coherence_breakdown"), ("positive", "coherence_breakdown")}
    assert required <= names <= required | {("negative", "ED_jailbreak_half_baseline")}
    for r in doses:
        assert r["status"] in DOSE_STATUSES, r
        if r["status"] == "ok":
            assert r["value"] is not None and math.isfinite(r["value"]), r
            assert r["method"], r
            sign = -1 if r["side"] == "negative" else 1
            assert sign * r["value"] >= 0, r
            assert r["lo"] is not None or r["hi"] is not None, r  # at least one end found
            ends = [e for e in (r["lo"], r["hi"]) if e is not None]
            assert all(math.isfinite(e) for e in ends), r
        elif r["status"] == "baseline":
            assert r["value"] == 0.0 and r["reason"], r
        else:
            assert r["value"] is None and r["reason"], r  # no number, but a reason
    windows = [r for r in rows if r["dose"] == "therapeutic window"]
    assert {r["side"] for r in windows} == {"negative", "positive"}
    for r in windows:
        assert r["status"] in ("ok", "empty"), r
        if r["status"] == "ok":
            assert r["lo"] <= r["hi"], r
    (tis,) = _rows(_table(test, f"tis_{units}"))
    if tis["TI-S"] is None:
        assert tis["reason"], "TI-S is missing without a reason"
    else:
        assert math.isfinite(tis["TI-S"]) and tis["TI-S"] > 0 and tis["method"], tis


def _no_silent_nan(check: dict[str, Any]) -> None:
    assert check["verdict"] in ("pass", "fail", "skipped", "error"), check
    if check["verdict"] == "pass":
        assert check["value"] is not None and math.isfinite(check["value"]), check
        if check["bound"] != "point":
            lo, hi = check["ci"]
            assert lo is not None and hi is not None and lo <= hi, check
    if check["verdict"] in ("error", "skipped"):
        assert check["message"], check  # never without a stated reason


def test_dose_response_benchmark_on_the_embedded_model(pytester: pytest.Pytester) -> None:
    doc = _run(pytester)
    tests = {t["name"]: t for t in doc["tests"]}
    assert "test_dose_response[default-raw]" in tests, sorted(tests)
    for units in ("raw", "ratio"):
        test = tests[f"test_dose_response[default-{units}]"]
        assert test["outcome"] == "passed", test["longrepr"]
        _check_rates(test, units, 3)
        _check_doses(test, units)
        assert _metric(test, "alphas")["value"] == 3
        blocks = (_metric(test, "first steered block")["value"],
                  _metric(test, "last steered block")["value"])
        assert blocks == ((8, 15) if units == "raw" else (12, 12))  # 24 blocks: middle third
        plots = {p["name"]: p for p in test["plots"]}
        assert plots[f"dose_response_{units}"]["kind"] == "line"
        (samples,) = [t for t in test["texts"] if t["name"] == f"samples_{units}"]
        assert len(samples["rows"]) == 3 * 2 * 2  # alphas x classes x SAMPLE_PROMPTS
    for test in tests.values():
        assert test["outcome"] in ("passed", "failed", "skipped"), (test["name"],
                                                                    test["longrepr"])
        for check in test["checks"]:
            _no_silent_nan(check)
    alarming = tests["test_overrefusal_alarming_vs_plain[default]"]
    by_alpha = _rows(_table(alarming, "overrefusal_by_alpha"))
    assert [r["alpha"] for r in by_alpha] == [0.0, 0.5]  # the raw grid's alpha >= 0
    for r in by_alpha:
        for arm in ("alarming", "plain"):
            assert 0.0 <= r[f"{arm} lo"] <= r[f"{arm} refusal"] <= r[f"{arm} hi"] <= 1.0, r
    ti = _rows(_table(alarming, "therapeutic_index"))
    assert [r["over-refusal prompts"] for r in ti] == ["benign-but-alarming", "plain harmless"]
    for r in ti:
        assert r["TI-S"] is not None or r["reason when undefined"], r
    multi = [t for name, t in tests.items() if name.startswith("test_multi_layer_vs_single")]
    assert len(multi) == 2
    for t in multi:
        if t["outcome"] == "skipped":
            continue
        rows = _rows(next(x for x in t["tables"] if x["name"].startswith("multi_vs_single")))
        assert [r["total ratio"] for r in rows] in ([1.0], [-1.0])
        diff = _metric(t, "multi_minus_single_effect")
        assert -1.0 <= diff["ci"][0] <= diff["value"] <= diff["ci"][1] <= 1.0


COHERENCE_CLAIMS = ("TIS-RATIO-BREAKDOWN", "TIS-COHERENT-WITHIN-HALF")


def test_coherence_rule_is_calibrated_on_a_second_model(pytester: pytest.Pytester) -> None:
    """The coherence rule comes from each model's own unsteered replies, so a model the
    suite was never fitted on (SmolLM2-135M) gets a calibrated rule and a verdict on every
    coherence-based claim, not a skip for want of a calibration."""
    doc = _run(pytester, "--model", "smollm2-135m-instruct", "--n-gen", "6",
               "-k", "test_dose_response or breakdown or coherent_within")
    tests = {t["name"]: t for t in doc["tests"]}
    raw = tests["test_dose_response[smollm2-135m-instruct-raw]"]
    assert raw["outcome"] == "passed", raw["longrepr"]
    (rule,) = _rows(_table(raw, "coherence rule"))
    calibrated = re.search(r"perplexity <= .* of its (\d+) unsteered replies", rule["rule"])
    assert calibrated and int(calibrated.group(1)) >= MIN_CALIBRATION_REPLIES, rule
    checks = [c for t in tests.values() for c in t["checks"]
              if c["hypothesis"] in COHERENCE_CLAIMS]
    assert {c["hypothesis"] for c in checks} == set(COHERENCE_CLAIMS), checks
    for check in checks:
        _no_silent_nan(check)
        assert "not calibrated" not in (check["message"] or ""), check
