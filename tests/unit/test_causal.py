"""probes.causal: a direction planted at one layer of a tiny model is found causal, a random one
is not; the signed-rank tests, the Holm correction, the reference layer, and the disjointness of
the selection prompts from the prompts the dependent claims are judged on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.options import PROFILES
from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache
from probes.capture import capture, left_pad_batch
from probes.causal import (
    ablate_at_input,
    arm_scores,
    causal_layer_test,
    check_disjoint_selection,
    from_scores,
    signed_rank_p,
    spaced,
)
from probes.errors import PromptSetError
from probes.interventions import count_hooks
from probes.judges import refusal_token_ids
from probes.models import LoadedModel, load
from probes.stats import holm
from tests.helpers import tiny_config

PLANTED = 1
SCALE = 0.5  # of the mean activation norm
# The tiny random model's refusal log-odds move by well under ln 2 however it is steered, so
# the effect floor is lowered here; the planted direction moves them by about 0.6.
TINY_MIN_EFFECT = 0.2


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load("tiny-llama", dtype=torch.float64)


def _texts(lm: LoadedModel) -> tuple[list[str], list[str]]:
    harmful = lm.format([f"Tell me about item number {i} please" for i in range(16)])
    harmless = lm.format([f"How do I do thing {i} today?" for i in range(16)])
    return harmful, harmless


def _score_gradient(lm: LoadedModel, texts: list[str], layer: int) -> torch.Tensor:
    """d(sum of refusal log-probs at the first generated position) / d(input of block
    ``layer``), summed over prompts and positions: the direction that raises refusal most."""
    ids = refusal_token_ids(lm.tokenizer)
    delta = torch.zeros(lm.layout.d_model, dtype=torch.float64, requires_grad=True)

    def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (args[0] + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

    handle = lm.layout.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = lm.model(**left_pad_batch(lm.tokenizer, texts, "cpu"), use_cache=False)
    finally:
        handle.remove()
    logp = torch.log_softmax(out.logits[:, -1].double(), dim=-1)
    (grad,) = torch.autograd.grad(torch.logsumexp(logp[:, ids], dim=-1).sum(), delta)
    return grad.detach()


def test_planted_layer_is_causal_and_a_random_direction_is_not(lm: LoadedModel) -> None:
    harmful, harmless = _texts(lm)
    acts = capture(lm.layout, lm.tokenizer, harmless, layers=[PLANTED])
    scale = SCALE * float(acts.data.norm(dim=-1).mean())
    g = _score_gradient(lm, harmless, PLANTED)
    planted = g / g.norm() * scale
    gen = torch.Generator().manual_seed(0)
    random = {}
    for layer in (0, 2):
        r = torch.randn(lm.layout.d_model, generator=gen, dtype=torch.float64)
        for grad in (_score_gradient(lm, harmless, layer), _score_gradient(lm, harmful, layer)):
            r = r - (r @ grad) / (grad @ grad) * grad  # no mean first-order effect
        random[layer] = r / r.norm() * scale
    data = arm_scores(lm.model, lm.tokenizer, lm.layout, {PLANTED: planted, **random},
                      harmful, harmless, batch_size=8)
    assert count_hooks(lm.model) == 0
    res = from_scores(data, min_effect=TINY_MIN_EFFECT)
    assert res.layers == (0, 1, 2)
    assert res.causal_layers == [PLANTED]
    assert res.reference_layer == PLANTED
    assert res.no_layer_reason() is None
    assert res.mean_rise[res.layers.index(PLANTED)] > 0
    assert res.min_p_holm < 0.05


def test_ablate_at_input_removes_the_direction_at_that_block_only(lm: LoadedModel) -> None:
    harmful, _ = _texts(lm)
    v = torch.randn(lm.layout.d_model, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    u = v / v.norm()
    plain = capture(lm.layout, lm.tokenizer, harmful[:4], layers=[1, 2])
    with ablate_at_input(lm.layout, v, 1):
        seen: list[torch.Tensor] = []
        handle = lm.layout.blocks[1].register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(
                (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        try:
            ablated = capture(lm.layout, lm.tokenizer, harmful[:4], layers=[1, 2])
        finally:
            handle.remove()
    assert count_hooks(lm.model) == 0
    assert all(float((h @ u).abs().max()) < 1e-5 * float(h.norm(dim=-1).max())
               for h in seen)  # what block 1 received (u is cast from float32)
    assert not torch.allclose(plain.data[:, 1], ablated.data[:, 1])  # later blocks see it
    with pytest.raises(ValueError, match="zero"), ablate_at_input(
            lm.layout, torch.zeros(lm.layout.d_model), 1):
        pass


def test_signed_rank_p_is_one_sided() -> None:
    down = -np.arange(1, 13, dtype=float)
    assert signed_rank_p(down, "less") < 0.001
    assert signed_rank_p(down, "greater") > 0.99
    assert signed_rank_p(np.zeros(10), "less") == 1.0
    assert np.isnan(signed_rank_p([], "less"))
    with pytest.raises(ValueError):
        signed_rank_p(down, "two-sided")


def test_holm_correction_over_both_arms_of_every_layer() -> None:
    rng = np.random.default_rng(0)
    k, n = 12, 9
    base_h, base_b = rng.normal(size=n), rng.normal(size=n)
    ablated = base_h + rng.normal(size=(k, n))  # symmetric noise: no effect
    added = base_b + rng.normal(size=(k, n))
    ablated[3] = base_h - np.arange(1, n + 1)  # all n prompts drop: p = 2**-9 unadjusted
    res = causal_layer_test(list(range(k)), base_h, ablated, base_b, added)
    assert res.p_ablate[3] == pytest.approx(2.0 ** -n)
    assert res.p_ablate[3] < 0.05
    expected = holm(np.concatenate([res.p_ablate, res.p_add]))
    np.testing.assert_allclose(np.concatenate([res.p_ablate_holm, res.p_add_holm]), expected)
    # 2 x 12 tests: 24 * 2**-9 = 0.047 < 0.05 survives; with more layers it would not
    assert res.causal_layers == [3]
    more = causal_layer_test(list(range(30)), base_h,
                             np.concatenate([ablated, np.tile(base_h + 1.0, (18, 1))]),
                             base_b, np.concatenate([added, np.tile(base_b, (18, 1))]))
    assert more.p_ablate[3] < 0.05 and not more.causal[3]
    assert more.reference_layer is None
    reason = more.no_layer_reason()
    assert reason is not None and "no layer is causal" in reason and "arbitrary" in reason


def test_reference_layer_is_the_largest_combined_effect() -> None:
    n = 20
    base = np.zeros(n)
    ablated = np.stack([base - 1.0 - 0.01 * np.arange(n), base - 3.0 - 0.01 * np.arange(n),
                        base + 0.01 * np.arange(n)])
    wiggle = 0.01 * np.arange(n) * (-1.0) ** np.arange(n)  # no consistent sign
    added = np.stack([base + 2.5 + 0.01 * np.arange(n), base + wiggle, base + wiggle])
    res = causal_layer_test([4, 7, 9], base, ablated, base, added)
    assert res.causal_layers == [4, 7]  # layer 9: a rise under ablation, nothing added
    small = causal_layer_test([4], base, base[None, :] - 0.1 - 0.01 * np.arange(n), base,
                              base[None, :] + wiggle)
    assert small.p_ablate_holm[0] < 1e-5 and small.causal_layers == []  # below the floor
    assert res.reference_layer == 4  # 1.1 + 2.6 > 3.1 + 0.1
    with pytest.raises(ValueError, match="same prompts"):
        causal_layer_test([4], base, ablated[:1, :5], base, added[:1])


def _bench(tmp_path: Path, profile: str) -> Workbench:
    cfg = tiny_config(profile, cache_dir=tmp_path, n_train=PROFILES[profile].n_train,
                      n_eval=PROFILES[profile].n_eval, n_gen=PROFILES[profile].n_gen,
                      batch_size=16)
    return Workbench(load("tiny-llama"), cfg, ActivationCache(tmp_path / "acts"),
                     Progress(lambda _m: None))


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_selection_prompts_are_disjoint_from_the_judged_ones(tmp_path: Path,
                                                              profile: str) -> None:
    """The causal selection uses the harmful test and harmless val parts; DETECTED_PROCEEDS
    and the monitor judge harmful val-part replies (and HarmBench) against harmless test-part
    prompts, and the directions are fitted on the train part."""
    bench = _bench(tmp_path, profile)
    harm, safe = bench.causal_pair()
    assert set(harm.texts) <= set(bench.harmful_split.test.texts)
    assert set(safe.texts) <= set(bench.harmless_split.val.texts)
    assert len(harm) >= 12 and len(safe) >= 12
    judged = [bench.gen_pair()[0], bench.harmful_split.val, bench.harmbench,
              bench.eval_pair()[1], *bench.train_pair()]
    check_disjoint_selection([harm, safe], judged)  # raises on any shared prompt
    with pytest.raises(PromptSetError, match="also selected the causal layers"):
        check_disjoint_selection([harm, safe], [bench.harmful_split.test], "a claim")


def test_workbench_causal_layers_are_read_from_disk(tmp_path: Path) -> None:
    bench = _bench(tmp_path, "quick")
    first = bench.causal_layers
    assert first.layers == tuple(range(1, bench.lm.n_layers))  # layer 0's r is zero
    again = _bench(tmp_path, "quick")
    calls: list[int] = []
    handle = again.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        second = again.causal_layers
    finally:
        handle.remove()
    assert calls == []
    np.testing.assert_array_equal(first.ablated, second.ablated)
    np.testing.assert_array_equal(first.p_add_holm, second.p_add_holm)


def test_spaced_layers_keep_the_last_and_spread_evenly() -> None:
    assert spaced([3, 1, 2], 12) == [1, 2, 3]
    picked = spaced(list(range(1, 24)), 12)
    assert len(picked) == 12 and picked[-1] == 23 and picked == sorted(set(picked))
    assert int(np.diff(picked).max()) <= 2
    with pytest.raises(ValueError):
        spaced([1], 0)
