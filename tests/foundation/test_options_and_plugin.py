"""Command-line options become typed values before any model loads; bad ones are usage errors."""

from __future__ import annotations

import pytest

from fixtures.options import parse_alphas, parse_layers

ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'


def test_layer_selection() -> None:
    assert parse_layers("all").resolve(4) == [0, 1, 2, 3]
    assert parse_layers("0,2").resolve(4) == [0, 2]
    assert parse_layers("1-3").resolve(4) == [1, 2, 3]
    assert parse_layers("-1").resolve(4) == [3]
    assert parse_layers("0-1,-1").resolve(24) == [0, 1, 23]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("30").resolve(24)
    for bad in ("x", "3-1", "1,,a"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)


def test_alpha_grid() -> None:
    assert parse_alphas("-2:2:0.25").values[:3] == (-2.0, -1.75, -1.5)
    assert len(parse_alphas("-2:2:0.25")) == 17
    assert parse_alphas("1,-1,0").values == (-1.0, 0.0, 1.0)
    for bad, match in [("", "empty"), ("a,b", "numbers"), ("0:1:0", "positive step"),
                       ("1,1", "repeats"), ("nan", "finite"), ("0:1e6:0.001", "too many"),
                       ("1e9", "finite")]:
        with pytest.raises(ValueError, match=match):
            parse_alphas(bad)


BENCH_TEST = """
import pytest

def test_one(bench, layer, measure):
    bench.record_model(measure)
    assert 0 <= layer < bench.lm.n_layers
"""


def _setup(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_b=BENCH_TEST)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "/nonexistent/m.gguf"], "no such file"),
        (["--layers", "banana"], "--layers 'banana'"),
        (["--alphas", "1,1"], "repeats a value"),
        (["--ratio-alphas", "0:99:1"], "|alpha| <= 10"),
        (["--n-prompts", "0"], "positive integer"),
        (["--seed", "x"], "--seed must be an integer"),
        (["--dtype", "float7"], "unknown dtype"),
        (["--model", "tiny-llama", "--layers", "9"], "out of range"),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    _setup(pytester)
    result = pytester.runpytest_subprocess(*args, "--no-report", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str() + result.stdout.str()
    assert "Traceback" not in result.stderr.str()


def test_models_and_layers_parametrise_with_readable_ids(pytester: pytest.Pytester) -> None:
    _setup(pytester)
    result = pytester.runpytest_subprocess(
        "--model", "tiny-llama", "--model", "tiny-qwen3_next", "--layers", "0,-1",
        "--no-report", "-p", "no:cacheprovider", "-v",
    )
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    for node in ("tiny-llama-L00", "tiny-llama-L03", "tiny-qwen3_next-L00", "tiny-qwen3_next-L03"):
        assert node in out


DTYPE_TEST = """
import torch
from probes.models import auto_dtype

def test_dtype(bench, layer):
    assert bench.cfg.dtype == str(auto_dtype("cpu")).removeprefix("torch.")
    assert bench.lm.dtype == auto_dtype("cpu")
"""


def test_dtype_auto_is_the_default_and_resolves_before_loading(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_d=DTYPE_TEST)
    result = pytester.runpytest_subprocess("--model", "tiny-llama", "--layers", "0",
                                           "--no-report", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
