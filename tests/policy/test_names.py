"""policy/names.py: a name that reads as another (or as none) is refused, one rule for
org names (tests/policy/test_keyrecord.py) and model aliases (tests/policy/test_config.py)."""

from __future__ import annotations

import pytest

from policy.names import lookalike_problem


@pytest.mark.parametrize(("name", "why"), [
    ("", "expected a name"),
    ("  ", "not only whitespace"),
    ("llama ", "no whitespace at its start or end"),
    ("\u3000llama", "no whitespace at its start or end"),
    ("cafe\u0301", "composed (NFC) form, as keyboards type it: it prints as 'caf\u00e9'"),
    ("lla\u200bma", "printable characters: U+200B (ZERO WIDTH SPACE) reads as nothing"),
    ("\u202ellama", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("\u200dllama", "U+200D"),  # a joiner, but not between two letters
    ("llama\ufeff", "U+FEFF"),
    ("a\x85b", "U+0085"),
    ("a\ue000b", "U+E000"),  # private use
    # letters and marks that print as nothing (admin tester: each read as "acme")
    ("acme\u3164", "U+3164 (HANGUL FILLER)"),
    ("acme\u115f", "U+115F"),
    ("ac\u034fme", "U+034F (COMBINING GRAPHEME JOINER)"),
    ("acme\ufe0f", "U+FE0F"),
    ("acme\U000e0100", "U+E0100"),
    ("ac\u2800me", "U+2800"),
    ("a\u200dcme", "U+200D"),  # between Latin letters a joiner only hides a name
    ("a\u0332\u200dcme", "U+200D"),  # after a mark on a Latin letter too
    # a word mixing scripts whose letters print alike (admin review: Cyrillic U+0435)
    ("d\u0435mo-org", "'d\\u0435mo' mixes Cyrillic and Latin letters"),
    ("team_\u03b1lpha", "mixes Greek and Latin"),
    ("acm\u0331\u0435", "mixes Cyrillic and Latin"),  # a mark does not split a word
    ("\u217e\u0435\u217f\u043e-org", "mixes Cyrillic and Latin"),  # Roman numerals
    ("\U0001d5bd\u0435\U0001d5c6\u043e-org", "mixes Cyrillic and Latin"),  # math letters
    ("demo-org\U0001d159", "U+1D159"),  # a notehead that draws nothing
])
def test_a_name_that_reads_as_another_is_refused(name: str, why: str) -> None:
    problem = lookalike_problem(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize("name", [
    "llama", "meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b", "caf\u00e9", "研究部", "a b",
    "\u0645\u06cc\u200c\u0634\u0648\u062f",  # Persian, a ZWNJ between two letters
    "\u0915\u094d\u200d\u0937",  # Devanagari: a ZWJ after a virama (a half form)
    "\ud55c\uad6d\uc5b4",  # Hangul syllables (not fillers)
    "acme-\u0420\u043e\u0441\u0441\u0438\u044f", "team \u03b1",  # scripts word by word
    "llama-\u7814\u7a76",  # other scripts beside Latin
])
def test_names_people_write_pass(name: str) -> None:
    assert lookalike_problem(name) is None


def test_a_name_in_another_unicode_form_of_a_known_one_is_its_twin() -> None:
    from policy.names import twin_problem

    full_width = "\uff41\uff43\uff4d\uff45"  # "acme" in full-width letters
    assert twin_problem(full_width, ["beta", "acme"], "org") == (
        "it reads as the org 'acme' (the same letters in another Unicode form)")
    assert twin_problem(full_width, ["beta"], "org") is None  # no twin known
    assert twin_problem("acme", [full_width], "org") is None  # the plain one: first
    assert twin_problem("\ufb01ne", ["fine"], "org") is not None  # a ligature
