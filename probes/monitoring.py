"""Per-token monitoring: project every generated token's activation on a direction.

The projections are read *during* generation by forward hooks, so monitoring costs no
second forward pass. Generation runs the prompt through the model (the prefill,
``[batch, prompt_len, d]`` at every site; :func:`probes.generation.generate` may first run
the prefix shared by a batch once, ``[1, prefix_len, d]``) and then one forward per new token
(``[batch, 1, d]``). At each forward the hooks take the activation at the last position,
``[batch, d]``, and project it on the unit direction of each monitored layer. A row's
trajectory is therefore indexed by *steps*:

* step 0: the last prompt token (its activation produced the first generated token t_1);
* step k >= 1: the k-th generated token t_k read back as input (its activation produced
  t_{k+1}).

A reply of m generated tokens (stop token included, as ``Generations.new_tokens`` counts
them) has m steps, 0 .. m-1: the activation of the final token t_m is never computed,
because ``generate`` stops after sampling it. In a batch, rows that finished early leave
it when ``generate`` is told to report that to the monitor
(``generate(..., follow=mon.keep)``, as :func:`generate_monitored` does); the monitor then
maps each row of the narrower batch back to its prompt. Without ``follow``, generate with
``drop_finished=False``: ended rows are fed pad tokens until the longest row ends, and
those steps are cut away. Step 0 at site
``resid_pre`` of layer l is the same number as a separate capture of ``resid_pre`` at the
last prompt position (see ``tests/unit/test_monitoring.py``).

Rows are matched to prompts by their token ids: the monitor keeps the ids every decoder
call fed (and the attention mask), and a row's step 0 is the forward after which its
unmasked tokens spell a whole prompt. It therefore does not need to know how ``generate``
sorted, padded and batched the prompts.

Usage::

    with monitor(lm.layout, {12: unit_12, 16: unit_16}, site="resid_pre") as mon:
        gens = generate(lm.model, lm.tokenizer, formatted, 48)
    trajs = mon.trajectories(lm.tokenizer, formatted, gens.new_tokens)
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from probes.capture import (
    SITES,
    Site,
    common_prefix_len,
    model_device,
    pad_id,
    prefix_kv_cache,
    prefix_sharing_supported,
    site_module,
    split_prefix_batch,
    with_cache,
)
from probes.generation import Generations, generate
from probes.layout import ResidualLayout, hidden_state_of
from probes.packing import packed_mlps

__all__ = [
    "CODE_LINE_PATTERN",
    "TokenMonitor",
    "Trajectory",
    "forced_trajectories",
    "generate_monitored",
    "is_code_answer",
    "monitor",
    "window_mean",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)  # holds an array: compare fields explicitly
class Trajectory:
    """The monitored projections of one reply.

    ``token_ids[k]`` is the input token of step k (step 0: the last prompt token; step
    k >= 1: the k-th generated token); ``projections`` is ``[steps, len(layers)]``.
    """

    prompt_index: int
    layers: tuple[int, ...]
    token_ids: tuple[int, ...]
    projections: FloatArray

    @property
    def n_steps(self) -> int:
        return len(self.token_ids)

    def layer(self, layer: int) -> FloatArray:
        """The trajectory of one monitored layer: ``[steps]``."""
        return np.asarray(self.projections[:, self.layers.index(layer)], dtype=np.float64)

    def tokens(self, tokenizer: Any) -> list[str]:
        """The input token of each step as text (special tokens included)."""
        return [tokenizer.decode([t]) for t in self.token_ids]


@dataclass
class _Call:
    """One forward of the decoder: the ids it fed and what the hooks projected."""

    token_ids: torch.Tensor  # [batch, t] the ids fed by this call
    mask_length: int  # columns of its attention mask: cached + fed positions
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch]
    rows: tuple[int, ...] | None = None  # the segment row of each batch row (None: all)


@dataclass
class _Segment:
    """The forwards of one generation, from an empty KV cache on."""

    calls: list[_Call] = field(default_factory=list)
    final_mask: torch.Tensor | None = None  # [batch, T] the last call's attention mask
    alive: list[int] | None = None  # segment rows still in the batch (after rows left)
    left: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> its last mask


class TokenMonitor:
    """Hooks that record per-step projections at ``site`` for the given layers.

    ``directions`` maps a layer to a ``[d_model]`` vector (pass unit vectors: the
    projection is the plain dot product). Use :meth:`hooks` (or :func:`monitor`) around one
    or more ``generate`` calls, then :meth:`trajectories`.

    How forwards are grouped: every decoder call must pass ``input_ids`` and either a
    2-D ``attention_mask`` over the cached and the fed positions or none (all positions
    real; the cache then tells how many are cached), as ``generate`` does. A call with
    nothing cached starts a new generation; a later call continues it. A batch of one row
    followed by a wider batch is a prompt prefix whose cache was repeated over the batch
    (the prefix sharing of :func:`probes.generation.generate`).
    """

    def __init__(
        self,
        layout: ResidualLayout,
        directions: Mapping[int, torch.Tensor],
        site: Site = "resid_post",
    ) -> None:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
        if not directions:
            raise ValueError("monitor needs at least one layer direction")
        layers = layout.check_layers(list(directions))
        if len(set(layers)) != len(layers):
            raise ValueError("a layer is given twice (e.g. as 23 and -1)")
        self.layout = layout
        self.site: Site = site
        self.layers: tuple[int, ...] = tuple(sorted(layers))
        self._dirs: dict[int, torch.Tensor] = {}
        for given, layer in zip(directions, layers, strict=True):
            v = torch.as_tensor(directions[given]).detach().reshape(-1)
            if v.numel() != layout.d_model:
                raise ValueError(
                    f"direction for layer {given} has {v.numel()} entries, the model has "
                    f"d_model = {layout.d_model}"
                )
            self._dirs[layer] = v
        self.segments: list[_Segment] = []
        self.n_forwards = 0
        self._problem: str | None = None

    # ---- hooks ---------------------------------------------------------------------------
    def _decoder_hook(self) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.n_forwards += 1
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, torch.Tensor):
                self._problem = ("a decoder call without input_ids: its rows cannot be matched "
                                 "to prompts")
                return
            batch, fed = ids.shape[0], ids.shape[1]
            mask = kwargs.get("attention_mask")
            # "cache" from transformers 5.24 on, "past_key_values" before
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                full = mask.detach().to("cpu", torch.bool)
            elif mask is None:  # generate drops an all-ones mask: every position is real
                length = getattr(cache, "get_seq_length", None)
                past = int(length()) if callable(length) else 0
                full = torch.ones((batch, past + fed), dtype=torch.bool)
            else:
                self._problem = "a decoder call with a non 2-D attention mask"
                return
            if full.shape[1] == fed or not self.segments:  # empty cache: a new generation
                self.segments.append(_Segment())
            seg = self.segments[-1]
            rows = None if seg.alive is None else tuple(seg.alive)
            seg.calls.append(_Call(ids.detach().to("cpu", torch.long), int(full.shape[1]),
                                   rows=rows))
            seg.final_mask = full

        return hook

    def keep(self, kept: torch.Tensor) -> None:
        """Rows left the running batch: only the batch rows ``kept`` continue.

        Pass this as ``generate(..., follow=monitor.keep)`` so that generation may drop
        rows that have ended: the monitor then knows which prompt each row of a narrower
        batch belongs to.
        """
        if not self.segments or self.segments[-1].final_mask is None:
            return
        seg = self.segments[-1]
        assert seg.final_mask is not None
        current = seg.alive if seg.alive is not None else list(range(seg.final_mask.shape[0]))
        keep = [int(i) for i in kept.tolist()]
        for i in sorted(set(range(len(current))) - set(keep)):
            seg.left[current[i]] = seg.final_mask[i]
        seg.alive = [current[i] for i in keep]

    def _store(self, layer: int, hidden: torch.Tensor) -> None:
        if not self.segments or not self.segments[-1].calls:
            return  # a block called outside the decoder's forward: nothing to attach it to
        h = hidden[:, -1, :]  # [batch, d]
        u = self._dirs[layer].to(h.device, torch.float32)  # projections in fp32 at any dtype
        self.segments[-1].calls[-1].projections[layer] = (h.float() @ u).detach().to(
            "cpu", torch.float64)

    def _post_hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._store(layer, hidden_state_of(output))

        return hook

    def _pre_hook(self, layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._store(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    @contextmanager
    def hooks(self) -> Iterator[TokenMonitor]:
        """Attach the hooks for the duration of the block; always removed in ``finally``."""
        handles = []
        try:
            handles.append(self.layout.decoder.register_forward_pre_hook(
                self._decoder_hook(), with_kwargs=True))
            for layer in self.layers:
                mod = site_module(self.layout, self.site, layer)
                if self.site == "resid_pre":
                    handles.append(mod.register_forward_pre_hook(self._pre_hook(layer),
                                                                  with_kwargs=True))
                else:
                    handles.append(mod.register_forward_hook(self._post_hook(layer)))
            yield self
        finally:
            for h in handles:
                h.remove()

    # ---- results -------------------------------------------------------------------------
    def _segment_rows(self, seg: _Segment) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(ids [batch, T], mask [batch, T], end column of every call) of one generation.

        A call made after :meth:`keep` feeds only the rows still running; a row that had
        left gets masked columns from then on (its last attention mask is kept)."""
        batch = max(c.token_ids.shape[0] for c in seg.calls)
        chunks, ends, total = [], [], 0
        for c in seg.calls:
            rows = c.token_ids.shape[0]
            if c.rows is not None:
                if rows != len(c.rows):
                    raise RuntimeError(
                        f"a decoder call fed {rows} rows where {len(c.rows)} were running: "
                        "pass the monitor's keep as generate(..., follow=...)")
                block = torch.zeros((batch, c.token_ids.shape[1]), dtype=torch.long)
                block[list(c.rows)] = c.token_ids
                chunks.append(block)
            elif rows in (1, batch):
                chunks.append(c.token_ids.expand(batch, -1))
            else:
                raise RuntimeError(
                    f"a generation changed its batch from {batch} to {rows} rows, so its rows "
                    "cannot be followed: generate under a monitor with drop_finished=False, or "
                    "pass the monitor's keep as generate(..., follow=...)")
            total += c.token_ids.shape[1]
            if c.mask_length != total:
                raise RuntimeError("a decoder call's attention mask does not cover the cached "
                                   "and fed positions: cannot follow the generation")
            ends.append(total)
        assert seg.final_mask is not None
        if seg.alive is None:
            mask = seg.final_mask.expand(batch, -1)
        else:
            mask = torch.zeros((batch, total), dtype=torch.bool)
            mask[seg.alive] = seg.final_mask
            for row, m in seg.left.items():
                mask[row, : m.shape[0]] = m
        return torch.cat(chunks, dim=1), mask, ends

    def trajectories(
        self, tokenizer: Any, prompts: Sequence[str], new_tokens: Sequence[int]
    ) -> list[Trajectory]:
        """One :class:`Trajectory` per prompt, in the order of ``prompts``.

        ``prompts`` are the chat-formatted texts given to ``generate`` and ``new_tokens``
        its per-prompt token counts (``Generations.new_tokens``): row i is cut at
        ``new_tokens[i]`` steps. A row is matched to the prompt whose token ids its
        unmasked tokens spell when one of its forwards ends (that forward is step 0).
        """
        if len(new_tokens) != len(prompts):
            raise ValueError(f"{len(new_tokens)} token counts for {len(prompts)} prompts")
        if self._problem is not None:
            raise ValueError(self._problem)
        encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        queue: dict[tuple[int, ...], deque[int]] = {}
        for i, ids in enumerate(encoded):
            queue.setdefault(tuple(ids), deque()).append(i)
        out: list[Trajectory | None] = [None] * len(prompts)
        for seg in self.segments:
            missing = [layer for layer in self.layers
                       if any(layer not in c.projections for c in seg.calls)]
            if missing:
                raise RuntimeError(f"monitored layers {missing} were not reached in a forward")
            ids, mask, ends = self._segment_rows(seg)
            for row in range(ids.shape[0]):
                match = self._match_row(ids[row], mask[row], ends, queue)
                if match is None:
                    continue  # a generation of some other prompt list
                i, first = match
                m = int(new_tokens[i])
                if first + m > len(seg.calls):
                    raise ValueError(
                        f"prompt {i} has {m} new tokens but its generation ran only "
                        f"{len(seg.calls) - first} forwards after the prompt: the token counts "
                        "belong to another generation")
                calls = seg.calls[first : first + m]
                proj = [[float(c.projections[layer][self._batch_row(c, row)])
                         for layer in self.layers] for c in calls]
                toks = [int(ids[row, ends[first + k] - 1]) for k in range(m)]
                out[i] = Trajectory(i, self.layers, tuple(toks),
                                    np.asarray(proj, dtype=np.float64).reshape(m, -1))
        absent = [i for i, t in enumerate(out) if t is None]
        if absent:
            raise ValueError(f"the monitor saw no generation for prompts {absent[:10]}")
        return [t for t in out if t is not None]

    @staticmethod
    def _batch_row(call: _Call, row: int) -> int:
        """Where segment row ``row`` sits in the batch of ``call``."""
        if call.rows is not None:
            if row not in call.rows:
                raise RuntimeError(f"row {row} had left the batch before a step it needs: the "
                                   "token counts belong to another generation")
            return call.rows.index(row)
        return min(row, call.token_ids.shape[0] - 1)

    @staticmethod
    def _match_row(
        ids: torch.Tensor, mask: torch.Tensor, ends: list[int],
        queue: dict[tuple[int, ...], deque[int]],
    ) -> tuple[int, int] | None:
        """(prompt index, index of the call that ends the prompt) for one row, or None."""
        for c, end in enumerate(ends):
            key = tuple(ids[:end][mask[:end]].tolist())
            if queue.get(key):
                return queue[key].popleft(), c
        return None


