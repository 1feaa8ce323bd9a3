"""Weight orthogonalisation, its context manager, export, and direction selection.

Tiny random models of every supported architecture (fixture ``tiny``): the orthogonalised
weights give the logits of the hook ablation (gemma3: the documented inexactness is flagged).
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from probes import abliteration as A
from probes.capture import left_pad_batch
from probes.errors import ExportError
from probes.interventions import ablate_direction
from probes.layout import find_layout
from probes.models import LoadedModel, load
from probes.tiny import tiny_config, tiny_tokenizer

PROMPTS = ["Write a poem about the sea.", "Tell me how to make a bomb.", "hi",
           "Explain how a bicycle gear system works in simple words, please."]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """One architecture for the architecture-independent selection code."""
    return load("tiny-llama")


def _direction(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits  # type: ignore[no-any-return]


def _batch(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return left_pad_batch(lm.tokenizer, lm.format(PROMPTS), lm.device)


def _snapshot(model: nn.Module) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_restored(model: nn.Module, snap: dict[str, tuple[nn.Parameter, torch.Tensor]]
                     ) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for name, (obj, values) in snap.items():
        assert now[name] is obj, f"{name} is not the original parameter object"
        assert torch.equal(now[name], values), f"{name} changed"


def _tiny_variant(arch: str = "llama", **overrides: Any) -> tuple[nn.Module, Any]:
    """A tiny model with config overrides (tied embeddings, biases) and a fixed seed."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0) if p.dim() >= 2 else p.add_(0.5 * torch.randn_like(p))
    model.eval()
    return model, tok


def _tiny_batch(tok: Any) -> dict[str, torch.Tensor]:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    return left_pad_batch(tok, texts, "cpu")


# --------------------------------------------------------------------------- equivalence


def test_weight_edit_equals_hook_ablation(tiny: LoadedModel) -> None:
    layout = tiny.layout
    r = _direction(layout.d_model)
    batch = _batch(tiny)
    base = _logits(tiny.model, batch)
    with ablate_direction(layout, r):
        hooked = _logits(tiny.model, batch)
    assert not torch.allclose(hooked, base, atol=1e-3), "the direction should matter"
    if not layout.exact_orthogonalisation:
        with pytest.warns(A.InexactOrthogonalisationWarning, match="NOT equivalent"), \
                A.orthogonalised(layout, r) as info:
            edited = _logits(tiny.model, batch)
        assert info.exact is False
        # The documented inexactness is real: the edit differs from the hook ablation.
        assert not torch.allclose(edited, hooked, atol=1e-3)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.InexactOrthogonalisationWarning)
        with A.orthogonalised(layout, r) as info:
            edited = _logits(tiny.model, batch)
    assert info.exact is True
    scale = float(hooked.abs().max())
    torch.testing.assert_close(edited, hooked, rtol=0, atol=2e-5 * max(scale, 1.0))
    assert torch.equal(_logits(tiny.model, batch), base)


def test_layer_subset_equals_hook_ablation_of_those_layers(tiny: LoadedModel) -> None:
    layout = tiny.layout
    if not layout.exact_orthogonalisation:
        pytest.skip("gemma3: inexact by design (covered above)")
    r = _direction(layout.d_model, seed=5)
    batch = _batch(tiny)
    with ablate_direction(layout, r, layers=[1, 2], include_embedding=False):
        hooked = _logits(tiny.model, batch)
    with A.orthogonalised(layout, r, layers=[2, 1], include_embedding=False) as info:
        edited = _logits(tiny.model, batch)
    assert info.layers == (1, 2)
    assert not any(n == "embedding" for n in info.writers)
    torch.testing.assert_close(edited, hooked, rtol=0, atol=2e-5 * float(hooked.abs().max()))


def test_biases_are_projected_too() -> None:
    model, tok = _tiny_variant("llama", attention_bias=True, mlp_bias=True)
    layout = find_layout(model)
    assert all(w.bias is not None for w in layout.writers if w.kind != "embedding")
    r = _direction(layout.d_model, seed=2)
    batch = _tiny_batch(tok)
    with ablate_direction(layout, r):
        hooked = _logits(model, batch)
    with A.orthogonalised(layout, r):
        edited = _logits(model, batch)
        u = A.unit_direction(r)
        for w in layout.writers:
            if w.bias is not None:
                assert abs(float(w.bias.detach() @ u)) < 1e-5
    torch.testing.assert_close(edited, hooked, rtol=0, atol=2e-5 * float(hooked.abs().max()))


