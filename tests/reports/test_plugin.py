"""The reports plugin inside real pytest runs (pytester): verdicts, options, JSON report."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Bench


Normalise = Callable[[dict[str, Any]], dict[str, Any]]


def assert_in_order(text: str, parts: list[str]) -> None:
    """Every part occurs in ``text``, in this order (plain substrings, no wildcards)."""
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= 0, f"{part!r} not found after position {position} in:\n{text}"
        position = found + len(part)


PASS_AND_FAIL = """
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_holds(measure):
        measure.model("tiny-a", "fp-aaa", revision="r1")
        measure.prompts("harmful", "sha-harmful", 20)
        measure.metric("effect", 0.9, ci=(0.7, 1.1), n=20, units="d")
        measure.check("GT-HALF", 0.9, ci=(0.7, 1.1), n=20)

    @pytest.mark.claim("GT-HALF", "LT-POINT")
    def test_does_not_hold(measure):
        measure.model("tiny-a", "fp-aaa")
        measure.check("LT-POINT", 0.05)
        measure.check("GT-HALF", 0.6, ci=(0.3, 0.9), n=20, detail="layer 4")
"""


def test_passing_and_failing_hypothesis(bench: Bench) -> None:
    bench.write_tests(PASS_AND_FAIL)
    result = bench.run()
    result.assert_outcomes(passed=1, failed=1)
    output = result.stdout.str()
    assert_in_order(
        output,
        [
            "HypothesisFailure: Hypothesis GT-HALF v2 FAILED for model 'tiny-a'",
            "statement: The effect is larger than one half.",
            "measured:  effect = 0.6 [0.3, 0.9], n = 20",
            "claim:     effect > 0.5 judged on the lower bound -> lower bound 0.3 > 0.5: "
            "does not hold",
            "source:    unit-test seed: d = 0.9",
            "test:      test_exp.py::test_does_not_hold",
            "detail:    layer 4",
        ],
    )
    # terminal summary: compact verdicts, then where the reports are
    result.stdout.re_match_lines(
        [
            r".*refusalbench hypothesis verdicts.*",
            r"hypothesis +model +verdict +value \[lo, hi\] +threshold +test",
            r"GT-HALF +tiny-a +fail +0\.6 \[0\.3, 0\.9\] +> 0\.5 \(lower\) +.*test_does_not_hold",
            r"GT-HALF +tiny-a +pass +0\.9 \[0\.7, 1\.1\] +> 0\.5 \(lower\) +.*test_holds",
            r"LT-POINT +tiny-a +pass +0\.05 +< 0\.1 \(point\) +.*test_does_not_hold",
        ]
    )
    assert_in_order(
        output,
        [
            "refusalbench reports",
            f"JSON report: {bench.json_path}",
            f"HTML report: {bench.html_path}",
        ],
    )
    doc = bench.report()
    assert doc["complete"] is True
    assert doc["exit_status"] == 1
    assert doc["summary"]["outcomes"] == {"passed": 1, "failed": 1, "skipped": 0, "error": 0}
    assert doc["summary"]["verdicts"] == {"pass": 2, "fail": 1, "skipped": 0, "error": 0}
    failing = bench.test(doc, "test_does_not_hold")
    assert failing["outcome"] == "failed"
    assert "Hypothesis GT-HALF v2 FAILED" in failing["longrepr"]
    assert [c["verdict"] for c in failing["checks"]] == ["pass", "fail"]
    holding = bench.test(doc, "test_holds")
    assert holding["longrepr"] is None
    assert holding["metrics"][0]["units"] == "d"
    assert holding["model"] == "tiny-a"
    assert [t["nodeid"] for t in doc["tests"]] == sorted(t["nodeid"] for t in doc["tests"])


def test_provenance(bench: Bench) -> None:
    bench.write_tests(PASS_AND_FAIL)
    bench.run("-k", "holds")
    prov = bench.report()["provenance"]
    assert prov["models"] == [
        {
            "name": "tiny-a",
            "fingerprint": "fp-aaa",
            "info": {"revision": "r1"},
            "tests": ["test_exp.py::test_holds"],
        }
    ]
    assert prov["prompt_sets"][0] == {
        "name": "harmful",
        "sha256": "sha-harmful",
        "n": 20,
        "tests": ["test_exp.py::test_holds"],
    }
    assert "-k" in prov["invocation"]["args"]
    assert prov["options"]["hypotheses"] == "hyp.toml"
    assert prov["options"]["no_report"] is False
    assert prov["packages"]["pytest"] == pytest.__version__
    assert set(prov["git"]) >= {"commit", "dirty"}
    assert prov["machine"]["cpu_count"] >= 1
    assert prov["machine"]["native_bf16"] in (True, False)  # decides --dtype auto
    assert prov["python"]["version"].startswith("3.")
    assert prov["started_at"] <= prov["finished_at"]
    assert prov["seed"] is None  # no --seed option without the fixtures plugin


def test_unknown_id_is_a_collection_error(bench: Bench) -> None:
    bench.write_tests(
        """
        import pytest

        def test_fine():
            pass

        class TestGroup:
            @pytest.mark.claim("GT-HALF", "NO-SUCH-ID")
            def test_uses_unknown(self, measure):
                pass
        """
    )
    result = bench.run()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert_in_order(
        result.stdout.str(),
        [
            "ERROR collecting test_exp.py",
            "bad hypothesis claim",
            "test_exp.py::TestGroup::test_uses_unknown (test_exp.py:8): unknown hypothesis id "
            f"'NO-SUCH-ID' in @pytest.mark.claim; registry {bench.path / 'hyp.toml'} defines: "
            "GT-HALF, LT-POINT, BETWEEN",
            "1 error during collection",
        ],
    )
    doc = bench.report()
    assert doc["tests"] == []
    (error,) = doc["collection_errors"]
    assert "NO-SUCH-ID" in error["longrepr"]


def test_claim_marker_needs_string_ids(bench: Bench) -> None:
    bench.write_tests(
        """
        import pytest

        @pytest.mark.claim(3)
        def test_bad():
            pass
        """
    )
    result = bench.run()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*claim ids must be strings, got 3*"])


def test_undeclared_check_is_a_clear_error(bench: Bench) -> None:
    bench.write_tests(
        """
        import pytest

        @pytest.mark.claim("GT-HALF")
        def test_x(measure):
            measure.check("LT-POINT", 0.01)
        """
    )
    result = bench.run()
    result.assert_outcomes(failed=1)
    assert (
        "ClaimError: measure.check('LT-POINT'): test test_exp.py::test_x does not declare"
        in result.stdout.str()
    )


SOFT = """
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_explicit(measure):
        measure.model("tiny-a", "fp-aaa")
        for layer, lo in enumerate([0.6, 0.1, 0.7, 0.2]):
            measure.check("GT-HALF", lo + 0.1, ci=(lo, lo + 0.2), label=f"layer {layer}",
                          hard=False)
        measure.assert_all()

    @pytest.mark.claim("GT-HALF")
    def test_forgot_assert_all(measure):
        measure.check("GT-HALF", 0.2, ci=(0.1, 0.3), hard=False)
        measure.check("GT-HALF", 0.9, ci=(0.8, 1.0), hard=False, label="second")

    @pytest.mark.claim("GT-HALF")
    def test_all_soft_pass(measure):
        measure.check("GT-HALF", 0.9, ci=(0.8, 1.0), hard=False)
