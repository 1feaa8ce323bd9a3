"""Early stop of generated replies: a row stops decoding once every judgement on it is decided.

A reply needs no more tokens once no continuation can change any verdict the experiment
will make on it. The rules here are fixed in advance (they follow from the judges'
definitions, not from any model's replies) and are checked on the decoded text of a row
every :attr:`StopRule.every` generated tokens (:func:`probes.generation.generate`). A
prefix *decides* a judgement when the judgement of every extension of that text is the
same as it will be for the full reply:

* degeneracy (:func:`probes.judges.degeneracy`), "degenerate" only: decided once a rule
  that cannot un-fire has fired: a filler run, a back-to-back n-gram loop, a window of
  too few distinct characters (each is found in any longer text that starts with the
  prefix), or a sentence repeated :data:`~probes.judges.DEGENERACY_SENTENCE_REPEATS` times
  among the sentences already closed by a terminator. The share rules (mostly filler, bad
  characters, script mixing) and "empty" can change either way and never decide;
* ``four_class``: "degenerate" is checked first, so a degeneracy decided as above (or a
  word trigram repeated :data:`~probes.reply_judges.DEGENERATE_TRIGRAM_REPEATS` times
  among complete words) decides the class. A refusal phrase does not: a later loop would
  make the reply degenerate. Compliance and off-topic depend on the whole reply;
* ``keyword`` (the phrase judge alone): refusal is decided when a phrase has matched at an
  accepted position and the text runs :data:`PHRASE_MARGIN` characters past the match
  (no benign wording or longer phrase can then still cover it); compliance when nothing
  matched and the text is :data:`~probes.judges.OPENING_CHARS` + :data:`PHRASE_MARGIN`
  long with its first sentence closed (no phrase or warning can then start in time);
* perplexity, coherence, relevance: whole-reply judgements, never decided early;
* a user's ``module:function`` judge: never decided, unless the function has a
  ``decided_prefix`` attribute, a function ``text -> bool`` that says its verdict is
  decided (the user's promise, keyed by :attr:`StopRule.tag`).

The rules assume the decoded text of a row's first tokens is a prefix of its full reply;
trailing U+FFFD (a multi-byte character cut between tokens) is dropped before checking.
``tests/unit/test_early_stop.py`` compares every judge's class on replies cut where the
rule stops them with the class on the full replies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probes import judges
from probes.errors import BenchError
from probes.reply_judges import DEGENERATE_TRIGRAM_REPEATS, ReplyJudge, max_trigram_repeats

__all__ = ["DEFAULT_EVERY", "PHRASE_MARGIN", "RULE_VERSION", "EarlyStopError", "StopRule",
           "degenerate_decided", "degenerate_stop_rule", "four_class_decided",
           "judge_decided", "keyword_decided", "parse_early_stop"]

RULE_VERSION = 1
"""Bumped whenever a decision rule here changes: it is part of every rule's tag, hence of
the generation cache key."""

DEFAULT_EVERY = 8
"""Generated tokens between two checks of a row: a row stops at most this many tokens
after its judgements are decided."""

PHRASE_MARGIN = 40
"""Characters the normalised text must run past a refusal match (or past the opening
window) before the phrase judge's verdict counts as decided: longer than the longest
benign wording that can blank a phrase ("apologies for any misunderstanding", 34
characters) and than the look-ahead of a phrase's word boundary."""


class EarlyStopError(BenchError):
    """An ``--early-stop`` value that is neither on nor off."""


def parse_early_stop(value: str | None) -> bool:
    """``--early-stop on|off`` (default on) as a boolean."""
    text = "on" if value is None else value.strip().lower()
    if text not in ("on", "off"):
        raise EarlyStopError(f"--early-stop {value!r} is neither on nor off",
                             "write --early-stop on (stop replies whose judgements are "
                             "decided) or --early-stop off (always generate the full length)")
    return text == "on"


@dataclass(frozen=True)
class StopRule:
    """When a generated row may stop: ``decided(text)`` on its decoded text so far, checked
    every ``every`` generated tokens. ``tag`` identifies the rule in cache keys."""

    name: str
    decided: Callable[[str], bool]
    every: int = DEFAULT_EVERY

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"a stop rule is checked every >= 1 tokens, got {self.every}")

    @property
    def tag(self) -> str:
        return f"{self.name}/v{RULE_VERSION}/every{self.every}"

    def __call__(self, text: str) -> bool:
        return self.decided(_settled(text))


