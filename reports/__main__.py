"""Command line for stored reports.

    python -m reports compare OLD.json NEW.json      # diff table; exit 1 on regressions
    python -m reports render A.json [B.json ...] -o OUT.html
    python -m reports results REPORT.json [-o docs/experiments]   # experiment pages' results

Exit status: 0 success (no regressions), 1 regressions found, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.baseline import compare
from reports.document import ReportError, load_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmp = commands.add_parser("compare", help="compare two JSON reports (baseline first)")
    cmp.add_argument("old", type=Path, help="baseline report (JSON)")
    cmp.add_argument("new", type=Path, help="current report (JSON)")
    cmp.add_argument("--all", action="store_true", help="also list unchanged results")
    render = commands.add_parser("render", help="build one HTML page from JSON reports")
    render.add_argument("reports", type=Path, nargs="+", help="JSON reports to merge")
    render.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    render.add_argument("--title", default="refusalbench report")
    add_results_command(commands)
    args = parser.parse_args(argv)
    if args.command == "results":
        return run_results(args)

    try:
        if args.command == "compare":
            old, new = load_report(args.old), load_report(args.new)
            comparison = compare(old, new)
            print(f"baseline: {args.old}\ncurrent:  {args.new}")
            print(comparison.format(show_same=args.all))
            return 1 if comparison.regressions else 0
        docs = [load_report(path) for path in args.reports]
        from reports.html import write_html

        if args.output.is_dir():
            raise ReportError(f"output {args.output} is a directory")
        write_html(args.output, docs, title=args.title)
        print(f"HTML report: {args.output}")
        return 0
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


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
