"""Interventions on the residual stream; every one is a context manager.

* :func:`steer` adds ``alpha * v_l`` to the input of decoder block l (``resid_pre``) at every
  position, prompt and generated tokens alike, for each layer of a :class:`SteeringPlan`.
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

from probes.capture import _first
from probes.layout import ResidualLayout

Units = Literal["raw", "ratio"]


@dataclass(frozen=True)
class SteeringPlan:
    """Per-layer steering vectors and strengths.

    ``vectors[l]`` is added ``alphas[l]`` times at the input of block l. Build plans with
    :func:`plan_raw` (the seed's unit: alpha times the unnormalised mean difference) or
    :func:`plan_ratio` (alpha is the perturbation ratio ||alpha v|| / mean ||h_l||).
    """

    vectors: Mapping[int, torch.Tensor]  # [d_model] each
    alphas: Mapping[int, float]
    units: Units = "raw"

    def scaled(self, factor: float) -> SteeringPlan:
        return SteeringPlan(self.vectors, {k: a * factor for k, a in self.alphas.items()},
                            self.units)

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
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            hidden = args[0]
            return (hidden + delta.to(hidden.dtype), *args[1:]), kwargs
        kwargs = dict(kwargs)
        hidden = kwargs["hidden_states"]
        kwargs["hidden_states"] = hidden + delta.to(hidden.dtype)
        return args, kwargs

    return hook


@contextmanager
def steer(layout: ResidualLayout, plan: SteeringPlan) -> Iterator[SteeringPlan]:
    """Add the plan's vectors at the input of their blocks while the context is open."""
    layers = layout.check_layers(list(plan.vectors))
    handles = []
    try:
        for layer in layers:
            alpha = float(plan.alphas.get(layer, 0.0))
            if alpha == 0.0:
                continue  # alpha = 0 is exactly no intervention
            block = layout.blocks[layer]
            param = next(block.parameters())
            delta = (alpha * plan.vectors[layer]).to(device=param.device, dtype=torch.float32)
            handles.append(block.register_forward_pre_hook(_add_pre_hook(delta),
                                                           with_kwargs=True))
        yield plan
    finally:
        for h in handles:
            h.remove()


def _project_out_hook(unit: torch.Tensor) -> Callable[..., Any]:
    def hook(_m: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = _first(output)
        u = unit.to(hidden.dtype)
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
    unit = (direction / direction.norm()).to(torch.float32)
    device = next(layout.decoder.parameters()).device
    unit = unit.to(device)
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
