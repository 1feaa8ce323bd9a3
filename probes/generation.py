"""Batched greedy generation, under whatever interventions are active.

Prompts are sorted by length and left-padded in batches. For plain-attention models the
suite decodes with its own greedy loop over the KV cache: the prompt prefix a batch shares
(the chat template's system turn) is computed once, and a row that has produced its stop
token leaves the batch, so a batch where half the replies are short refusals stops paying
for them. Other models (sliding-window or linear attention, a generation config with
logits processors) go through ``transformers``' ``generate``, which keeps finished rows in
the batch. Both give the same replies (``tests/unit/test_generation.py``). Interventions
(hooks) apply to the prompt pass and every generated token. Passes of 1 to 128 rows use
the few-row matmul kernels of :func:`probes.kernels.few_row_linears` (float32 on CPU); the
prompt pass runs the MLPs on the real tokens only (:func:`probes.packing.packed_mlps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from probes.capture import (
    common_prefix_len,
    model_device,
    prefix_kv_cache,
    prefix_sharing_supported,
    split_prefix_batch,
    with_cache,
)
from probes.early_stop import StopRule
from probes.kernels import few_row_linears
from probes.packing import packed_mlps
from probes.timing import timed

__all__ = ["EarlyStop", "Generations", "RowState", "common_prefix_len", "generate", "plain_greedy",
           "prefix_sharing_supported", "stop_token_ids"]


class RowState(Protocol):
    """Per-row intervention state that follows the batch rows (e.g.
    :class:`probes.interventions.RowSteering`): ``groups[i]`` is the variant of prompt ``i``;
    :func:`generate` sets ``index`` to the variant of every row of each forward pass."""

    groups: torch.Tensor
    index: torch.Tensor | None


@dataclass
class Generations:
    """Replies in prompt order, with the cost of producing them."""

    prompts: list[str]
    texts: list[str]
    new_tokens: list[int]
    seconds: float
    batch_size: int
    token_ids: list[list[int]] = field(default_factory=list, repr=False)
    stopped_early: list[bool] = field(default_factory=list)
    stop_rule: str | None = None  # the tag of the rule rows were stopped by, if any

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.total_new_tokens / self.seconds if self.seconds > 0 else float("nan")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def _cache_for(model: Any, input_ids: torch.Tensor, p: int, b: int,
               rows: RowState | None = None) -> Any:
    """The KV cache a batch starts from: its shared prefix (``p`` tokens), or empty.

    With per-row variants (``rows``) the prefix is computed once per variant present in the
    batch (its KV differs by variant when an intervention acts on the prefix) and each row
    gets its variant's copy.
    """
    if p > 0:
        if rows is None or rows.index is None:
            return prefix_kv_cache(model.get_decoder(), input_ids[:1, :p], b)
        batch_index = rows.index
        variants, inverse = torch.unique(batch_index, return_inverse=True)
        rows.index = variants
        try:
            cache = prefix_kv_cache(model.get_decoder(), input_ids[:1, :p].expand(
                len(variants), p), 1)
        finally:
            rows.index = batch_index
        cache.batch_select_indices(inverse)
        return cache
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@dataclass
class EarlyStop:
    """A per-row stop check for :func:`_greedy_decode`: ``decided(ids)`` on a live row's
    new ids, every ``every`` tokens; the rows it stops (batch row numbers) go to
    ``stopped``."""

    decided: Callable[[list[int]], bool]
    every: int
    allowed: frozenset[int]  # the batch rows that may stop
    stopped: set[int] = field(default_factory=set)

    def check(self, row: int, ids: list[int]) -> bool:
        """Whether ``row`` (not ended, ``ids`` so far) stops now; records it if so."""
        if len(ids) % self.every or row not in self.allowed or not self.decided(ids):
            return False
        self.stopped.add(row)
        return True


def _greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token of each row's last position, the first one on ties (as
    ``argmax``; ``max(...).indices`` is the same rule and ~3x faster on bfloat16 CPU logits)."""
    return logits[:, -1, :].max(dim=-1).indices


