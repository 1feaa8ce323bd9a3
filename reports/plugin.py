"""pytest plugin #2: hypothesis registry, ``measure`` fixture, JSON/HTML reports, baseline gate.

Load it with ``pytest_plugins = ["reports.plugin"]`` (root conftest) or ``-p reports.plugin``.

Flow of one test's records: the ``measure`` fixture fills a :class:`~reports.measure.Measure`
in the test process; at teardown ``pytest_runtest_makereport`` serialises it into
``report.user_properties`` under :data:`RECORD_PROPERTY`; the controller (the only process
without ``config.workerinput``) picks it up in ``pytest_runtest_logreport``, merges the phases
of the test, and rewrites the JSON report atomically. Under pytest-xdist the workers never
write files; the same code path runs without xdist.

On SIGTERM the controller (in its main thread) writes both reports marked interrupted, puts
the previous handler back and lets it act (by default: the process ends by the signal).
With ``--baseline``, a comparison the gate refuses (no model fingerprint in common, an
unfinished run, a hypothesis whose version changed) fails the run like a regression does,
unless ``--update-baseline`` is accepting this run as the new baseline.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from probes.timing import CLOCK, KINDS
from reports.baseline import Comparison, compare, format_table, incomplete_reasons
from reports.document import (
    SCHEMA_VERSION,
    ReportError,
    aggregate_models,
    aggregate_prompts,
    load_report,
    summarize,
    write_json_atomic,
)
from reports.measure import Measure, check_record, format_value
from reports.profile import one_test_profile, profile_section, profile_table
from reports.provenance import git_state, machine, now_iso, package_versions, python_info
from reports.registry import (
    Registry,
    RegistryError,
    empty_registry,
    load_registry,
    lock_path,
    lock_problems,
    read_lock,
)

GROUP = "refusalbench-reports"
RECORD_PROPERTY = "refusalbench_record"
DEFAULT_REGISTRY = Path("benchmarks") / "hypotheses.toml"
DEFAULT_JSON = Path("reports") / "out" / "report.json"
DEFAULT_HTML = Path("reports") / "out" / "report.html"
_CONTROLLER_NAME = "refusalbench-reports-controller"
_MAX_LONGREPR = 5000
_MAX_SUMMARY_ROWS = 60


@dataclass(frozen=True)
class Settings:
    """Validated option values (absolute paths)."""

    registry_path: Path
    registry_explicit: bool
    report_json: Path | None
    report_html: Path | None
    baseline: Path | None
    update_baseline: bool
    model_change: bool = False


@dataclass
class PendingTest:
    """The phases of one test seen so far by the controller."""

    nodeid: str
    phases: dict[str, str] = field(default_factory=dict)
    duration: float = 0.0
    longrepr: str | None = None
    skip_reason: str | None = None
    payload: dict[str, Any] | None = None


@dataclass
class RunState:
    """Controller-side state of one run (kept in ``config.stash[RUN_KEY]``)."""

    started_at: str
    started: float
    provenance: dict[str, Any]
    baseline_doc: dict[str, Any] | None = None
    pending: dict[str, PendingTest] = field(default_factory=dict)
    work_at_start: dict[str, float] = field(default_factory=CLOCK.snapshot)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    collection_errors: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    comparison: Comparison | None = None
    final: dict[str, Any] | None = None
    html_written: bool = False
    reports_written: bool = False  # the final reports are on disk: a late SIGTERM keeps them
    notes: list[str] = field(default_factory=list)


SETTINGS_KEY = pytest.StashKey[Settings]()
REGISTRY_KEY = pytest.StashKey[Registry]()
RUN_KEY = pytest.StashKey[RunState]()
MEASURE_KEY = pytest.StashKey[Measure]()
PROFILE_START_KEY = pytest.StashKey[tuple[float, dict[str, float]]]()


# -- options and configuration ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "refusalbench reports: hypotheses, JSON/HTML reports, baseline")
    group.addoption(
        "--hypotheses",
        metavar="PATH",
        default=None,
        help=f"hypothesis registry TOML file (default: <rootdir>/{DEFAULT_REGISTRY.as_posix()})",
    )
    group.addoption(
        "--report-json",
        metavar="PATH",
        default=None,
        help=f"where to write the JSON report (default: <rootdir>/{DEFAULT_JSON.as_posix()})",
    )
    group.addoption(
        "--report-html",
        metavar="PATH",
        default=None,
        help=f"where to write the HTML report (default: <rootdir>/{DEFAULT_HTML.as_posix()})",
    )
    group.addoption(
        "--no-report",
        action="store_true",
        default=False,
        help="write neither the JSON nor the HTML report",
    )
    group.addoption(
        "--baseline",
        metavar="PATH",
        default=None,
        help="compare verdicts and values with this stored JSON report; regressions fail the "
        "run, and so does a comparison it refuses (another model, an unfinished run, a "
        "hypothesis whose version changed)",
    )
    group.addoption(
        "--update-baseline",
        action="store_true",
        default=False,
        help="write this run's report to the --baseline path (the only way a baseline changes)",
    )
    group.addoption(
        "--allow-model-change",
        action="store_true",
        default=False,
        help="with --baseline: this run is of another model or new weights on purpose (a "
        "candidate version gated against the baseline of the version it replaces); each "
        "report must hold one model, and results are matched by test and claim",
    )


@pytest.hookimpl(tryfirst=True)  # before fixtures.plugin's, which may load models
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "claim(*ids): hypothesis ids (from the registry) this test checks with measure.check()",
    )
    if config.getoption("help", False):
        return
    settings = _settings(config)
    config.stash[SETTINGS_KEY] = settings
    config.stash[REGISTRY_KEY] = _registry(settings)
    if _is_worker(config):
        return
    state = RunState(
        started_at=now_iso(),
        started=time.monotonic(),
        provenance=_static_provenance(config),
        baseline_doc=_baseline(settings),
    )
    config.stash[RUN_KEY] = state
    config.pluginmanager.register(_Controller(config), _CONTROLLER_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    controller = config.pluginmanager.get_plugin(_CONTROLLER_NAME)
    if controller is not None:
        controller.restore_sigterm()
        config.pluginmanager.unregister(controller)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _settings(config: pytest.Config) -> Settings:
    invocation_dir = config.invocation_params.dir
    rootdir = config.rootpath

    def given(name: str) -> Path | None:
        value = config.getoption(name)
        if value is None:
            return None
        path = Path(str(value)).expanduser()
        return path if path.is_absolute() else invocation_dir / path

    registry = given("hypotheses")
    if registry is not None and not registry.is_file():
        raise pytest.UsageError(f"--hypotheses {config.getoption('hypotheses')}: no such file")

    no_report = bool(config.getoption("no_report"))
    report_json, report_html = given("report_json"), given("report_html")
    if no_report and (report_json or report_html):
        raise pytest.UsageError("--no-report cannot be combined with --report-json/--report-html")
    if not no_report:
        report_json = report_json or rootdir / DEFAULT_JSON
        report_html = report_html or rootdir / DEFAULT_HTML
        for option, path in (("--report-json", report_json), ("--report-html", report_html)):
            _check_writable(option, path)

    baseline = given("baseline")
    update = bool(config.getoption("update_baseline"))
    if update and baseline is None:
        raise pytest.UsageError("--update-baseline needs --baseline PATH (the file to write)")
    model_change = bool(config.getoption("allow_model_change"))
    if model_change and baseline is None:
        raise pytest.UsageError("--allow-model-change needs --baseline PATH (the report of the "
                                "model this run replaces)")
    if baseline is not None:
        if update:
            _check_writable("--baseline", baseline)
        elif not baseline.is_file():
            raise pytest.UsageError(
                f"--baseline {config.getoption('baseline')}: no such file "
                "(create it with --update-baseline)"
            )
    return Settings(
        registry_path=registry or rootdir / DEFAULT_REGISTRY,
        registry_explicit=registry is not None,
        report_json=report_json,
        report_html=report_html,
        baseline=baseline,
        update_baseline=update,
        model_change=model_change,
    )


def _check_writable(option: str, path: Path) -> None:
    if path.is_dir():
        raise pytest.UsageError(f"{option} {path}: is a directory, expected a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise pytest.UsageError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise pytest.UsageError(f"{option} {path}: directory {parent} is not writable")


def _registry(settings: Settings) -> Registry:
    if not settings.registry_explicit and not settings.registry_path.is_file():
        return empty_registry(str(settings.registry_path))
    try:
        registry = load_registry(settings.registry_path)
        lock = lock_path(settings.registry_path)
        if lock.is_file():  # a registry with a lock may not change a claim without a bump
            violations, _stale = lock_problems(registry, read_lock(lock))
            if violations:
                raise RegistryError(
                    f"hypothesis registry {settings.registry_path} breaks its lock {lock}:\n  "
                    + "\n  ".join(violations))
        return registry
    except RegistryError as exc:
        raise pytest.UsageError(str(exc)) from None


def _baseline(settings: Settings) -> dict[str, Any] | None:
    if settings.baseline is None:
        return None
    if settings.update_baseline and not settings.baseline.exists():
        return None
    try:
        doc = load_report(settings.baseline)
    except ReportError as exc:
        if settings.update_baseline:
            return None  # it is about to be replaced
        raise pytest.UsageError(f"--baseline: {exc}") from None
    refusals = incomplete_reasons(doc, f"the baseline {settings.baseline}")
    if refusals and not settings.update_baseline:
        # Known before any test runs: say so now rather than after a long run.
        raise pytest.UsageError(f"--baseline: comparison refused: {refusals[0]}")
    return doc


# -- claims: the marker and its validation at collection --------------------------------------


def claim_ids(item: pytest.Item) -> tuple[str, ...]:
    """Hypothesis ids declared by ``@pytest.mark.claim`` on the item, its class and module."""
    ids: list[str] = []
    for marker in item.iter_markers("claim"):
        ids += [arg for arg in marker.args if isinstance(arg, str) and arg not in ids]
    return tuple(ids)


def _claim_problems(item: pytest.Item, registry: Registry) -> list[str]:
    problems: list[str] = []
    path, lineno, _ = item.location
    where = f"{item.nodeid} ({path}:{(lineno or 0) + 1})"
    for marker in item.iter_markers("claim"):
        if not marker.args or marker.kwargs:
            problems.append(f"{where}: use @pytest.mark.claim('ID', ...) with hypothesis ids only")
        for arg in marker.args:
            if not isinstance(arg, str):
                problems.append(f"{where}: claim ids must be strings, got {arg!r}")
            elif arg not in registry:
                known = ", ".join(registry.hypotheses) or "none"
                problems.append(
                    f"{where}: unknown hypothesis id {arg!r} in @pytest.mark.claim; "
                    f"registry {registry.path} defines: {known}"
                )
    return problems


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    registry = collector.config.stash.get(REGISTRY_KEY, None)
    if registry is None or not report.passed:
        return report
    problems: list[str] = []
    for node in report.result:
        if isinstance(node, pytest.Item):
            problems += _claim_problems(node, registry)
    if not problems:
        return report
    message = "refusalbench: bad hypothesis claim(s)\n" + "\n".join(dict.fromkeys(problems))
    return pytest.CollectReport(report.nodeid, "failed", message, [], report.sections)


# -- the measure fixture and the per-test record -----------------------------------------------


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Measure:
    """Record metrics, tables, plots, texts and hypothesis verdicts for this test."""
    item = request.node
    registry = request.config.stash.get(REGISTRY_KEY, None)
    if registry is None:
        raise RuntimeError("reports.plugin is not configured (registry missing)")
    result = Measure(registry, item.nodeid, claim_ids(item))
    item.stash[MEASURE_KEY] = result
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    measure_obj = item.stash.get(MEASURE_KEY, None)
    message = None if measure_obj is None else measure_obj.take_pending_message()
    if message is not None:
        # Soft failures the test did not assert: fail it now, with the combined message.
        pytest.fail(message, pytrace=False)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Note the time and the work counters before the test's fixtures are set up."""
    item.stash[PROFILE_START_KEY] = (time.perf_counter(), CLOCK.snapshot())


