"""Human-labelled refusal data (shipped in ``pyrit``) for validating refusal judges.

Files (located with ``importlib.util.find_spec``; ``pyrit`` itself is never imported):

* ``refusal``       - ``pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv`` (v1.2, 105 rows)
* ``mini_refusal``  - ``pyrit/datasets/scorer_evals/sample/mini_refusal.csv`` (v1.0, 24 rows,
  most of them copies of rows of ``refusal``)
* ``refusal_extra`` - ``pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv``
  (opt-in; not one of the two files docs/science.md names, useful as a second untouched test set)

Each file starts with ``# ...`` comment lines (the first is ``# dataset_version=...``), then
a CSV with the columns ``objective, assistant_response, human_score, data_type``.

Label semantics (checked against the data): ``human_score == 1`` means the human judged
the response a **refusal** ("Sorry, but I can't assist with that request.",
"I'm sorry, I cannot assist with that request." are 1), ``human_score == 0`` means the
response addresses the objective (stories, poems, recipes, and also harmful answers are
0). pyrit's refusal scorer counts a reply that ignores the objective as a refusal too, so a
few rows labelled 1 contain no refusal phrase at all; a keyword judge cannot get those.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probes.errors import PromptSetError

PYRIT_INSTALL = "pip install --no-deps pyrit==1.1.0"
SOURCES: dict[str, str] = {
    "refusal": "datasets/scorer_evals/refusal_scorer/refusal.csv",
    "mini_refusal": "datasets/scorer_evals/sample/mini_refusal.csv",
    "refusal_extra": "datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
}
DEFAULT_SOURCES: tuple[str, ...] = ("refusal", "mini_refusal")
DEV_SPLIT_SEED = 20240607
"""The fixed seed of the development / held-out split of :func:`split_labelled`.

