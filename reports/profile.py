"""Where a benchmark run's time went: the report's ``profile`` section, by module and kind.

Each test's entry carries ``profile``: its wall time (setup to teardown) split into the
kinds of work of :mod:`probes.timing` (``load``, ``prefill``, ``decode``, ``judge``) and
``statistics``, the rest. This module sums them per benchmark module and over the run, adds
the work done outside every test (models loaded while tests were collected), and renders the
sums as a table for the terminal, the HTML page and ``python -m perf --sections
bench-profile``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from probes.timing import KINDS, REST

__all__ = ["COLUMNS", "one_test_profile", "profile_rows", "profile_section", "profile_table"]

COLUMNS = (*KINDS, REST)


def one_test_profile(wall_s: float, spent: Mapping[str, float]) -> dict[str, float]:
    """One test's entry: ``wall_s`` and the seconds of each column (the rest >= 0)."""
    out = {"wall_s": round(float(wall_s), 6)}
    kinds = {k: max(float(spent.get(k, 0.0)), 0.0) for k in KINDS}
    for k in KINDS:
        out[k] = round(kinds[k], 6)
    out[REST] = round(max(float(wall_s) - sum(kinds.values()), 0.0), 6)
    return out


def _add(into: dict[str, float], entry: Mapping[str, Any]) -> None:
    for key in ("wall_s", *COLUMNS):
        into[key] = into.get(key, 0.0) + float(entry.get(key, 0.0) or 0.0)


def _rounded(entry: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in entry.items()}


def profile_section(tests: Iterable[Mapping[str, Any]],
                    outside: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The report's ``profile``: per module (tests, wall and kinds summed), the run total, and
    ``outside_tests``, the kinds of work done outside every test (None when unknown: the
    tests ran in pytest-xdist workers, whose collection-time work the controller cannot see)."""
    modules: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    total = dict.fromkeys(("wall_s", *COLUMNS), 0.0)
    for test in tests:
        entry = test.get("profile")
        if not entry:
            continue
        module = str(test.get("module") or test.get("nodeid", "?"))
        _add(modules.setdefault(module, {}), entry)
        counts[module] = counts.get(module, 0) + 1
        _add(total, entry)
    rows = [{"module": m, "tests": counts[m], **_rounded(modules[m])} for m in sorted(modules)]
    outside_entry = None
    if outside is not None:
        outside_entry = {k: round(max(float(outside.get(k, 0.0)), 0.0), 6) for k in KINDS}
    return {"columns": list(COLUMNS), "modules": rows,
            "total": {"tests": sum(counts.values()), **_rounded(total)},
            "outside_tests": outside_entry}


def profile_rows(profile: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and text rows: one per module, the total, and the work outside tests."""
    headers = ["module", "tests", "wall s", *(f"{c} s" for c in COLUMNS), "model work %"]
    rows = [_row(str(m["module"]), m) for m in profile.get("modules", [])]
    total = profile.get("total")
    if total and total.get("tests"):
        rows.append(_row("total (tests)", total))
    outside = profile.get("outside_tests")
    if outside and any(float(v) > 0 for v in outside.values()):
        rows.append(["outside tests (collection)", "", "", *(_num(outside.get(c)) for c in KINDS),
                     "", ""])
    return headers, rows


def _num(value: Any) -> str:
    return "" if value is None else f"{float(value):.1f}"


def _row(label: str, entry: Mapping[str, Any]) -> list[str]:
    wall = float(entry.get("wall_s", 0.0) or 0.0)
    work = sum(float(entry.get(k, 0.0) or 0.0) for k in KINDS)
    share = f"{100.0 * work / wall:.0f}" if wall > 0 else ""
    return [label, str(entry.get("tests", "")), _num(wall), *(_num(entry.get(c)) for c in COLUMNS),
            share]


def profile_table(profile: Mapping[str, Any]) -> str:
    """The profile as an aligned text table (empty when no test was profiled)."""
    headers, rows = profile_rows(profile)
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), *(line(r) for r in rows)])
