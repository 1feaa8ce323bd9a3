"""Run provenance that does not come from the tests: packages, git, machine, Python."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "transformers",
    "numpy",
    "scipy",
    "statsmodels",
    "pytest",
    "pytest-xdist",
    "jinja2",
    "matplotlib",
    "refusalbench",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: Path) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding ``directory``; nulls without git."""
    state: dict[str, Any] = {"commit": None, "dirty": None, "error": None}
    try:
        top = _git(directory, "rev-parse", "--show-toplevel")
        state["commit"] = _git(directory, "rev-parse", "HEAD")
        state["dirty"] = bool(_git(Path(top), "status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        state["error"] = "git not installed"
    except subprocess.TimeoutExpired:
        state["error"] = "git timed out"
    except subprocess.CalledProcessError as exc:
        message = (exc.stderr or "").strip().splitlines()
        state["error"] = message[-1] if message else f"git exited with {exc.returncode}"
    return state


def _git(directory: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    memory: int | None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "node": platform.node(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        **_cpu_math(),
    }


def _cpu_math() -> dict[str, Any]:
    """The CPU's vector level and whether it computes bfloat16 natively: the same model runs
    several times slower (and, under ``--dtype auto``, in another dtype) without it."""
    try:
        import torch

        from probes.models import native_bf16  # the probe --dtype auto uses
    except ImportError:
        return {"cpu_capability": None, "native_bf16": None}
    return {"cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "native_bf16": native_bf16()}


def python_info() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }
