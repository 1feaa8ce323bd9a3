"""Interventions on the residual stream; every one is a context manager.

* :func:`steer` adds ``alpha * v_l`` to the input of decoder block l (``resid_pre``) at every
  position, prompt and generated tokens alike, for each layer of a :class:`SteeringPlan`;
  a plan with ``site="attn_out"`` adds it to what block l's attention writes into the
  residual stream instead (after the attention, so block l's attention does not see it and
  its MLP does).
* :class:`RowSteering` runs several plans in one batch: each prompt row is steered by its
  own plan (``generate(..., rows=...)`` keeps the rows and their plans in step).
* :func:`ablate_direction` removes the component along a unit direction from every write
  into the residual stream (token embedding, attention and MLP outputs), which is what
  weight orthogonalisation does permanently (see probes.abliteration).

On exit (normal or exception) every hook is removed, so the model is left as found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from probes.capture import model_device, on_device_of
from probes.layout import ResidualLayout, hidden_state_of

Units = Literal["raw", "ratio"]
SteerSite = Literal["resid_pre", "attn_out"]
STEER_SITES: tuple[SteerSite, ...] = ("resid_pre", "attn_out")


@dataclass(frozen=True)
class SteeringPlan:
    """Per-layer steering vectors and strengths.

    ``vectors[l]`` is added ``alphas[l]`` times at the input of block l (``site`` =
    ``resid_pre``) or to the output of block l's attention (``attn_out``). Build plans with
    :func:`plan_raw` (the seed's unit: alpha times the unnormalised mean difference) or
    :func:`plan_ratio` (alpha is the perturbation ratio ||alpha v|| / mean ||h_l||).
    """

    vectors: Mapping[int, torch.Tensor]  # [d_model] each
    alphas: Mapping[int, float]
    units: Units = "raw"
    site: SteerSite = "resid_pre"

    def __post_init__(self) -> None:
        if self.site not in STEER_SITES:
            raise ValueError(f"steering site {self.site!r} is not one of {STEER_SITES}")

    def scaled(self, factor: float) -> SteeringPlan:
        return SteeringPlan(self.vectors, {k: a * factor for k, a in self.alphas.items()},
                            self.units, self.site)

    def at_site(self, site: SteerSite) -> SteeringPlan:
        """The same vectors and strengths added at ``site``."""
        return SteeringPlan(self.vectors, self.alphas, self.units, site)

    def total_perturbation(self) -> float:
        """Sum over layers of ||alpha_l v_l||: compares plans with different layer counts."""
        return float(sum(abs(self.alphas[k]) * float(self.vectors[k].norm())
                         for k in self.vectors))


def plan_raw(directions: Mapping[int, torch.Tensor], alpha: float | Mapping[int, float]
             ) -> SteeringPlan:
    """alpha times the given (unnormalised) directions, e.g. r_l = mu_H - mu_B."""
    alphas = dict(alpha) if isinstance(alpha, Mapping) else {k: alpha for k in directions}
    return SteeringPlan(dict(directions), alphas, "raw")


def plan_ratio(
    directions: Mapping[int, torch.Tensor],
    mean_norms: Mapping[int, float],
    ratio: float | Mapping[int, float],
) -> SteeringPlan:
    """Unit directions scaled by the mean activation norm, so alpha is a perturbation ratio."""
    vectors = {k: v / v.norm() * float(mean_norms[k]) for k, v in directions.items()}
    alphas = dict(ratio) if isinstance(ratio, Mapping) else {k: ratio for k in directions}
    return SteeringPlan(vectors, alphas, "ratio")


def _add_pre_hook(delta: torch.Tensor) -> Callable[..., Any]:
    """Add ``delta`` (float32) to the block's input, cast to the input's device and dtype."""
    memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            hidden = args[0]
            return (hidden + on_device_of(delta, hidden, memo), *args[1:]), kwargs
        kwargs = dict(kwargs)
        hidden = kwargs["hidden_states"]
        kwargs["hidden_states"] = hidden + on_device_of(delta, hidden, memo)
        return args, kwargs

    return hook


def _add_output_hook(delta: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """Add ``delta(hidden)`` to a module's output hidden state (a tensor or a tuple's first
    element), keeping the rest of the output as it was."""

    def hook(_m: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = hidden_state_of(output)
        new = hidden + delta(hidden)
        if isinstance(output, torch.Tensor):
            return new
        return (new, *output[1:])

    return hook


def _constant_delta(delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    return lambda hidden: on_device_of(delta, hidden, memo)


def _register_add(layout: ResidualLayout, site: SteerSite, layer: int,
                  delta: torch.Tensor) -> Any:
    """Hook that adds ``delta`` at ``site`` of ``layer``; returns its handle."""
    if site == "attn_out":
        return layout.attn_out_modules[layer].register_forward_hook(
            _add_output_hook(_constant_delta(delta)))
    return layout.blocks[layer].register_forward_pre_hook(_add_pre_hook(delta),
                                                          with_kwargs=True)


@contextmanager
def steer(layout: ResidualLayout, plan: SteeringPlan) -> Iterator[SteeringPlan]:
    """Add the plan's vectors at their site (block input, or attention output) while the
    context is open."""
    layers = layout.check_layers(list(plan.vectors))
    handles = []
    try:
        for layer in layers:
            alpha = float(plan.alphas.get(layer, 0.0))
            if alpha == 0.0:
                continue  # alpha = 0 is exactly no intervention
            delta = (alpha * plan.vectors[layer]).to(torch.float32)  # placed by the hook
            handles.append(_register_add(layout, plan.site, layer, delta))
        yield plan
    finally:
        for h in handles:
            h.remove()


class RowSteering:
    """Several steering plans at once: prompt ``i`` of a :func:`probes.generation.generate`
    call is steered by ``plans[groups[i]]``.

    Open it as a context manager around ``generate(model, tokenizer, prompts, n,
    rows=row_steering)``: ``generate`` sets :attr:`index` (the plan of every row of the batch
    being computed) before each forward pass and follows it when ended rows leave the batch;
    the hook at block l adds ``alpha_g * v_l`` of each row's plan g to that row (every
    position), at the plan's site (block input, or attention output). A plan without layer
    l, or with alpha 0 there, adds exactly zero to its rows.
    Each row's numbers are those :func:`steer` with its plan gives (same float32 delta cast
    to the hidden dtype); replies differ from one-plan-per-batch generation at most by the
    rounding of a different batch composition (tested equal on tiny models). Generating every
    plan of an alpha sweep in shared batches cuts the passes over the weights by the number
    of plans that fit in one batch.
    """

    def __init__(self, layout: ResidualLayout, plans: Sequence[SteeringPlan],
                 groups: Sequence[int]) -> None:
        if not plans:
            raise ValueError("RowSteering needs at least one plan")
        g = torch.as_tensor(list(groups), dtype=torch.long)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= len(plans)):
            raise ValueError(f"groups must index the {len(plans)} plans, got values "
                             f"{int(g.min())}..{int(g.max())}")
        self.layout = layout
        # (site, layer) -> [n_plans, d_model] float32: each plan's delta there (zero rows
        # for plans that add nothing at that site and layer)
        self.tables: dict[tuple[SteerSite, int], torch.Tensor] = {}
        for site in STEER_SITES:
            wanted = sorted({k for plan in plans if plan.site == site for k in plan.vectors
                             if float(plan.alphas.get(k, 0.0)) != 0.0})
            for key, layer in zip(wanted, layout.check_layers(wanted), strict=True):
                table = self.tables.setdefault(
                    (site, layer), torch.zeros(len(plans), layout.d_model,
                                               dtype=torch.float32))
                for i, plan in enumerate(plans):
                    alpha = float(plan.alphas.get(key, 0.0))
                    if plan.site == site and key in plan.vectors and alpha != 0.0:
                        table[i] += (alpha * plan.vectors[key]).to(torch.float32)
        self.groups = g.to(model_device(layout.decoder))  # where generate builds its index
        self.index: torch.Tensor | None = None  # [batch] plan of each row; set by generate
        self._handles: list[Any] = []

    def _rows(self, site: SteerSite, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``hidden -> [batch, 1, d]``: each row's delta at (site, layer), on the hidden
        state's device and in its dtype."""
        table = self.tables[(site, layer)]
        tables: dict[torch.device, torch.Tensor] = {}

        def rows(hidden: torch.Tensor) -> torch.Tensor:
            index = self.index
            if index is None or index.shape[0] != hidden.shape[0]:
                raise RuntimeError(
                    "RowSteering hooks ran without a matching row index: pass the same object "
                    "as generate(..., rows=...) (got index "
                    f"{None if index is None else tuple(index.shape)} for a batch of "
                    f"{hidden.shape[0]})")
            if hidden.device not in tables:
                tables[hidden.device] = table.to(hidden.device)
            picked = tables[hidden.device].index_select(0, index.to(hidden.device))
            return picked.to(hidden.dtype).unsqueeze(1)

        return rows

    def _hook(self, layer: int) -> Callable[..., Any]:
        """Add each row's plan at the input of block ``layer``."""
        rows = self._rows("resid_pre", layer)

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            new = hidden + rows(hidden)
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def __enter__(self) -> RowSteering:
        try:
            for site, layer in self.tables:
                if site == "attn_out":
                    handle = self.layout.attn_out_modules[layer].register_forward_hook(
                        _add_output_hook(self._rows(site, layer)))
                else:
                    handle = self.layout.blocks[layer].register_forward_pre_hook(
                        self._hook(layer), with_kwargs=True)
                self._handles.append(handle)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.index = None


def _project_out_hook(unit: torch.Tensor) -> Callable[..., Any]:
    """Project ``unit`` out of the module's output, on that output's device and dtype."""
    memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(_m: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = hidden_state_of(output)
        u = on_device_of(unit, hidden, memo)
        new = hidden - (hidden @ u).unsqueeze(-1) * u
        if isinstance(output, torch.Tensor):
            return new
        return (new, *output[1:])

    return hook


@contextmanager
def ablate_direction(
    layout: ResidualLayout,
    direction: torch.Tensor,
    layers: Sequence[int] | None = None,
    include_embedding: bool = True,
) -> Iterator[None]:
    """Remove ``direction`` from every residual write (of ``layers``; default all)."""
    unit = (direction / direction.norm()).to(torch.float32)  # placed by the hook
    chosen = range(layout.n_layers) if layers is None else layout.check_layers(list(layers))
    modules: list[nn.Module] = [layout.embedding] if include_embedding else []
    for layer in chosen:
        modules += [layout.attn_out_modules[layer], layout.mlp_out_modules[layer]]
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(_project_out_hook(unit)))
        yield
    finally:
        for h in handles:
            h.remove()


def count_hooks(module: nn.Module) -> int:
    """All forward (pre-)hooks registered anywhere under ``module`` (for leak tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
