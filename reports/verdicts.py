"""Did a change to the suite keep its answers? Two runs compared claim by claim.

The baseline gate (:mod:`reports.baseline`) asks whether a model got worse; this asks
whether a change to the suite (a faster path, a refactor, a cache format) left its answers
alone, on the same model. Checks are matched by (model, test, hypothesis, label), and each
row shows both verdicts, both intervals and the ratio of their widths (new / old).

A row fails the comparison when

* its verdict differs, unless the claim's interval straddles its threshold in both runs
  (*undecided in both*: the data decide neither way, so a flip there is resampling noise);
* its interval is more than ``max_widen`` (default 10 %) wider than before.

Rows present in one run only are listed, not failed (an incomplete run is named in the
notes); rows whose claim version differs are *not comparable* (the claim changed, so its
verdicts say nothing about the change to the suite). Reports of different models (no
weight fingerprint in common, or a model name whose weights changed) are refused.

Example::

    python -m reports verdicts before/report.json after/report.json
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reports.baseline import (
    Key,
    check_cell,
    context_notes,
    describe_models,
    fingerprints,
    format_table,
    index_checks,
    unfinished,
)

SAME = "same"
CHANGED = "changed"
UNDECIDED = "undecided in both"
WIDER = "wider"
ONLY_OLD = "only in old"
ONLY_NEW = "only in new"
NOT_COMPARABLE = "not comparable"
STATUSES = (SAME, CHANGED, UNDECIDED, WIDER, ONLY_OLD, ONLY_NEW, NOT_COMPARABLE)
FAILING = (CHANGED, WIDER)

# Float slack on interval widths: a width is "wider" only beyond rounding of the same number.
_WIDTH_SLACK = 1e-9


@dataclass(frozen=True)
class VerdictRow:
    """One check as both runs saw it; ``ratio`` is new width / old width (None: no interval
    on a side, ``inf``: the old interval was a point)."""

    key: Key
    status: str
    old: str | None  # "pass 0.86 [0.77, 0.96]"
    new: str | None
    ratio: float | None
    note: str

    @property
    def failed(self) -> bool:
        return self.status in FAILING


@dataclass
class VerdictComparison:
    """Rows plus what frames them: refusals (nothing compared) and notes."""

    rows: list[VerdictRow] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[VerdictRow]:
        return [row for row in self.rows if row.failed]

    def counts(self) -> dict[str, int]:
        return {status: sum(row.status == status for row in self.rows) for status in STATUSES}

    def format(self, brief: bool = False) -> str:
        """The table (every row, or with ``brief`` all but the unchanged), notes, a summary."""
        lines = [f"REFUSED: {reason}" for reason in self.refusals]
        lines += [f"note: {note}" for note in self.notes]
        if self.refusals:
            lines.append("nothing compared: the reports are not comparable")
            return "\n".join(lines)
        shown = [row for row in self.rows if not brief or row.status != SAME]
        if shown:
            lines.append(format_table(
                ["status", "model", "test", "hypothesis", "old", "new", "width ratio", "note"],
                [_table_row(row) for row in shown]))
        counts = self.counts()
        lines.append(", ".join(f"{n} {status}" for status, n in counts.items()))
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: did the answers move, on how many checks held in both runs."""
        counts = self.counts()
        both = sum(counts[s] for s in (SAME, CHANGED, UNDECIDED, WIDER))
        if self.failures:
            moved = ", ".join(f"{counts[s]} {s}" for s in FAILING if counts[s])
            return f"ANSWERS MOVED: {moved} of {both} check(s) held in both runs"
        return f"same answers on the {both} check(s) held in both runs"


def _table_row(row: VerdictRow) -> list[str]:
    model, nodeid, hypothesis, label = row.key
    return [row.status, model or "-", nodeid, hypothesis + (f" [{label}]" if label else ""),
            row.old or "-", row.new or "-", format_ratio(row.ratio), row.note]


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return "inf" if math.isinf(ratio) else f"{ratio:.3f}"


def straddles(check: dict[str, Any]) -> bool:
    """Whether the check's interval contains its threshold (either end, for 'between')."""
    ci, threshold = check["ci"], check["threshold"]
    if ci is None or threshold is None or None in ci:
        return False
    lo, hi = float(ci[0]), float(ci[1])
    ends = threshold if isinstance(threshold, list) else [threshold]
    return any(lo <= float(t) <= hi for t in ends)


def width(check: dict[str, Any]) -> float | None:
    """hi - lo of the check's interval; None without one (point checks, a missing end)."""
    ci = check["ci"]
    if ci is None or None in ci:
        return None
    return float(ci[1]) - float(ci[0])


