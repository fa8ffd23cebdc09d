"""policy/yaml_load.py: safe YAML that refuses a key given twice."""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path

import pytest
import yaml

from policy import config, yaml_load
from policy.config import ConfigError, load_config
from policy.yaml_load import DuplicateKey, key_texts, load_yaml
from tests.helpers import policy_dict


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    with pytest.raises(DuplicateKey) as e:
        load_yaml("models:\n  demo: {upstream_model: a}\n  demo: {upstream_model: b}\n")
    assert (e.value.key, e.value.line) == ("demo", 3)
    with pytest.raises(DuplicateKey):
        load_yaml("a: 1\nb: {x: 1, x: 2}\n")


def test_otherwise_as_safe_load() -> None:
    assert load_yaml("a: [1, {b: 2}]\nc: null\n") == {"a": [1, {"b": 2}], "c": None}
    assert load_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n") == {
        "base": {"x": 1}, "other": {"x": 1, "y": 2}}
    # A key a merge brings may be given again, on purpose.
    assert load_yaml("base: &b {x: 1}\nother:\n  <<: *b\n  x: 2\n")["other"] == {"x": 2}
    with pytest.raises(yaml.constructor.ConstructorError):  # not safe
        load_yaml("!!python/object/apply:os.system ['true']")


@pytest.mark.parametrize(("text", "where"), [
    ("models:\n  demo:\n\tupstream_model: x\n", "line 3, column 1"),
    ("models:\n  demo:\n    upstream_model: x\n    backends: []\n  \tmax_tokens: 4\n",
     "line 5, column 3"),
    ("a:\n  b: 1\n\tc: 2\n", "line 3, column 1"),  # libyaml's "violates indentation"
])
@pytest.mark.parametrize("loader", ["CLoader", "PureLoader"])
def test_a_tab_in_the_indentation_is_said_with_its_line_and_column(
        text: str, where: str, loader: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tester: a tab that indents gave only `line 6: not valid YAML`."""
    monkeypatch.setattr(config, "load_yaml", functools.partial(
        load_yaml, loader=getattr(yaml_load, loader)))
    path = tmp_path / "tokenbooth.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {where}: a tab cannot indent YAML: indent with spaces"


@pytest.mark.parametrize(("text", "said"), [
    # Operators tester: a quote left open said only the file's last line.
    ("listen: 'x\n", "line 2: not valid YAML (a quote opened on line 1 is not closed)"),
    ("a:\n  b: x: y\n", "line 2: not valid YAML: ': ' inside a plain value (quote the "
                       "value, or check the indentation of the line it continues)"),
    # Retest: a quote left open runs on to the next one, lines later.
    ('state: "redis://h:1/0\nmodels:\n  demo:\n    upstream_model: "tiny"\n',
     "line 4: not valid YAML (a quote opened on line 1 is not closed)"),
    ("a:\n  b: 'it''s\n  c: 1\nd: 'x'\n",
     "line 4: not valid YAML (a quote opened on line 2 is not closed)"),
    # Retest: a quoted value that goes on over lines, and a block scalar's text, close
    # where they should: the error is elsewhere, and the one left open is named.
    ('m:\n  d:\n    u: "tiny\n      llama"\n    b: [{url: "h"}\n    t: 10\n',
     "line 6: not valid YAML (in the flow sequence that began on line 5)"),
    ('m:\n  d:\n    u: "tiny\n      llama"\n    b: []\n  o:\n    u: "oops\n    b: []\n'
     '    t: "5"\n', "line 9: not valid YAML (a quote opened on line 7 is not closed)"),
    ('tpl: |\n  say: "hi\nb: [1\nc: 2\n',
     "line 4: not valid YAML (in the flow sequence that began on line 3)"),
    # Review: a quoted value going on over a line that looks like a key; a block scalar
    # under a list item, or with an anchor: none of them is the error.
    ('a:\n  key: "abc\n  def: ghi"\n  x: 1\nb: [\n', "line 6: not valid YAML"),
    ('a:\n  - |\n    note: "unclosed\n  - b\nc: [\n', "line 6: not valid YAML"),
    ('a: &x |\n  note: "unclosed\nb: 1\nc: [\n', "line 5: not valid YAML"),
    ("a: *foo\n", "line 1: not valid YAML: a value that begins with '*' reads as an alias "
                  "(quote it)"),
    ("a:\n  b: 1\n  - c\n", "line 3: not valid YAML (in the block mapping that began on "
                           "line 2)"),
])
@pytest.mark.parametrize("loader", ["CLoader", "PureLoader"])
def test_other_yaml_errors_say_their_line_and_the_parsers_words(
        text: str, said: str, loader: str) -> None:
    with pytest.raises(yaml.YAMLError) as e:
        load_yaml(text, loader=getattr(yaml_load, loader))
    assert config._yaml_error(e.value, text) == said
    assert config._yaml_error(yaml.YAMLError("x"), "") == "not valid YAML"


def test_the_text_of_keys_read_as_no_string() -> None:
    text = "models:\n  yes: 1\n  ok: 2\n  null: 3\n  2024-01-01: 4\n  '5': 5\norgs: {no: 1}\n"
    assert key_texts(text, "models") == {True: ("yes", 2), None: ("null", 4),
                                         date(2024, 1, 1): ("2024-01-01", 5)}
    assert key_texts(text, "orgs") == {False: ("no", 7)}
    assert key_texts("- a\n", "models") == {}
    assert key_texts("models: [a]\n", "models") == {}


# -- libyaml and the pure loader read every file alike -------------------------------------

GOOD = yaml.safe_dump(policy_dict("http://127.0.0.1:8000"), sort_keys=False)
FILES = {
    "good": GOOD,
    "anchors and merges": GOOD + "x-base: &b {weight: 2}\nx-other:\n  <<: *b\n  weight: 3\n",
    "model given twice": GOOD.replace("models:\n", "models:\n  demo: {upstream_model: a}\n"),
    "key given twice, flow": "a: 1\nb: {x: 1, x: 2}\n",
    "top-level key given twice": GOOD + "listen: 127.0.0.1:9\n",
    "unclosed flow": GOOD[: len(GOOD) // 2] + "\n  : [unclosed\n",
    "bad indentation": "listen: 1\n  models: 2\n",
    "tab": "models:\n\t- a\n",
    "tab after spaces": "models:\n  demo:\n  \tupstream_model: x\n",
    "aliases read as no string": "models:\n  yes: {upstream_model: x, backends: []}\n"
                                 "  2024-01-01: {upstream_model: x, backends: []}\n",
    "control character": "listen: \x07\n",
    "unclosed quote": "listen: 'x\n",
    "a list": "- a\n- b\n",
    "empty": "",
    "a number too long": "listen: " + "9" * 5000 + "\n",
    "nested 300 deep": "x: " + "[" * 300 + "]" * 300 + "\n",
    "nested 250 deep": "x: " + "[" * 250 + "]" * 250 + "\n",
    "nested 999 deep": "x: " + "[" * 999 + "]" * 999 + "\n",
    "nested past libyaml's limit": "x: " + "[" * 1001 + "]" * 1001 + "\n",
    "block nesting": "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 400)),
    "an alias inside its own anchor": "x: &a [1, *a]\n",
    "unsafe tag": "!!python/object/apply:os.system ['true']\n",
    "invalid value": GOOD.replace("max_tokens: 256", "max_tokens: -4"),
    "unhashable key": "? [a]\n: 1\n",
}


def outcome(path: Path) -> object:
    try:
        return load_config(path).model_dump()
    except ConfigError as e:
        return f"ConfigError: {e}"


@pytest.mark.parametrize("name", FILES)
def test_libyaml_reads_every_file_as_the_pure_loader_does(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config is parsed by libyaml; the pure loader (where PyYAML lacks it) must say
    the same: the same config, or the same error, line numbers included."""
    path = tmp_path / "tokenbooth.yaml"
    path.write_text(FILES[name])
    assert yaml_load.LOADER is yaml_load.CLoader  # libyaml is here: it is what runs
    fast = outcome(path)
    monkeypatch.setattr(config, "load_yaml", functools.partial(load_yaml,
                                                               loader=yaml_load.PureLoader))
    assert outcome(path) == fast


def test_a_key_given_twice_is_refused_by_both_loaders() -> None:
    for loader in (yaml_load.PureLoader, yaml_load.CLoader):
        with pytest.raises(DuplicateKey) as e:
            load_yaml("models:\n  demo: {a: 1}\n  demo: {a: 2}\n", loader=loader)
        assert (e.value.key, e.value.line) == ("demo", 3)


@pytest.mark.parametrize("loader", ["CLoader", "PureLoader"])
def test_numbers_are_read_as_yaml_1_2_writes_them(loader: str) -> None:
    """YAML 1.1 (PyYAML's) read an unquoted `budget_usd: 1_00`, a typo for 1.00, as 100,
    `0x1A` as 26, `1:30` as 90, `0b11` as 3 and `010` as 8 (retest tester): they stay
    text as written, which the settings refuse by name; plain numbers are numbers."""
    if not hasattr(yaml_load, loader):
        pytest.skip("PyYAML built without libyaml")
    got = yaml.load("a: 1_00\nb: 0x1A\nc: 1:30\nd: 0b11\ne: 10_000.5\nf: 010\n"
                    "g: 100\nh: -5\ni: +3\nj: 1.5\nk: .5\nl: 6.8523015e+5\nm: .inf\n",
                    Loader=getattr(yaml_load, loader))
    assert got == {"a": "1_00", "b": "0x1A", "c": "1:30", "d": "0b11", "e": "10_000.5",
                   "f": 10, "g": 100, "h": -5, "i": 3, "j": 1.5, "k": 0.5,
                   "l": 685230.15, "m": float("inf")}


def test_an_unquoted_amount_yaml_1_1_misreads_is_refused(tmp_path: Path) -> None:
    data = policy_dict("http://127.0.0.1:8000")
    text = yaml.safe_dump(data).replace("max_tokens: 256", "max_tokens: 2_56")
    path = tmp_path / "c.yaml"
    path.write_text(text + "orgs:\n  acme:\n    budget_usd: 1_00\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    problems = "\n".join(e.value.problems)
    assert "got '2_56' (write plain digits)" in problems
    assert "budget_usd: expected an amount in ASCII digits" in problems
