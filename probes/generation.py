"""Batched greedy generation, under whatever interventions are active.

Prompts are sorted by length and left-padded in batches; ``transformers``' ``generate``
runs greedy decoding with the KV cache and stops as soon as every sequence in the batch
has ended. Interventions (hooks) apply to the prompt pass and every generated token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from probes.capture import model_device


@dataclass
class Generations:
    """Replies in prompt order, with the cost of producing them."""

    prompts: list[str]
    texts: list[str]
    new_tokens: list[int]
    seconds: float
    batch_size: int
    token_ids: list[list[int]] = field(default_factory=list, repr=False)

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


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every row."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


def prefix_sharing_supported(model: Any) -> bool:
    """Prefix KV sharing needs a plain attention cache (no recurrent/linear-attention state,
    no sliding window shorter than the context)."""
    cfg = getattr(model, "config", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return not getattr(cfg, "use_sliding_window", False)


def _generate_batch(
    model: Any, ids: list[list[int]], pad: int, stops: list[int], max_new_tokens: int,
    share_prefix: bool, device: torch.device,
) -> list[list[int]]:
    """Greedy continuation of one batch of token-id rows; returns the new ids per row.

    With ``share_prefix`` the prompt prefix common to all rows (the chat template's system
    turn, typically) is run once and its KV cache repeated across the batch; rows are then
    padded between the prefix and their own suffix, so every row keeps its exact positions.
    """
    b = len(ids)
    p = common_prefix_len(ids) if share_prefix and b > 1 else 0
    p = min(p, min(len(r) for r in ids) - 1)  # keep at least one token per row to feed
    width = max(len(r) for r in ids)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for row, r in enumerate(ids):
        suffix = r[p:]
        input_ids[row, :p] = torch.tensor(r[:p], dtype=torch.long)
        input_ids[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[row, :p] = 1
        mask[row, width - len(suffix):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    kwargs: dict[str, Any] = {}
    if p > 0:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids[:1, :p], attention_mask=mask[:1, :p], past_key_values=cache,
              use_cache=True)
        cache.batch_repeat_interleave(b)
        kwargs["past_key_values"] = cache
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None, **kwargs,
    )
    return [list(map(int, row)) for row in out[:, width:].tolist()]


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    share_prefix: bool | None = None,
) -> Generations:
    """Greedy replies to already chat-formatted ``prompts``.

    ``share_prefix`` (default: when the architecture allows it) computes the prompt prefix
    shared by a batch once; the replies are the same as without it (tested).
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
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    texts: list[str] = [""] * len(prompts)
    n_new: list[int] = [0] * len(prompts)
    ids_out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        new = _generate_batch(model, [all_ids[i] for i in idx], pad, stops, max_new_tokens,
                              share_prefix, device)
        for row, i in enumerate(idx):
            seq = new[row]
            cut = next((k for k, t in enumerate(seq) if t in stops), len(seq))
            kept = seq[:cut]
            ids_out[i] = kept
            n_new[i] = min(len(seq), cut + 1)  # the stop token was generated too
            texts[i] = tokenizer.decode(kept, skip_special_tokens=True)
        done += len(idx)
        if progress is not None:
            progress(done, len(order))
    return Generations(list(prompts), texts, n_new, time.perf_counter() - t0, batch_size,
                       ids_out)