def _item_profile(item: pytest.Item) -> dict[str, float] | None:
    """The test's wall time, setup to teardown, split by kind of work (probes.timing)."""
    start = item.stash.get(PROFILE_START_KEY, None)
    if start is None:
        return None
    t0, before = start
    return one_test_profile(time.perf_counter() - t0, CLOCK.since(before))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "teardown" and REGISTRY_KEY in item.config.stash:
        measure_obj = item.stash.get(MEASURE_KEY, None)
        workerinput = getattr(item.config, "workerinput", None)
        payload = {
            "claims": list(claim_ids(item)),
            "worker": workerinput.get("workerid") if isinstance(workerinput, dict) else None,
            "data": None if measure_obj is None else measure_obj.data.as_json(),
            "profile": _item_profile(item),
        }
        try:
            text = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            payload["data"] = None
            payload["error"] = f"records of this test could not be serialised: {exc}"
            text = json.dumps(payload)
        report.user_properties.append((RECORD_PROPERTY, text))
    return report


# -- controller: collect records, write reports, gate on the baseline --------------------------


class _Controller:
    """Hooks that run only in the process that writes the reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._previous_sigterm: Callable[[int, FrameType | None], Any] | int | None = None
        self._sigterm_installed = False

    @property
    def state(self) -> RunState:
        return self.config.stash[RUN_KEY]

    @property
    def settings(self) -> Settings:
        return self.config.stash[SETTINGS_KEY]

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._install_sigterm()
        self._write_partial()

    # -- SIGTERM: keep both reports ---------------------------------------------------------

    def _install_sigterm(self) -> None:
        """Catch SIGTERM (only in the main thread: Python allows handlers nowhere else); a
        SIGTERM that was ignored, or handled outside Python, is left alone."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN:
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous_sigterm = previous
        self._sigterm_installed = True

    def restore_sigterm(self) -> Callable[[int, FrameType | None], Any] | int | None:
        """Put the handler found at session start back; return it."""
        previous = self._previous_sigterm
        if self._sigterm_installed:
            self._sigterm_installed = False
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        return previous

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        previous = self.restore_sigterm()
        if not self.state.reports_written:
            self._write_interrupted(signum)
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: end the process by the signal, as if never caught
            signal.raise_signal(signum)

    def _write_interrupted(self, signum: int) -> None:
        """Both reports, marked interrupted, exit status 128 + signal number (as shells do)."""
        state, settings = self.state, self.settings
        state.interrupted = True
        doc = self._document(complete=False, exit_status=128 + signum)
        state.final = doc
        lines = [f"refusalbench: {signal.Signals(signum).name} received, run interrupted"]
        for label, path, write in (
            ("JSON", settings.report_json, write_json_atomic),
            ("HTML", settings.report_html, _write_html),
        ):
            if path is None:
                continue
            try:
                write(path, doc)
            except Exception as exc:  # still end the run; say which report is missing
                lines.append(f"{label} report failed: {type(exc).__name__}: {exc}")
            else:
                lines.append(f"{label} report (interrupted): {path}")
        self._tell(lines)

    def _tell(self, lines: list[str]) -> None:
        """Show lines on the terminal even from inside a test (output capture suspended for
        the time of writing, in case the previous handler lets the run go on)."""
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        suspended = False
        try:
            if capture is not None and capture.is_globally_capturing():
                capture.suspend_global_capture(in_=False)
                suspended = True
            for line in lines:
                if terminal is not None:
                    terminal.write_line(line)
                else:
                    sys.stderr.write(line + "\n")
            sys.stdout.flush()
        except Exception:  # best effort: the reports matter more than the message
            pass
        finally:
            if suspended and capture is not None:
                capture.resume_global_capture()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        pending = state.pending.setdefault(report.nodeid, PendingTest(report.nodeid))
        kept = []
        for name, value in report.user_properties:
            if name == RECORD_PROPERTY and isinstance(value, str):
                pending.payload = json.loads(value)
            else:
                kept.append((name, value))
        report.user_properties = kept  # keep our payload out of junitxml and friends
        pending.phases[report.when] = report.outcome
        pending.duration += float(getattr(report, "duration", 0.0) or 0.0)
        if report.failed and pending.longrepr is None:
            pending.longrepr = _short_longrepr(report)
        if report.skipped and pending.skip_reason is None:
            pending.skip_reason = _skip_reason(report)
        if report.when == "teardown":
            self._finish(pending)
            self._write_partial()

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.state.collection_errors.setdefault(report.nodeid, str(report.longrepr))

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self.state.interrupted = True

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        state, settings = self.state, self.settings
        for pending in list(state.pending.values()):
            # A test cut short by an interrupt did not finish: leave it out. One with a failed
            # phase but no teardown (e.g. its xdist worker crashed) is reported as an error.
            if "failed" in pending.phases.values():
                self._finish(pending)
        complete = not state.interrupted and exitstatus != pytest.ExitCode.INTERRUPTED
        doc = self._document(complete=complete, exit_status=int(session.exitstatus))
        if state.baseline_doc is not None and settings.baseline is not None:
            state.comparison = compare(
                state.baseline_doc, doc, f"the baseline {settings.baseline}", "this run",
                model_change=settings.model_change,
            )
            doc["baseline"] = state.comparison.as_json(str(settings.baseline))
            if (
                state.comparison.gate_fails
                and not settings.update_baseline
                and session.exitstatus == pytest.ExitCode.OK
            ):
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
                doc["exit_status"] = int(session.exitstatus)
        state.final = doc
        if settings.update_baseline and settings.baseline is not None:
            if complete:
                write_json_atomic(settings.baseline, {**doc, "baseline": None})
                state.notes.append(f"baseline updated: {settings.baseline}")
            else:
                state.notes.append(f"baseline NOT updated (incomplete run): {settings.baseline}")
        if settings.report_json is not None:
            write_json_atomic(settings.report_json, doc)
        if settings.report_html is not None:
            try:
                _write_html(settings.report_html, doc)
            except Exception as exc:  # the JSON is written; say what went wrong, go on
                state.notes.append(f"HTML report failed: {type(exc).__name__}: {exc}")
            else:
                state.html_written = True
        state.reports_written = True

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        state, settings = self.state, self.settings
        doc = state.final
        if doc is None:
            return
        rows = _verdict_rows(doc)
        if rows:
            terminalreporter.write_sep("=", "refusalbench hypothesis verdicts")
            headers = ["hypothesis", "model", "verdict", "value [lo, hi]", "threshold", "test"]
            terminalreporter.write_line(format_table(headers, rows))
        if state.comparison is not None:
            title = "refusalbench baseline comparison"
            if settings.update_baseline:
                title += " (baseline being updated: not gating)"
            terminalreporter.write_sep("=", title)
            terminalreporter.write_line(f"baseline: {settings.baseline}")
            terminalreporter.write_line(state.comparison.format())
            self._summarise_gate(terminalreporter, state.comparison)
            if state.comparison.regressions and not settings.update_baseline:
                terminalreporter.write_line(
                    "REGRESSIONS against the baseline: the run fails. If the change is intended, "
                    "re-run with --update-baseline.",
                    red=True,
                    bold=True,
                )
        table = profile_table(doc.get("profile") or {})
        reporting = settings.report_json is not None or settings.report_html is not None
        if table and reporting and _model_work(doc):
            terminalreporter.write_sep("=", "refusalbench time by module and kind of work")
            terminalreporter.write_line(table)
        lines = [*state.notes]
        if settings.report_json is not None:
            lines.append(f"JSON report: {settings.report_json}")
        if settings.report_html is not None and state.html_written:
            lines.append(f"HTML report: {settings.report_html}")
        if lines:
            terminalreporter.write_sep("-", "refusalbench reports")
            for line in lines:
                terminalreporter.write_line(line)

    def _summarise_gate(self, terminalreporter: Any, comparison: Comparison) -> None:
        """Say in red why the gate fails beyond regressions (refusal, changed claims)."""
        gating = not self.settings.update_baseline
        lines: list[str] = []
        if comparison.refused:
            lines.append("baseline comparison REFUSED (see above)")
        if comparison.not_comparable:
            lines.append(comparison.problems()[-1])
        for line in lines:
            terminalreporter.write_line(
                line + (": the run fails." if gating else " (accepted: updating the baseline)."),
                red=gating,
                bold=gating,
            )

    # -- helpers ----------------------------------------------------------------------------

    def _finish(self, pending: PendingTest) -> None:
        state = self.state
        state.pending.pop(pending.nodeid, None)
        registry = self.config.stash[REGISTRY_KEY]
        state.tests[pending.nodeid] = _test_entry(pending, registry)

    def _write_partial(self) -> None:
        path = self.settings.report_json
        if path is not None:
            write_json_atomic(path, self._document(complete=False, exit_status=None))

    def _document(self, complete: bool, exit_status: int | None) -> dict[str, Any]:
        state = self.state
        tests = [state.tests[nodeid] for nodeid in sorted(state.tests)]
        provenance = dict(state.provenance)
        provenance.update(
            started_at=state.started_at,
            finished_at=now_iso() if exit_status is not None else None,
            duration_s=round(time.monotonic() - state.started, 6),
            models=aggregate_models(tests),
            prompt_sets=aggregate_prompts(tests),
        )
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "refusalbench",
            "complete": complete,
            "interrupted": state.interrupted,
            "exit_status": exit_status,
            "registry": self.config.stash[REGISTRY_KEY].as_json(),
            "provenance": provenance,
            "summary": summarize(tests),
            "tests": tests,
            "collection_errors": [
                {"nodeid": nodeid, "longrepr": text}
                for nodeid, text in sorted(state.collection_errors.items())
            ],
            "baseline": None,
            "profile": profile_section(tests, self._work_outside_tests(tests)),
        }

    def _work_outside_tests(self, tests: list[dict[str, Any]]) -> dict[str, float] | None:
        """Seconds of each kind of work this process did outside every test (models loaded
        during collection); None when tests ran in xdist workers, whose work is not here."""
        if any(t.get("worker") is not None for t in tests):
            return None
        spent = CLOCK.since(self.state.work_at_start)
        for test in tests:
            for kind, seconds in (test.get("profile") or {}).items():
                if kind in spent:
                    spent[kind] = max(spent[kind] - float(seconds), 0.0)
        return spent


