"""Prompt sets: packaged loaders, content hashes, deterministic splits, bad files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import prompts
from probes.errors import PromptSetError
from prompts import PromptSet


def test_advbench_has_categories() -> None:
    adv = prompts.advbench()
    assert len(adv) == 520
    counts = Counter(adv.label("category"))
    assert sum(1 for c in counts.values() if c >= 40) >= 6


def test_harmbench_loads() -> None:
    assert len(prompts.harmbench()) >= 190


def test_harmless_set_meets_its_specification() -> None:
    h = prompts.harmless()
    assert len(h) >= 200
    topics = Counter(h.label("topic"))
    langs = Counter(h.label("language"))
    assert len(topics) >= 5
    assert langs["en"] >= 30
    assert sum(1 for lang, n in langs.items() if lang != "en" and n >= 30) >= 3
    assert len(set(h.texts)) == len(h)


def test_sha256_is_content_based() -> None:
    a = PromptSet("a", ("x", "y"), {"t": ("1", "2")})
    assert a.sha256 == PromptSet("b", ("x", "y"), {"t": ("1", "2")}).sha256
    assert a.sha256 != PromptSet("a", ("x", "z"), {"t": ("1", "2")}).sha256
    assert a.sha256 != PromptSet("a", ("x", "y"), {"t": ("1", "3")}).sha256


def test_splits_are_deterministic_disjoint_and_stratified() -> None:
    adv = prompts.advbench()
    s1 = adv.split(seed=3, stratify="category")
    s2 = adv.split(seed=3, stratify="category")
    s3 = adv.split(seed=4, stratify="category")
    assert s1.train.texts == s2.train.texts and s1.test.texts == s2.test.texts
    assert s1.train.texts != s3.train.texts
    parts = [set(s1.train.texts), set(s1.val.texts), set(s1.test.texts)]
    assert sum(len(p) for p in parts) == len(set(adv.texts))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    full = Counter(adv.label("category"))
    train = Counter(s1.train.label("category"))
    for cat, n in full.items():
        assert abs(train[cat] - 0.5 * n) <= 1


def test_sample_is_seeded_and_stratified() -> None:
    h = prompts.harmless().where("language", "en")
    a = h.sample(30, seed=1, stratify="topic")
    assert a.texts == h.sample(30, seed=1, stratify="topic").texts
    assert len(a) == 30 and set(Counter(a.label("topic")).values()) == {5}


def test_empty_prompt_set_is_a_clear_error() -> None:
    with pytest.raises(PromptSetError, match="is empty"):
        PromptSet("nothing", ())
    with pytest.raises(PromptSetError, match="is empty"):
        prompts.harmless().where("language", "tlh")


def test_split_too_small() -> None:
    with pytest.raises(PromptSetError, match="split .* is empty"):
        PromptSet("two", ("a", "b")).split(seed=0)


def test_user_csv_and_jsonl(tmp_path: Path) -> None:
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('prompt,kind\n"Say hi, politely",greet\nCount to ten,math\n')
    ps = prompts.from_file(csv_file, text_column="prompt", label_columns=["kind"])
    assert ps.texts == ("Say hi, politely", "Count to ten") and ps.label("kind")[1] == "math"
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert prompts.load(str(jl)).texts == ("one", "two")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.csv", "prompt\n\"unterminated\n", "no column|not a readable CSV|empty"),
        ("wrong.csv", "question\nhello\n", "no column.*text"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "bad.jsonl:2 is not valid JSON"),
        ("empty.csv", "text\n", "holds no prompts"),
        ("blank.csv", "text\nhello\n\"\"\n", "prompt 1 .* is empty"),
        ("latin1.csv", None, "not UTF-8"),
        ("data.xlsx", "x", "unsupported extension"),
    ],
)
def test_unreadable_files_are_clear_errors(
    tmp_path: Path, name: str, content: str | None, match: str
) -> None:
    path = tmp_path / name
    if content is None:
        path.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    else:
        path.write_text(content)
    with pytest.raises(PromptSetError, match=match):
        prompts.from_file(path)


def test_unknown_prompt_set_name() -> None:
    with pytest.raises(PromptSetError, match="unknown prompt set"):
        prompts.load("advbench-2")


def test_missing_file() -> None:
    with pytest.raises(PromptSetError, match="does not exist"):
        prompts.from_file("/nonexistent/prompts.csv")
