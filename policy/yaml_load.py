"""YAML for policy files: the safe loader, refusing a key given twice in one mapping
(two `demo:` models, say), which plain YAML resolves by keeping the last without a word.

Parsed by libyaml (`yaml.CSafeLoader`, ~10x faster than PyYAML's pure-Python parser: a
large config is read at every reload) where PyYAML was built with it, else by the pure
loader; both give the same documents and the same errors (tests/policy/test_yaml_load.py
compares them), libyaml's nesting limit included (a RecursionError, as the pure loader's)."""

from __future__ import annotations

import re
from typing import Any

import yaml

# libyaml's scanner refuses flow collections nested past 1000 levels with this problem.
_TOO_DEEP = "exceeded maximum nesting depth"
# Collections nested deeper are refused by both loaders alike: the pure one runs out of
# Python stack near 490 levels (fewer on a deeper stack), libyaml at 1000; no config
# needs a tenth of this.
MAX_DEPTH = 200


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"{key!r} given twice (line {line})")
        self.key, self.line = key, line


class TooDeep(RecursionError):
    """Nested past what the parser reads (the pure loader runs out of Python stack)."""


# Numbers as YAML 1.2 (and JSON) write them: YAML 1.1, PyYAML's, also reads `1_00` as
# 100, `0x1A` as 26, `1:30` as 90 and `0b11` as 3 (retest tester: an unquoted `budget_usd:
# 1_00`, a typo for 1.00, loaded as a budget 100 times larger). Those stay text as
# written, which the settings refuse by name.
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)"
                    r"|\.(nan|NaN|NAN)")


class _UniqueKeys(yaml.constructor.SafeConstructor):
    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = str(self.construct_scalar(node))
        return int(text) if _INT.fullmatch(text) else text  # (`010` is ten, not octal)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        return super().construct_yaml_float(node) if _FLOAT.fullmatch(str(text)) else text

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()  # type: ignore[misc]
        if node is not None:
            _check_depth(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<`: keys it brings may be
                continue  # given again here, on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: YAML's own error follows
                continue
            if duplicate:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_depth(root: yaml.Node) -> None:
    """TooDeep past MAX_DEPTH levels, counted as written: an alias is not entered again
    (its anchor, met first in document order, was counted where it stands)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen or not isinstance(node, yaml.CollectionNode):
            continue
        seen.add(id(node))
        if depth >= MAX_DEPTH:
            raise TooDeep(f"nested over {MAX_DEPTH} levels (line {node.start_mark.line + 1})")
        items = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair]
        stack.extend((child, depth + 1) for child in reversed(items))


_UniqueKeys.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:int", _UniqueKeys.construct_yaml_int)
_UniqueKeys.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:float", _UniqueKeys.construct_yaml_float)


class PureLoader(_UniqueKeys, yaml.SafeLoader):
    """PyYAML's pure-Python SafeLoader, with unique keys."""


# libyaml's parser where PyYAML was built with it (yaml.CSafeLoader exists only then).
LOADER: type[Any] = PureLoader
if yaml.__with_libyaml__:
    class CLoader(_UniqueKeys, yaml.CSafeLoader):
        """libyaml's parser (yaml.CSafeLoader), with unique keys."""

    LOADER = CLoader


def load_yaml(text: str, loader: type[Any] = LOADER) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is a DuplicateKey and
    nesting past the parser's limit a TooDeep (a RecursionError). `loader`: the pure
    one, say (tests); libyaml's by default where PyYAML has it."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        if e.problem is not None and e.problem.startswith(_TOO_DEEP):
            raise TooDeep(e.problem) from None
        raise


def key_texts(text: str, section: str) -> dict[Any, tuple[str, int]]:
    """The keys of the top-level mapping `section` that YAML reads as something other
    than a string (`yes` a boolean, `null` None, `2024-01-01` a date), each with its text
    as written and its line: messages show what the file says, not what YAML made of it.
    Only asked of a file that loaded (it is parsed again)."""
    root = yaml.compose(text, Loader=LOADER)
    if not isinstance(root, yaml.MappingNode):
        return {}
    out: dict[Any, tuple[str, int]] = {}
    constructor = yaml.SafeLoader("")
    for name, value in root.value:
        if name.value != section or not isinstance(value, yaml.MappingNode):
            continue
        for key, _ in value.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:str":
                out[constructor.construct_object(key)] = (key.value, key.start_mark.line + 1)
    return out