def _greedy_decode(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, p: int, pad: int,
    stops: Sequence[int], max_new_tokens: int, drop_finished: bool,
    rows: RowState | None = None, follow: Callable[[torch.Tensor], None] | None = None,
    early: EarlyStop | None = None,
) -> list[list[int]]:
    """Greedy decoding with a KV cache; the new ids per row, up to and including its stop token.

    The prompt pass runs ``input_ids[:, p:]`` after the cached prefix; every step then feeds
    each row its last token at position = running count of its attention mask minus one (as
    ``generate`` computes positions) and takes the argmax of the last position's logits
    (``generate``'s greedy rule when :func:`plain_greedy` holds). With ``drop_finished`` a
    row that has produced a stop token leaves the batch (its KV-cache rows are dropped), so
    later steps compute only the rows still writing (``follow``, if given, is told which
    rows stay); otherwise finished rows are fed ``pad`` until every row has ended, as
    ``generate`` does (hooks that follow rows by their index need that). ``rows``
    (per-row interventions) follows the rows that stay. ``early`` ends a row whose
    judgements are decided (:class:`EarlyStop`) exactly as a stop token would, without one.
    """
    b = input_ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _cache_for(model, input_ids, p, b, rows)
    with packed_mlps(model, mask[:, p:]):
        out = model(input_ids=input_ids[:, p:], attention_mask=mask,
                    position_ids=positions[:, p:], **with_cache(model, cache), use_cache=True,
                    logits_to_keep=1)
    nxt = _greedy_pick(out.logits)
    last_pos = positions[:, -1]
    stop_set = set(int(s) for s in stops)
    new: list[list[int]] = [[] for _ in range(b)]
    ended = [False] * b
    alive = list(range(b))  # the original row of each batch row
    for step in range(max_new_tokens):
        for row, token in zip(alive, nxt.tolist(), strict=True):
            if not ended[row]:
                new[row].append(token)
                ended[row] = token in stop_set
                if (early is not None and not ended[row] and step < max_new_tokens - 1
                        and early.check(row, new[row])):
                    ended[row] = True
        if step == max_new_tokens - 1 or all(ended[row] for row in alive):
            break
        if drop_finished:
            keep = [i for i, row in enumerate(alive) if not ended[row]]
            if len(keep) < len(alive):
                idx = torch.tensor(keep, dtype=torch.long, device=mask.device)
                cache.batch_select_indices(idx)
                mask, nxt, last_pos = mask[idx], nxt[idx], last_pos[idx]
                if rows is not None and rows.index is not None:
                    rows.index = rows.index[idx]
                if follow is not None:
                    follow(idx)
                alive = [alive[i] for i in keep]
        else:
            done = torch.tensor([ended[row] for row in alive], device=nxt.device)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    **with_cache(model, cache), use_cache=True)
        nxt = _greedy_pick(out.logits)
    return new


