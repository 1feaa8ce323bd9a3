"""Record activations at named sites, batched, in one forward pass.

Residual-stream sites (:data:`SITES`, each ``[batch, pos, d_model]`` inside the model):

* ``resid_pre``  - input of decoder block l (equals ``hidden_states[l]`` of HF outputs)
* ``resid_post`` - output of decoder block l (equals ``hidden_states[l + 1]`` for l < L-1)
* ``attn_out``   - what the attention (or linear-attention) sublayer adds to the stream
* ``mlp_out``    - what the MLP / MoE sublayer adds to the stream

Attention-value site (``[batch, pos, n_kv_heads * head_dim]``):

* ``attn_v``     - the output of layer l's ``v_proj``: the values every query of the layer
  attends over, flattened head-major (KV head h holds columns ``h*head_dim`` to
  ``(h+1)*head_dim``; :meth:`Activations.heads` gives ``[..., n_kv_heads, head_dim]``).
  Before any value norm, and before grouped-query heads are repeated. Only layers with a
  ``v_proj`` have it: the linear-attention layers of hybrid models (Qwen3-Next) fuse their
  values into one input projection and are left out by default; naming one is a
  :class:`~probes.errors.SiteUnavailable` error that lists the layers that have the site.

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
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from probes.errors import SiteUnavailable
from probes.kernels import few_row_linears
from probes.layout import ResidualLayout, hidden_state_of
from probes.packing import packed_mlps
from probes.timing import timed

Site = Literal["resid_pre", "resid_post", "attn_out", "mlp_out", "attn_v"]
Positions = Literal["last", "post_instruction", "all"]
SITES: tuple[Site, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")  # d_model wide
CAPTURE_SITES: tuple[Site, ...] = (*SITES, "attn_v")
POSITIONS: tuple[Positions, ...] = ("last", "post_instruction", "all")

Selector = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Activations:
    """Captured activations, in the order the prompts were given.

    ``data`` is ``[n, L, d]`` for ``last``, ``[n, k, L, d]`` for ``post_instruction`` and
    ``[total_tokens, L, d]`` for ``all`` (``lengths[i]`` tokens per prompt, concatenated).
    ``layers[j]`` is the model layer stored at index j of the L axis. ``d`` is d_model for
    the residual sites and ``n_kv_heads * head_dim`` for ``attn_v``.
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

    def heads(self, head_dim: int) -> torch.Tensor:
        """``data`` with its last axis split per head: ``[..., L, d // head_dim, head_dim]``
        (for ``attn_v``: one row per key/value head, e.g. ``layout.head_dim``)."""
        d = self.data.shape[-1]
        if head_dim <= 0 or d % head_dim:
            raise ValueError(f"width {d} does not split into heads of {head_dim}")
        return self.data.reshape(*self.data.shape[:-1], d // head_dim, head_dim)

    def prompt_means(self) -> torch.Tensor:
        """``[n, L, d]``: each prompt's activations averaged over its tokens (``all`` only)."""
        if self.positions != "all" or self.lengths is None:
            raise ValueError(f"prompt_means needs positions 'all', not {self.positions!r}")
        pieces = torch.split(self.data, [int(n) for n in self.lengths])
        return torch.stack([rows.mean(0) for rows in pieces])


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the deepest layer is recorded."""


def _store_hook(sink: list[torch.Tensor], select: Selector) -> Callable[..., None]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        sink.append(select(hidden_state_of(output)).detach().to("cpu", torch.float32))

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
    if site == "attn_v":
        return layout.value_module(layer)
    raise ValueError(f"unknown site {site!r}; choose one of {CAPTURE_SITES}")


def site_layers(layout: ResidualLayout, site: Site) -> list[int]:
    """Every layer that has ``site``: all of them, except for ``attn_v`` the layers without
    a value projection (linear attention)."""
    if site != "attn_v":
        return list(range(layout.n_layers))
    layers = layout.value_layers()
    if not layers:
        raise SiteUnavailable(
            f"no layer of this {layout.model_type} model has an attention value projection "
            "(v_proj) to capture at site 'attn_v'",
            f"capture one of the residual sites {', '.join(SITES)}",
        )
    return layers


def check_site_layers(layout: ResidualLayout, site: Site, layers: Sequence[int]) -> list[int]:
    """Validated, normalised ``layers`` that all have ``site`` (an error naming the first
    that does not, and the layers that do)."""
    chosen = layout.check_layers(list(layers))
    if site == "attn_v":
        for layer in chosen:
            layout.value_module(layer)
    return chosen


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
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return split_prefix_batch(rows, 0, pad_id(tokenizer), device)


def pad_id(tokenizer: Any) -> int:
    """The id put in padding positions (masked out, so any valid id would do)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every row."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


def prefix_sharing_supported(model: Any) -> bool:
    """Prefix KV sharing needs a plain attention cache (no recurrent/linear-attention state,
    no sliding window shorter than the context)."""
    cfg = getattr(model, "config", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return not getattr(cfg, "use_sliding_window", False)


def cache_kwarg(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by: ``cache`` from transformers 5.24
    on, ``past_key_values`` before (5.24 still accepts the old name with a deprecation
    warning; it goes in 5.40)."""
    cls = type(module)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


_CACHE_KWARG: dict[type, str] = {}


def with_cache(module: nn.Module, cache: Any) -> dict[str, Any]:
    """``{<the module's cache keyword>: cache}``, to splat into a forward call."""
    return {cache_kwarg(module): cache}


def prefix_kv_cache(decoder: nn.Module, prefix: torch.Tensor, rows: int) -> Any:
    """A KV cache holding ``prefix`` (``[1, p]`` token ids) once per row, computed once."""
    from transformers import DynamicCache

    config: Any = decoder.config
    cache = DynamicCache(config=config)
    decoder(input_ids=prefix, attention_mask=torch.ones_like(prefix),
            **with_cache(decoder, cache), use_cache=True)
    cache.batch_repeat_interleave(rows)
    return cache


@timed("prefill")
def last_position_logits(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], device: torch.device | str
) -> torch.Tensor:
    """``[len(texts), vocab]`` float32 logits at the last position of each text, one batch.

    The token prefix the texts share (a chat template's system turn) is run once and its KV
    cache repeated over the rows when the architecture allows it
    (:func:`prefix_sharing_supported`); the rows are then padded between prefix and suffix
    so every token keeps its position. Whatever hooks are open see the prefix pass too.
    """
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    model_any: Any = model
    p = (common_prefix_len(rows) if len(rows) > 1 and prefix_sharing_supported(model_any)
         else 0)
    p = min(p, min(len(r) for r in rows) - 1)
    batch = split_prefix_batch(rows, p, pad_id(tokenizer), device)
    if p <= 0:
        with packed_mlps(model, batch["attention_mask"]):
            try:
                with few_row_linears(model):  # the output head sees one row per text
                    out = model_any(**batch, use_cache=False, logits_to_keep=1)
            except TypeError:  # a model class without ``logits_to_keep``
                out = model_any(**batch, use_cache=False)
    else:
        cache = prefix_kv_cache(model_any.get_decoder(), batch["input_ids"][:1, :p], len(rows))
        with few_row_linears(model), packed_mlps(model, batch["attention_mask"][:, p:]):
            out = model_any(input_ids=batch["input_ids"][:, p:],
                            attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"][:, p:],
                            **with_cache(model_any, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()  # type: ignore[no-any-return]


def split_prefix_batch(
    rows: Sequence[Sequence[int]], p: int, pad: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Rows of token ids as ``[prefix | left padding | own suffix]``.

    Returns ``input_ids`` ``[b, width]`` (the prefix columns hold the shared prefix),
    ``attention_mask`` ``[b, width]`` and ``position_ids`` ``[b, width]`` counting only real
    tokens, so every token keeps the position it has in its own unpadded prompt.
    """
    b, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):
        suffix = r[p:]
        input_ids[i, :p] = torch.tensor(r[:p], dtype=torch.long)
        input_ids[i, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[i, :p] = 1
        mask[i, width - len(suffix):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}


def _length_order(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _selector(positions: Positions, k: int, mask: torch.Tensor) -> Selector:
    """Which positions of a left-padded ``[batch, pos, d]`` activation to keep."""
    if positions == "last":
        return lambda h: h[:, -1, :]  # [batch, d]
    if positions == "post_instruction":
        return lambda h: h[:, -k:, :]  # [batch, k, d]
    return lambda h: h[mask.to(h.device)]  # [tokens, d]


def model_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its first parameter that holds data.

    With an accelerate ``device_map`` that offloads blocks (to disk, or to the CPU with
    ``meta`` placeholders on the accelerator), the first parameter may be a ``meta``
    placeholder; accelerate's hooks move each block's inputs to its execution device.
    """
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def on_device_of(t: torch.Tensor, like: torch.Tensor,
                 memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """``t`` on the device and in the dtype of ``like`` (a hooked module's hidden state),
    not of the model's first parameter: blocks placed by a ``device_map`` live on
    different devices. ``memo`` keeps one copy per (device, dtype) for hooks called every
    forward pass."""
    key = (like.device, like.dtype)
    if memo is not None and key in memo:
        return memo[key]
    out = t.to(device=like.device, dtype=like.dtype)
    if memo is not None:
        memo[key] = out
    return out


@timed("prefill")
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
    share_prefix: bool | None = None,
) -> Activations:
    """Activations of already chat-formatted ``prompts`` at ``site`` for ``layers`` (by
    default every layer that has the site: :func:`site_layers`).

    ``progress(done, total)`` is called after each batch. ``share_prefix`` (default: for
    ``last`` and ``post_instruction`` positions on plain-attention models) runs the token
    prefix a batch shares (the chat template's system turn) once and feeds only each
    prompt's own suffix after its cached keys and values: the same activations up to
    floating-point rounding (``tests/foundation/test_capture.py``), for about half the work
    on short chat prompts.
    """
    if site not in CAPTURE_SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {', '.join(CAPTURE_SITES)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    chosen = (site_layers(layout, site) if layers is None
              else check_site_layers(layout, site, layers))
    if not prompts:
        raise ValueError("no prompts to capture")
    device = model_device(layout.decoder)
    all_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in all_ids]
    order = _length_order(lengths)
    k = n_post_instruction
    if share_prefix is None:
        share_prefix = positions != "all" and prefix_sharing_supported(layout.decoder)
    elif share_prefix and positions == "all":
        raise ValueError("share_prefix needs positions 'last' or 'post_instruction': 'all' "
                         "records the prefix tokens too")
    keep = k if positions == "post_instruction" else 1  # suffix tokens the selector reads
    pad = pad_id(tokenizer)

    batch_lengths: list[torch.Tensor] = []
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [all_ids[i] for i in idx]
        p = common_prefix_len(rows) if share_prefix and len(rows) > 1 else 0
        p = max(0, min(p, min(len(r) for r in rows) - keep))
        batch = split_prefix_batch(rows, p, pad, device)
        cache = None
        if p > 0:
            cache = prefix_kv_cache(layout.decoder, batch["input_ids"][:1, :p], len(rows))
            batch = {"input_ids": batch["input_ids"][:, p:], "attention_mask":
                     batch["attention_mask"], "position_ids": batch["position_ids"][:, p:]}
        mask = batch["attention_mask"].bool()
        select = _selector(positions, k, mask)
        if positions == "all":
            batch_lengths.append(mask.sum(-1).cpu())
        fed = batch["input_ids"].shape[1]
        with (recording(layout, site, chosen, select, stop_after=True) as sinks,
              packed_mlps(layout.decoder, mask[:, -fed:]),
              contextlib.suppress(_StopForward)):
            layout.decoder(**batch, **with_cache(layout.decoder, cache),
                           use_cache=cache is not None)
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
