"""Invariances of activation steering (probes.interventions.steer) on tiny random models.

* alpha = 0 is exactly no intervention (no hook, bit-identical logits);
* hooks never outlive the context, also when the body raises;
* steering block l changes nothing upstream: resid_pre of blocks < l is unchanged, the
  input of block l moves by exactly alpha * v (every position), later blocks see the change;
* ratio units: ||alpha * v_l|| / mean ||h_l|| == alpha, in the plan and in the activations;
* equal total perturbation across layer counts is what SteeringPlan.total_perturbation says;
* batched steered greedy generation equals one-prompt-at-a-time steered generation;
* RowSteering (several plans in one batch, a plan per row) gives every prompt the replies
  its plan gives alone, through the shared prefix, ended rows leaving and ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from probes.capture import capture
from probes.generation import generate
from probes.interventions import (
    RowSteering,
    SteeringPlan,
    count_hooks,
    plan_ratio,
    plan_raw,
    steer,
)
from probes.models import LoadedModel, load

RaggedStop = Callable[[LoadedModel, list[str], int], int]
ExtraStop = Callable[[LoadedModel, int], AbstractContextManager[None]]

TEXTS = ["Write a poem about the sea", "Tell me how to hack a database now please", "Hi",
         "Explain how a bicycle gear system works in simple words for a child"]


def _direction(lm: LoadedModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.layout.d_model, generator=g)


def _logits(lm: LoadedModel, prompts: list[str]) -> torch.Tensor:
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=False)
    with torch.inference_mode():
        return lm.model(**enc).logits  # type: ignore[no-any-return]  # [batch, pos, vocab]


def test_alpha_zero_is_exactly_no_intervention(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    v = _direction(tiny)
    plan = plan_raw({layer: v for layer in range(tiny.n_layers)}, 0.0)
    before = count_hooks(tiny.model)
    reference = _logits(tiny, prompts)
    with steer(tiny.layout, plan):
        assert count_hooks(tiny.model) == before  # alpha = 0 installs no hook at all
        steered = _logits(tiny, prompts)
    assert torch.equal(steered, reference)


def test_nonzero_alpha_changes_logits(tiny: LoadedModel) -> None:
    """The control for the test above: the same plan with alpha != 0 does something."""
    prompts = tiny.format(TEXTS[:2])
    plan = plan_raw({1: _direction(tiny)}, 2.0)
    reference = _logits(tiny, prompts)
    with steer(tiny.layout, plan):
        steered = _logits(tiny, prompts)
    assert not torch.allclose(steered, reference)


def test_hooks_are_removed_after_the_context(tiny: LoadedModel) -> None:
    before = count_hooks(tiny.model)
    plan = plan_raw({layer: _direction(tiny, layer) for layer in range(tiny.n_layers)}, 1.5)
    with steer(tiny.layout, plan):
        assert count_hooks(tiny.model) == before + tiny.n_layers
    assert count_hooks(tiny.model) == before


def test_hooks_are_removed_after_an_exception(tiny: LoadedModel) -> None:
    before = count_hooks(tiny.model)
    prompts = tiny.format(TEXTS[:2])
    reference = _logits(tiny, prompts)
    plan = plan_raw({0: _direction(tiny), tiny.n_layers - 1: _direction(tiny, 1)}, -1.0)
    inside: list[int] = []

    def body() -> None:
        with steer(tiny.layout, plan):
            inside.append(count_hooks(tiny.model))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert inside == [before + 2]
    assert count_hooks(tiny.model) == before
    assert torch.equal(_logits(tiny, prompts), reference)  # the model is left as found


@pytest.mark.parametrize("layer", [1, 2])
def test_steering_changes_only_downstream_activations(tiny: LoadedModel, layer: int) -> None:
    """The hook adds at the input of block ``layer``: resid_pre of earlier blocks is
    untouched, block ``layer`` sees exactly h + alpha v at every position, later blocks
    see a changed stream."""
    prompts = tiny.format(TEXTS)
    v = _direction(tiny)
    alpha = 1.75
    ref = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre", positions="all")
    with steer(tiny.layout, plan_raw({layer: v}, alpha)):
        got = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre", positions="all")
    assert got.data.shape == ref.data.shape  # [tokens, L, d]
    for earlier in range(layer):
        assert torch.equal(got.layer(earlier), ref.layer(earlier)), f"layer {earlier} changed"
    delta = got.layer(layer) - ref.layer(layer)  # [tokens, d]
    expected = (alpha * v).expand_as(delta)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
    later = range(layer + 1, tiny.n_layers)
    assert later, "the tiny models have layers after the steered one"
    assert all(not torch.allclose(got.layer(k), ref.layer(k)) for k in later)


def test_ratio_units_are_perturbation_ratios(tiny: LoadedModel) -> None:
    """||alpha v_l|| / mean ||h_l|| == alpha, in the plan and in the activations."""
    prompts = tiny.format(TEXTS)
    acts = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre")  # [n, L, d], last token
    layers = [1, 2]
    mean_norms = {k: float(acts.layer(k).norm(dim=-1).mean()) for k in layers}
    directions = {k: _direction(tiny, k) * (k + 3.0) for k in layers}  # unnormalised on purpose
    for ratio in (0.25, 1.0, -0.8):
        plan = plan_ratio(directions, mean_norms, ratio)
        assert plan.units == "ratio"
        for k in layers:
            got = float((plan.alphas[k] * plan.vectors[k]).norm()) / mean_norms[k]
            assert got == pytest.approx(abs(ratio), rel=1e-6)
    plan = plan_ratio({2: directions[2]}, mean_norms, 0.6)
    with steer(tiny.layout, plan):
        steered = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre")
    moved = (steered.layer(2) - acts.layer(2)).norm(dim=-1)  # [n]
    torch.testing.assert_close(moved / mean_norms[2], torch.full_like(moved, 0.6),
                               atol=1e-5, rtol=1e-5)


def test_total_perturbation_compares_layer_counts(tiny: LoadedModel) -> None:
    """One layer at ratio r and a 3-layer range at r/3 each, rescaled to the single
    layer's total, carry the same summed norm; the rescaling leaves directions alone."""
    norms = {k: 2.0 + k for k in range(tiny.n_layers)}
    dirs = {k: _direction(tiny, k) for k in range(tiny.n_layers)}
    single = plan_ratio({1: dirs[1]}, norms, 0.9)
    multi = plan_ratio({k: dirs[k] for k in (0, 1, 2)}, norms, 0.9 / 3)
    assert single.total_perturbation() == pytest.approx(0.9 * norms[1])
    assert multi.total_perturbation() == pytest.approx(0.3 * (norms[0] + norms[1] + norms[2]))
    matched = multi.scaled(single.total_perturbation() / multi.total_perturbation())
    assert isinstance(matched, SteeringPlan)
    assert matched.total_perturbation() == pytest.approx(single.total_perturbation())
    assert all(torch.equal(matched.vectors[k], multi.vectors[k]) for k in (0, 1, 2))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "qwen3_next"])
