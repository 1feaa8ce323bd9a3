"""Helpers for the reports plugin tests: every run uses its own tiny registry, no models.

These tests need pytest's ``pytester`` plugin. pytest refuses ``pytest_plugins`` in a
non-root conftest, so it is enabled for the whole suite instead (``-p pytester`` in the
pytest ``addopts``, or ``"pytester"`` in the root conftest's ``pytest_plugins``).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import reports
from reports.document import load_report

REPO_ROOT = Path(reports.__file__).resolve().parents[1]

REGISTRY = """\
registry_version = 3

[[hypothesis]]
id = "GT-HALF"
version = 2
statement = "The effect is larger than one half."
source = { document = "unit-test seed", figure = "d = 0.9" }
metric = "effect"
comparison = ">"
threshold = 0.5
bound = "lower"
tolerance = 0.1

[[hypothesis]]
id = "LT-POINT"
version = 1
statement = "The p-value is below 0.1."
source = { document = "unit-test seed", figure = "p = 0.01" }
metric = "p_value"
comparison = "<"
threshold = 0.1
bound = "point"

[[hypothesis]]
id = "BETWEEN"
version = 1
statement = "Accuracy is at chance."
source = { document = "unit-test seed", figure = "0.5" }
metric = "accuracy"
comparison = "between"
threshold = [0.35, 0.65]
bound = "interval"
tolerance = 0.05
"""


# Inner runs skip plugins they do not need (the hypothesis plugin alone costs ~2 s a run).
FAST_ARGS = (
    "-p",
    "reports.plugin",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
    "-p",
    "no:anyio",
)


@pytest.fixture(scope="session", autouse=True)
def _preload_report_dependencies() -> None:
    """Import the HTML stack once: pytester drops modules first imported inside a run."""
    import jinja2  # noqa: F401
    import matplotlib.backends.backend_agg
    import matplotlib.backends.backend_svg
    import matplotlib.figure  # noqa: F401

    import reports.html  # noqa: F401


@dataclass
class Bench:
    """A pytester project with a registry, and shortcuts to run it and read its report."""

    pytester: pytest.Pytester
    plugin_args: tuple[str, ...] = FAST_ARGS

    @property
    def path(self) -> Path:
        return self.pytester.path

    @property
    def json_path(self) -> Path:
        return self.path / "out" / "report.json"

    @property
    def html_path(self) -> Path:
        return self.path / "out" / "report.html"

    def write_tests(self, source: str, name: str = "test_exp.py") -> Path:
        path = self.path / name
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    def args(self, *extra: str, report: bool = True) -> list[str]:
        base = [*self.plugin_args, "--hypotheses=hyp.toml"]
        if report and not any(a.startswith(("--report-json", "--no-report")) for a in extra):
            base += [f"--report-json={self.json_path}", f"--report-html={self.html_path}"]
        return [*base, *extra]

    def run(self, *extra: str, report: bool = True) -> pytest.RunResult:
        """In-process run; every JSON report it wrote is validated against the schema."""
        args = self.args(*extra, report=report)
        result = self.pytester.runpytest(*args)
        self.validate_outputs(args)
        return result

    def run_subprocess(self, *extra: str, timeout: float = 120) -> pytest.RunResult:
        args = self.args(*extra)
        result = self.pytester.runpytest_subprocess(*args, timeout=timeout)
        self.validate_outputs(args)
        return result

    def validate_outputs(self, args: list[str]) -> None:
        """Validate each report a run may have written: JSON report and baseline."""
        paths = {self.json_path, self.path / "reports" / "out" / "report.json"}
        for arg in args:
            for option in ("--report-json=", "--baseline="):
                if arg.startswith(option):
                    path = Path(arg.removeprefix(option))
                    paths.add(path if path.is_absolute() else self.path / path)
        for path in paths:
            if path.is_file():
                load_report(path)  # raises ReportError if the report breaks the schema

    def report(self, path: Path | None = None) -> dict[str, Any]:
        return load_report(path or self.json_path)

    def test(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        matches = [t for t in doc["tests"] if t["nodeid"].endswith("::" + name)]
        assert len(matches) == 1, [t["nodeid"] for t in doc["tests"]]
        return matches[0]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def registry_toml() -> str:
    """A small registry: a lower-bound claim, a point claim and a between/interval claim."""
    return REGISTRY


@pytest.fixture
def bench(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Bench:
    # Subprocess runs (xdist, interrupts) must import `reports` from this checkout.
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    (pytester.path / "hyp.toml").write_text(REGISTRY, encoding="utf-8")
    return Bench(pytester)


@pytest.fixture
def normalise() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function that drops what legitimately differs between two runs of one suite."""
    return _normalise


def _normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop what legitimately differs between runs: times, invocation, worker ids."""
    doc = json.loads(json.dumps(doc))
    prov = doc["provenance"]
    for key in ("started_at", "finished_at", "duration_s", "invocation", "workers"):
        prov.pop(key, None)
    doc.pop("profile", None)  # seconds, and outside_tests is unknown under xdist
    for test in doc["tests"]:
        test.pop("duration_s")
        test.pop("worker")
        test.pop("profile", None)
    return doc
