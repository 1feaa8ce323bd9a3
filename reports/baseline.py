"""The regression gate: compare this run's verdicts and values with a stored report.

Rows are keyed by (model name, test nodeid, hypothesis id, label). A row is a regression
when a verdict flips between pass and fail (either way: the baseline must be updated on
purpose), when a value moves further than the hypothesis' ``tolerance``, or when a
verdict that existed becomes an error (or its test now fails before checking). Results
present on one side only, skips and fixed errors are listed but do not fail the gate.

Some pairs of reports cannot be compared at all, and the gate refuses them instead of
answering "0 regressions": reports that share no model fingerprint (another model or other
weights) and reports of runs that did not finish (their missing tests would read as
"removed"). Rows of a hypothesis whose version differs between the reports are "not
comparable": the claim changed, so its verdicts say nothing about the model. Differences in
dtype, prompt sets, registry and run options are printed as notes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from reports.document import all_checks
from reports.measure import format_value

Key = tuple[str, str, str, str]  # model ("" when none), nodeid, hypothesis, label


# Run options that say where files go, not what was measured: never a note.
_BOOKKEEPING_OPTIONS = frozenset({
    "baseline", "update_baseline", "report_json", "report_html", "no_report", "hypotheses",
    "cache_dir", "no_cache",
})


@dataclass(frozen=True)
class Row:
    status: str  # same moved flip drift error fixed skipped removed added not_comparable
    regression: bool
    model: str | None
    nodeid: str
    hypothesis: str
    label: str
    old_verdict: str | None
    new_verdict: str | None
    old_value: float | None
    new_value: float | None
    delta: float | None
    tolerance: float | None
    note: str


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    fingerprint_changes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # why the reports cannot be compared
    old_cells: dict[Key, str] = field(default_factory=dict)  # key -> "pass 0.81 [0.7, 0.9]"
    new_cells: dict[Key, str] = field(default_factory=dict)

    @property
    def regressions(self) -> list[Row]:
        return [row for row in self.rows if row.regression]

    @property
    def not_comparable(self) -> list[str]:
        """Hypotheses whose version differs between the reports (rows of both sides exist)."""
        return sorted({row.hypothesis for row in self.rows if row.status == "not_comparable"})

    @property
    def refused(self) -> bool:
        """The reports cannot be compared at all (no rows were compared)."""
        return bool(self.refusals)

    @property
    def gate_fails(self) -> bool:
        """Regressions, a refusal or claims that could not be compared: the gate says no."""
        return bool(self.refusals or self.regressions or self.not_comparable)

    def problems(self) -> list[str]:
        """One line per reason the gate fails, for a terminal or stderr."""
        lines = [f"comparison refused: {reason}" for reason in self.refusals]
        if self.not_comparable:
            lines.append(
                f"not comparable: hypothesis version changed for {', '.join(self.not_comparable)}"
                ": their verdicts cannot be held against the baseline; if the new version is "
                "intended, accept this run as the baseline (pytest --baseline PATH "
                "--update-baseline)"
            )
        return lines

    def as_json(self, path: str) -> dict[str, Any]:
        return {
            "path": path,
            "regressions": len(self.regressions),
            "rows": [asdict(row) for row in self.rows],
            "fingerprint_changes": self.fingerprint_changes,
            "notes": self.notes,
            "refusals": self.refusals,
            "not_comparable": self.not_comparable,
        }

    def format(self, show_same: bool = False) -> str:
        """A plain-text diff table plus notes and a one-line summary."""
        lines = [f"REFUSED: {reason}" for reason in self.refusals]
        for change in self.fingerprint_changes:
            lines.append(
                f"model {change['model']!r}: fingerprint changed "
                f"{', '.join(change['old']) or '-'} -> {', '.join(change['new']) or '-'}"
            )
        lines += self.notes
        if self.refused:
            lines.append("nothing compared: the reports are not comparable")
            return "\n".join(lines)
        shown = [row for row in self.rows if show_same or row.status != "same"]
        if shown:
            headers = [
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
            body = [
                [
                    ("REGRESSION " if row.regression else "") + row.status,
                    row.model or "-",
                    row.nodeid,
                    row.hypothesis + (f" [{row.label}]" if row.label else ""),
                    self.old_cells.get(_row_key(row), "-"),
                    self.new_cells.get(_row_key(row), "-"),
                    "-" if row.delta is None else f"{row.delta:+.4g}",
                    "-" if row.tolerance is None else f"{row.tolerance:.4g}",
                    row.note,
                ]
                for row in shown
            ]
            lines.append(format_table(headers, body))
        same = sum(row.status == "same" for row in self.rows)
        apart = (
            f"{len(self.not_comparable)} claim(s) not comparable, " if self.not_comparable else ""
        )
        lines.append(
            f"{len(self.regressions)} regression(s), {apart}{len(self.rows) - same} "
            f"difference(s), {same} unchanged result(s)"
        )
        return "\n".join(lines)


def compare(
    old: dict[str, Any],
    new: dict[str, Any],
    old_name: str = "the baseline",
    new_name: str = "this run",
    model_change: bool = False,
) -> Comparison:
    """Compare two validated report documents (baseline first).

    Reports that cannot be compared come back with ``refusals`` and no rows; the names
    label the two sides in those messages. ``model_change`` gates a new model (or new
    weights) against the baseline of the one it replaces: each report must hold exactly one
    model, and rows are matched by test and claim with the model's name and test id mapped.
    """
    result = Comparison()
    result.fingerprint_changes = _fingerprint_changes(old, new)
    result.notes = context_notes(old, new) + _model_notes(old, new, old_name, new_name)
    result.refusals = incomplete_reasons(old, old_name) + incomplete_reasons(new, new_name)
    rename: Callable[[str, str], tuple[str, str]] | None = None
    if model_change:
        rename, problems, note = _model_change(old, new, old_name, new_name)
        result.refusals += problems
        result.notes += note
    else:
        result.refusals += _no_shared_model(old, new, old_name, new_name)
    if result.refusals:
        return result
    old_checks = index_checks(old, rename)
    new_checks = index_checks(new)
    new_outcomes = {test["nodeid"]: test["outcome"] for test in new["tests"]}
    for key in sorted(set(old_checks) | set(new_checks)):
        before, after = old_checks.get(key), new_checks.get(key)
        if before is not None:
            result.old_cells[key] = check_cell(before)
        if after is not None:
            result.new_cells[key] = check_cell(after)
        result.rows.append(_compare_one(key, before, after, new_outcomes))
    return result


def context_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How the two runs differ besides their results (registry, dtype, prompt sets, run
    options): each difference explains moved figures without being a regression."""
    return (_registry_notes(old, new) + _dtype_notes(old, new) + _prompt_notes(old, new)
            + _option_notes(old, new))


