"""The ``attn_v`` site: each layer's v_proj output, equal to a plain forward hook on v_proj,
left out (with a clear error when named) in linear-attention layers, and cached per site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache
from probes.capture import capture, site_layers
from probes.errors import SiteUnavailable
from probes.models import LoadedModel, load
from prompts import PromptSet
from tests.helpers import tiny_config

TEXTS = ["Write a poem about the sea", "Tell me how to hack a database now please", "Hi",
         "Explain how a bicycle gear system works in simple words for a child"]


def _v_proj_alone(lm: LoadedModel, text: str) -> dict[int, torch.Tensor]:
    """``{layer: [pos, d_v]}``: every v_proj output of one unbatched forward pass, recorded
    by forward hooks found by name (not through the layout)."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for name, module in lm.model.named_modules():
        if name.endswith(".v_proj"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, layer=layer: seen.__setitem__(layer, out[0].detach())))
    enc = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    try:
        with torch.inference_mode():
            lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_attn_v_equals_a_hook_on_v_proj(tiny: LoadedModel) -> None:
    prompts = tiny.format(TEXTS)
    last = capture(tiny.layout, tiny.tokenizer, prompts, "attn_v", batch_size=3)
    allpos = capture(tiny.layout, tiny.tokenizer, prompts, "attn_v", positions="all",
                     batch_size=3)
    post = capture(tiny.layout, tiny.tokenizer, prompts, "attn_v",
                   positions="post_instruction", n_post_instruction=2, batch_size=3)
    assert allpos.lengths is not None
    per_prompt = torch.split(allpos.data, [int(n) for n in allpos.lengths])
    for i, text in enumerate(prompts):
        ref = _v_proj_alone(tiny, text)
        assert sorted(ref) == list(last.layers) == list(allpos.layers)
        for j, layer in enumerate(last.layers):
            torch.testing.assert_close(last.data[i, j], ref[layer][-1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(post.data[i, :, j], ref[layer][-2:], atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(per_prompt[i][:, j], ref[layer], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(allpos.prompt_means()[i, j], ref[layer].mean(0),
                                       atol=1e-5, rtol=1e-4)


def test_attn_v_shape_is_kv_heads_times_head_dim(tiny: LoadedModel) -> None:
    cfg: Any = tiny.model.config
    n_kv, head_dim = int(cfg.num_key_value_heads), tiny.layout.head_dim
    assert head_dim is not None
    acts = capture(tiny.layout, tiny.tokenizer, tiny.format(TEXTS), "attn_v")
    assert acts.data.shape == (len(TEXTS), len(acts.layers), n_kv * head_dim)
    heads = acts.heads(head_dim)
    assert heads.shape == (len(TEXTS), len(acts.layers), n_kv, head_dim)
    torch.testing.assert_close(heads[:, :, 1], acts.data[..., head_dim:2 * head_dim])


def test_linear_attention_layers_have_no_attn_v_and_say_which_do() -> None:
    lm = load("tiny-qwen3_next")
    assert lm.layout.layer_types == ["linear_attention", "full_attention"] * 2
    assert site_layers(lm.layout, "attn_v") == [1, 3]
    acts = capture(lm.layout, lm.tokenizer, lm.format(TEXTS[:2]), "attn_v")
    assert acts.layers == (1, 3)
    with pytest.raises(SiteUnavailable, match=r"layer 0 .*linear_attention.*layers that have "
                       r"one: 1, 3"):
        capture(lm.layout, lm.tokenizer, lm.format(TEXTS[:2]), "attn_v", layers=[0, 1])
    with pytest.raises(ValueError, match="attn_v"):
        capture(lm.layout, lm.tokenizer, lm.format(TEXTS[:2]), "attn_x")  # type: ignore[arg-type]


def _bench(cache_dir: Path, arch: str) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, models=(f"tiny-{arch}",), max_new_tokens=8,
                      batch_size=5)
    return Workbench(load(f"tiny-{arch}"), cfg, ActivationCache(cache_dir / "acts"),
                     Progress(lambda _m: None))


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_workbench_caches_attn_v_under_its_own_key(tmp_path: Path, arch: str) -> None:
    bench = _bench(tmp_path, arch)
    ps = PromptSet("t", tuple(TEXTS))
    calls: list[int] = []
    handle = bench.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        v = bench.acts(ps, site="attn_v")
        n_after_v = len(calls)
        assert n_after_v > 0 and len(list((tmp_path / "acts").rglob("*.safetensors"))) == 1
        assert v.layers == tuple(site_layers(bench.lm.layout, "attn_v"))
        direct = capture(bench.lm.layout, bench.lm.tokenizer, bench.lm.format(TEXTS), "attn_v",
                         batch_size=5)
        torch.testing.assert_close(v.data, direct.data)
        calls.clear()
        again = bench.acts(ps, site="attn_v", layers=[v.layers[-1]])  # memo, sliced
        resid = bench.acts(ps)  # another site: another key, another entry
        assert len(calls) > 0 and len(list((tmp_path / "acts").rglob("*.safetensors"))) == 2
        assert resid.data.shape[-1] == bench.lm.layout.d_model != v.data.shape[-1]
        torch.testing.assert_close(again.data[:, 0], v.data[:, -1])
        calls.clear()
        fresh = _bench(tmp_path, arch)  # a new session reads the entry from disk
        fresh_calls: list[int] = []
        h2 = fresh.lm.layout.decoder.register_forward_pre_hook(
            lambda *_a: fresh_calls.append(1))
        try:
            torch.testing.assert_close(fresh.acts(ps, site="attn_v").data, v.data)
        finally:
            h2.remove()
        assert calls == [] and fresh_calls == []
    finally:
        handle.remove()
    if arch == "qwen3_next":
        with pytest.raises(SiteUnavailable, match="layers that have one: 1, 3"):
            bench.acts(ps, site="attn_v", layers=[0])
