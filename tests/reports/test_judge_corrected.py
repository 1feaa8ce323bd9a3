"""A claim's judge-corrected estimate in the JSON and HTML reports, and the flag when the
verdict flips under the correction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from reports.document import validate
from reports.measure import Measure
from reports.registry import load_registry

if TYPE_CHECKING:
    from conftest import Bench

SUITE = """
    import pytest

    @pytest.mark.claim("GT-HALF")
    def test_flips(measure):
        measure.model("tiny-a", "fp-aaa")
        measure.check("GT-HALF", 0.9, ci=(0.7, 1.1), label="flips",
                      judge_corrected=(0.45, (0.3, 0.6), "Rogan-Gladen, synthetic judge"))
        measure.check("GT-HALF", 0.9, ci=(0.7, 1.1), label="holds",
                      judge_corrected=(0.8, (0.6, 1.0), "Rogan-Gladen, synthetic judge"))
"""


def test_flip_is_flagged_in_json_and_html(bench: Bench) -> None:
    bench.write_tests(SUITE)
    bench.run().assert_outcomes(passed=1)
    doc = bench.report()
    validate(doc)
    checks = {c["label"]: c for t in doc["tests"] for c in t["checks"]}
    flipped, kept = checks["flips"], checks["holds"]
    assert flipped["verdict"] == "pass"  # the raw verdict stays; the correction is beside it
    assert flipped["judge_corrected"]["verdict"] == "fail"
    assert flipped["judge_corrected"]["flips"] is True
    assert flipped["judge_corrected"]["bound_value"] == 0.3
    assert "VERDICT FLIPS" in flipped["message"]
    assert kept["judge_corrected"]["verdict"] == "pass"
    assert kept["judge_corrected"]["flips"] is False
    html = bench.html_path.read_text(encoding="utf-8")
    assert "1 flip under judge correction" in html
    assert "judge-corrected 0.45 [0.3, 0.6] -&gt; fail (VERDICT FLIPS under judge correction)" \
        in html
    assert "judge-corrected 0.8 [0.6, 1] -&gt; pass" in html


def test_a_check_without_correction_has_no_field(tmp_path: Path, registry_toml: str) -> None:
    path = tmp_path / "hyp.toml"
    path.write_text(registry_toml, encoding="utf-8")
    m = Measure(load_registry(path), "t.py::t", ("GT-HALF",))
    m.model("tiny", "fp")
    m.check("GT-HALF", 0.9, ci=(0.7, 1.1))
    assert "judge_corrected" not in m.data.checks[0]
    m.check("GT-HALF", 0.9, ci=(0.7, 1.1), label="nan",
            judge_corrected=(float("nan"), None, "judge at chance"))
    corr = m.data.checks[1]["judge_corrected"]
    assert corr["verdict"] == "error" and corr["flips"] is False
