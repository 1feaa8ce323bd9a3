"""The ``measure`` object: what one test records, and hypotheses turned into assertions.

A benchmark test declares the hypotheses it tests with ``@pytest.mark.claim("ID", ...)``
and receives a :class:`Measure` through the ``measure`` fixture::

    @pytest.mark.claim("LAYER-VALID")
    def test_layers(measure, model, split):
        measure.model(model.name, model.fingerprint, dtype="float32")
        measure.prompts("advbench", split.sha256, n=len(split))
        for layer, (d, lo, hi) in enumerate(per_layer_d):
            measure.metric(f"cohens_d_heldout/L{layer}", d, ci=(lo, hi), n=80)
            measure.check("LAYER-VALID", d, ci=(lo, hi), n=80, label=f"layer {layer}",
                          hard=False)
        measure.assert_all()   # one combined failure listing every failed layer

``check(..., hard=True)`` (the default) raises at once when the claim fails. With
``hard=False`` the verdict is recorded and the test goes on; :meth:`Measure.assert_all`
raises one message for every soft failure so far. The plugin calls ``assert_all()`` after
the test body returns, so a soft failure is never lost even if the test forgets to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest

from reports.jsonable import number, to_jsonable
from reports.registry import Evaluation, Hypothesis, Registry, Verdict, evaluate

PLOT_KINDS = ("line", "heatmap", "bar", "hist", "scatter")


class HypothesisFailure(AssertionError):
    """A hypothesis did not hold (or could not be evaluated) for the measured value."""


class ClaimError(Exception):
    """``measure.check``/``skip`` used a hypothesis the test did not declare."""


@dataclass
class TestData:
    """Everything one test recorded through ``measure`` (all values plain JSON)."""

    models: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    current_model: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "prompts": self.prompts,
            "metrics": self.metrics,
            "tables": self.tables,
            "plots": self.plots,
            "texts": self.texts,
            "checks": self.checks,
            "current_model": self.current_model,
        }


class Measure:
    """Records metrics, tables, plots and texts for one test, and checks hypotheses."""

    def __init__(self, registry: Registry, nodeid: str, declared: tuple[str, ...]) -> None:
        self._registry = registry
        self._nodeid = nodeid
        self._declared = declared
        self._pending: list[dict[str, Any]] = []  # soft failures not yet asserted
        self.data = TestData()

    # -- provenance -----------------------------------------------------------------------

    def model(self, name: str, fingerprint: str, **info: Any) -> None:
        """Declare the model the following records belong to (name + weights fingerprint)."""
        _require_str("model name", name)
        _require_str("model fingerprint", fingerprint)
        converted, _ = to_jsonable(info)
        entry = {"name": name, "fingerprint": fingerprint, "info": converted}
        if entry not in self.data.models:
            self.data.models.append(entry)
        self.data.current_model = name

    def prompts(self, name: str, sha256: str, n: int,
                dropped_duplicates: int | None = None, source: str | None = None) -> None:
        """Record a prompt set used by this test (name, content sha256, number of prompts;
        optionally how many duplicates were removed from the file it was drawn from, and
        ``source``, where it was read from: a file path or ``hf:name:split:column``)."""
        _require_str("prompt set name", name)
        _require_str("prompt set sha256", sha256)
        entry: dict[str, Any] = {"name": name, "sha256": sha256, "n": int(n)}
        if dropped_duplicates is not None:
            entry["dropped_duplicates"] = int(dropped_duplicates)
        if source:
            entry["source"] = str(source)
        if entry not in self.data.prompts:
            self.data.prompts.append(entry)

    # -- results --------------------------------------------------------------------------

    def metric(
        self,
        name: str,
        value: Any,
        ci: tuple[Any, Any] | None = None,
        n: int | None = None,
        units: str | None = None,
    ) -> None:
        """Record one number with its optional interval, sample size and units."""
        _require_str("metric name", name)
        val, flag = number(value)
        self.data.metrics.append(
            {
                "name": name,
                "model": self.data.current_model,
                "value": val,
                "value_flag": flag,
                "ci": _interval(ci),
                "n": None if n is None else int(n),
                "units": units,
            }
        )

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Record a table; every row must have one value per column."""
        _require_str("table name", name)
        columns = [str(c) for c in columns]
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"table {name!r}: row {index} has {len(row)} values for {len(columns)} columns"
                )
        converted, nonfinite = to_jsonable([list(row) for row in rows])
        self.data.tables.append(
            {
                "name": name,
                "model": self.data.current_model,
                "columns": columns,
                "rows": converted,
                "nonfinite": nonfinite,
            }
        )

    def plot(self, name: str, kind: str, **data: Any) -> None:
        """Record the data of a plot; it is drawn when the HTML report is written.

        kinds: ``line`` (x, series={label: ys}, bands={label: (los, his)},
        shade=[(x0, x1, label)], hlines=[(y, label)], marks=[(series label, xs, label)],
        xlabel, ylabel, title),
        ``heatmap`` (matrix, xlabels, ylabels, title, vmin, vmax, clabel),
        ``bar`` (categories, series={label: values}, errors={label: (los, his)}),
        ``hist`` (values={label: xs} or xs, bins) and ``scatter`` (series={label: (xs, ys)}).
        A payload that cannot be drawn shows as an error box in the report.
        """
        _require_str("plot name", name)
        if kind not in PLOT_KINDS:
            raise ValueError(f"plot {name!r}: unknown kind {kind!r}; expected one of {PLOT_KINDS}")
        converted, nonfinite = to_jsonable(data)
        self.data.plots.append(
            {
                "name": name,
                "model": self.data.current_model,
                "kind": kind,
                "data": converted,
                "nonfinite": nonfinite,
            }
        )

    def texts(self, name: str, rows: list[dict[str, str]]) -> None:
        """Record sample texts (prompts, outputs) as rows of column -> string."""
        _require_str("texts name", name)
        clean = [{str(k): v if isinstance(v, str) else str(v) for k, v in r.items()} for r in rows]
        self.data.texts.append({"name": name, "model": self.data.current_model, "rows": clean})

    # -- hypotheses -----------------------------------------------------------------------

    def check(
        self,
        hypothesis_id: str,
        value: Any,
        ci: tuple[Any, Any] | None = None,
        n: int | None = None,
        detail: str = "",
        *,
        label: str = "",
        hard: bool = True,
        judge_corrected: tuple[Any, tuple[Any, Any] | None, str] | None = None,
    ) -> Verdict:
        """Judge ``value`` (and its interval) against a declared hypothesis.

        ``judge_corrected`` = (value, interval, note): the same measure with the judge's
        error corrected (e.g. Rogan-Gladen; the note says how and from which validation).
        It is judged against the same hypothesis and recorded beside the verdict, which
        stays the one of ``value``; ``judge_corrected.flips`` marks a claim whose verdict
        changes between pass and fail under the correction.

        Returns the verdict ``"pass"``; on ``"fail"`` or ``"error"`` raises
        :class:`HypothesisFailure` (``hard=True``) or records it for :meth:`assert_all`
        and returns the verdict (``hard=False``). ``label`` tells several checks of the
        same hypothesis in one test apart (e.g. ``"layer 3"``); it is part of the key the
        baseline gate compares by.
        """
        __tracebackhide__ = True
        hyp = self._declared_hypothesis(hypothesis_id, "check")
        self._require_new_key(hypothesis_id, label)
        val, flag = number(value)
        interval = _interval(ci)
        if val is None:
            evaluation = Evaluation("error", None, f"measured value is {flag} (not a number)")
        else:
            evaluation = evaluate(hyp, val, None if interval is None else _as_floats(interval))
        if interval is not None and None in interval:
            flag = flag or "interval"
        model = self.data.current_model
        record = check_record(hyp, model, label, detail, val, flag, interval, n, hard)
        record["verdict"] = evaluation.verdict
        used = evaluation.used
        record["bound_value"] = list(used) if isinstance(used, tuple) else used
        record["reason"] = evaluation.reason
        if judge_corrected is not None:
            record["judge_corrected"] = corrected_record(hyp, evaluation.verdict,
                                                         *judge_corrected)
        record["message"] = self._message(hyp, record, evaluation.reason)
        self.data.checks.append(record)
        if evaluation.verdict != "pass":
            if hard:
                raise HypothesisFailure(record["message"])
            self._pending.append(record)
        return evaluation.verdict

    def skip(self, hypothesis_id: str, reason: str) -> NoReturn:
        """Record the hypothesis as skipped with ``reason`` and skip the test."""
        __tracebackhide__ = True
        hyp = self._declared_hypothesis(hypothesis_id, "skip")
        model = self.data.current_model
        record = check_record(hyp, model, "", reason, None, None, None, None, True)
        record.update(
            verdict="skipped", bound_value=None, reason=reason, message=f"skipped: {reason}"
        )
        self.data.checks.append(record)
        if self._pending:
            self.assert_all()
        pytest.skip(f"{hypothesis_id}: {reason}")

    def assert_all(self) -> None:
        """Raise one :class:`HypothesisFailure` listing every soft failure recorded so far."""
        __tracebackhide__ = True
        message = self.take_pending_message()
        if message is not None:
            raise HypothesisFailure(message)

    def take_pending_message(self) -> str | None:
        """The combined message of the soft failures not yet asserted (and forget them)."""
        if not self._pending:
            return None
        failures, self._pending = self._pending, []
        parts = [f"{len(failures)} hypothesis check(s) failed in {self._nodeid}:"]
        parts += [f"[{i}] {rec['message']}" for i, rec in enumerate(failures, start=1)]
        return "\n\n".join(parts)

    @property
    def pending_failures(self) -> int:
        return len(self._pending)

    # -- helpers --------------------------------------------------------------------------

    def _declared_hypothesis(self, hypothesis_id: str, method: str) -> Hypothesis:
        if hypothesis_id not in self._declared:
            declared = ", ".join(self._declared) or "none"
            raise ClaimError(
                f"measure.{method}({hypothesis_id!r}): test {self._nodeid} does not declare this "
                f"hypothesis; add it to @pytest.mark.claim(...) (declared: {declared})"
            )
        return self._registry.get(hypothesis_id)

    def _require_new_key(self, hypothesis_id: str, label: str) -> None:
        for rec in self.data.checks:
            if (rec["hypothesis"], rec["model"], rec["label"]) == (
                hypothesis_id,
                self.data.current_model,
                label,
            ):
                raise ClaimError(
                    f"measure.check({hypothesis_id!r}) called twice for model "
                    f"{self.data.current_model!r} with label {label!r} in {self._nodeid}; "
                    "pass a distinct label= to each check (e.g. label='layer 3')"
                )

    def _message(self, hyp: Hypothesis, rec: dict[str, Any], reason: str) -> str:
        status = {"pass": "holds", "fail": "FAILED", "error": "could not be evaluated"}
        verdict = rec.get("verdict", "error")
        model = rec["model"] if rec["model"] is not None else "(no model declared)"
        head = f"Hypothesis {hyp.id} v{hyp.version} {status.get(verdict, verdict)}"
        head += f" for model {model!r}"
        if rec["label"]:
            head += f" [{rec['label']}]"
        measured = format_value(rec["value"], rec["ci"], rec["value_flag"])
        lines = [
            head,
            f"  statement: {hyp.statement}",
            f"  measured:  {hyp.metric} = {measured}" + (f", n = {rec['n']}" if rec["n"] else ""),
            f"  claim:     {hyp.metric} {hyp.threshold_text()} judged on the {hyp.bound} bound "
            f"-> {reason}",
            f"  source:    {hyp.source}",
            f"  test:      {self._nodeid}",
        ]
        if rec["detail"]:
            lines.append(f"  detail:    {rec['detail']}")
        corr = rec.get("judge_corrected")
        if corr is not None:
            flag = "  VERDICT FLIPS" if corr["flips"] else ""
            lines.append(f"  judge-corrected: {format_value(corr['value'], corr['ci'])} -> "
                         f"{corr['verdict']}{flag} ({corr['note']})")
        return "\n".join(lines)


