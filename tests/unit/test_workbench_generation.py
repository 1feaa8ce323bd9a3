"""Workbench.generate_steered: several steering arms generated together, a plan per batch
row, give each arm the replies it gets alone, and are cached per arm like Workbench.generate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures.workbench import Progress, Workbench
from probes import kernels
from probes.cache import ActivationCache
from probes.interventions import count_hooks, plan_raw, steer
from probes.kernels import layout_tag
from probes.models import load
from tests.helpers import tiny_config


def _bench(cache_dir: Path) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, max_new_tokens=8, dtype="float64", batch_size=5)
    lm = load("tiny-llama", dtype=torch.float64)
    return Workbench(lm, cfg, ActivationCache(cache_dir / "acts"), Progress(lambda _m: None))


def _forward_calls(bench: Workbench) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = bench.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    return calls, handle


def test_arms_generated_together_equal_each_arm_alone(tmp_path: Path) -> None:
    bench = _bench(tmp_path / "joint")
    harm = bench.harmful_split.test.sample(4, 0, "category")
    safe = bench.harmless_split.test.sample(3, 0, "topic")
    g = torch.Generator().manual_seed(0)
    v = {1: torch.randn(bench.lm.layout.d_model, generator=g, dtype=torch.float64)}
    plans = {"a": plan_raw(v, 2.0), "b": plan_raw(v, -3.0)}
    arms = [(harm, "none", None), (harm, "a", plans["a"]), (safe, "a", plans["a"]),
            (harm, "b", plans["b"]), (harm, "a", plans["a"])]  # a repeated arm runs once
    joint = bench.generate_steered(arms)
    assert count_hooks(bench.lm.model) == 0
    assert joint[1] is joint[4]
    assert len({tuple(j.texts) for j in joint[:4]}) == 4  # the arms do differ

    alone = _bench(tmp_path / "alone")
    for (prompts, key, plan), got in zip(arms, joint, strict=True):
        ref = alone.generate(prompts, key, None if plan is None
                             else (lambda p=plan: steer(alone.lm.layout, p)))
        assert got.texts == ref.texts, f"arm {key} on {prompts.name} differs"
        assert got.new_tokens == ref.new_tokens
    total = sum(j.seconds for j in joint[:4])
    assert total > 0 and all(j.seconds >= 0 for j in joint)

    # A second session reads every arm from disk: no forward pass at all.
    again = _bench(tmp_path / "joint")
    calls, handle = _forward_calls(again)
    try:
        reread = again.generate_steered(arms)
        plain = again.generate(harm)  # the unsteered arm is the entry generate() uses
    finally:
        handle.remove()
    assert not calls
    assert [r.texts for r in reread] == [j.texts for j in joint]
    assert plain.texts == joint[0].texts


def test_generation_key_names_the_matmul_layout(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies decoded with the few-row kernels (probes.kernels) and with nn.Linear's own
    are cached apart: they round differently."""
    bench = _bench(tmp_path)
    # the layout is float32-only; the key reads the dtype the Workbench noted of its model
    monkeypatch.setattr(bench, "_facts", replace(bench.facts, dtype=torch.float32))
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", True)
    on_group = bench._gen_group("none", 8)
    on_tag = layout_tag(torch.float32, "cpu")  # e.g. "onednn+rows-first>=512Ki"
    monkeypatch.setattr(kernels, "FEW_ROW_KERNELS", False)
    off_group = bench._gen_group("none", 8)
    assert on_group.digest != off_group.digest and on_group.path != off_group.path
    assert on_tag != "linear"
    assert on_group.key["matmul"] == on_tag and off_group.key["matmul"] == "linear"