def _model_work(doc: dict[str, Any]) -> bool:
    """Whether the run did model work (loading, passes, judging): the profile is worth a
    table then, not for a run of plain tests."""
    profile = doc.get("profile") or {}
    total = profile.get("total") or {}
    outside = profile.get("outside_tests") or {}
    return any(float(total.get(k, 0.0) or 0.0) + float(outside.get(k, 0.0) or 0.0) > 0
               for k in KINDS)


def _write_html(path: Path, doc: dict[str, Any]) -> None:
    from reports.html import write_html  # jinja2 and matplotlib: only when a page is written

    write_html(path, [doc])


def _test_entry(pending: PendingTest, registry: Registry) -> dict[str, Any]:
    outcome = _outcome(pending.phases)
    payload = pending.payload or {}
    data = payload.get("data") or {}
    checks: list[dict[str, Any]] = list(data.get("checks", []))
    claims: list[str] = list(payload.get("claims", []))
    model = data.get("current_model")
    checked = {check["hypothesis"] for check in checks}
    for hid in claims:
        if hid in checked or hid not in registry:
            continue
        checks.append(_unchecked_claim(registry, hid, model, outcome, pending))
    longrepr = pending.longrepr
    if payload.get("error"):
        longrepr = (longrepr + "\n" if longrepr else "") + str(payload["error"])
    module, _, name = pending.nodeid.partition("::")
    models = data.get("models", [])
    return {
        "nodeid": pending.nodeid,
        "module": module,
        "name": name or module,
        "outcome": outcome,
        "duration_s": round(pending.duration, 6),
        "worker": payload.get("worker"),
        "longrepr": longrepr if outcome in ("failed", "error") else None,
        "skip_reason": pending.skip_reason if outcome == "skipped" else None,
        "claims": claims,
        "model": models[0]["name"] if models else None,
        "models": models,
        "prompts": data.get("prompts", []),
        "metrics": data.get("metrics", []),
        "tables": data.get("tables", []),
        "plots": data.get("plots", []),
        "texts": data.get("texts", []),
        "checks": checks,
        "profile": payload.get("profile"),
    }


