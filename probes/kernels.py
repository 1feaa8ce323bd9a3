"""A faster float32 matmul layout for the few-row passes of decoding, on CPU.

A decoding step multiplies a few rows (one per sequence still writing) by every weight
matrix of the model. ``nn.Linear`` computes ``x @ W.T``; for 2 to 128 rows and a large
float32 matrix on CPU, the same product computed as ``(W @ x.T).T`` (the weight as the tall
left operand, untransposed; from 8 rows on, padded with zero rows to a multiple of 8, which
keeps MKL on its fast kernels) runs faster with torch 2.13's MKL, as measured on the 2-CPU
AVX2 machine of 2026-12-01: 1.1-1.8x on the embedded model's MLP matrices (4864 x 896 and
back) and 1.3-3.5x on its output head (151936 x 896, where ``x @ W.T`` barely uses the
second core). One decoding step of the embedded model, in isolation: 2 rows 329 -> 183 ms,
8 rows 534 -> 343 ms, 21 rows 530 -> 463 ms, 40 rows 885 -> 692 ms. The result is copied
back to row-major; on small matrices (SmolLM2's 576 x 1536) that copy ate the gain, so
only matrices of at least 4 Mi weights switch: the embedded model's MLP and head, SmolLM2's
head. One row (the one-prompt loop) gains nothing and keeps ``nn.Linear``.

:func:`rows_first_linears` switches a model's qualifying ``nn.Linear`` modules while it is
open; passes with fewer or more rows, other dtypes and other devices keep ``nn.Linear``'s
own. The numbers are the same product summed in another order (float32 rounding):
``tests/unit/test_kernels.py`` checks the values, and the generation tests compare replies
with it on and off and with ``transformers``' ``generate``. ``REFUSALBENCH_ROWS_FIRST=0``
turns it off (to check a figure, or on a machine where it does not pay); the generation
cache keys which layout produced a reply (:func:`layout_tag`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ROWS_FIRST_ENV", "ROWS_FIRST_MIN_WEIGHTS", "ROWS_FIRST_RANGE", "layout_tag",
           "rows_first_linear", "rows_first_linears"]

ROWS_FIRST_ENV = "REFUSALBENCH_ROWS_FIRST"
ROWS_FIRST_RANGE = (2, 128)  # rows (tokens in the pass) for which the layout is used
ROWS_FIRST_MIN_WEIGHTS = 1 << 22  # matrices of at least 4 Mi weights (16 MiB in float32)


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


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    lo, hi = ROWS_FIRST_RANGE
    if lo <= rows <= hi and x.dtype == module.weight.dtype:
        return rows_first_linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether ``REFUSALBENCH_ROWS_FIRST`` leaves the layout on (the default, also when
    unset or empty); any value other than 1/0, true/false, yes/no, on/off is an error."""
    value = os.environ.get(ROWS_FIRST_ENV, "").strip().lower()
    if value in ("", *_ON):
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ROWS_FIRST_ENV}={os.environ[ROWS_FIRST_ENV]!r} is not understood: "
                     f"set it to 0 (nn.Linear's own matmul layout) or 1 (rows-first, the "
                     f"default), or unset it")


def layout_tag(dtype: torch.dtype, device: torch.device | str) -> str:
    """Which matmul layout decoding uses for a model of ``dtype`` on ``device`` (part of
    the generation cache key: the layouts round differently, so a greedy tie could flip)."""
    on = enabled() and dtype == torch.float32 and torch.device(device).type == "cpu"
    return "rows-first" if on else "linear"


@contextmanager
def rows_first_linears(model: nn.Module) -> Iterator[int]:
    """Use :func:`rows_first_linear` for the model's large float32 CPU ``nn.Linear`` modules
    (at least :data:`ROWS_FIRST_MIN_WEIGHTS` weights) in passes of 2 to 128 rows.

    Yields how many modules were switched (0 when off, or for other dtypes and devices).
    Modules of a ``nn.Linear`` subclass, or with a ``forward`` of their own already set on
    the instance (another wrapper's, or an enclosing call of this), are left alone, except
    the output head's contiguous-input forward that :func:`probes.models.load` sets (this
    layout reads any input); every switched module gets its forward back on exit. Hooks on
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
