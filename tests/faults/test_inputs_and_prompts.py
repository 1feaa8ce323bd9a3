"""Bad inputs end in one clear error before any model loads; prompt sets are clean.

Each test performs the fault: a bad option on a real pytest run (pytester), a malformed
prompt file, a model directory that cannot load, duplicated or overlapping prompts, a
prompt longer than the model's context, and a bfloat16 export reloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'

LAYER_TEST = """
def test_one(bench, layer):
    assert 0 <= layer < bench.lm.n_layers
"""

MODEL_TEST = """
def test_plain(loaded_model):
    assert loaded_model.n_layers > 0

def test_other(loaded_model):
    assert loaded_model.n_layers > 0
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, "--no-report", "-p", "no:cacheprovider")


def _assert_usage_error(result: pytest.RunResult, message: str) -> str:
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert message in out
    assert "Traceback" not in out and "pluggy/" not in out and "\nE   " not in out
    return out


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "CUDA is not available here"),
        (["--device", "cuda:3"], "CUDA is not available here"),
        (["--device", "foo"], "--device 'foo' is not a torch device; write cpu, cuda"),
        (["--device", "mps"], "MPS backend is not available here"),
        (["--device", "xla"], "the suite runs on cpu, cuda or mps"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got '-1'"),
        (["--seed", "1.5"], "--seed must be an integer >= 0"),
    ],
)
def test_bad_device_and_seed_are_usage_errors(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, even on a machine with one
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_l=LAYER_TEST)
    # tiny-llama: were it loaded, the run would pass; the error must come before
    _assert_usage_error(_run(pytester, "--model", "tiny-llama", *args), message)


def test_cache_dir_that_is_a_file_or_under_a_file_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_l=LAYER_TEST)
    # Paths inside the run's folder: pytest looks for conftests beside path-like arguments.
    a_file = pytester.path / "cache.txt"
    a_file.write_text("not a directory")
    _assert_usage_error(_run(pytester, "--model", "tiny-llama", "--cache-dir", str(a_file)),
                        "that is a file, not a directory")
    _assert_usage_error(
        _run(pytester, "--model", "tiny-llama", "--cache-dir", str(a_file / "sub")),
        "cannot create the directory")
    monkeypatch.setenv("REFUSALBENCH_CACHE_DIR", str(a_file))
    _assert_usage_error(_run(pytester, "--model", "tiny-llama"),
                        "$REFUSALBENCH_CACHE_DIR")


def test_unwritable_cache_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures import options

    monkeypatch.setattr(options.os, "access", lambda *_a: False)  # root may write anywhere
    with pytest.raises(ValueError, match="not writable"):
        options.check_cache_dir(str(tmp_path), "--cache-dir")


# --------------------------------------------------------------------------- model loads


def _broken_model_dir(root: Path) -> Path:
    d = root / "broken-model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return d


def _corrupt_gguf(root: Path) -> Path:
    f = root / "corrupt.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    return f


@pytest.mark.parametrize("make", [_broken_model_dir, _corrupt_gguf], ids=["config", "gguf"])
def test_model_load_failure_stops_the_session_once(
    pytester: pytest.Pytester, make: object
) -> None:
    bad = make(pytester.path)  # type: ignore[operator]
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_a=LAYER_TEST, test_b=LAYER_TEST, test_c=MODEL_TEST)
    result = _run(pytester, "--model", str(bad), "--cache-dir", str(pytester.path / "cache"))
    out = _assert_usage_error(result, f"cannot load --model {bad}")
    assert out.count("cannot load --model") == 1, out
    assert out.count("[model] loading") == 1, "the failing load is tried once"
    assert "passed" not in out and "during collection" not in out


def test_model_load_failure_in_a_fixture_stops_the_session_once(
    pytester: pytest.Pytester,
) -> None:
    bad = _broken_model_dir(pytester.path)
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_c=MODEL_TEST)
    result = _run(pytester, "--model", str(bad), "--cache-dir", str(pytester.path / "cache"))
    out = _assert_usage_error(result, f"cannot load --model {bad}")
    assert out.count("cannot load --model") == 1, out
