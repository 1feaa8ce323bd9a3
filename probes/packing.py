"""MLP sublayers computed on the real tokens of a padded batch only.

A batch of prompts of different lengths is left-padded to its longest row; every matmul of
the pass then also runs on the padding. In a decoder block the MLP holds most of the
arithmetic (the embedded model: 13.1 M of a block's 14.9 M weights) and treats every position
on its own, so it can run on the real positions alone, packed into one row of tokens, and
write zeros at the padded ones. Nothing reads a padded position's value: attention masks it
as a key, and the suite selects real positions when it records (``probes.capture``) or
monitors (``probes.monitoring``), so results are unchanged up to float32 rounding (the
same products, computed with a different number of rows).

:func:`packed_mlps` is opened by the suite's own prompt passes over padded batches:
activation capture, first-token scores (:func:`probes.capture.last_position_logits`) and
the prompt pass of generation. On make perf's steered workload (40 chat prompts, 732 real
of 960 padded suffix tokens on the embedded model) the whole workload (48 new tokens) took
27.2 -> 25.2 s, packing off against on (ad-hoc interleaved script, 3 repeats, same replies,
2026-12-01, the 2-CPU AVX2 machine, float32); a first prototype of the same packing put the
prompt pass alone at 5.87 -> 4.82 s. Activations came out bit-identical with MKL there; they
may differ by float32 rounding elsewhere, as the kernels of ``probes.kernels`` do.

Forward hooks on the MLP module itself (``mlp_out`` captures, interventions) still see the
``[batch, pos, d]`` input and output; hooks on the MLP's own children (``gate_proj``,
``down_proj``...) see the packed ``[1, real tokens, d]`` (the suite hooks none there).
In-place weight edits (abliteration) apply: the MLP's own forward runs on the packed rows.
Left alone: MLPs with an ``experts`` child (mixture-of-experts routers may balance load
across the batch), modules with a ``forward`` of their own already set on the instance
(another wrapper's), calls with other arguments or shapes (decoding steps feed one real
token per row and are not packed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from probes.layout import dense_mlps

__all__ = ["packed_mlps"]


def _packed_forward(module: nn.Module, valid: torch.Tensor, index: torch.Tensor,
                    *args: Any, **kwargs: Any) -> Any:
    original = type(module).forward
    if len(args) != 1 or kwargs:
        return original(module, *args, **kwargs)
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[:2] != valid.shape:
        return original(module, x)
    b, t, d = x.shape
    y = original(module, x.reshape(b * t, d).index_select(0, index).unsqueeze(0))
    out = y.new_zeros(b * t, y.shape[-1])
    out.index_copy_(0, index, y[0])
    return out.view(b, t, y.shape[-1])


@contextmanager
def packed_mlps(model: nn.Module, valid: torch.Tensor | None) -> Iterator[int]:
    """While open, the dense MLPs of ``model``'s decoder blocks compute only the positions
    where ``valid`` (``[batch, pos]``, true at real tokens: the attention mask's columns for
    the tokens this pass feeds) is true, for inputs of that ``[batch, pos]`` shape; padded
    positions get zeros. Yields how many MLPs were switched (0 when ``valid`` is ``None``,
    not 2-D, or has no padding); every one gets its forward back on exit.
    """
    switched: list[nn.Module] = []
    if valid is not None and valid.dim() == 2 and not bool(valid.all()):
        mask = valid.to(torch.bool)
        index = mask.reshape(-1).nonzero().squeeze(1)
        for mlp in dense_mlps(model):
            if "forward" in mlp.__dict__:
                continue
            mlp.__dict__["forward"] = partial(_packed_forward, mlp, mask, index)
            switched.append(mlp)
    try:
        yield len(switched)
    finally:
        for mlp in switched:
            mlp.__dict__.pop("forward", None)
