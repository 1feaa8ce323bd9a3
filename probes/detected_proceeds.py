"""The DETECTED_PROCEEDS study: harmful replies, their per-token trajectories, the layers.

:class:`Study` gathers what the experiment reads once per model: the judged harmful
replies (in :class:`Part` s, one per generation call), projections on r̂_l at the last
prompt token, the proceed-layer localisation and the per-token :class:`Trajectory` s. The
functions here decide whether the refused-vs-complied claims can be judged and put the
trajectories in a report. Definitions: docs/science.md, "DETECTED_PROCEEDS".

Example:
    if (why := skip_reason(study)) is not None:
        measure.skip("DP-DETECT-EXCEEDS-DECISION", why)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.capture import Site
from probes.geometry import ProceedLayers, ProceedLocalisation
from probes.monitoring import Trajectory, is_code_answer
from probes.stats import mean_ci
from prompts import PromptSet

SATURATION_FRACTION = 0.95  # of the detection AUC's excess over chance
DECISION_ALPHA = 0.05  # Holm-adjusted, one-sided, over layers
WINDOW = (1, 6)  # steps 1..5: the first five generated tokens read back as input
# The middle layer, reported beside the reference causal layer the per-token claim is judged at:
# the trait-vector log has its token table at L32 of a 64-layer model (and averaged 8..56).
MONITOR_DEPTH = 0.5
# Refused and complied groups need this many replies each for the claims that compare them:
# a percentile bootstrap of a handful of replies cannot show their spread (SmolLM2, which
# hardly refuses, has 4 judged refusals in 200 replies, 3 soft and 1 judge false positive).
MIN_GROUP = 10
SITE: Site = "resid_pre"  # where r̂_l was fitted: step 0 equals the detection projection


@dataclass(frozen=True)
class Part:
    """One generation call: its prompts, replies and trajectories."""

    source: str
    prompts: PromptSet
    texts: list[str]
    new_tokens: list[int]
    trajectories: list[Trajectory]
    seconds: float
    cached: bool


@dataclass(frozen=True)
class Study:
    """Everything the tests of this module read, computed once per model."""

    parts: list[Part]
    sources: list[str]
    prompts: list[str]
    texts: list[str]
    refused: np.ndarray  # [n] bool
    layers: tuple[int, ...]  # informative layers (non-zero direction)
    ph: np.ndarray  # [n, k] harmful projections at the last prompt token
    pb: np.ndarray  # [m, k] harmless (held-out test split)
    thresholds: np.ndarray  # [k] midpoints of the train split
    loc: ProceedLayers
    dp: list[ProceedLocalisation]  # train thresholds
    dp_in_sample: list[ProceedLocalisation]  # thresholds of these prompts (comparison only)
    trajectories: list[Trajectory]
    harmless: PromptSet
    step0_max_abs_diff: float

    @property
    def n(self) -> int:
        return len(self.texts)

    @property
    def n_refused(self) -> int:
        return int(self.refused.sum())

    def col(self, layer: int) -> int:
        return self.layers.index(layer)


def check_trajectory_part(layers: list[int], n_prompts: int, data: dict[str, Any]) -> None:
    """Raise ValueError unless a cached trajectory part covers ``layers`` and ``n_prompts``
    prompts with one reply, token count and trajectory each."""
    if data["layers"] != layers:
        raise ValueError(f"layers {data['layers']}, expected {layers}")
    sizes = {len(data["texts"]), len(data["new_tokens"]), len(data["rows"])}
    if sizes != {n_prompts}:
        raise ValueError(f"replies/tokens/trajectories {sorted(sizes)} for {n_prompts} prompts")


def skip_reason(st: Study) -> str | None:
    """Why the refused-vs-complied claims cannot be judged (None: they can)."""
    if st.n_refused == 0:
        return f"model refused 0 of {st.n} harmful prompts: decision AUC undefined"
    if st.n_refused == st.n:
        return f"model complied with 0 of {st.n} harmful prompts: decision AUC undefined"
    small = min(st.n_refused, st.n - st.n_refused)
    if small < MIN_GROUP:
        word = "refused" if st.n_refused == small else "complied with"
        return (f"model {word} {small} of {st.n} harmful prompts: fewer than {MIN_GROUP} in a "
                "group, too few for an interval on the decision AUC or the group difference")
    return None


def example_indices(st: Study) -> dict[str, int]:
    """The first refusal, compliance (no code) and code answer in prompt order, by verdict."""
    picks: dict[str, int] = {}
    for i, text in enumerate(st.texts):
        if st.trajectories[i].n_steps < 2:
            continue
        kind = ("refusal" if st.refused[i] else
                "code answer" if is_code_answer(text) else "compliance")
        picks.setdefault(kind, i)
    return picks


def record_examples(tokenizer: Any, measure: Any, st: Study, layers: list[int]) -> None:
    """Record one example trajectory per kind of reply, and their plots per layer."""
    picks = example_indices(st)
    tok = tokenizer
    longest = max((st.trajectories[i].n_steps for i in picks.values()), default=0)
    for kind, i in picks.items():
        traj = st.trajectories[i]
        tokens = traj.tokens(tok)
        measure.table(f"trajectory/{kind}",
                      ["step", "input token", *[f"L{x}" for x in traj.layers]],
                      [[k, tokens[k], *traj.projections[k].tolist()]
                       for k in range(traj.n_steps)])
        measure.texts(f"trajectory/{kind}/reply", [{"prompt": st.prompts[i],
                                                    "reply": st.texts[i],
                                                    "source": st.sources[i]}])
    missing = [k for k in ("refusal", "compliance", "code answer") if k not in picks]
    if missing:
        measure.table("trajectory/missing_examples", ["kind", "reason"],
                      [[k, "no reply of this kind among the judged harmful replies"]
                       for k in missing])
    for layer in layers if picks else []:
        series: dict[str, list[float | None]] = {}
        for kind, i in picks.items():
            ys: list[float | None] = [float(v) for v in st.trajectories[i].layer(layer)]
            series[f"{kind} (#{i})"] = ys + [None] * (longest - len(ys))
        measure.plot(f"trajectory_examples_L{layer}", "line", x=list(range(longest)),
                     series=series, shade=[(WINDOW[0], WINDOW[1] - 1, "first five tokens")],
                     xlabel="step (0 = last prompt token, k = k-th generated token)",
                     ylabel=f"projection on r̂_{layer}",
                     title=f"Per-token refusal projection at layer {layer} ({SITE})")


def record_group_means(n_boot: int, seed: int, measure: Any, st: Study, layer: int) -> None:
    """Mean trajectory per step for refusals, compliances and code answers."""
    groups = {"refusals": st.refused,
              "compliances": ~st.refused & ~np.array([is_code_answer(t) for t in st.texts]),
              "code answers": ~st.refused & np.array([is_code_answer(t) for t in st.texts])}
    steps = max(t.n_steps for t in st.trajectories)
    series: dict[str, list[float | None]] = {}
    bands: dict[str, tuple[list[float | None], list[float | None]]] = {}
    for name, sel in groups.items():
        ys: list[float | None] = []
        lo: list[float | None] = []
        hi: list[float | None] = []
        for k in range(steps):
            vals = np.array([t.layer(layer)[k] for t, s in zip(st.trajectories, sel, strict=True)
                             if s and t.n_steps > k])
            if vals.size >= 2:
                e = mean_ci(vals, n_boot=n_boot, seed=seed + k)
                ys.append(e.value)
                lo.append(e.lo)
                hi.append(e.hi)
            else:
                ys.append(float(vals[0]) if vals.size else None)
                lo.append(None)
                hi.append(None)
        if any(y is not None for y in ys):
            series[f"{name} (n={int(sel.sum())})"] = ys
            bands[f"{name} (n={int(sel.sum())})"] = (lo, hi)
    measure.plot(f"mean_trajectory_L{layer}", "line", x=list(range(steps)), series=series,
                 bands=bands, xlabel="step (0 = last prompt token)",
                 ylabel=f"mean projection on r̂_{layer}",
                 title="Mean per-token projection by judged reply (groups thin out as replies end)")
