"""The project's labelled replies: schema, size, coverage and the by-prompt split; the
four-class judge's parameter is the fit on the development half."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.build_labelled_replies import (
    STEER_ALPHAS,
    deal_alphas,
    main,
    read_rows,
    split_by_prompt,
    write_rows,
)
from probes import reply_judges as R
from prompts.labelled import (
    PROJECT_CLASSES,
    PROJECT_CONDITIONS,
    PROJECT_PROMPT_SETS,
    ProjectReply,
    project_half,
    project_replies,
)


@pytest.fixture(scope="module")
def rows() -> list[ProjectReply]:
    return project_replies()


def test_size_and_coverage(rows: list[ProjectReply]) -> None:
    assert len(rows) >= 240
    for half in ("dev", "heldout"):
        part = project_half(rows, half)
        assert {r.condition for r in part} == set(PROJECT_CONDITIONS)
        assert {r.prompt_set for r in part} == set(PROJECT_PROMPT_SETS)
    assert {r.label for r in rows} == set(PROJECT_CLASSES)
    steered = [r.alpha for r in rows if r.condition == "steered"]
    assert min(steered) < 0 < max(steered) and 0.0 not in steered
    assert all(r.alpha == 0.0 for r in rows if r.condition != "steered")


def test_no_prompt_in_both_halves(rows: list[ProjectReply]) -> None:
    dev = {r.prompt for r in project_half(rows, "dev")}
    held = {r.prompt for r in project_half(rows, "heldout")}
    assert dev and held and not dev & held
    assert abs(len(dev) - len(held)) <= len(PROJECT_PROMPT_SETS)


def test_every_prompt_has_each_condition(rows: list[ProjectReply]) -> None:
    per_prompt = Counter((r.prompt, r.condition) for r in rows)
    prompts = {r.prompt for r in rows}
    for p in prompts:
        assert per_prompt[(p, "baseline")] == 1 and per_prompt[(p, "abliterated")] == 1
        assert per_prompt[(p, "steered")] == 2


def test_the_parameters_are_the_fit_on_the_development_half(rows: list[ProjectReply]) -> None:
    assert R.fitted_parameters(rows) == (R.DEGENERATE_TRIGRAM_REPEATS, R.OFF_TOPIC_OVERLAP)


def test_split_and_alpha_dealing_are_seeded_and_balanced() -> None:
    assert split_by_prompt(24, 1) == split_by_prompt(24, 1)
    assert Counter(split_by_prompt(24, 1)) == {"dev": 12, "heldout": 12}
    dealt = deal_alphas(24, 3)
    assert dealt == deal_alphas(24, 3)
    counts = Counter(a for pair in dealt for a in pair)
    assert set(counts) == set(STEER_ALPHAS) and set(counts.values()) == {3}
    assert all(n < 0 < p for n, p in dealt)


def test_builder_on_a_tiny_model(tmp_path: Path) -> None:
    """The builder's design on a tiny random model: every condition, both alpha signs, a
    by-prompt split, and labels kept for unchanged rows on a rerun."""
    args = ["--model", "tiny-llama", "--n-per-set", "4", "--cache-dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "r.jsonl")]
    assert main(args) == 0
    rows = read_rows(tmp_path / "r.jsonl")
    assert len(rows) == 3 * 4 * 4
    assert Counter(r.condition for r in rows) == {"baseline": 12, "steered": 24,
                                                  "abliterated": 12}
    halves: dict[str, set[str]] = {}
    for r in rows:
        halves.setdefault(r.prompt, set()).add(r.split)
    assert all(len(s) == 1 for s in halves.values())
    labelled = [replace(r, label="degenerate") for r in rows]
    write_rows(tmp_path / "r.jsonl", labelled)
    assert main(args) == 0
    assert all(r.label == "degenerate" for r in read_rows(tmp_path / "r.jsonl"))
