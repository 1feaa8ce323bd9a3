"""Experiment pages' results sections, generated from a JSON report.

Each benchmark module ``benchmarks/test_<name>.py`` has a page ``<name>.md`` (by default in
``docs/experiments/``). The page is written by hand except for one section between
:data:`BEGIN` and :data:`END`, which this module rewrites from a report: one row per
hypothesis check (verdict, value, interval, threshold, model) and the run's provenance
(model fingerprint, dtype, profile, date). Keeping figures generated means a page never
quotes a number that no run produced.

    python -m reports results reports/out/report.json -o docs/experiments
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reports.document import ReportError, load_report, write_text_atomic
from reports.measure import format_value

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
DEFAULT_OUTPUT = Path("docs/experiments")
FINGERPRINT_CHARS = 12
WHY_CHARS = 120


@dataclass(frozen=True)
class PageUpdate:
    """What :func:`write_results` did to one page."""

    path: Path
    checks: int
    created: bool


def page_name(module: str) -> str | None:
    """``benchmarks/test_dose_response.py`` -> ``dose_response``; None for non-test modules."""
    stem = Path(module).name.removesuffix(".py")
    if not stem.startswith("test_") or stem == "test_":
        return None
    return stem.removeprefix("test_")


def tests_by_page(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The report's tests grouped by experiment page, in report order."""
    pages: dict[str, list[dict[str, Any]]] = {}
    for test in doc["tests"]:
        name = page_name(test["module"])
        if name is not None:
            pages.setdefault(name, []).append(test)
    return pages


def _threshold_text(check: dict[str, Any]) -> str:
    threshold = check["threshold"]
    if isinstance(threshold, list):
        claim = f"in [{threshold[0]:.4g}, {threshold[1]:.4g}]"
    else:
        claim = f"{check['comparison']} {threshold:.4g}"
    return f"{claim} ({check['bound']})"


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, line breaks flattened."""
    return " ".join(text.split()).replace("|", "\\|")


def _param_id(nodeid: str) -> str:
    """``...::test_x[default-L03]`` -> ``default-L03`` (empty when not parametrised)."""
    name = nodeid.rpartition("::")[2]
    return name[name.find("[") + 1 : -1] if name.endswith("]") and "[" in name else ""


def _why(check: dict[str, Any]) -> str:
    """The reason of a skipped or errored check, short enough for a table cell."""
    why = str(check["detail"] or check["reason"] or "")
    return why if len(why) <= WHY_CHARS else why[: WHY_CHARS - 3] + "..."


def _check_row(test: dict[str, Any], check: dict[str, Any]) -> str:
    hypothesis = f"{check['hypothesis']} v{check['hypothesis_version']}"
    value = format_value(check["value"], None, check["value_flag"])
    if check["verdict"] in ("skipped", "error"):
        value = f"{value if check['verdict'] == 'error' else '-'} ({_why(check)})"
    interval = "-"
    if check["ci"] is not None:
        lo, hi = (f"{v:.4g}" if v is not None else "null" for v in check["ci"])
        interval = f"[{lo}, {hi}]"
    verdict = check["verdict"]
    if verdict in ("fail", "error"):
        verdict = f"**{verdict}**"
    cells = [
        hypothesis,
        check["label"] or _param_id(test["nodeid"]) or "-",
        check["model"] or "-",
        verdict,
        value,
        interval,
        _threshold_text(check),
        "-" if check["n"] is None else str(check["n"]),
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _models(tests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for test in tests:
        for model in test["models"]:
            entry = seen.setdefault((model["name"], model["fingerprint"]), {**model, "info": {}})
            entry["info"].update(model["info"])
    return [seen[key] for key in sorted(seen)]


def _provenance_lines(doc: dict[str, Any], tests: list[dict[str, Any]]) -> list[str]:
    prov = doc["provenance"]
    date = str(prov.get("started_at") or "unknown date")[:10]
    options = prov.get("options") or {}
    lines = []
    for model in _models(tests):
        info = model["info"]
        dtype = str(info.get("dtype", options.get("dtype", "?"))).removeprefix("torch.")
        profile = info.get("profile", options.get("profile", "?"))
        fingerprint = model["fingerprint"][:FINGERPRINT_CHARS]
        judge = f", judge {info['judge']}" if info.get("judge") else ""
        lines.append(
            f"- model `{model['name']}` (fingerprint `{fingerprint}`), dtype {dtype}, "
            f"profile {profile}{judge}, run of {date}"
        )
    if not lines:
        lines.append(f"- no model recorded; run of {date}")
    if not doc.get("complete", True):
        lines.append("- the run did not finish: the report holds the tests completed so far")
    return lines


def results_section(doc: dict[str, Any], tests: list[dict[str, Any]], source: str) -> str:
    """The generated section (markers included) for one page's tests."""
    checks = [check for test in tests for check in test["checks"]]
    verdicts = ("pass", "fail", "skipped", "error")
    counts = {v: sum(c["verdict"] == v for c in checks) for v in verdicts}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no hypothesis checks"
    lines = [
        BEGIN,
        f"<!-- generated from {source} by `python -m reports results`; "
        "edits between the markers are overwritten -->",
        "",
        *_provenance_lines(doc, tests),
        f"- verdicts: {summary}",
        "",
    ]
    if checks:
        lines += [
            "| hypothesis | label | model | verdict | value | interval | claim (bound) | n |",
            "|---|---|---|---|---|---|---|---|",
            *(_check_row(t, c) for t in tests for c in t["checks"]),
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def splice(page: str, section: str, where: str) -> str:
    """Replace the text between the markers of ``page`` (or append the section)."""
    begins, ends = page.count(BEGIN), page.count(END)
    if begins == 0 and ends == 0:
        return page.rstrip("\n") + "\n\n## Results\n\n" + section + "\n"
    start, stop = page.find(BEGIN), page.find(END)
    if begins != 1 or ends != 1 or stop < start:
        raise ReportError(
            f"{where}: expected one {BEGIN} followed by one {END}, found {begins} and {ends}; "
            "fix the markers by hand (the text between them is generated)"
        )
    return page[:start] + section + page[stop + len(END):]


def _new_page(name: str) -> str:
    title = name.replace("_", " ").capitalize()
    return (
        f"# {title}\n\n"
        f"How to run it: `pytest benchmarks/test_{name}.py`.\n"
    )


def write_results(report: Path, output: Path = DEFAULT_OUTPUT) -> list[PageUpdate]:
    """Rewrite the results section of every page the report has tests for."""
    doc = load_report(report)
    pages = tests_by_page(doc)
    if not pages:
        raise ReportError(f"report {report} holds no benchmark tests (modules named test_*.py)")
    if output.exists() and not output.is_dir():
        raise ReportError(f"output {output} is not a directory")
    planned: list[tuple[Path, str, PageUpdate]] = []
    for name, tests in pages.items():  # every page is checked before any is written
        path = output / f"{name}.md"
        created = not path.exists()
        try:
            page = _new_page(name) if created else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"cannot read page {path}: {exc}") from None
        text = splice(page, results_section(doc, tests, report.name), str(path))
        n_checks = sum(len(t["checks"]) for t in tests)
        planned.append((path, text, PageUpdate(path, n_checks, created)))
    for path, text, _ in planned:
        write_text_atomic(path, text)
    return [update for _, _, update in planned]
