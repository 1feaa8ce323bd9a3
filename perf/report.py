"""Figures, targets, the perf.json document and the printed table of `make perf`."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import socket
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3
SCHEMA = "refusalbench-perf/1"


@dataclass(frozen=True)
class Target:
    """A goal from an issue: ``value op threshold`` (op one of <, <=, >, >=)."""

    op: str
    threshold: float
    source: str  # what the goal is, e.g. "hooks add no cost"

    def met(self, value: float | None) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        return {"<": value < self.threshold, "<=": value <= self.threshold,
                ">": value > self.threshold, ">=": value >= self.threshold}[self.op]

    def text(self, units: str) -> str:
        return f"{self.op} {_num(self.threshold)}{_unit_suffix(units)} ({self.source})"


@dataclass
class Figure:
    """One measured number (a median when ``samples`` holds repeats) with its context."""

    id: str
    section: str
    label: str
    value: float | None
    units: str
    samples: list[float] = field(default_factory=list)
    target: Target | None = None
    status: str = "ok"  # ok | unavailable | skipped | error
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return None if self.target is None or self.status != "ok" else self.target.met(
            self.value)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["median"] = self.value if self.samples else None
        d["repeats"] = len(self.samples)
        d["target"] = None if self.target is None else asdict(self.target)
        d["met"] = self.met
        return d


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def per_round(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a_i / b_i`` for every interleaved round (two tools timed back to back), to show how
    far the ratio moved between rounds; the figure's value stays the ratio of the medians,
    as the peer comparison defines it."""
    return [x / y for x, y in zip(a, b, strict=True)]


def per_round_note(ratios: Sequence[float]) -> str:
    """``"; per round 0.087 / 0.128"``, to append to a note (empty for a single round)."""
    if len(ratios) < 2:
        return ""
    return "; per round " + " / ".join(f"{r:.3g}" for r in ratios)


@dataclass
class ModelReport:
    spec: str
    info: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)

    def add(self, fig: Figure) -> Figure:
        self.figures[fig.id] = fig
        return fig

    def as_json(self) -> dict[str, Any]:
        return {"spec": self.spec, **self.info,
                "figures": {k: f.as_json() for k, f in self.figures.items()}}


def machine_info(torch_threads: int) -> dict[str, Any]:
    import psutil
    import torch

    from perf.work import cpu_model, environment_threads, package_version
    from probes.kernels import layout_tag

    try:
        load_avg: list[float] | None = list(os.getloadavg())
    except OSError:
        load_avg = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch_threads,
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "load_average_at_start": load_avg,
        "thread_env": environment_threads(),
        "packages": {name: package_version(name) for name in (
            "torch", "transformers", "transformer-lens", "steering-vectors", "refusalbench")},
        "torch_config": torch.__config__.parallel_info().splitlines()[:6],
        # the suite's decoding matmuls for float32 CPU models (probes.kernels); other
        # dtypes and devices use nn.Linear's own
        "decoding_matmuls_float32_cpu": layout_tag(torch.float32, "cpu"),
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- table


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.2f}"
    return f"{v:.2e}"


def _unit_suffix(units: str) -> str:
    if units in ("x", "%"):
        return units
    return f" {units}" if units else ""


def format_value(fig: Figure) -> str:
    if fig.status != "ok" or fig.value is None:
        return fig.status
    if fig.units == "bytes":
        return f"{fig.value / GIB:.2f} GiB"
    if fig.units == "fraction":
        return f"{100 * fig.value:.1f} %"
    return _num(fig.value) + _unit_suffix(fig.units)


def target_text(fig: Figure) -> str:
    if fig.target is None:
        return ""
    if fig.units == "bytes":
        return f"{fig.target.op} {fig.target.threshold / GIB:g} GiB ({fig.target.source})"
    if fig.units == "fraction":
        return f"{fig.target.op} {100 * fig.target.threshold:g} % ({fig.target.source})"
    return fig.target.text(fig.units)


def render_table(doc: dict[str, Any], reports: Sequence[ModelReport]) -> str:
    """The readable table: one block per model, rows grouped by section."""
    m = doc["machine"]
    lines = [
        f"refusalbench perf  {doc['date']}  {m['cpu_model']}, {m['logical_cpus']} logical CPUs,"
        f" torch threads {m['torch_threads']}, {m['memory_total_bytes'] / GIB:.0f} GiB RAM"
        f"{'  (--quick)' if doc['quick'] else ''}",
        f"load average at start {m['load_average_at_start']}, at end "
        f"{doc.get('load_average_at_end')}: timings on a busy machine are inflated",
        f"suite's decoding matmuls for float32 CPU models: "
        f"{m.get('decoding_matmuls_float32_cpu', 'not recorded')} (probes.kernels)",
    ]
    roof = doc.get("roofline")
    if roof:
        lines.append(f"{roof.get('dtype', 'float32')} matmul peak {roof['gflops']:.1f} GFLOP/s "
                     f"(median per size, best "
                     f"size {roof['best_size']})")
    for rep in reports:
        lines.append("")
        info = rep.info
        lines.append(f"== {rep.spec}: {info.get('display_name', info.get('name', rep.spec))}, "
                     f"{info.get('n_layers')} layers, {info.get('n_params', 0) / 1e6:.0f} M "
                     f"parameters")
        rows = [("figure", "value", "target", "met", "note")]
        section = None
        for fig in rep.figures.values():
            if fig.section != section:
                section = fig.section
                rows.append((f"[{section}]", "", "", "", ""))
            met = {True: "yes", False: "NO", None: ""}[fig.met]
            note = fig.note
            if len(note) > 90:
                note = note[:87] + "..."
            reps = f" (n={len(fig.samples)})" if len(fig.samples) > 1 else ""
            rows.append(("  " + fig.label, format_value(fig) + reps, target_text(fig), met,
                         note))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
                         + "  " + r[4])
    if "process_max_rss_bytes" in doc:
        lines.append("")
        lines.append(f"this run: {doc.get('wall_seconds', 0):.0f} s wall, peak RSS of the main "
                     f"process {doc['process_max_rss_bytes'] / GIB:.2f} GiB (every tool, "
                     "every model; per-tool peaks come from child processes)")
    return "\n".join(lines) + "\n"
