"""An on-disk cache of activations, safe across processes (pytest-xdist workers).

Entries are safetensors files named by a key that hashes only what changes the output:
model fingerprint, prompt-set sha256, site, positions, layers, dtype and the cache format
version. Writes are atomic (temp file + rename) under a per-key file lock, so when two
workers ask for the same entry one computes it and the other waits and reads it. Each
entry stores the sha256 of its tensor bytes; an entry that fails to parse or to match is
reported with a warning, deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from probes.capture import Activations
from probes.errors import CacheCorrupted
from probes.paths import atomic_write_bytes, cache_root

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a captured activation tensor."""

    model_fingerprint: str
    prompts_sha256: str
    site: str
    positions: str
    layers: tuple[int, ...]
    dtype: str
    extra: str = ""  # e.g. chat-template mode

    def digest(self) -> str:
        payload = json.dumps(
            {"v": CACHE_FORMAT_VERSION, **self.__dict__, "layers": list(self.layers)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupted: int = 0
    computed_keys: list[str] = field(default_factory=list)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ActivationCache:
    """Activation cache rooted at ``root`` (default: the user cache dir, see probes.paths)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, enabled: bool = True) -> None:
        self.root = cache_root(root) / "activations"
        self.root.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self.stats = CacheStats()

    def path(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest()}.safetensors"

    def _read(self, path: Path) -> Activations:
        raw = path.read_bytes()
        try:
            tensors = st_load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
        except Exception as exc:
            raise CacheCorrupted(f"cannot parse cache entry {path}: {exc}") from exc
        if meta.get("sha256") != _tensor_digest(tensors):
            raise CacheCorrupted(f"cache entry {path} failed its checksum")
        lengths = tensors.get("lengths")
        return Activations(
            site=meta["site"],
            positions=meta["positions"],
            layers=tuple(json.loads(meta["layers"])),
            data=tensors["data"],
            lengths=lengths,
        )

    def _write(self, path: Path, key: CacheKey, acts: Activations) -> None:
        tensors = {"data": acts.data.contiguous()}
        if acts.lengths is not None:
            tensors["lengths"] = acts.lengths.contiguous()
        meta = {
            "sha256": _tensor_digest(tensors),
            "site": acts.site,
            "positions": acts.positions,
            "layers": json.dumps(list(acts.layers)),
            "key": json.dumps({**key.__dict__, "layers": list(key.layers)}),
            "format": CACHE_FORMAT_VERSION,
        }
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    def get_or_compute(self, key: CacheKey, compute: Callable[[], Activations]) -> Activations:
        """The cached activations for ``key``, computing (once, across processes) if absent."""
        if not self.enabled:
            self.stats.misses += 1
            return compute()
        path = self.path(key)
        found = self._try_read(path)
        if found is not None:
            self.stats.hits += 1
            return found
        with FileLock(str(path) + ".lock"):
            found = self._try_read(path)
            if found is not None:
                self.stats.hits += 1
                return found
            self.stats.misses += 1
            acts = compute()
            self._write(path, key, acts)
            self.stats.computed_keys.append(key.digest())
            return acts

    def _try_read(self, path: Path) -> Activations | None:
        if not path.is_file():
            return None
        try:
            return self._read(path)
        except CacheCorrupted as exc:
            self.stats.corrupted += 1
            warnings.warn(
                f"{exc}; the entry was deleted and will be recomputed", stacklevel=3
            )
            path.unlink(missing_ok=True)
            return None

    def clear(self) -> int:
        n = 0
        for p in self.root.glob("*.safetensors"):
            p.unlink()
            n += 1
        return n


def describe(key: CacheKey) -> dict[str, Any]:
    return {**key.__dict__, "layers": list(key.layers), "digest": key.digest()}
