"""The refusal judges against human labels (docs/science.md, "Judges").

pyrit ships human-labelled replies (``refusal_scorer/refusal.csv`` and
``sample/mini_refusal.csv``; :mod:`prompts.labelled`): an objective, a reply, and whether a
person judged the reply a refusal. pyrit counts a reply that ignores the objective as a
refusal too. The rows are split once, by a fixed seed, into a development half (the judges'
rules were designed on it) and a held-out half (the claim).

Three judges, each with accuracy, precision and recall (refusal is the positive class) and
Wilson 95 % intervals on the development half, the held-out half and both:

* ``published``: the 12 refusal phrases of Arditi et al. (:func:`probes.judges.arditi_judge`);
* ``keyword``: the suite's phrase judge (:func:`probes.judges.refusal_judge`), used on every
  generated reply of the experiments;
* ``keyword + off-topic``: the keyword judge, or a reply whose relevance PMI under the model
  is below zero (:func:`probes.judges.contextual_refusal_judge`): pyrit's definition. It
  needs two forward passes per reply, so it runs here, where its validity is measured.

The model under test scores the PMI, so the contextual figure is per model. The PMI values
are cached on disk (model fingerprint, dtype, chat format, data sha256), since they cost two
forward passes over about 22,000 reply tokens (about 3 minutes on 2 cores); the quick
profile reports the two phrase judges only and skips the claim, with that reason.

The ``--judge`` of the run (default ``four_class``, :mod:`probes.reply_judges`) is validated
twice more: on the project's own labelled replies of its embedded model
(``prompts/data/labelled_replies.jsonl``: baseline, steered and abliterated replies, four
classes; the judge's one parameter was fitted on the development half, the claims are the
held-out half, overall and per condition), and on pyrit's labels read as refusal = any
class but compliance. Every claim is judged on the Wilson lower bound.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pytest

from fixtures.workbench import Workbench
from probes import judges as J
from probes.reply_judges import ClassValidation, validate_classes
from prompts.labelled import (
    PROJECT_CLASSES,
    PROJECT_CONDITIONS,
    PROJECT_SPLITS,
    LabelledSplit,
    ProjectReply,
    project_half,
    project_replies,
    refusal_labels,
    split_labelled,
)

PARTS = ("dev", "heldout", "all")


def _split() -> LabelledSplit:
    return split_labelled(refusal_labels())


def _pmi(bench: Workbench, rows: list[Any]) -> np.ndarray:
    """Relevance PMI of every row under the bench's model, memoised under ``<cache>/judges/``."""
    lm = bench.lm

    def compute() -> dict[str, Any]:
        bench.progress(f"[judges] relevance PMI of {len(rows)} labelled replies under "
                       f"{lm.name} (two forward passes each)", force=True)
        pmi = J.relevance_pmi(lm.model, lm.tokenizer, lm.format([r.objective for r in rows]),
                              [r.response for r in rows],
                              lm.format([J.NEUTRAL_INSTRUCTION])[0], batch_size=8)
        return {"pmi": [None if np.isnan(v) else float(v) for v in pmi]}

    key = {"neutral": J.NEUTRAL_INSTRUCTION,
           "rows": hashlib.sha256(json.dumps([[r.objective, r.response] for r in rows])
                                  .encode()).hexdigest()}
    # labelled replies only: the run's contrast plays no part
    values = bench.cached_json("judges", "pmi", key, compute, by_contrast=False)["pmi"]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@pytest.mark.claim("JUDGE-REFUSAL-ACCURACY")
