"""Faults of ``python -m reports verdicts`` (same answers after a suite change?), performed.

Each test writes the bad input a user can hand the command (a missing or unreadable file, a
report cut short, one with a field missing, the report of a run still going, a report of
another model, a malformed --max-widen) and asserts exit status 2 or 3 with a message that
names the file and the problem, never a traceback or a "same answers".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import reports
from tests.helpers import report_check, synthetic_report

REPO_ROOT = Path(reports.__file__).resolve().parents[1]


def verdicts(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, on this checkout's code."""
    return subprocess.run([sys.executable, "-m", "reports", "verdicts", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write(tmp_path / "good.json", synthetic_report([report_check()]))


def assert_bad_input(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "same answers" not in done.stdout
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_missing_file_and_a_directory(good: Path, tmp_path: Path) -> None:
    assert_bad_input(verdicts(good, tmp_path / "nope.json", cwd=tmp_path),
                     "cannot read report", "nope.json")
    assert_bad_input(verdicts(tmp_path, good, cwd=tmp_path), "cannot read report")


def test_truncated_and_non_utf8_files(good: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text(good.read_text(encoding="utf-8")[:200], encoding="utf-8")
    assert_bad_input(verdicts(good, cut, cwd=tmp_path), "cut.json is not valid JSON (line")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{not text")
    assert_bad_input(verdicts(binary, good, cwd=tmp_path), "binary.json is not UTF-8")
    empty = tmp_path / "empty.json"
    empty.write_text("", encoding="utf-8")
    assert_bad_input(verdicts(good, empty, cwd=tmp_path), "empty.json is not valid JSON")


def test_missing_and_mistyped_fields_are_named(good: Path, tmp_path: Path) -> None:
    doc = synthetic_report([report_check()])
    del doc["tests"][0]["checks"][0]["ci"]
    no_ci = write(tmp_path / "no-ci.json", doc)
    assert_bad_input(verdicts(good, no_ci, cwd=tmp_path),
                     "not a valid refusalbench report at tests/0/checks/0", "'ci'")
    doc = synthetic_report([report_check()])
    doc["registry"]["registry_version"] = "six"
    assert_bad_input(verdicts(write(tmp_path / "typed.json", doc), good, cwd=tmp_path),
                     "at registry/registry_version")
    assert_bad_input(verdicts(good, write(tmp_path / "list.json", []),  # type: ignore[arg-type]
                              cwd=tmp_path), "list.json is not a valid refusalbench report")


def test_a_report_of_a_run_still_going_is_refused_not_passed(good: Path, tmp_path: Path) -> None:
    """The report a running `make bench` has written so far holds no checks yet."""
    running = write(tmp_path / "running.json", synthetic_report([], complete=False))
    done = verdicts(good, running, cwd=tmp_path)
    assert done.returncode == 3 and "share no check" in done.stderr
    assert "running.json is incomplete" in done.stdout and "same answers" not in done.stdout


def test_a_report_of_another_model_is_refused(good: Path, tmp_path: Path) -> None:
    other = write(tmp_path / "other.json",
                  synthetic_report([report_check(model="k")], models=[("k", "fp-k")]))
    done = verdicts(good, other, cwd=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "are runs of different models" in done.stderr and "fp-k" in done.stderr
    assert "--allow-model-change" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["-0.1", "abc", "nan", "inf"])
def test_a_malformed_max_widen_is_a_usage_error(good: Path, tmp_path: Path, value: str) -> None:
    done = verdicts(good, good, f"--max-widen={value}", cwd=tmp_path)
    assert done.returncode == 2 and "is not a non-negative fraction" in done.stderr
    assert "Traceback" not in done.stderr
