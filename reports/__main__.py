"""Command line for stored reports.

    python -m reports compare OLD.json NEW.json      # diff table; exit 1 on regressions
    python -m reports render A.json [B.json ...] -o OUT.html
    python -m reports verdicts OLD.json NEW.json        # same answers after a suite change?
    python -m reports lock [--check]                    # claims change only with a bump
    python -m reports results REPORT.json [-o docs/experiments]   # experiment pages' results

Exit status:
  0  success (no regressions)
  1  regressions found
  2  bad input (unreadable or invalid report, missing output directory, usage)
  3  refused: the reports are not comparable (no model fingerprint in common, a report of
     a run that did not finish, or a hypothesis whose version differs between the reports);
     for ``verdicts``: runs of different models

``compare`` refuses rather than answering "0 regressions" when the answer would be
meaningless; each reason is printed on stderr with what to do instead. ``render`` writes
into an existing directory only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from reports.baseline import Comparison, compare
from reports.document import ReportError, load_report

EXIT_OK = 0
EXIT_REGRESSIONS = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_COMPARABLE = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser(
        "compare",
        help="compare two JSON reports (baseline first)",
        description="Compare two JSON reports (baseline first). Exit 0: no regressions; "
        "1: regressions; 2: bad input; 3: refused, the reports are not comparable.",
    )
    cmp.add_argument("old", type=Path, help="baseline report (JSON)")
    cmp.add_argument("new", type=Path, help="current report (JSON)")
    cmp.add_argument("--all", action="store_true", help="also list unchanged results")
    cmp.add_argument(
        "--allow-model-change", action="store_true",
        help="NEW is of another model or new weights on purpose (a candidate version against "
        "the baseline of the version it replaces): one model per report, results matched by "
        "test and claim",
    )
    ver = commands.add_parser(
        "verdicts",
        help="did a change to the suite keep its answers? (two runs of the same model)",
        description="Compare two runs of the same model claim by claim: verdicts, intervals "
        "and the ratio of their widths. Exit 0: same answers; 1: a verdict changed (flips "
        "where the interval straddles the threshold in both runs excepted) or an interval "
        "widened by more than --max-widen; 2: bad input; 3: refused, runs of different models. "
        "Checks present in one run only and claims whose version changed are listed, not failed.",
    )
    ver.add_argument("old", type=Path, help="report before the change (JSON)")
    ver.add_argument("new", type=Path, help="report after the change (JSON)")
    ver.add_argument("--max-widen", type=_fraction, default=0.10,
                     help="largest accepted relative growth of an interval (default 0.10)")
    ver.add_argument("--brief", action="store_true", help="leave unchanged checks out")
    lock = commands.add_parser(
        "lock",
        help="check or refresh the hypothesis registry's lock (claims change only with a bump)",
        description="Exit 0 when the registry keeps its lock; 1 when a claim changed without a "
        "version bump (nothing is written); 2 bad input. Without --check, a lock that is only "
        "out of date (new claims, bumped versions) is rewritten.",
    )
    lock.add_argument("registry", type=Path, nargs="?",
                      default=Path("benchmarks") / "hypotheses.toml")
    lock.add_argument("--check", action="store_true", help="report only, write nothing")
    render = commands.add_parser("render", help="build one HTML page from JSON reports")
    render.add_argument("reports", type=Path, nargs="+", help="JSON reports to merge")
    render.add_argument(
        "-o", "--output", type=Path, required=True,
        help="HTML file to write (its directory must exist)",
    )
    render.add_argument("--title", default="refusalbench report")
    add_results_command(commands)
    args = parser.parse_args(argv)
    if args.command == "results":
        return run_results(args)

    try:
        if args.command == "lock":
            return _lock(args.registry, args.check)
        if args.command == "verdicts":
            return _verdicts(args.old, args.new, args.max_widen, args.brief)
        if args.command == "compare":
            return _compare(args.old, args.new, show_same=args.all,
                            model_change=args.allow_model_change)
        return _render(args.reports, args.output, args.title)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _compare(old_path: Path, new_path: Path, show_same: bool, model_change: bool = False
             ) -> int:
    old, new = load_report(old_path), load_report(new_path)
    comparison = compare(old, new, f"the baseline {old_path}", f"the current report {new_path}",
                         model_change=model_change)
    print(f"baseline: {old_path}\ncurrent:  {new_path}")
    print(comparison.format(show_same=show_same))
    return _exit_status(comparison)


def _lock(registry_path: Path, check: bool) -> int:
    from reports.document import write_json_atomic
    from reports.registry import (
        RegistryError,
        load_registry,
        lock_path,
        lock_problems,
        make_lock,
        read_lock,
    )

    try:
        registry = load_registry(registry_path)
    except RegistryError as exc:
        raise ReportError(str(exc)) from None
    path = lock_path(registry_path)
    try:
        previous = read_lock(path) if path.exists() else {}
    except RegistryError as exc:
        raise ReportError(str(exc)) from None
    violations, stale = lock_problems(registry, previous)
    for line in violations:
        print(f"not allowed: {line}", file=sys.stderr)
    for line in stale:
        print(f"out of date: {line}")
    if violations:
        return EXIT_REGRESSIONS
    if check:
        print(f"{path}: {'out of date' if stale or not path.exists() else 'up to date'}")
        return EXIT_REGRESSIONS if stale or not path.exists() else EXIT_OK
    write_json_atomic(path, make_lock(registry, previous))
    print(f"lock written: {path} ({len(registry.hypotheses)} claims)")
    return EXIT_OK


def _verdicts(old_path: Path, new_path: Path, max_widen: float, brief: bool) -> int:
    from reports.verdicts import compare_verdicts

    old, new = load_report(old_path), load_report(new_path)
    comparison = compare_verdicts(old, new, max_widen, f"OLD {old_path}", f"NEW {new_path}")
    print(f"old: {old_path}\nnew: {new_path}")
    print(comparison.format(brief=brief))
    for reason in comparison.refusals:
        print(f"error: comparison refused: {reason}", file=sys.stderr)
    if comparison.refusals:
        return EXIT_NOT_COMPARABLE
    return EXIT_REGRESSIONS if comparison.failures else EXIT_OK


def _fraction(text: str) -> float:
    """--max-widen: a non-negative number (0.10 = ten per cent)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a non-negative fraction; write e.g. 0.10 for ten per cent")
    return value


