"""Faults of the session's model pool when models do not all fit in memory.

Two tiny models and a pool limit that holds one: loading the second evicts the first (its
Workbench keeps every cached result and reads them without the model), a later request for
the first reloads it with a note and gives identical results, tests run grouped by model,
and a bad ``--max-pool-memory`` is a usage error. Size estimates come from the weight
files' headers and match what the loaded model holds.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.memory import (
    GIB,
    _meminfo_available,
    default_pool_limit,
    estimate_model_bytes,
    model_bytes,
    parse_pool_memory,
)
from fixtures.workbench import BenchConfig
from probes.models import LoadedModel, load
from tests.helpers import tiny_config

ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
MODELS = ("tiny-llama", "tiny-qwen2")


def _limit_for_one() -> int:
    """A pool limit that holds either tiny model but not both."""
    sizes = [model_bytes(load(spec).model) for spec in MODELS]
    limit = int(max(sizes) * 1.5)
    assert limit < sum(sizes)
    return limit


# ---- the pool, driven directly --------------------------------------------------------------


def _config(cache_dir: Path) -> BenchConfig:
    return tiny_config(cache_dir=cache_dir, models=MODELS, n_train=4, n_eval=4, n_gen=2,
                       max_new_tokens=3, use_cache=False)


class _Session:
    """Just enough of a pytest config for the plugin's pool; progress lines are kept."""

    def __init__(self, cache_dir: Path, limit: int | None) -> None:
        from fixtures.plugin import BENCH_KEY, CONFIG_KEY, POOL_KEY, POOL_LIMIT_KEY

        self.stash = pytest.Stash()
        self.stash[CONFIG_KEY] = _config(cache_dir)
        self.stash[POOL_KEY] = {}
        self.stash[BENCH_KEY] = {}
        self.stash[POOL_LIMIT_KEY] = limit
        self.pluginmanager = self

    def get_plugin(self, _name: str) -> None:
        return None


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model load the pool starts (fresh objects: nothing else holds them)."""
    import fixtures.plugin as plugin

    loads: list[str] = []

    def fresh_load(spec: str, **kw: Any) -> LoadedModel:
        loads.append(spec)
        return load(spec, dtype=kw.get("dtype", "float32"))

    monkeypatch.setattr(plugin, "load", fresh_load)
    return loads


def test_second_model_evicts_the_first_and_the_first_comes_back_with_a_note(
    tmp_path: Path, counted_loads: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    import fixtures.plugin as plugin
    from fixtures.plugin import POOL_KEY

    config: Any = _Session(tmp_path, _limit_for_one())
    first = plugin.get_bench(config, "tiny-llama")
    harm, _safe = first.train_pair()
    before = first.acts(harm).numpy().copy()
    fp_first = first.fingerprint

    second = plugin.get_bench(config, "tiny-qwen2")  # the fault: it does not fit beside
    assert list(config.stash[POOL_KEY]) == [second.fingerprint]
    assert not first.model_loaded and second.model_loaded
    err = capsys.readouterr().err
    assert "evicting tiny-llama" in err and "--max-pool-memory" in err

    # cached results and the facts reports need are read without the model
    assert np.array_equal(first.acts(harm).numpy(), before)
    assert first.provenance()["n_layers"] == 4 and first.name == "tiny-llama"
    assert not first.model_loaded and counted_loads == ["tiny-llama", "tiny-qwen2"]

    # a later use reloads it, with a note, evicting the other; the numbers are the same
    layout = first.lm.layout
    assert counted_loads == ["tiny-llama", "tiny-qwen2", "tiny-llama"]
    err = capsys.readouterr().err
    assert "note: reloading tiny-llama" in err and "evicting tiny-qwen2" in err
    assert list(config.stash[POOL_KEY]) == [fp_first] and not second.model_loaded
    assert layout.n_layers == 4
    first._memo.clear()  # recompute with the reloaded model (no disk cache here)
    assert np.array_equal(first.acts(harm).numpy(), before)
    assert plugin.get_bench(config, "tiny-llama") is first  # one Workbench per model


def test_without_a_limit_nothing_is_evicted(tmp_path: Path, counted_loads: list[str]) -> None:
    import fixtures.plugin as plugin
    from fixtures.plugin import POOL_KEY

    config: Any = _Session(tmp_path, None)  # memory unknown: the pool only grows
    benches = [plugin.get_bench(config, spec) for spec in MODELS]
    assert len(config.stash[POOL_KEY]) == 2 and all(b.model_loaded for b in benches)
    assert counted_loads == list(MODELS)


def test_least_recently_used_model_is_the_one_evicted(
    tmp_path: Path, counted_loads: list[str],
) -> None:
    """Three models, room for two: the one used longest ago goes, not the first loaded."""
    import fixtures.plugin as plugin
    from fixtures.plugin import POOL_KEY

    sizes = [model_bytes(load(s).model) for s in (*MODELS, "tiny-gemma3")]
    config: Any = _Session(tmp_path, int(sorted(sizes)[-1] + sorted(sizes)[-2] + 1024))
    a, b = (plugin.get_bench(config, s) for s in MODELS)
    assert a.lm.n_layers  # the first model is used again: the second is now the oldest
    c = plugin.get_bench(config, "tiny-gemma3")
    assert a.model_loaded and not b.model_loaded and c.model_loaded
    assert set(config.stash[POOL_KEY]) == {a.fingerprint, c.fingerprint}


# ---- estimates and budgets ------------------------------------------------------------------


def test_estimate_from_safetensors_headers_matches_the_loaded_bytes(tmp_path: Path) -> None:
    lm = load("tiny-llama", dtype="float32")
    lm.model.save_pretrained(tmp_path / "m", safe_serialization=True)
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert estimate_model_bytes(tmp_path / "m", torch.float32) == params
    assert estimate_model_bytes(tmp_path / "m", torch.bfloat16) == params // 2
    assert model_bytes(lm.model) >= params  # the loaded model also holds its buffers
    assert estimate_model_bytes(tmp_path / "m", torch.float32, {"load_in_4bit": True}) is None
    assert estimate_model_bytes(tmp_path / "nothing", torch.float32) is None


def test_a_corrupt_safetensors_header_gives_no_estimate(tmp_path: Path) -> None:
    """The fault: a weights file whose header is garbage. No estimate, no traceback."""
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at ")
    assert estimate_model_bytes(tmp_path, torch.float32) is None
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    assert estimate_model_bytes(tmp_path, torch.float32) is None


def test_available_memory_and_the_default_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable:    8388608 kB\n")
    assert _meminfo_available(meminfo) == 8 * GIB
    meminfo.write_text("MemTotal: 1 kB\n")
    assert _meminfo_available(meminfo) is None
    assert default_pool_limit(10 * GIB) == 8 * GIB  # 20 % kept free
    assert default_pool_limit(2 * GIB) == 1 * GIB  # at least 1 GiB kept free
    assert default_pool_limit(None) is None


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf"])
def test_bad_pool_memory_values_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="positive number of GiB"):
        parse_pool_memory(raw)


def test_pool_memory_values() -> None:
    assert parse_pool_memory("2") == 2 * GIB
    assert parse_pool_memory("0.5GiB") == GIB // 2
    assert parse_pool_memory(None) is None and parse_pool_memory("auto") is None


# ---- a session through pytest ---------------------------------------------------------------

SUITE_A = """
import json

