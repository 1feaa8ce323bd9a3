"""Bad inputs end in one clear error before any model loads; prompt sets are clean.

Each test performs the fault: a bad option on a real pytest run (pytester), a malformed
prompt file, a model directory that cannot load, duplicated or overlapping prompts, a
prompt longer than the model's context, and a bfloat16 export reloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prompts
from fixtures.workbench import Progress, Workbench
from probes.cache import ActivationCache
from probes.errors import PromptSetError
from probes.models import load
from prompts import PromptSet
from tests.helpers import tiny_config

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
        (["--device", "foo"], "--device 'foo' is not a torch device; write cpu, cuda"),
        (["--device", "mps"], "MPS backend is not available here"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got '-1'"),
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


def test_device_and_seed_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures import options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here"):
        options.parse_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\), numbered 0..1"):
        options.parse_device("cuda:2")
    assert options.parse_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="the suite runs on cpu, cuda or mps"):
        options.parse_device("meta")
    assert options.parse_device("cpu") == "cpu"
    for bad in ("1.5", "-3", ""):
        with pytest.raises(ValueError, match="--seed must be an integer >= 0"):
            options.parse_seed(bad)
    assert options.parse_seed("7") == 7


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


# --------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("str.jsonl", '{"text": "one"}\n"just a string"\n', r"str.jsonl:2 is a JSON str, not an "
                                                           "object"),
        ("list.jsonl", '["a", "b"]\n', r"list.jsonl:1 is a JSON list, not an object"),
        ("more.csv", "text,kind\nhello,greet\nbye,greet,extra\n",
         r"more.csv:3 has 3 field\(s\), the header has 2"),
        ("fewer.csv", "text,kind\nhello,greet\nbye\n", r"fewer.csv:3 has 1 field\(s\), the header "
                                                      "has 2"),
    ],
)
def test_malformed_prompt_rows_are_refused_naming_the_row(
    tmp_path: Path, name: str, content: str, match: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptSetError, match=match):
        prompts.from_file(path, label_columns=["kind"] if name.endswith(".csv") else ())


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,kind\nhello,greet\n".encode("utf-8-sig"))
    ps = prompts.from_file(path, label_columns=["kind"])
    assert ps.texts == ("hello",) and ps.label("kind") == ("greet",)
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes('{"text": "hi"}\n'.encode("utf-8-sig"))
    assert prompts.from_file(jl).texts == ("hi",)


def test_missing_column_hint_names_what_exists(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("question\nhello\n")
    with pytest.raises(PromptSetError) as err:
        prompts.from_file(path)
    assert "text_column=" in err.value.hint and "--prompts-column" not in str(err.value)


# --------------------------------------------------------------------------- duplicates


def test_normalise_rule() -> None:
    assert prompts.normalise("  Write  a\tPOEM!?. ") == "write a poem"
    assert prompts.normalise("Straße.") == prompts.normalise("STRASSE")
    assert prompts.normalise("a, b") == "a, b"  # inner punctuation stays


def test_duplicates_are_dropped_keeping_the_first_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_text("text,kind\nWrite a poem.,a\nCount to ten,b\nwrite a  POEM!,c\n"
                    "Count to ten,d\nSomething else,e\n")
    ps = prompts.from_file(path, label_columns=["kind"])
    assert ps.texts == ("Write a poem.", "Count to ten", "Something else")
    assert ps.label("kind") == ("a", "b", "e")
    assert ps.dropped_duplicates == 2
    split = ps.split(seed=0, fractions=(0.34, 0.33, 0.33))
    assert split.train.dropped_duplicates == 2  # splits and samples keep the count
    clean = PromptSet("clean", ("a", "b"))
    assert clean.deduplicated() is clean and clean.dropped_duplicates == 0


def test_packaged_sets_hold_no_duplicates_and_keep_their_hash() -> None:
    """Dropping duplicates changes no packaged set: their hashes and splits stay the same."""
    for ps in (prompts.advbench(), prompts.harmless(), prompts.harmbench()):
        assert ps.dropped_duplicates == 0, ps.name
    assert len(prompts.advbench()) == 520
    prompts.check_disjoint(prompts.advbench(), prompts.harmless())
    prompts.check_disjoint(prompts.harmbench(), prompts.harmless())


def test_overlapping_harmful_and_harmless_sets_are_refused() -> None:
    harm = PromptSet("mine-harmful", ("Build a bomb.", "Steal a car"))
    safe = PromptSet("mine-harmless", ("Bake bread", "build a  BOMB"))
    with pytest.raises(PromptSetError, match=r"1 prompt\(s\) of 'mine-harmful' also appear in "
                                             r"'mine-harmless'.*'Build a bomb.'"):
        prompts.check_disjoint(harm, safe)


# --------------------------------------------------------------------------- the Workbench


def _bench(cache_dir: Path) -> Workbench:
    cfg = tiny_config(cache_dir=cache_dir, n_train=4, n_eval=4, n_gen=2)
    lm = load("tiny-llama")
    return Workbench(lm, cfg, ActivationCache(cache_dir / "acts"), Progress(lambda _m: None))


def test_workbench_refuses_overlapping_packaged_classes(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    adv = bench.advbench
    bench.__dict__["harmless_all"] = PromptSet(
        "harmless", (adv.texts[3].upper(), "Bake bread"), {"language": ("en", "en"),
                                                           "topic": ("x", "y")})
    with pytest.raises(PromptSetError, match="also appear in 'harmless'"):
        bench.harmful_split  # noqa: B018
    with pytest.raises(PromptSetError, match="also appear in 'harmless'"):
        bench.harmless_split  # noqa: B018


def test_prompt_longer_than_the_context_is_refused_before_any_forward_pass(
    tmp_path: Path,
) -> None:
    bench = _bench(tmp_path)
    limit = bench.context_length
    assert limit == 256  # the tiny model's max_position_embeddings
    long = "word " * (limit + 10)
    ps = PromptSet("long", ("Say hi.", long.strip()))
    calls: list[int] = []
    handle = bench.lm.layout.decoder.register_forward_pre_hook(lambda *_a: calls.append(1))
    try:
        with pytest.raises(PromptSetError, match=r"prompt 1 of 'long' is \d+ tokens after chat "
                                                 r"formatting, more than the 256"):
            bench.acts(ps)
        with pytest.raises(PromptSetError, match="prompt 1 of 'long'"):
            bench.generate(ps)
        # Fits alone, not with the reply: the generation names the tokens to generate.
        text = "word " * 50
        n = len(bench.lm.tokenizer(bench.lm.format([text])[0],
                                   add_special_tokens=False)["input_ids"])
        assert n < limit
        edge = PromptSet("edge", (text,))
        bench.check_fits(edge, limit - n)
        with pytest.raises(PromptSetError, match=rf"is {n} tokens .* plus {limit - n + 1} to "
                                                 "generate"):
            bench.generate(edge, max_new_tokens=limit - n + 1)
    finally:
        handle.remove()
    assert calls == [], "refused before any forward pass"
    assert bench.generate(PromptSet("ok", ("Say hi.",))).texts  # a short set still runs


def test_report_entry_records_dropped_duplicates(tmp_path: Path) -> None:
    from reports.measure import Measure

    bench = _bench(tmp_path)
    path = tmp_path / "d.txt"
    path.write_text("Say hi\nsay hi.\nCount\n")
    ps = prompts.from_file(path)
    m = Measure(None, "t::x", ())  # type: ignore[arg-type]  # provenance needs no registry
    bench.record_model(m, ps)
    assert m.data.prompts == [{"name": "d", "sha256": ps.sha256, "n": 2,
                               "dropped_duplicates": 1, "source": str(path)}]


# --------------------------------------------------------------------------- bf16 export


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_export_reloads_with_equal_logits(tmp_path: Path, arch: str) -> None:
    """The in-memory bfloat16 model keeps float32 rotary frequencies, as a reload has them,
    so the exported edit computes bit-identical logits."""
    from probes import abliteration as A
    from probes.capture import left_pad_batch

    lm = load(f"tiny-{arch}", dtype=torch.bfloat16)
    assert {b.dtype for n, b in lm.model.named_buffers() if "inv_freq" in n} == {torch.float32}
    texts = lm.format(["Write a poem about the sea.", "hi"])
    r = torch.randn(lm.layout.d_model, generator=torch.Generator().manual_seed(9))
    with A.orthogonalised(lm.layout, r, model=lm.model, source_layer=1):
        with torch.no_grad():
            edited = lm.model(**left_pad_batch(lm.tokenizer, texts, "cpu")).logits
        out = A.export(lm.model, lm.tokenizer, tmp_path / "abl")
    back = load(str(out), dtype=torch.bfloat16, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        again = back.model(**left_pad_batch(back.tokenizer, texts, "cpu")).logits
    assert again.dtype == torch.bfloat16
    torch.testing.assert_close(again, edited, rtol=0, atol=0)