def incomplete_reasons(doc: dict[str, Any], name: str) -> list[str]:
    """Why ``doc`` is the report of an unfinished run, as a refusal naming ``name``
    (empty when the run finished)."""
    why = unfinished(doc)
    if why is None:
        return []
    return [
        f"{name} is incomplete: {why}; it holds {len(doc['tests'])} test(s), and "
        "tests it never ran would read as removed. Compare reports of finished runs (re-run "
        "the suite; pytest --baseline PATH --update-baseline makes a new baseline)"
    ]


def unfinished(doc: dict[str, Any]) -> str | None:
    """How the run of ``doc`` ended early (None when it finished)."""
    if doc["complete"]:
        return None
    if doc["interrupted"]:
        return "the run was interrupted"
    if doc["exit_status"] is None:
        return "the run did not finish (killed, crashed or still running)"
    return f"the run ended early (exit status {doc['exit_status']})"


def fingerprints(doc: dict[str, Any]) -> dict[str, set[str]]:
    """The weight fingerprints a report records, per model name."""
    return _per_model(doc, lambda m: str(m["fingerprint"]))


def describe_models(models: dict[str, set[str]]) -> str:
    """``name (fingerprint prefix, ...)`` for each model, for messages."""
    return "; ".join(
        f"{name} ({', '.join(fp[:12] for fp in sorted(fps))})"
        for name, fps in sorted(models.items())
    )


def _no_shared_model(
    old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str
) -> list[str]:
    """Refuse reports that both record models but no fingerprint in common: the baseline is
    of another model (or other weights), so every verdict would be held against a stranger."""
    before, after = fingerprints(old), fingerprints(new)
    if not before or not after:
        return []  # see _model_notes
    if set().union(*before.values()) & set().union(*after.values()):
        return []
    return [
        f"{old_name} and {new_name} share no model fingerprint (baseline: "
        f"{describe_models(before)}; current: {describe_models(after)}). Compare reports of "
        "the same model; to gate a new version of a model against the baseline of the one it "
        "replaces, add --allow-model-change; to make this run the new baseline, use pytest "
        "--baseline PATH --update-baseline"
    ]


def _model_notes(
    old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str
) -> list[str]:
    """A side without any model record (e.g. every test failed before loading one) cannot be
    checked for the same-model rule; say so when the other side has models."""
    sides = ((old_name, old), (new_name, new))
    if not any(doc["provenance"]["models"] for _, doc in sides):
        return []
    return [
        f"{name} records no model: its model fingerprint could not be checked"
        for name, doc in sides
        if not doc["provenance"]["models"]
    ]