def test_batched_steered_generation_equals_one_at_a_time(arch: str) -> None:
    """Greedy and steered, a batch of left-padded prompts gives each prompt the tokens it
    gets alone. float64 keeps near-ties of the random tiny model from flipping argmaxes
    through batch-dependent rounding (qwen3_next's MoE kernel has no float64: float32)."""
    dtype = torch.float32 if arch == "qwen3_next" else torch.float64
    lm = load(f"tiny-{arch}", dtype=dtype)
    prompts = lm.format(TEXTS)
    plan = plan_raw({1: _direction(lm).to(dtype), 2: _direction(lm, 2).to(dtype)}, 1.25)
    with steer(lm.layout, plan):
        batched = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=12, batch_size=4)
        single = [generate(lm.model, lm.tokenizer, [p], max_new_tokens=12, batch_size=1)
                  for p in prompts]
    assert count_hooks(lm.model) == 0
    for i, one in enumerate(single):
        assert batched.token_ids[i] == one.token_ids[0], f"prompt {i} differs when batched"
    unsteered = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert unsteered.token_ids != batched.token_ids  # the plan did change the replies


def _sweep_plans(lm: LoadedModel, dtype: torch.dtype) -> list[SteeringPlan]:
    """An alpha grid over two layers, alpha 0 included, and a plan on another layer."""
    dirs = {1: _direction(lm).to(dtype), 2: _direction(lm, 2).to(dtype)}
    return [*(plan_raw(dirs, a) for a in (-1.5, 0.0, 0.75, 1.5)),
            plan_raw({0: _direction(lm, 3).to(dtype)}, 2.0)]


