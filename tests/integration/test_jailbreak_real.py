"""The jailbreak benchmark runs end to end on the embedded model, quick profile.

A pytest subprocess runs ``benchmarks/test_jailbreak.py --profile quick``; the checks read its
JSON report. Verdicts are scientific results and are not asserted. What is asserted is the
structure: every attack family appears with a rate in [0, 1], the framings carry a paired
comparison (McNemar p) and the tense families an unpaired one, every configuration has a
dose row per set and dose and a defence window with a stated reason when it is empty, the
four detection readouts each pick a layer, and no check passes on a missing number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from probes.jailbreak import BENIGN_SETS, CONFIGS, READOUTS, TENSE_FAMILIES, readout_name
from prompts import framings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "test_jailbreak.py"
TIMEOUT_S = 1800  # a hang guard, as in the other integration tests (cold cache, loaded machine)
TRIM = ("--max-new-tokens", "12", "--n-prompts", "16", "--n-train", "16")
HYPOTHESES = {"JB-STEER-RESTORES", "JB-FRAMING-RESISTS", "JB-VCACHE-DETECTS"}


def _rows(test: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found = [t for t in test["tables"] if t["name"] == name]
    assert found, f"{test['nodeid']} recorded no table {name!r}"
    return [dict(zip(found[0]["columns"], r, strict=True)) for r in found[0]["rows"]]


def _short(name: str) -> str:
    """``test_x[default]`` -> ``test_x``; ``test_x[default-single]`` -> ``test_x[single]``."""
    base, _, param = name.partition("[")
    rest = param.rstrip("]").split("-", 1)
    return f"{base}[{rest[1]}]" if len(rest) == 2 else base


def _rate_ok(p: Any, lo: Any, hi: Any) -> bool:
    return 0.0 <= lo <= p <= hi <= 1.0


def test_jailbreak_benchmark_on_the_embedded_model(pytester: pytest.Pytester) -> None:
    out = pytester.path / "report.json"
    # quick profile, trimmed further: the structure is asserted, not the verdicts
    result = pytester.runpytest_subprocess(str(BENCH), "--profile", "quick", *TRIM,
                                           "-p", "no:cacheprovider", "--report-json", str(out),
                                           timeout=TIMEOUT_S)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), \
        result.stdout.str()
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert not doc["collection_errors"], doc["collection_errors"]
    tests = {_short(t["name"]): t for t in doc["tests"]}
    for t in doc["tests"]:
        assert t["outcome"] in ("passed", "failed", "skipped"), (t["name"], t["longrepr"])
        for c in t["checks"]:
            assert c["verdict"] in ("pass", "fail", "skipped"), c  # never an error
            if c["verdict"] == "pass" and c["bound"] != "point":
                assert c["value"] is not None and math.isfinite(c["value"]), c
                assert c["ci"][0] is not None and c["ci"][0] <= c["ci"][1], c
    assert {c["hypothesis"] for t in doc["tests"] for c in t["checks"]} == HYPOTHESES

    frames = [f.name for f in framings()]
    base = _rows(tests["test_attack_baseline"], "unsteered refusal per attack family")
    assert [r["family"] for r in base] == ["originals", *TENSE_FAMILIES, *frames]
    for r in base:
        assert _rate_ok(r["rate"], r["lo"], r["hi"]), r
        if r["family"] in frames:
            assert r["McNemar p"] is not None and 0.0 <= r["McNemar p"] <= 1.0, r
            assert r["n"] == 4  # the quick profile's prompts per family
        elif r["family"] in TENSE_FAMILIES:
            assert r["McNemar p"] is None and "Newcombe" in r["comparison"], r

    sets = [*TENSE_FAMILIES, *frames, *BENIGN_SETS, "attacks (pooled)", "benign (pooled)"]
    for config in CONFIGS:
        t = tests[f"test_defence_curves[{config}]"]
        rows = _rows(t, f"defence rates: {config}")
        assert {(r["set"], r["dose"]) for r in rows} == {
            (s, d) for s in sets for d in (0.0, 0.5, 1.0)}
        for r in rows:
            assert _rate_ok(r["rate"], r["lo"], r["hi"]) and 0.0 <= r["degenerate"] <= 1.0, r
        (window,) = _rows(t, f"defence window: {config}")
        assert window["window"], window
        if window["ratio"] is None:
            assert window["window"].startswith(("empty", "half")), window
        (texts,) = [x for x in t["texts"] if x["name"].startswith("replies per family")]
        assert len(texts["rows"]) == 2 * (len(frames) + len(TENSE_FAMILIES) + 2)

    vc = tests["test_value_cache_detection"]
    chosen = _rows(vc, "detection per readout at its chosen layer")
    assert [r["readout"] for r in chosen] == [readout_name(r) for r in READOUTS]
    for r in chosen:
        assert 0 <= r["layer (picked on plain prompts)"] < 24, r
        assert _rate_ok(r["attacks vs harmless AUC"], r["attacks lo"], r["attacks hi"]), r
        assert _rate_ok(r["harmful vs harmless AUC"], r["plain lo"], r["plain hi"]), r