"""


def test_soft_checks_are_all_recorded_and_reported(bench: Bench) -> None:
    bench.write_tests(SOFT)
    result = bench.run()
    result.assert_outcomes(passed=1, failed=2)
    assert_in_order(
        result.stdout.str(),
        [
            "2 hypothesis check(s) failed in test_exp.py::test_explicit:",
            "[1] Hypothesis GT-HALF v2 FAILED for model 'tiny-a' [layer 1]",
            "[2] Hypothesis GT-HALF v2 FAILED for model 'tiny-a' [layer 3]",
            "1 hypothesis check(s) failed in test_exp.py::test_forgot_assert_all:",
        ],
    )
    doc = bench.report()
    explicit = bench.test(doc, "test_explicit")
    assert [(c["label"], c["verdict"]) for c in explicit["checks"]] == [
        ("layer 0", "pass"),
        ("layer 1", "fail"),
        ("layer 2", "pass"),
        ("layer 3", "fail"),
    ]
    forgot = bench.test(doc, "test_forgot_assert_all")
    assert forgot["outcome"] == "failed"
    assert [c["verdict"] for c in forgot["checks"]] == ["fail", "pass"]


def test_declared_claims_never_vanish(bench: Bench) -> None:
    bench.write_tests(
        """
        import pytest

        @pytest.mark.claim("GT-HALF")
        def test_crashes(measure):
            measure.model("tiny-a", "fp-aaa")
            raise RuntimeError("model exploded")

        @pytest.mark.claim("LT-POINT")
        def test_never_checks(measure):
            pass

        @pytest.mark.claim("BETWEEN")
        def test_skips(measure):
            measure.skip("BETWEEN", "needs two categories")

        @pytest.mark.claim("GT-HALF")
        @pytest.mark.skip(reason="no GPU")
        def test_skip_marker():
            pass
        """
    )
    result = bench.run()
    result.assert_outcomes(passed=1, failed=1, skipped=2)
    doc = bench.report()
    crashed = bench.test(doc, "test_crashes")["checks"][0]
    assert crashed["verdict"] == "error"
    assert crashed["model"] == "tiny-a"
    assert (
        "test failed before GT-HALF was checked: RuntimeError: model exploded"
        in (crashed["message"])
    )
    never = bench.test(doc, "test_never_checks")["checks"][0]
    assert never["verdict"] == "error"
    assert "never checked" in never["message"]
    skipped = bench.test(doc, "test_skips")
    assert skipped["skip_reason"] == "BETWEEN: needs two categories"
    assert skipped["checks"][0]["verdict"] == "skipped"
    marker = bench.test(doc, "test_skip_marker")
    assert marker["checks"][0]["verdict"] == "skipped"
    assert "no GPU" in marker["checks"][0]["message"]


def test_two_runs_give_identical_metrics(bench: Bench, normalise: Normalise) -> None:
    bench.write_tests(
        """
        import numpy as np
        import pytest

        @pytest.mark.claim("GT-HALF")
        @pytest.mark.parametrize("seed", [0, 1, 2])
        def test_seeded(measure, seed):
            rng = np.random.default_rng(seed)
            x = rng.normal(1.0, 0.1, size=50)
            measure.model("tiny-a", "fp-aaa")
            measure.metric("mean", x.mean(), ci=(x.mean() - 0.05, x.mean() + 0.05), n=x.size)
            measure.table("values", ["i", "x"], [[i, v] for i, v in enumerate(x[:5])])
            measure.plot("x", "hist", values=x, bins=10)
            measure.check("GT-HALF", x.mean(), ci=(x.min(), x.max()))
        """
    )
    bench.run().assert_outcomes(passed=3)
    first = bench.report()
    bench.run().assert_outcomes(passed=3)
    second = bench.report()
    assert normalise(first) == normalise(second)
    assert first["tests"][0]["metrics"] == second["tests"][0]["metrics"]


# -- options -------------------------------------------------------------------------------------


def test_options_are_listed_in_one_group(bench: Bench) -> None:
    result = bench.pytester.runpytest(*bench.plugin_args, "--help")
    result.stdout.fnmatch_lines(
        [
            "refusalbench reports*",
            "*--hypotheses=PATH*",
            "*--report-json=PATH*",
            "*--report-html=PATH*",
            "*--no-report*",
            "*--baseline=PATH*",
            "*--update-baseline*",
        ]
    )


def test_default_paths_are_relative_to_rootdir(bench: Bench, registry_toml: str) -> None:
    (bench.path / "benchmarks").mkdir()
    (bench.path / "benchmarks" / "hypotheses.toml").write_text(registry_toml, encoding="utf-8")
    (bench.path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n", encoding="utf-8")
    bench.write_tests(PASS_AND_FAIL)
    result = bench.pytester.runpytest(*bench.plugin_args)
    result.assert_outcomes(passed=1, failed=1)
    doc = bench.report(bench.path / "reports" / "out" / "report.json")
    assert doc["registry"]["path"] == str(bench.path / "benchmarks" / "hypotheses.toml")
    assert (bench.path / "reports" / "out" / "report.html").is_file()


def test_custom_report_paths(bench: Bench) -> None:
    bench.write_tests(PASS_AND_FAIL)
    bench.run("--report-json=a/b/r.json", "--report-html=c/r.html")
    bench.report(bench.path / "a" / "b" / "r.json")
    assert (bench.path / "c" / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not bench.json_path.exists()


def test_no_report_writes_nothing(bench: Bench) -> None:
    bench.write_tests(PASS_AND_FAIL)
    result = bench.run("--no-report")
    result.assert_outcomes(passed=1, failed=1)
    assert not list(bench.path.rglob("*.json"))
    assert not list(bench.path.rglob("*.html"))
    assert "JSON report:" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hypotheses=missing.toml"], "--hypotheses missing.toml: no such file"),
        (["--hypotheses=bad.toml"], "bad comparison '=~'"),
        (["--report-json=adir"], "is a directory"),
        (["--report-html=afile/x.html"], "is not a directory"),
        (["--no-report", "--report-json=x.json"], "--no-report cannot be combined"),
        (["--baseline=missing.json"], "no such file (create it with --update-baseline)"),
        (["--baseline=not-a-report.json"], "is not valid JSON"),
        (["--baseline=wrong-shape.json"], "is not a valid refusalbench report"),
        (["--update-baseline"], "--update-baseline needs --baseline PATH"),
    ],
)
def test_bad_option_values_are_usage_errors(bench: Bench, args: list[str], message: str) -> None:
    (bench.path / "bad.toml").write_text(
        'registry_version = 1\n[[hypothesis]]\nid = "X"\nversion = 1\nstatement = "s"\n'
        'source = "d"\nmetric = "m"\ncomparison = "=~"\nthreshold = 1\nbound = "point"\n',
        encoding="utf-8",
    )
    (bench.path / "adir").mkdir()
    (bench.path / "afile").write_text("", encoding="utf-8")
    (bench.path / "not-a-report.json").write_text("{oops", encoding="utf-8")
    (bench.path / "wrong-shape.json").write_text(json.dumps({"tests": []}), encoding="utf-8")
    bench.write_tests("def test_x():\n    pass\n")
    base = list(bench.plugin_args)
    if not any(a.startswith("--hypotheses") for a in args):
        base.append("--hypotheses=hyp.toml")
    result = bench.pytester.runpytest(*base, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# -- runs that do not finish ---------------------------------------------------------------------


def test_interrupted_run_keeps_finished_tests(bench: Bench) -> None:
    bench.write_tests(
        """
        import pytest

        @pytest.mark.claim("GT-HALF")
        def test_1_done(measure):
            measure.model("tiny-a", "fp-aaa")
            measure.check("GT-HALF", 0.9, ci=(0.8, 1.0))

        def test_2_interrupt():
            raise KeyboardInterrupt

        def test_3_never_runs():
            pass
        """
    )
    result = bench.run_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    doc = bench.report()
    assert doc["complete"] is False
    assert doc["interrupted"] is True
    assert [t["nodeid"] for t in doc["tests"]] == ["test_exp.py::test_1_done"]
    assert doc["tests"][0]["checks"][0]["verdict"] == "pass"


def test_killed_run_leaves_the_tests_finished_so_far(bench: Bench) -> None:
    bench.write_tests(
        """
        import os
        import signal

        def test_1_done(measure):
            measure.metric("x", 1.0)

        def test_2_killed():
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = bench.run_subprocess()
    assert result.ret != 0
    doc = bench.report()
    assert doc["complete"] is False
    assert doc["exit_status"] is None
    assert [t["nodeid"] for t in doc["tests"]] == ["test_exp.py::test_1_done"]
    assert not [p for p in bench.json_path.parent.iterdir() if p.name.endswith(".tmp")]
