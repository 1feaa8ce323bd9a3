"""Smoke test of `make perf` (perf/__main__.py) on a tiny random model, in a subprocess.

One quick run of every section that works without a GGUF model; the JSON it writes is
checked for structure, for the parity checks the script makes itself (same activations,
same generated text, an abliterated model without the direction) and for peers that are
either measured or reported unavailable with a reason (`make test` does not install them).
Timings themselves are not judged here: they depend on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
SECTIONS = "load,activations,generation,doseresponse,compare-acts,compare-steer,abliteration"

pytestmark = pytest.mark.perf


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "perf", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_quick_run_on_a_tiny_model(tmp_path: Path) -> None:
    """One run (a single test, so that pytest-xdist does not run the script twice)."""
    out = tmp_path / "perf.json"
    # One thread: the tiny model's many small ops are slowest under thread contention.
    # float32: the peers' agreement with the suite is checked exactly.
    proc = _run("--model", MODEL, "--quick", "--no-memory", "--threads", "1", "--dtype", "float32",
                "--sections", SECTIONS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[perf" in proc.stderr  # progress lines go to stderr
    run = (json.loads(out.read_text()), proc.stdout)
    check_document_has_provenance(run)
    check_every_figure_is_complete(run)
    check_foundation_and_generation_figures(run)
    check_activation_peers_agree_or_explain(run, "tl", "transformer_lens")
    check_activation_peers_agree_or_explain(run, "sv", "steering_vectors")
    check_steering_and_abliteration_parity(run)
    check_table_is_printed(run)


def _figures(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    figs: dict[str, dict[str, Any]] = doc["models"][MODEL]["figures"]
    return figs


def check_document_has_provenance(run: tuple[dict[str, Any], str]) -> None:
    doc, _ = run
    assert doc["schema"] == "refusalbench-perf/1"
    assert doc["quick"] is True
    m = doc["machine"]
    assert m["cpu_model"] and m["torch_threads"] == 1 and m["logical_cpus"] >= 1
    assert m["packages"]["torch"] and m["packages"]["transformers"]
    assert re.fullmatch(r"(onednn\+)?rows-first>=\d+Ki|linear", m["decoding_matmuls_float32_cpu"])
    assert doc["date"].startswith("20")
    info = doc["models"][MODEL]
    assert info["n_layers"] == 4 and info["flops_per_token"] == 2 * info["n_params"]
    assert doc["roofline"]["gflops"] > 0


def check_every_figure_is_complete(run: tuple[dict[str, Any], str]) -> None:
    doc, _ = run
    for fid, f in _figures(doc).items():
        assert f["status"] in ("ok", "unavailable", "skipped", "error"), fid
        assert f["status"] != "error", (fid, f["note"])
        if f["status"] == "ok":
            assert f["value"] is not None and math.isfinite(f["value"]), fid
            assert f["repeats"] == len(f["samples"])
        else:
            assert f["note"], f"{fid} is {f['status']} without a reason"
        if f["target"] is not None and f["status"] == "ok":
            assert isinstance(f["met"], bool), fid
    targets = {(t["model"], t["figure"]) for t in doc["targets"]}
    assert (MODEL, "acts.cache_read_s") in targets
    assert (MODEL, "gen.speedup_bs32_over_bs1") in targets


def check_foundation_and_generation_figures(run: tuple[dict[str, Any], str]) -> None:
    doc, _ = run
    f = _figures(doc)
    assert f["load.cold_s"]["status"] == "skipped"  # a tiny model has no GGUF
    assert f["load.warm_s"]["value"] > 0
    assert f["acts.suite_over_hidden_states"]["extra"]["max_abs_diff"] < 1e-4
    assert f["acts.cache_read_s"]["value"] < f["acts.suite_s"]["value"]
    for bs in (1, 8, 32):
        assert f[f"gen.bs{bs}_tok_s"]["value"] > 0
    assert f["gen.bs32_fraction"]["units"] == "fraction"
    assert f["gen.speedup_bs32_over_bs1"]["value"] > 1  # batching helps even here
    assert f["dose.wall_s"]["extra"]["generations"] == 3 * 8


def _peer_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_activation_peers_agree_or_explain(run: tuple[dict[str, Any], str], key: str,
                                           module: str) -> None:
    doc, _ = run
    f = _figures(doc)
    fig = f[f"cmp.acts.{key}_s"]
    if not _peer_installed(module):
        assert fig["status"] == "unavailable" and "make perf" in fig["note"]
        return
    assert fig["status"] == "ok", fig["note"]
    assert fig["extra"]["max_abs_diff_vs_suite"] < 1e-4
    assert f[f"cmp.acts.{key}_ratio_cold"]["value"] > 0
    assert f[f"cmp.acts.{key}_ratio_warm"]["value"] < f[f"cmp.acts.{key}_ratio_cold"]["value"]


def check_steering_and_abliteration_parity(run: tuple[dict[str, Any], str]) -> None:
    doc, _ = run
    f = _figures(doc)
    loop = f["cmp.steer.loop_s"]["extra"]
    assert loop["same_text"] == loop["n"] == 8
    ratio = f["cmp.steer.loop_ratio"]
    suite, peer = f["cmp.steer.suite_s"]["samples"], f["cmp.steer.loop_s"]["samples"]
    paired = [a / b for a, b in zip(suite, peer, strict=True)]
    assert ratio["extra"]["per_round"] == pytest.approx(paired)
    if _peer_installed("steering_vectors"):
        sv = f["cmp.steer.sv_s"]["extra"]
        assert sv["same_text"] == sv["n"]
    for key in ("abl.suite_context_s", "abl.suite_copy_s", "abl.plain_copy_s"):
        assert f[key]["extra"]["max_residual_projection"] < 1e-5, key


def check_table_is_printed(run: tuple[dict[str, Any], str]) -> None:
    _, table = run
    assert "refusalbench perf" in table
    for text in ("[activations]", "[generation]", "[compare-acts]", "[abliteration]",
                 "capture / output_hidden_states", "wrote "):
        assert text in table


def test_bad_section_is_a_usage_error() -> None:
    proc = _run("--sections", "nonsense", timeout=60)
    assert proc.returncode == 2
    assert "unknown section 'nonsense'" in proc.stderr


def test_a_missing_peer_is_reported_not_faked(monkeypatch: pytest.MonkeyPatch) -> None:
    from perf.work import Inputs, Unavailable, Workloads
    from probes.models import load

    monkeypatch.setitem(sys.modules, "steering_vectors", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)
    w = Workloads(load(MODEL), Inputs(n_prompts=2))
    for task in ("acts.tl", "acts.sv", "gen.sv"):
        with pytest.raises(Unavailable, match="make perf"):
            w.build(task)


def test_per_round_ratios_pair_each_round() -> None:
    from perf.report import per_round, per_round_note

    # the machine slows down between rounds; each round pairs the two tools' own times
    rounds = per_round([10.0, 20.0, 15.0], [100.0, 200.0, 150.0])
    assert rounds == pytest.approx([0.1, 0.1, 0.1])
    assert per_round_note(rounds) == "; per round 0.1 / 0.1 / 0.1"
    assert per_round_note([0.5]) == ""  # one round: the value says it already
    with pytest.raises(ValueError):
        per_round([1.0, 2.0], [1.0])
