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


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Generations:
    """Greedy replies to already chat-formatted ``prompts``."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    device = model_device(model)
    lengths = [len(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    texts: list[str] = [""] * len(prompts)
    n_new: list[int] = [0] * len(prompts)
    ids_out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        padding_side="left", add_special_tokens=False).to(device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=stops, pad_token_id=pad, temperature=None, top_p=None, top_k=None,
        )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
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
