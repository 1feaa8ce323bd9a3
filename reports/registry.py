"""The hypothesis registry: hypotheses as versioned data, and how a claim is judged.

The registry is one TOML file (``benchmarks/hypotheses.toml`` by default)::

    registry_version = 1

    [[hypothesis]]
    id = "LAYER-VALID"
    version = 1
    statement = "One sentence that is either true or false for a model."
    source = { document = "Qwen2.5-1.5B validation report (...)", figure = "28/28 layers valid" }
    metric = "cohens_d_heldout"
    comparison = ">"          # one of > >= < <= between
    threshold = 0.5           # [lo, hi] for "between"
    bound = "lower"           # lower | upper | point | interval
    tolerance = 0.25          # optional: absolute drift allowed by the baseline gate

``bound`` names the number that is compared with the threshold. A claim is judged on
its conservative side: ``>``/``>=`` claims use the lower end of the interval, ``<``/``<=``
claims the upper end; ``point`` uses the point estimate. ``interval`` requires the whole
interval to satisfy the claim (for ``between``: both ends inside ``[lo, hi]``; for ``>``
the same as ``lower``, for ``<`` the same as ``upper``). A non-conservative pairing (``>``
with ``upper``) is rejected when the registry is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

Comparison = Literal[">", ">=", "<", "<=", "between"]
Bound = Literal["lower", "upper", "point", "interval"]
Verdict = Literal["pass", "fail", "skipped", "error"]

COMPARISONS: tuple[str, ...] = get_args(Comparison)
BOUNDS: tuple[str, ...] = get_args(Bound)

# Which bounds keep each comparison conservative.
_ALLOWED_BOUNDS: dict[str, tuple[str, ...]] = {
    ">": ("lower", "point", "interval"),
    ">=": ("lower", "point", "interval"),
    "<": ("upper", "point", "interval"),
    "<=": ("upper", "point", "interval"),
    "between": ("point", "interval"),
}

_REQUIRED = ("id", "version", "statement", "source", "metric", "comparison", "threshold", "bound")
_OPTIONAL = ("tolerance",)


class RegistryError(ValueError):
    """The registry file is missing, unreadable or does not follow the schema."""


@dataclass(frozen=True)
class Source:
    """Where a hypothesis comes from: the document and the figure it reported."""

    document: str
    figure: str

    def __str__(self) -> str:
        return f"{self.document}: {self.figure}" if self.figure else self.document


@dataclass(frozen=True)
class Hypothesis:
    """One falsifiable claim with its decision rule."""

    id: str
    version: int
    statement: str
    source: Source
    metric: str
    comparison: Comparison
    threshold: float | tuple[float, float]
    bound: Bound
    tolerance: float | None = None

    def threshold_text(self) -> str:
        """The claim as text, e.g. ``> 0.5`` or ``in [0.35, 0.65]``."""
        if isinstance(self.threshold, tuple):
            lo, hi = self.threshold
            return f"in [{_num(lo)}, {_num(hi)}]"
        return f"{self.comparison} {_num(self.threshold)}"

    def as_json(self) -> dict[str, Any]:
        threshold: float | list[float] = (
            list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        )
        return {
            "id": self.id,
            "version": self.version,
            "statement": self.statement,
            "source": {"document": self.source.document, "figure": self.source.figure},
            "metric": self.metric,
            "comparison": self.comparison,
            "threshold": threshold,
            "bound": self.bound,
            "tolerance": self.tolerance,
        }


@dataclass(frozen=True)
class Registry:
    """All hypotheses of one registry file, by id (file order kept)."""

    path: str | None
    registry_version: int
    sha256: str | None
    hypotheses: Mapping[str, Hypothesis] = field(default_factory=dict)

    def __contains__(self, hypothesis_id: object) -> bool:
        return hypothesis_id in self.hypotheses

    def get(self, hypothesis_id: str) -> Hypothesis:
        try:
            return self.hypotheses[hypothesis_id]
        except KeyError:
            raise KeyError(
                f"unknown hypothesis id {hypothesis_id!r} (registry {self.path or '<empty>'})"
            ) from None

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "registry_version": self.registry_version,
            "sha256": self.sha256,
            "hypotheses": {hid: h.as_json() for hid, h in self.hypotheses.items()},
        }


def empty_registry(path: str | None = None) -> Registry:
    return Registry(path=path, registry_version=0, sha256=None, hypotheses={})


def load_registry(path: Path) -> Registry:
    """Read and validate a registry file; every problem raises :class:`RegistryError`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read hypothesis registry {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"hypothesis registry {path} is not valid TOML: {exc}") from None
    return parse_registry(data, path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def parse_registry(data: Mapping[str, Any], path: str, sha256: str | None = None) -> Registry:
    """Validate the parsed TOML of a registry file."""
    where = f"hypothesis registry {path}"
    unknown_top = sorted(set(data) - {"registry_version", "hypothesis"})
    if unknown_top:
        raise RegistryError(f"{where}: unknown top-level key(s) {unknown_top}")
    version = data.get("registry_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistryError(f"{where}: 'registry_version' must be a positive integer")
    entries = data.get("hypothesis", [])
    if not isinstance(entries, list):
        raise RegistryError(f"{where}: 'hypothesis' must be an array of tables ([[hypothesis]])")
    hypotheses: dict[str, Hypothesis] = {}
    for index, entry in enumerate(entries):
        hyp = _parse_entry(entry, f"{where}, entry #{index + 1}")
        if hyp.id in hypotheses:
            raise RegistryError(f"{where}: duplicate hypothesis id {hyp.id!r}")
        hypotheses[hyp.id] = hyp
    return Registry(path=path, registry_version=version, sha256=sha256, hypotheses=hypotheses)


def _parse_entry(entry: object, where: str) -> Hypothesis:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: must be a table")
    if isinstance(entry.get("id"), str):
        where = f"{where} (id {entry['id']!r})"
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise RegistryError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {unknown}")

    hid = entry["id"]
    if not isinstance(hid, str) or not hid or any(ch.isspace() for ch in hid):
        raise RegistryError(f"{where}: 'id' must be a non-empty string without spaces")
    for key in ("statement", "metric"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise RegistryError(f"{where}: {key!r} must be a non-empty string")
    if not _is_int(entry["version"]) or entry["version"] < 1:
        raise RegistryError(f"{where}: 'version' must be a positive integer")
    source = _parse_source(entry["source"], where)

    comparison = entry["comparison"]
    if comparison not in COMPARISONS:
        raise RegistryError(
            f"{where}: bad comparison {comparison!r}; expected one of {list(COMPARISONS)}"
        )
    bound = entry["bound"]
    if bound not in BOUNDS:
        raise RegistryError(f"{where}: bad bound {bound!r}; expected one of {list(BOUNDS)}")
    if bound not in _ALLOWED_BOUNDS[comparison]:
        raise RegistryError(
            f"{where}: bound {bound!r} is not conservative for a {comparison!r} claim; "
            f"use one of {list(_ALLOWED_BOUNDS[comparison])}"
        )
    threshold = _parse_threshold(entry["threshold"], comparison, where)

    tolerance = entry.get("tolerance")
    if tolerance is not None and (not _is_number(tolerance) or tolerance < 0):
        raise RegistryError(f"{where}: 'tolerance' must be a non-negative number")
    return Hypothesis(
        id=hid,
        version=entry["version"],
        statement=entry["statement"].strip(),
        source=source,
        metric=entry["metric"],
        comparison=cast(Comparison, comparison),
        threshold=threshold,
        bound=cast(Bound, bound),
        tolerance=None if tolerance is None else float(tolerance),
    )


def _parse_source(value: object, where: str) -> Source:
    if isinstance(value, str) and value.strip():
        return Source(document=value.strip(), figure="")
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"document", "figure"})
        document, figure = value.get("document"), value.get("figure", "")
        if not unknown and isinstance(document, str) and document and isinstance(figure, str):
            return Source(document=document, figure=figure)
    raise RegistryError(
        f'{where}: \'source\' must be {{ document = "...", figure = "..." }} or a string'
    )


def _parse_threshold(value: object, comparison: str, where: str) -> float | tuple[float, float]:
    if comparison == "between":
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_number(v) for v in value)
            and float(value[0]) < float(value[1])
        ):
            return (float(value[0]), float(value[1]))
        raise RegistryError(f"{where}: 'between' needs threshold = [lo, hi] with lo < hi")
    if not _is_number(value):
        raise RegistryError(f"{where}: 'threshold' must be a finite number for {comparison!r}")
    return float(cast(float, value))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _num(value: float) -> str:
    return f"{value:.4g}"


