"""An on-disk cache of activations, safe across processes (pytest-xdist workers).

Entries are safetensors files named by a key that hashes only what changes the output:
model fingerprint, prompt-set sha256, site, positions, layers, dtype and the cache format
version. Writes are atomic (temp file + rename) under a per-key file lock, so when two
workers ask for the same entry one computes it and the other waits and reads it. Each
entry stores the sha256 of its tensor bytes and the full key it answers; an entry that fails
to parse, its checksum, its key or the number of prompts asked for is reported with a
one-line warning, counted in :class:`CacheStats`, deleted and recomputed.

:func:`write_json_entry` / :func:`read_json_entry` give small JSON results (generations,
experiment figures) the same guarantees: full key, payload checksum, atomic write.
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

# 2: entries are checked against the key and prompt count they were asked for
CACHE_FORMAT_VERSION = "2"
JSON_ENTRY_FORMAT = "1"  # the envelope of write_json_entry / read_json_entry


class KeyMismatch(CacheCorrupted):
    """A well-formed cache entry that holds another key (or shape) than the one asked for."""


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
    corrupted: int = 0  # entries that failed to parse or their checksum
    mismatched: int = 0  # well-formed entries that hold another key or shape
    computed_keys: list[str] = field(default_factory=list)

    def count(self, exc: CacheCorrupted) -> None:
        """Count one rejected entry under its reason."""
        if isinstance(exc, KeyMismatch):
            self.mismatched += 1
        else:
            self.corrupted += 1


def _key_json(key: CacheKey) -> dict[str, Any]:
    return {**key.__dict__, "layers": list(key.layers)}


def _check_shape(path: Path, acts: Activations, n_prompts: int | None) -> None:
    """Raise :class:`KeyMismatch` unless ``acts`` is consistent (one data slice per layer,
    token lengths that add up) and has one row per prompt when ``n_prompts`` is given."""
    data, lengths = acts.data, acts.lengths
    problems = []
    if data.dim() < 3 or data.shape[-2] != len(acts.layers):
        problems.append(f"data of shape {tuple(data.shape)} for {len(acts.layers)} layers")
    if acts.positions == "all":
        rows = None if lengths is None else int(lengths.numel())
        if lengths is None or int(lengths.sum()) != data.shape[0]:
            problems.append("token lengths that do not add up to the data")
    else:
        rows = int(data.shape[0])
    if n_prompts is not None and rows != n_prompts:
        problems.append(f"{rows} rows for {n_prompts} prompts")
    if problems:
        raise KeyMismatch(f"cache entry {path} does not fit its key: " + "; ".join(problems))


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

    def _read(self, path: Path, key: CacheKey, n_prompts: int | None = None) -> Activations:
        """The entry at ``path``, checked against its checksum, the key it must hold and,
        when given, the number of prompts it must cover (:class:`CacheCorrupted` if not)."""
        raw = path.read_bytes()
        try:
            tensors = st_load(raw)
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
        except Exception as exc:
            raise CacheCorrupted(f"cannot parse cache entry {path}: {exc}") from exc
        if meta.get("sha256") != _tensor_digest(tensors):
            raise CacheCorrupted(f"cache entry {path} failed its checksum")
        try:
            stored_key = json.loads(meta["key"])
            acts = Activations(
                site=meta["site"],
                positions=meta["positions"],
                layers=tuple(json.loads(meta["layers"])),
                data=tensors["data"],
                lengths=tensors.get("lengths"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheCorrupted(f"cache entry {path} lacks its metadata: {exc}") from exc
        if stored_key != _key_json(key):
            raise KeyMismatch(f"cache entry {path} holds another key than the one asked for")
        _check_shape(path, acts, n_prompts)
        return acts
    def _write(self, path: Path, key: CacheKey, acts: Activations) -> None:
        tensors = {"data": acts.data.contiguous()}
        if acts.lengths is not None:
            tensors["lengths"] = acts.lengths.contiguous()
        meta = {
            "sha256": _tensor_digest(tensors),
            "site": acts.site,
            "positions": acts.positions,
            "layers": json.dumps(list(acts.layers)),
            "key": json.dumps(_key_json(key)),
            "format": CACHE_FORMAT_VERSION,
        }
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    def get_or_compute(self, key: CacheKey, compute: Callable[[], Activations],
                       n_prompts: int | None = None) -> Activations:
        """The cached activations for ``key``, computing (once, across processes) if absent.

        ``n_prompts``, when given, is how many prompts the entry must cover: an entry of
        another shape is treated like a corrupt one.
        """
        if not self.enabled:
            self.stats.misses += 1
            return compute()
        path = self.path(key)
        found = self._try_read(path, key, n_prompts)
        if found is not None:
            self.stats.hits += 1
            return found
        with FileLock(str(path) + ".lock"):
            found = self._try_read(path, key, n_prompts)
            if found is not None:
                self.stats.hits += 1
                return found
            self.stats.misses += 1
            acts = compute()
            self._write(path, key, acts)
            self.stats.computed_keys.append(key.digest())
            return acts

    def _try_read(self, path: Path, key: CacheKey, n_prompts: int | None) -> Activations | None:
        if not path.is_file():
            return None
        try:
            return self._read(path, key, n_prompts)
        except CacheCorrupted as exc:
            self.stats.count(exc)
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


def _payload_sha256(payload: Any) -> str:
    return hashlib.sha256(
        json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_json_entry(path: Path, key: dict[str, Any], payload: dict[str, Any]) -> None:
    """Store ``payload`` at ``path`` (atomically) with the full ``key`` it answers and the
    sha256 of its content, so that :func:`read_json_entry` can tell a damaged, edited or
    misplaced entry from a valid one."""
    plain = json.loads(json.dumps(payload))  # what a reader gets back: str dict keys, lists
    entry = {"format": JSON_ENTRY_FORMAT, "key": key, "sha256": _payload_sha256(plain),
             "payload": plain}
    atomic_write_bytes(path, json.dumps(entry, ensure_ascii=False).encode())


def read_json_entry(
    path: Path,
    key: dict[str, Any],
    check: Callable[[dict[str, Any]], None] | None = None,
    stats: CacheStats | None = None,
) -> dict[str, Any] | None:
    """The payload stored at ``path`` for ``key``, or None when there is none or it cannot
    be trusted: unreadable, another key, a failed checksum, or rejected by ``check`` (which
    raises ValueError, KeyError or TypeError). An untrusted entry is counted in ``stats``,
    reported in a one-line warning and deleted, so the caller recomputes it."""
    if not path.is_file():
        return None
    try:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            stored_key, payload, digest = entry["key"], entry["payload"], entry["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CacheCorrupted(f"cannot parse cache entry {path}: {exc}") from exc
        if stored_key != key:
            raise KeyMismatch(f"cache entry {path} holds another key than the one asked for")
        if digest != _payload_sha256(payload) or not isinstance(payload, dict):
            raise CacheCorrupted(f"cache entry {path} failed its checksum")
        if check is not None:
            try:
                check(payload)
            except (ValueError, KeyError, TypeError) as exc:
                raise KeyMismatch(f"cache entry {path} does not fit its key: {exc}") from exc
    except CacheCorrupted as exc:
        if stats is not None:
            stats.count(exc)
        warnings.warn(f"{exc}; the entry was deleted and will be recomputed", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    return payload
