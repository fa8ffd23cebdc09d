"""Names people read and type (org names, model aliases): one rule for what reads as
another name, so that two names that print alike are never two things."""

from __future__ import annotations

import unicodedata

# Characters a name may not hold: controls, format characters (zero-width space and
# joiners, BOM, bidi overrides), line and paragraph separators, surrogates, private-use
# and unassigned code points: each prints as nothing or as another name, so "acme\u200b"
# and "acme" would be two names that read the same.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def lookalike_problem(name: str) -> str | None:
    """Why `name` would read as another name (or as none), or None: empty or only
    whitespace, whitespace around it, not in its composed (NFC) form, or holding a
    character that prints as nothing (a zero-width joiner between two letters excepted)."""
    if name.strip() != name or not name:
        return ("expected no whitespace at its start or end" if name.strip()
                else "expected a name, not only whitespace" if name else "expected a name")
    if unicodedata.normalize("NFC", name) != name:
        # "Ü" as U followed by a combining diaeresis prints as the precomposed "Ü": two
        # names, one on every screen.
        return ("expected its composed (NFC) form, as keyboards type it: it prints as "
                f"{unicodedata.normalize('NFC', name)!r}")
    bad = next((c for i, c in enumerate(name) if unicodedata.category(c) in _INVISIBLE
                and not _joiner_in_word(name, i)), None)
    if bad is not None:
        return (f"expected printable characters, got U+{ord(bad):04X} "
                f"({unicodedata.name(bad, 'unnamed')}), which reads as nothing")
    return None


def _joiner_in_word(text: str, i: int) -> bool:
    """A zero-width (non-)joiner between two letters: Persian, Indic and emoji spelling
    needs it, and it cannot start or end a name that reads as another."""
    return (text[i] in "\u200c\u200d" and 0 < i < len(text) - 1
            and text[i - 1].isalpha() and text[i + 1].isalpha())
