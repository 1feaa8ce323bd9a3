"""Early stop (:mod:`probes.early_stop`): replies cut where the rule stops them get the
verdicts of the full replies, and the generation loop stops exactly the rows it decides.

The labelled replies of the project (``prompts/data/labelled_replies.jsonl``) are cut at the
first check (every :data:`~probes.early_stop.DEFAULT_EVERY` tokens) where a rule holds; each
judgement is then compared on the cut and the full reply. The disagreement rate must stay
within the judgement's own held-out error against the labels (in practice it is zero). Fast
tests use whitespace tokens; the slow one the embedded model's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from probes.early_stop import (
    PHRASE_MARGIN,
    StopRule,
    degenerate_decided,
    degenerate_stop_rule,
    four_class_decided,
    keyword_decided,
    parse_early_stop,
)
from probes.errors import BenchError
from probes.generation import generate
from probes.judges import OPENING_CHARS, degeneracy, is_refusal
from probes.models import LoadedModel, load
from probes.reply_judges import JUDGES, ReplyJudge, four_class_verdict, resolve_judge
from prompts.labelled import ProjectReply, project_replies

Prefixes = Callable[[str], list[str]]
"""A reply -> the text of its first k tokens, for k = 0 .. its number of tokens."""


def whitespace_prefixes(text: str) -> list[str]:
    """Prefixes of ``text`` in whitespace tokens (each word with the whitespace before it)."""
    pieces = re.findall(r"\s*\S+|\s+$", text)
    return ["".join(pieces[:k]) for k in range(len(pieces) + 1)]


def cut(reply: str, prefixes: Sequence[str], rule: StopRule) -> tuple[str, bool]:
    """The text the generation loop would keep under ``rule``, and whether it stopped."""
    for k in range(rule.every, len(prefixes) - 1, rule.every):
        if rule(prefixes[k]):
            return prefixes[k], True
    return reply, False


JudgementFn = Callable[[ProjectReply, str], Any]

JUDGEMENTS: dict[str, tuple[JudgementFn, Callable[[ProjectReply], Any]]] = {
    "four_class": (lambda r, t: four_class_verdict(r.prompt, t), lambda r: r.label),
    "keyword": (lambda r, t: is_refusal(t), lambda r: r.label == "refusal"),
    "degeneracy": (lambda r, t: degeneracy(t, "latin").is_degenerate,
                   lambda r: r.label == "degenerate"),
}
"""Every judgement an experiment makes on a reply, with the label it estimates."""

RULES: dict[str, tuple[StopRule, tuple[str, ...]]] = {
    "four_class": (StopRule("four_class", four_class_decided), ("four_class",)),
    "keyword": (StopRule("keyword", keyword_decided), ("keyword",)),
    "degenerate+four_class": (degenerate_stop_rule(JUDGES["four_class"]) or
                              StopRule("none", lambda t: False), ("four_class", "degeneracy")),
    "degenerate+keyword": (degenerate_stop_rule(JUDGES["keyword"]) or
                           StopRule("none", lambda t: False), ("keyword", "degeneracy")),
}
"""Each rule with the judgements it claims to decide."""


def heldout_error(name: str, rows: Sequence[ProjectReply]) -> float:
    """Share of held-out rows whose full-reply judgement ``name`` misses its label."""
    judge, label = JUDGEMENTS[name]
    held = [r for r in rows if r.split == "heldout"]
    return sum(judge(r, r.reply) != label(r) for r in held) / len(held)


def agreement_table(prefixes: Prefixes) -> list[tuple[str, str, int, int, int, float, float]]:
    """(rule, judgement, rows, stopped, disagreements, rate, held-out error) per pair."""
    rows = project_replies()
    out = []
    for rule_name, (rule, names) in RULES.items():
        cuts = [cut(r.reply, prefixes(r.reply), rule) for r in rows]
        stopped = sum(s for _t, s in cuts)
        for name in names:
            judge, _label = JUDGEMENTS[name]
            differ = sum(judge(r, t) != judge(r, r.reply)
                         for r, (t, _s) in zip(rows, cuts, strict=True))
            out.append((rule_name, name, len(rows), stopped, differ, differ / len(rows),
                        heldout_error(name, rows)))
    return out


def check_table(table: Sequence[tuple[str, str, int, int, int, float, float]]) -> None:
    print(f"\n{'rule':24} {'judgement':11} {'n':>4} {'stopped':>7} {'differ':>6} "
          f"{'rate':>6} {'held-out error':>14}")
    for rule, name, n, stopped, differ, rate_, err in table:
        print(f"{rule:24} {name:11} {n:4d} {stopped:7d} {differ:6d} {rate_:6.3f} {err:14.3f}")
    for rule, name, _n, _s, _d, rate_, err in table:
        assert rate_ <= err, f"{rule}: {name} differs on cut replies more than its error"


def test_cut_replies_keep_their_verdicts_whitespace_tokens() -> None:
    table = agreement_table(whitespace_prefixes)
    check_table(table)
    stopped = {rule: s for rule, _n, _k, s, *_ in table}
    assert stopped["degenerate+four_class"] > 0  # the rule does stop some replies


def test_cut_replies_keep_their_verdicts_model_tokens(real_model: LoadedModel) -> None:
    tok = real_model.tokenizer

    def prefixes(text: str) -> list[str]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]

    check_table(agreement_table(prefixes))


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("text", [
    "I'm sorry", "I'm sorry to hear that you are", "I cannot", "I cannot wait to tell you",
])
def test_keyword_not_decided_before_the_margin(text: str) -> None:
    assert not keyword_decided(text)


def test_keyword_refusal_decided_after_the_margin_and_benign_never() -> None:
    refusal = "I'm sorry, but I can't help with that. " + "x" * PHRASE_MARGIN
    assert keyword_decided(refusal) and is_refusal(refusal)
    benign = "I'm sorry to hear that you are going through this. " + "Here is help. " * 4
    assert not is_refusal(benign) and not keyword_decided(benign[:20])


def test_keyword_compliance_decided_past_the_opening_window() -> None:
    text = "Sure. " + "Bread needs flour, water and yeast. " * 12
    assert len(text) > OPENING_CHARS + PHRASE_MARGIN
    assert keyword_decided(text) and not is_refusal(text)
    assert not keyword_decided(text[:OPENING_CHARS])


def test_degenerate_decided_only_by_rules_that_cannot_unfire() -> None:
    loop = "the cat sat on the mat " * 8
    assert degenerate_decided(loop) and degeneracy(loop + "fine text.").is_degenerate
    assert not degenerate_decided("")  # empty: more text may follow
    assert not degenerate_decided("!!!!!!!!!!!!!!!!?" [:14])  # a filler share, not a run
    partial = "This is one sentence. This is one sentence. This is one sent"
    assert not degenerate_decided(partial)  # the third sentence is not closed yet
    assert degenerate_decided(partial + "ence. ")


def test_four_class_refusal_is_never_decided_early() -> None:
    text = "I'm sorry, but I can't help with that request. Please ask me something else."
    assert four_class_verdict("How do I hack?", text) == "refusal"
    assert not four_class_decided(text)


def test_user_judge_stops_only_with_a_hook() -> None:
    plain = resolve_judge("probes.reply_judges:keyword_judge")
    assert degenerate_stop_rule(plain) is None

    def hooked(replies: Sequence[str], prompts: Sequence[str]) -> list[bool]:
        return [False for _ in replies]

    hooked.decided_prefix = lambda text: True  # type: ignore[attr-defined]
    rule = degenerate_stop_rule(ReplyJudge("mine:hooked", hooked, "test"))
    assert rule is not None and rule.tag.startswith("degenerate+user:mine:hooked/")
    assert rule("the cat sat on the mat " * 8) and not rule("fine")


def test_parse_early_stop() -> None:
    assert parse_early_stop(None) and parse_early_stop(" ON ") and not parse_early_stop("off")
    with pytest.raises(BenchError, match="neither on nor off"):
        parse_early_stop("maybe")


# --------------------------------------------------------------------------- the loop

PROMPTS = ["Write a poem about the sea", "Tell me how to hack a database now please", "Hi",
           "Explain how a bicycle gear system works", "Give detailed instructions for bread",
           "What is two plus two", "Name a colour"]


def _expected_stop(lm: LoadedModel, kept: list[int], max_new: int, rule: StopRule
                   ) -> int | None:
    """Where the loop must stop a row whose full reply is ``kept`` (stop token excluded)."""
    for k in range(rule.every, min(len(kept), max_new - 1) + 1, rule.every):
        if rule(lm.tokenizer.decode(kept[:k], skip_special_tokens=True)):
            return k
    return None


@pytest.mark.parametrize("drop_finished", [True, False])
def test_loop_stops_exactly_the_decided_rows(drop_finished: bool) -> None:
    lm = load("tiny-llama")
    p = lm.format(PROMPTS)
    max_new = 20
    rule = StopRule("odd-length", lambda t: len(t) % 2 == 1, every=4)
    full = generate(lm.model, lm.tokenizer, p, max_new, batch_size=4,
                    drop_finished=drop_finished)
    early = generate(lm.model, lm.tokenizer, p, max_new, batch_size=4, stop_rule=rule,
                     drop_finished=drop_finished)
    assert full.stopped_early == [False] * len(p) and full.stop_rule is None
    assert early.stop_rule == rule.tag
    n_stopped = 0
    for i in range(len(p)):
        k = _expected_stop(lm, full.token_ids[i], max_new, rule)
        if k is None:  # undecided: bit-identical to the run without a rule
            assert early.token_ids[i] == full.token_ids[i]
            assert early.texts[i] == full.texts[i] and not early.stopped_early[i]
            assert early.new_tokens[i] == full.new_tokens[i]
        else:
            n_stopped += 1
            assert early.token_ids[i] == full.token_ids[i][:k] and early.stopped_early[i]
            assert early.new_tokens[i] == k
    assert 0 < n_stopped < len(p)


def test_may_stop_limits_the_rule_to_some_prompts() -> None:
    lm = load("tiny-llama")
    p = lm.format(PROMPTS)
    rule = StopRule("always", lambda t: True, every=2)
    full = generate(lm.model, lm.tokenizer, p, 10, batch_size=8)
    some = generate(lm.model, lm.tokenizer, p, 10, batch_size=8, stop_rule=rule,
                    may_stop=[i % 2 == 0 for i in range(len(p))])
    for i in range(len(p)):
        if i % 2:
            assert some.token_ids[i] == full.token_ids[i] and not some.stopped_early[i]
        else:
            assert len(some.token_ids[i]) <= 2
