"""Turn recorded values (numpy scalars and arrays included) into plain JSON values.

Numbers become Python ``int``/``float``; NaN and +-inf become ``null`` and are counted,
so the record that holds them can carry a flag. Strings are kept exactly as given (JSON
escaping preserves control characters). numpy is never imported here: arrays and numpy
scalars are recognised by their ``tolist``/``item`` methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class Converter:
    """Converts values and counts the non-finite numbers it replaced with ``None``."""

    nonfinite: int = 0

    def convert(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            self.nonfinite += 1
            return None
        if isinstance(value, Mapping):
            return {str(key): self.convert(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.convert(item) for item in value]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="backslashreplace")
        tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
        if callable(tolist):
            return self.convert(tolist())
        item = getattr(value, "item", None)
        if callable(item):
            return self.convert(item())
        if isinstance(value, set | frozenset):
            return [self.convert(v) for v in sorted(value, key=repr)]
        try:
            return self.convert(float(value))  # Decimal, Fraction, ...
        except (TypeError, ValueError):
            return str(value)


def number(value: Any) -> tuple[float | None, str | None]:
    """One number as ``(float or None, flag)``; flag is ``nan``/``inf``/``-inf``/``missing``.

    Raises ``TypeError`` for values that are not numbers at all (strings, lists).
    """
    if value is None:
        return None, "missing"
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, int | float):
        value = item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"expected a number, got {type(value).__name__}: {value!r}") from None
    result = float(value)
    if math.isnan(result):
        return None, "nan"
    if math.isinf(result):
        return None, "inf" if result > 0 else "-inf"
    return result, None


def to_jsonable(value: Any) -> tuple[Any, int]:
    """Convert ``value``; return it with the count of non-finite numbers replaced by null."""
    converter = Converter()
    return converter.convert(value), converter.nonfinite
