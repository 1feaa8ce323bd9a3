"""Causal localisation of refusal layers: at which layers does the refusal direction move refusal?

For every tested layer l, with r_l = mu_H - mu_B the layer's refusal direction (``resid_pre``,
last prompt token, train split) and r̂_l its unit vector, two arms are run on held-out prompts:

* ablation: harmful prompts with r̂_l projected out of the input of block l (``resid_pre``,
  every position) -- does removing the direction *there* lower refusal?
* addition: harmless prompts with :data:`ADD_ALPHA` * r_l added at the input of block l (every
  position; alpha 1 in the suite's raw steering unit moves the harmless mean onto the harmful
  mean at that layer) -- does adding it *there* raise refusal?

The outcome of each prompt is its **first-token refusal score**
(:func:`probes.judges.refusal_logit_scores`: log-odds of the refusal-opening tokens at the first
generated position, one forward pass, no generation), not a judged reply: judging generated
replies at every layer would cost a generation per layer. Each arm is compared with the same
prompts unsteered by a one-sided Wilcoxon signed-rank test on the per-prompt change (ablation:
the score drops; addition: it rises). The 2 x (layers) p-values are Holm-adjusted together; a
layer is **causal** when either of its arms is significant (adjusted p < :data:`CAUSAL_ALPHA`)
*and* moves the mean score by at least :data:`MIN_EFFECT` in the intended direction. The floor
is needed because an intervention is deterministic: a fixed vector shifts every prompt's
score the same way, so a signed-rank test finds any consistent shift, however small, with
enough prompts.

The **reference causal layer** is the causal layer with the largest combined effect, mean drop
under ablation plus mean rise under addition (log-odds); other experiments judge their
layer-specific claims there. The selection prompts must be disjoint from the prompts those
claims are judged on (:func:`check_disjoint_selection`); when no layer is causal the dependent
claims are not evaluable (:meth:`CausalLayers.no_layer_reason`), never judged at an arbitrary
layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.stats
import torch
from torch import nn

from probes.capture import on_device_of
from probes.errors import PromptSetError
from probes.interventions import plan_raw, steer
from probes.judges import refusal_logit_scores
from probes.layout import ResidualLayout
from probes.stats import holm

__all__ = [
    "ADD_ALPHA",
    "CAUSAL_ALPHA",
    "MIN_EFFECT",
    "CausalLayers",
    "ablate_at_input",
    "arm_scores",
    "causal_layer_test",
    "check_disjoint_selection",
    "signed_rank_p",
    "spaced",
]

ADD_ALPHA = 1.0  # raw units: + r_l moves the harmless mean onto the harmful mean at layer l
CAUSAL_ALPHA = 0.05  # Holm-adjusted, one-sided, over both arms of every tested layer
MIN_EFFECT = math.log(2.0)  # mean change of the refusal log-odds: the odds doubled or halved

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- interventions


def _project_out_pre_hook(unit: torch.Tensor) -> Callable[..., Any]:
    """Remove the component along ``unit`` from a block's input (``resid_pre``)."""
    memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def project(hidden: torch.Tensor) -> torch.Tensor:
        u = on_device_of(unit, hidden, memo)
        return hidden - (hidden @ u).unsqueeze(-1) * u

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (project(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}

    return hook


@contextmanager
def ablate_at_input(layout: ResidualLayout, direction: torch.Tensor, layer: int
                    ) -> Iterator[None]:
    """Project ``direction`` out of the input of block ``layer`` only (every position), so
    later blocks may write it back: the ablation tests that one layer, not the direction
    everywhere (:func:`probes.interventions.ablate_direction` does that)."""
    (block_index,) = layout.check_layers([layer])
    norm = direction.norm()
    if not torch.isfinite(norm) or float(norm) == 0.0:
        raise ValueError(f"the direction of layer {layer} is zero or not finite")
    unit = (direction / norm).to(torch.float32)
    handle = layout.blocks[block_index].register_forward_pre_hook(
        _project_out_pre_hook(unit), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def arm_scores(
    model: Any,
    tokenizer: Any,
    layout: ResidualLayout,
    directions: Mapping[int, torch.Tensor],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    add_alpha: float = ADD_ALPHA,
    batch_size: int = 32,
    token_ids: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """First-token refusal scores of every arm: ``base_harmful`` [n], ``base_harmless`` [m],
    ``ablated`` [layers][n] (harmful, r̂_l removed at block l) and ``added`` [layers][m]
    (harmless, ``add_alpha * r_l`` added at block l), for the chat-formatted prompts given.

    Each arm runs in its own batches (one forward pass per batch, the prompts' shared prefix
    once): the shared-prefix pass is one row for the whole batch, so rows of different arms
    cannot share a batch without losing the intervention on the prefix positions.
    """
    layers = sorted(directions)

    def scores(texts: Sequence[str]) -> list[float]:
        out = refusal_logit_scores(model, tokenizer, texts, batch_size, token_ids)
        return [float(x) for x in out]

    data: dict[str, Any] = {"layers": layers, "base_harmful": scores(harmful),
                            "base_harmless": scores(harmless), "ablated": [], "added": []}
    for i, layer in enumerate(layers):
        if progress is not None:
            progress(f"[causal] layer {layer} ({i + 1}/{len(layers)})")
        v = directions[layer]
        with ablate_at_input(layout, v, layer):
            data["ablated"].append(scores(harmful))
        with steer(layout, plan_raw({layer: v}, add_alpha)):
            data["added"].append(scores(harmless))
    return data


def spaced(layers: Sequence[int], at_most: int) -> list[int]:
    """At most ``at_most`` of ``layers`` (sorted), evenly spaced from the last one down, so
    the deepest layer is always tested; all of them when there are few enough."""
    chosen = sorted(layers)
    if at_most < 1:
        raise ValueError(f"at_most must be >= 1, got {at_most}")
    if len(chosen) <= at_most:
        return chosen
    step = len(chosen) / at_most
    idx = {len(chosen) - 1 - int(k * step) for k in range(at_most)}
    return [chosen[i] for i in sorted(idx)]


# --------------------------------------------------------------------------- the test


def signed_rank_p(change: npt.ArrayLike, alternative: str) -> float:
    """One-sided Wilcoxon signed-rank p of paired per-prompt changes (``"less"``: they tend
    below 0; ``"greater"``: above). Zero changes are dropped (Wilcoxon's rule); 1.0 when every
    change is zero (nothing moved), NaN when there are no prompts."""
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    x = np.asarray(change, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan")
    if not np.all(np.isfinite(x)):
        raise ValueError("per-prompt changes must be finite")
    if not np.any(x != 0.0):
        return 1.0
    res = scipy.stats.wilcoxon(x, zero_method="wilcox", alternative=alternative)
    return float(res.pvalue)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class CausalLayers:
    """Per-layer causal tests of the refusal direction (see the module docstring)."""

    layers: tuple[int, ...]
    base_harmful: FloatArray  # [n]
    ablated: FloatArray  # [k, n]
    base_harmless: FloatArray  # [m]
    added: FloatArray  # [k, m]
    p_ablate: FloatArray  # [k] one-sided: the score drops under ablation
    p_add: FloatArray  # [k] one-sided: the score rises under addition
    p_ablate_holm: FloatArray  # [k] Holm over all 2k tests
    p_add_holm: FloatArray  # [k]
    alpha: float = CAUSAL_ALPHA
    min_effect: float = MIN_EFFECT

    @property
    def mean_drop(self) -> FloatArray:
        """[k] mean over harmful prompts of (unsteered - ablated) score."""
        return np.asarray((self.base_harmful[None, :] - self.ablated).mean(axis=1))

    @property
    def mean_rise(self) -> FloatArray:
        """[k] mean over harmless prompts of (added - unsteered) score."""
        return np.asarray((self.added - self.base_harmless[None, :]).mean(axis=1))

    @property
    def p_holm(self) -> FloatArray:
        """[k] the smaller adjusted p of a layer's arms whose mean effect reaches
        ``min_effect`` (1.0 when neither does)."""
        ab = np.where(self.mean_drop >= self.min_effect, self.p_ablate_holm, 1.0)
        ad = np.where(self.mean_rise >= self.min_effect, self.p_add_holm, 1.0)
        return np.asarray(np.fmin(ab, ad))

    @property
    def causal(self) -> npt.NDArray[np.bool_]:
        """[k] whether an arm of the layer is significant with a large enough effect."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.p_holm < self.alpha)

    @property
    def causal_layers(self) -> list[int]:
        return [layer for layer, c in zip(self.layers, self.causal, strict=True) if c]

    @property
    def min_p_holm(self) -> float:
        """The smallest adjusted p over layers and arms (NaN when nothing was tested)."""
        p = self.p_holm
        return float(np.nanmin(p)) if p.size and not np.all(np.isnan(p)) else float("nan")

    @property
    def reference_layer(self) -> int | None:
        """The causal layer with the largest mean drop + mean rise; None when none is causal
        (ties: the earlier layer)."""
        chosen = self.causal_layers
        if not chosen:
            return None
        effect = self.mean_drop + self.mean_rise
        return max(chosen, key=lambda layer: (effect[self.layers.index(layer)], -layer))

    def no_layer_reason(self) -> str | None:
        """Why claims judged at the reference causal layer cannot be judged (None: they can)."""
        if not self.layers:
            return "no layer was tested for causality (no informative refusal direction)"
        if self.reference_layer is not None:
            return None
        best = int(np.nanargmin(self.p_holm)) if not np.all(np.isnan(self.p_holm)) else 0
        return (f"no layer is causal: neither ablating r̂_l nor adding r_l at its own block "
                f"moved the first-token refusal score significantly by at least "
                f"{self.min_effect:.3g} log-odds at any of {len(self.layers)} layers "
                f"(smallest Holm-adjusted p {self.min_p_holm:.3g} at layer "
                f"{self.layers[best]}, threshold {self.alpha}); the claim is not judged at an "
                "arbitrary layer instead")

    def table_rows(self) -> list[list[Any]]:
        """One row per layer for a report table."""
        return [[layer, float(self.mean_drop[j]), float(self.p_ablate[j]),
                 float(self.p_ablate_holm[j]), float(self.mean_rise[j]), float(self.p_add[j]),
                 float(self.p_add_holm[j]), bool(self.causal[j])]
                for j, layer in enumerate(self.layers)]

    TABLE_HEADER = ("layer", "mean drop, ablated (harmful)", "p", "Holm p",
                    "mean rise, added (harmless)", "p", "Holm p", "causal")


def causal_layer_test(
    layers: Sequence[int],
    base_harmful: npt.ArrayLike,
    ablated: npt.ArrayLike,
    base_harmless: npt.ArrayLike,
    added: npt.ArrayLike,
    alpha: float = CAUSAL_ALPHA,
    min_effect: float = MIN_EFFECT,
) -> CausalLayers:
    """Test every layer's two arms against the unsteered scores of the same prompts
    (one-sided signed-rank tests, Holm over all 2 x len(layers) p-values together)."""
    bh = np.asarray(base_harmful, dtype=np.float64).ravel()
    bb = np.asarray(base_harmless, dtype=np.float64).ravel()
    k = len(layers)
    ab = np.asarray(ablated, dtype=np.float64).reshape(k, -1) if k else np.zeros((0, bh.size))
    ad = np.asarray(added, dtype=np.float64).reshape(k, -1) if k else np.zeros((0, bb.size))
    if ab.shape[1] != bh.size or ad.shape[1] != bb.size:
        raise ValueError(f"arms must score the same prompts as their baseline: ablated "
                         f"{ab.shape} vs {bh.size} harmful, added {ad.shape} vs {bb.size} "
                         "harmless")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p_ab = np.array([signed_rank_p(ab[j] - bh, "less") for j in range(k)], dtype=np.float64)
    p_ad = np.array([signed_rank_p(ad[j] - bb, "greater") for j in range(k)], dtype=np.float64)
    adj = holm(np.concatenate([p_ab, p_ad])) if k else np.zeros(0)
    return CausalLayers(tuple(int(x) for x in layers), bh, ab, bb, ad, p_ab, p_ad,
                        np.asarray(adj[:k]), np.asarray(adj[k:]), alpha, min_effect)


def from_scores(data: Mapping[str, Any], alpha: float = CAUSAL_ALPHA,
                min_effect: float = MIN_EFFECT) -> CausalLayers:
    """:func:`causal_layer_test` on the JSON that :func:`arm_scores` returns."""
    return causal_layer_test(list(data["layers"]), data["base_harmful"], data["ablated"],
                             data["base_harmless"], data["added"], alpha, min_effect)


def check_scores(layers: Sequence[int], n_harmful: int, n_harmless: int,
                 data: Mapping[str, Any]) -> None:
    """Raise ValueError unless cached arm scores cover ``layers`` and the prompt counts."""
    if list(data["layers"]) != list(layers):
        raise ValueError(f"layers {data['layers']}, expected {list(layers)}")
    if len(data["base_harmful"]) != n_harmful or len(data["base_harmless"]) != n_harmless:
        raise ValueError("baseline scores do not fit the prompts")
    if (len(data["ablated"]) != len(layers) or len(data["added"]) != len(layers)
            or any(len(r) != n_harmful for r in data["ablated"])
            or any(len(r) != n_harmless for r in data["added"])):
        raise ValueError("arm scores do not fit the layers and prompts")


# --------------------------------------------------------------------------- disjointness


def check_disjoint_selection(selection: Sequence[Any], judged: Sequence[Any],
                             what: str = "the judged claims") -> None:
    """Raise :class:`probes.errors.PromptSetError` when a prompt used to select the causal
    layers is also among the prompts a claim is judged on (prompt sets with ``texts`` and
    ``name``): a layer chosen on the judged data would make the judgement circular."""
    chosen = {t: ps.name for ps in selection for t in ps.texts}
    for ps in judged:
        shared = [t for t in ps.texts if t in chosen]
        if shared:
            raise PromptSetError(
                f"{len(shared)} prompt(s) of {ps.name!r} also selected the causal layers "
                f"(in {chosen[shared[0]]!r}), e.g. {shared[0][:80]!r}; {what} must be judged "
                "on prompts disjoint from the selection",
                "select the causal layers on another split part (harmful test, harmless val) "
                "than the one the claim is judged on")


# --------------------------------------------------------------------------- reporting


def record_causal_layers(measure: Any, causal: CausalLayers) -> None:
    """The per-layer table, the effect-by-layer plot and the selected layers."""
    measure.table("causal_layers", list(CausalLayers.TABLE_HEADER), causal.table_rows())
    if causal.layers:
        measure.plot("causal_effect_by_layer", "line", x=list(causal.layers),
                     series={"drop, r̂_l ablated at block l (harmful)":
                             causal.mean_drop.tolist(),
                             "rise, r_l added at block l (harmless)": causal.mean_rise.tolist()},
                     hlines=[(0.0, "no effect")], xlabel="layer",
                     ylabel="mean change of the first-token refusal log-odds",
                     title="Causal effect of each layer's refusal direction at its own block")
    measure.metric("causal_layers_count", len(causal.causal_layers), n=len(causal.layers))
    measure.metric("causal_reference_layer",
                   float("nan") if causal.reference_layer is None else causal.reference_layer)
