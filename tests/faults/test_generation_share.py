"""Each reply is generated once per run: the generation cache is per formatted prompt.

Two experiments whose prompt sets overlap share the common replies (in memory and on disk);
a call generates only the rows its group lacks, steered arms included; results equal a
fresh generation; a damaged group file is reported and its rows generated again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fixtures.workbench as workbench
from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache
from probes.interventions import plan_raw
from probes.models import LoadedModel, load
from probes.monitoring import forced_trajectories
from prompts import PromptSet
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def tiny64() -> LoadedModel:
    return load("tiny-llama", dtype=torch.float64)


def _bench(lm: LoadedModel, cache_dir: Path, use_cache: bool = True) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, dtype="float64", max_new_tokens=6, use_cache=use_cache)
    return Workbench(lm, cfg, ActivationCache(cache_dir / "acts"), Progress(lambda _m: None))


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The prompt list of every generation the Workbench runs."""
    calls: list[list[str]] = []
    real = workbench.generate

    def counting(model: Any, tokenizer: Any, prompts: list[str], *a: Any, **k: Any) -> Any:
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(workbench, "generate", counting)
    return calls


def _sets(bench: Workbench) -> tuple[PromptSet, PromptSet, PromptSet]:
    """Two overlapping harmful sets (first 4 and last 4 of 6) and their union."""
    pool = bench.harmful_split.test.subset(list(range(6)), "pool")
    return pool.subset([0, 1, 2, 3], "a"), pool.subset([2, 3, 4, 5], "b"), pool


def _plan(bench: Workbench, alpha: float) -> Any:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(bench.lm.layout.d_model, generator=g, dtype=torch.float64)
    return plan_raw({1: v}, alpha)


def test_overlapping_set_generates_only_its_new_rows(
    tiny64: LoadedModel, tmp_path: Path, generated: list[list[str]]
) -> None:
    bench = _bench(tiny64, tmp_path / "shared")
    a, b, union = _sets(bench)
    first = bench.generate(a)
    tokens_a = bench.generated_tokens
    second = bench.generate(b)
    assert [len(c) for c in generated] == [4, 2]  # prompts 2 and 3 were not generated again
    assert generated[1] == bench.lm.format(list(b.texts[2:]))
    assert bench.generated_tokens - tokens_a == sum(second.new_tokens[2:])
    assert second.texts[:2] == first.texts[2:] and second.token_ids[:2] == first.token_ids[2:]
    assert bench.generate(b) is second and len(generated) == 2  # memo: same object, no work

    fresh = _bench(tiny64, tmp_path / "fresh").generate(union)
    assert [*first.texts, *second.texts[2:]] == fresh.texts
    assert [*first.new_tokens, *second.new_tokens[2:]] == fresh.new_tokens


def test_a_second_session_reads_rows_from_disk_and_generates_the_rest(
    tiny64: LoadedModel, tmp_path: Path, generated: list[list[str]]
) -> None:
    bench = _bench(tiny64, tmp_path)
    a, _b, union = _sets(bench)
    first = bench.generate(a)
    again = _bench(tiny64, tmp_path)
    got = again.generate(union)
    assert [len(c) for c in generated] == [4, 2]
    assert got.texts[:4] == first.texts and got.token_ids[:4] == first.token_ids
    assert again.cache.stats.corrupted == again.cache.stats.mismatched == 0
    (entry,) = (tmp_path / "acts" / "generations").glob("*.json")  # one file for the whole group
    assert len(json.loads(entry.read_text())["payload"]["rows"]) == 6


