"""The Measure object on its own: records, conversions, verdicts and their messages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from reports.jsonable import number, to_jsonable
from reports.measure import ClaimError, HypothesisFailure, Measure
from reports.registry import Registry, load_registry


@pytest.fixture
def registry(tmp_path: Path, registry_toml: str) -> Registry:
    path = tmp_path / "hyp.toml"
    path.write_text(registry_toml, encoding="utf-8")
    return load_registry(path)


@pytest.fixture
def measure(registry: Registry) -> Measure:
    m = Measure(registry, "test_x.py::test_y", ("GT-HALF", "LT-POINT", "BETWEEN"))
    m.model("tiny-model", "fp-123", dtype="float32")
    return m


def test_failure_message_states_everything(measure: Measure) -> None:
    with pytest.raises(HypothesisFailure) as excinfo:
        measure.check("GT-HALF", 0.62, ci=(0.41, 0.83), n=40, detail="layer 7")
    message = str(excinfo.value)
    for part in [
        "GT-HALF",
        "FAILED",
        "The effect is larger than one half.",
        "effect = 0.62 [0.41, 0.83], n = 40",
        "effect > 0.5",
        "lower bound",
        "lower bound 0.41 > 0.5: does not hold",
        "tiny-model",
        "unit-test seed: d = 0.9",
        "test_x.py::test_y",
        "layer 7",
    ]:
        assert part in message, part
    (record,) = measure.data.checks
    assert record["verdict"] == "fail"
    assert record["bound_value"] == 0.41
    assert record["model"] == "tiny-model"


def test_pass_records_without_raising(measure: Measure) -> None:
    assert measure.check("GT-HALF", 0.9, ci=(0.7, 1.1)) == "pass"
    assert measure.check("BETWEEN", 0.5, ci=(0.4, 0.6)) == "pass"
    assert [c["verdict"] for c in measure.data.checks] == ["pass", "pass"]
    assert measure.data.checks[1]["bound_value"] == [0.4, 0.6]


@pytest.mark.parametrize("value", [math.nan, None, np.float32("nan"), math.inf])
def test_nan_or_none_is_an_error_verdict(measure: Measure, value: object) -> None:
    with pytest.raises(HypothesisFailure, match="could not be evaluated"):
        measure.check("LT-POINT", value)
    (record,) = measure.data.checks
    assert record["verdict"] == "error"
    assert record["value"] is None
    assert record["value_flag"] in ("nan", "missing", "inf")


def test_soft_checks_and_assert_all(measure: Measure) -> None:
    for layer, lo in enumerate([0.6, 0.2, 0.7, 0.1]):
        measure.check("GT-HALF", lo + 0.2, ci=(lo, lo + 0.4), label=f"layer {layer}", hard=False)
    assert [c["verdict"] for c in measure.data.checks] == ["pass", "fail", "pass", "fail"]
    with pytest.raises(HypothesisFailure) as excinfo:
        measure.assert_all()
    message = str(excinfo.value)
    assert message.startswith("2 hypothesis check(s) failed")
    assert "[layer 1]" in message
    assert "[layer 3]" in message
    assert "[layer 0]" not in message
    measure.assert_all()  # nothing pending any more


def test_undeclared_hypothesis_is_a_clear_error(measure: Measure) -> None:
    with pytest.raises(ClaimError, match=r"does not declare.*declared: GT-HALF, LT-POINT"):
        measure.check("NOT-DECLARED", 1.0)


def test_same_key_twice_needs_a_label(measure: Measure) -> None:
    measure.check("LT-POINT", 0.01)
    with pytest.raises(ClaimError, match="label="):
        measure.check("LT-POINT", 0.02)
    measure.check("LT-POINT", 0.02, label="second")


def test_skip_records_and_skips(measure: Measure) -> None:
    with pytest.raises(pytest.skip.Exception, match="too few prompts"):
        measure.skip("GT-HALF", "too few prompts")
    (record,) = measure.data.checks
    assert record["verdict"] == "skipped"
    assert record["reason"] == "too few prompts"


def test_numpy_values_become_plain_json(measure: Measure) -> None:
    measure.metric("d", np.float64(1.5), ci=(np.float32(1.0), np.float64(2.0)), n=np.int64(12))
    measure.metric("broken", np.nan)
    measure.table("t", ["layer", "d"], [[np.int64(1), np.float32(0.5)], [2, np.inf]])
    measure.plot("p", "heatmap", matrix=np.eye(2), xlabels=["a", "b"])
    text = json.dumps(measure.data.as_json(), allow_nan=False)  # strict JSON
    data = json.loads(text)
    assert data["metrics"][0] == {
        "name": "d",
        "model": "tiny-model",
        "value": 1.5,
        "value_flag": None,
        "ci": [1.0, 2.0],
        "n": 12,
        "units": None,
    }
    assert data["metrics"][1]["value"] is None
    assert data["metrics"][1]["value_flag"] == "nan"
    assert data["tables"][0]["rows"] == [[1, 0.5], [2, None]]
    assert data["tables"][0]["nonfinite"] == 1
    assert data["plots"][0]["data"]["matrix"] == [[1.0, 0.0], [0.0, 1.0]]


def test_bad_records_are_rejected_early(measure: Measure) -> None:
    with pytest.raises(ValueError, match="row 0 has 1 values for 2 columns"):
        measure.table("t", ["a", "b"], [[1]])
    with pytest.raises(ValueError, match="unknown kind 'pie'"):
        measure.plot("p", "pie", values=[1])
    with pytest.raises(TypeError, match="expected a number"):
        measure.metric("m", "high")
    with pytest.raises(TypeError, match="model fingerprint"):
        measure.model("m", "")


def test_strings_are_kept_exactly() -> None:
    hostile = "<script>alert(1)</script> \"'& \x00\x1b\x1f \u202e end"
    value, nonfinite = to_jsonable({"t": [hostile]})
    assert value == {"t": [hostile]}
    assert nonfinite == 0
    assert json.loads(json.dumps(value))["t"][0] == hostile


def test_number_flags() -> None:
    assert number(np.float32(2.5)) == (2.5, None)
    assert number(float("-inf")) == (None, "-inf")
    assert number(None) == (None, "missing")
