"""Errors the suite raises for bad input: each says what was wrong and what to do."""

from __future__ import annotations


class BenchError(Exception):
    """A problem with the user's input or environment, not a bug in the suite.

    ``hint`` tells the user how to fix it; ``str(err)`` includes it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\n  -> {hint}" if hint else message)


class ModelNotFound(BenchError):
    """A model spec that resolves to nothing."""


class ModelFileError(BenchError):
    """A weight file that is missing, corrupt, or does not match its expected checksum."""


class UnsupportedArchitecture(BenchError):
    """A model whose residual-stream writers the layout cannot find."""


class LayerOutOfRange(BenchError):
    """A layer index outside the model's depth."""


class SiteUnavailable(BenchError):
    """A capture site that a layer of the model does not have (``attn_v`` in a
    linear-attention layer)."""


class PromptSetError(BenchError):
    """An empty, unreadable or malformed prompt set."""


class CacheCorrupted(BenchError):
    """A cache entry that failed its integrity check (it is discarded and recomputed)."""


class ChatTemplateMissing(BenchError):
    """A tokenizer with no chat template while the suite needs one."""


class ExportError(BenchError):
    """A model export that could not be written (nothing partial is left behind)."""
