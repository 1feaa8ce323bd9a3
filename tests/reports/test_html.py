"""The HTML report: escaping of hostile strings, self-containment, robust plots."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest

from reports.plots import render_plot

if TYPE_CHECKING:
    from conftest import Bench

HOSTILE = "<script>alert(1)</script> \"double\" 'single' & &amp; \x00\x07\x1b\x1f \u202eevil"

SUITE = """
    import json
    import pytest

    HOSTILE = json.loads(open("hostile.json").read())

    @pytest.mark.claim("GT-HALF")
    def test_hostile(measure):
        measure.model("tiny-a", "fp-aaa", note=HOSTILE)
        measure.prompts("harmful", "sha-h", 1)
        measure.metric("d " + HOSTILE, 0.9, ci=(0.7, 1.1))
        measure.table("outputs", ["prompt", "score"], [[HOSTILE, 1.0]])
        measure.texts("samples", [{"prompt": HOSTILE, "output": "I cannot " + HOSTILE}])
        measure.plot("good " + HOSTILE, "line", x=[0, 1], series={HOSTILE: [0.1, 0.2]},
                     title=HOSTILE)
        measure.plot("malformed", "line", x=[0, 1, 2], series={"d": [1.0]})
        measure.plot("not even data", "heatmap", matrix="oops")
        measure.check("GT-HALF", 0.9, ci=(0.7, 1.1), detail=HOSTILE, label=HOSTILE)
"""


@pytest.fixture
def hostile_run(bench: Bench) -> tuple[str, dict[str, Any]]:
    (bench.path / "hostile.json").write_text(json.dumps(HOSTILE), encoding="utf-8")
    bench.write_tests(SUITE)
    bench.run().assert_outcomes(passed=1)
    return bench.html_path.read_text(encoding="utf-8"), bench.report()


def test_hostile_strings_are_intact_in_json(hostile_run: tuple[str, dict[str, Any]]) -> None:
    _, doc = hostile_run
    (test,) = doc["tests"]
    assert test["texts"][0]["rows"][0] == {"prompt": HOSTILE, "output": "I cannot " + HOSTILE}
    assert test["tables"][0]["rows"][0][0] == HOSTILE
    assert test["models"][0]["info"]["note"] == HOSTILE
    assert test["checks"][0]["label"] == HOSTILE
    assert test["metrics"][0]["name"] == "d " + HOSTILE


def test_hostile_strings_are_escaped_in_html(hostile_run: tuple[str, dict[str, Any]]) -> None:
    html, _ = hostile_run
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;double&#34;" in html
    assert "&#39;single&#39;" in html
    assert "&amp; &amp;amp;" in html
    # control and bidi characters are shown as escapes, never emitted raw
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\u202e]", html)
    assert "\\x00\\x07\\x1b\\x1f \\u202eevil" in html


def test_report_is_self_contained(hostile_run: tuple[str, dict[str, Any]]) -> None:
    html, _ = hostile_run
    assert "<link" not in html
    assert "@import" not in html
    assert "url(" not in html
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:", "#")), attr
    assert "Content-Security-Policy" in html


def test_malformed_plots_render_an_error_box(hostile_run: tuple[str, dict[str, Any]]) -> None:
    html, _ = hostile_run
    assert html.count("data:image/svg+xml;base64,") == 1  # the good plot only
    assert html.count('class="errorbox plot-error"') == 2
    assert "series &#39;d&#39; has 1 values for 3 x values" in html
    assert "matrix must be a non-empty list of rows" in html


def test_matrix_cell_shows_verdict_value_and_tooltip(
    hostile_run: tuple[str, dict[str, Any]],
) -> None:
    html, _ = hostile_run
    cell = re.search(r'<td class="cell v-pass" title="([^"]*)">(.*?)</td>', html, re.S)
    assert cell is not None
    tooltip, body = cell.groups()
    assert "GT-HALF: The effect is larger than one half." in tooltip
    assert "claim: effect &gt; 0.5 (lower bound)" in tooltip
    assert "pass" in body
    assert "0.9 [0.7, 1.1]" in body


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (
            "line",
            {
                "x": [0, 1, 2],
                "series": {"a": [1, None, 3]},
                "bands": {"a": [[0, 0, 2], [2, 2, 4]]},
                "shade": [[0.5, 1.5, "window"]],
                "hlines": [[2.0, "threshold"]],
                "xlabel": "alpha",
                "ylabel": "rate",
                "title": "t",
            },
        ),
        (
            "heatmap",
            {
                "matrix": [[1, 0.2], [0.2, 1]],
                "xlabels": ["a", "b"],
                "ylabels": ["a", "b"],
                "vmin": -1,
                "vmax": 1,
                "cmap": "RdBu_r",
                "annotate": True,
            },
        ),
        (
            "bar",
            {
                "categories": ["probe", "mean_diff"],
                "series": {"acc": [0.86, 0.66]},
                "errors": {"acc": [[0.8, 0.6], [0.9, 0.7]]},
            },
        ),
        ("hist", {"values": {"harmful": [1, 2, 2, 3], "harmless": [0, 1, 1]}, "bins": 4}),
        ("scatter", {"series": {"layers": [[0, 1, 2], [0.5, 0.7, 0.9]]}, "title": "$x$"}),
    ],
)
def test_every_plot_kind_draws(kind: str, data: dict[str, Any]) -> None:
    uri, error = render_plot({"kind": kind, "data": data})
    assert error is None
    assert uri is not None
    assert uri.startswith("data:image/svg+xml;base64,")


@pytest.mark.parametrize(
    ("plot", "message"),
    [
        ({"kind": "pie", "data": {}}, "unknown plot kind 'pie'"),
        ({"kind": "line", "data": None}, "plot data must be an object"),
        ({"kind": "line", "data": {"x": [0], "series": {}}}, "non-empty mapping"),
        ({"kind": "line", "data": {"x": ["a"], "series": {"s": [1]}}}, "must contain numbers"),
        ({"kind": "bar", "data": {"categories": ["a"], "series": {"s": [1, 2]}}}, "2 values for 1"),
        ({"kind": "hist", "data": {"values": [1], "bins": 0}}, "bins must be an integer"),
        ({"kind": "heatmap", "data": {"matrix": [[1]], "cmap": "jet"}}, "cmap must be one of"),
    ],
)
def test_bad_plot_payloads_give_messages(plot: dict[str, Any], message: str) -> None:
    uri, error = render_plot(plot)
    assert uri is None
    assert error is not None
    assert message in error