def test_refusal_judges_against_human_labels(bench: Workbench, measure: Any) -> None:
    split = _split()
    lm = bench.lm
    bench.record_model(measure)
    rows = list(split.all)
    n_dev = len(split.dev)
    keyword = J.refusal_judge([r.response for r in rows])
    verdicts = {"published": J.arditi_judge([r.response for r in rows]), "keyword": keyword}
    contextual = pmi = None
    if bench.cfg.profile != "quick":
        t0 = time.perf_counter()
        pmi = _pmi(bench, rows)
        measure.metric("contextual_judge_seconds", time.perf_counter() - t0, units="s")
        contextual = keyword | J.off_topic(pmi)
        verdicts["keyword + off-topic"] = contextual
    table = []
    held: dict[str, J.JudgeValidation] = {}
    for name, pred in verdicts.items():
        for part in PARTS:
            sl = {"dev": slice(0, n_dev), "heldout": slice(n_dev, None),
                  "all": slice(None)}[part]
            v = J.validate_predictions(np.asarray(pred)[sl], rows[sl])
            table.append([name, part, v.n, v.tp, v.fp, v.tn, v.fn,
                          v.accuracy.value, v.accuracy.lo, v.accuracy.hi,
                          v.precision.value, v.precision.lo, v.precision.hi,
                          v.recall.value, v.recall.lo, v.recall.hi])
            if part == "heldout":
                held[name] = v
    measure.table("judge_validation", ["judge", "part", "n", "TP", "FP", "TN", "FN",
                                       "accuracy", "acc lo", "acc hi", "precision", "prec lo",
                                       "prec hi", "recall", "rec lo", "rec hi"], table)
    for name, v in held.items():
        key = name.replace(" + ", "_").replace("-", "_")
        for stat in ("accuracy", "precision", "recall"):
            e = getattr(v, stat)
            measure.metric(f"{key} heldout {stat}", e.value, ci=(e.lo, e.hi), n=v.n)
    if contextual is None or pmi is None:
        measure.skip("JUDGE-REFUSAL-ACCURACY",
                     "quick profile: the model-based judge (two forward passes over 22,000 reply "
                     "tokens, about 3 minutes) runs in the full profile; phrase judges reported")
        return
    best = held["keyword + off-topic"]
    measure.metric("heldout_accuracy", best.accuracy.value,
                   ci=(best.accuracy.lo, best.accuracy.hi), n=best.n)
    measure.plot("judge_heldout_accuracy", "bar", categories=list(held),
                 series={"held-out accuracy": [v.accuracy.value for v in held.values()]},
                 errors={"held-out accuracy": ([v.accuracy.lo for v in held.values()],
                                               [v.accuracy.hi for v in held.values()])},
                 ylabel="accuracy (Wilson 95 %)",
                 title=f"Refusal judges vs pyrit human labels, held-out half (n={best.n})")
    errors = [{"part": "dev" if e.index < n_dev else "heldout", "human": str(e.label),
               "judge": str(e.predicted), "pmi": f"{pmi[e.index]:+.3f}",
               "objective": e.objective[:120], "reply": e.response[:200]}
              for e in J.validate_predictions(contextual, rows).errors]
    measure.texts("contextual_judge_errors", errors)
    measure.check("JUDGE-REFUSAL-ACCURACY", best.accuracy.value,
                  ci=(best.accuracy.lo, best.accuracy.hi), n=best.n,
                  detail=f"keyword + off-topic (PMI < {J.OFF_TOPIC_PMI:g}) under {lm.name}; "
                         f"{best.summary()}; keyword alone {held['keyword'].summary()}")


# --------------------------------------------------------------------------- the --judge

CONDITION_CLAIMS = {"baseline": "JUDGE-BASELINE-ACCURACY-LB",
                    "steered": "JUDGE-STEERED-ACCURACY-LB",
                    "abliterated": "JUDGE-ABLITERATED-ACCURACY-LB"}


def _classes(bench: Workbench, rows: list[ProjectReply]) -> list[str]:
    return list(bench.cfg.judge([r.reply for r in rows], [r.prompt for r in rows]).classes)


def _accuracy_row(part: str, condition: str, v: ClassValidation) -> list[Any]:
    a = v.accuracy
    return [part, condition, v.n, v.correct, a.value, a.lo, a.hi]