@contextmanager
def monitor(
    layout: ResidualLayout,
    directions: Mapping[int, torch.Tensor],
    site: Site = "resid_post",
) -> Iterator[TokenMonitor]:
    """Monitor every forward of the model inside the block (see the module docstring)."""
    mon = TokenMonitor(layout, directions, site)
    with mon.hooks():
        yield mon


def generate_monitored(
    model: Any,
    tokenizer: Any,
    layout: ResidualLayout,
    prompts: Sequence[str],
    directions: Mapping[int, torch.Tensor],
    max_new_tokens: int,
    site: Site = "resid_post",
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Generations, list[Trajectory]]:
    """:func:`probes.generation.generate` under a monitor: replies and trajectories."""
    with monitor(layout, directions, site) as mon:
        gens = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                        progress=progress, follow=mon.keep)
    return gens, mon.trajectories(tokenizer, prompts, gens.new_tokens)


@torch.inference_mode()
def forced_trajectories(
    layout: ResidualLayout,
    tokenizer: Any,
    prompts: Sequence[str],
    reply_ids: Sequence[Sequence[int]],
    new_tokens: Sequence[int],
    directions: Mapping[int, torch.Tensor],
    site: Site = "resid_post",
    batch_size: int = 32,
) -> list[Trajectory]:
    """The trajectories a :class:`TokenMonitor` would record while generating, read from
    replies already generated by one teacher-forced forward over prompt + reply.

    ``prompts`` are the chat-formatted texts, ``reply_ids[i]`` the ids generation kept
    (``Generations.token_ids``: stop token excluded) and ``new_tokens[i]`` its token count
    (stop token included). Step k of a reply of m tokens reads the input position of the
    last prompt token plus k, for k < m, as the monitor does; the final token is never fed.
    Under causal attention each position's activation depends only on the tokens up to it,
    so these equal the monitored ones up to float rounding (other kernels, batches and
    caches), provided the replies were generated with no intervention beyond the hooks open
    now (``tests/unit/test_monitoring.py``).
    """
    mon = TokenMonitor(layout, directions, site)  # checks layers, directions and site
    if not len(prompts) == len(reply_ids) == len(new_tokens):
        raise ValueError(f"{len(prompts)} prompts, {len(reply_ids)} replies and "
                         f"{len(new_tokens)} token counts: one each per prompt")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    for i, (ids, reply, m) in enumerate(zip(encoded, reply_ids, new_tokens, strict=True)):
        if not 1 <= int(m) <= len(reply) + 1:
            raise ValueError(f"reply {i} has {len(reply)} ids kept for {m} new tokens: the "
                             "token counts belong to another generation")
        rows.append(list(ids) + [int(t) for t in reply[: int(m) - 1]])
    device = model_device(layout.decoder)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[Trajectory | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        proj = _forced_batch(mon, [rows[i] for i in idx], [len(encoded[i]) for i in idx],
                             pad_id(tokenizer), device)
        for b, i in enumerate(idx):
            m = int(new_tokens[i])
            out[i] = Trajectory(i, mon.layers, tuple(rows[i][-m:]),
                                proj[b, -m:, :].numpy().astype(np.float64))
    return [t for t in out if t is not None]


def _forced_batch(mon: TokenMonitor, rows: list[list[int]], prompt_lens: list[int],
                  pad: int, device: torch.device) -> torch.Tensor:
    """Projections ``[batch, fed, layers]`` of one left-padded teacher-forced batch; the
    prefix the rows share (within every prompt) is run once, as generation does."""
    p = common_prefix_len(rows) if len(rows) > 1 and prefix_sharing_supported(
        mon.layout.decoder) else 0
    p = max(0, min(p, min(prompt_lens) - 1))
    batch = split_prefix_batch(rows, p, pad, device)
    cache = None
    if p > 0:
        cache = prefix_kv_cache(mon.layout.decoder, batch["input_ids"][:1, :p], len(rows))
        batch = {"input_ids": batch["input_ids"][:, p:],
                 "attention_mask": batch["attention_mask"],
                 "position_ids": batch["position_ids"][:, p:]}
    sink: dict[int, torch.Tensor] = {}

    def store(layer: int, hidden: torch.Tensor) -> None:
        u = mon._dirs[layer].to(hidden.device, torch.float32)
        sink[layer] = (hidden.float() @ u).detach().to("cpu", torch.float64)  # [batch, fed]

    handles = []
    try:
        for layer in mon.layers:
            mod = site_module(mon.layout, mon.site, layer)
            if mon.site == "resid_pre":
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, a, k, layer=layer: store(layer, a[0] if a else k["hidden_states"]),
                    with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(
                    lambda _m, _i, o, layer=layer: store(layer, hidden_state_of(o))))
        fed = batch["input_ids"].shape[1]
        with packed_mlps(mon.layout.decoder, batch["attention_mask"][:, -fed:]):
            mon.layout.decoder(**batch, **with_cache(mon.layout.decoder, cache),
                               use_cache=cache is not None)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([sink[layer] for layer in mon.layers], dim=-1)


def window_mean(traj: Trajectory, layer: int, start: int = 1, stop: int = 6) -> float:
    """Mean projection over steps ``start .. stop-1`` that the reply has (nan if none).

    The default, steps 1..5, is the first five generated tokens read back as input.
    """
    values = traj.layer(layer)[start:stop]
    return float(values.mean()) if values.size else float("nan")


CODE_LINE_PATTERN = re.compile(
    r"^\s*(?:```|import\s+\w|from\s+[\w.]+\s+import\b|def\s+\w+\s*\(|class\s+\w+\s*[:(]"
    r"|#include\b|(?:public|private|static)\s+\w|function\s+\w+\s*\(|(?:const|let|var)\s+\w+\s*="
    r"|<\?php|<script\b|SELECT\s+.+\s+FROM\b|\$\s)",
    re.MULTILINE,
)
"""A line that opens code: a Markdown fence, an import, a function or class definition, a
C include, a JS declaration, PHP/HTML script tags, SQL or a shell prompt."""


def is_code_answer(text: str) -> bool:
    """True when a reply contains code (a line matching :data:`CODE_LINE_PATTERN`)."""
    return CODE_LINE_PATTERN.search(text) is not None
