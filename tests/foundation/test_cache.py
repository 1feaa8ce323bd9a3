"""The activation cache: hits skip the model, entries are atomic, shared and self-checking."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from probes.cache import ActivationCache, CacheKey
from probes.capture import Activations, capture
from probes.models import LoadedModel


def _key(**over: object) -> CacheKey:
    base = dict(model_fingerprint="f" * 64, prompts_sha256="p" * 64, site="resid_pre",
                positions="last", layers=(0, 1), dtype="torch.float32")
    base.update(over)
    return CacheKey(**base)  # type: ignore[arg-type]


def _acts() -> Activations:
    return Activations("resid_pre", "last", (0, 1), torch.randn(5, 2, 8))


def test_second_request_reads_the_cache_without_a_forward_pass(
    tiny: LoadedModel, tmp_path: Path
) -> None:
    cache = ActivationCache(tmp_path)
    prompts = tiny.format(["Write a poem", "Tell me a joke about cats"])
    calls: list[int] = []

    def compute() -> Activations:
        calls.append(1)
        return capture(tiny.layout, tiny.tokenizer, prompts)

    forwards: list[int] = []
    handle = tiny.layout.decoder.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        key = _key(model_fingerprint=tiny.fingerprint)
        first = cache.get_or_compute(key, compute)
        n_forward = len(forwards)
        second = cache.get_or_compute(key, compute)
        # A fresh cache object (a new session) also reads from disk.
        third = ActivationCache(tmp_path).get_or_compute(key, compute)
    finally:
        handle.remove()
    assert len(calls) == 1 and n_forward >= 1 and len(forwards) == n_forward
    torch.testing.assert_close(first.data, second.data, rtol=0, atol=0)
    torch.testing.assert_close(first.data, third.data, rtol=0, atol=0)
    assert cache.stats.hits == 1 and cache.stats.misses == 1


def test_key_changes_with_everything_that_changes_the_output() -> None:
    base = _key()
    variants = [_key(model_fingerprint="g" * 64), _key(prompts_sha256="q" * 64),
                _key(site="attn_out"), _key(positions="all"), _key(layers=(0,)),
                _key(dtype="torch.bfloat16"), _key(extra="chat=plain")]
    digests = {v.digest() for v in variants}
    assert base.digest() not in digests and len(digests) == len(variants)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupted_entry_is_reported_and_recomputed(tmp_path: Path, damage: str) -> None:
    cache = ActivationCache(tmp_path)
    key = _key()
    original = _acts()
    cache.get_or_compute(key, lambda: original)
    path = cache.path(key)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip":
        raw[-3] ^= 0xFF  # a byte of tensor data: the header still parses
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(b"not a safetensors file")
    fresh = _acts()
    with pytest.warns(UserWarning, match="recomputed"):
        got = ActivationCache(tmp_path).get_or_compute(key, lambda: fresh)
    torch.testing.assert_close(got.data, fresh.data, rtol=0, atol=0)
    # The recomputed entry is valid again.
    again = ActivationCache(tmp_path).get_or_compute(key, lambda: _acts())
    torch.testing.assert_close(again.data, fresh.data, rtol=0, atol=0)


def test_disabled_cache_always_computes(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path, enabled=False)
    n: list[int] = []
    for _ in range(2):
        cache.get_or_compute(_key(), lambda: (n.append(1), _acts())[1])
    assert len(n) == 2 and not list(cache.root.glob("*.safetensors"))


WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from probes.cache import ActivationCache, CacheKey
    from probes.capture import Activations
    key = CacheKey("f" * 64, "p" * 64, "resid_pre", "last", (0, 1), "torch.float32")
    def compute():
        time.sleep(1.0)  # long enough that both workers ask while it is running
        print("COMPUTED", flush=True)
        return Activations("resid_pre", "last", (0, 1), torch.arange(10.0).reshape(5, 2, 1))
    acts = ActivationCache(sys.argv[1]).get_or_compute(key, compute)
    print("SUM", float(acts.data.sum()), flush=True)
    """
)


def test_two_processes_computing_the_same_key_produce_one_entry(tmp_path: Path) -> None:
    """What two pytest-xdist workers do: one computes, the other waits and reads."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")],
                              cwd=root, stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("COMPUTED") for o in outs) == 1
    assert all("SUM 45.0" in o for o in outs)
    entries = list((tmp_path / "cache" / "activations").glob("*.safetensors"))
    assert len(entries) == 1
    assert not list((tmp_path / "cache" / "activations").glob(".*.tmp"))
