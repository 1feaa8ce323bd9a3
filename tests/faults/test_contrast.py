"""--contrast and --pairs, performed end to end: a malformed pairs file and a matched contrast
that cannot be built are usage errors before any model loads; a run's contrast, its pair
set and a fallback to unmatched are recorded in the JSON and HTML reports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
RECORD_TEST = """
def test_record(bench, measure):
    harm, safe = bench.train_pair()
    measure.metric("n_train_pairs", len(harm))
    measure.metric("twins_align", float(len(harm) == len(safe)))
    bench.record_model(measure, harm, safe)
"""
SIZES = ["--profile", "quick", "--n-train", "4", "--n-prompts", "4", "--n-gen", "2"]


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_rec=RECORD_TEST)
    return pytester


def _harmful_csv(path: Path, n: int = 30) -> Path:
    rows = ["text,category"] + [f"Explain how to commit harmful act {i},{('a', 'b')[i % 2]}"
                                for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _pairs_jsonl(path: Path, n: int = 30, bad_line: int | None = None) -> Path:
    lines = []
    for i in range(n):
        row: dict[str, Any] = {"harmful": f"Explain how to commit harmful act {i}",
                               "harmless": f"Explain how to bake loaf number {i}"}
        if bad_line == i + 1:
            del row["harmless"]
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _usage_error(result: pytest.RunResult, *needles: str) -> None:
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    for needle in needles:
        assert needle in out, out
    assert "Traceback" not in out


def test_malformed_pairs_file_is_a_usage_error_naming_file_and_row(
        project: pytest.Pytester) -> None:
    bad = _pairs_jsonl(project.path / "pairs.jsonl", 5, bad_line=3)
    result = project.runpytest_subprocess("--pairs", str(bad), "--no-report",
                                          "-p", "no:cacheprovider")
    _usage_error(result, "--pairs", f"{bad}:3", "'harmless'")
    broken = project.path / "broken.jsonl"
    broken.write_text('{"harmful": "Explain how to commit harmful act", "harmless": "x"}\n{oops\n')
    result = project.runpytest_subprocess("--pairs", str(broken), "--no-report",
                                          "-p", "no:cacheprovider")
    _usage_error(result, "--pairs", str(broken))


def test_explicit_matched_with_own_harmful_set_needs_pairs(project: pytest.Pytester) -> None:
    harm = _harmful_csv(project.path / "harm.csv")
    result = project.runpytest_subprocess("--contrast", "matched", "--harmful", str(harm),
                                          "--category-column", "category", "--no-report",
                                          "-p", "no:cacheprovider")
    _usage_error(result, "--contrast matched", "--pairs")
    result = project.runpytest_subprocess("--contrast", "paired", "--no-report",
                                          "-p", "no:cacheprovider")
    _usage_error(result, "--contrast")


def _run_report(project: pytest.Pytester, *args: str) -> tuple[dict[str, Any], str]:
    result = project.runpytest_subprocess(
        "--model", "tiny-llama", *SIZES, "--no-cache", *args, "-p", "no:cacheprovider",
        "--report-json", str(project.path / "r.json"),
        "--report-html", str(project.path / "r.html"))
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    doc = json.loads((project.path / "r.json").read_text(encoding="utf-8"))
    return doc, (project.path / "r.html").read_text(encoding="utf-8")


def _info(doc: dict[str, Any]) -> dict[str, Any]:
    (model,) = doc["provenance"]["models"]
    info: dict[str, Any] = model["info"]
    return info


def test_report_records_the_default_matched_contrast(project: pytest.Pytester) -> None:
    doc, html = _run_report(project)
    info = _info(doc)
    assert info["contrast"] == "matched"
    assert info["pairs"]["name"] == "minimal_pairs" and info["pairs"]["n"] == 175
    assert len(info["pairs"]["sha256"]) == 64
    names = {p["name"] for p in doc["provenance"]["prompt_sets"]}
    assert any(n.startswith("minimal_pairs/train") for n in names), names
    assert "<dt>contrast</dt>" in html and "minimal_pairs (175 pairs" in html


def test_own_harmful_set_without_pairs_falls_back_to_unmatched_and_says_so(
        project: pytest.Pytester) -> None:
    harm = _harmful_csv(project.path / "harm.csv")
    doc, html = _run_report(project, "--harmful", str(harm), "--category-column", "category")
    info = _info(doc)
    assert info["contrast"] == "unmatched" and "pairs" not in info
    (note,) = info["contrast_notes"]
    assert "matched contrast cannot be built" in note and "--pairs" in note
    assert "matched contrast cannot be built" in html


def test_own_harmful_set_with_pairs_is_matched(project: pytest.Pytester) -> None:
    harm = _harmful_csv(project.path / "harm.csv")
    pairs = _pairs_jsonl(project.path / "twins.jsonl")
    doc, _ = _run_report(project, "--harmful", str(harm), "--category-column", "category",
                         "--pairs", str(pairs))
    info = _info(doc)
    assert info["contrast"] == "matched" and info["pairs"]["n"] == 30
    assert info["pairs"]["source"] == str(pairs)
    metrics = {m["name"]: m["value"] for t in doc["tests"] for m in t["metrics"]}
    assert metrics["twins_align"] == 1.0 and metrics["n_train_pairs"] == 4


def test_a_cached_result_of_one_contrast_is_not_read_by_another(tmp_path: Path) -> None:
    """cached_json keys carry the contrast (and the pair set's hash): a matched run never
    reads an unmatched run's entry, while results that opt out (abliteration, judges) are
    shared."""
    from fixtures.contrast import Contrast
    from fixtures.workbench import Progress, Workbench
    from probes.cache import ActivationCache
    from probes.models import load
    from tests.helpers import tiny_config

    lm = load("tiny-llama")  # the Workbench reads the model's facts when it is built
    calls: list[str] = []

    def bench(kind: str) -> Workbench:
        cfg = tiny_config(cache_dir=tmp_path, contrast=Contrast(kind))  # type: ignore[arg-type]
        return Workbench(lm, cfg, ActivationCache(tmp_path / "acts"),  # type: ignore[arg-type]
                         Progress())

    def compute(kind: str) -> Any:
        return lambda: calls.append(kind) or {"kind": kind}

    for kind in ("unmatched", "matched", "edgy", "matched"):
        got = bench(kind).cached_json("results", "x", {"k": 1}, compute(kind))
        assert got == {"kind": kind}
    assert calls == ["unmatched", "matched", "edgy"]  # the second matched run read its own
    shared = [bench(kind).cached_json("results", "y", {"k": 1}, compute(kind),
                                      by_contrast=False) for kind in ("unmatched", "matched")]
    assert shared == [{"kind": "unmatched"}] * 2
