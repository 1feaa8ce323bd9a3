"""Faster float32 matmuls for the few-row passes of decoding, on CPU.

A decoding step multiplies a few rows (one per sequence still writing) by every weight
matrix of the model. ``nn.Linear`` computes ``x @ W.T`` with MKL, whose kernels for a few
rows and a large float32 matrix run far below the machine's peak on the 2-CPU AVX2 machine of
2026-12-01 (torch 2.13). While :func:`few_row_linears` is open, the model's float32 CPU
``nn.Linear`` modules of at least 512 Ki weights (2 MiB; the embedded model's attention
query/output, MLP and output head, SmolLM2's MLP and head) compute passes of

* 1 row and 8 to 128 rows with oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the
  op behind torch's own mkldnn linear; weights read at call time, row-major result). Measured
  against ``nn.Linear`` (ad-hoc microbenchmarks, medians of interleaved calls): the output
  head (151936 x 896) 1 row 41 -> 18 ms, 8 rows 134 -> 55 ms, 21 rows 158 -> 81 ms, 40 rows
  245 -> 149 ms; the MLP's 4864 x 896 at 24 rows 5.1 -> 3.2 ms. Against the rows-first layout
  below, from 8 rows on: 1.3-1.7x faster on the head, 1.2-1.3x on the 4864 x 896 matrices,
  and 1.0-1.4x on the 896 x 4864 down projection up to 40 rows (0.92-0.95x, slightly slower,
  at 64-128 rows, which decoding a batch of 40 does not reach).
* 2 to 7 rows in the rows-first layout :func:`rows_first_linear`: the same product computed
  as ``(W @ x.T).T`` (the weight as MKL's tall left operand) and copied back to row-major;
  there it beats oneDNN on the head (2 rows 95 -> 40 ms against oneDNN's 43, 4 rows 117 -> 40
  against 49), ties on the MLP, and beats both at 2-4 rows on the 0.8-1.5 Mi matrices.

The size floor: over 8-40 rows, with each matrix read from memory as in a real step (ad-hoc
sweeps of 16 shapes, 2026-12-01), oneDNN beat MKL on most shapes from about 0.5 Mi weights on
(MKL time / oneDNN time 0.82-1.85, median about 1.3; two sweeps disagreed on 576 x 1536) and
lost below (512 x 512: 0.86-0.91); the key/value projections (128 x 896, 192 x 576) ran
1.1-1.9x slower with it. End to end, make perf's steered
workload (40 prompts x 48 new tokens) ran 28.5 s with the rows-first layout alone and 25.7 s
with this split on the embedded model (floor 4 Mi, ad-hoc, same replies); lowering the floor
from 4 Mi to 512 Ki took SmolLM2 from 14.8 to 13.6 s and left the embedded model within the
run-to-run spread (26.6 against 27.3 s, same replies). Prompt passes of more rows keep
``nn.Linear`` (MKL is as fast or faster there), as do other dtypes and devices.

The numbers are the same product summed in another order (float32 rounding):
``tests/unit/test_kernels.py`` checks the values, and the generation tests compare replies
with the kernels on and off and with ``transformers``' ``generate``.
:data:`FEW_ROW_KERNELS` switches both off (the tests compare replies with and without them);
the generation cache keys which kernels produced a reply (:func:`layout_tag`). Where
torch was built without oneDNN, the rows-first layout covers 2 to 128 rows as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FEW_ROWS", "FEW_ROW_KERNELS", "ONEDNN_FROM", "ROWS_FIRST_MIN_WEIGHTS",
           "few_row_linears", "kernel_for", "layout_tag", "onednn_available", "onednn_linear",
           "rows_first_linear"]

FEW_ROW_KERNELS = True
"""Whether :func:`few_row_linears` switches any module; off, decoding uses ``nn.Linear``."""
FEW_ROWS = (1, 128)  # rows (tokens in the pass) that leave nn.Linear
ONEDNN_FROM = 8  # oneDNN for 1 row and from 8 rows; rows-first for 2 to 7
ROWS_FIRST_MIN_WEIGHTS = 1 << 19  # matrices of at least 512 Ki weights (2 MiB in float32)


def rows_first_linear(x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x_rows.T).T``, row-major again
    (the copy back costs a few per cent of the product; later ops run faster on it). From 8
    rows on, the rows are padded with zeros to a multiple of 8 and the padding dropped."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    padded = -(-rows // 8) * 8 if rows >= 8 else rows
    if padded != rows:  # an output row stride of 8k floats keeps MKL on its fast kernels
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    y = torch.mm(weight, flat.t()).t()[:rows].contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


@cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's float32 linear op (and it runs)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return False
        y = op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.full((2, 4), 3.0)))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN's matmul (float32 CPU)."""
    y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return y


def kernel_for(rows: int) -> str:
    """Which kernel a switched module uses for a pass of ``rows`` rows: ``"onednn"``,
    ``"rows-first"`` or ``"linear"`` (``nn.Linear``'s own)."""
    lo, hi = FEW_ROWS
    if not lo <= rows <= hi:
        return "linear"
    if onednn_available() and (rows == 1 or rows >= ONEDNN_FROM):
        return "onednn"
    return "rows-first" if rows >= 2 else "linear"


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == module.weight.dtype and x.dim():
        kind = kernel_for(x.numel() // x.shape[-1])
        if kind == "onednn":
            return onednn_linear(x, module.weight, module.bias)
        if kind == "rows-first":
            return rows_first_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


def enabled() -> bool:
    """Whether the few-row kernels are on (:data:`FEW_ROW_KERNELS`)."""
    return FEW_ROW_KERNELS


def layout_tag(dtype: torch.dtype, device: torch.device | str) -> str:
    """Which matmul kernels decoding uses for a model of ``dtype`` on ``device`` (part of
    the generation cache key: the kernels round differently, so a greedy tie could flip),
    with the size floor of the switched matrices, e.g. ``"onednn+rows-first>=512Ki"``."""
    on = enabled() and dtype == torch.float32 and torch.device(device).type == "cpu"
    if not on:
        return "linear"
    kinds = "onednn+rows-first" if onednn_available() else "rows-first"
    return f"{kinds}>={ROWS_FIRST_MIN_WEIGHTS >> 10}Ki"


@contextmanager
def few_row_linears(model: nn.Module) -> Iterator[int]:
    """Use the few-row kernels (:func:`kernel_for`) for the model's large float32 CPU
    ``nn.Linear`` modules (at least :data:`ROWS_FIRST_MIN_WEIGHTS` weights) in passes of 1 to
    128 rows.

    Yields how many modules were switched (0 when off, or for other dtypes and devices).
    Modules of a ``nn.Linear`` subclass, or with a ``forward`` of their own already set on
    the instance (another wrapper's, or an enclosing call of this), are left alone, except
    the output head's contiguous-input forward that :func:`probes.models.load` sets (these
    kernels read any input); every switched module gets its forward back on exit. Hooks on
    the modules run as before, and weights are read at call time, so in-place edits
    (abliteration) apply.
    """
    switched: list[tuple[nn.Module, Any]] = []
    if enabled():
        for module in model.modules():
            own = module.__dict__.get("forward")
            if (type(module) is nn.Linear and (own is None or getattr(own, "plain_head", False))
                    and module.weight.dtype == torch.float32
                    and module.weight.numel() >= ROWS_FIRST_MIN_WEIGHTS
                    and module.weight.device.type == "cpu"):
                module.__dict__["forward"] = partial(_forward, module)
                switched.append((module, own))
    try:
        yield len(switched)
    finally:
        for module, own in switched:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
