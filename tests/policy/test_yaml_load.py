"""policy/yaml_load.py: safe YAML that refuses a key given twice."""

from __future__ import annotations

import pytest
import yaml

from policy.yaml_load import DuplicateKey, load_yaml


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
