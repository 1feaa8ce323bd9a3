"""Model identity is the weights fingerprint everywhere, and every cache entry carries and
checks its key: each test here performs one fault and asserts the recomputation, the
refusal or the clear note that follows."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures.workbench import BenchConfig, Progress, Workbench
from probes.cache import ActivationCache, CacheKey, write_json_entry
from probes.capture import Activations
from probes.detected_proceeds import check_trajectory_part
from probes.models import LoadedModel, canonical_spec, load
from probes.tiny import tiny_model
from tests.helpers import tiny_config

ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester subprocesses import the plugins of this checkout, not of an installed copy."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))

WHO_TEST = """
def test_who(bench, layer, measure):
    bench.record_model(measure)
    print("MODEL", bench.lm.name, bench.lm.fingerprint, id(bench), flush=True)
"""


def _save_tiny(directory: Path, shift: float = 0.0) -> None:
    """A tiny llama saved as a HF directory; ``shift`` makes its weights differ."""
    model, tok = tiny_model("llama")
    with torch.no_grad():
        next(model.parameters()).add_(shift)
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))


def _models_seen(stdout: str) -> dict[str, tuple[str, str]]:
    """{test id: (model name, fingerprint)} from the MODEL lines of a ``-s -v`` run."""
    seen: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"test_who\[([^\]]+)\] MODEL (\S+) ([0-9a-f]{64})", stdout):
        seen[m.group(1)] = (m.group(2), m.group(3))
    return seen


# ---- 1. model identity in the pool, the Workbenches, the ids and the reports ----------------


@pytest.fixture(scope="module")
def two_tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny HF directories of different weights, saved before any pytester run (which
    restores ``sys.modules`` afterwards, so nothing may import transformers inside it)."""
    root = tmp_path_factory.mktemp("tiny_dirs")
    _save_tiny(root / "first", shift=0.0)
    _save_tiny(root / "second", shift=0.5)
    return root / "first", root / "second"


@pytest.mark.usefixtures("this_checkout")
def test_two_models_with_one_basename_are_measured_apart(
    pytester: pytest.Pytester, two_tiny_dirs: tuple[Path, Path]
) -> None:
    """--model a/m --model b/m: two models, two ids, two names, two fingerprints."""
    shutil.copytree(two_tiny_dirs[0], pytester.path / "a" / "m")
    shutil.copytree(two_tiny_dirs[1], pytester.path / "b" / "m")
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_who=WHO_TEST)
    result = pytester.runpytest_subprocess(
        "--model", str(pytester.path / "a" / "m"), "--model", str(pytester.path / "b" / "m"),
        "--layers", "0", "--no-report", "-p", "no:cacheprovider", "-s", "-v")
    result.assert_outcomes(passed=2)
    seen = _models_seen(result.stdout.str())
    assert set(seen) == {"a-m-L00", "b-m-L00"}, result.stdout.str()
    names = {name for name, _ in seen.values()}
    fingerprints = {fp for _, fp in seen.values()}
    assert names == {"a-m", "b-m"} and len(fingerprints) == 2


@pytest.mark.usefixtures("this_checkout")
def test_one_directory_by_two_paths_and_a_copy_is_measured_once(
    pytester: pytest.Pytester, two_tiny_dirs: tuple[Path, Path]
) -> None:
    """The same weights under three specs: loaded and measured once, with a note."""
    shutil.copytree(two_tiny_dirs[0], pytester.path / "a" / "m")
    shutil.copytree(two_tiny_dirs[0], pytester.path / "copy")
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_who=WHO_TEST)
    result = pytester.runpytest_subprocess(
        "--model", str(pytester.path / "a" / "m"),
        "--model", str(pytester.path / "a" / ".." / "a" / "m"),
        "--model", str(pytester.path / "copy"),
        "--layers", "0", "--no-report", "-p", "no:cacheprovider", "-s", "-v")
    result.assert_outcomes(passed=1)
    out = result.stdout.str() + result.stderr.str()
    assert "same model as --model" in out and "measured once" in out
    assert list(_models_seen(result.stdout.str())) == ["m-L00"]
    assert out.count("[model] loading") == 2  # the second spelling of a/m is not loaded


class _FakeConfig:
    """Just enough of a pytest config for fixtures.plugin's pool (no terminal)."""

    def __init__(self, models: tuple[str, ...]) -> None:
        from fixtures.plugin import BENCH_KEY, CONFIG_KEY, POOL_KEY

        self.stash = pytest.Stash()
        self.stash[CONFIG_KEY] = _config(models, Path("/nonexistent"))
        self.stash[POOL_KEY] = {}
        self.stash[BENCH_KEY] = {}
        self.pluginmanager = self

    def get_plugin(self, _name: str) -> None:
        return None


