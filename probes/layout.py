"""Where the residual stream lives in a decoder model, for any supported architecture.

Everything that hooks or edits a model asks the :class:`ResidualLayout`; nothing else in
the suite hard-codes module names. A layout lists

* the decoder blocks (``resid_pre`` of block l is its input, ``resid_post`` its output),
* per block, the module whose output is the attention write and the MLP write into the
  residual stream (the sites ``attn_out`` and ``mlp_out``),
* per block, the attention's value projection ``v_proj`` (the site ``attn_v``), or None
  in a linear-attention layer, which mixes its values into a fused input projection,
* every weight that writes into the residual stream (:class:`Writer`): token embedding,
  attention output projections (``o_proj``; ``linear_attn.out_proj`` in hybrid models),
  MLP down projections, MoE expert down projections (3-D expert tensors) and shared
  experts. Weight orthogonalisation edits exactly these.

Architectures with a norm *after* the attention/MLP output (Gemma 2/3 "sandwich" norms)
write ``norm(o_proj(x))`` into the stream: the layout marks them ``exact_orthogonalisation``
False, because projecting ``o_proj`` no longer removes the direction from the write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from probes.errors import LayerOutOfRange, SiteUnavailable, UnsupportedArchitecture

WriterKind = Literal["embedding", "attn", "linear_attn", "mlp", "moe_experts", "shared_expert"]

_ATTN_NAMES = ("self_attn", "attention", "attn", "linear_attn", "mixer")
_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_VALUE_NAMES = ("v_proj",)
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MLP_OUT_NAMES = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h")
_POST_ATTN_NORMS = ("post_attention_layernorm",)
_POST_MLP_NORMS = ("post_feedforward_layernorm",)


@dataclass(frozen=True)
class Writer:
    """One parameter whose output lives in the residual stream.

    ``out_axis`` is the axis of ``param`` indexed by the residual dimension (0 for a
    ``Linear`` weight ``[d_model, d_in]``, 1 for an embedding ``[vocab, d_model]`` and for
    stacked expert weights ``[n_experts, d_model, d_ff]``).
    """

    name: str
    kind: WriterKind
    layer: int | None
    module: nn.Module
    param_name: str
    out_axis: int
    bias_name: str | None = None

    @property
    def param(self) -> torch.Tensor:
        p = getattr(self.module, self.param_name)
        assert isinstance(p, torch.Tensor)
        return p

    @property
    def bias(self) -> torch.Tensor | None:
        if self.bias_name is None:
            return None
        b = getattr(self.module, self.bias_name, None)
        return b if isinstance(b, torch.Tensor) else None


@dataclass
class ResidualLayout:
    """The residual-stream map of one model (see module docstring)."""

    model_type: str
    n_layers: int
    d_model: int
    decoder: nn.Module  # the base model: runs embeddings + blocks + final norm, no lm_head
    blocks: list[nn.Module]
    embedding: nn.Module
    final_norm: nn.Module | None
    attn_out_modules: list[nn.Module]  # output [batch, pos, d_model] = attention write
    mlp_out_modules: list[nn.Module]  # output [batch, pos, d_model] = MLP write
    layer_types: list[str]
    writers: list[Writer] = field(default_factory=list)
    exact_orthogonalisation: bool = True
    # per layer: the attention's v_proj (output [batch, pos, n_kv_heads * head_dim]), or
    # None where the layer has none (linear attention)
    value_modules: list[nn.Module | None] = field(default_factory=list)
    head_dim: int | None = None  # width of one key/value head; None if the config has none

    def value_layers(self) -> list[int]:
        """The layers whose attention has a value projection (the ``attn_v`` site)."""
        return [i for i, m in enumerate(self.value_modules) if m is not None]

    def value_module(self, layer: int) -> nn.Module:
        """The value projection of ``layer``; an error naming the layers that have one."""
        (idx,) = self.check_layers([layer])
        module = self.value_modules[idx] if idx < len(self.value_modules) else None
        if module is None:
            kind = self.layer_types[idx] if idx < len(self.layer_types) else "unknown"
            have = ", ".join(map(str, self.value_layers())) or "none"
            raise SiteUnavailable(
                f"layer {layer} of this {self.model_type} model ({kind}) has no attention "
                f"value projection (v_proj) to capture at site 'attn_v'; layers that have "
                f"one: {have}",
                "leave layers unset to capture every layer that has one, or choose among "
                "those layers",
            )
        return module

    def check_layers(self, layers: list[int] | tuple[int, ...]) -> list[int]:
        """Validate layer indices (negative ones count from the end) and normalise them."""
        out: list[int] = []
        for layer in layers:
            idx = layer + self.n_layers if layer < 0 else layer
            if not 0 <= idx < self.n_layers:
                raise LayerOutOfRange(
                    f"layer {layer} is out of range for this {self.model_type} model with "
                    f"{self.n_layers} layers",
                    f"choose layers between 0 and {self.n_layers - 1} (or -1 for the last)",
                )
            out.append(idx)
        return out

    def writers_at(self, layers: list[int] | None, include_embedding: bool) -> list[Writer]:
        chosen = set(range(self.n_layers)) if layers is None else set(self.check_layers(layers))
        out = []
        for w in self.writers:
            if w.layer is None:
                if include_embedding:
                    out.append(w)
            elif w.layer in chosen:
                out.append(w)
        return out


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return name, sub
    return None


def dense_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP sublayers of ``model``'s decoder blocks (modules with both an attention and an
    MLP child), leaving out mixture-of-experts ones (an ``experts`` child)."""
    out: list[nn.Module] = []
    for module in model.modules():
        if _child(module, _ATTN_NAMES) is None:
            continue
        mlp = _child(module, _MLP_NAMES)
        if mlp is not None and not isinstance(getattr(mlp[1], "experts", None), nn.Module):
            out.append(mlp[1])
    return out


