"""The baseline gate: flips and drifts fail the run, small moves pass, files change on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from reports.baseline import compare

if TYPE_CHECKING:
    from conftest import Bench

# Values and the model fingerprint come from files, so each run can measure something else.
SUITE = """
    import json
    import pytest

    def state():
        with open("state.json") as handle:
            return json.load(handle)

    @pytest.mark.claim("GT-HALF")
    def test_effect(measure):
        s = state()
        measure.model("tiny-a", s["fingerprint"], dtype=s.get("dtype", "torch.float32"))
        v = s["effect"]
        measure.check("GT-HALF", v, ci=(v - 0.2, v + 0.2))

    @pytest.mark.claim("LT-POINT")
    def test_p(measure):
        s = state()
        measure.model("tiny-a", s["fingerprint"])
        if s.get("crash"):
            raise RuntimeError("broken pipeline")
        measure.check("LT-POINT", s["p"])
"""


def set_state(bench: Bench, effect: float, p: float = 0.01, **extra: object) -> None:
    state = {"effect": effect, "p": p, "fingerprint": "fp-1", **extra}
    (bench.path / "state.json").write_text(json.dumps(state), encoding="utf-8")


@pytest.fixture
def suite(bench: Bench) -> Bench:
    bench.write_tests(SUITE)
    return bench


def make_baseline(bench: Bench, effect: float, **extra: object) -> Path:
    set_state(bench, effect, **extra)
    result = bench.run("--baseline=base.json", "--update-baseline")
    assert "baseline updated" in result.stdout.str()
    return bench.path / "base.json"


def test_update_baseline_writes_the_report(suite: Bench) -> None:
    baseline = make_baseline(suite, 0.9)
    doc = suite.report(baseline)
    assert doc["complete"] is True
    assert doc["baseline"] is None
    assert [c["verdict"] for t in doc["tests"] for c in t["checks"]] == ["pass", "pass"]


def test_without_update_flag_the_baseline_is_never_written(suite: Bench) -> None:
    baseline = make_baseline(suite, 0.9)
    before = baseline.read_bytes()
    stat = baseline.stat()
    set_state(suite, 0.2)  # a very different run, which fails and flips
    result = suite.run("--baseline=base.json")
    assert result.ret == 1
    assert baseline.read_bytes() == before
    assert baseline.stat().st_mtime_ns == stat.st_mtime_ns


def test_within_tolerance_move_passes(suite: Bench) -> None:
    make_baseline(suite, 0.9)
    set_state(suite, 0.95)  # tolerance of GT-HALF is 0.1
    result = suite.run("--baseline=base.json")
    assert result.ret == pytest.ExitCode.OK
    output = result.stdout.str()
    assert "refusalbench baseline comparison" in output
    assert "moved" in output
    assert "within tolerance" in output
    assert "0 regression(s)" in output
    doc = suite.report()
    assert doc["baseline"]["regressions"] == 0
    assert doc["exit_status"] == 0


def test_flip_fails_the_session_even_when_all_tests_pass(suite: Bench) -> None:
    make_baseline(suite, 0.4)  # lower bound 0.2: GT-HALF failed in the baseline
    set_state(suite, 0.9)  # now it holds
    result = suite.run("--baseline=base.json")
    result.assert_outcomes(passed=2)
    assert result.ret == 1
    output = result.stdout.str()
    for part in [
        "refusalbench baseline comparison",
        "REGRESSION flip",
        "tiny-a",
        "test_exp.py::test_effect",
        "GT-HALF",
        "fail 0.4 [0.2, 0.6]",
        "pass 0.9 [0.7, 1.1]",
        "verdict fail -> pass",
        "1 regression(s)",
        "re-run with --update-baseline",
    ]:
        assert part in output, part
    doc = suite.report()
    assert doc["exit_status"] == 1
    (flip,) = [row for row in doc["baseline"]["rows"] if row["regression"]]
    assert flip["status"] == "flip"
    assert flip["hypothesis"] == "GT-HALF"


def test_drift_beyond_tolerance_fails(suite: Bench) -> None:
    make_baseline(suite, 0.9)
    set_state(suite, 1.2)
    result = suite.run("--baseline=base.json")
    result.assert_outcomes(passed=2)
    assert result.ret == 1
    assert "|delta| 0.3 > tolerance 0.1" in result.stdout.str()


def test_fingerprint_change_is_reported_and_refused(suite: Bench) -> None:
    # The only model has other weights now: nothing is shared, so the gate refuses.
    make_baseline(suite, 0.9)
    set_state(suite, 0.9, fingerprint="fp-2")
    result = suite.run("--baseline=base.json")
    assert result.ret == 1
    assert "model 'tiny-a': fingerprint changed fp-1 -> fp-2" in result.stdout.str()
    assert "share no model fingerprint" in result.stdout.str()


def test_dtype_change_is_reported_with_the_flag_that_matches(suite: Bench) -> None:
    make_baseline(suite, 0.9, dtype="torch.bfloat16")
    set_state(suite, 0.9, dtype="torch.float32")
    result = suite.run("--baseline=base.json")
    assert result.ret == 0
    assert ("model 'tiny-a': dtype bfloat16 in the baseline, float32 now" in
            result.stdout.str())
    assert "rerun with --dtype bfloat16" in result.stdout.str()


def test_same_dtype_adds_no_note(suite: Bench) -> None:
    make_baseline(suite, 0.9, dtype="torch.float32")
    result = suite.run("--baseline=base.json")
    assert "in the baseline," not in result.stdout.str()
    assert result.ret == 0


def test_missing_results_are_listed_not_failed(suite: Bench) -> None:
    make_baseline(suite, 0.9)
    result = suite.run("--baseline=base.json", "-k", "effect")
    assert result.ret == 0
    output = result.stdout.str()
    assert "removed" in output
    assert "only in baseline; test not run" in output


def test_test_that_now_errors_is_a_regression(suite: Bench) -> None:
    make_baseline(suite, 0.9)
    set_state(suite, 0.9, crash=True)
    result = suite.run("--baseline=base.json")
    assert result.ret == 1
    assert "REGRESSION error" in result.stdout.str()
    assert "was pass, now error" in result.stdout.str()


def test_incomplete_run_does_not_update_the_baseline(suite: Bench) -> None:
    suite.write_tests("def test_stop():\n    raise KeyboardInterrupt\n", name="test_zz.py")
    set_state(suite, 0.9)
    result = suite.run_subprocess("--baseline=base.json", "--update-baseline")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "baseline NOT updated (incomplete run)" in result.stdout.str()
    assert not (suite.path / "base.json").exists()


def test_compare_keys_by_model_test_hypothesis_and_label(suite: Bench) -> None:
    make_baseline(suite, 0.9)
    doc = suite.report(suite.path / "base.json")
    other = json.loads(json.dumps(doc))
    other["tests"][0]["checks"][0]["model"] = "tiny-b"  # same test, another model
    comparison = compare(doc, other)
    statuses = sorted((row.model, row.status) for row in comparison.rows)
    assert statuses == [("tiny-a", "removed"), ("tiny-a", "same"), ("tiny-b", "added")]
    assert not comparison.regressions
