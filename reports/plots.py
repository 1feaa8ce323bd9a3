"""Draw recorded plot payloads as SVG images (matplotlib, Agg canvas, no pyplot state).

:func:`render_plot` never raises for a bad payload: it returns an error text instead,
which the HTML report shows in an error box.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from reports.text import visible

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CMAPS = ("viridis", "magma", "cividis", "coolwarm", "RdBu_r", "Blues", "Greys")
_MAX_POINTS = 200_000


class PlotError(ValueError):
    """A plot payload does not have the fields or shapes its kind needs."""


def render_plot(plot: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return ``(data URI of an SVG image, None)`` or ``(None, error text)``."""
    kind = plot.get("kind")
    drawer = _DRAWERS.get(kind) if isinstance(kind, str) else None
    if drawer is None:
        return None, f"unknown plot kind {kind!r}; expected one of {sorted(_DRAWERS)}"
    data = plot.get("data")
    if not isinstance(data, dict):
        return None, "plot data must be an object"
    try:
        svg = _draw(drawer, data)
    except PlotError as exc:
        return None, f"cannot draw {kind} plot: {exc}"
    except Exception as exc:  # a plot must never break the report
        return None, f"cannot draw {kind} plot: {type(exc).__name__}: {exc}"
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii"), None


def _draw(drawer: Callable[[Figure, dict[str, Any]], None], data: dict[str, Any]) -> bytes:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rc = {"svg.hashsalt": "refusalbench", "text.parse_math": False, "svg.fonttype": "path"}
    with matplotlib.rc_context(rc), warnings.catch_warnings():  # type: ignore[arg-type]
        warnings.simplefilter("ignore")  # missing glyphs etc. must not spam the test output
        fig = Figure(figsize=(6.4, 3.8), layout="constrained")
        FigureCanvasAgg(fig)  # Agg canvas attached to this figure only; no global backend
        drawer(fig, data)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


# -- payload validation ------------------------------------------------------------------------


def _label(value: Any, what: str = "label") -> str:
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise PlotError(f"{what} must be a string")
    return visible(str(value))[:200]


def _numbers(value: Any, what: str) -> list[float]:
    if not isinstance(value, list):
        raise PlotError(f"{what} must be a list of numbers")
    if len(value) > _MAX_POINTS:
        raise PlotError(f"{what} has {len(value)} points (more than {_MAX_POINTS})")
    out: list[float] = []
    for item in value:
        if item is None:
            out.append(math.nan)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            out.append(float(item))
        else:
            raise PlotError(f"{what} must contain numbers, found {type(item).__name__}")
    return out


def _mapping(value: Any, what: str, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict) or (required and not value):
        raise PlotError(f"{what} must be a non-empty mapping of label -> values")
    return value


def _pair(value: Any, what: str, length: int | None) -> tuple[list[float], list[float]]:
    if not isinstance(value, list) or len(value) != 2:
        raise PlotError(f"{what} must be a pair (lo values, hi values)")
    lo, hi = _numbers(value[0], f"{what} lo"), _numbers(value[1], f"{what} hi")
    if length is not None and not len(lo) == len(hi) == length:
        raise PlotError(f"{what} must have {length} lo and hi values")
    return lo, hi


def _axes_labels(ax: Axes, data: dict[str, Any]) -> None:
    ax.set_title(_label(data.get("title"), "title"))
    ax.set_xlabel(_label(data.get("xlabel"), "xlabel"))
    ax.set_ylabel(_label(data.get("ylabel"), "ylabel"))


# -- drawers -----------------------------------------------------------------------------------


def _line(fig: Figure, data: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    x = _numbers(data.get("x"), "x")
    series = _mapping(data.get("series"), "series")
    bands = _mapping(data.get("bands"), "bands", required=False)
    drawn: dict[str, list[float]] = {}
    for label, ys in series.items():
        y = _numbers(ys, f"series {label!r}")
        if len(y) != len(x):
            raise PlotError(f"series {label!r} has {len(y)} values for {len(x)} x values")
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=_label(label))
        drawn[label] = y
        if label in bands:
            lo, hi = _pair(bands[label], f"band {label!r}", len(x))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    unknown = set(bands) - set(series)
    if unknown:
        raise PlotError(f"bands for unknown series {sorted(unknown)}")
    _marks(ax, data.get("marks"), x, drawn)
    for entry in data.get("shade") or []:
        if not isinstance(entry, list) or len(entry) not in (2, 3):
            raise PlotError("shade entries must be (x0, x1, label)")
        x0, x1 = _numbers(entry[:2], "shade range")
        ax.axvspan(
            x0, x1, color="0.5", alpha=0.12, label=_label(entry[2]) if len(entry) == 3 else None
        )
    for entry in data.get("hlines") or []:
        if not isinstance(entry, list) or len(entry) not in (1, 2):
            raise PlotError("hlines entries must be (y, label)")
        (y0,) = _numbers(entry[:1], "hline")
        ax.axhline(
            y0,
            color="0.3",
            linestyle="--",
            linewidth=1,
            label=_label(entry[1]) if len(entry) == 2 else None,
        )
    if data.get("logx"):
        ax.set_xscale("log")
    _axes_labels(ax, data)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _marks(ax: Axes, marks: Any, x: list[float], drawn: dict[str, list[float]]) -> None:
    """Flag points of a line series (``marks=[(series, xs, label)]``) with a red cross,
    e.g. the layers a control calls suspect."""
    for entry in marks or []:
        if not isinstance(entry, list) or len(entry) != 3 or entry[0] not in drawn:
            raise PlotError("marks entries must be (series label, x values, label) of a "
                            "drawn series")
        xs = _numbers(entry[1], "marks x values")
        ys = [drawn[entry[0]][x.index(v)] for v in xs if v in x]
        ax.scatter([v for v in xs if v in x], ys, marker="x", s=60, color="red", zorder=5,
                   label=_label(entry[2]))


