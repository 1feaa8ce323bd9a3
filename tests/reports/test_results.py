"""``python -m reports results``: experiment pages' results sections from a JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from reports.__main__ import main
from reports.results import BEGIN, END, page_name

if TYPE_CHECKING:
    from conftest import Bench

SUITE = """
    import pytest

    @pytest.mark.claim("GT-HALF", "LT-POINT")
    def test_effect(measure):
        measure.model("tiny-a", "0123456789abcdef0123", dtype="torch.float32", profile="quick")
        measure.check("GT-HALF", 0.9, ci=(0.7, 1.1), n=40, label="layer 1", hard=False)
        measure.check("GT-HALF", 0.4, ci=(0.2, 0.6), n=40, label="layer 2", hard=False)
        measure.check("LT-POINT", 0.01, n=12)
        measure.check("LT-POINT", float("nan"), label="layer 0", detail="no direction", hard=False)

    @pytest.mark.claim("BETWEEN")
    @pytest.mark.parametrize("layer", [0])
    def test_chance(measure, layer):
        measure.model("tiny-a", "0123456789abcdef0123", dtype="float32", profile="quick")
        measure.skip("BETWEEN", "model refused 0 of 8 prompts")
"""

HAND_WRITTEN = """# Exp

Question and protocol, written by hand.

## Results

{begin}
old generated text
{end}

Notes after the results, also by hand.
"""


@pytest.fixture
def report(bench: Bench) -> Path:
    bench.write_tests(SUITE)
    bench.run()
    return bench.json_path


def test_page_name_follows_the_benchmark_module() -> None:
    assert page_name("benchmarks/test_dose_response.py") == "dose_response"
    assert page_name("benchmarks/cross_layer.py") is None


def test_creates_a_page_with_every_check_and_the_provenance(
    report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pages"
    assert main(["results", str(report), "-o", str(out)]) == 0
    page = (out / "exp.md").read_text(encoding="utf-8")
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    assert "fingerprint `0123456789ab`" in page and "0123456789abcdef" not in page
    assert "dtype float32, profile quick, run of 20" in page
    assert "verdicts: 2 pass, 1 fail, 1 skipped, 1 error" in page
    assert "| LT-POINT v1 | layer 0 | tiny-a | **error** | nan (no direction) | - |" in page
    row = "| GT-HALF v2 | layer {} | tiny-a | {} | {} | [{}] | > 0.5 (lower) | 40 |"
    assert row.format(1, "pass", 0.9, "0.7, 1.1") in page
    assert row.format(2, "**fail**", 0.4, "0.2, 0.6") in page
    assert "| LT-POINT v1 | - | tiny-a | pass | 0.01 | - | < 0.1 (point) | 12 |" in page
    skipped = "| BETWEEN v1 | 0 | tiny-a | skipped | - (model refused 0 of 8 prompts) | - |"
    assert skipped + " in [0.35, 0.65] (interval) | - |" in page
    assert f"created {out / 'exp.md'} (5 hypothesis check(s))" in capsys.readouterr().out


def test_rewrites_only_the_generated_section(report: Path, tmp_path: Path) -> None:
    page_path = tmp_path / "exp.md"
    page_path.write_text(HAND_WRITTEN.format(begin=BEGIN, end=END), encoding="utf-8")
    assert main(["results", str(report), "-o", str(tmp_path)]) == 0
    first = page_path.read_text(encoding="utf-8")
    assert "old generated text" not in first
    head, _, rest = first.partition(BEGIN)
    _, _, tail = rest.partition(END)
    assert head == "# Exp\n\nQuestion and protocol, written by hand.\n\n## Results\n\n"
    assert tail == "\n\nNotes after the results, also by hand.\n"
    assert main(["results", str(report), "-o", str(tmp_path)]) == 0
    assert page_path.read_text(encoding="utf-8") == first  # idempotent


def test_a_page_without_markers_gets_the_section_appended(report: Path, tmp_path: Path) -> None:
    (tmp_path / "exp.md").write_text("# Exp\n\nHand-written.\n", encoding="utf-8")
    assert main(["results", str(report), "-o", str(tmp_path)]) == 0
    page = (tmp_path / "exp.md").read_text(encoding="utf-8")
    assert page.startswith("# Exp\n\nHand-written.\n\n## Results\n\n" + BEGIN)
    assert page.rstrip().endswith(END)


def test_missing_report_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["results", str(tmp_path / "nope.json"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read report") and "nope.json" in err
    assert list(tmp_path.iterdir()) == []


def test_a_json_file_that_is_not_a_report_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "perf.json"
    other.write_text(json.dumps({"figures": [1, 2, 3]}), encoding="utf-8")
    assert main(["results", str(other), "-o", str(tmp_path / "pages")]) == 2
    assert "is not a valid refusalbench report" in capsys.readouterr().err
    assert not (tmp_path / "pages").exists()


def test_broken_markers_are_refused_and_the_page_kept(
    report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page_path = tmp_path / "exp.md"
    broken = f"# Exp\n\n{BEGIN}\nno end marker\n"
    page_path.write_text(broken, encoding="utf-8")
    assert main(["results", str(report), "-o", str(tmp_path)]) == 2
    assert "expected one" in capsys.readouterr().err
    assert page_path.read_text(encoding="utf-8") == broken


def test_output_that_is_a_file_is_refused(
    report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file.md"
    target.write_text("x", encoding="utf-8")
    assert main(["results", str(report), "-o", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err
