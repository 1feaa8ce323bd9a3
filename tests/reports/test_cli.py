"""``python -m reports compare`` and ``render`` as a user runs them (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Bench

SUITE = """
    import json
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_effect(measure):
        s = json.load(open("state.json"))
        measure.model(s["model"], "fp-" + s["model"])
        measure.plot("d by layer", "line", x=[0, 1, 2], series={"d": [0.2, s["effect"], 0.9]})
        measure.check("GT-HALF", s["effect"], ci=(s["effect"] - 0.2, s["effect"] + 0.2))
"""


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reports", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def two_reports(bench: Bench) -> tuple[Path, Path]:
    """Reports of two runs: tiny-a (GT-HALF fails) and tiny-b (GT-HALF holds)."""
    bench.write_tests(SUITE)
    paths = []
    for model, effect in (("tiny-a", 0.4), ("tiny-b", 0.9)):
        (bench.path / "state.json").write_text(
            json.dumps({"model": model, "effect": effect}), encoding="utf-8"
        )
        path = bench.path / f"{model}.json"
        bench.run(f"--report-json={path}", "--report-html=ignored.html")
        paths.append(path)
    return paths[0], paths[1]


def test_compare_identical_reports_exits_0(bench: Bench, two_reports: tuple[Path, Path]) -> None:
    old, _ = two_reports
    done = run_cli("compare", old, old, cwd=bench.path)
    assert done.returncode == 0, done.stderr
    assert "0 regression(s), 0 difference(s), 1 unchanged result(s)" in done.stdout


def test_compare_flip_exits_1_with_a_table(bench: Bench, two_reports: tuple[Path, Path]) -> None:
    old, new = two_reports
    # Same model name on both sides, so the verdict of one key flips.
    doc = json.loads(new.read_text(encoding="utf-8"))
    for test in doc["tests"]:
        for check in test["checks"]:
            check["model"] = "tiny-a"
    for model in [*doc["provenance"]["models"], *(m for t in doc["tests"] for m in t["models"])]:
        model.update(name="tiny-a", fingerprint="fp-tiny-a")  # same model: comparable
    renamed = bench.path / "renamed.json"
    renamed.write_text(json.dumps(doc), encoding="utf-8")
    done = run_cli("compare", old, renamed, cwd=bench.path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("status"))
    assert header.split() == [
        "status",
        "model",
        "test",
        "hypothesis",
        "baseline",
        "current",
        "delta",
        "tolerance",
        "note",
    ]
    assert any("REGRESSION flip" in line and "fail -> pass" in line for line in lines)
    assert "1 regression(s)" in done.stdout


def test_render_merges_reports_into_one_matrix(
    bench: Bench, two_reports: tuple[Path, Path]
) -> None:
    out = bench.path / "merged" / "all.html"
    out.parent.mkdir()
    done = run_cli("render", *two_reports, "-o", out, cwd=bench.path)
    assert done.returncode == 0, done.stderr
    html = out.read_text(encoding="utf-8")
    matrix = html[html.index('<table id="matrix">') : html.index("</table>")]
    assert ">tiny-a</th>" in matrix
    assert ">tiny-b</th>" in matrix
    assert 'class="cell v-fail"' in matrix
    assert 'class="cell v-pass"' in matrix
    assert html.count("data:image/svg+xml;base64,") == 2
    assert "run 2" in html


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read report"),
        ("{not json", "is not valid JSON (line 1, column 2)"),
        ('{"tests": []}', "is not a valid refusalbench report"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
@pytest.mark.parametrize("command", ["compare", "render"])
def test_bad_input_is_a_clear_error(
    bench: Bench, command: str, content: str | bytes | None, message: str
) -> None:
    bad = bench.path / "bad.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content, encoding="utf-8")
    args = [bad, bad] if command == "compare" else [bad, "-o", bench.path / "x.html"]
    done = run_cli(command, *args, cwd=bench.path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert message in done.stderr
    assert str(bad) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (bench.path / "x.html").exists()


def test_cli_usage_errors(bench: Bench) -> None:
    done = run_cli("render", cwd=bench.path)
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "Traceback" not in done.stderr
