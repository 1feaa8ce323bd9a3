"""``python -m reports verdicts``: did a change to the suite keep its answers?

Synthetic reports (``tests.helpers``) exercise each rule: a changed verdict and a wider
interval fail; flips undecided in both runs, checks in one run only and claims whose
version changed are listed, not failed; reports of different models are refused.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from reports.__main__ import main
from reports.verdicts import (
    CHANGED,
    NOT_COMPARABLE,
    ONLY_NEW,
    ONLY_OLD,
    SAME,
    UNDECIDED,
    WIDER,
    compare_verdicts,
    straddles,
)
from tests.helpers import report_check, synthetic_report

if TYPE_CHECKING:
    from conftest import Bench


def _statuses(old: dict[str, Any], new: dict[str, Any], **kw: Any) -> dict[str, str]:
    return {row.key[2]: row.status for row in compare_verdicts(old, new, **kw).rows}


def _one(old_check: dict[str, Any], new_check: dict[str, Any], **kw: Any) -> str:
    comparison = compare_verdicts(synthetic_report([old_check]), synthetic_report([new_check]),
                                  **kw)
    (row,) = comparison.rows
    return row.status


def test_the_same_answers_pass_with_every_check_listed() -> None:
    doc = synthetic_report([report_check("A"), report_check("B", "fail", 0.3, (0.2, 0.4))])
    comparison = compare_verdicts(doc, doc)
    assert [r.status for r in comparison.rows] == [SAME, SAME] and not comparison.failures
    text = comparison.format()
    assert "pass 0.8 [0.6, 1]" in text and "fail 0.3 [0.2, 0.4]" in text
    assert "1.000" in text and "same answers on the 2 check(s)" in text
    assert "t::A" not in comparison.format(brief=True)


def test_a_verdict_that_differs_fails() -> None:
    assert _one(report_check(verdict="pass", ci=(0.6, 0.9)),
                report_check(verdict="fail", ci=(0.3, 0.45))) == CHANGED
    assert _one(report_check(verdict="pass"), report_check(verdict="skipped", ci=None)) == CHANGED


def test_a_flip_is_excused_only_when_both_intervals_straddle_the_threshold() -> None:
    both = compare_verdicts(synthetic_report([report_check(verdict="pass", ci=(0.45, 0.9))]),
                            synthetic_report([report_check(verdict="fail", ci=(0.4, 0.7))]))
    assert [r.status for r in both.rows] == [UNDECIDED] and not both.failures
    assert "undecided in both" in both.format()
    one_side = _one(report_check(verdict="pass", ci=(0.55, 0.9)),
                    report_check(verdict="fail", ci=(0.4, 0.7)))
    assert one_side == CHANGED


def test_an_interval_more_than_ten_percent_wider_fails() -> None:
    old = report_check(ci=(0.6, 0.8))
    assert _one(old, report_check(ci=(0.6, 0.83))) == WIDER  # ratio 1.15
    assert _one(old, report_check(ci=(0.6, 0.82))) == SAME  # ratio 1.10: not more than 10 %
    assert _one(old, report_check(ci=(0.65, 0.75))) == SAME  # narrower
    assert _one(old, report_check(ci=(0.6, 0.82)), max_widen=0.05) == WIDER
    # wider applies whatever the verdicts: an undecided flip with a wider interval fails
    assert _one(report_check(verdict="pass", ci=(0.45, 0.6)),
                report_check(verdict="fail", ci=(0.3, 0.7))) == WIDER


def test_the_width_ratio_is_new_over_old_and_infinite_from_a_point() -> None:
    old = synthetic_report([report_check("A", ci=(0.6, 0.8)), report_check("B", ci=(1.0, 1.0)),
                            report_check("P", value=0.01, ci=None, bound="point")])
    new = synthetic_report([report_check("A", ci=(0.6, 0.9)), report_check("B", ci=(0.9, 1.0)),
                            report_check("P", value=0.02, ci=None, bound="point")])
    comparison = compare_verdicts(old, new)
    ratios = {row.key[2]: row.ratio for row in comparison.rows}
    assert ratios["A"] == pytest.approx(1.5) and math.isinf(ratios["B"] or 0)
    assert ratios["P"] is None
    assert _statuses(old, new) == {"A": WIDER, "B": WIDER, "P": SAME}
    text = comparison.format()
    assert "1.500" in text and "inf" in text


def test_checks_in_one_run_only_are_listed_not_failed() -> None:
    old = synthetic_report([report_check("A"), report_check("GONE")])
    new = synthetic_report([report_check("A"), report_check("NEW", verdict="fail")])
    comparison = compare_verdicts(old, new)
    assert _statuses(old, new) == {"A": SAME, "GONE": ONLY_OLD, "NEW": ONLY_NEW}
    assert not comparison.failures
    assert "1 only in old, 1 only in new" in comparison.format()


def test_a_claim_whose_version_changed_is_not_comparable() -> None:
    old = synthetic_report([report_check("A"), report_check("B", version=1)], registry_version=1)
    new = synthetic_report([report_check("A"), report_check("B", "fail", 0.2, (0.1, 0.3),
                                                            version=2)], registry_version=2)
    comparison = compare_verdicts(old, new)
    assert _statuses(old, new) == {"A": SAME, "B": NOT_COMPARABLE}
    assert not comparison.failures
    text = comparison.format()
    assert "registry_version 1 -> 2" in text and "hypothesis B: version 1 -> 2" in text
    assert "claim version 1 -> 2" in text and "1 not comparable" in text


def test_reports_of_different_models_are_refused() -> None:
    old = synthetic_report([report_check()], models=[("m", "fp-m")])
    other = synthetic_report([report_check(model="k")], models=[("k", "fp-k")])
    refused = compare_verdicts(old, other)
    assert refused.refusals and not refused.rows
    assert "different models" in refused.refusals[0] and "fp-k" in refused.refusals[0]
    reweighted = synthetic_report([report_check()], models=[("m", "fp-m"), ("m", "fp-x")])
    assert not compare_verdicts(old, reweighted).refusals  # the old weights are still there
    retrained = synthetic_report([report_check()], models=[("m", "fp-new"), ("k", "fp-m")])
    assert "'m' has other weights" in compare_verdicts(old, retrained).refusals[0]


def test_a_model_in_one_run_only_and_an_incomplete_run_are_notes() -> None:
    old = synthetic_report([report_check()])
    new = synthetic_report([report_check(), report_check("K", model="k")],
                           models=[("m", "fp-m"), ("k", "fp-k")], complete=False)
    comparison = compare_verdicts(old, new)
    assert not comparison.refusals and not comparison.failures
    assert "model 'k' only in NEW" in comparison.notes
    assert any("NEW is incomplete" in note for note in comparison.notes)


def test_straddles_reads_between_thresholds_and_point_checks() -> None:
    assert straddles(report_check(ci=(0.3, 0.4), threshold=[0.35, 0.65]))
    assert not straddles(report_check(ci=(0.4, 0.6), threshold=[0.35, 0.65]))
    assert not straddles(report_check(ci=None))
    assert not straddles(report_check(ci=(None, 0.9)))


def _write(tmp_path: Path, name: str, doc: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_exit_status_per_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path, "old.json", synthetic_report([report_check()]))
    cases = {
        "same.json": ([report_check()], {}, 0),
        "changed.json": ([report_check(verdict="fail", ci=(0.2, 0.4))], {}, 1),
        "wider.json": ([report_check(ci=(0.5, 1.0))], {}, 1),
        "version.json": ([report_check(version=2)], {"registry_version": 2}, 0),
        "other-model.json": ([report_check(model="k")], {"models": [("k", "fp-k")]}, 3),
    }
    for name, (checks, extra, status) in cases.items():
        new = _write(tmp_path, name, synthetic_report(checks, **extra))
        assert main(["verdicts", str(base), str(new)]) == status, name
    out = capsys.readouterr()
    assert "ANSWERS MOVED: 1 changed" in out.out and "ANSWERS MOVED: 1 wider" in out.out
    assert "comparison refused" in out.err and "Traceback" not in out.err


SUITE = """
    import json
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_effect(measure):
        s = json.load(open("state.json"))
        measure.model("m", "fp-m")
        measure.check("GT-HALF", s["effect"], ci=(s["effect"] - 0.1, s["effect"] + 0.1))
"""


def test_cli_on_reports_the_plugin_wrote(bench: Bench) -> None:
    bench.write_tests(SUITE)
    paths = []
    for name, effect in (("a", 0.9), ("b", 0.91), ("c", 0.3)):
        (bench.path / "state.json").write_text(json.dumps({"effect": effect}))
        path = bench.path / f"{name}.json"
        bench.run(f"--report-json={path}", "--report-html=ignored.html")
        paths.append(path)

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reports", "verdicts", *map(str, args)],
                              cwd=bench.path, capture_output=True, text=True, check=False)

    same = cli(paths[0], paths[1])
    assert same.returncode == 0 and "1 same, 0 changed" in same.stdout
    assert "pass 0.9 [0.8, 1]" in same.stdout and "pass 0.91 [0.81, 1.01]" in same.stdout
    moved = cli(paths[0], paths[2])
    assert moved.returncode == 1 and "verdict pass -> fail" in moved.stdout
    missing = cli(paths[0], Path("nope.json"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