def _exit_status(comparison: Comparison) -> int:
    """Refusal first (nothing was compared), then regressions, then uncomparable claims."""
    for line in comparison.problems():
        print(f"error: {line}", file=sys.stderr)
    if comparison.refused:
        return EXIT_NOT_COMPARABLE
    if comparison.regressions:
        return EXIT_REGRESSIONS
    if comparison.not_comparable:
        return EXIT_NOT_COMPARABLE
    return EXIT_OK


def _render(paths: list[Path], output: Path, title: str) -> int:
    if output.is_dir():
        raise ReportError(f"output {output} is a directory")
    if not output.parent.is_dir():
        raise ReportError(
            f"output directory {output.parent} is not an existing directory; create it first "
            f"(mkdir -p {output.parent}) or choose another -o path"
        )
    docs = [load_report(path) for path in paths]
    from reports.html import write_html

    write_html(output, docs, title=title, make_parents=False)
    print(f"HTML report: {output}")
    return EXIT_OK


def add_results_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``results``: rewrite the generated results section of each experiment page."""
    results = commands.add_parser(
        "results", help="write each experiment page's results section from a JSON report"
    )
    results.add_argument("report", type=Path, help="JSON report of a benchmark run")
    results.add_argument(
        "-o", "--output", type=Path, default=Path("docs/experiments"),
        help="folder of the experiment pages (default: docs/experiments)",
    )


def run_results(args: argparse.Namespace) -> int:
    """Exit 0 after writing the pages, 2 on bad input (message on stderr)."""
    from reports.results import write_results

    try:
        updates = write_results(args.report, args.output)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for update in updates:
        action = "created" if update.created else "updated"
        print(f"{action} {update.path} ({update.checks} hypothesis check(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