# --------------------------------------------------------------------------------------------
# Judging a measured value against a hypothesis


@dataclass(frozen=True)
class Evaluation:
    """The outcome of comparing one measurement with one hypothesis."""

    verdict: Verdict
    used: float | tuple[float, float] | None  # the number(s) compared with the threshold
    reason: str  # e.g. "lower bound 0.12 > 0.5: does not hold"


def evaluate(hyp: Hypothesis, value: float | None, ci: tuple[float, float] | None) -> Evaluation:
    """Compare the bound named by ``hyp.bound`` with the threshold.

    A missing or non-finite value, or a bound that needs an interval when none was
    given, is an ``error`` verdict: it never passes silently.
    """
    if value is None or not math.isfinite(value):
        return Evaluation("error", None, f"measured value is {_describe_bad(value)}")
    if ci is not None:
        lo, hi = ci
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return Evaluation("error", None, f"interval [{lo}, {hi}] is not finite")
        if lo > hi:
            return Evaluation("error", None, f"interval lower end {lo} above upper end {hi}")
    if hyp.bound != "point" and ci is None:
        return Evaluation(
            "error", None, f"hypothesis uses the {hyp.bound} bound but no interval was given"
        )

    used: float | tuple[float, float]
    if hyp.bound == "point":
        used = value
    elif hyp.bound == "lower":
        used = cast(tuple[float, float], ci)[0]
    elif hyp.bound == "upper":
        used = cast(tuple[float, float], ci)[1]
    elif hyp.comparison == "between":
        used = cast(tuple[float, float], ci)
    elif hyp.comparison in (">", ">="):
        used = cast(tuple[float, float], ci)[0]
    else:
        used = cast(tuple[float, float], ci)[1]

    ok = _compare(hyp, used)
    what = _describe_used(hyp, used)
    verdict: Verdict = "pass" if ok else "fail"
    holds = "holds" if ok else "does not hold"
    return Evaluation(verdict, used, f"{what} {hyp.threshold_text()}: {holds}")


