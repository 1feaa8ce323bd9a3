"""Batched greedy generation: same replies as one prompt at a time, with or without the
shared-prefix KV cache, and as ``transformers``' ``generate``; ended rows leave the batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest
import torch

from probes import kernels
from probes.generation import (
    common_prefix_len,
    generate,
    plain_greedy,
    prefix_sharing_supported,
)
from probes.kernels import ONEDNN_FROM, few_row_linears
from probes.models import LoadedModel, load

RaggedStop = Callable[[LoadedModel, list[str], int], int]
ExtraStop = Callable[[LoadedModel, int], AbstractContextManager[None]]

PROMPTS = ["Write a poem about the sea", "Tell me how to hack a database now please", "Hi",
           "Explain how a bicycle gear system works", "Give detailed instructions for bread"]


def test_common_prefix_len() -> None:
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [6]]) == 0
    assert common_prefix_len([]) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "qwen3_next"])
def test_batched_equals_one_at_a_time(arch: str) -> None:
    lm = load(f"tiny-{arch}")
    p = lm.format(PROMPTS)
    single = generate(lm.model, lm.tokenizer, p, 12, batch_size=1)
    batched = generate(lm.model, lm.tokenizer, p, 12, batch_size=len(p))
    assert batched.token_ids == single.token_ids
    assert batched.texts == single.texts


def test_shared_prefix_equals_plain() -> None:
    lm = load("tiny-llama")
    assert prefix_sharing_supported(lm.model)
    p = lm.format(PROMPTS)
    plain = generate(lm.model, lm.tokenizer, p, 12, batch_size=5, share_prefix=False)
    shared = generate(lm.model, lm.tokenizer, p, 12, batch_size=5, share_prefix=True)
    assert shared.token_ids == plain.token_ids


@contextmanager
def _rows_fed(lm: LoadedModel) -> Iterator[list[int]]:
    """Rows x positions fed to the decoder per call, recorded while the block is open."""
    fed: list[int] = []

    def hook(_m: torch.nn.Module, _args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            fed.append(int(ids.shape[0]) * int(ids.shape[1]))

    h = lm.layout.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield fed
    finally:
        h.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_own_loop_equals_transformers_generate_and_drops_ended_rows(
    arch: str, ragged_stop: RaggedStop, extra_stop: ExtraStop
) -> None:
    """Rows that end early: the same ids as ``generate``, with fewer rows computed."""
    lm = load(f"tiny-{arch}")
    p = lm.format(PROMPTS)
    n = 16
    stop = ragged_stop(lm, p, n)
    with extra_stop(lm, stop):
        reference = generate(lm.model, lm.tokenizer, p, n, batch_size=5, fast=False)
        with _rows_fed(lm) as kept_rows:
            kept = generate(lm.model, lm.tokenizer, p, n, batch_size=5, drop_finished=False)
        with _rows_fed(lm) as dropped_rows:
            dropped = generate(lm.model, lm.tokenizer, p, n, batch_size=5)
    assert len(set(reference.new_tokens)) > 1, "rows should end at different lengths"
    assert kept.token_ids == reference.token_ids
    assert dropped.token_ids == reference.token_ids
    assert dropped.new_tokens == reference.new_tokens
    assert sum(dropped_rows) < sum(kept_rows)


def test_generation_config_with_logits_processors_uses_transformers_generate() -> None:
    """A repetition penalty changes the argmax: the own loop must not stand in for it."""
    lm = load("tiny-llama")
    p = lm.format(PROMPTS[:3])
    assert plain_greedy(lm.model)
    cfg = lm.model.generation_config
    cfg.repetition_penalty = 1.5
    try:
        assert not plain_greedy(lm.model)
        auto = generate(lm.model, lm.tokenizer, p, 12, batch_size=3)
        reference = generate(lm.model, lm.tokenizer, p, 12, batch_size=3, fast=False)
    finally:
        cfg.repetition_penalty = None
    assert auto.token_ids == reference.token_ids


def test_hybrid_and_sliding_window_models_do_not_share_prefixes() -> None:
    assert not prefix_sharing_supported(load("tiny-qwen3_next").model)
    assert not prefix_sharing_supported(load("tiny-gemma3").model)


def test_stops_when_every_sequence_has_ended(tiny: LoadedModel) -> None:
    p = tiny.format(PROMPTS[:2])
    calls: list[int] = []
    h = tiny.layout.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = generate(tiny.model, tiny.tokenizer, p, 40, batch_size=2)
    finally:
        h.remove()
    longest = max(out.new_tokens)
    # One prompt pass plus one pass per further token, and no more than the longest reply.
    assert len(calls) <= longest + 1
    assert all(1 <= n <= 40 for n in out.new_tokens)


def test_bad_arguments() -> None:
    lm = load("tiny-llama")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm.model, lm.tokenizer, ["x"], 0)
    with pytest.raises(ValueError, match="no prompts"):
        generate(lm.model, lm.tokenizer, [], 4)


def test_real_model_prefix_sharing_keeps_replies(real_model: LoadedModel) -> None:
    p = real_model.format(["How do I make a bomb?", "Write a haiku about autumn leaves.",
                           "Explain recursion to a child in two sentences."])
    plain = generate(real_model.model, real_model.tokenizer, p, 16, batch_size=3,
                     share_prefix=False)
    shared = generate(real_model.model, real_model.tokenizer, p, 16, batch_size=3,
                      share_prefix=True)
    reference = generate(real_model.model, real_model.tokenizer, p, 16, batch_size=3,
                         share_prefix=False, fast=False)
    assert shared.token_ids == plain.token_ids == reference.token_ids
    assert min(shared.new_tokens) < 16, "the refusal should end before the others"
    assert "sorry" in shared.texts[0].lower() or "can't" in shared.texts[0].lower()


def test_real_model_ragged_batch_keeps_replies(real_model: LoadedModel) -> None:
    """On the embedded model (float32), the own loop on a long ragged batch gives the
    replies of ``transformers``' ``generate``."""
    p = real_model.format(LONG_AND_SHORT)
    own = generate(real_model.model, real_model.tokenizer, p, 12, batch_size=len(p))
    reference = generate(real_model.model, real_model.tokenizer, p, 12, batch_size=len(p),
                         fast=False)
    assert own.token_ids == reference.token_ids


