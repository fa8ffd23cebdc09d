"""policy/errors.py: one error type, OpenAI's JSON shape, and each refusal's fields."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from policy.errors import (
    ApiError,
    insufficient_scope,
    invalid_api_key,
    invalid_request,
    model_not_allowed,
    model_not_found,
    not_found,
    request_too_large,
    service_unavailable,
    upstream_error,
)


def test_body_is_openais_error_shape() -> None:
    err = ApiError(400, "invalid_request", "Bad \"thing\".", "messages")
    assert json.loads(err.body()) == {"error": {
        "message": 'Bad "thing".', "type": "invalid_request_error", "param": "messages",
        "code": "invalid_request"}}
    assert err.body() == (b'{"error":{"message":"Bad \\"thing\\".","type":'
                          b'"invalid_request_error","param":"messages","code":"invalid_request"}}')
    assert json.loads(ApiError(503, "x", "m").body())["error"]["param"] is None


@pytest.mark.parametrize(("status", "error_type"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "invalid_request_error"), (405, "invalid_request_error"),
    (413, "invalid_request_error"), (429, "rate_limit_error"),
    (500, "server_error"), (502, "server_error"), (503, "server_error"), (504, "server_error"),
    (418, "server_error"),  # a status without its own type
])
def test_type_follows_the_status(status: int, error_type: str) -> None:
    assert ApiError(status, "c", "m").error_type == error_type


def test_an_explicit_type_wins() -> None:
    err = ApiError(429, "insufficient_quota", "m", type="insufficient_quota")
    assert err.error_type == "insufficient_quota"
    assert json.loads(err.body())["error"]["type"] == "insufficient_quota"


def test_str_and_headers() -> None:
    err = ApiError(429, "rate_limit_exceeded", "Slow down.", headers=(("retry-after", "2"),))
    assert str(err) == "429 rate_limit_exceeded: Slow down."
    assert err.headers == (("retry-after", "2"),)
    assert ApiError(400, "c", "m").headers == ()


@pytest.mark.parametrize(("err", "fields"), [
    (invalid_request("No messages.", "messages"),
     (400, "invalid_request", "No messages.", "messages")),
    (invalid_api_key("Nope."), (401, "invalid_api_key", "Nope.", None)),
    (insufficient_scope("inference:write"),
     (403, "insufficient_scope", "This API key lacks the scope 'inference:write'.", None)),
    (model_not_allowed("demo"),
     (403, "model_not_allowed", "This API key may not use the model 'demo'.", "model")),
    (model_not_found("gpt-9"),
     (404, "model_not_found", "The model 'gpt-9' does not exist.", "model")),
    (not_found("/v2/x"), (404, "not_found", "No endpoint '/v2/x' on this gateway.", None)),
    (request_too_large(1024),
     (413, "request_too_large", "The request body exceeds 1024 bytes.", None)),
    (service_unavailable("Later."), (503, "service_unavailable", "Later.", None)),
])
def test_constructors(err: ApiError, fields: tuple[int, str, str, str | None]) -> None:
    assert (err.status, err.code, err.message, err.param) == fields
    assert err.type is None and err.headers == ()


def test_is_an_exception_and_immutable() -> None:
    err = invalid_api_key("x")
    with pytest.raises(ApiError):
        raise err
    with pytest.raises(AttributeError):
        err.status = 500  # type: ignore[misc]


def test_a_backend_that_does_not_serve_the_upstream_model_is_the_configs_fault() -> None:
    """Real-configs tester: an alias whose `upstream_model` its backend does not serve
    answered 404 `param: model`, "The model `${MODEL_NAME}` does not exist. Valid
    aliases: keyed2.": the client's mistake, by its look, and the operators' names
    shown. The status stays (the contract keeps a backend's 4xx); the message says whose
    it is, and names neither."""
    vllm = (b'{"object":"error","message":"The model `${MODEL_NAME}` does not exist. Valid '
            b'aliases: keyed2.","type":"NotFoundError","param":"model","code":404}')
    err = upstream_error(404, vllm, "chat", "${MODEL_NAME}")
    assert (err.status, err.code, err.param) == (404, "upstream_error", None)
    assert "configuration" in err.message and "'chat'" in err.message
    assert "keyed2" not in err.message and "MODEL_NAME" not in err.message
    # vLLM's other wording (no param), and its 404 for a path it lacks: the latter kept.
    bare = b'{"message":"The model `tiny` does not exist.","type":"NotFoundError"}'
    assert upstream_error(404, bare, "chat", "tiny").code == "upstream_error"
    path = upstream_error(404, b'{"detail":"Not Found"}', "chat", "tiny")
    assert (path.status, path.message) == (404, "Not Found")


def test_a_refusal_passes_through_a_generator_context_manager() -> None:
    """contextlib's `__exit__` sets the exception's `__traceback__`: the frozen dataclass
    refused it, and the refusal became a TypeError (a 500) wherever it crossed one."""
    import contextlib
    import dataclasses

    @contextlib.contextmanager
    def passing() -> Iterator[None]:
        yield

    with pytest.raises(ApiError) as e, passing():
        raise invalid_request("bad", "n")
    assert e.value.__traceback__ is not None and e.value.param == "n"
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.value.status = 500  # type: ignore[misc]