def _compare(hyp: Hypothesis, used: float | tuple[float, float]) -> bool:
    if hyp.comparison == "between":
        lo_t, hi_t = cast(tuple[float, float], hyp.threshold)
        lo, hi = used if isinstance(used, tuple) else (used, used)
        return lo_t <= lo and hi <= hi_t
    assert not isinstance(used, tuple)
    threshold = cast(float, hyp.threshold)
    if hyp.comparison == ">":
        return used > threshold
    if hyp.comparison == ">=":
        return used >= threshold
    if hyp.comparison == "<":
        return used < threshold
    return used <= threshold


def _describe_used(hyp: Hypothesis, used: float | tuple[float, float]) -> str:
    if isinstance(used, tuple):
        return f"interval [{_num(used[0])}, {_num(used[1])}]"
    label = {"point": "point estimate", "lower": "lower bound", "upper": "upper bound"}.get(
        hyp.bound, "interval bound"
    )
    return f"{label} {_num(used)}"


def _describe_bad(value: float | None) -> str:
    if value is None:
        return "missing (None)"
    return "NaN" if math.isnan(value) else str(value)


# -- the lock: a claim never changes without a version bump -------------------------------------

LOCK_SUFFIX = ".lock.json"


def claim_sha256(h: Hypothesis) -> str:
    """Hash of what decides a verdict: statement, metric, comparison, threshold, bound."""
    claim = h.as_json()
    decisive = {k: claim[k] for k in ("statement", "metric", "comparison", "threshold", "bound")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def lock_path(registry_path: Path) -> Path:
    """``benchmarks/hypotheses.toml`` -> ``benchmarks/hypotheses.lock.json``."""
    return registry_path.with_name(registry_path.stem + LOCK_SUFFIX)


def read_lock(path: Path) -> dict[str, dict[str, Any]]:
    """The locked claims by id; a missing or malformed lock raises :class:`RegistryError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        claims = data["claims"]
        if not isinstance(claims, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("version"), int)
            and isinstance(v.get("claim_sha256"), str) for v in claims.values()
        ):
            raise ValueError("'claims' must map ids to {version, claim_sha256}")
    except FileNotFoundError:
        raise RegistryError(f"no registry lock at {path}: create it with "
                            "`python -m reports lock`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"registry lock {path} is unreadable ({exc}); restore it from "
                            "version control") from None
    return claims


def lock_problems(registry: Registry, locked: Mapping[str, Mapping[str, Any]]
                  ) -> tuple[list[str], list[str]]:
    """(violations, stale): claims changed without a version bump (or whose version went
    down, or an id reused at a retired version), and lock entries that only need refreshing
    (new ids, bumped versions)."""
    violations: list[str] = []
    stale: list[str] = []
    for hid, h in registry.hypotheses.items():
        entry = locked.get(hid)
        if entry is None:
            stale.append(f"{hid}: new claim (version {h.version}) not in the lock")
            continue
        if h.version < entry["version"]:
            violations.append(f"{hid}: version {h.version} is below the locked "
                              f"{entry['version']}; versions only go up")
        elif h.version == entry["version"] and claim_sha256(h) != entry["claim_sha256"]:
            violations.append(f"{hid}: statement, metric, comparison, threshold or bound changed "
                              f"without a version bump (still {h.version}); bump 'version' "
                              "and 'registry_version'")
        elif h.version > entry["version"] and not entry.get("retired"):
            stale.append(f"{hid}: version {entry['version']} -> {h.version}")
        elif entry.get("retired") and h.version == entry["version"]:
            violations.append(f"{hid}: a removed claim's id is back at its old version; "
                              "bump its version (ids are never reused for another claim)")
    return violations, stale


def make_lock(registry: Registry, previous: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, Any]:
    """The lock of ``registry``; ids of ``previous`` no longer in it stay, marked retired."""
    claims: dict[str, dict[str, Any]] = {
        hid: {**entry, "retired": True} for hid, entry in previous.items()
        if hid not in registry.hypotheses
    }
    for hid, h in registry.hypotheses.items():
        claims[hid] = {"version": h.version, "claim_sha256": claim_sha256(h)}
    return {"registry_version": registry.registry_version,
            "claims": dict(sorted(claims.items()))}