# --------------------------------------------------------------------------- tied embeddings


def test_tied_embedding_is_untied_and_restored() -> None:
    model, tok = _tiny_variant("llama", tie_word_embeddings=True)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight
    original = emb.weight.detach().clone()
    layout = find_layout(model)
    r = _direction(layout.d_model, seed=3)
    batch = _tiny_batch(tok)
    with ablate_direction(layout, r):
        hooked = _logits(model, batch)
    with A.orthogonalised(layout, r, model=model) as info:
        assert info.untied_embedding
        assert model.config.tie_word_embeddings is False
        assert head.weight is not emb.weight
        assert torch.equal(head.weight, original), "the unembedding must keep its values"
        edited = _logits(model, batch)
    torch.testing.assert_close(edited, hooked, rtol=0, atol=2e-5 * float(hooked.abs().max()))
    assert head.weight is emb.weight and model.config.tie_word_embeddings is True
    assert torch.equal(emb.weight, original)


def test_tied_copy_exports_untied(tmp_path: Path) -> None:
    model, tok = _tiny_variant("llama", tie_word_embeddings=True)
    r = _direction(64, seed=4)
    edited = A.orthogonalise(model, r)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings is True
    assert edited.get_output_embeddings().weight is not edited.get_input_embeddings().weight
    torch.testing.assert_close(edited.get_output_embeddings().weight,
                               model.get_output_embeddings().weight, rtol=0, atol=0)
    out = A.export(edited, tok, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    batch = _tiny_batch(tok)
    assert torch.equal(_logits(reloaded, batch), _logits(edited, batch))


# --------------------------------------------------------------------------- copy / in place


def test_orthogonalise_copies_unless_inplace(tiny: LoadedModel) -> None:
    snap = _snapshot(tiny.model)
    r = _direction(tiny.layout.d_model, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        copy = A.orthogonalise(tiny.model, r)
    assert copy is not tiny.model
    _assert_restored(tiny.model, snap)
    u = A.unit_direction(r)
    for w in find_layout(copy).writers:
        resid = w.param.detach().movedim(w.out_axis, -1) @ u
        assert float(resid.abs().max()) < 1e-4 * max(float(w.param.abs().max()), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        same = A.orthogonalise(copy, r, inplace=True)
    assert same is copy


def test_copy_shares_only_the_tensors_it_does_not_edit() -> None:
    """The edited copy costs the edited tensors alone and computes what a full deep copy
    computes; the original keeps every tensor and its tie."""
    model, tok = _tiny_variant("llama", tie_word_embeddings=True)
    r = _direction(64, seed=8)
    batch = _tiny_batch(tok)
    before = _logits(model, batch)
    shared = A.orthogonalise(model, r)
    full = A.orthogonalise(model, r, share_unedited=False)
    original = dict(model.named_parameters(remove_duplicate=False))
    edited_names = {n for n, p in shared.named_parameters() if p is not original[n]}
    for name, p in shared.named_parameters():
        if name in edited_names:
            assert p.data_ptr() != original[name].data_ptr()
        else:
            assert p is original[name], f"{name} should be shared, not copied"
    writers = {id(w.param) for w in find_layout(shared).writers}
    named = dict(shared.named_parameters())
    assert edited_names, "something must be edited"
    assert {id(named[n]) for n in edited_names} == writers
    assert all(p.data_ptr() not in {q.data_ptr() for q in model.parameters()}
               for p in full.parameters())
    assert torch.equal(_logits(shared, batch), _logits(full, batch))
    assert torch.equal(_logits(model, batch), before)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared.get_output_embeddings().weight is model.get_output_embeddings().weight


def test_context_manager_restores_bit_exactly_on_exception(tiny: LoadedModel) -> None:
    snap = _snapshot(tiny.model)
    r = _direction(tiny.layout.d_model, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        changed: list[str] = []

        def edit_then_fail() -> None:
            with A.orthogonalised(tiny.layout, r, norm_preserve=True):
                changed.extend(n for n, p in tiny.model.named_parameters()
                               if not torch.equal(p, snap[n][1]))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            edit_then_fail()
        assert changed, "the context should edit the weights"
    _assert_restored(tiny.model, snap)


def test_bad_directions_are_rejected(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="zero norm"), \
            A.orthogonalised(tiny.layout, torch.zeros(tiny.layout.d_model)):
        pass
    with pytest.raises(ValueError, match="residual stream"), \
            A.orthogonalised(tiny.layout, torch.ones(3)):
        pass
    with pytest.raises(ValueError, match="non-finite"):
        A.unit_direction(torch.tensor([1.0, float("nan")]))


def test_edit_key_identifies_the_edit(tiny: LoadedModel) -> None:
    r = _direction(tiny.layout.d_model, seed=8)
    key = A.edit_key(r, norm_preserve=True, source_layer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        with A.orthogonalised(tiny.layout, r, norm_preserve=True, source_layer=2) as info:
            pass
    assert info.key() == key
    assert A.edit_key(r, norm_preserve=False, source_layer=2) != key
    assert A.edit_key(2 * r, norm_preserve=True, source_layer=2) == key  # same unit vector
    assert A.edit_key(r + 0.1, norm_preserve=True, source_layer=2) != key
    assert A.edit_key(r, [1], norm_preserve=True, source_layer=2) != key


# --------------------------------------------------------------------------- properties


@st.composite
def _tensor_case(draw: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    d = draw(st.integers(2, 12))
    ndim = draw(st.sampled_from([1, 2, 3]))
    axis = draw(st.integers(0, ndim - 1))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    shape[axis] = d
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    u = A.unit_direction(torch.randn(d, generator=g) + 1e-3)
    return x, u, axis


@settings(max_examples=60, deadline=None)
@given(_tensor_case())
def test_projection_is_idempotent_and_orthogonal(case: tuple[torch.Tensor, torch.Tensor, int]
                                                 ) -> None:
    x, u, axis = case
    once = A.project_out(x, u, axis)
    twice = A.project_out(once, u, axis)
    scale = max(float(x.abs().max()), 1e-30)
    assert float((twice - once).abs().max()) <= 1e-5 * scale
    assert float((once.movedim(axis, -1) @ u).abs().max()) <= 1e-5 * scale
    # Components orthogonal to u are untouched.
    v = torch.randn(u.shape, generator=torch.Generator().manual_seed(0))
    v = v - (v @ u) * u
    torch.testing.assert_close(once.movedim(axis, -1) @ v, x.movedim(axis, -1) @ v,
                               rtol=1e-4, atol=1e-5 * scale)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), norm_preserve=st.booleans(),
       arch=st.sampled_from(["llama", "qwen3_next"]))
def test_edited_writers_have_no_component_along_r(seed: int, norm_preserve: bool,
                                                  arch: str) -> None:
    lm = load(f"tiny-{arch}")
    u = A.unit_direction(_direction(lm.layout.d_model, seed))
    before = {w.name: w.param.detach().clone() for w in lm.layout.writers}
    with A.orthogonalised(lm.layout, u, norm_preserve=norm_preserve):
        for w in lm.layout.writers:
            p = w.param.detach()
            assert float((p.movedim(w.out_axis, -1) @ u).abs().max()) < 1e-4 * float(
                p.abs().max())
            if norm_preserve:
                old = before[w.name]
                if w.kind == "moe_experts":  # per expert
                    torch.testing.assert_close(p.flatten(1).norm(dim=1),
                                               old.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
                else:
                    assert math.isclose(float(p.norm()), float(old.norm()), rel_tol=1e-5)
    for w in lm.layout.writers:
        assert torch.equal(w.param, before[w.name])


def test_norm_preservation_rescales_each_expert_separately() -> None:
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    x[1] *= 100.0
    u = A.unit_direction(torch.randn(8, generator=torch.Generator().manual_seed(1)))
    out = A._rescale_to(A.project_out(x, u, 1), x, per_expert=True)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_export_round_trip_gives_equal_logits(tiny: LoadedModel, tmp_path: Path,
                                              dtype: torch.dtype) -> None:
    """Reloaded in the dtype it was exported in, the edited model computes the same logits
    bit for bit (bfloat16: the rotary frequencies stay float32 in memory as on reload)."""
    if dtype != tiny.dtype:
        tiny = load(tiny.spec, dtype=dtype)
    r = _direction(tiny.layout.d_model, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        with A.orthogonalised(tiny.layout, r, model=tiny.model, source_layer=1) as info:
            edited = _logits(tiny.model, _batch(tiny))
            out = A.export(tiny.model, tiny.tokenizer, tmp_path / "abl",
                           metadata={"edit": info.as_json()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl"], "no temporary leftovers"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    meta = json.loads((out / A.EXPORT_METADATA_FILE).read_text())
    assert meta["refusalbench"]["edit"]["direction_sha256"] == info.direction_sha256
    reloaded = load(str(out), cache_dir=tmp_path / "cache", dtype=dtype)
    torch.testing.assert_close(_logits(reloaded.model, _batch(reloaded)), edited, rtol=0,
                               atol=0)


def test_export_refuses_an_existing_directory_unless_overwrite(tiny: LoadedModel,
                                                               tmp_path: Path) -> None:
    out = A.export(tiny.model, tiny.tokenizer, tmp_path / "m")
    with pytest.raises(ExportError, match="already exists"):
        A.export(tiny.model, tiny.tokenizer, out)
    (out / "stale.txt").write_text("x")
    A.export(tiny.model, tiny.tokenizer, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_export_into_a_read_only_directory_fails_cleanly(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        probe = ro / ".probe"
        try:
            probe.mkdir()
            probe.rmdir()
            writable = True  # root ignores permission bits: simulate the refusal instead
        except PermissionError:
            writable = False
        if writable:
            real_mkdir = pathlib.Path.mkdir

            def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
                if self.parent == ro:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
        with pytest.raises(ExportError, match="read-only or not writable"):
            A.export(tiny.model, tiny.tokenizer, ro / "model")
        monkeypatch.undo()
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(stat.S_IRWXU)


def test_export_under_a_file_fails_cleanly(tiny: LoadedModel, tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("not a directory")
    with pytest.raises(ExportError, match="is a file"):
        A.export(tiny.model, tiny.tokenizer, f / "model")
    with pytest.raises(ExportError, match="is a file"):
        A.export(tiny.model, tiny.tokenizer, f / "deeper" / "model")
    with pytest.raises(ExportError, match="existing file"):
        A.export(tiny.model, tiny.tokenizer, f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_export_on_a_full_disk_fails_cleanly(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a" / "b" / "model"
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    with pytest.raises(ExportError, match="not enough free space"):
        A.export(tiny.model, tiny.tokenizer, target)
    assert list(tmp_path.iterdir()) == [], "created parents are removed again"
    monkeypatch.undo()

    def full(self: Any, save_directory: str, **_: Any) -> None:
        Path(save_directory, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tiny.model), "save_pretrained", full)
    with pytest.raises(ExportError, match="disk is full"):
        A.export(tiny.model, tiny.tokenizer, target)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- selection


def test_first_token_kl_is_zero_for_identical_and_positive_otherwise(llama: LoadedModel) -> None:
    tiny = llama
    texts = tiny.format(PROMPTS)
    logp = A.first_token_logprobs(tiny.model, tiny.tokenizer, texts, batch_size=3)
    assert logp.shape == (len(PROMPTS), tiny.model.config.vocab_size)
    one = A.first_token_logprobs(tiny.model, tiny.tokenizer, texts[:1], batch_size=1)
    torch.testing.assert_close(one[0], logp[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(A.first_token_kl(logp, logp), 0.0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        with A.orthogonalised(tiny.layout, _direction(tiny.layout.d_model)):
            logq = A.first_token_logprobs(tiny.model, tiny.tokenizer, texts)
    kl = A.first_token_kl(logp, logq)
    assert kl.shape == (len(PROMPTS),) and bool(np.all(kl > 0))
    # KL(p || q) by its definition, with scipy.
    import scipy.special

    p = logp.double().exp().numpy()
    ref = scipy.special.rel_entr(p, np.exp(logq.double().numpy())).sum(axis=1)
    np.testing.assert_allclose(kl, ref, rtol=1e-6, atol=1e-9)


def test_auc_selection_picks_the_separating_layer() -> None:
    rng = np.random.default_rng(0)
    n_layers, d = 5, 8
    h = rng.normal(size=(30, n_layers, d))
    b = rng.normal(size=(30, n_layers, d))
    h[:, 3, 0] += 4.0  # layer 3 separates along axis 0
    h[:, 2, 0] += 1.0
    r = np.zeros((n_layers, d))
    r[:, 0] = 1.0
    r[0] = 0.0  # a degenerate direction (identical last tokens at layer 0)
    scores = A.projection_auc(r, h, b)
    assert not scores[0].valid and math.isnan(scores[0].auc.value)
    assert A.select_by_auc(scores) == 3
    assert scores[3].auc.value > 0.95 and scores[3].auc.lo <= scores[3].auc.value
    # Exact AUC ties are broken by the larger held-out Cohen's d.
    h2 = h.copy()
    h2[:, 2, 0] += 40.0
    h2[:, 3, 0] += 5.0
    tied = A.projection_auc(r, h2, b)
    assert tied[2].auc.value == tied[3].auc.value == 1.0
    assert A.select_by_auc(tied) == 2
    assert A.max_auc_layers(tied) == [2, 3]
    # With bypass scores, the tie goes to the direction whose removal lowers refusal most.
    assert A.select_by_auc(tied, {2: 0.5, 3: -1.0, 1: -9.0}) == 3
    assert A.select_by_auc(tied, {3: math.nan}) == 2  # missing/NaN scores rank last
    with pytest.raises(ValueError, match="no layer"):
        A.select_by_auc(scores[:1])


def test_arditi_sweep_follows_the_published_filters(llama: LoadedModel) -> None:
    tiny = llama
    from probes.judges import refusal_logit_scores

    rng = torch.Generator().manual_seed(0)
    dirs = {layer: torch.randn(tiny.layout.d_model, generator=rng) * 3
            for layer in range(tiny.n_layers)}
    harmful, harmless = tiny.format(PROMPTS[:2]), tiny.format(PROMPTS[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", A.InexactOrthogonalisationWarning)
        full = A.arditi_sweep(tiny.model, tiny.tokenizer, tiny.layout, dirs, harmful, harmless,
                              kl_threshold=math.inf, exhaustive=True)
        lazy = A.arditi_sweep(tiny.model, tiny.tokenizer, tiny.layout, dirs, harmful, harmless,
                              kl_threshold=math.inf)
    assert full.prune_from == int(tiny.n_layers * 0.8) == 3
    assert sorted(full.bypass) == list(range(tiny.n_layers))
    assert sorted(full.kl) == [0, 1, 2]  # the last 20 % are pruned, never scored
    assert 3 in full.reasons and "last 20%" in full.reasons[3]
    eligible = [lyr for lyr in range(3) if full.induce[lyr] >= 0.0]
    expected = min(eligible, key=lambda lyr: full.bypass[lyr]) if eligible else None
    assert full.selected == lazy.selected == expected
    assert full.baseline_harmful == pytest.approx(float(np.mean(refusal_logit_scores(
        tiny.model, tiny.tokenizer, harmful))))
    # The KL filter: a threshold below every KL discards every layer.
    strict = A.arditi_sweep(tiny.model, tiny.tokenizer, tiny.layout, dirs, harmful, harmless,
                            kl_threshold=-1.0)
    assert strict.selected is None and all("KL" in strict.reasons[lyr] for lyr in range(3))
    again = A.ArditiSweep.from_json(json.loads(json.dumps(full.as_json())))
    assert again == full


def test_cli_split_matches_the_benchmark_suite() -> None:
    from fixtures.workbench import SPLIT_FRACTIONS

    assert A.CLI_SPLIT_FRACTIONS == SPLIT_FRACTIONS


def test_cli_abliterates_and_exports_a_tiny_model(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny-abl"
    code = A.main(["--model", "tiny-llama", "--out", str(out), "--n-train", "4",
                   "--n-val", "4", "--n-test", "3", "--max-new-tokens", "3",
                   "--norm-preserve"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "harmful refusal" in printed and "McNemar" in printed
    assert "judged by four_class" in printed
    meta = json.loads((out / A.EXPORT_METADATA_FILE).read_text())["refusalbench"]
    assert meta["edit"]["norm_preserve"] is True
    assert meta["figures"]["n_harmful"] == 3 and meta["figures"]["judge"] == "four_class"
    assert 0.0 <= meta["figures"]["mcnemar_p_harmful_drop"] <= 1.0
    assert len(meta["direction"]) == 64
    reloaded = load(str(out), cache_dir=tmp_path / "cache")
    assert reloaded.n_layers == 4
    # An existing target is a clear error, exit status 2, nothing overwritten.
    assert A.main(["--model", "tiny-llama", "--out", str(out), "--n-test", "0",
                   "--n-train", "4", "--n-val", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["tiny-abl", "cache"] or sorted(os.listdir(tmp_path)) == [
        "cache", "tiny-abl"]