def _unchecked_claim(
    registry: Registry, hid: str, model: str | None, outcome: str, pending: PendingTest
) -> dict[str, Any]:
    hyp = registry.get(hid)
    if outcome == "skipped":
        verdict, message = "skipped", f"test skipped: {pending.skip_reason or 'no reason given'}"
    elif outcome == "passed":
        verdict = "error"
        message = f"{hid} is declared by {pending.nodeid} but was never checked"
    else:
        verdict = "error"
        message = f"test {outcome} before {hid} was checked: {pending.longrepr or ''}".strip()
    record = check_record(hyp, model, "", "", None, "missing", None, None, True)
    message = message[:_MAX_LONGREPR]
    record.update(verdict=verdict, bound_value=None, reason=message, message=message)
    return record


def _outcome(phases: dict[str, str]) -> str:
    setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
    if setup == "failed":
        return "error"
    if setup == "skipped":
        return "skipped"
    if call == "failed":
        return "failed"
    if teardown == "failed" or any(
        outcome == "failed"
        for when, outcome in phases.items()
        if when not in ("setup", "call", "teardown")
    ):
        return "error"  # e.g. xdist's report for a crashed worker
    if call == "skipped":
        return "skipped"
    return "passed" if call == "passed" else "error"


def _short_longrepr(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(longrepr)
    if len(text) > _MAX_LONGREPR:
        text = text[: _MAX_LONGREPR - 20] + "\n... (truncated)"
    return text


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    return str(longrepr)


def _verdict_rows(doc: dict[str, Any]) -> list[list[str]]:
    entries = sorted(
        (
            (check["hypothesis"], check["model"] or "-", test["nodeid"], check)
            for test in doc["tests"]
            for check in test["checks"]
        ),
        key=lambda e: (e[0], e[1], e[2], e[3]["label"]),
    )

    def row(hid: str, model: str, nodeid: str, check: dict[str, Any]) -> list[str]:
        threshold = check["threshold"]
        claim = (
            f"in [{threshold[0]:.4g}, {threshold[1]:.4g}]"
            if isinstance(threshold, list)
            else f"{check['comparison']} {threshold:.4g}"
        )
        where = nodeid + (f" [{check['label']}]" if check["label"] else "")
        value = format_value(check["value"], check["ci"], check["value_flag"])
        return [hid, model, check["verdict"], value, f"{claim} ({check['bound']})", where]

    if len(entries) <= _MAX_SUMMARY_ROWS:
        return [row(*entry) for entry in entries]
    rows = [row(*entry) for entry in entries if entry[3]["verdict"] != "pass"]
    passes: dict[tuple[str, str], int] = {}
    for hid, model, _, check in entries:
        if check["verdict"] == "pass":
            passes[(hid, model)] = passes.get((hid, model), 0) + 1
    rows += [
        [hid, model, f"pass x{count}", "", "", "(passing checks collapsed)"]
        for (hid, model), count in sorted(passes.items())
    ]
    return rows


def _static_provenance(config: pytest.Config) -> dict[str, Any]:
    numprocesses = config.getoption("numprocesses", None)
    return {
        "invocation": {
            "args": [str(arg) for arg in config.invocation_params.args],
            "dir": str(config.invocation_params.dir),
        },
        "options": _options(config),
        "seed": _plain(config.getoption("seed", None)),
        "packages": package_versions(),
        "git": git_state(config.rootpath),
        "machine": machine(),
        "python": python_info(),
        "workers": numprocesses if isinstance(numprocesses, int) and numprocesses > 0 else None,
    }


def _options(config: pytest.Config) -> dict[str, Any]:
    """Values of every option in every ``refusalbench*`` option group.

    pytest has no public API listing options by group, so this reads the parser's groups
    (``config._parser``); if that ever changes, it falls back to this plugin's options.
    """
    dests: list[str] = []
    parser = getattr(config, "_parser", None)
    for group in getattr(parser, "_groups", []) or []:
        if str(getattr(group, "name", "")).startswith("refusalbench"):
            dests += [opt.dest for opt in getattr(group, "options", []) if opt.dest]
    if not dests:
        dests = [
            "hypotheses",
            "report_json",
            "report_html",
            "no_report",
            "baseline",
            "update_baseline",
        ]
    return {dest: _plain(config.getoption(dest, None)) for dest in sorted(set(dests))}


def _plain(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value