def _find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            first = mod[0]
            if _child(first, _ATTN_NAMES) is not None and (
                best is None or name.count(".") < best[0].count(".")
            ):
                best = (name, mod)
    if best is None:
        raise UnsupportedArchitecture(
            f"no list of {n_layers} decoder blocks with an attention module "
            f"(looked for children named {', '.join(_ATTN_NAMES)})",
            "this architecture is not supported yet: add its module names to probes/layout.py",
        )
    return best


def _linear_writer(
    prefix: str, module: nn.Module, kind: WriterKind, layer: int, d_model: int
) -> Writer:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != d_model:
        shape = None if weight is None else tuple(weight.shape)
        raise UnsupportedArchitecture(
            f"{prefix} does not look like a Linear writing into the {d_model}-dim residual "
            f"stream (weight shape {shape})",
            "this architecture is not supported yet: extend probes/layout.py",
        )
    has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
    return Writer(prefix, kind, layer, module, "weight", 0, "bias" if has_bias else None)


def _mlp_writers(prefix: str, mlp: nn.Module, layer: int, d_model: int) -> list[Writer]:
    out_lin = _child(mlp, _MLP_OUT_NAMES)
    if out_lin is not None:
        return [_linear_writer(f"{prefix}.{out_lin[0]}", out_lin[1], "mlp", layer, d_model)]
    writers: list[Writer] = []
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.Module):
        down = getattr(experts, "down_proj", None)
        if isinstance(down, torch.Tensor) and down.dim() == 3:
            axis = 1 if down.shape[1] == d_model else (2 if down.shape[2] == d_model else -1)
            if axis < 0:
                raise UnsupportedArchitecture(
                    f"{prefix}.experts.down_proj has shape {tuple(down.shape)} with no "
                    f"{d_model}-dim axis",
                    "extend probes/layout.py for this expert layout",
                )
            writers.append(
                Writer(f"{prefix}.experts.down_proj", "moe_experts", layer, experts,
                       "down_proj", axis)
            )
        elif isinstance(experts, nn.ModuleList):
            for i, expert in enumerate(experts):
                sub = _child(expert, _MLP_OUT_NAMES)
                if sub is None:
                    raise UnsupportedArchitecture(
                        f"expert {i} of {prefix} has no down projection",
                        "extend probes/layout.py for this expert layout",
                    )
                writers.append(
                    _linear_writer(f"{prefix}.experts.{i}.{sub[0]}", sub[1], "moe_experts",
                                   layer, d_model)
                )
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    if isinstance(shared, nn.Module):
        sub = _child(shared, _MLP_OUT_NAMES)
        if sub is not None:
            writers.append(
                _linear_writer(f"{prefix}.shared_expert.{sub[0]}", sub[1], "shared_expert",
                               layer, d_model)
            )
    if not writers:
        raise UnsupportedArchitecture(
            f"{prefix} has no down projection and no experts "
            f"(looked for {', '.join(_MLP_OUT_NAMES)} and experts.down_proj)",
            "this architecture is not supported yet: extend probes/layout.py",
        )
    return writers


