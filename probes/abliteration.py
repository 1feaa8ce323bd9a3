"""Abliteration: remove a refusal direction from the weights, export, select the direction.

Weight orthogonalisation (docs/science.md, "Abliteration"; Arditi et al. 2024)
    Every parameter that writes into the residual stream (the layout's
    :attr:`probes.layout.ResidualLayout.writers`: token embedding, attention output
    projections incl. ``linear_attn.out_proj`` of hybrid models, MLP ``down_proj``, stacked
    MoE expert tensors and shared experts) is replaced by ``W <- (I - r r^T) W`` along its
    residual axis (``Writer.out_axis``), and each bias by ``b <- (I - r r^T) b``, with r the
    unit direction. For a model whose residual writes are exactly these outputs, the edited
    model computes what the unedited model computes under
    :func:`probes.interventions.ablate_direction` (the component along r removed from every
    write, at every position); the unit tests prove it numerically on every supported
    architecture and on the embedded model.

    * ``norm_preserve=True`` rescales each edited matrix to its original Frobenius norm
      (stacked expert tensors ``[E, ...]`` per expert). The result still has no component
      along r, but it is no longer equal to the hook ablation (a scale factor per matrix).
      Biases are projected, never rescaled.
    * Tied embeddings (the unembedding shares its tensor with the input embedding): the
      edited embedding is a *new* parameter, so the unembedding keeps the original values
      (it is untied), and ``tie_word_embeddings`` is set to False in the config, so that an
      export keeps both matrices and reloads untied. :func:`orthogonalised` restores the tie
      on exit.
    * Sandwich-norm models (Gemma 2/3: a norm *after* ``o_proj``/``down_proj``) write
      ``norm(W x)`` into the stream; the norm's per-coordinate weight re-introduces a
      component along r, so the edit is **not** equivalent to ablating r from the residual
      stream. The layout marks them ``exact_orthogonalisation=False`` and every edit warns
      with :class:`InexactOrthogonalisationWarning`; use the hook ablation for the exact
      intervention there.

    Edits swap in new parameter tensors (the originals are kept, untouched, by
    :func:`orthogonalised` only, and put back on exit, so the restore is bit-exact and costs
    no copy of the originals): memory grows by the size of the edited tensors.
    :func:`orthogonalise` without ``inplace`` returns a copy whose modules are new but whose
    *unedited* tensors (norms, q/k/v, gate/up projections, the untied unembedding) are the
    original's, shared rather than duplicated: the copy costs the edited tensors only. Both
    models stay usable for inference side by side; to modify either one's parameters in
    place afterwards (``.to(dtype)``, training), pass ``share_unedited=False`` for a full
    deep copy.

Export (:func:`export`)
    ``save_pretrained`` (safetensors) + tokenizer + ``abliteration.json`` into a temporary
    directory beside the target, then ``os.replace``; any failure removes the temporary
    directory and raises :class:`probes.errors.ExportError`. The directory loads with
    ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` or ``probes.models.load(dir)``.

Direction selection (:func:`projection_auc`, :func:`select_by_auc`, :func:`arditi_sweep`)
    The abliteration plan: candidates r_l per layer (mean difference at ``resid_pre``, last token,
    on the train split), the layer with the largest held-out AUC of the projection <h_l, r_l/|r_l|>;
    AUC saturates at 1.0 at several layers on easy data, and exact ties are broken by the
    lowest bypass score (below), i.e. by what removing the direction does to refusal, on
    validation prompts (:func:`select_by_auc`). Arditi et al.'s
    selection beside it: bypass score = mean refusal logit score on harmful validation prompts
    with r_l ablated from every write; induce score = mean refusal logit score on harmless
    validation prompts with r_l added at the input of block l (all positions); KL = mean
    first-token KL(original || ablated) on harmless validation prompts; discard layers in the
    last 20 % of depth, with KL > 0.1 or induce score < 0; pick the lowest bypass score.

Command line (:func:`main`)::

    python -m probes.abliteration --model default --out DIR [--layer N|auto]
        [--select auc|arditi] [--norm-preserve]

selects the direction as above, prints refusal before/after on held-out prompts, and writes
``DIR/model.safetensors`` (+ config, generation config, tokenizer, ``abliteration.json``).
"""

from __future__ import annotations

import argparse
import copy
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from probes.capture import last_position_logits, model_device
from probes.errors import ExportError
from probes.interventions import ablate_direction, plan_raw, steer
from probes.judges import refusal_logit_scores
from probes.layout import ResidualLayout, Writer, find_layout
from probes.stats import Estimate, FloatArray, auc_interval, cohens_d

__all__ = [
    "ARDITI_INDUCE_THRESHOLD",
    "ARDITI_KL_THRESHOLD",
    "ARDITI_PRUNE_FRACTION",
    "EXPORT_METADATA_FILE",
    "AbliterationInfo",
    "ArditiSweep",
    "InexactOrthogonalisationWarning",
    "LayerAUC",
    "arditi_sweep",
    "bypass_scores",
    "direction_sha256",
    "edit_key",
    "export",
    "first_token_kl",
    "first_token_logprobs",
    "main",
    "max_auc_layers",
    "orthogonalise",
    "orthogonalised",
    "project_out",
    "projection_auc",
    "select_by_auc",
    "unit_direction",
]