def test_acts(bench, measure):
    harm, _safe = bench.train_pair()
    bench.record_model(measure, harm)
    print("ACTS", bench.name, json.dumps(bench.acts(harm).numpy()[:, -1, :4].tolist()))
"""

SUITE_B = """
def test_layers(bench):
    assert bench.lm.n_layers == 4
"""

COMPARE = """
import json
from fixtures.plugin import get_bench, session_models

def test_compare(pytestconfig):
    benches = [get_bench(pytestconfig, s) for s in session_models(pytestconfig)]
    for b in benches:
        harm, _safe = b.train_pair()
        print("CACHED", b.name, b.model_loaded,
              json.dumps(b.acts(harm).numpy()[:, -1, :4].tolist()))
"""


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses import this checkout's plugins, not an installed copy."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_a=SUITE_A, test_b=SUITE_B, test_z_compare=COMPARE)
    return pytester.runpytest_subprocess(
        *[a for m in MODELS for a in ("--model", m)], "--profile", "quick", "--n-train", "4",
        "--no-cache", "--dtype", "float32", "--no-report", "-p", "no:cacheprovider", "-v", "-s",
        *args)


def _lines(out: str, tag: str) -> dict[str, tuple[str, str]]:
    found = {}
    for line in out.splitlines():
        m = re.search(rf"{tag} (\S+) (?:(True|False) )?(\[.*\])", line)
        if m:
            found[m.group(1)] = (m.group(2) or "", m.group(3))
    return found


def test_a_session_over_two_models_that_do_not_fit_together(pytester: pytest.Pytester) -> None:
    gib = _limit_for_one() / GIB
    result = _run(pytester, "--max-pool-memory", f"{gib:.6f}")
    result.assert_outcomes(passed=5)
    out = result.stdout.str() + result.stderr.str()
    assert "evicting tiny-llama" in out
    # grouped by model, the comparison last; collection loaded both, tiny-qwen2 last: it is
    # still pooled and goes first, so only tiny-llama is reloaded, once
    order = re.findall(r"^(test_\w+\.py::test_\w+(?:\[[\w-]+\])?) ", result.stdout.str(),
                       re.M)
    assert list(dict.fromkeys(order)) == [
        "test_a.py::test_acts[tiny-qwen2]", "test_b.py::test_layers[tiny-qwen2]",
        "test_a.py::test_acts[tiny-llama]", "test_b.py::test_layers[tiny-llama]",
        "test_z_compare.py::test_compare"]
    assert out.count("note: reloading") == 1 and "note: reloading tiny-llama" in out
    # the comparison reads the evicted model's cached activations: same numbers, no reload
    acts, cached = _lines(out, "ACTS"), _lines(out, "CACHED")
    assert cached["tiny-qwen2"][0] == "False"  # evicted, not reloaded for the comparison
    for name in MODELS:
        assert json.loads(cached[name][1]) == json.loads(acts[name][1])
    assert out.count("note: reloading") == 1


def test_a_generous_limit_loads_each_model_once(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "--max-pool-memory", "64")
    result.assert_outcomes(passed=5)
    out = result.stdout.str() + result.stderr.str()
    assert "evicting" not in out and "reloading" not in out
    assert out.count("[model] loading") == 2


def test_bad_max_pool_memory_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "--max-pool-memory", "lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--max-pool-memory lots: expected a positive number of GiB" in err
    assert "Traceback" not in err
