"""The HTML report: one self-contained page (no scripts, no network) from one or more runs.

Jinja2 renders with autoescaping on, and every printed value first passes through
:func:`reports.text.visible`, so a prompt or model output can neither inject markup nor
hide or reorder text. Plots are SVG images embedded as ``data:`` URIs.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports.document import write_text_atomic
from reports.measure import format_value
from reports.plots import render_plot
from reports.profile import profile_rows
from reports.text import visible

TEMPLATE_DIR = Path(__file__).with_name("templates")
_RANK = {"error": 3, "fail": 2, "pass": 1, "skipped": 0}


@dataclass
class Cell:
    """One hypothesis x model cell of the verdict matrix."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return str(max((e["verdict"] for e in self.entries), key=lambda v: _RANK.get(v, 3)))

    @property
    def counts(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for entry in self.entries:
            counts[entry["verdict"]] += 1
        return ", ".join(
            f"{counts[v]} {v}" for v in ("pass", "fail", "error", "skipped") if counts[v]
        )

    @property
    def flips(self) -> int:
        """Checks whose verdict flips under the judge-error correction."""
        return sum(bool(e.get("flips")) for e in self.entries)

    @property
    def tooltip(self) -> str:
        lines = [
            f"{e['where']}: {e['verdict']} {e['value'] or e['reason']}" for e in self.entries[:30]
        ]
        if len(self.entries) > 30:
            lines.append(f"... {len(self.entries) - 30} more")
        return "\n".join(lines)


def render_html(docs: list[dict[str, Any]], title: str = "refusalbench report") -> str:
    """Render validated report documents (one run, or several merged) to HTML text."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["value"] = lambda check: format_value(
        check["value"], check["ci"], check["value_flag"]
    )
    env.filters["corrected"] = _corrected_text
    template = env.get_template("report.html")
    return template.render(title=title, **build_view(docs))


def write_html(
    path: Path,
    docs: list[dict[str, Any]],
    title: str = "refusalbench report",
    make_parents: bool = True,
) -> None:
    """Render ``docs`` into one page at ``path`` (see :func:`write_text_atomic` for
    ``make_parents``)."""
    write_text_atomic(path, render_html(docs, title=title), make_parents=make_parents)


def _finalize(value: Any) -> Any:
    if value is None:
        return ""
    if hasattr(value, "__html__"):
        return value
    return visible(value if isinstance(value, str) else str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def build_view(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the template needs, computed in Python so the template stays simple."""
    several = len(docs) > 1
    hypotheses: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for hid, spec in doc["registry"]["hypotheses"].items():
            hypotheses.setdefault(hid, spec)

    matrix: dict[str, dict[str, Cell]] = defaultdict(lambda: defaultdict(Cell))
    models: set[str] = set()
    modules: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for index, doc in enumerate(docs, start=1):
        for test in doc["tests"]:
            view = _test_view(test, index if several else None)
            modules[test["module"]].append(view)
            for check in test["checks"]:
                model = check["model"] or "(no model)"
                models.add(model)
                where = test["nodeid"] + (f" [{check['label']}]" if check["label"] else "")
                if several:
                    where = f"run {index}: {where}"
                matrix[check["hypothesis"]][model].entries.append(
                    {
                        "verdict": check["verdict"],
                        "where": where,
                        "value": format_value(check["value"], check["ci"], check["value_flag"])
                        if check["verdict"] in ("pass", "fail")
                        else "",
                        "reason": check["reason"],
                        "label": check["label"],
                        "corrected": _corrected_text(check),
                        "flips": bool((check.get("judge_corrected") or {}).get("flips")),
                    }
                )
                hypotheses.setdefault(check["hypothesis"], _spec_from_check(check))

    rows = []
    for hid, spec in hypotheses.items():
        if hid not in matrix:
            continue
        rows.append(
            {
                "id": hid,
                "spec": spec,
                "claim": _claim_text(spec),
                "cells": [matrix[hid].get(model) for model in sorted(models)],
            }
        )
    unused = [spec for hid, spec in hypotheses.items() if hid not in matrix]
    experiments: list[dict[str, Any]] = [
        {
            "module": module,
            "anchor": _anchor(module),
            "tests": sorted(tests, key=lambda t: (t["nodeid"], t["run"] or 0)),
        }
        for module, tests in sorted(modules.items())
    ]
    return {
        "runs": [_run_view(doc, index) for index, doc in enumerate(docs, start=1)],
        "models": sorted(models),
        "rows": rows,
        "unused": unused,
        "experiments": experiments,
    }


def _corrected_text(check: dict[str, Any]) -> str:
    """The judge-corrected estimate and its verdict, or "" when the check has none."""
    corr = check.get("judge_corrected")
    if not corr:
        return ""
    flag = " (VERDICT FLIPS under judge correction)" if corr["flips"] else ""
    return (f"judge-corrected {format_value(corr['value'], corr['ci'])} -> "
            f"{corr['verdict']}{flag}")


def _spec_from_check(check: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": check["hypothesis"],
        "version": check["hypothesis_version"],
        "statement": check["statement"],
        "source": {"document": check["source"], "figure": ""},
        "metric": check["metric"],
        "comparison": check["comparison"],
        "threshold": check["threshold"],
        "bound": check["bound"],
        "tolerance": check["tolerance"],
    }


def _claim_text(spec: dict[str, Any]) -> str:
    threshold = spec["threshold"]
    if spec["comparison"] == "between":
        claim = f"{spec['metric']} in [{_fmt(threshold[0])}, {_fmt(threshold[1])}]"
    else:
        claim = f"{spec['metric']} {spec['comparison']} {_fmt(threshold)}"
    return f"{claim} ({spec['bound']} bound)"


def _run_view(doc: dict[str, Any], index: int) -> dict[str, Any]:
    prov = doc["provenance"]
    baseline = doc.get("baseline")
    if baseline:  # reports written before refusals existed lack these keys
        baseline = {"refusals": [], "not_comparable": [], **baseline}
    return {
        "index": index,
        "complete": doc["complete"],
        "interrupted": doc["interrupted"],
        "exit_status": doc["exit_status"],
        "summary": doc["summary"],
        "prov": prov,
        "contrasts": contrast_lines(prov),
        "registry": doc["registry"],
        "collection_errors": doc["collection_errors"],
        "baseline": baseline,
        "profile": profile_rows(doc["profile"]) if doc.get("profile") else None,
        "baseline_changes": [row for row in baseline["rows"] if row["status"] != "same"]
        if baseline
        else [],
    }


def contrast_lines(prov: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model's contrast (``--contrast``), pair set and notes, for the header: the
    contrast decides what every direction-based verdict measured."""
    out = []
    for model in prov.get("models") or []:
        info = model.get("info") or {}
        if "contrast" not in info:
            continue
        pairs = info.get("pairs")
        text = str(info["contrast"])
        if isinstance(pairs, dict):
            text += (f"; pairs {pairs.get('name')} ({pairs.get('n')} pairs, sha256 "
                     f"{str(pairs.get('sha256'))[:16]}...)")
        entry = {"model": model.get("name"), "text": text,
                 "notes": [str(n) for n in info.get("contrast_notes") or []]}
        if entry not in out:
            out.append(entry)
    return out


def _test_view(test: dict[str, Any], run: int | None) -> dict[str, Any]:
    plots = []
    for plot in test["plots"]:
        uri, error = render_plot(plot)
        plots.append(
            {
                "name": plot["name"],
                "model": plot["model"],
                "kind": plot["kind"],
                "uri": uri,
                "error": error,
                "nonfinite": plot["nonfinite"],
            }
        )
    texts = []
    for block in test["texts"]:
        columns: list[str] = []
        for row in block["rows"]:
            columns += [key for key in row if key not in columns]
        texts.append({**block, "columns": columns})
    return {
        **test,
        "run": run,
        "plots_view": plots,
        "texts_view": texts,
        "anchor": _anchor(test["nodeid"] + (f"-{run}" if run else "")),
    }


def _anchor(text: str) -> str:
    """A unique, HTML-id-safe anchor for a test or module."""
    safe = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in text).strip("-")
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"t-{safe[:60]}-{digest}"