def test_two_sessions_writing_one_group_keep_each_others_rows(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    """Writes merge with what the file holds: a session that loaded the group before
    another added rows does not drop them."""
    one, two = _bench(tiny64, tmp_path), _bench(tiny64, tmp_path)
    a, b, _union = _sets(one)
    one.generate(a.subset([0], "a0"))
    two.generate(b.subset([3], "b3"))  # two loaded the group after one's row was written
    one.generate(a.subset([1], "a1"))  # one's memo lacks b3: the write must keep it
    (entry,) = (tmp_path / "acts" / "generations").glob("*.json")
    assert len(json.loads(entry.read_text())["payload"]["rows"]) == 3


def test_steered_arms_generate_only_missing_rows_together(
    tiny64: LoadedModel, tmp_path: Path, generated: list[list[str]]
) -> None:
    bench = _bench(tiny64, tmp_path / "shared")
    a, b, union = _sets(bench)
    up, down = _plan(bench, 3.0), _plan(bench, -3.0)
    first = bench.generate_steered([(a, "up", up), (a, "none", None)])
    assert [len(c) for c in generated] == [8]
    second = bench.generate_steered([(b, "up", up), (union, "none", None), (b, "down", down),
                                     (b, "up", up)])
    # one joint call: 2 new rows of "up", 2 of "none", 4 of "down" (the repeated arm once)
    assert [len(c) for c in generated] == [8, 8]
    assert second[0] is second[3]
    assert second[0].texts[:2] == first[0].texts[2:]
    assert second[1].texts[:4] == first[1].texts
    assert len({tuple(g.texts) for g in second[:3]}) == 3  # the arms do differ

    fresh = _bench(tiny64, tmp_path / "fresh")
    ref = fresh.generate_steered([(union, "up", up), (union, "none", None), (b, "down", down)])
    assert [*first[0].texts, *second[0].texts[2:]] == ref[0].texts
    assert second[1].texts == ref[1].texts and second[2].texts == ref[2].texts


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_group_file_is_reported_and_regenerated(
    tiny64: LoadedModel, tmp_path: Path, generated: list[list[str]], damage: str
) -> None:
    bench = _bench(tiny64, tmp_path)
    a, _b, _union = _sets(bench)
    first = bench.generate(a)
    (entry,) = (tmp_path / "acts" / "generations").glob("*.json")
    raw = entry.read_bytes()
    entry.write_bytes(b"\x00not json" if damage == "garbage" else raw[: len(raw) // 2])
    again = _bench(tiny64, tmp_path)
    with pytest.warns(UserWarning, match="cannot parse"):
        got = again.generate(a)
    assert [len(c) for c in generated] == [4, 4]  # every row of the group generated again
    assert got.texts == first.texts and again.cache.stats.corrupted == 1
    assert len(json.loads(entry.read_text())["payload"]["rows"]) == 4  # rewritten whole


def test_cached_rows_do_not_reload_an_evicted_model(tiny64: LoadedModel, tmp_path: Path) -> None:
    reloads: list[int] = []

    def reload() -> LoadedModel:
        reloads.append(1)
        return tiny64

    bench = Workbench(tiny64, _bench(tiny64, tmp_path).cfg,
                      ActivationCache(tmp_path / "acts"), Progress(lambda _m: None), reload)
    a, _b, _union = _sets(bench)
    first = bench.generate(a)
    bench.release_model()
    assert bench.generate(a.subset([1, 2], "part")).texts == first.texts[1:3]
    assert not reloads


def test_without_the_cache_rows_are_still_shared_within_the_run(
    tiny64: LoadedModel, tmp_path: Path, generated: list[list[str]]
) -> None:
    bench = _bench(tiny64, tmp_path, use_cache=False)
    a, b, _union = _sets(bench)
    bench.generate(a)
    bench.generate(b)
    assert [len(c) for c in generated] == [4, 2]
    assert not (tmp_path / "acts" / "generations").exists()


def test_stored_token_ids_give_the_monitor_its_trajectories(
    tiny64: LoadedModel, tmp_path: Path
) -> None:
    """Replies read back from disk carry the ids generation kept, so a teacher-forced pass
    over them gives the same trajectories as over the replies just generated."""
    bench = _bench(tiny64, tmp_path)
    a, _b, _union = _sets(bench)
    first = bench.generate(a)
    reread = _bench(tiny64, tmp_path).generate(a)
    dirs = {0: torch.ones(bench.lm.layout.d_model, dtype=torch.float64)}
    t1, t2 = (forced_trajectories(bench.lm.layout, bench.lm.tokenizer, g.prompts, g.token_ids,
                                  g.new_tokens, dirs, "resid_pre") for g in (first, reread))
    assert reread.token_ids == first.token_ids
    for x, y in zip(t1, t2, strict=True):
        assert x.token_ids == y.token_ids and (x.projections == y.projections).all()