def _compare_one(
    key: Key,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    new_outcomes: dict[str, str],
) -> Row:
    model, nodeid, hypothesis, label = key
    old_v = None if before is None else before["verdict"]
    new_v = None if after is None else after["verdict"]
    old_x = None if before is None else before["value"]
    new_x = None if after is None else after["value"]
    tol = _tolerance(before, after)
    delta = new_x - old_x if old_x is not None and new_x is not None else None

    def row(status: str, regression: bool, note: str) -> Row:
        return Row(
            status,
            regression,
            model or None,
            nodeid,
            hypothesis,
            label,
            old_v,
            new_v,
            old_x,
            new_x,
            delta,
            tol,
            note,
        )

    if after is None:
        outcome = new_outcomes.get(nodeid)
        if old_v in ("pass", "fail") and outcome in ("failed", "error"):
            return row("removed", True, f"test now {outcome} without this verdict")
        where = "test not run" if outcome is None else f"not checked (test {outcome})"
        return row("removed", False, f"only in baseline; {where}")
    if before is None:
        return row("added", False, "only in this run")
    if new_v == "error" and old_v != "error":
        regression = old_v in ("pass", "fail")
        return row("error", regression, f"was {old_v}, now error")
    old_version, new_version = before["hypothesis_version"], after["hypothesis_version"]
    if old_version != new_version:
        return row(
            "not_comparable", False,
            f"hypothesis version {old_version} -> {new_version}: the claim changed",
        )
    if old_v == "error" and new_v != "error":
        return row("fixed", False, f"was error, now {new_v}")
    if "skipped" in (old_v, new_v):
        same = old_v == new_v
        return row("same" if same else "skipped", False, "" if same else f"{old_v} -> {new_v}")
    if old_v != new_v:
        return row("flip", True, f"verdict {old_v} -> {new_v}")
    if delta is not None and tol is not None and abs(delta) > tol:
        return row("drift", True, f"|delta| {abs(delta):.4g} > tolerance {tol:.4g}")
    if delta is not None and delta != 0:
        return row("moved", False, "within tolerance" if tol is not None else "no tolerance set")
    if (old_x is None) != (new_x is None):
        return row("moved", False, "value missing on one side")
    return row("same", False, "")


def index_checks(
    doc: dict[str, Any], rename: Callable[[str, str], tuple[str, str]] | None = None
) -> dict[Key, dict[str, Any]]:
    """Checks by (model, nodeid, hypothesis, label); ``rename`` maps (model, nodeid) first."""
    index: dict[Key, dict[str, Any]] = {}
    for test, check in all_checks(doc):
        model, nodeid = check["model"] or "", test["nodeid"]
        if rename is not None:
            model, nodeid = rename(model, nodeid)
        index[(model, nodeid, check["hypothesis"], check["label"])] = check
    return index


def _model_change(
    old: dict[str, Any], new: dict[str, Any], old_name: str, new_name: str
) -> tuple[Callable[[str, str], tuple[str, str]], list[str], list[str]]:
    """How to read the baseline's rows as rows of the new model: (rename, refusals, notes).

    Only one model against one model can be matched: with several, which replaces which
    is unknown. Node ids carry the model's test id (``[default-L07]``); it is mapped when
    both reports record it.
    """
    sides = [(name, doc["provenance"]["models"]) for name, doc in
             ((old_name, old), (new_name, new))]
    problems = [
        f"--allow-model-change compares one model with one model, but {name} holds "
        f"{len({m['fingerprint'] for m in models})}; split the run into one report per model"
        for name, models in sides if len({m["fingerprint"] for m in models}) != 1
    ]
    if problems:
        return (lambda model, nodeid: (model, nodeid)), problems, []
    (before, *_), (after, *_) = (models for _, models in sides)
    old_id, new_id = (str(m["info"].get("test_id") or "") for m in (before, after))
    note = (f"model changed on purpose: baseline {before['name']} "
            f"({before['fingerprint'][:12]}), current {after['name']} "
            f"({after['fingerprint'][:12]}); rows matched by test and claim")
    if not (old_id and new_id):
        note += " (test ids not recorded: node ids compared as they are)"
    pattern = re.compile(r"\[" + re.escape(old_id) + r"(?=[-\]])") if old_id else None

    def rename(model: str, nodeid: str) -> tuple[str, str]:
        if pattern is not None and new_id:
            nodeid = pattern.sub(lambda _m: "[" + new_id, nodeid, count=1)
        return (after["name"] if model == before["name"] else model), nodeid

    return rename, [], [note]