Judge extensions were designed by reading only the development half's errors under this
seed; changing it invalidates the held-out claim.
"""

_COLUMNS = ("objective", "assistant_response", "human_score")


@dataclass(frozen=True)
class LabelledResponse:
    """One human-labelled (objective, response) pair; ``is_refusal`` is the human label."""

    objective: str
    response: str
    is_refusal: bool
    source: str = ""
    dataset_version: str = ""


@dataclass(frozen=True)
class LabelledSplit:
    """A development half (for designing a judge) and a held-out half (for the claim)."""

    dev: tuple[LabelledResponse, ...]
    heldout: tuple[LabelledResponse, ...]
    seed: int

    @property
    def all(self) -> tuple[LabelledResponse, ...]:
        return self.dev + self.heldout


def _pyrit_dir() -> Path:
    spec = importlib.util.find_spec("pyrit")
    if spec is None or spec.origin is None:
        raise PromptSetError(
            "the human-labelled refusal data needs the package 'pyrit', which is not installed",
            f"install it without its dependencies: {PYRIT_INSTALL}",
        )
    return Path(spec.origin).parent


def source_path(source: str) -> Path:
    """The file of a named source (see :data:`SOURCES`)."""
    if source not in SOURCES:
        raise PromptSetError(
            f"unknown labelled refusal source {source!r}",
            f"choose from {', '.join(SOURCES)}",
        )
    path = _pyrit_dir() / SOURCES[source]
    if not path.is_file():
        raise PromptSetError(f"{path} is missing from pyrit",
                             f"reinstall: {PYRIT_INSTALL} --force-reinstall")
    return path


def _parse_label(value: str, where: str) -> bool:
    v = value.strip()
    if v in ("1", "1.0", "True", "true"):
        return True
    if v in ("0", "0.0", "False", "false"):
        return False
    raise PromptSetError(f"{where}: human_score {value!r} is neither 0 nor 1",
                         "the file is not the expected pyrit refusal data; reinstall pyrit")


def read_source(source: str) -> list[LabelledResponse]:
    """All rows of one source, in file order (duplicates kept)."""
    path = source_path(source)
    text = path.read_text(encoding="utf-8")
    version = ""
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        if not body and line.startswith("#"):
            if not version and "dataset_version=" in line:
                version = line.split("dataset_version=", 1)[1].strip()
            continue
        body.append(line)
    try:
        reader = csv.DictReader(io.StringIO("".join(body)))
        raw = list(reader)
    except csv.Error as exc:
        raise PromptSetError(f"{path} is not a readable CSV ({exc})",
                             f"reinstall: {PYRIT_INSTALL} --force-reinstall") from exc
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise PromptSetError(f"{path} lacks the column(s) {', '.join(missing)}",
                             f"reinstall: {PYRIT_INSTALL} --force-reinstall")
    rows = []
    for i, r in enumerate(raw, 1):
        rows.append(LabelledResponse(
            objective=(r["objective"] or "").strip(),
            response=(r["assistant_response"] or "").strip(),
            is_refusal=_parse_label(r["human_score"] or "", f"{path.name} row {i}"),
            source=source,
            dataset_version=version,
        ))
    return rows


def refusal_labels(
    sources: Sequence[str] = DEFAULT_SOURCES, dedupe: bool = True
) -> list[LabelledResponse]:
    """Rows of the named sources; with ``dedupe`` each (objective, response) pair once.

    The first occurrence wins; a duplicate whose human label disagrees raises, since the
    data would then not define one truth for that pair.
    """
    out: list[LabelledResponse] = []
    seen: dict[tuple[str, str], bool] = {}
    for source in sources:
        for row in read_source(source):
            key = (row.objective, row.response)
            if dedupe and key in seen:
                if seen[key] != row.is_refusal:
                    raise PromptSetError(
                        f"{source}: the pair ({row.objective[:40]!r}, {row.response[:40]!r}) "
                        "appears with both labels",
                        "load the sources separately with dedupe=False",
                    )
                continue
            seen[key] = row.is_refusal
            out.append(row)
    if not out:
        raise PromptSetError("the labelled refusal data holds no rows",
                             f"reinstall: {PYRIT_INSTALL} --force-reinstall")
    return out


def split_labelled(
    rows: Sequence[LabelledResponse], seed: int = DEV_SPLIT_SEED, dev_fraction: float = 0.5
) -> LabelledSplit:
    """A deterministic split stratified by label (each label split ``dev_fraction`` : rest)."""
    if not 0.0 < dev_fraction < 1.0:
        raise PromptSetError(f"dev_fraction {dev_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    dev: list[int] = []
    held: list[int] = []
    for label in (True, False):
        idx = [i for i, r in enumerate(rows) if r.is_refusal is label]
        perm = rng.permutation(len(idx)).tolist()
        n_dev = round(len(idx) * dev_fraction)
        dev += [idx[j] for j in perm[:n_dev]]
        held += [idx[j] for j in perm[n_dev:]]
    return LabelledSplit(tuple(rows[i] for i in sorted(dev)),
                         tuple(rows[i] for i in sorted(held)), seed)


def labelled_sha256(rows: Sequence[LabelledResponse]) -> str:
    """Content hash of rows (objective, response, label) for report provenance."""
    payload = json.dumps([[r.objective, r.response, r.is_refusal] for r in rows],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- the project's own

PROJECT_FILE = Path(__file__).parent / "data" / "labelled_replies.jsonl"
PROJECT_CLASSES: tuple[str, ...] = ("refusal", "compliance", "off_topic", "degenerate")
PROJECT_CONDITIONS: tuple[str, ...] = ("baseline", "steered", "abliterated")
PROJECT_PROMPT_SETS: tuple[str, ...] = ("harmful", "harmless", "overrefusal")
PROJECT_SPLITS: tuple[str, ...] = ("dev", "heldout")
_PROJECT_FIELDS = ("prompt", "reply", "condition", "alpha", "prompt_set", "split", "label")


@dataclass(frozen=True)
class ProjectReply:
    """A reply of the suite's embedded model, labelled with one of :data:`PROJECT_CLASSES`
    (``prompts/data/labelled_replies.md``)."""

    prompt: str
    reply: str
    condition: str
    alpha: float
    prompt_set: str
    split: str
    label: str
    layers: str = ""


def _project_row(path: Path, n: int, raw: object) -> ProjectReply:
    where = f"{path.name} line {n}"
    hint = "regenerate with python -m fixtures.build_labelled_replies and label every row"
    if not isinstance(raw, dict) or any(k not in raw for k in _PROJECT_FIELDS):
        raise PromptSetError(f"{where}: needs the fields {', '.join(_PROJECT_FIELDS)}", hint)
    checks = (("condition", PROJECT_CONDITIONS), ("prompt_set", PROJECT_PROMPT_SETS),
              ("split", PROJECT_SPLITS), ("label", PROJECT_CLASSES))
    for key, allowed in checks:
        if raw[key] not in allowed:
            raise PromptSetError(f"{where}: {key} {raw[key]!r} is not one of "
                                 f"{', '.join(allowed)}", hint)
    if not isinstance(raw["prompt"], str) or not isinstance(raw["reply"], str):
        raise PromptSetError(f"{where}: prompt and reply must be strings", hint)
    return ProjectReply(raw["prompt"], raw["reply"], raw["condition"], float(raw["alpha"]),
                        raw["prompt_set"], raw["split"], raw["label"],
                        str(raw.get("layers", "")))


def project_replies(path: Path | None = None) -> list[ProjectReply]:
    """Every labelled reply of the project's file; a missing field, an unknown class,
    condition, prompt set or split, or a prompt in both halves is an error."""
    p = PROJECT_FILE if path is None else Path(path)
    if not p.is_file():
        raise PromptSetError(f"{p} is missing",
                             "restore it from the repository (python -m "
                             "fixtures.build_labelled_replies regenerates the replies)")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptSetError(f"{p.name} line {n} is not JSON ({exc})",
                                     "restore the file from the repository") from None
            rows.append(_project_row(p, n, raw))
    halves: dict[str, set[str]] = {}
    for r in rows:
        halves.setdefault(r.prompt, set()).add(r.split)
    both = [q for q, s in halves.items() if len(s) > 1]
    if both:
        raise PromptSetError(f"{p.name}: {len(both)} prompt(s) in both halves, e.g. "
                             f"{both[0][:60]!r}", "the split is by prompt; regenerate the file")
    return rows


def project_half(rows: Sequence[ProjectReply], split: str) -> list[ProjectReply]:
    """The rows of one half (``dev`` or ``heldout``)."""
    if split not in PROJECT_SPLITS:
        raise PromptSetError(f"unknown half {split!r}", f"choose {' or '.join(PROJECT_SPLITS)}")
    return [r for r in rows if r.split == split]
