"""The registry lock: a claim never changes without a version bump."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reports
from reports.registry import load_registry, lock_path, lock_problems, make_lock, read_lock

REPO = Path(reports.__file__).resolve().parents[1]
REGISTRY = REPO / "benchmarks" / "hypotheses.toml"


def test_the_committed_lock_matches_the_registry() -> None:
    violations, stale = lock_problems(load_registry(REGISTRY), read_lock(lock_path(REGISTRY)))
    assert violations == [] and stale == [], (
        "refresh the lock with `python -m reports lock` after bumping versions")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    target = tmp_path / "hypotheses.toml"
    shutil.copyfile(REGISTRY, target)
    shutil.copyfile(lock_path(REGISTRY), lock_path(target))
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _lock_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reports", "lock", *map(str, args)],
                          capture_output=True, text=True, check=False, cwd=REPO)


def test_an_edit_without_a_bump_is_refused(copy: Path) -> None:
    _edit(copy, "threshold = 0.5\nbound = \"lower\"\ntolerance = 0.25",
          "threshold = 0.4\nbound = \"lower\"\ntolerance = 0.25")
    violations, _ = lock_problems(load_registry(copy), read_lock(lock_path(copy)))
    assert len(violations) == 1 and "LAYER-VALID" in violations[0]
    assert "without a version bump" in violations[0]
    done = _lock_cli(copy)
    assert done.returncode == 1 and "not allowed: LAYER-VALID" in done.stderr
    assert read_lock(lock_path(copy)) == read_lock(lock_path(REGISTRY))  # nothing written


def test_a_bumped_edit_is_stale_until_relocked(copy: Path) -> None:
    _edit(copy, 'id = "LAYER-VALID"\nversion = 4', 'id = "LAYER-VALID"\nversion = 5')
    _edit(copy, "threshold = 0.5\nbound = \"lower\"\ntolerance = 0.25",
          "threshold = 0.4\nbound = \"lower\"\ntolerance = 0.25")
    violations, stale = lock_problems(load_registry(copy), read_lock(lock_path(copy)))
    assert violations == [] and stale == ["LAYER-VALID: version 4 -> 5"]
    assert _lock_cli(copy, "--check").returncode == 1
    assert _lock_cli(copy).returncode == 0
    assert _lock_cli(copy, "--check").returncode == 0


def test_a_removed_id_stays_retired() -> None:
    registry = load_registry(REGISTRY)
    lock = make_lock(registry, {"OLD-CLAIM": {"version": 2, "claim_sha256": "x"}})
    assert lock["claims"]["OLD-CLAIM"] == {"version": 2, "claim_sha256": "x", "retired": True}


def test_the_plugin_refuses_a_registry_that_breaks_its_lock(
    copy: Path, pytester: pytest.Pytester
) -> None:
    _edit(copy, "threshold = 0.5\nbound = \"lower\"\ntolerance = 0.25",
          "threshold = 0.4\nbound = \"lower\"\ntolerance = 0.25")
    pytester.makepyfile("def test_nothing():\n    assert True\n")
    result = pytester.runpytest("-p", "reports.plugin", f"--hypotheses={copy}", "--no-report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "breaks its lock" in result.stderr.str()