def find_layout(model: nn.Module) -> ResidualLayout:
    """Map the residual stream of a Hugging Face decoder model (see module docstring)."""
    config: Any = getattr(model, "config", None)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(getattr(text_cfg, "num_hidden_layers", 0) or 0)
    d_model = int(getattr(text_cfg, "hidden_size", 0) or 0)
    model_type = str(getattr(text_cfg, "model_type", type(model).__name__))
    if n_layers <= 0 or d_model <= 0:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no num_hidden_layers/hidden_size in its config",
            "give a decoder-only causal language model",
        )
    blocks_name, blocks = _find_blocks(model, n_layers)
    decoder_name = blocks_name.rsplit(".", 1)[0] if "." in blocks_name else ""
    decoder = model.get_submodule(decoder_name) if decoder_name else model
    embedding: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    final_norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)

    writers: list[Writer] = []
    emb_w = getattr(embedding, "weight", None)
    if isinstance(emb_w, torch.Tensor) and emb_w.dim() == 2 and emb_w.shape[1] == d_model:
        writers.append(Writer("embedding", "embedding", None, embedding, "weight", 1))
    attn_outs: list[nn.Module] = []
    mlp_outs: list[nn.Module] = []
    layer_types: list[str] = []
    value_modules: list[nn.Module | None] = []
    sandwich = False
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}"
        attn = _child(block, _ATTN_NAMES)
        assert attn is not None
        attn_name, attn_mod = attn
        out = _child(attn_mod, _ATTN_OUT_NAMES)
        if out is None:
            raise UnsupportedArchitecture(
                f"{prefix}.{attn_name} has no output projection "
                f"(looked for {', '.join(_ATTN_OUT_NAMES)})",
                "this architecture is not supported yet: extend probes/layout.py",
            )
        kind: WriterKind = "linear_attn" if attn_name == "linear_attn" else "attn"
        layer_types.append("linear_attention" if kind == "linear_attn" else "full_attention")
        writers.append(_linear_writer(f"{prefix}.{attn_name}.{out[0]}", out[1], kind, i, d_model))
        value = _child(attn_mod, _VALUE_NAMES)
        value_modules.append(value[1] if value is not None else None)
        mlp = _child(block, _MLP_NAMES)
        if mlp is None:
            raise UnsupportedArchitecture(
                f"{prefix} has no MLP (looked for {', '.join(_MLP_NAMES)})",
                "this architecture is not supported yet: extend probes/layout.py",
            )
        writers.extend(_mlp_writers(f"{prefix}.{mlp[0]}", mlp[1], i, d_model))
        post_attn = _child(block, _POST_ATTN_NORMS)
        post_mlp = _child(block, _POST_MLP_NORMS)
        if post_mlp is not None and post_attn is not None:
            # Sandwich norms: the residual write is the post-norm's output.
            sandwich = True
            attn_outs.append(post_attn[1])
            mlp_outs.append(post_mlp[1])
        else:
            attn_outs.append(attn_mod)
            mlp_outs.append(mlp[1])
    return ResidualLayout(
        model_type=model_type,
        n_layers=n_layers,
        d_model=d_model,
        decoder=decoder,
        blocks=list(blocks),
        embedding=embedding,
        final_norm=final_norm if isinstance(final_norm, nn.Module) else None,
        attn_out_modules=attn_outs,
        mlp_out_modules=mlp_outs,
        layer_types=layer_types,
        writers=writers,
        exact_orthogonalisation=not sandwich,
        value_modules=value_modules,
        head_dim=_head_dim(text_cfg),
    )


def _head_dim(config: Any) -> int | None:
    """The width of one attention head: ``head_dim`` in the config, else hidden size over
    the number of heads; None when the config gives neither."""
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return hidden // heads if heads > 0 else None


def hidden_state_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module's forward output: the output itself, or the
    first element of the tuple a decoder layer or attention block returns.

    Example:
        module.register_forward_hook(lambda m, args, out: seen.append(hidden_state_of(out)))
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output)}")