def width_ratio(old_width: float | None, new_width: float | None) -> float | None:
    if old_width is None or new_width is None:
        return None
    if old_width == 0:
        return 1.0 if new_width <= _WIDTH_SLACK else math.inf
    return new_width / old_width


def is_wider(old_width: float | None, new_width: float | None, max_widen: float) -> bool:
    if old_width is None or new_width is None:
        return False
    return new_width > old_width * (1 + max_widen) + _WIDTH_SLACK


def model_refusals(old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str
                   ) -> list[str]:
    """Why two reports are not runs of the same model(s): no fingerprint in common, or a
    model name whose weights changed (its rows would be matched against other weights)."""
    before, after = fingerprints(old), fingerprints(new)
    hint = ("this command checks a change to the suite on the same model; to gate another "
            "model or new weights, use python -m reports compare --allow-model-change")
    shared = set().union(*before.values()) & set().union(*after.values()) if (
        before and after) else set()
    if before and after and not shared:
        return [f"{old_name} and {new_name} are runs of different models ({old_name}: "
                f"{describe_models(before)}; {new_name}: {describe_models(after)}); {hint}"]
    return [
        f"model {name!r} has other weights in {new_name} ({describe_models({name: after[name]})}"
        f") than in {old_name} ({describe_models({name: before[name]})}); {hint}"
        for name in sorted(set(before) & set(after))
        if not before[name] & after[name]
    ]


def model_notes(old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str
                ) -> list[str]:
    """Models run on one side only: their rows are listed as present in one run."""
    before, after = fingerprints(old), fingerprints(new)
    return [f"model {name!r} only in {side}" for side, names in
            ((old_name, sorted(set(before) - set(after))),
             (new_name, sorted(set(after) - set(before)))) for name in names]


def compare_verdicts(old: dict[str, Any], new: dict[str, Any], max_widen: float = 0.10,
                     old_name: str = "OLD", new_name: str = "NEW") -> VerdictComparison:
    """Compare two validated report documents (before the change first); see the module
    docstring for the rules. The names label the two sides in refusals and notes."""
    result = VerdictComparison()
    result.refusals = model_refusals(old, new, old_name, new_name)
    result.notes = context_notes(old, new) + model_notes(old, new, old_name, new_name) + [
        f"{name} is incomplete: {why}; checks it never ran are listed as present in one run"
        for name, why in ((old_name, unfinished(old)), (new_name, unfinished(new))) if why]
    if result.refusals:
        return result
    before, after = index_checks(old), index_checks(new)
    if not set(before) & set(after):
        result.refusals.append(
            f"{old_name} ({len(before)} check(s)) and {new_name} ({len(after)} check(s)) share "
            "no check (model, test, claim): nothing to compare; compare two runs of the same "
            "suite, each with its checks")
        return result
    result.rows = [compare_one(key, before.get(key), after.get(key), max_widen)
                   for key in sorted(set(before) | set(after))]
    return result


def compare_one(key: Key, a: dict[str, Any] | None, b: dict[str, Any] | None,
                max_widen: float) -> VerdictRow:
    """The row of one check: ``a`` from the old run, ``b`` from the new (None: absent)."""
    old_cell = None if a is None else check_cell(a)
    new_cell = None if b is None else check_cell(b)
    if a is None or b is None:
        return VerdictRow(key, ONLY_NEW if a is None else ONLY_OLD, old_cell, new_cell, None, "")
    old_w, new_w = width(a), width(b)
    ratio = width_ratio(old_w, new_w)
    if a["hypothesis_version"] != b["hypothesis_version"]:
        return VerdictRow(key, NOT_COMPARABLE, old_cell, new_cell, ratio,
                          f"claim version {a['hypothesis_version']} -> "
                          f"{b['hypothesis_version']}: the claim changed")
    changed = a["verdict"] != b["verdict"]
    undecided = changed and straddles(a) and straddles(b)
    wider = is_wider(old_w, new_w, max_widen)
    notes = [f"verdict {a['verdict']} -> {b['verdict']}"] if changed else []
    if undecided:
        notes.append("interval straddles the threshold in both runs")
    if wider:
        notes.append(f"interval wider by more than {max_widen:.0%} ({old_w:.4g} -> {new_w:.4g})")
    if changed and not undecided:
        status = CHANGED
    elif wider:
        status = WIDER
    else:
        status = UNDECIDED if undecided else SAME
    return VerdictRow(key, status, old_cell, new_cell, ratio, "; ".join(notes))