ARDITI_KL_THRESHOLD = 0.1
"""Arditi et al.'s filter: discard a direction whose ablation moves the first-token
distribution on harmless prompts by KL > 0.1."""
ARDITI_PRUNE_FRACTION = 0.2
"""Arditi et al.'s filter: discard directions from the last 20 % of layers
(layer >= int(n_layers * 0.8))."""
ARDITI_INDUCE_THRESHOLD = 0.0
"""Arditi et al.'s filter: discard a direction whose addition does not induce refusal on
harmless prompts (mean refusal logit score < 0)."""
EXPORT_METADATA_FILE = "abliteration.json"
EDIT_VERSION = "1"


class InexactOrthogonalisationWarning(UserWarning):
    """The model normalises its attention/MLP outputs after the projection (sandwich norms):
    orthogonalising the projection weights does not remove the direction from the residual
    stream, so the edit is not equivalent to the hook ablation."""


# --------------------------------------------------------------------------- directions


def unit_direction(direction: torch.Tensor | npt.ArrayLike, d_model: int | None = None
                   ) -> torch.Tensor:
    """``direction / ||direction||`` as float32 ``[d_model]``; rejects zero or non-finite input."""
    r = torch.as_tensor(np.asarray(direction) if not isinstance(direction, torch.Tensor)
                        else direction).detach().to("cpu", torch.float64).reshape(-1)
    if d_model is not None and r.numel() != d_model:
        raise ValueError(f"direction has {r.numel()} values, the model's residual stream has "
                         f"{d_model}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("direction has non-finite values")
    norm = float(r.norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError("direction has zero norm: there is nothing to remove")
    return (r / norm).to(torch.float32)


def direction_sha256(direction: torch.Tensor | npt.ArrayLike) -> str:
    """sha256 of the float32 bytes of the unit direction (identifies an edit in cache keys)."""
    u = unit_direction(direction)
    return hashlib.sha256(u.numpy().tobytes()).hexdigest()


_CHUNK_ELEMENTS = 1 << 22  # working-precision elements per chunk of project_out: 16 MiB


def project_out(tensor: torch.Tensor, unit: torch.Tensor, axis: int,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(I - u u^T)`` applied along ``axis`` of ``tensor``: a new tensor whose slices along
    ``axis`` are orthogonal to ``unit``. Computed in float32 (float64 for float64 input),
    chunk by chunk, and stored as ``out_dtype`` (default: that working precision), so a
    bfloat16 embedding matrix never needs a full float32 copy."""
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    src = tensor.detach().movedim(axis, -1)
    d = src.shape[-1]
    flat = src.reshape(-1, d)
    out = torch.empty(flat.shape, dtype=out_dtype or work, device=flat.device)
    u = unit.to(device=flat.device, dtype=work)
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, flat.shape[0], step):
        x = flat[start:start + step].to(work)
        out[start:start + step] = x - (x @ u).unsqueeze(-1) * u
    return out.reshape(src.shape).movedim(-1, axis)


def _rescale_to(new: torch.Tensor, old: torch.Tensor, per_expert: bool) -> torch.Tensor:
    """``new`` scaled to the Frobenius norm of ``old`` (per slice of axis 0 if per_expert)."""
    dims = tuple(range(1, new.dim())) if per_expert else tuple(range(new.dim()))
    n_old = torch.linalg.vector_norm(old.detach().to(new.dtype), dim=dims, keepdim=True)
    n_new = torch.linalg.vector_norm(new, dim=dims, keepdim=True)
    scale = torch.where(n_new > 0, n_old / torch.where(n_new > 0, n_new, 1.0), 1.0)
    return new * scale


# --------------------------------------------------------------------------- weight edits


@dataclass(frozen=True)
class AbliterationInfo:
    """What an edit did; ``key()`` identifies it in cache keys and export metadata."""

    direction_sha256: str
    layers: tuple[int, ...] | None  # edited writer layers; None = all
    include_embedding: bool
    norm_preserve: bool
    exact: bool  # the edit equals the hook ablation (False for sandwich-norm models)
    writers: tuple[str, ...]
    untied_embedding: bool
    source_layer: int | None = None  # where the direction came from, when known

    def key(self) -> str:
        return _key(self.direction_sha256, self.layers, self.include_embedding,
                    self.norm_preserve, self.source_layer)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["writers"] = list(self.writers)
        d["edit_version"] = EDIT_VERSION
        return d


def _key(sha: str, layers: Sequence[int] | None, include_embedding: bool, norm_preserve: bool,
         source_layer: int | None) -> str:
    lay = "all" if layers is None else ",".join(map(str, layers))
    return (f"abl-v{EDIT_VERSION}:r={sha[:16]}:src={source_layer}:layers={lay}:"
            f"emb={int(include_embedding)}:norm={int(norm_preserve)}")


def edit_key(
    direction: torch.Tensor | npt.ArrayLike,
    layers: Sequence[int] | None = None,
    *,
    include_embedding: bool = True,
    norm_preserve: bool = False,
    source_layer: int | None = None,
) -> str:
    """The cache key of an edit before it is made (equals ``AbliterationInfo.key()``): the
    direction's hash, the source layer, the edited layers, embedding and norm flags."""
    chosen = None if layers is None else tuple(sorted(set(layers)))
    return _key(direction_sha256(direction), chosen, include_embedding, norm_preserve,
                source_layer)


@dataclass
class _Swap:
    module: nn.Module
    name: str
    original: nn.Parameter


def _warn_if_inexact(layout: ResidualLayout) -> None:
    if not layout.exact_orthogonalisation:
        warnings.warn(
            f"{layout.model_type}: this architecture normalises each attention/MLP output after "
            "its projection (sandwich norms), so orthogonalising o_proj/down_proj does not "
            "remove the direction from the residual stream: the edited model is NOT "
            "equivalent to ablating the direction (use probes.interventions.ablate_direction "
            "for the exact intervention)",
            InexactOrthogonalisationWarning,
            stacklevel=3,
        )


def _edited(param: torch.Tensor, unit: torch.Tensor, axis: int, norm_preserve: bool,
            per_expert: bool) -> torch.Tensor:
    if norm_preserve:  # the rescale needs the projected tensor at working precision
        return _rescale_to(project_out(param, unit, axis), param, per_expert).to(param.dtype)
    return project_out(param, unit, axis, out_dtype=param.dtype).contiguous()


def _swap_in(module: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    old = getattr(module, name)
    if not isinstance(old, nn.Parameter):
        raise TypeError(f"{type(module).__name__}.{name} is not a parameter")
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    return old


def _tie_configs(model: nn.Module | None, layout: ResidualLayout) -> list[Any]:
    """Config objects that declare tied word embeddings (model's and its text config's)."""
    owner = model if model is not None else layout.decoder
    config = getattr(owner, "config", None)
    if config is None:
        return []
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    return [c for c in configs if getattr(c, "tie_word_embeddings", False)]


def _refuse_offloaded(writers: Sequence[Writer]) -> None:
    """Refuse to edit weights that a ``device_map`` offloaded (to disk, or to the CPU from
    an accelerator): their parameters are ``meta`` placeholders that accelerate refills from
    its offload store before every forward pass, so an edit would be silently lost."""
    offloaded = [w.name for w in writers
                 if w.param.device.type == "meta"
                 or (w.bias is not None and w.bias.device.type == "meta")]
    if offloaded:
        raise ExportError(
            f"cannot orthogonalise weights offloaded by the device_map ({len(offloaded)} "
            f"writer(s), e.g. {offloaded[0]}): accelerate reloads them from its offload "
            "store on every forward pass, so the edit would not take effect",
            "load the model without offloading (a device_map/max_memory that keeps every "
            "block on a device), or use probes.interventions.ablate_direction, the exact "
            "hook form of the same edit, which works with offloaded blocks",
        )


def _apply(
    layout: ResidualLayout,
    unit: torch.Tensor,
    layers: Sequence[int] | None,
    include_embedding: bool,
    norm_preserve: bool,
    model: nn.Module | None,
) -> tuple[list[_Swap], list[Any], AbliterationInfo]:
    """Swap edited tensors into the writers; return what to restore and what was done."""
    chosen = None if layers is None else tuple(sorted(set(layout.check_layers(list(layers)))))
    writers: list[Writer] = layout.writers_at(None if chosen is None else list(chosen),
                                              include_embedding)
    _refuse_offloaded(writers)
    swaps: list[_Swap] = []
    seen: set[tuple[int, str]] = set()
    tied: list[Any] = []
    try:
        with torch.no_grad():
            for w in writers:
                per_expert = w.param.dim() == 3
                key = (id(w.module), w.param_name)
                if key not in seen:
                    seen.add(key)
                    new = _edited(w.param, unit, w.out_axis, norm_preserve, per_expert)
                    swaps.append(_Swap(w.module, w.param_name, _swap_in(w.module, w.param_name,
                                                                         new)))
                bias = w.bias
                if bias is not None and w.bias_name is not None:
                    bkey = (id(w.module), w.bias_name)
                    if bkey not in seen:
                        seen.add(bkey)
                        new_b = project_out(bias, unit, bias.dim() - 1).to(bias.dtype)
                        swaps.append(_Swap(w.module, w.bias_name,
                                           _swap_in(w.module, w.bias_name, new_b)))
            if include_embedding and any(w.kind == "embedding" for w in writers):
                tied = _tie_configs(model, layout)
                for c in tied:
                    c.tie_word_embeddings = False
    except BaseException:
        _restore(swaps, tied)
        raise
    info = AbliterationInfo(
        direction_sha256=hashlib.sha256(unit.numpy().tobytes()).hexdigest(),
        layers=chosen, include_embedding=include_embedding, norm_preserve=norm_preserve,
        exact=layout.exact_orthogonalisation, writers=tuple(w.name for w in writers),
        untied_embedding=bool(tied),
    )
    return swaps, tied, info


def _restore(swaps: list[_Swap], tied: list[Any]) -> None:
    for s in reversed(swaps):
        setattr(s.module, s.name, s.original)
    for c in tied:
        c.tie_word_embeddings = True


def orthogonalise(
    model: nn.Module,
    direction: torch.Tensor | npt.ArrayLike,
    layers: Sequence[int] | None = None,
    *,
    include_embedding: bool = True,
    norm_preserve: bool = False,
    inplace: bool = False,
    share_unedited: bool = True,
) -> nn.Module:
    """The model with ``direction`` projected out of every residual writer (of ``layers``).

    Returns an edited copy, leaving ``model`` untouched, unless ``inplace=True`` (then
    ``model`` itself is edited permanently and returned). The copy shares the tensors the
    edit does not change with ``model`` (``share_unedited``; see the module docstring), so
    it costs only the edited tensors' memory. See the module docstring for tied
    embeddings, norm preservation and sandwich-norm models (which warn).
    """
    layout = find_layout(model)
    unit = unit_direction(direction, layout.d_model)
    _warn_if_inexact(layout)
    if inplace:
        target = model
    elif share_unedited:
        # New module objects over the same tensors; the edit then swaps new tensors into the
        # copy's modules only (never writes into a tensor), so ``model`` keeps its own.
        memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        target = copy.deepcopy(model, memo)
    else:
        target = copy.deepcopy(model)
    layout = find_layout(target)
    _apply(layout, unit, layers, include_embedding, norm_preserve, target)
    return target


@contextmanager
def orthogonalised(
    layout: ResidualLayout,
    direction: torch.Tensor | npt.ArrayLike,
    layers: Sequence[int] | None = None,
    *,
    include_embedding: bool = True,
    norm_preserve: bool = False,
    model: nn.Module | None = None,
    source_layer: int | None = None,
) -> Iterator[AbliterationInfo]:
    """Edit the model of ``layout`` in place while the context is open; restore on exit.

    The original parameter tensors are kept (untouched) and put back in ``finally``, also on
    an exception: the model is bit-identical afterwards, ties included. Pass ``model`` (the
    ``...ForCausalLM``) when the config that declares tied embeddings is not the decoder's.
    """
    unit = unit_direction(direction, layout.d_model)
    _warn_if_inexact(layout)
    swaps, tied, info = _apply(layout, unit, layers, include_embedding, norm_preserve, model)
    try:
        yield replace(info, source_layer=source_layer)
    finally:
        _restore(swaps, tied)


# --------------------------------------------------------------------------- export


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _hint(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the location is read-only or not writable by you: choose a writable directory"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free some space or export to another disk"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a path component is a file, not a directory: choose a path inside a directory"
    return "nothing was left behind; check the location and try again"


def export(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (safetensors), its config, generation config and ``tokenizer`` to
    ``out_dir``, plus ``abliteration.json`` with ``metadata``; return the directory.

    Written into a temporary directory beside ``out_dir`` and renamed into place; on any
    failure the temporary directory is removed and :class:`ExportError` is raised, so no
    partial model directory is ever left. An existing ``out_dir`` is replaced only with
    ``overwrite=True``.
    """
    out = Path(out_dir).expanduser().absolute()
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise ExportError(f"cannot export to {out}: it is an existing file",
                          "choose a directory path that does not exist yet")
    if out.exists() and not overwrite:
        raise ExportError(f"cannot export to {out}: the directory already exists",
                          "choose a new directory, or pass overwrite=True (--overwrite)")
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise ExportError(
                    f"cannot export to {out}: {anc} is a file, not a directory",
                    "choose a path inside a directory")
            break
    created: list[Path] = []
    for anc in reversed([parent, *parent.parents]):
        if not anc.exists():
            try:
                anc.mkdir()
            except OSError as exc:
                for c in reversed(created):
                    c.rmdir()
                raise ExportError(f"cannot create {anc} to export the model to {out}: {exc}",
                                  _hint(exc)) from exc
            created.append(anc)
    need = _model_bytes(model)
    free = shutil.disk_usage(parent).free
    if free < need * 1.05 + (16 << 20):
        for c in reversed(created):
            c.rmdir()
        raise ExportError(
            f"not enough free space to export the model to {out}: it needs about "
            f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free",
            "free some space or export to another disk")
    tmp = parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    aside: Path | None = None
    try:
        tmp.mkdir()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if not any(tmp.glob("*.safetensors")):
            raise ExportError(f"save_pretrained wrote no safetensors file into {tmp}",
                              "this model class does not save safetensors; please report it")
        meta = {"refusalbench": dict(metadata or {}), "files": sorted(
            p.name for p in tmp.glob("*.safetensors"))}
        (tmp / EXPORT_METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True,
                                                           default=str))
        if out.exists():
            aside = parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, aside)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not out.exists():
            os.replace(aside, out)
        for c in reversed(created):
            if c.exists() and not any(c.iterdir()):
                c.rmdir()
        if isinstance(exc, ExportError) or not isinstance(exc, Exception):
            raise
        raise ExportError(f"could not export the model to {out}: {type(exc).__name__}: {exc}",
                          _hint(exc)) from exc
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- scores


def first_token_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """``[n, vocab]`` float32 log-probabilities of the first generated token of each
    chat-formatted prompt (one forward pass per batch, left padding, the shared prefix run
    once: :func:`probes.capture.last_position_logits`; on the CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = last_position_logits(model, tokenizer, [prompts[i] for i in idx], device)
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, i in enumerate(idx):
                out[i] = logp[row]
    return torch.stack([t for t in out if t is not None])


def first_token_kl(logp: torch.Tensor, logq: torch.Tensor) -> FloatArray:
    """``[n]`` KL(p || q) = sum_v p_v (log p_v - log q_v) of log-probability rows (float64)."""
    if logp.shape != logq.shape:
        raise ValueError(f"shapes differ: {tuple(logp.shape)} vs {tuple(logq.shape)}")
    p64, q64 = logp.double(), logq.double()
    kl = (p64.exp() * (p64 - q64)).sum(dim=-1).clamp(min=0.0)
    return np.asarray(kl.numpy(), dtype=np.float64)


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class LayerAUC:
    """Held-out separation of the projection on r_l at one layer."""

    layer: int
    auc: Estimate
    cohens_d: float
    valid: bool  # False when r_l is (numerically) zero, e.g. at a layer where every prompt
    # ends in the same token and nothing has mixed in yet


def projection_auc(
    directions: npt.ArrayLike, harmful: npt.ArrayLike, harmless: npt.ArrayLike
) -> list[LayerAUC]:
    """Per layer, AUC (Hanley-McNeil interval) and Cohen's d of <h_l, r_l / |r_l|> on
    held-out ``harmful`` vs ``harmless`` activations ``[n, L, d]``; ``directions`` ``[L, d]``."""
    r = np.asarray(directions, dtype=np.float64)
    h = np.asarray(harmful, dtype=np.float64)
    b = np.asarray(harmless, dtype=np.float64)
    if r.ndim != 2 or h.ndim != 3 or b.ndim != 3 or h.shape[1:] != r.shape or \
            b.shape[1:] != r.shape:
        raise ValueError(f"need directions [L, d] and activations [n, L, d]; got {r.shape}, "
                         f"{h.shape}, {b.shape}")
    out: list[LayerAUC] = []
    scale = max(float(np.abs(r).max()) if r.size else 0.0, 1.0)
    for layer in range(r.shape[0]):
        norm = float(np.linalg.norm(r[layer]))
        if norm <= 1e-9 * scale:
            nan = Estimate(math.nan, math.nan, math.nan, h.shape[0] + b.shape[0],
                           "hanley_mcneil")
            out.append(LayerAUC(layer, nan, math.nan, False))
            continue
        u = r[layer] / norm
        ph, pb = h[:, layer] @ u, b[:, layer] @ u
        out.append(LayerAUC(layer, auc_interval(ph, pb), cohens_d(ph, pb), True))
    return out


def max_auc_layers(scores: Sequence[LayerAUC]) -> list[int]:
    """The layers whose held-out AUC equals the maximum (AUC saturates at 1.0 on easy data)."""
    valid = [s for s in scores if s.valid and not math.isnan(s.auc.value)]
    if not valid:
        raise ValueError("no layer has a usable direction")
    top = max(s.auc.value for s in valid)
    return [s.layer for s in valid if s.auc.value == top]


def select_by_auc(scores: Sequence[LayerAUC], tie_break: Mapping[int, float] | None = None
                  ) -> int:
    """The layer with the largest held-out AUC (the abliteration plan's choice).

    Exact ties (AUC = 1.0 at several layers is common) are broken by the lowest
    ``tie_break`` value, meant to be the bypass score (mean refusal logit score of harmful
    validation prompts with r_l ablated, :func:`bypass_scores`): among directions that
    separate the classes equally well, the one whose removal suppresses refusal most. Without
    ``tie_break`` (or among layers it does not cover) by the larger held-out Cohen's d, then
    the earlier layer.
    """
    tied = max_auc_layers(scores)
    by_layer = {s.layer: s for s in scores}

    def key(layer: int) -> tuple[float, float, int]:
        tb = math.inf if tie_break is None else tie_break.get(layer, math.inf)
        d = by_layer[layer].cohens_d
        return (tb if not math.isnan(tb) else math.inf,
                -d if not math.isnan(d) else math.inf, layer)

    return min(tied, key=key)


def bypass_scores(
    model: Any,
    tokenizer: Any,
    layout: ResidualLayout,
    directions: Mapping[int, torch.Tensor],
    harmful: Sequence[str],
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """{layer: mean refusal logit score of chat-formatted ``harmful`` prompts with r_l ablated
    from every residual write} (Arditi et al.'s bypass score; one forward pass per layer)."""
    out: dict[int, float] = {}
    t0 = time.perf_counter()
    for i, layer in enumerate(sorted(directions)):
        with ablate_direction(layout, directions[layer]):
            out[layer] = float(np.mean(refusal_logit_scores(model, tokenizer, harmful,
                                                            batch_size)))
        if progress is not None:
            progress(f"[arditi] bypass L{layer}: {out[layer]:+.2f} ({i + 1}/{len(directions)}, "
                     f"{time.perf_counter() - t0:.0f}s)")
    return out


@dataclass
class ArditiSweep:
    """Arditi et al.'s per-layer scores (NaN where not computed) and their selection."""

    layers: list[int]
    bypass: dict[int, float]  # mean refusal score, harmful, r_l ablated everywhere
    induce: dict[int, float] = field(default_factory=dict)  # harmless, r_l added at block l
    kl: dict[int, float] = field(default_factory=dict)  # harmless, first-token KL under ablation
    baseline_harmful: float = math.nan
    baseline_harmless: float = math.nan
    n_layers: int = 0
    kl_threshold: float = ARDITI_KL_THRESHOLD
    prune_fraction: float = ARDITI_PRUNE_FRACTION
    induce_threshold: float = ARDITI_INDUCE_THRESHOLD
    selected: int | None = None
    reasons: dict[int, str] = field(default_factory=dict)  # why a layer was discarded

    @property
    def prune_from(self) -> int:
        return int(self.n_layers * (1.0 - self.prune_fraction))

    def as_json(self) -> dict[str, Any]:
        return {k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ArditiSweep:
        kw = dict(d)
        for k in ("bypass", "induce", "kl"):
            kw[k] = {int(kk): float(vv) for kk, vv in d[k].items()}
        kw["reasons"] = {int(kk): str(vv) for kk, vv in d["reasons"].items()}
        return cls(**kw)


def arditi_sweep(
    model: Any,
    tokenizer: Any,
    layout: ResidualLayout,
    directions: Mapping[int, torch.Tensor],
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    batch_size: int = 32,
    kl_threshold: float = ARDITI_KL_THRESHOLD,
    prune_fraction: float = ARDITI_PRUNE_FRACTION,
    induce_threshold: float = ARDITI_INDUCE_THRESHOLD,
    exhaustive: bool = False,
    always: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
) -> ArditiSweep:
    """Arditi et al.'s direction selection over candidate ``directions`` {layer: raw r_l}.

    ``harmful``/``harmless`` are chat-formatted validation prompts. The bypass score is
    computed for every candidate (one forward pass of ``harmful`` each: the refusal-vs-layer
    sweep); induce score and KL are then computed for the unpruned candidates in order of
    increasing bypass score until one passes both filters (``exhaustive=True``: for all),
    which selects the same layer as scoring every candidate. Layers in ``always`` are scored
    in any case (e.g. the layer another rule picked, to see whether it passes the filters).
    """
    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    layers = sorted(directions)
    sweep = ArditiSweep(layers=layers, bypass={}, n_layers=layout.n_layers,
                        kl_threshold=kl_threshold, prune_fraction=prune_fraction,
                        induce_threshold=induce_threshold)
    sweep.baseline_harmful = float(np.mean(refusal_logit_scores(model, tokenizer, harmful,
                                                                batch_size)))
    base_logp = first_token_logprobs(model, tokenizer, harmless, batch_size)
    sweep.baseline_harmless = float(np.mean(refusal_logit_scores(model, tokenizer, harmless,
                                                                 batch_size)))
    sweep.bypass = bypass_scores(model, tokenizer, layout, directions, harmful, batch_size,
                                 progress)
    order = sorted((lyr for lyr in layers if not math.isnan(sweep.bypass[lyr])),
                   key=lambda lyr: sweep.bypass[lyr])
    extra = set(always)
    for layer in order:
        pruned = layer >= sweep.prune_from
        if pruned:
            sweep.reasons[layer] = f"in the last {prune_fraction:.0%} of layers"
        if (pruned or (sweep.selected is not None and not exhaustive)) and layer not in extra:
            if not pruned:
                sweep.reasons[layer] = "not scored (a layer with a lower bypass score passed)"
            continue
        with ablate_direction(layout, directions[layer]):
            logq = first_token_logprobs(model, tokenizer, harmless, batch_size)
        sweep.kl[layer] = float(np.mean(first_token_kl(base_logp, logq)))
        with steer(layout, plan_raw({layer: directions[layer]}, 1.0)):
            sweep.induce[layer] = float(np.mean(refusal_logit_scores(model, tokenizer,
                                                                     harmless, batch_size)))
        say(f"[arditi] L{layer}: KL {sweep.kl[layer]:.3f}, induce {sweep.induce[layer]:+.2f}")
        if pruned:
            continue
        if sweep.kl[layer] > kl_threshold:
            sweep.reasons[layer] = f"KL {sweep.kl[layer]:.3f} > {kl_threshold}"
        elif sweep.induce[layer] < induce_threshold:
            sweep.reasons[layer] = f"induce score {sweep.induce[layer]:+.2f} < {induce_threshold}"
        elif sweep.selected is None:
            sweep.selected = layer
    return sweep


# --------------------------------------------------------------------------- command line

# Same held-out design as the benchmark suite (fixtures.workbench.SPLIT_FRACTIONS).
CLI_SPLIT_FRACTIONS = (0.4, 0.2, 0.4)


def _parse_layer(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer must be 'auto' or an integer, got {text!r}"
                                         ) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m probes.abliteration",
        description="Remove the refusal direction from a model's weights and save the result "
                    "as a safetensors model directory (config, tokenizer, abliteration.json).")
    p.add_argument("--model", default="default",
                   help="model spec: alias, .gguf file, HF directory or cached HF id")
    p.add_argument("--out", required=True, help="directory to create for the edited model")
    p.add_argument("--layer", type=_parse_layer, default=None, metavar="N|auto",
                   help="source layer of the direction (default auto: see --select)")
    p.add_argument("--select", choices=["auc", "arditi"], default="auc",
                   help="auto layer choice: held-out projection AUC (default) or "
                        "Arditi et al.'s bypass/induce/KL selection (one pass per layer)")
    p.add_argument("--norm-preserve", action="store_true",
                   help="rescale every edited matrix to its original Frobenius norm")
    p.add_argument("--n-train", type=int, default=64, help="prompts per class for r_l")
    p.add_argument("--n-val", type=int, default=32,
                   help="validation prompts per class for the projection AUC")
    p.add_argument("--n-sweep", type=int, default=8,
                   help="validation prompts per class for bypass/induce/KL scores")
    p.add_argument("--n-test", type=int, default=32,
                   help="held-out prompts per class for the before/after figures (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--judge", default=None, metavar="NAME|MODULE:FUNCTION",
                   help="reply judge for the before/after refusal rates: a registered name "
                        "(default four_class) or module:function, as the suite's --judge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    args = _parser().parse_args(argv)
    # The CLI reads the packaged prompt sets; the library functions above never do.
    import prompts as prompt_sets
    from probes.capture import capture
    from probes.directions import mean_diff_per_layer
    from probes.errors import BenchError
    from probes.generation import generate
    from probes.models import load
    from probes.reply_judges import resolve_judge
    from probes.stats import mcnemar_one_sided_p, rate

    def say(msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    t_start = time.perf_counter()
    try:
        judge = resolve_judge(args.judge)
        lm = load(args.model, device=args.device, dtype=args.dtype)
        harm = prompt_sets.advbench().split(args.seed, CLI_SPLIT_FRACTIONS, stratify="category")
        safe = prompt_sets.harmless().where("language", "en").split(
            args.seed, CLI_SPLIT_FRACTIONS, stratify="topic")
        s = args.seed
        tr_h = harm.train.sample(args.n_train, s, "category")
        tr_b = safe.train.sample(args.n_train, s, "topic")
        va_h = harm.val.sample(args.n_val, s, "category")
        va_b = safe.val.sample(args.n_val, s, "topic")
        say(f"[abliterate] {lm.name}: {lm.n_layers} layers; directions from {len(tr_h)} + "
            f"{len(tr_b)} train prompts, selection on {len(va_h)} + {len(va_b)} val prompts")

        def acts(ps: Any) -> npt.NDArray[np.float64]:
            a = capture(lm.layout, lm.tokenizer, lm.format(list(ps.texts)), site="resid_pre",
                        positions="last", batch_size=args.batch_size)
            return np.asarray(a.numpy(), dtype=np.float64)

        raw = mean_diff_per_layer(acts(tr_h), acts(tr_b))  # [L, d]
        aucs = projection_auc(raw, acts(va_h), acts(va_b))
        tied = max_auc_layers(aucs)
        cands = {a.layer: torch.from_numpy(raw[a.layer]).float() for a in aucs if a.valid}
        fmt_h = lm.format(list(va_h.sample(args.n_sweep, s, "category").texts))
        fmt_b = lm.format(list(va_b.sample(args.n_sweep, s, "topic").texts))
        bypass = bypass_scores(lm.model, lm.tokenizer, lm.layout,
                               {k: cands[k] for k in tied}, fmt_h, args.batch_size,
                               say) if len(tied) > 1 else {}
        auc_layer = select_by_auc(aucs, bypass)
        say(f"[abliterate] AUC pick: layer {auc_layer} (AUC {aucs[auc_layer].auc.value:.3f}"
            + (f", tied with layers {tied}: lowest bypass score "
               f"{bypass[auc_layer]:+.2f}" if bypass else "") + ")")
        layer = args.layer
        if layer is None and args.select == "arditi":
            sweep = arditi_sweep(lm.model, lm.tokenizer, lm.layout, cands, fmt_h, fmt_b,
                                 batch_size=args.batch_size, progress=say)
            if sweep.selected is None:
                raise ExportError("Arditi et al.'s filters discarded every layer",
                                  "pass --layer N or --select auc")
            layer = sweep.selected
            say(f"[abliterate] Arditi pick: layer {layer} (bypass {sweep.bypass[layer]:+.2f}, "
                f"KL {sweep.kl[layer]:.3f}, induce {sweep.induce[layer]:+.2f})")
        if layer is None:
            layer = auc_layer
        layer = lm.layout.check_layers([layer])[0]
        direction = torch.from_numpy(raw[layer]).float()
        unit_direction(direction)  # fails clearly on a zero direction

        raw_h = list(harm.test.sample(args.n_test, s, "category").texts) \
            if args.n_test > 0 else []
        raw_b = list(safe.test.sample(args.n_test, s, "topic").texts) \
            if args.n_test > 0 else []
        te_h, te_b = lm.format(raw_h) if raw_h else [], lm.format(raw_b) if raw_b else []

        def refusals(texts: Sequence[str], asked: Sequence[str]) -> npt.NDArray[np.bool_]:
            """Per prompt: did the ``--judge`` class the reply a refusal (paired arrays)."""
            if not texts:
                return np.zeros(0, dtype=np.bool_)
            g = generate(lm.model, lm.tokenizer, texts, args.max_new_tokens, args.batch_size)
            return judge(g.texts, asked).refusal

        if te_h:
            say(f"[abliterate] generating {len(te_h) + len(te_b)} replies before the edit ...")
        before = (refusals(te_h, raw_h), refusals(te_b, raw_b))
        logp = first_token_logprobs(lm.model, lm.tokenizer, te_b, args.batch_size) \
            if te_b else None
        with orthogonalised(lm.layout, direction, norm_preserve=args.norm_preserve,
                            model=lm.model, source_layer=layer) as edit:
            if te_h:
                say(f"[abliterate] generating {len(te_h) + len(te_b)} replies after ...")
            after = (refusals(te_h, raw_h), refusals(te_b, raw_b))
            figures: dict[str, Any] = {}
            if te_h and te_b and logp is not None:
                kl = first_token_kl(logp, first_token_logprobs(lm.model, lm.tokenizer, te_b,
                                                               args.batch_size))
                figures = {
                    "n_harmful": len(te_h), "n_harmless": len(te_b),
                    "judge": judge.name,
                    "harmful_refusal_before": float(before[0].mean()),
                    "harmful_refusal_after": float(after[0].mean()),
                    "harmless_refusal_before": float(before[1].mean()),
                    "harmless_refusal_after": float(after[1].mean()),
                    "mcnemar_p_harmful_drop": mcnemar_one_sided_p(before[0], after[0], "drop"),
                    "mcnemar_p_harmless_rise": mcnemar_one_sided_p(before[1], after[1], "rise"),
                    "first_token_kl_mean": float(kl.mean()),
                    "max_new_tokens": args.max_new_tokens,
                }
            meta = {"source_model": lm.spec, "source_fingerprint": lm.fingerprint,
                    "selection": "manual" if args.layer is not None else args.select,
                    "auc_layer": auc_layer, "direction": direction.tolist(),
                    "edit": edit.as_json(), "figures": figures, "seed": args.seed}
            say(f"[abliterate] exporting to {args.out} ...")
            out = export(lm.model, lm.tokenizer, args.out, metadata=meta,
                         overwrite=args.overwrite)
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    lines = [f"abliterated {lm.name} with the layer-{layer} refusal direction "
             f"(norm preservation {'on' if args.norm_preserve else 'off'})",
             f"saved to {out} (model.safetensors, config.json, tokenizer, "
             f"{EXPORT_METADATA_FILE})"]
    if figures:
        def fmt(refused: npt.NDArray[np.bool_]) -> str:
            k, n = int(refused.sum()), len(refused)
            e = rate(k, n)
            return f"{k}/{n} = {e.value:.2f} [{e.lo:.2f}, {e.hi:.2f}]"

        lines += [
            f"refusals judged by {judge.name}; p-values: exact one-sided McNemar on the same "
            "prompts before and after",
            f"harmful refusal : {fmt(before[0])} -> {fmt(after[0])}  "
            f"(p for a drop = {figures['mcnemar_p_harmful_drop']:.3g})",
            f"harmless refusal: {fmt(before[1])} -> {fmt(after[1])}  "
            f"(p for a rise = {figures['mcnemar_p_harmless_rise']:.3g})",
            f"first-token KL(original || edited) on harmless prompts: mean "
            f"{figures['first_token_kl_mean']:.4f}",
        ]
    lines.append(f"wall time {time.perf_counter() - t_start:.0f}s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
