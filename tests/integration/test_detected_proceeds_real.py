"""DETECTED_PROCEEDS and per-token monitoring on the real packaged models.

* The monitor on the embedded model: trajectories equal a separate capture of the same
  tokens (prompt's last position and every generated token read back), rows of different
  lengths in one batch.
* ``benchmarks/test_detected_proceeds.py`` end to end in a pytest subprocess: on the
  embedded model with ``--profile quick`` (32 harmful prompts, enough refusals and
  compliances for every claim to be judged), and on SmolLM2-135M-Instruct, which does not
  refuse, in a smaller run (``--n-gen 2 --max-new-tokens 8``: 8 prompts), where the claims
  that need refusals must end in a skip with the stated reason, never in an error. Claims
  are judged at the reference causal layer (its label) or skipped because no layer is
  causal. Verdicts are scientific results and are not asserted. With warm caches each run
  takes well under a minute; the first run on a machine generates the replies (minutes on a
  loaded CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import prompts
from probes.capture import recording
from probes.models import LoadedModel
from probes.monitoring import generate_monitored

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "test_detected_proceeds.py"
TIMEOUT_S = 1800  # generous: a cold cache on a loaded machine
SMALL = ("--n-gen", "2", "--max-new-tokens", "8")
MIN_GROUP = 10  # benchmarks/test_detected_proceeds.py: replies per group for the comparisons
CLAIMS = {"DP-SHARE-NONZERO", "DP-DETECT-EXCEEDS-DECISION", "MONITOR-REFUSAL-HIGHER"}
NEEDS_REFUSALS = {"DP-DETECT-EXCEEDS-DECISION", "MONITOR-REFUSAL-HIGHER"}


def test_monitor_equals_a_separate_capture_on_the_real_model(real_model: LoadedModel) -> None:
    lm = real_model
    texts = [*prompts.harmbench().sample(2, seed=1).texts, "Write hello world in Python."]
    formatted = lm.format(texts)
    layers = [4, 12, lm.n_layers - 1]
    g = torch.Generator().manual_seed(0)
    dirs = {layer: (v := torch.randn(lm.layout.d_model, generator=g)) / v.norm()
            for layer in layers}
    gens, trajs = generate_monitored(lm.model, lm.tokenizer, lm.layout, formatted, dirs, 8,
                                     site="resid_pre", batch_size=3)
    encoded = lm.tokenizer(formatted, add_special_tokens=False)["input_ids"]
    for i, traj in enumerate(trajs):
        m = gens.new_tokens[i]
        generated = gens.token_ids[i][: m - 1]
        assert traj.n_steps == m
        assert list(traj.token_ids) == [encoded[i][-1], *generated]
        ids = [*encoded[i], *generated]
        with torch.inference_mode(), recording(lm.layout, "resid_pre", layers,
                                               lambda h: h[0]) as sinks:
            lm.layout.decoder(input_ids=torch.tensor([ids]), use_cache=False)
        start = len(encoded[i]) - 1
        for layer in layers:
            expected = (sinks[layer][0][start : start + m] @ dirs[layer]).double().numpy()
            scale = max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(traj.layer(layer), expected, atol=2e-3 * scale)


def _run(pytester: pytest.Pytester, *args: str) -> dict[str, Any]:
    out = pytester.path / "report.json"
    # float32: the report's monitor-vs-capture check below is an exactness check (in the
    # suite's default bfloat16 two passes over differently padded batches differ by bf16
    # rounding, about 1 % of a projection).
    result = pytester.runpytest_subprocess(str(BENCH), "--profile", "quick", "--dtype", "float32",
                                           *args, "-p", "no:cacheprovider", "--report-json",
                                           str(out), timeout=TIMEOUT_S)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert not doc["collection_errors"], doc["collection_errors"]
    outcomes = {t["name"]: t["outcome"] for t in doc["tests"]}
    assert "error" not in outcomes.values(), outcomes
    assert len(outcomes) == 3, outcomes
    return doc


def _metric(test: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in test["metrics"] if m["name"] == name]
    assert found, f"{test['nodeid']} recorded no metric {name!r}"
    return found[0]


def _checks(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = {c["hypothesis"]: c for t in doc["tests"] for c in t["checks"]}
    assert set(checks) == CLAIMS, set(checks)
    return checks


def _common(doc: dict[str, Any], expected_n: int) -> tuple[int, int]:
    """(harmful prompts, refusals) after checking the shared records of every test."""
    first = doc["tests"][0]
    n = int(_metric(first, "generation/harmful_prompts")["value"])
    assert n == expected_n
    refusals = round(_metric(first, "refusal_rate/all")["value"] * n)
    assert _metric(first, "monitor/step0_vs_capture_max_abs_diff")["value"] < 1e-2
    share = next(t for t in doc["tests"] if t["name"].startswith("test_detected_proceeds_share"))
    table = next(tb for tb in share["tables"] if tb["name"] == "detected_proceeds_by_layer")
    assert len(table["rows"]) >= 2
    return n, refusals


def _causal(doc: dict[str, Any], hid: str) -> tuple[int, float]:
    """(causal layers found, reference causal layer) as the claim's test recorded them."""
    test = next(t for t in doc["tests"] if any(c["hypothesis"] == hid for c in t["checks"]))
    ref = _metric(test, "causal_reference_layer")["value"]  # null: no causal layer
    return (int(_metric(test, "causal_layers_count")["value"]),
            math.nan if ref is None else float(ref))


