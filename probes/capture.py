"""Record residual-stream activations at named sites, batched, in one forward pass.

Sites (each ``[batch, pos, d_model]`` inside the model):

* ``resid_pre``  - input of decoder block l (equals ``hidden_states[l]`` of HF outputs)
* ``resid_post`` - output of decoder block l (equals ``hidden_states[l + 1]`` for l < L-1)
* ``attn_out``   - what the attention (or linear-attention) sublayer adds to the stream
* ``mlp_out``    - what the MLP / MoE sublayer adds to the stream

Positions: ``last`` (the last prompt token), ``post_instruction`` (the chat template's
tokens after the instruction, e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``), ``all``
(every non-padding token).

Prompts are sorted by length and left-padded in batches with explicit position ids, so a
batched capture equals capturing each prompt alone. All requested layers are recorded in
one forward pass through the decoder only (the unembedding is skipped), and the pass stops
after the deepest requested layer. Hooks are removed in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from probes.layout import ResidualLayout

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
Positions = Literal["last", "post_instruction", "all"]
SITES: tuple[Site, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")
POSITIONS: tuple[Positions, ...] = ("last", "post_instruction", "all")

Selector = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Activations:
    """Captured activations, in the order the prompts were given.

    ``data`` is ``[n, L, d]`` for ``last``, ``[n, k, L, d]`` for ``post_instruction`` and
    ``[total_tokens, L, d]`` for ``all`` (``lengths[i]`` tokens per prompt, concatenated).
    ``layers[j]`` is the model layer stored at index j of the L axis.
    """

    site: str
    positions: str
    layers: tuple[int, ...]
    data: torch.Tensor
    lengths: torch.Tensor | None = None

    def layer(self, layer: int) -> torch.Tensor:
        """The activations of one model layer: ``[n, d]`` (or ``[n, k, d]`` / ``[T, d]``)."""
        j = self.layers.index(layer)
        return self.data[..., j, :]

    def numpy(self) -> Any:
        return self.data.float().numpy()


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the deepest layer is recorded."""


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output)}")


def _store_hook(sink: list[torch.Tensor], select: Selector) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        sink.append(select(_first(output)).detach().to("cpu", torch.float32))

    return hook


def _store_pre_hook(sink: list[torch.Tensor], select: Selector) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        sink.append(select(hidden).detach().to("cpu", torch.float32))

    return hook


def _stop_hook() -> Callable[..., None]:
    def hook(*_args: Any) -> None:
        raise _StopForward

    return hook


def site_module(layout: ResidualLayout, site: Site, layer: int) -> nn.Module:
    if site in ("resid_pre", "resid_post"):
        return layout.blocks[layer]
    if site == "attn_out":
        return layout.attn_out_modules[layer]
    if site == "mlp_out":
        return layout.mlp_out_modules[layer]
    raise ValueError(f"unknown site {site!r}; choose one of {SITES}")


@contextmanager
def recording(
    layout: ResidualLayout,
    site: Site,
    layers: Sequence[int],
    select: Selector,
    stop_after: bool = False,
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Hooks that append ``select(activation)`` per layer to the yielded dict of lists.

    With ``stop_after`` the forward pass ends right after the deepest layer is recorded
    (raise :class:`_StopForward`, caught by :func:`capture`).
    """
    sinks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    try:
        for layer in layers:
            mod = site_module(layout, site, layer)
            if site == "resid_pre":
                handles.append(
                    mod.register_forward_pre_hook(
                        _store_pre_hook(sinks[layer], select), with_kwargs=True
                    )
                )
            else:
                handles.append(mod.register_forward_hook(_store_hook(sinks[layer], select)))
        if stop_after and layers:
            deepest = max(layers)
            if site == "resid_pre":
                # Registered after the store hook of the same block, so it runs after it.
                handles.append(layout.blocks[deepest].register_forward_pre_hook(_stop_hook()))
            elif deepest < layout.n_layers - 1:
                handles.append(layout.blocks[deepest].register_forward_hook(_stop_hook()))
        yield sinks
    finally:
        for h in handles:
            h.remove()


def left_pad_batch(
    tokenizer: Any, texts: Sequence[str], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` left-padded, with position ids that ignore the padding."""
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, padding_side="left",
        add_special_tokens=False,
    )
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": pos.to(device),
    }


def _length_order(tokenizer: Any, texts: Sequence[str]) -> tuple[list[int], list[int]]:
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return order, lengths


def _selector(positions: Positions, k: int, mask: torch.Tensor) -> Selector:
    """Which positions of a left-padded ``[batch, pos, d]`` activation to keep."""
    if positions == "last":
        return lambda h: h[:, -1, :]  # [batch, d]
    if positions == "post_instruction":
        return lambda h: h[:, -k:, :]  # [batch, k, d]
    return lambda h: h[mask.to(h.device)]  # [tokens, d]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def capture(
    layout: ResidualLayout,
    tokenizer: Any,
    prompts: Sequence[str],
    site: Site = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Positions = "last",
    n_post_instruction: int = 1,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Activations:
    """Activations of already chat-formatted ``prompts`` at ``site`` for ``layers``.

    ``progress(done, total)`` is called after each batch.
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    chosen = layout.check_layers(list(range(layout.n_layers)) if layers is None else list(layers))
    if not prompts:
        raise ValueError("no prompts to capture")
    device = model_device(layout.decoder)
    order, lengths = _length_order(tokenizer, prompts)
    k = n_post_instruction

    batch_lengths: list[torch.Tensor] = []
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = left_pad_batch(tokenizer, [prompts[i] for i in idx], device)
        mask = batch["attention_mask"].bool()
        select = _selector(positions, k, mask)
        if positions == "all":
            batch_lengths.append(mask.sum(-1).cpu())
        with (recording(layout, site, chosen, select, stop_after=True) as sinks,
              contextlib.suppress(_StopForward)):
            layout.decoder(**batch, use_cache=False)
        for layer in chosen:
            per_layer[layer].extend(sinks[layer])
        done += len(idx)
        if progress is not None:
            progress(done, len(order))

    stacked = torch.stack([torch.cat(per_layer[layer], 0) for layer in chosen], dim=-2)
    if positions == "all":
        lens = torch.cat(batch_lengths)  # in sorted order
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=lens.dtype), lens]), 0)
        pieces: list[torch.Tensor] = [torch.empty(0)] * len(order)
        for sorted_pos, original in enumerate(order):
            pieces[original] = stacked[offsets[sorted_pos] : offsets[sorted_pos + 1]]
        data = torch.cat(pieces, 0)
        lengths_t = torch.tensor([lengths[i] for i in range(len(prompts))])
        return Activations(site, positions, tuple(chosen), data, lengths_t)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Activations(site, positions, tuple(chosen), stacked[inverse])
