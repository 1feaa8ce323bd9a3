"""Hooks on a model whose blocks an accelerate ``device_map`` placed (some offloaded to
disk, with ``meta`` placeholders): capture, steering (one plan and per-row plans), direction
ablation and token monitoring give the numbers of the plain load; the weight edit of
abliteration refuses offloaded weights (its edit would be reloaded away) and works on a
``device_map`` that keeps every block resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probes.abliteration import orthogonalised
from probes.capture import capture
from probes.errors import ExportError
from probes.generation import generate
from probes.interventions import RowSteering, ablate_direction, plan_raw, steer
from probes.models import LoadedModel, load
from probes.monitoring import generate_monitored
from probes.tiny import tiny_model

PROMPTS = ["Hello there", "Tell me a joke please", "How do I bake bread?"]


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel, Path]:
    """(plain load, load with blocks and embedding offloaded to disk, model directory)."""
    root = tmp_path_factory.mktemp("offload")
    model, tok = tiny_model("llama")
    model.save_pretrained(str(root / "m"))
    tok.save_pretrained(str(root / "m"))
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(n)})
    plain = load(str(root / "m"), cache_dir=root / "c")
    placed = load(str(root / "m"), cache_dir=root / "c",
                  model_args={"device_map": device_map, "offload_folder": str(root / "off")})
    return plain, placed, root


def _direction(lm: LoadedModel) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, lm.layout.d_model)


def test_the_offloaded_load_really_has_meta_placeholders(loads: tuple[LoadedModel, ...]
                                                         ) -> None:
    plain, placed, _ = loads
    assert {p.device.type for p in placed.model.parameters()} == {"cpu", "meta"}
    assert placed.device.type == "cpu"  # inputs go where data is, not to "meta"
    assert placed.fingerprint == plain.fingerprint  # placement changes no number


def test_capture_matches_the_plain_load(loads: tuple[LoadedModel, ...]) -> None:
    plain, placed, _ = loads
    texts = plain.format(PROMPTS)
    for site in ("resid_pre", "resid_post", "attn_out"):
        a = capture(plain.layout, plain.tokenizer, texts, site=site, batch_size=2)
        b = capture(placed.layout, placed.tokenizer, texts, site=site, batch_size=2)
        assert torch.equal(a.data, b.data), site


def test_steering_and_row_steering_match_the_plain_load(loads: tuple[LoadedModel, ...]) -> None:
    plain, placed, _ = loads
    texts = plain.format(PROMPTS)
    out = []
    for lm in (plain, placed):
        plan = plan_raw({1: _direction(lm), 2: _direction(lm)}, 4.0)
        with steer(lm.layout, plan):
            one = generate(lm.model, lm.tokenizer, texts, 6, batch_size=3).texts
        plans = [plan, plan.scaled(-1.0), plan_raw({1: _direction(lm)}, 0.0)]
        with RowSteering(lm.layout, plans, [0, 1, 2]) as rows:
            per_row = generate(lm.model, lm.tokenizer, texts, 6, batch_size=3, rows=rows).texts
        out.append((one, per_row))
    assert out[0] == out[1]
    assert out[0][0] != generate(plain.model, plain.tokenizer, texts, 6, batch_size=3).texts


def test_ablation_and_monitoring_match_the_plain_load(loads: tuple[LoadedModel, ...]) -> None:
    plain, placed, _ = loads
    texts = plain.format(PROMPTS)
    replies, trajectories = [], []
    for lm in (plain, placed):
        with ablate_direction(lm.layout, _direction(lm)):
            replies.append(generate(lm.model, lm.tokenizer, texts, 6, batch_size=3).texts)
        _gens, traj = generate_monitored(lm.model, lm.tokenizer, lm.layout, texts,
                                         {0: _direction(lm), 3: _direction(lm)}, 5)
        trajectories.append([t.projections for t in traj])
    assert replies[0] == replies[1]
    for a, b in zip(*trajectories, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weight_edit_refuses_offloaded_weights(loads: tuple[LoadedModel, ...]) -> None:
    _, placed, _ = loads
    with (pytest.raises(ExportError, match="offloaded by the device_map") as info,
          orthogonalised(placed.layout, _direction(placed), model=placed.model)):
        pass
    assert "ablate_direction" in info.value.hint
    # nothing was swapped: the model still runs as loaded
    assert {p.device.type for p in placed.model.parameters()} == {"cpu", "meta"}


def test_weight_edit_on_a_resident_device_map_matches_the_plain_load(
        loads: tuple[LoadedModel, ...]) -> None:
    plain, _, root = loads
    n = plain.n_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)}}
    placed = load(str(root / "m"), cache_dir=root / "c", model_args={"device_map": device_map})
    texts = plain.format(PROMPTS)
    weights, replies = [], []
    for lm in (plain, placed):
        with orthogonalised(lm.layout, _direction(lm), model=lm.model):
            weights.append({k: v.clone() for k, v in lm.model.state_dict().items()})
            replies.append(generate(lm.model, lm.tokenizer, texts, 6, batch_size=3).texts)
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    assert replies[0] == replies[1]
