"""Abliteration on the embedded model: weight edit == hook ablation, bit-exact restore, and an
export that reloads with ``from_pretrained`` to the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from probes import abliteration as A
from probes.capture import left_pad_batch
from probes.interventions import ablate_direction
from probes.models import LoadedModel

pytestmark = pytest.mark.slow

PROMPTS = ["Write a haiku about rain.", "Give step-by-step instructions to pick a lock."]


def _last_logits(lm: LoadedModel, model: torch.nn.Module | None = None) -> torch.Tensor:
    batch = left_pad_batch(lm.tokenizer, lm.format(PROMPTS), lm.device)
    with torch.inference_mode():
        return (model or lm.model)(**batch, logits_to_keep=1).logits[:, -1].float()


def _direction(lm: LoadedModel) -> torch.Tensor:
    return torch.randn(lm.layout.d_model, generator=torch.Generator().manual_seed(0))


def test_weight_edit_equals_hook_ablation_and_restores(real_model: LoadedModel) -> None:
    lm = real_model
    assert lm.layout.exact_orthogonalisation
    r = _direction(lm)
    before = {n: p for n, p in lm.model.named_parameters()}
    base = _last_logits(lm)
    with ablate_direction(lm.layout, r):
        hooked = _last_logits(lm)
    with A.orthogonalised(lm.layout, r, model=lm.model) as info:
        edited = _last_logits(lm)
    assert len(info.writers) == 1 + 2 * lm.n_layers
    assert float((hooked - base).abs().max()) > 0.1, "a random direction should matter"
    torch.testing.assert_close(edited, hooked, rtol=0, atol=1e-3)
    after = dict(lm.model.named_parameters())
    assert all(after[n] is p for n, p in before.items()), "originals must be put back"
    assert torch.equal(_last_logits(lm), base)


def test_export_reloads_to_the_same_logits(real_model: LoadedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = real_model
    out = tmp_path / "abliterated"
    with A.orthogonalised(lm.layout, _direction(lm), model=lm.model, source_layer=None) as info:
        edited = _last_logits(lm)
        A.export(lm.model, lm.tokenizer, out, metadata={"edit": info.as_json()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abliterated"]
    meta = json.loads((out / A.EXPORT_METADATA_FILE).read_text())
    assert meta["files"] == ["model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    torch.testing.assert_close(_last_logits(lm, reloaded), edited, rtol=0, atol=1e-5)
