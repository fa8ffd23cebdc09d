"""Names people read and type (org names, model aliases): one rule for what reads as
another name, so that two names that print alike are never two things."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

# Characters a name may not hold: controls, format characters (zero-width space and
# joiners, BOM, bidi overrides), line and paragraph separators, surrogates, private-use
# and unassigned code points: each prints as nothing or as another name, so "acme\u200b"
# and "acme" would be two names that read the same.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
# Characters of other categories that print as nothing as well (admin tester: orgs
# "acme\u3164", "ac\u034fme" and "acme\ufe0f" each read as "acme", with budgets of
# their own): Hangul fillers, the combining grapheme joiner, variation selectors,
# Mongolian free variation selectors, Khmer's inherent vowels, the braille blank.
_BLANK = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x034F, 0x17B4, 0x17B5, 0x2800,
                    *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), 0x1D159,
                    *range(0x180B, 0x1810)})
# Scripts whose spelling never takes a zero-width (non-)joiner: between their letters
# it only hides a second name ("a\u200dcme" read as "acme").
_NO_JOINERS = ("LATIN ", "GREEK ", "CYRILLIC ", "ARMENIAN ", "GEORGIAN ")
# Scripts with letters that print alike (Latin a, Cyrillic U+0430, Greek U+03B1): one word may not
# mix them, as browsers refuse such domain names.
_LOOKALIKE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK"})


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
    bad = next((c for i, c in enumerate(name)
                if (unicodedata.category(c) in _INVISIBLE or ord(c) in _BLANK)
                and not _joiner_in_word(name, i)), None)
    if bad is not None:
        return (f"expected printable characters: U+{ord(bad):04X} "
                f"({unicodedata.name(bad, 'unnamed')}) reads as nothing")
    # In NFKC: the Roman numeral U+217E and the mathematical letters read as their letters.
    for word in _words(unicodedata.normalize("NFKC", name)):
        scripts = sorted({script for c in word if c.isalpha()
                          and (script := unicodedata.name(c, "").split(" ")[0])
                          in _LOOKALIKE_SCRIPTS})
        if len(scripts) > 1:
            # "d\u0435mo-org", a Cyrillic U+0435, prints as "demo-org" (admin review).
            return (f"expected each word's letters in one script: {word!a} mixes "
                    f"{' and '.join(s.title() for s in scripts)} letters, and prints as a "
                    "word of one")
    return None


def _words(name: str) -> list[str]:
    """Runs of letters, marks and digits (a combining mark joins its word: "acm" with a
    macron below and a Cyrillic U+0435 is one word, and mixes scripts: retest)."""
    words, word = [], []
    for c in name:
        if unicodedata.category(c)[0] in "LMN":
            word.append(c)
        elif word:
            words.append("".join(word))
            word = []
    if word:
        words.append("".join(word))
    return words


def twin_problem(name: str, names: Iterable[str], what: str) -> str | None:
    """Why a new `name` reads as one of `names` (the same letters in another Unicode
    form: full-width letters beside the plain ones, a ligature; NFKC), or None. Only a name not
    in that form is looked at: the plain one came first."""
    plain = unicodedata.normalize("NFKC", name)
    if plain == name:
        return None
    twin = next((n for n in names
                 if n != name and unicodedata.normalize("NFKC", n) == plain), None)
    return None if twin is None else (
        f"it reads as the {what} {twin!a} (the same letters in another Unicode form)")


def _joiner_in_word(text: str, i: int) -> bool:
    """A zero-width (non-)joiner between two letters of a script that spells with it
    (Persian, Indic): it cannot start or end a name, nor sit in a Latin one, where it
    would read as another."""
    if text[i] not in "\u200c\u200d" or not 0 < i < len(text) - 1:
        return False
    before = i - 1  # the letter a virama or vowel sign before the joiner sits on
    while before > 0 and unicodedata.category(text[before]) in ("Mn", "Mc"):
        before -= 1
    return _joined_letter(text[before]) and _joined_letter(text[i + 1])


def _joined_letter(c: str) -> bool:
    return c.isalpha() and not unicodedata.name(c, "").startswith(_NO_JOINERS)