def test_aliases_of_one_model_load_once_and_share_one_workbench(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``default`` and ``qwen2.5-coder-0.5b-instruct`` are one model: one load, one bench,
    one parametrisation (the loader is replaced by a tiny model to keep this fast)."""
    import fixtures.plugin as plugin

    loads: list[str] = []
    tiny = load("tiny-llama")

    def fake_load(spec: str, **_kw: Any) -> LoadedModel:
        loads.append(spec)
        return tiny

    monkeypatch.setattr(plugin, "load", fake_load)
    config: Any = _FakeConfig(("default", "qwen2.5-coder-0.5b-instruct"))
    assert canonical_spec("default") == canonical_spec("qwen2.5-coder-0.5b-instruct")
    with pytest.warns(UserWarning, match="same model as --model default"):
        assert plugin.session_models(config) == ["default"]
    assert plugin.get_model(config, "qwen2.5-coder-0.5b-instruct") is tiny
    assert plugin.get_bench(config, "default") is plugin.get_bench(
        config, "qwen2.5-coder-0.5b-instruct")
    assert loads == ["default"]


def test_pool_and_benches_are_keyed_by_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two specs whose models share a display name still get two models and two benches."""
    import fixtures.plugin as plugin

    first, second = load("tiny-llama"), load("tiny-qwen2")
    second.name = first.name  # the fault: one display name for two models
    by_spec = {"tiny-llama": first, "tiny-qwen2": second}
    monkeypatch.setattr(plugin, "load", lambda spec, **_kw: by_spec[spec])
    config: Any = _FakeConfig(("tiny-llama", "tiny-qwen2"))
    benches = [plugin.get_bench(config, s) for s in plugin.session_models(config)]
    assert [b.lm.fingerprint for b in benches] == [first.fingerprint, second.fingerprint]
    assert benches[0] is not benches[1]
    assert benches[0].lm.name != benches[1].lm.name


# ---- 2. the weights fingerprint memo -------------------------------------------------------


def _memos(cache: Path) -> list[Path]:
    return sorted((cache / "fingerprints").glob("*.json"))


def test_emptied_fingerprint_memo_is_recomputed(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "a" / "m", shift=0.0)
    _save_tiny(tmp_path / "b" / "m", shift=0.5)
    cache = tmp_path / "cache"
    fa = load(str(tmp_path / "a" / "m"), cache_dir=cache).fingerprint
    fb = load(str(tmp_path / "b" / "m"), cache_dir=cache).fingerprint
    assert fa != fb and len(_memos(cache)) == 2
    for memo in _memos(cache):
        record = json.loads(memo.read_text())
        assert re.fullmatch("[0-9a-f]{64}", record["sha256"]) and record["files"]
        memo.write_text("")  # the fault
    with pytest.warns(UserWarning, match="malformed or stale; recomputing"):
        again_a = load(str(tmp_path / "a" / "m"), cache_dir=cache).fingerprint
    with pytest.warns(UserWarning, match="malformed or stale; recomputing"):
        again_b = load(str(tmp_path / "b" / "m"), cache_dir=cache).fingerprint
    assert (again_a, again_b) == (fa, fb)
    assert not list((cache / "fingerprints").glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["other_model", "not_hex", "short_hex", "garbage"])
def test_wrong_fingerprint_memo_is_not_trusted(tmp_path: Path, damage: str) -> None:
    """A memo holding another model's record, or a digest that is not 64 hex digits."""
    _save_tiny(tmp_path / "a" / "m", shift=0.0)
    _save_tiny(tmp_path / "b" / "m", shift=0.5)
    cache = tmp_path / "cache"
    fa = load(str(tmp_path / "a" / "m"), cache_dir=cache).fingerprint
    memo_a = _memos(cache)[0]
    fb = load(str(tmp_path / "b" / "m"), cache_dir=cache).fingerprint
    memo_b = next(p for p in _memos(cache) if p != memo_a)
    record = json.loads(memo_b.read_text())
    if damage == "other_model":
        memo_b.write_bytes(memo_a.read_bytes())
    elif damage == "not_hex":
        memo_b.write_text(json.dumps({**record, "sha256": "z" * 64}))
    elif damage == "short_hex":
        memo_b.write_text(json.dumps({**record, "sha256": record["sha256"][:40]}))
    else:
        memo_b.write_bytes(b"\x00\x01 not json")
    with pytest.warns(UserWarning, match="recomputing"):
        again = load(str(tmp_path / "b" / "m"), cache_dir=cache).fingerprint
    assert again == fb != fa
    assert json.loads(memo_b.read_text()) == record  # rewritten whole


# ---- 3. cache entries carry and check their key ----------------------------------------------


def _key(**over: Any) -> CacheKey:
    base: dict[str, Any] = dict(model_fingerprint="f" * 64, prompts_sha256="p" * 64,
                                site="resid_pre", positions="last", layers=(0, 1),
                                dtype="torch.float32")
    base.update(over)
    return CacheKey(**base)


def test_activation_entry_of_another_key_is_a_miss(tmp_path: Path) -> None:
    """A valid entry copied over another key's path must not answer for that key."""
    cache = ActivationCache(tmp_path)
    mine, other = _key(), _key(prompts_sha256="q" * 64)
    positive = Activations("resid_pre", "last", (0, 1), torch.ones(5, 2, 8))
    negative = Activations("resid_pre", "last", (0, 1), -torch.ones(5, 2, 8))
    cache.get_or_compute(mine, lambda: positive)
    cache.get_or_compute(other, lambda: negative)
    shutil.copyfile(cache.path(other), cache.path(mine))  # the fault
    fresh = ActivationCache(tmp_path)
    with pytest.warns(UserWarning, match="another key"):
        got = fresh.get_or_compute(mine, lambda: positive)
    assert torch.equal(got.data, positive.data)
    assert fresh.stats.mismatched == 1 and fresh.stats.misses == 1
    again = ActivationCache(tmp_path).get_or_compute(mine, lambda: negative)
    assert torch.equal(again.data, positive.data)  # the rewritten entry is this key's


def test_activation_entry_with_wrong_row_count_is_a_miss(tmp_path: Path) -> None:
    cache = ActivationCache(tmp_path)
    key = _key()
    cache.get_or_compute(key, lambda: Activations("resid_pre", "last", (0, 1),
                                                  torch.ones(5, 2, 8)))
    right = Activations("resid_pre", "last", (0, 1), torch.zeros(4, 2, 8))
    fresh = ActivationCache(tmp_path)
    with pytest.warns(UserWarning, match="5 rows for 4 prompts"):
        got = fresh.get_or_compute(key, lambda: right, n_prompts=4)
    assert got.data.shape[0] == 4 and fresh.stats.mismatched == 1


def _config(models: tuple[str, ...], cache_dir: Path) -> BenchConfig:
    return tiny_config(cache_dir=cache_dir, models=models, n_gen=3, max_new_tokens=6,
                       dtype="float64")


@pytest.fixture(scope="module")
def tiny64() -> LoadedModel:
    return load("tiny-llama", dtype=torch.float64)


def _bench(lm: LoadedModel, cache_dir: Path) -> Workbench:
    return Workbench(lm, _config(("tiny-llama",), cache_dir), ActivationCache(cache_dir / "acts"),
                     Progress(lambda _m: None))


def _count_forwards(bench: Workbench) -> tuple[list[int], Any]:
    calls: list[int] = []
    handle = bench.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    return calls, handle


def test_workbench_activations_of_another_prompt_set_are_recaptured(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    bench = _bench(tiny64, tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    safe = bench.harmless_split.test.sample(4, 0, "topic")
    want = bench.acts(harm).data.clone()
    bench.acts(safe)
    paths = sorted(bench.cache.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    shutil.copyfile(paths[1], paths[0])  # the harmless entry over the harmful one's path
    again = _bench(tiny64, tmp_path)
    calls, handle = _count_forwards(again)
    try:
        with pytest.warns(UserWarning, match="another key"):
            got = again.acts(harm).data
    finally:
        handle.remove()
    assert calls and torch.equal(got, want)


def _only_entry(folder: Path) -> Path:
    (entry,) = list(folder.glob("*.json"))
    return entry


def _edit_payload(path: Path, edit: Any) -> None:
    """Change the stored payload but not its checksum (a hand edit)."""
    entry = json.loads(path.read_text())
    edit(entry["payload"])
    path.write_text(json.dumps(entry))


def test_edited_generation_entry_is_regenerated(tiny64: LoadedModel, tmp_path: Path) -> None:
    bench = _bench(tiny64, tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    first = bench.generate(harm)
    path = _only_entry(tmp_path / "acts" / "generations")
    _edit_payload(path, lambda p: next(iter(p["rows"].values())).__setitem__(
        "text", "I'm sorry, I cannot help."))
    again = _bench(tiny64, tmp_path)
    calls, handle = _count_forwards(again)
    try:
        with pytest.warns(UserWarning, match="failed its checksum"):
            got = again.generate(harm)
    finally:
        handle.remove()
    assert calls and got.texts == first.texts
    assert again.cache.stats.corrupted == 1


@pytest.mark.parametrize(("fault", "message"), [("too_many_ids", "ids for a budget"),
                                              ("text_not_string", "wrong types")])
def test_generation_entry_with_an_impossible_row_is_regenerated(
    tiny64: LoadedModel, tmp_path: Path, fault: str, message: str
) -> None:
    """A well-formed entry (right key, right checksum) holding a row no generation makes."""
    bench = _bench(tiny64, tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    first = bench.generate(harm)
    path = _only_entry(tmp_path / "acts" / "generations")
    entry = json.loads(path.read_text())
    row = next(iter(entry["payload"]["rows"].values()))
    if fault == "too_many_ids":
        row["ids"] = row["ids"] + [0, 0]
    else:
        row["text"] = 7
    write_json_entry(path, entry["key"], entry["payload"])
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match=message):
        got = again.generate(harm)
    assert got.texts == first.texts and len(got.new_tokens) == 3
    assert again.cache.stats.mismatched == 1


def test_generation_entry_of_another_key_is_regenerated(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    bench = _bench(tiny64, tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    first = bench.generate(harm)
    mine = _only_entry(tmp_path / "acts" / "generations")
    bench.generate(harm, max_new_tokens=3)  # another group, another file
    theirs = next(p for p in (tmp_path / "acts" / "generations").glob("*.json") if p != mine)
    shutil.copyfile(theirs, mine)
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match="another key"):
        got = again.generate(harm)
    assert got.texts == first.texts and again.cache.stats.mismatched == 1


def test_edited_cached_json_result_is_recomputed(tiny64: LoadedModel, tmp_path: Path) -> None:
    """A KL divergence edited to 0 in its cache file must not pass a bound."""
    bench = _bench(tiny64, tmp_path)
    runs: list[int] = []

    def compute() -> dict[str, Any]:
        runs.append(1)
        return {"kl": 0.75, "per_layer": {3: 0.5}}

    assert bench.cached_json("abliteration", "kl", {"edit": "e1"}, compute)["kl"] == 0.75
    path = _only_entry(tmp_path / "acts" / "abliteration")
    _edit_payload(path, lambda p: p.__setitem__("kl", 0.0))
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match="failed its checksum"):
        got = again.cached_json("abliteration", "kl", {"edit": "e1"}, compute)
    assert got["kl"] == 0.75 and len(runs) == 2 and again.cache.stats.corrupted == 1
    # A valid entry is read back as written (int dict keys become strings, as in JSON).
    third = _bench(tiny64, tmp_path).cached_json("abliteration", "kl", {"edit": "e1"}, compute)
    assert third == {"kl": 0.75, "per_layer": {"3": 0.5}} and len(runs) == 2


def test_cached_json_entry_of_another_key_is_recomputed(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    bench = _bench(tiny64, tmp_path)
    bench.cached_json("abliteration", "kl", {"edit": "e1"}, lambda: {"kl": 0.75})
    mine = _only_entry(tmp_path / "acts" / "abliteration")
    bench.cached_json("abliteration", "kl", {"edit": "e2"}, lambda: {"kl": 0.0})
    theirs = next(p for p in (tmp_path / "acts" / "abliteration").glob("*.json") if p != mine)
    shutil.copyfile(theirs, mine)
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match="another key"):
        got = again.cached_json("abliteration", "kl", {"edit": "e1"}, lambda: {"kl": 0.75})
    assert got == {"kl": 0.75} and again.cache.stats.mismatched == 1


def test_cached_json_entry_short_of_prompts_is_recomputed(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    """A well-formed entry (right key, valid checksum) with fewer scores than prompts, as
    an older writer could leave, is rejected by the caller's check and recomputed."""
    bench = _bench(tiny64, tmp_path)
    runs: list[int] = []

    def compute() -> dict[str, Any]:
        runs.append(1)
        return {"scores": [0.1, 0.2, 0.3]}

    def fits(payload: dict[str, Any]) -> None:
        if len(payload["scores"]) != 3:
            raise ValueError(f"{len(payload['scores'])} scores for 3 prompts")

    bench.cached_json("refusal_scores", "scores", {"p": "x"}, compute, fits)
    path = _only_entry(tmp_path / "acts" / "refusal_scores")
    stored = json.loads(path.read_text())
    write_json_entry(path, stored["key"], {"scores": [0.1, 0.2]})
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match="does not fit its key: 2 scores for 3 prompts"):
        got = again.cached_json("refusal_scores", "scores", {"p": "x"}, compute, fits)
    assert got == {"scores": [0.1, 0.2, 0.3]} and len(runs) == 2
    assert again.cache.stats.mismatched == 1


def test_trajectory_part_must_cover_its_layers_and_prompts() -> None:
    part = {"layers": [1, 2], "texts": ["a", "b"], "new_tokens": [3, 4],
            "rows": [{"ids": [1], "proj": [0.0, 0.0]}] * 2}
    check_trajectory_part([1, 2], 2, part)  # fits: no error
    with pytest.raises(ValueError, match="layers"):
        check_trajectory_part([1, 3], 2, part)
    with pytest.raises(ValueError, match="for 3 prompts"):
        check_trajectory_part([1, 2], 3, part)
    with pytest.raises(ValueError, match="for 2 prompts"):
        check_trajectory_part([1, 2], 2, {**part, "rows": part["rows"][:1]})