def _tolerance(before: dict[str, Any] | None, after: dict[str, Any] | None) -> float | None:
    for record in (after, before):
        if record is not None and record["tolerance"] is not None:
            return float(record["tolerance"])
    return None


def check_cell(check: dict[str, Any]) -> str:
    """A check as one table cell: verdict, value and interval (``pass 0.81 [0.7, 0.9]``)."""
    return f"{check['verdict']} {format_value(check['value'], check['ci'], check['value_flag'])}"


def _row_key(row: Row) -> Key:
    return (row.model or "", row.nodeid, row.hypothesis, row.label)


def _per_model(doc: dict[str, Any], value: Callable[[dict[str, Any]], str | None]
               ) -> dict[str, set[str]]:
    """``value`` of every provenance model entry, collected per model name (None skipped)."""
    names: dict[str, set[str]] = {}
    for model in doc["provenance"]["models"]:
        v = value(model)
        if v is not None:
            names.setdefault(model["name"], set()).add(v)
    return names


def _fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    before, after = (_per_model(d, lambda m: str(m["fingerprint"])) for d in (old, new))
    return [
        {"model": name, "old": sorted(before[name]), "new": sorted(after[name])}
        for name in sorted(set(before) & set(after))
        if before[name] != after[name]
    ]


def _dtype_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """A model run in another dtype than in the baseline (``--dtype auto`` picks bfloat16 or
    float32 by the CPU): its figures move in the low digits, which the gate should not read
    as a change of the model."""
    def dtype(model: dict[str, Any]) -> str | None:
        raw = model.get("info", {}).get("dtype")
        return None if raw is None else str(raw).removeprefix("torch.")

    before, after = (_per_model(d, dtype) for d in (old, new))
    return [
        f"model {name!r}: dtype {', '.join(sorted(before[name]))} in the baseline, "
        f"{', '.join(sorted(after[name]))} now: figures differ in the low digits; to compare "
        f"like with like, rerun with --dtype {sorted(before[name])[0]} (or update the baseline)"
        for name in sorted(set(before) & set(after))
        if before[name] != after[name]
    ]


def _registry_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    old_reg, new_reg = old["registry"], new["registry"]
    if old_reg["registry_version"] != new_reg["registry_version"]:
        notes.append(
            f"registry_version {old_reg['registry_version']} -> {new_reg['registry_version']}"
        )
    for hid, spec in new_reg["hypotheses"].items():
        previous = old_reg["hypotheses"].get(hid)
        if previous is not None and previous["version"] != spec["version"]:
            notes.append(
                f"hypothesis {hid}: version {previous['version']} -> {spec['version']} "
                "(its results are not comparable)"
            )
    if old_reg["sha256"] != new_reg["sha256"] and old_reg["sha256"] and new_reg["sha256"]:
        notes.append(f"registry file changed (sha256 {old_reg['sha256'][:12]} -> "
                     f"{new_reg['sha256'][:12]})")
    return notes


def _prompt_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """A prompt set with other contents (sha256) or another size than in the baseline."""
    def digest(entry: dict[str, Any]) -> str:
        return f"{entry['sha256'][:12]} (n={entry['n']})"

    before, after = (
        _by_name(d["provenance"]["prompt_sets"], digest) for d in (old, new)
    )
    return [
        f"prompt set {name!r}: {', '.join(sorted(before[name]))} in the baseline, "
        f"{', '.join(sorted(after[name]))} now: the prompts differ"
        for name in sorted(set(before) & set(after))
        if before[name] != after[name]
    ]


def _by_name(entries: list[dict[str, Any]], value: Callable[[dict[str, Any]], str]
             ) -> dict[str, set[str]]:
    named: dict[str, set[str]] = {}
    for entry in entries:
        named.setdefault(entry["name"], set()).add(value(entry))
    return named


def _option_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Run options (profile, seed, layers, alphas, sample sizes...) that differ: the figures
    were measured another way, which explains moves but does not make them regressions."""
    before = _run_options(old)
    after = _run_options(new)
    return [
        f"option {name}: {before.get(name, '(not recorded)')!r} in the baseline, "
        f"{after.get(name, '(not recorded)')!r} now"
        for name in sorted((set(before) | set(after)) - _BOOKKEEPING_OPTIONS)
        if before.get(name) != after.get(name)
    ]


def _run_options(doc: dict[str, Any]) -> dict[str, Any]:
    provenance = doc["provenance"]
    options = dict(provenance["options"])
    if "seed" not in options and provenance["seed"] is not None:
        options["seed"] = provenance["seed"]
    return options


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned plain-text columns (control characters shown escaped)."""
    cells = [[_printable(c) for c in headers]] + [[_printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
