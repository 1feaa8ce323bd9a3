"""Shared fixtures for the project's own tests (not the benchmark suite)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from probes.models import LoadedModel, load
from probes.tiny import TINY_ARCHS


def pytest_configure(config: pytest.Config) -> None:
    """Pin the cache root for this session and every pytester subprocess it starts.

    pytester points HOME at a temporary folder; without this, a subprocess run would convert
    the embedded model again (about a minute and 2.4 GB) and recapture every activation.
    """
    from probes.paths import CACHE_ENV, cache_root

    os.environ.setdefault(CACHE_ENV, str(cache_root()))


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each supported architecture."""
    return load(f"tiny-{request.param}")


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The embedded default model (converted once into the user cache)."""
    return load("default")


@pytest.fixture(scope="session")
def smol_model() -> LoadedModel:
    return load("smollm2-135m-instruct")


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()) or "smol_model" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.slow)
