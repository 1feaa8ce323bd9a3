"""The contrast of a run (--contrast): matched pairs split by pair and consistent with the
harmful split, so no harmful prompt that fits a direction is ever held out; the edgy and
unmatched contrasts; parts smaller than asked for are recorded, never padded."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from fixtures.contrast import Contrast, resolve_contrast, sample_pairs, split_pairs_like
from fixtures.workbench import SPLIT_FRACTIONS, BenchConfig, Progress, Workbench
from probes.cache import ActivationCache
from prompts import PromptSet, normalise
from prompts.pairs import PairSet
from tests.helpers import tiny_config


def _config(contrast: Contrast, seed: int = 0, n: tuple[int, int, int] = (64, 64, 20)
            ) -> BenchConfig:
    return tiny_config("full", n_train=n[0], n_eval=n[1], n_gen=n[2], seed=seed,
                       contrast=contrast)


def _bench(cfg: BenchConfig, tmp_path: Path) -> Workbench:
    # the prompt methods never touch the model: none is loaded
    return Workbench(None, cfg, ActivationCache(tmp_path), Progress())  # type: ignore[arg-type]


def _norm(ps: PromptSet) -> set[str]:
    return {normalise(t) for t in ps.texts}


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_pairs_follow_the_harmful_split_and_never_straddle(tmp_path: Path, seed: int) -> None:
    bench = _bench(_config(Contrast("matched"), seed), tmp_path)
    hs, ps = bench.harmful_split, bench.pair_split
    parts = {"train": hs.train, "val": hs.val, "test": hs.test}
    pair_ids: dict[str, str] = {}
    for name in parts:
        pairs: PairSet = getattr(ps, name)
        # both sides of a pair in the same part, aligned row by row
        assert pairs.harmful.label("pair") == pairs.harmless.label("pair")
        for pid in pairs.harmful.label("pair"):
            assert pid not in pair_ids, f"pair {pid} in {pair_ids[pid]} and {name}"
            pair_ids[pid] = name
        # each harmful prompt is in its own part of the harmful split, in no other
        assert _norm(pairs.harmful) <= _norm(parts[name])
        for other in set(parts) - {name}:
            assert not _norm(pairs.harmful) & _norm(parts[other])
    assert len(pair_ids) == len(bench.pairs_all or ())
    # the harmful prompts that fit a direction never reach an eval or generation part
    fit = _norm(bench.train_pair()[0])
    for held in (bench.eval_pair(), bench.gen_pair(), bench.eval_pair("unmatched"),
                 bench.gen_pair("unmatched")):
        assert not fit & _norm(held[0])
    # the unmatched direction's fitting prompts never reach the matched held-out parts
    fit_u = _norm(bench.train_pair("unmatched")[0])
    assert not fit_u & (_norm(bench.eval_pair()[0]) | _norm(bench.gen_pair()[0]))


def test_matched_sides_are_twins_row_by_row(tmp_path: Path) -> None:
    bench = _bench(_config(Contrast("matched")), tmp_path)
    pairs = bench.pairs_all
    assert pairs is not None
    twin = dict(zip(pairs.harmful.texts, pairs.harmless.texts, strict=True))
    for harm, safe in (bench.train_pair(), bench.eval_pair(), bench.gen_pair()):
        assert len(harm) == len(safe)
        assert [twin[t] for t in harm.texts] == list(safe.texts)


def test_full_profile_sizes_or_a_recorded_shortfall(tmp_path: Path) -> None:
    """The full profile's 64/64/20 pairs fit the packaged pairs' parts, or the shortfall is
    recorded in the provenance and all the part is used, nothing repeated."""
    for seed in (0, 1):
        bench = _bench(_config(Contrast("matched"), seed), tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [bench.train_pair(), bench.eval_pair(), bench.gen_pair()]
        for (harm, safe), n in zip(got, (64, 64, 20), strict=True):
            assert len(set(harm.texts)) == len(harm) == len(safe) <= n
        short = [len(h) for h, _ in got if len(h) < 64 and len(h) != 20]
        notes = bench.contrast_provenance().get("contrast_notes", [])
        assert len(notes) == len(short) == len(caught)
        assert short or seed == 0  # seed 1 leaves 62 test pairs: the shortfall path runs
        for n_have, note in zip(short, notes, strict=True):
            assert f"holds {n_have} pairs, fewer than the 64" in note


def test_edgy_contrast_uses_overrefusal_prompts(tmp_path: Path) -> None:
    bench = _bench(_config(Contrast("edgy")), tmp_path)
    with pytest.warns(UserWarning, match="fewer than the 64"):
        harm, safe = bench.train_pair()
    assert safe.name.startswith("overrefusal/train")
    assert harm.name.startswith("advbench/train")
    assert not _norm(safe) & _norm(bench.eval_pair()[1])
    assert bench.contrast_provenance()["contrast"] == "edgy"


def test_unmatched_contrast_is_the_old_draw(tmp_path: Path) -> None:
    bench = _bench(_config(Contrast("unmatched")), tmp_path)
    harm, safe = bench.train_pair()
    assert safe.sha256 == bench.sample_harmless(bench.harmless_split.train, 64).sha256
    assert harm.sha256 == bench.sample_harmful(bench.harmful_split.train, 64).sha256


def test_contrast_is_in_the_cache_key(tmp_path: Path) -> None:
    keys = {kind: _bench(_config(Contrast(kind)), tmp_path).contrast_key()
            for kind in ("matched", "unmatched", "edgy")}
    assert len({tuple(sorted(k.items())) for k in keys.values()}) == 3
    assert len(keys["matched"]["pairs"]) == 64  # the pair set's sha256


def test_pairs_outside_the_harmful_set_are_split_by_their_own_draw() -> None:
    harm = PromptSet("h", tuple(f"Explain how to do harmful thing {i}" for i in range(30)))
    split = harm.split(0, SPLIT_FRACTIONS)
    inside = list(split.train.texts[:3]) + list(split.test.texts[:3]) + [split.val.texts[0]]
    outside = [f"Describe how to cause other harm {i}" for i in range(10)]
    texts = inside + outside
    pairs = PairSet("p", PromptSet("p/harmful", tuple(texts), {"pair": tuple(map(str, range(17)))}),
                    PromptSet("p/harmless", tuple(f"Describe a nice walk {i}" for i in range(17)),
                              {"pair": tuple(map(str, range(17)))}))
    ps = split_pairs_like(pairs, split, 0, SPLIT_FRACTIONS)
    assert set(split.train.texts[:3]) <= set(ps.train.harmful.texts)
    assert set(split.test.texts[:3]) <= set(ps.test.harmful.texts)
    assert len(ps.train) + len(ps.val) + len(ps.test) == 17
    assert sample_pairs(ps.train, 2, 0).harmful.label("pair") == sample_pairs(
        ps.train, 2, 0).harmless.label("pair")


def test_resolve_contrast() -> None:
    assert resolve_contrast(None, None, True).kind == "matched"
    fallback = resolve_contrast(None, None, False)
    assert fallback.kind == "unmatched" and fallback.fallback and "--pairs" in fallback.fallback
    assert not fallback.pairs_available and fallback.pair_set() is None
    assert resolve_contrast("edgy", None, False).kind == "edgy"
    with pytest.raises(ValueError, match="--pairs"):
        resolve_contrast("matched", None, False)
