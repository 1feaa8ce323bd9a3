"""probes.jailbreak: pairing of framed prompts, detection AUCs per readout against a manual
count, the dose and defence-window arithmetic, and steering at the attention output."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.workbench import Progress, Workbench
from probes import jailbreak as J
from probes.cache import ActivationCache
from probes.capture import capture
from probes.errors import BenchError, PromptSetError
from probes.interventions import count_hooks, plan_ratio, steer
from probes.models import load
from probes.stats import mcnemar_exact_p, wilson_interval
from prompts import PromptSet
from tests.helpers import tiny_config

ORIGINALS = PromptSet("orig", tuple(f"Explain how to do forbidden thing number {i}"
                                    for i in range(10)))
PAST = PromptSet("past_tense", tuple(f"How was thing {i} done in the past?" for i in range(9)))
FUTURE = PromptSet("future_tense", tuple(f"How will thing {i} be done?" for i in range(9)))


def _arm(name: str, dose: float, refused: list[bool], degenerate: list[bool] | None = None
         ) -> J.Arm:
    n = len(refused)
    return J.Arm(name, "single", dose, ("p",) * n, ("r",) * n, np.array(refused),
                 np.zeros(n, dtype=bool) if degenerate is None else np.array(degenerate))


# --------------------------------------------------------------------------- pairing


def test_framed_families_pair_with_their_originals() -> None:
    sets = J.attack_sets(ORIGINALS, PAST, FUTURE, k=4, seed=3)
    families = [s.family for s in sets]
    assert families[:2] == ["past_tense", "future_tense"]
    assert {"role_play", "novel", "historical"} <= set(families)
    drawn = None
    for s in sets:
        assert len(s.prompts) == 4
        if not s.paired:
            assert s.family in J.TENSE_FAMILIES and s.originals is None
            continue
        assert s.originals is not None
        for text, i in zip(s.prompts.texts, s.originals, strict=True):
            assert ORIGINALS.texts[i] in text
        drawn = drawn or s.originals
        assert s.originals == drawn  # every framing wraps the same requests
        assert s.clusters() == [f"original:{i}" for i in s.originals]
    # outcomes of the originals, aligned row by row with a framed family
    framed = sets[2]
    orig_outcome = np.arange(10) % 3 == 0
    aligned = J.paired_outcomes(framed, orig_outcome)
    assert framed.originals is not None
    assert aligned.tolist() == [bool(orig_outcome[i]) for i in framed.originals]
    with pytest.raises(ValueError, match="unpaired"):
        J.paired_outcomes(sets[0], orig_outcome)


def test_a_framed_prompt_not_holding_its_original_is_refused() -> None:
    good = J.attack_sets(ORIGINALS, PAST, FUTURE, k=3, seed=0)[2]
    assert good.originals is not None
    shifted = tuple((i + 1) % len(ORIGINALS) for i in good.originals)
    with pytest.raises(PromptSetError, match="not paired with original"):
        J.check_pairing(J.AttackSet(good.family, good.prompts, shifted), ORIGINALS)
    with pytest.raises(PromptSetError, match="original indices"):
        J.check_pairing(J.AttackSet(good.family, good.prompts, shifted[:2]), ORIGINALS)
    with pytest.raises(PromptSetError, match="at least one"):
        J.attack_sets(ORIGINALS, PAST, FUTURE, k=0, seed=0)


def test_baseline_comparison_paired_and_unpaired() -> None:
    framed = J.attack_sets(ORIGINALS, PAST, FUTURE, k=6, seed=1)[3]
    assert framed.originals is not None
    orig = np.array([True] * 10)
    attack = np.array([True, False, False, True, False, False])
    row = J.compare_to_originals(framed, attack, orig, n_boot=200, seed=0)
    assert row.diff == pytest.approx(attack.mean() - 1.0)
    assert row.p_mcnemar == pytest.approx(mcnemar_exact_p(attack, orig[list(framed.originals)]))
    assert row.diff_lo <= row.diff <= row.diff_hi
    unpaired = J.AttackSet("past_tense", PAST.subset(range(6)), None)
    row2 = J.compare_to_originals(unpaired, attack, orig, n_boot=200, seed=0)
    assert row2.p_mcnemar is None and "Newcombe" in row2.method
    assert row2.diff_lo < row2.diff < row2.diff_hi


# --------------------------------------------------------------------------- detection


def _manual_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_detection_aucs_match_a_manual_count() -> None:
    rng = np.random.default_rng(0)
    n_layers, d = 3, 5
    shift = np.zeros((n_layers, d))
    shift[:, 0] = [0.0, 1.0, 3.0]  # layer 0 carries nothing, layer 2 the most
    train = (rng.normal(size=(20, n_layers, d)) + shift, rng.normal(size=(20, n_layers, d)))
    plain = (rng.normal(size=(15, n_layers, d)) + shift, rng.normal(size=(12, n_layers, d)))
    attacks = {"a": rng.normal(size=(7, n_layers, d)) + 0.5 * shift,
               "b": rng.normal(size=(6, n_layers, d)) + shift}
    harmless = rng.normal(size=(11, n_layers, d))
    alarming = rng.normal(size=(9, n_layers, d)) + 0.25 * shift
    det = J.detect(("attn_v", "mean"), [4, 5, 6], train, plain, attacks, harmless, alarming)
    assert det.layers == (4, 5, 6)
    for j in range(n_layers):
        r = train[0][:, j].mean(0) - train[1][:, j].mean(0)
        u = r / np.linalg.norm(r)
        att = np.concatenate([attacks["a"][:, j], attacks["b"][:, j]]) @ u
        safe = harmless[:, j] @ u
        assert det.attacks[j].value == pytest.approx(_manual_auc(att, safe))
        assert det.families["a"][j].value == pytest.approx(_manual_auc(attacks["a"][:, j] @ u,
                                                                       safe))
        assert det.plain[j].value == pytest.approx(_manual_auc(plain[0][:, j] @ u,
                                                               plain[1][:, j] @ u))
        assert det.alarming[j].value == pytest.approx(_manual_auc(att, alarming[:, j] @ u))
        assert det.attacks[j].lo <= det.attacks[j].value <= det.attacks[j].hi
    assert det.chosen == 2 and det.layer == 6  # picked on the plain prompts


def test_auc_difference_is_paired() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 25)
    same = J.auc_difference(pos, neg, pos, neg, n_boot=200, seed=0)
    assert (same.value, same.lo, same.hi) == (0.0, 0.0, 0.0)
    weaker = pos * 0.1 + rng.normal(0, 1, 30)
    other = J.auc_difference(pos, neg, weaker, neg, n_boot=200, seed=0)
    assert other.value == pytest.approx(_manual_auc(pos, neg) - _manual_auc(weaker, neg))
    assert other.lo <= other.value <= other.hi
    with pytest.raises(ValueError, match="same prompts"):
        J.auc_difference(pos, neg, pos[:-1], neg, 10, 0)


def test_projection_on_a_zero_direction_is_zero() -> None:
    acts = np.ones((4, 2, 3))
    dirs = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    got = J.projections(acts, dirs)
    assert got[:, 0].tolist() == [0.0] * 4 and got[:, 1].tolist() == [1.0] * 4


def test_last_and_mean_of_an_all_positions_capture() -> None:
    lm = load("tiny-llama")
    texts = lm.format(["Write a poem", "How do I pick a lock on a door at night?", "Hi"])
    allpos = capture(lm.layout, lm.tokenizer, texts, "attn_v", positions="all", batch_size=2)
    last = capture(lm.layout, lm.tokenizer, texts, "attn_v", batch_size=2)
    got_last, got_mean = J.last_and_mean(allpos)
    np.testing.assert_allclose(got_last, last.data.double().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_mean, allpos.prompt_means().double().numpy(), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="positions 'all'"):
        J.last_and_mean(last)


# --------------------------------------------------------------------------- doses


def test_dose_at_half_interpolates_and_brackets() -> None:
    doses = [0.0, 0.25, 0.5, 1.0]
    got = J.dose_at_half(doses, [1, 6, 14, 20], [20, 20, 20, 20])
    # rates 0.05, 0.30, 0.70, 1.00: crossing between 0.25 and 0.5
    assert got.status == "ok"
    assert got.value == pytest.approx(0.25 + (0.5 - 0.3) / (0.7 - 0.3) * 0.25)
    below = [d for d, k in zip(doses, [1, 6, 14, 20], strict=True)
             if wilson_interval(k, 20)[1] < 0.5]
    above = [d for d, k in zip(doses, [1, 6, 14, 20], strict=True)
             if wilson_interval(k, 20)[0] > 0.5]
    assert got.lo == max(d for d in below if d < 0.5) and got.hi == min(above)
    base = J.dose_at_half(doses, [10, 12, 14, 20], [20] * 4)
    assert (base.status, base.value) == ("baseline", 0.0)
    none = J.dose_at_half(doses, [0, 1, 2, 3], [20] * 4)
    assert (none.status, none.value) == ("not reached", None)
    with pytest.raises(ValueError, match="ascending"):
        J.dose_at_half([0.0, 1.0, 0.5], [0, 1, 2], [2, 2, 2])


def test_defence_window_arithmetic() -> None:
    attack = J.DoseHalf(0.4, "ok", 0.25, 0.5)
    w = J.defence_window(attack, J.DoseHalf(1.0, "ok", 0.5, None), 1.0)
    assert w.ratio == pytest.approx(2.5) and not w.lower_bound and w.text.startswith("[0.4")
    closed = J.defence_window(attack, J.DoseHalf(0.2, "ok", None, 0.25), 1.0)
    assert closed.ratio == pytest.approx(0.5) and closed.text.startswith("empty")
    open_ = J.defence_window(attack, J.DoseHalf(None, "not reached", None, None), 1.0)
    assert open_.ratio == pytest.approx(2.5) and open_.lower_bound and "> 2.5" in open_.text
    none = J.defence_window(J.DoseHalf(None, "not reached", None, None), attack, 1.0)
    assert none.ratio is None and none.text.startswith("empty")
    base = J.defence_window(J.DoseHalf(0.0, "baseline", None, None), attack, 1.0)
    assert base.ratio is None and "unsteered" in base.text


def test_intact_doses_stop_at_the_first_degenerate_dose() -> None:
    assert J.intact_doses([0, 0.25, 0.5, 1.0], [0.0, 0.2, 0.5, 0.1]) == [0.0, 0.25]
    assert J.intact_doses([0, 0.5], [0.6, 0.0]) == []


def test_analyse_config_pools_attacks_and_benign_prompts() -> None:
    fams = ["past_tense", "novel"]
    arms = {}
    for dose, att, ben, deg in ((0.0, 0, 0, 0), (0.5, 3, 0, 0), (1.0, 4, 1, 3)):
        for f in fams:
            arms[(f, dose)] = _arm(f, dose, [i < att for i in range(4)],
                                   [i < deg for i in range(4)])
        for b in J.BENIGN_SETS:
            arms[(b, dose)] = _arm(b, dose, [i < ben for i in range(4)])
    res = J.analyse_config("single", [0.0, 0.5, 1.0], arms, fams)
    # attacks refused (not degenerate): 0/8, 6/8, 2/8 (4 refusals, 3 of them degenerate)
    assert res.refused(fams, 0.5).sum() == 6 and res.refused(fams, 1.0).sum() == 2
    assert res.intact == (0.0, 0.5, 1.0)  # degenerate 6 of 16 replies at dose 1
    assert res.top == 1.0
    assert res.attack_half.value == pytest.approx(0.5 * 0.5 / 0.75)
    assert res.benign_half.status == "not reached"
    assert res.window.lower_bound and res.window.ratio == pytest.approx(1.0 / (1 / 3))
    rates = J.family_rates(res, 0.5, fams)
    assert [r.refused for r in rates] == [3, 3]
    lo, hi = wilson_interval(3, 4, J.bonferroni_conf(2))
    assert (rates[0].lo, rates[0].hi) == pytest.approx((lo, hi))


def test_cluster_rate_is_no_narrower_than_wilson_on_clusters() -> None:
    y = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1])
    clusters = ["a", "a", "a", "b", "b", "b", "c", "c", "d", "e"]
    est = J.cluster_rate(y, clusters, n_boot=300, seed=0)
    lo, hi = wilson_interval(round(0.8 * 5), 5)
    assert est.value == pytest.approx(0.8)
    assert est.lo <= lo and est.hi >= hi
    allones = J.cluster_rate(np.ones(6), ["x"] * 3 + ["y"] * 3, n_boot=50, seed=0)
    assert allones.lo == pytest.approx(wilson_interval(2, 2)[0]) and allones.hi == 1.0
    with pytest.raises(ValueError, match="cluster labels"):
        J.cluster_rate(y, clusters[:-1], 10, 0)


# --------------------------------------------------------------------------- steering


def test_configurations_add_the_same_total_perturbation() -> None:
    g = torch.Generator().manual_seed(0)
    resid, attn = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    norms = torch.rand(12, generator=g) + 1.0
    plans = {c: J.steering_plan(c, 0.5, resid, attn, norms, centre=6) for c in J.CONFIGS}
    want = 0.5 * float(norms[6])
    for c, plan in plans.items():
        assert plan.total_perturbation() == pytest.approx(want, rel=1e-6), c
    assert sorted(plans["multi"].vectors) == [4, 5, 6, 7, 8]
    assert plans["attn_out"].site == "attn_out" and plans["single"].site == "resid_pre"
    keys = {J.steering_key(p) for p in plans.values()}
    assert len(keys) == 3
    assert J.steering_key(J.steering_plan("single", 0.0, resid, attn, norms, 6)) == "none"
    resid[5] = 0.0  # a block without a direction is left out of the multi-block plan
    multi = J.steering_plan("multi", 0.5, resid, attn, norms, centre=6)
    assert sorted(multi.vectors) == [4, 6, 7, 8]
    assert multi.total_perturbation() == pytest.approx(want, rel=1e-6)
    with pytest.raises(BenchError, match="no resid_pre direction"):
        J.steering_plan("single", 0.5, resid, attn, norms, centre=5)
    assert J.steering_key(plans["single"]) == J.steering_key(
        J.steering_plan("single", 0.5, resid.clone(), attn, norms, 6))


def _bench(cache_dir: Path) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, max_new_tokens=6, dtype="float64", batch_size=5)
    lm = load("tiny-llama", dtype=torch.float64)
    return Workbench(lm, cfg, ActivationCache(cache_dir / "acts"), Progress(lambda _m: None))


def test_attention_output_steering_in_shared_batches_equals_alone(tmp_path: Path) -> None:
    """Rows steered at the attention output (mixed with block-input rows) get the replies
    of that plan alone, and the plan changes the replies."""
    bench = _bench(tmp_path / "joint")
    harm = bench.harmful_split.test.sample(3, 0, "category")
    d = bench.lm.layout.d_model
    g = torch.Generator().manual_seed(1)
    v = {1: torch.randn(d, generator=g, dtype=torch.float64)}
    at_attn = plan_ratio(v, {1: 40.0}, 1.0).at_site("attn_out")
    at_input = plan_ratio(v, {1: 40.0}, 1.0)
    arms = [(harm, "none", None), (harm, J.steering_key(at_attn), at_attn),
            (harm, J.steering_key(at_input), at_input)]
    joint = bench.generate_steered(arms)
    assert count_hooks(bench.lm.model) == 0
    assert joint[0].texts != joint[1].texts and joint[1].texts != joint[2].texts
    alone = _bench(tmp_path / "alone")
    for (prompts, key, plan), got in zip(arms[1:], joint[1:], strict=True):
        ref = alone.generate(prompts, key, lambda p=plan: steer(alone.lm.layout, p))
        assert got.texts == ref.texts, key
    assert count_hooks(alone.lm.model) == 0


def test_attention_output_steering_adds_to_what_attention_writes() -> None:
    """The attention output of the steered block, as the next hook sees it, is the plain one
    plus alpha * v at every position; nothing is left hooked afterwards."""
    lm = load("tiny-llama", dtype=torch.float64)
    layout = lm.layout
    v = torch.zeros(layout.d_model, dtype=torch.float64)
    v[3] = 1.0
    plan = plan_ratio({2: v}, {2: 1.0}, 5.0).at_site("attn_out")
    ids = lm.tokenizer("hello there", return_tensors="pt")["input_ids"]

    def attention_output(steered: bool) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        with steer(layout, plan) if steered else contextlib.nullcontext():
            h = layout.attn_out_modules[2].register_forward_hook(
                lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
            try:
                with torch.inference_mode():
                    lm.model(ids)
            finally:
                h.remove()
        return seen[0]

    plain, steered = attention_output(False), attention_output(True)
    torch.testing.assert_close(steered - plain, (5.0 * v).expand_as(plain))
    assert count_hooks(lm.model) == 0
