"""probes.progress: throttling, forcing and the elapsed-time label."""

from __future__ import annotations

from probes.progress import Progress


def test_lines_within_the_interval_are_dropped_unless_forced() -> None:
    lines: list[str] = []
    progress = Progress(lines.append, every_s=3600.0)
    progress("first")  # the printer starts with no line shown: the first one passes
    progress("dropped")
    progress("forced", force=True)
    assert lines == ["first", "forced"]


def test_label_prefixes_elapsed_seconds_and_zero_interval_keeps_every_line() -> None:
    lines: list[str] = []
    progress = Progress(lines.append, every_s=0.0, label="perf")
    progress("a")
    progress("b")
    assert len(lines) == 2
    assert all(line.startswith("[perf ") and "s] " in line for line in lines)
    assert lines[1].endswith("] b")
