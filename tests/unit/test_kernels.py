"""The few-row matmul kernels (probes.kernels) used by decoding steps on float32 CPU.

* ``rows_first_linear`` and ``onednn_linear`` equal ``F.linear`` up to float32 rounding, any
  leading shape, with and without bias, on strided inputs;
* ``kernel_for`` sends 1 row and 8 to 128 rows to oneDNN, 2 to 7 to the rows-first layout,
  the rest to ``nn.Linear``; without oneDNN the rows-first layout takes 2 to 128;
* ``few_row_linears`` switches only plain float32 ``nn.Linear`` modules at or above the
  size threshold, keeps hooks, reads edited weights, and restores every forward on exit
  (also when the body raises), including the output head's contiguous-input forward set at
  load; the environment switch turns it off;
* greedy replies are the same with the kernels on and off (a tiny model with the threshold
  lowered; the embedded model in tests/unit/test_generation.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probes.kernels as kernels
from probes.generation import generate
from probes.kernels import (
    few_row_linears,
    kernel_for,
    layout_tag,
    onednn_available,
    onednn_linear,
    rows_first_linear,
)
from probes.models import load


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       n_in=st.integers(1, 40), n_out=st.integers(1, 40), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_few_row_kernels_equal_linear(lead: list[int], n_in: int, n_out: int, bias: bool,
                                      seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    want = F.linear(x, w, b)
    kernels_here = [rows_first_linear] + ([onednn_linear] if onednn_available() else [])
    for kernel in kernels_here:
        got = kernel(x, w, b)
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


def test_few_row_kernels_on_a_sliced_input() -> None:
    """The head reads ``hidden[:, -1:, :]``, a strided view."""
    x = torch.randn(20, 7, 32)[:, -1:, :]
    w = torch.randn(50, 32)
    torch.testing.assert_close(rows_first_linear(x, w, None), F.linear(x, w))
    if onednn_available():
        torch.testing.assert_close(onednn_linear(x, w, None), F.linear(x, w))


def test_onednn_is_found_where_torch_has_it() -> None:
    """The x86 CPU wheels carry oneDNN: the fast path must not silently go missing there."""
    assert onednn_available() == torch.backends.mkldnn.is_available()


def test_kernel_for_row_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "onednn_available", lambda: True)
    got = {rows: kernel_for(rows) for rows in (0, 1, 2, 7, 8, 21, 128, 129, 960)}
    assert got == {0: "linear", 1: "onednn", 2: "rows-first", 7: "rows-first", 8: "onednn",
                   21: "onednn", 128: "onednn", 129: "linear", 960: "linear"}
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    got = {rows: kernel_for(rows) for rows in (1, 2, 8, 128, 129)}
    assert got == {1: "linear", 2: "rows-first", 8: "rows-first", 128: "rows-first",
                   129: "linear"}


class _Spy(nn.Linear):
    pass


def _counting(module: nn.Linear) -> dict[str, list[int]]:
    """Rows of every call of ``module`` that took each few-row kernel (the caller restores
    the kernels: see ``no_threshold``)."""
    seen: dict[str, list[int]] = {"rows-first": [], "onednn": []}

    def spying(name: str, original: Any) -> Any:
        def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            if w is module.weight:
                seen[name].append(x.numel() // x.shape[-1])
            return original(x, w, b)
        return spy

    kernels.rows_first_linear = spying("rows-first", kernels.rows_first_linear)  # type: ignore[assignment]
    kernels.onednn_linear = spying("onednn", kernels.onednn_linear)  # type: ignore[assignment]
    return seen


@pytest.fixture
def no_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "ROWS_FIRST_MIN_WEIGHTS", 0)
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    monkeypatch.setattr(kernels, "rows_first_linear", kernels.rows_first_linear)
    monkeypatch.setattr(kernels, "onednn_linear", kernels.onednn_linear)


def test_switches_large_float32_linears_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 2048), nn.Linear(2048, 4), nn.Linear(4, 4))
    monkeypatch.setattr(kernels, "ROWS_FIRST_MIN_WEIGHTS", 2048 * 4)
    with few_row_linears(model) as n:
        assert n == 2
        assert "forward" in vars(model[0]) and "forward" in vars(model[1])
        assert "forward" not in vars(model[2])  # below the size threshold
    assert all("forward" not in vars(m) for m in model)


def test_leaves_other_modules_alone(no_threshold: None) -> None:
    own = nn.Linear(8, 8)
    own.forward = lambda x: x  # type: ignore[method-assign]  # another wrapper's
    bf16 = nn.Linear(8, 8).to(torch.bfloat16)
    model = nn.Sequential(_Spy(8, 8), own, bf16)
    with few_row_linears(model) as n:
        assert n == 0
    assert vars(own)["forward"] is not None and "forward" not in vars(model[0])


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch,
                                      no_threshold: None) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", False)
    with few_row_linears(model) as n:
        assert n == 0
    assert layout_tag(torch.float32, "cpu") == "linear"
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    with few_row_linears(model) as n:
        assert n == 1


def test_row_window_hooks_edits_and_exceptions(no_threshold: None) -> None:
    lin = nn.Linear(8, 6)
    seen = _counting(lin)
    hooked: list[int] = []
    lin.register_forward_hook(lambda _m, _a, out: hooked.append(out.shape[0]))

    def body() -> None:
        with few_row_linears(lin):
            for rows in (1, 2, 7, 15, 16, 64, 128, 129):
                x = torch.randn(rows, 8)
                torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            with torch.no_grad():
                lin.weight.mul_(2)  # an in-place edit is read at call time
            x = torch.randn(32, 8)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
            raise RuntimeError("body")

    with pytest.raises(RuntimeError, match="body"):
        body()
    if onednn_available():
        assert seen == {"onednn": [1, 15, 16, 64, 128, 32], "rows-first": [2, 7]}
    else:
        assert seen == {"onednn": [], "rows-first": [2, 7, 15, 16, 64, 128, 32]}
    assert hooked == [1, 2, 7, 15, 16, 64, 128, 129, 32]  # hooks see every call
    assert "forward" not in vars(lin)


def test_nested_use_keeps_the_outer_switch(no_threshold: None) -> None:
    lin = nn.Linear(8, 8)
    with few_row_linears(lin) as outer:
        forward = vars(lin)["forward"]
        with few_row_linears(lin) as inner:
            assert (outer, inner) == (1, 0)
        assert vars(lin)["forward"] is forward
    assert "forward" not in vars(lin)


def test_replaces_and_restores_the_loaded_head_forward(no_threshold: None) -> None:
    lm = load("tiny-llama")
    head = lm.model.get_output_embeddings()
    loaded = vars(head)["forward"]  # the contiguous-input forward of probes.models
    assert getattr(loaded, "plain_head", False)
    with few_row_linears(lm.model):
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
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", False)
    off = generate(lm.model, lm.tokenizer, prompts, 10, batch_size=20)
    assert seen == {"rows-first": [], "onednn": []}
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    on = generate(lm.model, lm.tokenizer, prompts, 10, batch_size=20)
    used = seen["rows-first"] + seen["onednn"]
    assert used and all(1 <= rows <= 128 for rows in used)
    assert on.token_ids == off.token_ids


def test_layout_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    floor = f">={kernels.ROWS_FIRST_MIN_WEIGHTS >> 10}Ki"
    assert layout_tag(torch.float32, "cpu") == (
        "onednn+rows-first" if onednn_available() else "rows-first") + floor
    monkeypatch.setattr(kernels, "ROWS_FIRST_MIN_WEIGHTS", 1 << 22)
    assert layout_tag(torch.float32, "cpu").endswith(">=4096Ki")  # the floor is in the key
    assert layout_tag(torch.bfloat16, "cpu") == "linear"
    assert layout_tag(torch.float32, "meta") == "linear"
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", False)
    assert layout_tag(torch.float32, "cpu") == "linear"