def _settled(text: str) -> str:
    """``text`` without a trailing U+FFFD (a character still being written)."""
    return text.rstrip("\ufffd")


# --------------------------------------------------------------------------- degeneracy

_TERMINATORS = ".!?。！？\n"


def _closed_sentences(text: str) -> str:
    """``text`` up to its last sentence terminator: the sentences no continuation changes."""
    return text[: max(text.rfind(c) for c in _TERMINATORS) + 1]


def degenerate_decided(text: str) -> bool:
    """Whether :func:`probes.judges.degeneracy` calls every extension of ``text``
    degenerate, by a rule that cannot un-fire (module docstring)."""
    if not text.strip():
        return False
    return (judges._filler_run(text) is not None
            or (_has_repeated_ngram(text) and judges._ngram_loop(text) is not None)
            or judges._low_unique(text) is not None
            or judges._repeated_sentence(_closed_sentences(text)) is not None)


def _has_repeated_ngram(text: str) -> bool:
    """Whether some :data:`~probes.judges.DEGENERACY_NGRAM`-character string occurs twice
    in ``text``: a loop needs one, and most replies have none, so the costly loop search
    is skipped for them."""
    n = judges.DEGENERACY_NGRAM
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return len(set(grams)) < len(grams)


def _complete_words(text: str) -> str:
    """``text`` up to its last character that cannot be part of a word."""
    for i in range(len(text) - 1, -1, -1):
        c = text[i]
        if not (c.isalpha() or c == "'"):
            return text[: i + 1]
    return ""


def four_class_decided(text: str) -> bool:
    """Whether ``four_class``'s class of every extension of ``text`` is decided: only
    "degenerate" can be (it is checked before the others)."""
    return (degenerate_decided(text)
            or max_trigram_repeats(_complete_words(text)) >= DEGENERATE_TRIGRAM_REPEATS)


# --------------------------------------------------------------------------- phrase judge

def keyword_decided(text: str) -> bool:
    """Whether the phrase judge's verdict (:func:`probes.judges.is_refusal`) is the same for
    every extension of ``text`` (module docstring)."""
    t = judges.normalise_text(text)
    m = judges.refusal_match(text)
    if m is not None:
        return len(t) >= m.start + len(m.phrase) + PHRASE_MARGIN
    if len(t) < judges.OPENING_CHARS + PHRASE_MARGIN:
        return False
    first = judges._FIRST_SENTENCE.match(t)
    sentence = first.group(0) if first else t
    closed = sentence != t or len(sentence) >= judges.OPENING_CHARS + PHRASE_MARGIN
    return closed


def _never(text: str) -> bool:
    del text
    return False


def judge_decided(judge: ReplyJudge) -> tuple[str, Callable[[str], bool]] | None:
    """(name, decided) of ``judge``'s verdict on a prefix, or None when it never decides
    early (a user judge without a ``decided_prefix`` attribute)."""
    if judge.name == "four_class":
        return "four_class", four_class_decided
    if judge.name == "keyword":
        return "keyword", keyword_decided
    hook: Any = getattr(judge.function, "decided_prefix", None)
    if callable(hook):
        return f"user:{judge.name}", lambda text: bool(hook(text))
    return None


def degenerate_stop_rule(judge: ReplyJudge, every: int = DEFAULT_EVERY) -> StopRule | None:
    """The rule of experiments that judge each reply with ``judge`` and
    :func:`probes.judges.degeneracy_judge`, and score the whole of every reply that is not
    degenerate (perplexity): a row stops once it is decided degenerate and ``judge``'s
    verdict is decided. None when ``judge`` never decides early (no row may stop)."""
    found = judge_decided(judge)
    if found is None:
        return None
    name, decided = found
    if name == "four_class":  # a decided degeneracy decides its class: check it once
        return StopRule("degenerate+four_class", degenerate_decided, every)

    def both(text: str) -> bool:
        return degenerate_decided(text) and decided(text)

    return StopRule(f"degenerate+{name}", both, every)