@pytest.mark.claim("JUDGE-HELDOUT-ACCURACY-LB", *CONDITION_CLAIMS.values())
def test_reply_judge_against_project_labels(bench: Workbench, measure: Any) -> None:
    """The ``--judge`` against the project's labelled replies of its embedded model: the
    development half (where the judge's parameter was fitted) is reported, the held-out half
    is the claim, overall and per condition (four classes, exact match, Wilson 95 %)."""
    bench.record_model(measure)
    rows = project_replies()
    judge = bench.cfg.judge.name
    table: list[list[Any]] = []
    held: dict[str, ClassValidation] = {}
    confusion: dict[tuple[str, str], int] = {}
    errors: list[dict[str, str]] = []
    for part in PROJECT_SPLITS:
        half = project_half(rows, part)
        predicted = _classes(bench, half)
        for condition in ("all", *PROJECT_CONDITIONS):
            pick = [i for i, r in enumerate(half) if condition in ("all", r.condition)]
            v = validate_classes([predicted[i] for i in pick], [half[i].label for i in pick])
            table.append(_accuracy_row(part, condition, v))
            if part == "heldout":
                held[condition] = v
        if part == "heldout":
            confusion = held["all"].confusion
            errors = [{"condition": r.condition, "alpha": f"{r.alpha:g}", "label": r.label,
                       "judge": p, "prompt": r.prompt[:100], "reply": r.reply[:200]}
                      for r, p in zip(half, predicted, strict=True) if p != r.label]
    measure.table("reply_judge_accuracy", ["half", "condition", "n", "correct", "accuracy",
                                           "lo", "hi"], table)
    measure.table("heldout_confusion", ["label", *PROJECT_CLASSES],
                  [[y, *(confusion.get((y, p), 0) for p in PROJECT_CLASSES)]
                   for y in PROJECT_CLASSES])
    measure.texts("heldout_errors", errors)
    overall = held["all"]
    a = overall.accuracy
    measure.metric("heldout_class_accuracy", a.value, ci=(a.lo, a.hi), n=overall.n)
    measure.check("JUDGE-HELDOUT-ACCURACY-LB", a.value, ci=(a.lo, a.hi), n=overall.n,
                  hard=False, detail=f"judge {judge}; {overall.summary()}; labels of "
                                     f"{len(rows)} replies, held-out half by prompt")
    for condition, hyp in CONDITION_CLAIMS.items():
        v = held[condition]
        e = v.accuracy
        measure.metric(f"heldout_class_accuracy_{condition}", e.value, ci=(e.lo, e.hi), n=v.n)
        measure.check(hyp, e.value, ci=(e.lo, e.hi), n=v.n, hard=False,
                      detail=f"judge {judge}; {condition}; {v.summary()}")
    measure.assert_all()


@pytest.mark.claim("JUDGE-PYRIT-ACCURACY-LB")
def test_reply_judge_against_pyrit_labels(bench: Workbench, measure: Any) -> None:
    """The ``--judge`` against pyrit's human labels, refusal = any class but compliance
    (pyrit counts a reply that ignores the objective as a refusal)."""
    bench.record_model(measure)
    split = _split()
    judge = bench.cfg.judge
    table = []
    held = None
    for part in PARTS:
        rows = list(getattr(split, "all" if part == "all" else part))
        verdicts = judge([r.response for r in rows], [r.objective for r in rows])
        v = J.validate_predictions(~verdicts.compliance, rows)
        table.append([part, v.n, v.tp, v.fp, v.tn, v.fn, v.accuracy.value, v.accuracy.lo,
                      v.accuracy.hi])
        if part == "heldout":
            held = v
    assert held is not None
    measure.table("pyrit_validation", ["part", "n", "TP", "FP", "TN", "FN", "accuracy",
                                       "acc lo", "acc hi"], table)
    a = held.accuracy
    measure.metric("pyrit_heldout_accuracy", a.value, ci=(a.lo, a.hi), n=held.n)
    measure.check("JUDGE-PYRIT-ACCURACY-LB", a.value, ci=(a.lo, a.hi), n=held.n,
                  detail=f"judge {judge.name}; {held.summary()}")
