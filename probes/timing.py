"""Where a benchmark run's time goes: cheap per-process counters by kind of work.

The functions that do the heavy work time themselves with :func:`timed`: model loading
(``load``), forward passes over prompts to capture activations or score the first token
(``prefill``), greedy generation (``decode``, its prompt pass included) and the judges
(``judge``, forward passes they run included). Sections do not nest: work done inside a
timed section counts as the outermost section's kind, so the kinds never add up to more
than the wall time. Whatever a test spends outside them (statistics, bootstraps, plots) is
its wall time minus the kinds: see :func:`split_wall`.

The counters are process-wide (one :data:`CLOCK`), so a test's share is the difference of
two snapshots taken around it.

Example:
    before = CLOCK.snapshot()
    ...  # run a test
    spent = CLOCK.since(before)  # {"load": 0.0, "prefill": 1.2, "decode": 3.4, "judge": 0.1}
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["CLOCK", "KINDS", "REST", "WorkClock", "split_wall", "timed"]

KINDS = ("load", "prefill", "decode", "judge")
REST = "statistics"  # the rest of a test's wall time

P = ParamSpec("P")
R = TypeVar("R")


class WorkClock:
    """Seconds spent per kind of work, counted once per outermost timed section."""

    def __init__(self) -> None:
        self._seconds = dict.fromkeys(KINDS, 0.0)
        self._calls = dict.fromkeys(KINDS, 0)
        self._local = threading.local()

    @contextmanager
    def section(self, kind: str) -> Iterator[None]:
        """Count the time of the block as ``kind`` unless an outer section already counts it."""
        if kind not in self._seconds:
            raise ValueError(f"unknown kind of work {kind!r}; one of {', '.join(KINDS)}")
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._seconds[kind] += time.perf_counter() - t0
                self._calls[kind] += 1

    def snapshot(self) -> dict[str, float]:
        """The seconds counted so far, per kind (a copy)."""
        return dict(self._seconds)

    def calls(self) -> dict[str, int]:
        """How many outermost sections of each kind ran so far (a copy)."""
        return dict(self._calls)

    def since(self, before: Mapping[str, float]) -> dict[str, float]:
        """Seconds per kind counted after ``before`` (a :meth:`snapshot`)."""
        return {k: max(self._seconds[k] - float(before.get(k, 0.0)), 0.0) for k in KINDS}


CLOCK = WorkClock()


def timed(kind: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that its calls count as ``kind`` on :data:`CLOCK`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with CLOCK.section(kind):
                return fn(*args, **kwargs)

        return run

    return wrap


def split_wall(wall_s: float, spent: Mapping[str, float]) -> dict[str, float]:
    """Every kind's seconds plus :data:`REST`: the wall time the kinds do not cover (>= 0)."""
    out = {k: float(spent.get(k, 0.0)) for k in KINDS}
    out[REST] = max(wall_s - sum(out.values()), 0.0)
    return out