def plain_greedy(model: Any) -> bool:
    """Whether ``generate`` would decode greedily with no logits processor for this model's
    generation config (a repetition penalty, banned words, a minimum length ... change the
    argmax): only then may :func:`_greedy_decode` stand in for it."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return True
    for name in _PROCESSOR_FIELDS:
        value = getattr(cfg, name, None)
        if value not in _NEUTRAL.get(name, (None,)):
            return False
    return True


_PROCESSOR_FIELDS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "min_length", "min_new_tokens",
    "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "renormalize_logits": (None, False),
    "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []),
}


def _generate_batch(
    model: Any, ids: list[list[int]], pad: int, stops: list[int], max_new_tokens: int,
    share_prefix: bool, fast: bool, drop_finished: bool, device: torch.device,
    rows: RowState | None = None, follow: Callable[[torch.Tensor], None] | None = None,
    early: EarlyStop | None = None,
) -> list[list[int]]:
    """Greedy continuation of one batch of token-id rows; returns the new ids per row.

    With ``share_prefix`` the prompt prefix common to all rows (the chat template's system
    turn, typically) is run once and its KV cache repeated across the batch; rows are then
    padded between the prefix and their own suffix, so every row keeps its exact positions.
    ``fast`` decodes with :func:`_greedy_decode`; otherwise ``transformers``' ``generate``,
    where ``early`` is not applied (no row stops before its end).
    """
    b = len(ids)
    p = common_prefix_len(ids) if share_prefix and b > 1 else 0
    p = min(p, min(len(r) for r in ids) - 1)  # keep at least one token per row to feed
    batch = split_prefix_batch(ids, p, pad, device)
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    if fast:
        return _greedy_decode(model, input_ids, mask, p, pad, stops, max_new_tokens,
                              drop_finished, rows, follow, early)
    kwargs: dict[str, Any] = {}
    if p > 0:
        kwargs.update(with_cache(model, _cache_for(model, input_ids, p, b, rows)))
    width = input_ids.shape[1]
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None, **kwargs,
    )
    return [list(map(int, row)) for row in out[:, width:].tolist()]


@timed("decode")
@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    share_prefix: bool | None = None,
    fast: bool | None = None,
    drop_finished: bool = True,
    rows: RowState | None = None,
    follow: Callable[[torch.Tensor], None] | None = None,
    stop_rule: StopRule | None = None,
    may_stop: Sequence[bool] | None = None,
) -> Generations:
    """Greedy replies to already chat-formatted ``prompts``.

    ``share_prefix`` (default: when the architecture allows it) computes the prompt prefix
    shared by a batch once. ``fast`` (default: for plain-attention models whose generation
    config asks for plain greedy decoding) decodes with the suite's own loop instead of
    ``transformers``' ``generate``, which lets rows that have ended leave the batch
    (``drop_finished``; hooks that follow batch rows by index, such as
    :func:`probes.monitoring.monitor`, need ``drop_finished=False``). The replies are the
    same either way (tested against ``generate``). ``rows`` carries per-row interventions
    (:class:`probes.interventions.RowSteering`, opened around this call): prompts of
    different variants then share batches, and the state is told which rows each pass holds.
    ``follow`` is called with the indices of the rows that stay whenever ended rows leave a
    batch (hooks that follow rows by index, such as :meth:`probes.monitoring.TokenMonitor.keep`,
    may then let rows leave). ``stop_rule`` (:mod:`probes.early_stop`) ends a row of the own
    loop once its judgements are decided, checked every ``stop_rule.every`` tokens on the
    row's decoded text; such rows are flagged in ``stopped_early``. ``may_stop`` (one flag
    per prompt; default all) limits it to some prompts. Without a rule (the default)
    nothing changes.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    device = model_device(model)
    all_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    lengths = [len(x) for x in all_ids]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    if share_prefix is None:
        share_prefix = prefix_sharing_supported(model)
    if fast is None:
        fast = prefix_sharing_supported(model) and plain_greedy(model)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    texts: list[str] = [""] * len(prompts)
    n_new: list[int] = [0] * len(prompts)
    ids_out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    t0 = time.perf_counter()
    done = 0
    if may_stop is not None and len(may_stop) != len(prompts):
        raise ValueError(f"may_stop has {len(may_stop)} flags for {len(prompts)} prompts")
    if rows is not None and rows.groups.shape[0] != len(prompts):
        raise ValueError(f"rows has {rows.groups.shape[0]} groups for {len(prompts)} prompts")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if rows is not None:
            rows.index = rows.groups[torch.tensor(idx, dtype=torch.long,
                                                  device=rows.groups.device)]
        early = _early_stop(tokenizer, stop_rule, [may_stop is None or bool(may_stop[i])
                                                   for i in idx])
        try:
            with few_row_linears(model):
                new = _generate_batch(model, [all_ids[i] for i in idx], pad, stops,
                                      max_new_tokens, share_prefix, fast, drop_finished,
                                      device, rows, follow, early)
        finally:
            if rows is not None:
                rows.index = None
        for row, i in enumerate(idx):
            seq = new[row]
            cut = next((k for k, t in enumerate(seq) if t in stops), len(seq))
            kept = seq[:cut]
            ids_out[i] = kept
            n_new[i] = min(len(seq), cut + 1)  # the stop token was generated too
            texts[i] = tokenizer.decode(kept, skip_special_tokens=True)
            stopped[i] = early is not None and row in early.stopped
        done += len(idx)
        if progress is not None:
            progress(done, len(order))
    return Generations(list(prompts), texts, n_new, time.perf_counter() - t0, batch_size,
                       ids_out, stopped, None if stop_rule is None else stop_rule.tag)


def _early_stop(tokenizer: Any, rule: StopRule | None, allowed: Sequence[bool]
                ) -> EarlyStop | None:
    """The loop's per-row check for ``rule`` on one batch (``allowed``: per batch row): the
    row's new ids decoded as the reply will be (special tokens skipped), then the rule."""
    if rule is None or not any(allowed):
        return None

    def decided(ids: list[int]) -> bool:
        return rule(tokenizer.decode(ids, skip_special_tokens=True))

    return EarlyStop(decided, rule.every, frozenset(i for i, ok in enumerate(allowed) if ok))
