"""Capture through hooks equals what the model itself reports, batched or not."""

from __future__ import annotations

import pytest
import torch

from probes.capture import (
    capture,
    last_position_logits,
    prefix_sharing_supported,
    recording,
)
from probes.errors import LayerOutOfRange
from probes.models import LoadedModel

TEXTS = ["Write a poem about the sea", "Tell me how to hack a database now please", "Hi",
         "Explain how a bicycle gear system works in simple words for a child"]


def _reference_hidden(lm: LoadedModel, text: str) -> tuple[torch.Tensor, ...]:
    enc = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        return lm.model(**enc, output_hidden_states=True).hidden_states  # type: ignore[no-any-return]


def _check_against_hidden_states(lm: LoadedModel, atol: float) -> None:
    prompts = lm.format(TEXTS)
    pre = capture(lm.layout, lm.tokenizer, prompts, "resid_pre", batch_size=3)
    post = capture(lm.layout, lm.tokenizer, prompts, "resid_post", batch_size=2)
    L = lm.n_layers
    for i, text in enumerate(prompts):
        hs = _reference_hidden(lm, text)  # L+1 entries, [1, pos, d]
        for layer in range(L):
            torch.testing.assert_close(pre.layer(layer)[i], hs[layer][0, -1], atol=atol, rtol=1e-4)
            if layer < L - 1:
                torch.testing.assert_close(post.layer(layer)[i], hs[layer + 1][0, -1],
                                           atol=atol, rtol=1e-4)


def test_hooks_equal_output_hidden_states_tiny(tiny: LoadedModel) -> None:
    _check_against_hidden_states(tiny, atol=1e-5)


def test_hooks_equal_output_hidden_states_real(real_model: LoadedModel) -> None:
    _check_against_hidden_states(real_model, atol=2e-3)


def test_positions_and_sites_have_documented_shapes(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    k = tiny.chat.n_post_instruction_tokens()
    d = tiny.layout.d_model
    last = capture(tiny.layout, tiny.tokenizer, prompts, "attn_out", layers=[0, 2])
    assert last.data.shape == (4, 2, d)
    post = capture(tiny.layout, tiny.tokenizer, prompts, "mlp_out", positions="post_instruction",
                   n_post_instruction=k)
    assert post.data.shape == (4, k, tiny.n_layers, d)
    allpos = capture(tiny.layout, tiny.tokenizer, prompts, "resid_post", positions="all")
    assert allpos.lengths is not None
    assert allpos.data.shape == (int(allpos.lengths.sum()), tiny.n_layers, d)
    # The last token of every prompt in the 'all' capture equals the 'last' capture.
    last_post = capture(tiny.layout, tiny.tokenizer, prompts, "resid_post")
    ends = torch.cumsum(allpos.lengths, 0) - 1
    torch.testing.assert_close(allpos.data[ends], last_post.data, atol=1e-5, rtol=1e-4)
    # The last post-instruction token is the last token.
    torch.testing.assert_close(post.data[:, -1], capture(
        tiny.layout, tiny.tokenizer, prompts, "mlp_out").data, atol=1e-5, rtol=1e-4)


def test_sublayer_writes_sum_to_the_residual_update(tiny: LoadedModel) -> None:
    """resid_post = resid_pre + attn_out + mlp_out where the writes are the sublayer outputs."""
    prompts = tiny.format(TEXTS[:2])
    pre = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre")
    post = capture(tiny.layout, tiny.tokenizer, prompts, "resid_post")
    attn = capture(tiny.layout, tiny.tokenizer, prompts, "attn_out")
    mlp = capture(tiny.layout, tiny.tokenizer, prompts, "mlp_out")
    torch.testing.assert_close(post.data, pre.data + attn.data + mlp.data, atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_even_when_the_forward_fails(tiny: LoadedModel) -> None:
    blocks = tiny.layout.blocks
    before = [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in blocks]
    with pytest.raises(RuntimeError), recording(tiny.layout, "resid_post", [0, 1], lambda h: h):
        raise RuntimeError("boom")
    after = [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in blocks]
    assert before == after


def test_layer_out_of_range_is_a_clear_error(tiny: LoadedModel) -> None:
    with pytest.raises(LayerOutOfRange, match="(?s)out of range.*choose layers between 0 and 3"):
        capture(tiny.layout, tiny.tokenizer, tiny.format(TEXTS), layers=[tiny.n_layers])


@pytest.mark.parametrize("positions", ["last", "post_instruction"])
def test_shared_prefix_capture_equals_plain_and_feeds_fewer_tokens(
    real_model: LoadedModel, positions: str
) -> None:
    """The chat template's system turn runs once per batch: same activations, less work."""
    lm = real_model
    prompts = lm.format(TEXTS)
    k = lm.chat.n_post_instruction_tokens()
    fed: dict[bool, int] = {}
    got = {}
    for share in (False, True):
        count = [0]

        def hook(_m: torch.nn.Module, _a: tuple[object, ...], kw: dict[str, object],
                 count: list[int] = count) -> None:
            ids = kw.get("input_ids")
            if isinstance(ids, torch.Tensor):
                count[0] += ids.numel()

        h = lm.layout.decoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            got[share] = capture(lm.layout, lm.tokenizer, prompts, "resid_pre",
                                 positions=positions, n_post_instruction=k,  # type: ignore[arg-type]
                                 batch_size=4, share_prefix=share)
        finally:
            h.remove()
        fed[share] = count[0]
    torch.testing.assert_close(got[True].data, got[False].data, atol=2e-3, rtol=1e-4)
    assert fed[True] < 0.75 * fed[False], fed


def test_shared_prefix_is_refused_for_all_positions(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="share_prefix"):
        capture(tiny.layout, tiny.tokenizer, tiny.format(TEXTS), positions="all",
                share_prefix=True)


def test_last_position_logits_equal_each_text_alone(tiny: LoadedModel) -> None:
    """The shared chat prefix runs once (plain attention) and every row still gets the
    logits of its own unpadded forward."""
    texts = tiny.format(["Hi", "Write a poem about the sea", "Explain gears to a child"])
    fed: list[int] = []
    hook = tiny.layout.decoder.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(int(kw["input_ids"].numel())), with_kwargs=True)
    try:
        with torch.inference_mode():
            got = last_position_logits(tiny.model, tiny.tokenizer, texts, "cpu")
    finally:
        hook.remove()
    ids = tiny.tokenizer(texts, add_special_tokens=False)["input_ids"]
    for row, one in enumerate(ids):
        with torch.inference_mode():
            alone = tiny.model(input_ids=torch.tensor([one])).logits[0, -1].float()
        torch.testing.assert_close(got[row], alone, atol=1e-4, rtol=1e-4)
    if prefix_sharing_supported(tiny.model):
        assert sum(fed) < len(texts) * max(len(i) for i in ids)
