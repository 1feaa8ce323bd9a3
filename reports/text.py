"""Make untrusted text (prompts, model outputs) safe to show without changing what it says."""

from __future__ import annotations

import unicodedata

# Characters that reorder or hide text when displayed (Trojan-Source style) are shown as
# escapes; so are C0/C1 controls (except newline and tab), lone surrogates and the
# Unicode line/paragraph separators.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SEPARATORS = frozenset("\u2028\u2029")
_KEEP = frozenset("\n\t")


def visible(text: str) -> str:
    """Replace invisible or display-altering characters with ``\\xNN``/``\\uNNNN`` escapes.

    The result is plain text (HTML escaping happens afterwards, in the template engine).
    """
    if text.isprintable() and not (_BIDI.intersection(text) or _SEPARATORS.intersection(text)):
        return text
    return "".join(_show(ch) for ch in text)


def _show(ch: str) -> str:
    if ch in _KEEP:
        return ch
    if ch in _BIDI or ch in _SEPARATORS or unicodedata.category(ch) in ("Cc", "Cs"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch
