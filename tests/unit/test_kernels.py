"""The rows-first matmul layout (probes.kernels) used by decoding steps on float32 CPU.

* ``rows_first_linear`` equals ``F.linear`` up to float32 rounding, any leading shape, with
  and without bias;
* ``rows_first_linears`` switches only plain float32 ``nn.Linear`` modules at or above the
  size threshold, only for passes of 2 to 128 rows, keeps hooks, reads edited weights, and
  restores every forward on exit (also when the body raises), including the output head's
  contiguous-input forward set at load; the environment switch turns it off;
* greedy replies are the same with the layout on and off (a tiny model with the threshold
  lowered; the embedded model in tests/integration).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes.kernels as kernels
from probes.generation import generate
from probes.kernels import ROWS_FIRST_ENV, layout_tag, rows_first_linear, rows_first_linears
from probes.models import load


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       n_in=st.integers(1, 40), n_out=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rows_first_linear_equals_linear(lead: list[int], n_in: int, n_out: int, bias: bool,
                                         seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    got = rows_first_linear(x, w, b)
    want = F.linear(x, w, b)
    assert got.shape == want.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 21, 24, 40])
def test_rows_first_linear_pads_to_eight_rows_and_drops_the_padding(rows: int) -> None:
    x = torch.randn(rows, 1, 24)
    w, b = torch.randn(30, 24), torch.randn(30)
    got = rows_first_linear(x, w, b)
    assert got.shape == (rows, 1, 30)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_rows_first_linear_on_a_sliced_input() -> None:
    """The head reads ``hidden[:, -1:, :]``, a strided view."""
    x = torch.randn(20, 7, 32)[:, -1:, :]
    w = torch.randn(50, 32)
    torch.testing.assert_close(rows_first_linear(x, w, None), F.linear(x, w))


class _Spy(nn.Linear):
    pass


def _counting(module: nn.Linear) -> list[int]:
    """Rows of every call that took the rows-first path."""
    seen: list[int] = []
    original = kernels.rows_first_linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if w is module.weight:
            seen.append(x.numel() // x.shape[-1])
        return original(x, w, b)

    kernels.rows_first_linear = spy  # type: ignore[assignment]
    return seen


@pytest.fixture
def no_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "ROWS_FIRST_MIN_WEIGHTS", 0)
    monkeypatch.delenv(ROWS_FIRST_ENV, raising=False)
    monkeypatch.setattr(kernels, "rows_first_linear", kernels.rows_first_linear)


def test_switches_large_float32_linears_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROWS_FIRST_ENV, raising=False)
    model = nn.Sequential(nn.Linear(4, 2048), nn.Linear(2048, 4), nn.Linear(4, 4))
    monkeypatch.setattr(kernels, "ROWS_FIRST_MIN_WEIGHTS", 2048 * 4)
    with rows_first_linears(model) as n:
        assert n == 2
        assert "forward" in vars(model[0]) and "forward" in vars(model[1])
        assert "forward" not in vars(model[2])  # below the size threshold
    assert all("forward" not in vars(m) for m in model)


def test_leaves_other_modules_alone(no_threshold: None) -> None:
    own = nn.Linear(8, 8)
    own.forward = lambda x: x  # type: ignore[method-assign]  # another wrapper's
    bf16 = nn.Linear(8, 8).to(torch.bfloat16)
    model = nn.Sequential(_Spy(8, 8), own, bf16)
    with rows_first_linears(model) as n:
        assert n == 0
    assert vars(own)["forward"] is not None and "forward" not in vars(model[0])


def test_environment_switch(monkeypatch: pytest.MonkeyPatch, no_threshold: None) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    for off in ("0", "off", "false"):
        monkeypatch.setenv(ROWS_FIRST_ENV, off)
        with rows_first_linears(model) as n:
            assert n == 0
    for on in ("1", "on", ""):
        monkeypatch.setenv(ROWS_FIRST_ENV, on)
        with rows_first_linears(model) as n:
            assert n == 1
    monkeypatch.setenv(ROWS_FIRST_ENV, "maybe")
    with pytest.raises(ValueError, match="REFUSALBENCH_ROWS_FIRST='maybe' is not understood"):
        layout_tag(torch.float32, "cpu")


def test_row_window_hooks_edits_and_exceptions(no_threshold: None) -> None:
    lin = nn.Linear(8, 6)
    seen = _counting(lin)
    hooked: list[int] = []
    lin.register_forward_hook(lambda _m, _a, out: hooked.append(out.shape[0]))

    def body() -> None:
        with rows_first_linears(lin):
            for rows in (1, 15, 16, 64, 128, 129):
                x = torch.randn(rows, 8)
                torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            with torch.no_grad():
                lin.weight.mul_(2)  # an in-place edit is read at call time
            x = torch.randn(32, 8)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            raise RuntimeError("body")

    with pytest.raises(RuntimeError, match="body"):
        body()
    assert seen == [15, 16, 64, 128, 32]  # only passes of 2 to 128 rows
    assert hooked == [1, 15, 16, 64, 128, 129, 32]  # hooks see every call
    assert "forward" not in vars(lin)


def test_nested_use_keeps_the_outer_switch(no_threshold: None) -> None:
    lin = nn.Linear(8, 8)
    with rows_first_linears(lin) as outer:
        forward = vars(lin)["forward"]
        with rows_first_linears(lin) as inner:
            assert (outer, inner) == (1, 0)
        assert vars(lin)["forward"] is forward
    assert "forward" not in vars(lin)


def test_replaces_and_restores_the_loaded_head_forward(no_threshold: None) -> None:
    lm = load("tiny-llama")
    head = lm.model.get_output_embeddings()
    loaded = vars(head)["forward"]  # the contiguous-input forward of probes.models
    assert getattr(loaded, "plain_head", False)
    with rows_first_linears(lm.model):
        assert vars(head)["forward"] is not loaded
    assert vars(head)["forward"] is loaded


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_replies_equal_with_the_layout_on_and_off(
    arch: str, monkeypatch: pytest.MonkeyPatch, no_threshold: None
) -> None:
    lm = load(f"tiny-{arch}")
    head = lm.model.get_output_embeddings()
    seen = _counting(head)
    prompts = lm.format([f"Tell me about the number {i} and why it matters" for i in range(20)])
    monkeypatch.setenv(ROWS_FIRST_ENV, "0")
    off = generate(lm.model, lm.tokenizer, prompts, 10, batch_size=20)
    assert not seen
    monkeypatch.setenv(ROWS_FIRST_ENV, "1")
    on = generate(lm.model, lm.tokenizer, prompts, 10, batch_size=20)
    assert seen and all(16 <= rows <= 128 for rows in seen)
    assert on.token_ids == off.token_ids


def test_layout_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROWS_FIRST_ENV, raising=False)
    assert layout_tag(torch.float32, "cpu") == "rows-first"
    assert layout_tag(torch.bfloat16, "cpu") == "linear"
    assert layout_tag(torch.float32, "meta") == "linear"
    monkeypatch.setenv(ROWS_FIRST_ENV, "0")
    assert layout_tag(torch.float32, "cpu") == "linear"
