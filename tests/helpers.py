"""Builders shared by the project's tests: a tiny-model run configuration and synthetic
JSON reports.

Import as ``from tests.helpers import ...`` (the repository root is on pytest's path).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fixtures.options import PROFILES, parse_alphas, parse_layers
from fixtures.workbench import BenchConfig


def tiny_config(profile: str = "quick", cache_dir: Path | str | None = None,
                **fields: Any) -> BenchConfig:
    """A run configuration for tests on tiny random models: every layer, no steering grid
    (alpha 0), 8 prompts to fit and judge, 4 generations of 4 tokens, 10 bootstrap
    resamples, float32 on the CPU. The cache is on exactly when ``cache_dir`` is given;
    ``fields`` override any other field of :class:`BenchConfig`."""
    base: dict[str, Any] = {
        "models": ("tiny-llama",), "layers": parse_layers("all"), "alphas": parse_alphas("0"),
        "ratio_alphas": parse_alphas("0"), "n_train": 8, "n_eval": 8, "n_gen": 4,
        "max_new_tokens": 4, "n_boot": 10, "seed": 0, "device": "cpu", "dtype": "float32",
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "use_cache": cache_dir is not None, "profile": profile, "chat_template": "auto",
        "batch_size": 4, "defaults": PROFILES[profile],
    }
    return BenchConfig(**{**base, **fields})


# ------------------------------------------------------------------ synthetic JSON reports


def report_check(hypothesis: str = "GT-HALF", verdict: str = "pass", value: float | None = 0.8,
                 ci: Sequence[float | None] | None = (0.6, 1.0),
                 threshold: float | list[float] = 0.5, version: int = 1, model: str | None = "m",
                 label: str = "", comparison: str = ">", bound: str = "lower"
                 ) -> dict[str, Any]:
    """One check of a report, as the plugin writes it (schema-valid)."""
    return {
        "hypothesis": hypothesis, "hypothesis_version": version, "label": label,
        "model": model, "statement": f"{hypothesis} holds.", "source": "test",
        "metric": "effect", "comparison": comparison, "threshold": threshold, "bound": bound,
        "tolerance": None, "value": value, "value_flag": None,
        "ci": None if ci is None else list(ci), "n": 32, "detail": "", "hard": True,
        "verdict": verdict, "bound_value": value, "reason": "", "message": "",
    }


def synthetic_report(checks: Sequence[dict[str, Any]],
                     models: Sequence[tuple[str, str]] = (("m", "fp-m"),),
                     registry_version: int = 1, complete: bool = True) -> dict[str, Any]:
    """A schema-valid report holding ``checks``, one test per check (``t::HYPOTHESIS``,
    plus ``[label]`` when the check has one), run on ``models`` (name, fingerprint)."""
    tests = [_test(check) for check in checks]
    hypotheses = {c["hypothesis"]: _hypothesis(c) for c in checks}
    return {
        "schema_version": 1, "tool": "refusalbench", "complete": complete,
        "interrupted": False, "exit_status": 0 if complete else None,
        "registry": {"path": "hyp.toml", "registry_version": registry_version, "sha256": None,
                     "hypotheses": hypotheses},
        "provenance": {
            "started_at": "2026-01-01T00:00:00Z", "finished_at": None, "duration_s": 1.0,
            "invocation": {"args": [], "dir": "."}, "options": {"profile": "full"}, "seed": 0,
            "packages": {}, "git": {"commit": None, "dirty": None}, "machine": {},
            "python": {"version": "3"}, "prompt_sets": [], "workers": None,
            "models": [{"name": n, "fingerprint": fp, "info": {}} for n, fp in models],
        },
        "summary": {"tests": len(tests), "outcomes": {}, "verdicts": {}},
        "tests": tests, "collection_errors": [], "baseline": None,
    }


def _test(check: dict[str, Any]) -> dict[str, Any]:
    label = f"[{check['label']}]" if check["label"] else ""
    return {
        "nodeid": f"t::{check['hypothesis']}{label}", "module": "t", "name": check["hypothesis"],
        "outcome": "passed" if check["verdict"] == "pass" else "failed", "duration_s": 0.1,
        "worker": None, "longrepr": None, "skip_reason": None, "claims": [check["hypothesis"]],
        "model": check["model"], "models": [], "prompts": [], "metrics": [], "tables": [],
        "plots": [], "texts": [], "checks": [check],
    }


def _hypothesis(check: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": check["hypothesis"], "version": check["hypothesis_version"],
        "statement": check["statement"], "source": {"document": "test", "figure": "-"},
        "metric": check["metric"], "comparison": check["comparison"],
        "threshold": check["threshold"], "bound": check["bound"], "tolerance": None,
    }
