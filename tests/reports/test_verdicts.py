"""``python -m reports verdicts``: same verdicts in two runs, borderline flips excepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reports.verdicts import compare_verdicts, failed, straddles

if TYPE_CHECKING:
    from conftest import Bench


def _check(verdict: str, ci: tuple[float, float] | None, threshold: Any = 0.5,
           hypothesis: str = "H") -> dict[str, Any]:
    return {"model": "m", "hypothesis": hypothesis, "label": "", "verdict": verdict,
            "ci": None if ci is None else list(ci), "threshold": threshold}


def _doc(*checks: dict[str, Any]) -> dict[str, Any]:
    return {"tests": [{"nodeid": f"t::{c['hypothesis']}", "checks": [c]} for c in checks]}


def test_a_flip_is_a_change_unless_both_intervals_straddle_the_threshold() -> None:
    rows = compare_verdicts(_doc(_check("pass", (0.6, 0.9))), _doc(_check("fail", (0.4, 0.7))))
    assert [r.status for r in rows] == ["changed"] and failed(rows)
    rows = compare_verdicts(_doc(_check("pass", (0.45, 0.9))), _doc(_check("fail", (0.4, 0.7))))
    assert [r.status for r in rows] == ["borderline"] and not failed(rows)


def test_a_wider_interval_and_a_lost_check_fail_an_added_one_does_not() -> None:
    old = _doc(_check("pass", (0.6, 0.8)), _check("pass", (0.6, 0.8), hypothesis="G"))
    new = _doc(_check("pass", (0.6, 0.83)), _check("pass", (0.6, 0.8), hypothesis="K"))
    status = {r.key[2]: r.status for r in compare_verdicts(old, new)}
    assert status == {"H": "wider", "G": "removed", "K": "added"}
    within = compare_verdicts(_doc(_check("pass", (0.6, 0.8))), _doc(_check("pass", (0.6, 0.82))))
    assert not failed(within)


def test_straddles_reads_between_thresholds_and_point_checks() -> None:
    assert straddles(_check("fail", (0.3, 0.4), threshold=[0.35, 0.65]))
    assert not straddles(_check("pass", (0.4, 0.6), threshold=[0.35, 0.65]))
    assert not straddles(_check("pass", None))


SUITE = """
    import json
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_effect(measure):
        s = json.load(open("state.json"))
        measure.model("m", "fp-m")
        measure.check("GT-HALF", s["effect"], ci=(s["effect"] - 0.1, s["effect"] + 0.1))
"""


def test_cli_exit_status(bench: Bench) -> None:
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
    moved = cli(paths[0], paths[2])
    assert moved.returncode == 1 and "changed" in moved.stdout
    missing = cli(paths[0], Path("nope.json"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