def check_record(
    hyp: Hypothesis,
    model: str | None,
    label: str,
    detail: str,
    value: float | None,
    flag: str | None,
    interval: list[float | None] | None,
    n: int | None,
    hard: bool,
) -> dict[str, Any]:
    """The fields every verdict record carries (``verdict``/``message`` are added after)."""
    spec = hyp.as_json()
    return {
        "hypothesis": hyp.id,
        "hypothesis_version": hyp.version,
        "label": label,
        "model": model,
        "statement": hyp.statement,
        "source": str(hyp.source),
        "metric": hyp.metric,
        "comparison": hyp.comparison,
        "threshold": spec["threshold"],
        "bound": hyp.bound,
        "tolerance": hyp.tolerance,
        "value": value,
        "value_flag": flag,
        "ci": interval,
        "n": None if n is None else int(n),
        "detail": detail,
        "hard": hard,
    }


def corrected_record(hyp: Hypothesis, raw_verdict: str, value: Any, ci: Any, note: str
                     ) -> dict[str, Any]:
    """The judge-corrected estimate judged against ``hyp``, and whether the verdict flips
    between pass and fail relative to ``raw_verdict``."""
    val, flag = number(value)
    interval = _interval(ci)
    if val is None:
        evaluation = Evaluation("error", None, f"corrected value is {flag} (not a number)")
    else:
        evaluation = evaluate(hyp, val, None if interval is None else _as_floats(interval))
    used = evaluation.used
    return {
        "value": val,
        "ci": interval,
        "verdict": evaluation.verdict,
        "bound_value": list(used) if isinstance(used, tuple) else used,
        "reason": evaluation.reason,
        "note": str(note),
        "flips": {raw_verdict, evaluation.verdict} == {"pass", "fail"},
    }


def format_value(
    value: float | None, ci: list[float | None] | None, flag: str | None = None
) -> str:
    """``0.3100 [0.1200, 0.5000]``; a missing number shows its flag."""
    text = f"{value:.4g}" if value is not None else (flag or "null")
    if ci is not None:
        lo, hi = (f"{v:.4g}" if v is not None else "null" for v in ci)
        text += f" [{lo}, {hi}]"
    return text


def _interval(ci: Any) -> list[float | None] | None:
    if ci is None:
        return None
    tolist = getattr(ci, "tolist", None)  # numpy array or torch tensor of two values
    pair = tolist() if callable(tolist) else ci
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise TypeError(f"ci must be a (lo, hi) pair, got {ci!r}")
    return [number(pair[0])[0], number(pair[1])[0]]


def _as_floats(interval: list[float | None]) -> tuple[float, float]:
    lo, hi = interval
    return (float("nan") if lo is None else lo, float("nan") if hi is None else hi)


def _require_str(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string, got {value!r}")
