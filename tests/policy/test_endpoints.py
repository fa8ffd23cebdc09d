"""policy/endpoints.py: the endpoint table and its lookups."""

from __future__ import annotations

import pytest

from policy.endpoints import (
    ENDPOINTS,
    ROWS,
    Endpoint,
    Kind,
    allowed_methods,
    compressed,
    lookup,
    path_argument,
    path_known,
    strip_query,
)

R, W = "inference:read", "inference:write"


def test_the_table() -> None:
    assert [(e.method, e.path, e.kind, e.scope, e.name, e.prefix) for e in ROWS] == [
        ("POST", "/v1/chat/completions", Kind.CHAT, W, "chat", False),
        ("POST", "/v1/completions", Kind.COMPLETION, W, "completions", False),
        ("GET", "/v1/models", Kind.MODELS, R, "models", False),
        ("GET", "/v1/models/", Kind.MODEL, R, "model", True),
        ("POST", "/v1/embeddings", Kind.EMBEDDINGS, W, "embeddings", False),
        ("POST", "/v1/responses", Kind.RESPONSES, W, "responses", False),
        ("POST", "/v1/rerank", Kind.RERANK, W, "rerank", False),
        ("POST", "/rerank", Kind.RERANK, W, "rerank", False),
        ("POST", "/v2/rerank", Kind.RERANK, W, "rerank", False),
        ("POST", "/v1/score", Kind.SCORE, W, "score", False),
        ("POST", "/score", Kind.SCORE, W, "score", False),
        ("POST", "/tokenize", Kind.TOKENIZE, W, "tokenize", False),
        ("POST", "/detokenize", Kind.TOKENIZE, W, "detokenize", False),
        ("POST", "/v1/audio/transcriptions", Kind.MULTIPART, W, "transcriptions", False),
        ("POST", "/v1/audio/translations", Kind.MULTIPART, W, "translations", False),
    ]
    assert all(key == (e.method, e.path) for key, e in ENDPOINTS.items())
    assert len(ENDPOINTS) == len(ROWS) - 1  # the prefix row is looked up on its own


def test_kinds() -> None:
    assert {k for k in Kind if k.answered_here} == {Kind.MODELS, Kind.MODEL}
    assert {k for k in Kind if not k.metered} == {Kind.TOKENIZE}


@pytest.mark.parametrize(("method", "path", "name"), [
    ("POST", "/v1/chat/completions", "chat"),
    ("POST", "/v1/completions?x=1", "completions"),  # the query string is ignored
    ("GET", "/v1/models?", "models"),
    ("GET", "/v1/models/demo", "model"),
    ("GET", "/v1/models/org/name?x", "model"),  # an id may hold a slash
    ("POST", "/v1/embeddings", "embeddings"),
    ("POST", "/v2/rerank", "rerank"),
    ("POST", "/detokenize", "detokenize"),
    ("HEAD", "/v1/models", "models"),  # HEAD is the GET without its body
    ("HEAD", "/v1/models/demo", "model"),
])
def test_lookup_finds_the_row(method: str, path: str, name: str) -> None:
    e = lookup(method, path)
    assert e is not None and e.name == name


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/chat/completions"),  # a known path, the wrong method
    ("POST", "/v1/models"),
    ("POST", "/v1/models/demo"),
    ("GET", "/v1/models/"),  # no id
    ("GET", "/v1/modelsx"),
    ("POST", "/v1/chat/completions/"),  # other paths match exactly
    ("POST", "/v1/embeddings/x"),
    ("GET", "/"),
    ("HEAD", "/v1/chat/completions"),  # no GET there
    ("post", "/v1/chat/completions"),  # methods are case-sensitive (RFC 9110): a 405
    ("Post", "/v1/completions"),
    ("get", "/v1/models"),
    ("head", "/v1/models"),
])
def test_lookup_misses(method: str, path: str) -> None:
    assert lookup(method, path) is None


def test_path_known_tells_a_wrong_method_from_an_unknown_path() -> None:
    assert path_known("/v1/chat/completions")
    assert path_known("/v1/models?limit=3")
    assert path_known("/v1/models/demo")
    assert path_known("/tokenize")
    assert not path_known("/v1/embedding")
    assert not path_known("/v1/models/")


def test_allowed_methods_for_a_405() -> None:
    assert allowed_methods("/v1/chat/completions?x=1") == ("POST",)
    assert allowed_methods("/v1/models") == ("GET", "HEAD")
    assert allowed_methods("/v1/models/a/b") == ("GET", "HEAD")
    assert allowed_methods("/v1/nope") == ()


def test_path_argument_is_the_decoded_rest() -> None:
    e = ENDPOINTS.get(("GET", "/v1/models"))
    assert e is not None
    model = lookup("GET", "/v1/models/x")
    assert isinstance(model, Endpoint)
    assert path_argument(model, "/v1/models/meta-llama%2FLlama%203?q=1") == "meta-llama/Llama 3"
    assert path_argument(model, "/v1/models/a/b") == "a/b"


def test_strip_query() -> None:
    assert strip_query("/a?b=1?c") == "/a"
    assert strip_query("/a") == "/a"
    assert strip_query("?x") == ""


def test_compressed_reads_a_list_of_codings() -> None:
    for plain in ("", "identity", "Identity", "identity, identity", " identity ,identity "):
        assert not compressed(plain), plain
    for packed in ("gzip", "br", "identity, gzip", "gzip, identity", "x-gzip", "identity,,br"):
        assert compressed(packed), packed