@pytest.mark.parametrize(("arch", "options"), [
    ("llama", {}),  # own loop, shared prefix, ended rows leave
    ("llama", {"share_prefix": False}),
    ("qwen2", {"drop_finished": False}),
    ("qwen2", {"fast": False}),  # transformers' generate
    ("gemma3", {}),  # sliding window: generate, no shared prefix
    ("llama", {"batch_size": 20}),  # every plan in one batch
])
def test_row_steering_equals_each_plan_alone(
    arch: str, options: dict[str, int], ragged_stop: RaggedStop, extra_stop: ExtraStop
) -> None:
    """Every plan's prompts, generated together in mixed batches with a plan per row, get
    the tokens they get under ``steer(plan)`` alone (float64: see the test above). An extra
    stop token makes rows end at different steps, so ended rows leave mid-batch."""
    lm = load(f"tiny-{arch}", dtype=torch.float64)
    prompts = lm.format(TEXTS)
    plans = _sweep_plans(lm, torch.float64)
    stop = None
    for plan in plans:  # the first plan whose replies a stop token ends unevenly
        with steer(lm.layout, plan):
            try:
                stop = ragged_stop(lm, prompts, 12)
                break
            except pytest.skip.Exception:
                continue
    assert stop is not None, "no plan of this random model gives ragged stopping"
    joint_prompts = [p for _ in plans for p in prompts]
    groups = [g for g in range(len(plans)) for _ in prompts]
    alone = []
    with extra_stop(lm, stop):
        for plan in plans:
            with steer(lm.layout, plan):
                alone.append(generate(lm.model, lm.tokenizer, prompts, 12, batch_size=4))
        with RowSteering(lm.layout, plans, groups) as rows:
            joint = generate(lm.model, lm.tokenizer, joint_prompts, 12,
                             **{"batch_size": 7, **options}, rows=rows)
    assert count_hooks(lm.model) == 0 and rows.index is None
    assert len(set(joint.new_tokens)) > 1, "rows should end at different lengths"
    for g, one in enumerate(alone):
        got = joint.token_ids[g * len(prompts):(g + 1) * len(prompts)]
        assert got == one.token_ids, f"plan {g} differs when generated with the others"
    assert alone[0].token_ids != alone[1].token_ids  # the plans do differ


def test_row_steering_without_generate_rows_is_a_clear_error(tiny: LoadedModel) -> None:
    plans = [plan_raw({1: _direction(tiny)}, 1.0)]
    before = count_hooks(tiny.model)  # transformers may keep hooks of its own
    with RowSteering(tiny.layout, plans, [0]), pytest.raises(RuntimeError, match="rows="):
        _logits(tiny, tiny.format(TEXTS[:1]))
    assert count_hooks(tiny.model) == before
    with pytest.raises(ValueError, match="index the 1 plans"):
        RowSteering(tiny.layout, plans, [0, 1])
    with pytest.raises(ValueError, match="groups for"), RowSteering(
            tiny.layout, plans, [0, 0]) as rows:
        generate(tiny.model, tiny.tokenizer, tiny.format(TEXTS[:1]), 4, rows=rows)
