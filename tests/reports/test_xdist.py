"""Under pytest-xdist the workers send their records and only the controller writes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conftest import Bench

SUITE = """
    import pytest

    @pytest.mark.claim("GT-HALF")
    @pytest.mark.parametrize("layer", range(6))
    def test_layer(measure, layer):
        measure.model("tiny-a", "fp-aaa", layers=6)
        measure.prompts("harmful", "sha-h", 8)
        d = 0.3 + 0.1 * layer
        measure.metric("d", d, ci=(d - 0.05, d + 0.05), n=8)
        measure.texts("samples", [{"prompt": f"p{layer} <b>&", "output": "I cannot\\x00"}])
        measure.check("GT-HALF", d, ci=(d - 0.05, d + 0.05), label=f"layer {layer}")

    @pytest.mark.claim("LT-POINT", "BETWEEN")
    def test_other(measure):
        measure.model("tiny-b", "fp-bbb")
        measure.check("LT-POINT", 0.01)
        measure.skip("BETWEEN", "not measured on tiny-b")

    def test_plain():
        pass
"""


def test_xdist_run_matches_single_process_run(
    bench: Bench, normalise: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    bench.write_tests(SUITE)
    junit = bench.path / "junit.xml"
    parallel = bench.run_subprocess("-n", "2", f"--junitxml={junit}")
    parallel.assert_outcomes(passed=4, failed=3, skipped=1)
    doc_parallel = bench.report()
    shutil.copy(bench.json_path, bench.path / "parallel.json")

    single = bench.run_subprocess("-n", "0")
    single.assert_outcomes(passed=4, failed=3, skipped=1)
    doc_single = bench.report()

    assert doc_parallel["provenance"]["workers"] == 2
    assert {t["worker"] for t in doc_parallel["tests"]} <= {"gw0", "gw1"}
    assert {t["worker"] for t in doc_single["tests"]} == {None}
    assert normalise(doc_parallel) == normalise(doc_single)
    assert len(doc_parallel["tests"]) == 8
    assert doc_parallel["summary"]["verdicts"] == {"pass": 4, "fail": 3, "skipped": 1, "error": 0}
    # the controller wrote the only report; the transport property never reaches junitxml
    assert "refusalbench_record" not in junit.read_text(encoding="utf-8")
    assert "refusalbench hypothesis verdicts" in parallel.stdout.str()
