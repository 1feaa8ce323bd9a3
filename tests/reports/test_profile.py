"""The time profile of a run: per test and per module, by kind of work (probes.timing).

A tiny model runs a suite through both plugins in a subprocess: one test captures
activations, generates and judges, then sleeps (statistics); another only sleeps. The
counters must add up (kinds never exceed the wall time), show each kind where it happened
and none where it did not, and reach the JSON report, the terminal, the HTML page and
``python -m perf --sections bench-profile``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from probes.timing import KINDS, REST, WorkClock

REPO = Path(__file__).resolve().parents[2]
ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
SLEEP_S = 0.3

SUITE = f"""
import time
from probes.judges import refusal_judge

def test_work(bench, measure):
    harm, _safe = bench.train_pair()
    bench.record_model(measure, harm)
    bench.acts(harm)
    gens = bench.generate(harm, max_new_tokens=3)
    refusal_judge(gens.texts)
    time.sleep({SLEEP_S})

def test_plain(measure):
    time.sleep({SLEEP_S})
"""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """(JSON report, terminal output, report path) of one tiny run in a subprocess."""
    root = tmp_path_factory.mktemp("profiled")
    (root / "conftest.py").write_text(ROOT_CONFTEST)
    (root / "test_exp.py").write_text(SUITE)
    report = root / "out" / "report.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test_exp.py", "-p", "no:cacheprovider",
         "--model", "tiny-llama", "--profile", "quick", "--n-train", "4", "--no-cache",
         f"--cache-dir={root / 'cache'}", f"--report-json={report}",
         f"--report-html={root / 'out' / 'report.html'}"],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
        env={**_env(), "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    doc["_subprocess_wall_s"] = wall
    return doc, proc.stdout, report


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}


def _test(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (test,) = [t for t in doc["tests"] if t["name"].split("[")[0] == name]
    return test


def test_each_kind_shows_where_its_work_happened(
        profiled: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = profiled
    work = _test(doc, "test_work")["profile"]
    for kind in ("prefill", "decode", "judge"):
        assert work[kind] > 0, (kind, work)
    assert work[REST] >= SLEEP_S * 0.9  # the sleep is neither model work nor judging
    plain = _test(doc, "test_plain")["profile"]
    assert all(plain[k] == 0 for k in KINDS), plain
    assert plain[REST] >= SLEEP_S * 0.9
    # the model is loaded while tests are collected (parametrisation): outside every test
    assert doc["profile"]["outside_tests"]["load"] > 0


def test_the_kinds_add_up_to_at_most_the_wall_time(
        profiled: tuple[dict[str, Any], str, Path]) -> None:
    doc, _, _ = profiled
    for test in doc["tests"]:
        prof = test["profile"]
        assert sum(prof[k] for k in KINDS) <= prof["wall_s"] + 1e-6
        assert sum(prof[k] for k in (*KINDS, REST)) == pytest.approx(prof["wall_s"], abs=1e-5)
    total = doc["profile"]["total"]
    assert total["tests"] == 2
    (module,) = doc["profile"]["modules"]
    assert module["module"] == "test_exp.py" and module["tests"] == 2
    for key in ("wall_s", *KINDS, REST):
        assert module[key] == pytest.approx(sum(t["profile"][key] for t in doc["tests"]),
                                            abs=1e-5)
    outside = sum(doc["profile"]["outside_tests"].values())
    assert total["wall_s"] + outside <= doc["_subprocess_wall_s"]


def test_the_profile_reaches_terminal_and_html(
        profiled: tuple[dict[str, Any], str, Path]) -> None:
    _, out, report = profiled
    assert "refusalbench time by module and kind of work" in out
    assert "test_exp.py" in out and "outside tests (collection)" in out
    html = report.with_name("report.html").read_text()
    assert "Time by module and kind of work" in html


def test_perf_bench_profile_reads_the_report(
        profiled: tuple[dict[str, Any], str, Path], tmp_path: Path) -> None:
    doc, _, report = profiled
    out = tmp_path / "perf.json"
    proc = _perf("--sections", "bench-profile", "--bench-report", str(report), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bench-profile" in proc.stdout and "test_exp.py" in proc.stdout
    entry = json.loads(out.read_text())["bench_profile"]
    assert entry["profile"] == doc["profile"]
    assert entry["table"]["rows"][0][0] == "test_exp.py"


def test_perf_bench_profile_without_a_report_says_so(tmp_path: Path) -> None:
    """The fault: no `make bench` report yet. A message and hint, exit status 1."""
    out = tmp_path / "perf.json"
    proc = _perf("--sections", "bench-profile", "--bench-report", str(tmp_path / "none.json"),
                 "--out", str(out))
    assert proc.returncode == 1
    assert "no report at" in proc.stdout and "make bench" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "error" in json.loads(out.read_text())["bench_profile"]


def _perf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "perf", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def test_nested_sections_count_once_as_the_outer_kind() -> None:
    clock = WorkClock()
    # a judge's own forward pass counts as judging time
    with clock.section("judge"), clock.section("prefill"):
        time.sleep(0.02)
    spent = clock.snapshot()
    assert spent["judge"] >= 0.02 and spent["prefill"] == 0
    assert clock.calls()["judge"] == 1
    with pytest.raises(ValueError, match="unknown kind"), clock.section("thinking"):
        pass
