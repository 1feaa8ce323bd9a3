"""Faults around early stop: a bad ``--early-stop``, full and early-stopped replies mixed up
in the generation cache, a broken cache entry, a judge that cannot decide early."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache, write_json_entry
from probes.early_stop import StopRule
from probes.interventions import plan_raw
from probes.models import load
from probes.reply_judges import resolve_judge
from tests.helpers import tiny_config

ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
REPO = Path(__file__).resolve().parents[2]
ALWAYS = StopRule("always", lambda text: True, every=2)


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocess runs import the plugins of this checkout, not of an installed copy."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def _bench(cache_dir: Path, **changes: object) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, dtype="float64", max_new_tokens=8, batch_size=5)
    lm = load("tiny-llama", dtype=torch.float64)
    return Workbench(lm, replace(cfg, **changes), ActivationCache(cache_dir / "acts"),
                     Progress(lambda _m: None))


def _forward_calls(bench: Workbench) -> list[int]:
    calls: list[int] = []
    bench.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    return calls


def test_bad_early_stop_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--early-stop", "maybe", "--no-report",
                                           "-p", "no:cacheprovider")
    out = result.stderr.str() + result.stdout.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--early-stop 'maybe' is neither on nor off" in out
    assert "Traceback" not in result.stderr.str()


def test_early_stop_setting_is_recorded_in_the_report(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_x="def test_x(bench, measure):\n    bench.record_model(measure)\n")
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("--model", "tiny-llama", "--early-stop", "off",
                                           "--report-json", str(report),
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    doc = json.loads(report.read_text())
    assert doc["provenance"]["options"]["early_stop"] == "off"
    assert '"early_stop": false' in report.read_text()


def test_full_replies_are_never_read_back_as_early_stopped(tmp_path: Path) -> None:
    """The rule's tag keys the entry: a run with a rule after a run without one (and the
    other way round) generates again instead of reading the other's replies."""
    bench = _bench(tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    full = bench.generate(harm, "k")
    again = _bench(tmp_path)
    calls = _forward_calls(again)
    early = again.generate(harm, "k", stop_rule=ALWAYS)
    assert calls, "early-stopped replies were read from the full replies' entry"
    assert early.stop_rule == ALWAYS.tag and any(early.stopped_early)
    assert all(len(t) <= 2 for t in early.token_ids)
    third = _bench(tmp_path)
    calls = _forward_calls(third)
    assert third.generate(harm, "k").texts == full.texts and not calls  # full entry intact
    reread = third.generate(harm, "k", stop_rule=ALWAYS)
    assert not calls and reread.stopped_early == early.stopped_early  # flags kept on disk


def test_entry_with_a_bad_early_stop_flag_is_recomputed(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    bench.generate(harm, "k", stop_rule=ALWAYS)
    group = bench._gen_group("k", 8, ALWAYS)
    payload = json.loads(group.path.read_text())["payload"]
    rows = payload["rows"]
    assert len(rows) == 3 and all(r.get("stopped_early") is True for r in rows.values())
    next(iter(rows.values()))["stopped_early"] = "yes"  # not a boolean
    write_json_entry(group.path, group.key, payload)
    again = _bench(tmp_path)
    calls = _forward_calls(again)
    with pytest.warns(UserWarning, match="early-stop flag that is not a boolean"):
        got = again.generate(harm, "k", stop_rule=ALWAYS)
    assert calls and len(got.stopped_early) == 3 and all(got.stopped_early)


def test_unsteered_arms_and_judges_without_a_hook_never_stop(tmp_path: Path) -> None:
    """generate_steered stops steered arms only (the unsteered entry is shared with
    generate()); a user judge with no ``decided_prefix`` gives no rule at all."""
    bench = _bench(tmp_path)
    harm = bench.harmful_split.test.sample(3, 0, "category")
    g = torch.Generator().manual_seed(0)
    plan = plan_raw({1: torch.randn(bench.lm.layout.d_model, generator=g,
                                    dtype=torch.float64)}, 2.0)
    none, steered = bench.generate_steered([(harm, "none", None), (harm, "a", plan)],
                                           stop_rule=ALWAYS)
    assert none.stop_rule is None and not any(none.stopped_early)
    assert none.texts == bench.generate(harm).texts
    assert steered.stop_rule == ALWAYS.tag and all(steered.stopped_early)
    user = _bench(tmp_path / "user",
                  judge=resolve_judge("probes.reply_judges:keyword_judge"))
    assert user.degenerate_stop_rule() is None
    off = _bench(tmp_path / "off", early_stop=False)
    assert off.degenerate_stop_rule() is None
    assert bench.degenerate_stop_rule() is not None
