"""policy/endpoints.py: the endpoint table and its lookups."""

from __future__ import annotations

import pytest

from policy.endpoints import ENDPOINTS, Endpoint, Kind, lookup, path_known, strip_query


def test_the_table() -> None:
    assert list(ENDPOINTS.values()) == [
        Endpoint("POST", "/v1/chat/completions", Kind.CHAT, "inference:write", "chat"),
        Endpoint("POST", "/v1/completions", Kind.COMPLETION, "inference:write", "completions"),
        Endpoint("GET", "/v1/models", Kind.MODELS, "inference:read", "models"),
    ]
    assert all(key == (e.method, e.path) for key, e in ENDPOINTS.items())


@pytest.mark.parametrize(("method", "path", "name"), [
    ("POST", "/v1/chat/completions", "chat"),
    ("post", "/v1/chat/completions", "chat"),  # the method in any case
    ("POST", "/v1/completions?x=1", "completions"),  # the query string is ignored
    ("GET", "/v1/models?", "models"),
])
def test_lookup_finds_the_row(method: str, path: str, name: str) -> None:
    e = lookup(method, path)
    assert e is not None and e.name == name


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/chat/completions"),  # a known path, the wrong method
    ("POST", "/v1/models"),
    ("POST", "/v1/chat/completions/"),  # paths match exactly
    ("POST", "/v1/embeddings"),
    ("GET", "/"),
])
def test_lookup_misses(method: str, path: str) -> None:
    assert lookup(method, path) is None


def test_path_known_tells_a_wrong_method_from_an_unknown_path() -> None:
    assert path_known("/v1/chat/completions")
    assert path_known("/v1/models?limit=3")
    assert not path_known("/v1/embeddings")
    assert not path_known("/v1/models/")


def test_strip_query() -> None:
    assert strip_query("/a?b=1?c") == "/a"
    assert strip_query("/a") == "/a"
    assert strip_query("?x") == ""
