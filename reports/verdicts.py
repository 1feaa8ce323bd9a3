"""Do two runs reach the same verdicts? A check for changes that should not move results.

The baseline gate (:mod:`reports.baseline`) asks whether a model got worse; this asks
whether a change to the suite (a refactor, a faster path, a cache format) left its answers
alone. Checks are matched by (model, test, hypothesis, label); hypothesis versions are
ignored, since a reworded claim measures the same thing. A verdict that differs is
*changed*, unless the claim's interval straddles its threshold in both runs (*borderline*:
the data decide neither way, so a flip there is resampling noise). An interval more than
``max_widen`` (default 10 %) wider than before is *wider*. The run passes when nothing is
changed, wider or removed.

Example::

    python -m reports verdicts before/report.json after/report.json
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reports.baseline import format_table
from reports.document import all_checks

Key = tuple[str, str, str, str]  # model, nodeid, hypothesis, label


@dataclass(frozen=True)
class VerdictRow:
    key: Key
    status: str  # same changed borderline wider added removed
    old: str | None
    new: str | None
    note: str


def straddles(check: dict[str, Any]) -> bool:
    """Whether the check's interval contains its threshold (either end, for 'between')."""
    ci, threshold = check["ci"], check["threshold"]
    if ci is None or threshold is None:
        return False
    lo, hi = float(ci[0]), float(ci[1])
    ends = threshold if isinstance(threshold, list) else [threshold]
    return any(lo <= float(t) <= hi for t in ends)


def width(check: dict[str, Any]) -> float | None:
    ci = check["ci"]
    return None if ci is None else float(ci[1]) - float(ci[0])


def _index(doc: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    return {(c["model"] or "", t["nodeid"], c["hypothesis"], c["label"]): c
            for t, c in all_checks(doc)}


def compare_verdicts(old: dict[str, Any], new: dict[str, Any], max_widen: float = 0.10
                     ) -> list[VerdictRow]:
    """One row per check present in either report (see the module docstring)."""
    before, after = _index(old), _index(new)
    rows = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            status = "added" if a is None else "removed"
            rows.append(VerdictRow(key, status, None if a is None else str(a["verdict"]),
                                   None if b is None else str(b["verdict"]), ""))
            continue
        old_w, new_w = width(a), width(b)
        if a["verdict"] != b["verdict"]:
            both = straddles(a) and straddles(b)
            rows.append(VerdictRow(key, "borderline" if both else "changed", a["verdict"],
                                   b["verdict"], "interval straddles the threshold in both runs"
                                   if both else ""))
        elif old_w is not None and new_w is not None and new_w > old_w * (1 + max_widen) + 1e-12:
            rows.append(VerdictRow(key, "wider", a["verdict"], b["verdict"],
                                   f"interval width {old_w:.4g} -> {new_w:.4g}"))
        else:
            rows.append(VerdictRow(key, "same", a["verdict"], b["verdict"], ""))
    return rows


def failed(rows: list[VerdictRow]) -> list[VerdictRow]:
    """Rows that say the answers moved: a changed verdict, a wider interval, a lost check."""
    return [r for r in rows if r.status in ("changed", "wider", "removed")]


def format_rows(rows: list[VerdictRow], show_same: bool = False) -> str:
    shown = [r for r in rows if show_same or r.status != "same"]
    lines = []
    if shown:
        lines.append(format_table(
            ["status", "model", "test", "hypothesis", "before", "after", "note"],
            [[r.status, r.key[0] or "-", r.key[1], r.key[2] + (f" [{r.key[3]}]" if r.key[3]
              else ""), r.old or "-", r.new or "-", r.note] for r in shown]))
    counts = {s: sum(r.status == s for r in rows)
              for s in ("same", "changed", "borderline", "wider", "added", "removed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