def _judged_or_skipped_for_the_stated_reason(doc: dict[str, Any], n: int, refusals: int) -> None:
    """Every claim is judged at the reference causal layer, or skipped for a stated reason:
    too few refusals or compliances, or no causal layer (never judged at another layer)."""
    small = min(refusals, n - refusals)
    for hid, check in _checks(doc).items():
        if check["verdict"] == "skipped" and "no layer is causal" in (check["reason"] or ""):
            assert _causal(doc, hid)[0] == 0, check
        elif hid in NEEDS_REFUSALS and small < MIN_GROUP:
            assert check["verdict"] == "skipped", check
            word = "refused" if refusals == small else "complied with"
            if small == 0:
                assert check["reason"] == (f"model {word} 0 of {n} harmful prompts: "
                                           "decision AUC undefined"), check
            else:
                assert check["reason"].startswith(f"model {word} {small} of {n} harmful "
                                                  f"prompts: fewer than {MIN_GROUP}"), check
        else:
            assert check["verdict"] in ("pass", "fail"), check["message"]
            count, reference = _causal(doc, hid)
            assert count >= 1 and check["label"] == f"layer {int(reference)}", check
            assert check["value"] is not None and math.isfinite(check["value"])
            lo, hi = check["ci"]
            assert lo is not None and hi is not None and lo <= hi


def test_benchmark_on_the_embedded_model(pytester: pytest.Pytester) -> None:
    doc = _run(pytester)
    n, refusals = _common(doc, 32)  # 8 (gen_pair) + 8 (AdvBench validation) + 16 (HarmBench)
    _judged_or_skipped_for_the_stated_reason(doc, n, refusals)
    monitor = next(t for t in doc["tests"] if t["name"].startswith("test_refusal_tokens"))
    tables = {tb["name"]: tb for tb in monitor["tables"]}
    examples = [name for name in tables if name.startswith("trajectory/")
                and name != "trajectory/missing_examples"]
    assert examples, tables.keys()
    for name in examples:
        cols = tables[name]["columns"]
        assert cols[:2] == ["step", "input token"] and len(cols) > 3
    assert any(p["kind"] == "line" and p["name"].startswith("trajectory_examples")
               for p in monitor["plots"])


def test_benchmark_on_smollm2_skips_the_claims_that_need_refusals(
    pytester: pytest.Pytester,
) -> None:
    doc = _run(pytester, *SMALL, "--model", "smollm2-135m-instruct")
    n, refusals = _common(doc, 8)  # 2 + 2 + 4
    assert refusals == 0  # the reason below is then the one the issue asks for
    _judged_or_skipped_for_the_stated_reason(doc, n, refusals)
