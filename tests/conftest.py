"""Shared fixtures for the project's own tests (not the benchmark suite)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
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


@contextmanager
def _extra_stop(lm: LoadedModel, token: int) -> Iterator[None]:
    """Temporarily add ``token`` to the generation config's end-of-turn ids."""
    cfg = lm.model.generation_config
    old = cfg.eos_token_id
    base = [] if old is None else ([old] if isinstance(old, int) else list(old))
    cfg.eos_token_id = [*base, token]
    try:
        yield
    finally:
        cfg.eos_token_id = old


def _ragged_stop(lm: LoadedModel, prompts: list[str], max_new: int) -> int:
    """A token that, added as a stop token, ends some rows of a greedy generation of the
    formatted ``prompts`` early and lets others run to ``max_new`` (skips the test if this
    random model has none)."""
    from probes.generation import generate

    plain = generate(lm.model, lm.tokenizer, prompts, max_new, batch_size=len(prompts))
    candidates = [t for ids in plain.token_ids for t in ids[1:4]]
    for token in dict.fromkeys(candidates):
        counts = [next((k + 1 for k, t in enumerate(ids) if t == token), max_new)
                  for ids in plain.token_ids]
        if len(set(counts)) > 1 and max(counts) == max_new and min(counts) < max_new:
            return token
    pytest.skip("no token of this random model gives ragged stopping")


@pytest.fixture
def extra_stop() -> Callable[[LoadedModel, int], AbstractContextManager[None]]:
    """``with extra_stop(lm, token):`` generation also stops at ``token``."""
    return _extra_stop


@pytest.fixture
def ragged_stop() -> Callable[[LoadedModel, list[str], int], int]:
    """``ragged_stop(lm, prompts, max_new)``: a stop token that makes rows end unevenly."""
    return _ragged_stop
