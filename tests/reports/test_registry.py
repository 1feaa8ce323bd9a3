"""The hypothesis registry: the project's data file, schema errors, and the decision rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reports.registry import (
    Hypothesis,
    Registry,
    RegistryError,
    evaluate,
    load_registry,
    parse_registry,
)

PROJECT_IDS = {
    "LAYER-VALID",
    "LAYER-PEAK-LATE",
    "LAYER-GROWTH",
    "PROBE-NO-POLARITY-FAIL",
    "PROBE-BEATS-MEANDIFF",
    "RANDOM-NEAR-CHANCE",
    "ABLATION-LOWERS-REFUSAL",
    "CONE-POLYHEDRAL",
    "TIS-OVERREFUSAL-MONOTONE",
}

ENTRY = """
[[hypothesis]]
id = "{id}"
version = 1
statement = "A claim."
source = {{ document = "doc", figure = "fig" }}
metric = "m"
comparison = "{comparison}"
threshold = {threshold}
bound = "{bound}"
"""


def registry_text(*entries: str, version: str = "1") -> str:
    return f"registry_version = {version}\n" + "".join(entries)


def entry(
    id: str = "H", comparison: str = ">", threshold: str = "0.5", bound: str = "lower"
) -> str:
    return ENTRY.format(id=id, comparison=comparison, threshold=threshold, bound=bound)


def load_text(tmp_path: Path, text: str) -> Registry:
    path = tmp_path / "hyp.toml"
    path.write_text(text, encoding="utf-8")
    return load_registry(path)


def test_project_registry_loads_with_the_initial_entries(repo_root: Path) -> None:
    registry = load_registry(repo_root / "benchmarks" / "hypotheses.toml")
    assert set(registry.hypotheses) >= PROJECT_IDS
    assert registry.registry_version >= 1
    for hyp in registry.hypotheses.values():
        assert hyp.statement.endswith("."), hyp.id  # one full sentence
        assert hyp.source.document
    random = registry.get("RANDOM-NEAR-CHANCE")
    assert random.comparison == "between"
    assert random.threshold == (0.35, 0.65)
    assert registry.get("CONE-POLYHEDRAL").bound == "upper"


def test_valid_registry_round_trips(tmp_path: Path, registry_toml: str) -> None:
    registry = load_text(tmp_path, registry_toml)
    assert list(registry.hypotheses) == ["GT-HALF", "LT-POINT", "BETWEEN"]
    assert registry.registry_version == 3
    assert registry.sha256 is not None
    assert len(registry.sha256) == 64
    assert registry.get("GT-HALF").tolerance == 0.1
    assert registry.as_json()["hypotheses"]["BETWEEN"]["threshold"] == [0.35, 0.65]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (registry_text(entry("A"), entry("A")), "duplicate hypothesis id 'A'"),
        (registry_text(entry(comparison="=>")), "bad comparison '=>'"),
        (registry_text(entry(bound="middle")), "bad bound 'middle'"),
        (registry_text(entry(bound="upper")), "not conservative for a '>' claim"),
        (registry_text(entry(comparison="<", bound="lower")), "not conservative for a '<' claim"),
        (registry_text(entry(comparison="between", bound="point")), "between' needs threshold"),
        (
            registry_text(entry(comparison="between", threshold="[0.6, 0.4]", bound="point")),
            "lo < hi",
        ),
        (registry_text(entry(threshold='"high"')), "'threshold' must be a finite number"),
        (registry_text(entry().replace('metric = "m"\n', "")), "missing field(s) ['metric']"),
        (registry_text(entry() + "colour = 1\n"), "unknown field(s) ['colour']"),
        (registry_text(entry() + "tolerance = -1\n"), "'tolerance' must be a non-negative"),
        (registry_text(entry(), version='"one"'), "'registry_version' must be a positive"),
        ("[[hypothesis]]\nid = 1\n", "registry_version"),
        ("registry_version = 1\nhypothesis = 3\n", "array of tables"),
        ("registry_version = 1\n[[hypothesis]\n", "not valid TOML"),
    ],
)
def test_schema_errors_are_clear(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RegistryError) as excinfo:
        load_text(tmp_path, text)
    assert message in str(excinfo.value)
    assert "hyp.toml" in str(excinfo.value)


def test_missing_field_error_names_the_hypothesis(tmp_path: Path) -> None:
    text = registry_text(entry("GOOD"), entry("BAD").replace('statement = "A claim."\n', ""))
    with pytest.raises(RegistryError, match=r"entry #2 \(id 'BAD'\): missing field"):
        load_text(tmp_path, text)


def test_unreadable_registry(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read hypothesis registry"):
        load_registry(tmp_path / "nope.toml")


def registry_of(**fields: object) -> Hypothesis:
    spec = {
        "id": "H",
        "version": 1,
        "statement": "s",
        "source": {"document": "d", "figure": "f"},
        "metric": "m",
        **fields,
    }
    return parse_registry({"registry_version": 1, "hypothesis": [spec]}, path="inline").get("H")


@pytest.mark.parametrize(
    ("fields", "value", "ci", "verdict"),
    [
        ({"comparison": ">", "threshold": 0.5, "bound": "lower"}, 0.9, (0.6, 1.2), "pass"),
        ({"comparison": ">", "threshold": 0.5, "bound": "lower"}, 0.9, (0.4, 1.2), "fail"),
        ({"comparison": ">", "threshold": 0.5, "bound": "lower"}, 0.9, (0.5, 1.2), "fail"),
        ({"comparison": ">=", "threshold": 0.5, "bound": "lower"}, 0.9, (0.5, 1.2), "pass"),
        ({"comparison": ">", "threshold": 0.5, "bound": "point"}, 0.9, None, "pass"),
        ({"comparison": "<", "threshold": 0.8, "bound": "upper"}, 0.1, (0.0, 0.79), "pass"),
        ({"comparison": "<", "threshold": 0.8, "bound": "upper"}, 0.1, (0.0, 0.81), "fail"),
        ({"comparison": "<=", "threshold": 0.0, "bound": "point"}, 0.0, None, "pass"),
        ({"comparison": "between", "threshold": [0.35, 0.65], "bound": "point"}, 0.5, None, "pass"),
        ({"comparison": "between", "threshold": [0.35, 0.65], "bound": "point"}, 0.7, None, "fail"),
        (
            {"comparison": "between", "threshold": [0.35, 0.65], "bound": "interval"},
            0.5,
            (0.4, 0.6),
            "pass",
        ),
        (
            {"comparison": "between", "threshold": [0.35, 0.65], "bound": "interval"},
            0.5,
            (0.3, 0.6),
            "fail",
        ),
        ({"comparison": ">", "threshold": 0.5, "bound": "interval"}, 0.9, (0.6, 1.0), "pass"),
        ({"comparison": "<", "threshold": 0.5, "bound": "interval"}, 0.1, (0.0, 0.6), "fail"),
    ],
)
def test_evaluate_uses_the_declared_bound(
    fields: dict[str, object], value: float, ci: tuple[float, float] | None, verdict: str
) -> None:
    assert evaluate(registry_of(**fields), value, ci).verdict == verdict


@pytest.mark.parametrize(
    ("value", "ci", "reason"),
    [
        (math.nan, (0.1, 0.2), "NaN"),
        (None, (0.1, 0.2), "missing"),
        (0.9, None, "no interval was given"),
        (0.9, (math.nan, 1.0), "not finite"),
        (0.9, (1.0, 0.5), "above upper end"),
    ],
)
def test_evaluate_never_passes_silently(
    value: float | None, ci: tuple[float, float] | None, reason: str
) -> None:
    hyp = registry_of(comparison=">", threshold=0.5, bound="lower")
    result = evaluate(hyp, value, ci)
    assert result.verdict == "error"
    assert reason in result.reason