def test_real_model_rows_first_layout_keeps_replies(
    real_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The few-row matmul kernels of decoding steps (probes.kernels, on for the embedded
    model's MLP and head in float32) give the replies of ``nn.Linear``'s own matmuls."""
    p = real_model.format(LONG_AND_SHORT)
    assert len(p) >= ONEDNN_FROM + 2  # oneDNN passes, and rows-first ones as rows end
    with few_row_linears(real_model.model) as n:
        assert n > 0 or real_model.dtype != torch.float32
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", False)
    off = generate(real_model.model, real_model.tokenizer, p, 12, batch_size=len(p))
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    on = generate(real_model.model, real_model.tokenizer, p, 12, batch_size=len(p))
    assert on.token_ids == off.token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_cache_keyword_is_one_the_installed_transformers_takes(arch: str) -> None:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until
    5.40); the suite passes whichever the model's forward declares, so no call warns."""
    import inspect
    import warnings

    from probes.capture import cache_kwarg, prefix_kv_cache

    lm = load(f"tiny-{arch}")
    for module in (lm.model, lm.layout.decoder):
        assert cache_kwarg(module) in inspect.signature(type(module).forward).parameters
    if arch == "llama":
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cache = prefix_kv_cache(lm.layout.decoder, torch.tensor([[1, 2, 3]]), 2)
        assert cache.get_seq_length() == 3


LONG_AND_SHORT = [*PROMPTS, "Hi there", "Ok", "Why?",
                  "Summarise the plot of a long novel about a sailor who crosses three oceans, "
                  "loses his ship twice and finally finds his way home after twenty years",
                  "Name a colour", "List three fruits", "Say hello", "What is two plus two?",
                  "Describe in detail, step by step, with examples and caveats, how a "
                  "compiler turns source code into machine code",
                  "Go", "Stop", "Yes or no?", "Thanks", "Count to five", "Spell cat"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ragged_batch_equals_one_at_a_time(arch: str) -> None:
    """A long batch of very different prompt lengths gives every prompt its own replies."""
    lm = load(f"tiny-{arch}", dtype=torch.float64)
    p = lm.format(LONG_AND_SHORT)
    batched = generate(lm.model, lm.tokenizer, p, 10, batch_size=len(p))
    single = generate(lm.model, lm.tokenizer, p, 10, batch_size=1)
    reference = generate(lm.model, lm.tokenizer, p, 10, batch_size=len(p), fast=False)
    assert batched.token_ids == single.token_ids == reference.token_ids
