"""The JSON report: assembling one document per run, writing it atomically, reading it back.

Top-level shape (``reports/report.schema.json`` is the exact contract)::

    {
      "schema_version": 1, "tool": "refusalbench",
      "complete": bool,            # false while running, after an interrupt or a crash
      "interrupted": bool,         # Ctrl-C or SIGTERM
      "exit_status": int | null,   # pytest's; 128 + signal number after SIGTERM
      "registry": {path, registry_version, sha256, hypotheses: {id: {...}}},
      "provenance": {started_at, finished_at, duration_s, invocation, options, seed,
                     packages, git, machine, python, models, prompt_sets, workers},
      "summary": {tests, outcomes: {passed, failed, skipped, error},
                  verdicts: {pass, fail, skipped, error}},
      "tests": [ {nodeid, module, name, outcome, duration_s, worker, longrepr,
                  skip_reason, claims, model, models, prompts, metrics, tables,
                  plots, texts, checks} ... sorted by nodeid ],
      "collection_errors": [{nodeid, longrepr}],
      "baseline": null | {path, regressions, rows, fingerprint_changes, notes,
                          refusals, not_comparable},
      "profile": {columns, modules: [{module, tests, wall_s, load, prefill, decode, judge,
                  statistics}], total, outside_tests}   # optional; reports.profile
    }

Each test entry may also carry ``profile``: its wall time split by kind of work.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
OUTCOMES = ("passed", "failed", "skipped", "error")
VERDICTS = ("pass", "fail", "skipped", "error")


class ReportError(ValueError):
    """A JSON report could not be read or does not follow the schema."""


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def validate(doc: Any, source: str = "report") -> None:
    """Raise :class:`ReportError` naming the first schema violation (with its JSON path)."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ReportError(
            f"{source} is not a valid refusalbench report at {where}: {first.message}{more}"
        )


def load_report(path: Path) -> dict[str, Any]:
    """Read and validate a JSON report; every problem raises :class:`ReportError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ReportError(f"report {path} is not UTF-8 text: {exc.reason}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"report {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    validate(doc, source=f"report {path}")
    loaded: dict[str, Any] = doc
    return loaded


def dumps(doc: dict[str, Any]) -> str:
    """Strict JSON (no NaN), ASCII-escaped so every string survives byte for byte."""
    return json.dumps(doc, indent=1, ensure_ascii=True, allow_nan=False) + "\n"


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write to a temporary file in the target directory, then rename over ``path``."""
    write_text_atomic(path, dumps(doc))


def write_text_atomic(path: Path, text: str, make_parents: bool = True) -> None:
    """Write ``text`` via a temporary file and a rename. Missing parent directories are
    created only with ``make_parents`` (the plugin's paths, checked at option parsing);
    otherwise a missing directory raises :class:`ReportError`."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise ReportError(
            f"cannot write {path}: directory {path.parent} does not exist; create it first "
            f"(mkdir -p {path.parent}) or choose another output path"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Aggregation over test entries


def aggregate_models(tests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (name, fingerprint) pair seen in the tests, with the nodeids that used it."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for test in tests:
        for model in test["models"]:
            key = (model["name"], model["fingerprint"])
            entry = seen.setdefault(key, {**model, "info": {}, "tests": []})
            entry["info"].update(model["info"])  # tests may add details; later ones win
            entry["tests"].append(test["nodeid"])
    return [seen[key] for key in sorted(seen)]


def aggregate_prompts(tests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str, int], dict[str, Any]] = {}
    for test in tests:
        for prompt in test["prompts"]:
            key = (prompt["name"], prompt["sha256"], prompt["n"])
            seen.setdefault(key, {**prompt, "tests": []})["tests"].append(test["nodeid"])
    return [seen[key] for key in sorted(seen)]


def summarize(tests: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = Counter(test["outcome"] for test in tests)
    verdicts = Counter(check["verdict"] for test in tests for check in test["checks"])
    return {
        "tests": len(tests),
        "outcomes": {name: outcomes.get(name, 0) for name in OUTCOMES},
        "verdicts": {name: verdicts.get(name, 0) for name in VERDICTS},
    }


def all_checks(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(test, check) pairs of a document, in test order."""
    return [(test, check) for test in doc["tests"] for check in test["checks"]]
