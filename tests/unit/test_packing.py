"""probes.packing: MLPs computed on the real tokens of a padded batch only.

* logits at every real position are the same with and without packing, on every tiny
  architecture (the mixture-of-experts one is left alone);
* hooks on the MLP module still see ``[batch, pos, d]``, with zeros at padded positions;
* no padding, no mask, other call shapes and already wrapped modules change nothing;
* activation capture and first-token scores of the embedded model are the same with and
  without packing (slow tier).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import probes.capture as capture_mod
from probes.capture import capture, last_position_logits, left_pad_batch
from probes.layout import dense_mlps
from probes.models import LoadedModel
from probes.packing import packed_mlps

RAGGED = ["hi", "a much longer prompt with many more tokens in it", "medium length one"]


def _batch(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return left_pad_batch(lm.tokenizer, lm.format(RAGGED), "cpu")


@torch.inference_mode()
def test_same_logits_at_real_positions(tiny: LoadedModel) -> None:
    batch = _batch(tiny)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the test needs padding
    plain = tiny.model(**batch).logits
    with packed_mlps(tiny.model, batch["attention_mask"]) as n:
        packed = tiny.model(**batch).logits
    assert n == len(dense_mlps(tiny.model))
    if tiny.model.config.model_type != "qwen3_next":
        assert n == tiny.n_layers
    torch.testing.assert_close(packed[mask], plain[mask], rtol=1e-4, atol=1e-4)
    assert all("forward" not in vars(m) for m in dense_mlps(tiny.model))


@torch.inference_mode()
def test_mlp_hooks_see_the_batch_shape_and_zeros_at_padding() -> None:
    from probes.models import load

    lm = load("tiny-llama")
    batch = _batch(lm)
    mask = batch["attention_mask"].bool()
    mlp = dense_mlps(lm.model)[1]
    seen: list[tuple[torch.Size, torch.Tensor]] = []
    handle = mlp.register_forward_hook(
        lambda _m, args, out: seen.append((args[0].shape, out.detach().clone())))
    try:
        lm.model(**batch)
        with packed_mlps(lm.model, mask):
            lm.model(**batch)
    finally:
        handle.remove()
    (plain_shape, plain), (packed_shape, packed) = seen
    assert plain_shape == packed_shape == (*mask.shape, lm.layout.d_model)
    assert packed.shape == plain.shape
    assert bool((packed[~mask] == 0).all())
    torch.testing.assert_close(packed[mask], plain[mask], rtol=1e-5, atol=1e-5)


def test_no_padding_no_mask_and_other_shapes_change_nothing() -> None:
    from probes.models import load

    lm = load("tiny-llama")
    full = torch.ones(2, 5, dtype=torch.long)
    with packed_mlps(lm.model, full) as n_full, packed_mlps(lm.model, None) as n_none:
        assert n_full == n_none == 0
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mlp = dense_mlps(lm.model)[0]
    x = torch.randn(2, 1, lm.layout.d_model)  # a decoding step's shape: not the mask's
    with torch.inference_mode():
        want = mlp(x)
        with packed_mlps(lm.model, mask) as n:
            got = mlp(x)
            assert n == lm.n_layers
    torch.testing.assert_close(got, want)


class _Experts(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = _Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = nn.Identity()
        self.mlp = mlp


def test_leaves_moe_and_wrapped_mlps_alone() -> None:
    wrapped = nn.Linear(4, 4)
    own = wrapped.forward
    wrapped.forward = own  # type: ignore[method-assign]  # another wrapper's
    model = nn.ModuleList([_Block(_MoE()), _Block(wrapped), _Block(nn.Linear(4, 4))])
    assert dense_mlps(model) == [wrapped, model[2].mlp]
    with packed_mlps(model, torch.tensor([[0, 1]])) as n:
        assert n == 1
        assert vars(wrapped)["forward"] is own and "forward" in vars(model[2].mlp)
    assert vars(wrapped)["forward"] is own and "forward" not in vars(model[2].mlp)


@contextlib.contextmanager
def _unpacked(_model: Any, _valid: Any) -> Iterator[int]:
    yield 0


def test_capture_and_first_token_scores_equal_unpacked(real_model: LoadedModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    texts = real_model.format(RAGGED * 2)
    acts = capture(real_model.layout, real_model.tokenizer, texts, layers=[0, 11, 23])
    logits = last_position_logits(real_model.model, real_model.tokenizer, texts, "cpu")
    monkeypatch.setattr(capture_mod, "packed_mlps", _unpacked)
    plain = capture(real_model.layout, real_model.tokenizer, texts, layers=[0, 11, 23])
    plain_logits = last_position_logits(real_model.model, real_model.tokenizer, texts, "cpu")
    scale = float(plain.data.abs().max())
    torch.testing.assert_close(acts.data, plain.data, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-3)
    assert bool((logits.argmax(-1) == plain_logits.argmax(-1)).all())