def _heatmap(fig: Figure, data: dict[str, Any]) -> None:
    matrix = data.get("matrix")
    if not isinstance(matrix, list) or not matrix:
        raise PlotError("matrix must be a non-empty list of rows")
    rows = [_numbers(row, f"matrix row {i}") for i, row in enumerate(matrix)]
    width = len(rows[0])
    if width == 0 or any(len(row) != width for row in rows):
        raise PlotError("matrix rows must all have the same, non-zero length")
    xlabels = [_label(v) for v in data.get("xlabels") or []]
    ylabels = [_label(v) for v in data.get("ylabels") or []]
    if xlabels and len(xlabels) != width:
        raise PlotError(f"{len(xlabels)} xlabels for {width} columns")
    if ylabels and len(ylabels) != len(rows):
        raise PlotError(f"{len(ylabels)} ylabels for {len(rows)} rows")
    cmap = data.get("cmap", "viridis")
    if cmap not in CMAPS:
        raise PlotError(f"cmap must be one of {CMAPS}")
    fig.set_size_inches(min(12.0, 2.5 + 0.35 * width), min(12.0, 2.0 + 0.3 * len(rows)))
    ax = fig.add_subplot()
    vmin, vmax = data.get("vmin"), data.get("vmax")
    limits = _numbers([v for v in (vmin, vmax) if v is not None], "vmin/vmax")
    image = ax.imshow(
        rows,
        aspect="auto",
        cmap=cmap,
        vmin=limits[0] if vmin is not None else None,
        vmax=limits[-1] if vmax is not None else None,
    )
    if xlabels:
        ax.set_xticks(range(width), xlabels, rotation=90 if width > 8 else 0, fontsize="small")
    if ylabels:
        ax.set_yticks(range(len(rows)), ylabels, fontsize="small")
    if data.get("annotate") and width * len(rows) <= 400:
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                text = "" if math.isnan(value) else f"{value:.2g}"
                ax.text(j, i, text, ha="center", va="center", fontsize="x-small")
    fig.colorbar(image, ax=ax, label=_label(data.get("clabel"), "clabel"))
    _axes_labels(ax, data)


def _bar(fig: Figure, data: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise PlotError("categories must be a non-empty list")
    names = [_label(c, "category") for c in categories]
    series = _mapping(data.get("series"), "series")
    errors = _mapping(data.get("errors"), "errors", required=False)
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        ys = _numbers(values, f"series {label!r}")
        if len(ys) != len(names):
            raise PlotError(f"series {label!r} has {len(ys)} values for {len(names)} categories")
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(names))]
        yerr = None
        if label in errors:
            lo, hi = _pair(errors[label], f"errors {label!r}", len(ys))
            yerr = [
                [max(0.0, y - lv) for y, lv in zip(ys, lo, strict=True)],
                [max(0.0, hv - y) for y, hv in zip(ys, hi, strict=True)],
            ]
        ax.bar(xs, ys, width=width, yerr=yerr, capsize=3, label=_label(label))
    ax.set_xticks(
        range(len(names)),
        names,
        rotation=45 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize="small",
    )
    _axes_labels(ax, data)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1 or errors:
        ax.legend(fontsize="small")


def _hist(fig: Figure, data: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    values = data.get("values")
    groups = values if isinstance(values, dict) else {"": values}
    bins = data.get("bins", 20)
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 1000:
        raise PlotError("bins must be an integer between 1 and 1000")
    for label, xs in groups.items():
        finite = [x for x in _numbers(xs, f"values {label!r}") if math.isfinite(x)]
        ax.hist(finite, bins=bins, alpha=0.5, label=_label(label) or None)
    _axes_labels(ax, data)
    if len(groups) > 1:
        ax.legend(fontsize="small")


def _scatter(fig: Figure, data: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    for label, pair in _mapping(data.get("series"), "series").items():
        xs, ys = _pair(pair, f"series {label!r}", None)
        if len(xs) != len(ys):
            raise PlotError(f"series {label!r} has {len(xs)} x and {len(ys)} y values")
        ax.scatter(xs, ys, s=12, alpha=0.7, label=_label(label))
    _axes_labels(ax, data)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


_DRAWERS: dict[str, Callable[[Figure, dict[str, Any]], None]] = {
    "line": _line,
    "heatmap": _heatmap,
    "bar": _bar,
    "hist": _hist,
    "scatter": _scatter,
}
