"""Results of the abliteration experiment and how they are put in a report.

:class:`Selection` is the layer choice (held-out projection AUC per layer and the Arditi
sweep); :class:`Outcome` the behaviour of the edited model on held-out prompts (replies
before and after, first-token KL, perplexity). The experiment builds both from its
workbench; these records and :func:`record_selection` keep the report code out of it.

Example:
    record_selection(n_layers, measure, selection)
    record_rate(measure, "harmful_refusal_after", refusal_judge(outcome.after_h.texts))
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probes.abliteration import ArditiSweep, LayerAUC, orthogonalised
from probes.generation import Generations
from probes.judge_error import JudgeErrorRates, record_corrected_rate
from probes.models import LoadedModel
from probes.stats import rate
from prompts import PromptSet

NORM_PRESERVE = False  # the exact equivalent of the hook ablation


@dataclass(frozen=True)
class Selection:
    """The layer choice: r_l per layer, held-out AUCs, the Arditi sweep and the splits."""

    raw: np.ndarray  # [L, d] r_l from the train split
    aucs: list[LayerAUC]
    auc_layer: int
    sweep: ArditiSweep
    train: tuple[PromptSet, PromptSet]
    val: tuple[PromptSet, PromptSet]
    sweep_sets: tuple[PromptSet, PromptSet]
    tied: list[int]
    seconds: float


@dataclass(frozen=True)
class Outcome:
    """Replies before and after the edit at ``layer``, first-token KL and perplexity."""

    layer: int
    key: str
    direction: torch.Tensor
    harmful: PromptSet
    harmless: PromptSet
    before_h: Generations
    after_h: Generations
    before_b: Generations
    after_b: Generations
    kl: np.ndarray  # [n_harmless]
    ppl_original: np.ndarray
    ppl_edited: np.ndarray
    seconds: float

    def edit(self, lm: LoadedModel) -> AbstractContextManager[Any]:
        """The weight edit of this outcome on ``lm``, as a context manager."""
        return orthogonalised(lm.layout, self.direction, model=lm.model,
                              norm_preserve=NORM_PRESERVE, source_layer=self.layer)


def record_rate(measure: Any, name: str, flags: np.ndarray,
                err: JudgeErrorRates | None = None, seed: int = 0) -> None:
    """Record the rate of ``flags`` with its interval; with ``err`` (the refusal judge's
    error rates; ``flags`` are its refusal verdicts) the Rogan-Gladen corrected rate beside
    it."""
    e = rate(int(flags.sum()), len(flags))
    measure.metric(name, e.value, ci=(e.lo, e.hi), n=len(flags))
    if err is not None:
        record_corrected_rate(measure, name, int(flags.sum()), len(flags), err, seed=seed)


def record_selection(n_layers: int, measure: Any, sel: Selection) -> None:
    """Record the per-layer selection table, the picks and the two selection plots."""
    sw = sel.sweep
    layers = list(range(n_layers))

    def num(d: dict[int, float], layer: int) -> float:
        return d.get(layer, math.nan)

    rows = []
    for a in sel.aucs:
        lyr = a.layer
        rows.append([lyr, a.auc.value, a.auc.lo, a.auc.hi, a.cohens_d, num(sw.bypass, lyr),
                     num(sw.induce, lyr), num(sw.kl, lyr),
                     sw.reasons.get(lyr, "zero direction" if not a.valid else ""),
                     ("AUC" if lyr == sel.auc_layer else "")
                     + (" Arditi" if lyr == sw.selected else "")])
    measure.table("direction_selection",
                  ["layer", "auc", "auc_lo", "auc_hi", "cohens_d", "bypass_score",
                   "induce_score", "kl_first_token", "arditi_note", "picked_by"], rows)
    measure.metric("selected_layer_auc", sel.auc_layer)
    measure.metric("layers_tied_at_max_auc", len(sel.tied))
    measure.metric("selected_layer_arditi", math.nan if sw.selected is None else sw.selected)
    chosen = sel.aucs[sel.auc_layer]
    measure.metric("auc_heldout_at_selected_layer", chosen.auc.value,
                   ci=(chosen.auc.lo, chosen.auc.hi), n=len(sel.val[0]) + len(sel.val[1]))
    measure.metric("arditi_baseline_refusal_score_harmful", sw.baseline_harmful,
                   n=len(sel.sweep_sets[0]), units="log-odds")
    measure.metric("arditi_baseline_refusal_score_harmless", sw.baseline_harmless,
                   n=len(sel.sweep_sets[1]), units="log-odds")
    measure.metric("selection_seconds", sel.seconds, units="s")
    bypass = [num(sw.bypass, lyr) for lyr in layers]
    measure.plot(
        "refusal_score_vs_direction_layer", "line", x=layers,
        series={"harmful, r_l ablated everywhere (bypass)": bypass,
                "harmless, r_l added at block l (induce)": [num(sw.induce, lyr)
                                                            for lyr in layers]},
        hlines=[(sw.baseline_harmful, "harmful, no intervention"),
                (sw.baseline_harmless, "harmless, no intervention")],
        shade=[(sw.prune_from - 0.5, n_layers - 0.5, "pruned (last 20 %)")],
        xlabel="layer of the direction r_l", ylabel="mean refusal logit score (log-odds)",
        title=f"Refusal vs direction layer (AUC pick L{sel.auc_layer}, Arditi pick "
              f"{'none' if sw.selected is None else f'L{sw.selected}'}; "
              f"{len(sel.sweep_sets[0])} + {len(sel.sweep_sets[1])} val prompts)")
    measure.plot(
        "heldout_auc_vs_layer", "line", x=layers,
        series={"AUC": [a.auc.value for a in sel.aucs]},
        bands={"AUC": ([a.auc.lo for a in sel.aucs], [a.auc.hi for a in sel.aucs])},
        xlabel="layer", ylabel="held-out AUC of <h_l, r_l>",
        title=f"Projection AUC on {len(sel.val[0])} + {len(sel.val[1])} val prompts")
