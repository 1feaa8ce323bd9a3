"""Progress lines for long runs: the benchmark workbench and the perf harness share it.

Lines go to stderr unless a writer is given (the pytest plugin passes one that shows them
while pytest captures output). ``every_s`` throttles lines that are not forced; ``label``
prefixes each line with the label and the seconds since the printer was made.

Example:
    progress = Progress(every_s=0.0, label="perf")
    progress("models default")  # -> "[perf     0.0s] models default"
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

__all__ = ["Progress"]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """A callable that writes progress lines, at most one per ``every_s`` unless forced."""

    def __init__(self, write: Callable[[str], None] | None = None, every_s: float = 5.0,
                 label: str | None = None) -> None:
        self._write = write or _to_stderr
        self._every = every_s
        self._label = label
        self._t0 = time.monotonic()
        self._last = -math.inf  # the first line always shows

    def __call__(self, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._every:
            self._last = now
            if self._label is not None:
                message = f"[{self._label} {now - self._t0:7.1f}s] {message}"
            self._write(message)
