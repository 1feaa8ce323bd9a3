"""Per-token monitoring: no extra forward pass, parity with a separate capture, no leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from probes.capture import SITES, Site, capture, recording
from probes.generation import Generations, generate, prefix_sharing_supported
from probes.models import LoadedModel
from probes.monitoring import (
    TokenMonitor,
    forced_trajectories,
    generate_monitored,
    is_code_answer,
    monitor,
    window_mean,
)

TEXTS = ["Hi", "Write a poem about the sea and the wind please",
         "Explain how a bicycle gear system works", "Tell me how to hack a database",
         "Describe the water cycle for a class of ten-year-old students in detail"]
MAX_NEW = 8
RaggedStop = Callable[[LoadedModel, list[str], int], int]
ExtraStop = Callable[[LoadedModel, int], AbstractContextManager[None]]


def _directions(lm: LoadedModel, layers: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        v = torch.randn(lm.layout.d_model, generator=g)
        out[layer] = v / v.norm()
    return out


def _hook_count(lm: LoadedModel) -> int:
    mods = [lm.layout.decoder, *lm.layout.blocks, *lm.layout.attn_out_modules,
            *lm.layout.mlp_out_modules]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


@contextmanager
def _forward_counter(lm: LoadedModel) -> Iterator[list[int]]:
    calls = [0]

    def hook(*_args: Any) -> None:
        calls[0] += 1

    h = lm.layout.decoder.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        h.remove()


def _ragged_generation(lm: LoadedModel, ragged_stop: RaggedStop) -> tuple[list[str], int]:
    """Formatted prompts and a stop token that ends some rows early and not others."""
    prompts = lm.format(TEXTS)
    return prompts, ragged_stop(lm, prompts, MAX_NEW)


def _reference(lm: LoadedModel, site: Site, layers: list[int], ids: list[int]
               ) -> dict[int, torch.Tensor]:
    """Activations [T, d] of one unpadded sequence, recomputed by a separate capture."""
    with torch.inference_mode(), recording(lm.layout, site, layers, lambda h: h[0]) as sinks:
        lm.layout.decoder(input_ids=torch.tensor([ids]), use_cache=False)
    return {layer: sinks[layer][0] for layer in layers}


def test_monitoring_costs_no_extra_forward_pass(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    with _forward_counter(tiny) as plain_calls:
        plain = generate(tiny.model, tiny.tokenizer, prompts, MAX_NEW, batch_size=2)
    dirs = _directions(tiny, list(range(tiny.n_layers)))
    with _forward_counter(tiny) as mon_calls, monitor(tiny.layout, dirs) as mon:
        watched = generate(tiny.model, tiny.tokenizer, prompts, MAX_NEW, batch_size=2,
                           drop_finished=False)
    assert mon_calls[0] == plain_calls[0]
    assert mon.n_forwards == mon_calls[0]
    assert watched.texts == plain.texts  # the monitor only reads


def _follow_all(monitors: dict[Site, TokenMonitor]) -> Callable[[torch.Tensor], None]:
    def follow(kept: torch.Tensor) -> None:
        for mon in monitors.values():
            mon.keep(kept)

    return follow


@pytest.mark.parametrize("ended_rows", ["stay", "leave"])
def test_trajectories_equal_a_separate_capture(tiny: LoadedModel, ragged_stop: RaggedStop,
                                               extra_stop: ExtraStop, ended_rows: str) -> None:
    """Every site at once (four monitors on one generation), rows of different lengths;
    ended rows either stay in the batch (``drop_finished=False``) or leave it while the
    monitors follow (``follow=``)."""
    prompts, stop = _ragged_generation(tiny, ragged_stop)
    layers = [0, tiny.n_layers - 1]
    dirs = _directions(tiny, layers, seed=1)
    monitors = {site: TokenMonitor(tiny.layout, dirs, site) for site in SITES}
    options: dict[str, Any] = ({"drop_finished": False} if ended_rows == "stay"
                               else {"follow": _follow_all(monitors)})
    with extra_stop(tiny, stop), ExitStack() as stack, _forward_counter(tiny) as calls:
        for mon in monitors.values():
            stack.enter_context(mon.hooks())
        gens = generate(tiny.model, tiny.tokenizer, prompts, MAX_NEW, batch_size=3,
                        **options)
    assert len(set(gens.new_tokens)) > 1, "rows should end at different lengths"
    if ended_rows == "leave" and prefix_sharing_supported(tiny.model):
        narrower = [c for c in monitors["resid_pre"].segments[0].calls if c.rows is not None]
        assert narrower and calls[0] > 0, "some rows should have left the batch"
    encoded = tiny.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for site, mon in monitors.items():
        trajs = mon.trajectories(tiny.tokenizer, prompts, gens.new_tokens)
        for i, traj in enumerate(trajs):
            m = gens.new_tokens[i]
            assert traj.prompt_index == i
            assert traj.n_steps == m
            generated = gens.token_ids[i][: m - 1]  # t_1 .. t_{m-1}: the tokens read back
            assert list(traj.token_ids) == [encoded[i][-1], *generated]
            ref = _reference(tiny, site, layers, [*encoded[i], *generated])
            start = len(encoded[i]) - 1  # the last prompt position
            for layer in layers:
                expected = (ref[layer][start : start + m] @ dirs[layer]).double().numpy()
                np.testing.assert_allclose(traj.layer(layer), expected, atol=1e-4, rtol=1e-4,
                                           err_msg=f"{site} layer {layer} prompt {i}")


@pytest.mark.parametrize("site", SITES)
def test_teacher_forced_trajectories_equal_the_monitored_ones(
    tiny: LoadedModel, ragged_stop: RaggedStop, extra_stop: ExtraStop, site: Site
) -> None:
    """One forward over prompt + reply gives the projections a monitor records while the
    replies are generated (rows ending at different lengths, some at the budget)."""
    prompts, stop = _ragged_generation(tiny, ragged_stop)
    layers = [0, tiny.n_layers - 1]
    dirs = _directions(tiny, layers, seed=2)
    with extra_stop(tiny, stop):
        gens, monitored = generate_monitored(tiny.model, tiny.tokenizer, tiny.layout, prompts,
                                             dirs, MAX_NEW, site=site, batch_size=3)
    assert len(set(gens.new_tokens)) > 1 and MAX_NEW in gens.new_tokens
    with _forward_counter(tiny) as calls:
        forced = forced_trajectories(tiny.layout, tiny.tokenizer, prompts, gens.token_ids,
                                     gens.new_tokens, dirs, site, batch_size=2)
    assert 0 < calls[0] <= 2 * 3  # a batch of two rows costs one pass (and its prefix)
    for got, want in zip(forced, monitored, strict=True):
        assert got.prompt_index == want.prompt_index and got.layers == want.layers
        assert got.token_ids == want.token_ids
        np.testing.assert_allclose(got.projections, want.projections, atol=1e-4, rtol=1e-4)


def test_teacher_forcing_refuses_token_counts_of_another_generation(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS[:2])
    with pytest.raises(ValueError, match="belong to another generation"):
        forced_trajectories(tiny.layout, tiny.tokenizer, prompts, [[1, 2], [3]], [2, 5],
                            _directions(tiny, [0]), "resid_pre")


def test_step_zero_equals_capture_at_the_last_prompt_token(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    dirs = _directions(tiny, [1, 2], seed=2)
    _, trajs = generate_monitored(tiny.model, tiny.tokenizer, tiny.layout, prompts, dirs, 3,
                                  site="resid_pre", batch_size=4)
    acts = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre", layers=[1, 2])
    for layer in (1, 2):
        expected = (acts.layer(layer) @ dirs[layer]).double().numpy()
        got = np.array([t.layer(layer)[0] for t in trajs])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_after_the_block_and_on_error(tiny: LoadedModel) -> None:
    before = _hook_count(tiny)
    dirs = _directions(tiny, [0, 1])
    for site in SITES:
        with monitor(tiny.layout, dirs, site=site):
            assert _hook_count(tiny) == before + 1 + len(dirs)
        assert _hook_count(tiny) == before
    with pytest.raises(RuntimeError, match="boom"), monitor(tiny.layout, dirs):
        raise RuntimeError("boom")
    assert _hook_count(tiny) == before


def test_a_generation_that_drops_ended_rows_is_refused_clearly(
    tiny: LoadedModel, ragged_stop: RaggedStop, extra_stop: ExtraStop
) -> None:
    """Rows that leave the batch cannot be followed by index: say how to generate instead."""
    if not prefix_sharing_supported(tiny.model):
        pytest.skip("transformers' generate keeps ended rows for this architecture")
    prompts, stop = _ragged_generation(tiny, ragged_stop)
    with extra_stop(tiny, stop), monitor(tiny.layout, _directions(tiny, [0])) as mon:
        gens = generate(tiny.model, tiny.tokenizer, prompts, MAX_NEW, batch_size=3)
    assert len(set(gens.new_tokens)) > 1
    with pytest.raises(RuntimeError, match="drop_finished=False"):
        mon.trajectories(tiny.tokenizer, prompts, gens.new_tokens)


def test_two_generate_calls_in_one_monitor_are_matched_by_prompt(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    dirs = _directions(tiny, [1])
    with monitor(tiny.layout, dirs) as mon:
        a = generate(tiny.model, tiny.tokenizer, prompts[:2], 4, batch_size=1,
                     drop_finished=False)
        b = generate(tiny.model, tiny.tokenizer, prompts[2:], 4, batch_size=2,
                     drop_finished=False)
    trajs = mon.trajectories(tiny.tokenizer, prompts, a.new_tokens + b.new_tokens)
    alone = generate_monitored(tiny.model, tiny.tokenizer, tiny.layout, prompts[3:4], dirs, 4,
                               batch_size=1)[1][0]
    np.testing.assert_allclose(trajs[3].layer(1), alone.layer(1), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_rejected(tiny: LoadedModel) -> None:
    d = tiny.layout.d_model
    with pytest.raises(ValueError, match="d_model"):
        TokenMonitor(tiny.layout, {0: torch.ones(d + 1)})
    with pytest.raises(ValueError, match="site"):
        TokenMonitor(tiny.layout, {0: torch.ones(d)}, site="nowhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        TokenMonitor(tiny.layout, {})
    prompts = tiny.format(TEXTS[:2])
    with monitor(tiny.layout, {0: torch.ones(d)}) as mon:
        gens: Generations = generate(tiny.model, tiny.tokenizer, prompts, 3, drop_finished=False)
    with pytest.raises(ValueError, match="token counts"):
        mon.trajectories(tiny.tokenizer, prompts, gens.new_tokens[:1])
    with pytest.raises(ValueError, match="no generation"):
        mon.trajectories(tiny.tokenizer, tiny.format(["never generated"]), [1])
    with pytest.raises(ValueError, match="another generation"):
        mon.trajectories(tiny.tokenizer, prompts, [99, 99])


def test_window_mean_and_code_detection(tiny: LoadedModel) -> None:
    dirs = _directions(tiny, [0])
    _, (traj,) = generate_monitored(tiny.model, tiny.tokenizer, tiny.layout,
                                    tiny.format(TEXTS[:1]), dirs, 8)
    values = traj.layer(0)
    assert window_mean(traj, 0) == pytest.approx(values[1:6].mean())
    assert window_mean(traj, 0, start=50, stop=60) != window_mean(traj, 0, start=50, stop=60)
    assert is_code_answer("Sure:\n```python\nprint(1)\n```")
    assert is_code_answer("import os\nos.remove('x')")
    assert is_code_answer("Here it is.\ndef f(x):\n    return x")
    assert not is_code_answer("I'm sorry, but I can't assist with that.")
    assert not is_code_answer("Step 1: define your goals. Step 2: import nothing.")


def test_monitor_follows_a_large_batch_of_very_different_lengths(tiny: LoadedModel) -> None:
    """A long batch of very different prompt lengths: step 0 still equals a separate
    capture."""
    texts = [*TEXTS, *(f"{w} " * n for n in (1, 2, 3, 30, 40) for w in ("sea", "gear", "x"))]
    prompts = tiny.format(texts)
    dirs = _directions(tiny, [1], seed=3)
    _, trajs = generate_monitored(tiny.model, tiny.tokenizer, tiny.layout, prompts, dirs, 3,
                                  site="resid_pre", batch_size=len(prompts))
    acts = capture(tiny.layout, tiny.tokenizer, prompts, "resid_pre", layers=[1])
    expected = (acts.layer(1) @ dirs[1]).double().numpy()
    got = np.array([t.layer(1)[0] for t in trajs])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
