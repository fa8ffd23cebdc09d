"""Client libraries through the real Envoy (issue 14 items 3 and 5): the openai SDK, LiteLLM
(as a client library) and langchain-openai.

Each works for a chat, a stream and embeddings, and raises its own class for every error
status tokenbooth returns (the table below, also in the README). The openai SDK, with
its default retries, makes exactly one attempt where the answer says a retry cannot help
(`x-should-retry: false`) and retries a plain rate limit after its `retry-after`;
attempts are counted by Envoy (`downstream_rq_completed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from policy.config import load_config
from policy.keys import fingerprint
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_backend_credentials import model, sim_process
from tests.e2e.test_gateway import MESSAGES
from tests.helpers import (
    LIMITED_SECRET,
    READ_ONLY_SECRET,
    REVOKED_SECRET,
    SECRET,
    policy_dict,
)

pytestmark = pytest.mark.e2e

RPM_SECRET = "sk-tb-test-rpm-0123456789abcdefghijklmnopqrstu"
TPM_SECRET = "sk-tb-test-tpm-0123456789abcdefghijklmnopqrstu"
BROKE_SECRET = "sk-tb-test-broke-0123456789abcdefghijklmnopqrs"
RPM = 30  # retry-after is 60/RPM = 2 s: room for a slow machine
BODY_LIMIT = 4096
BIG = "x" * (2 * BODY_LIMIT)
SIM_500 = {"x-sim-status": "500"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The test policy's keys and models, plus a model with no backend, a key with a
    small rpm, one whose requests can never fit its tpm, one with an exhausted budget
    that never resets; a small body limit."""
    root = tmp_path_factory.mktemp("gw-clients")
    keys = [*policy_dict("")["keys"],  # type: ignore[misc]
            {"id": "k-rpm", "org": "acme", "sha256": fingerprint(RPM_SECRET), "rpm": RPM},
            {"id": "k-tpm", "org": "acme", "sha256": fingerprint(TPM_SECRET), "tpm": 10},
            {"id": "k-broke", "org": "acme", "sha256": fingerprint(BROKE_SECRET),
             "budget_usd": "0.000001", "budget_period": "total"}]
    with sim_process(root / "sim.log") as url:
        demo = {**model("tiny-llama", [{"url": url}]),
                "price_per_1k_tokens": {"input": "0.50", "output": "1.50"}}
        models = {"demo": demo, "other": model("tiny-llama-2", [{"url": url}]),
                  "unserved": model("tiny-llama", [])}
        gw_root = root / "gw"
        gw_root.mkdir()
        with run_gateway(gw_root, upstream=url, models=models, keys=keys,
                         max_request_body_bytes=BODY_LIMIT) as g:
            yield g


# -- retry hints: what the openai SDK does with them ------------------------------------


def attempts_seen(gw: Gateway) -> int:
    """Requests Envoy has completed (settled for a moment: a response ends first)."""
    admin = load_config(gw.config_path).envoy.admin_listen
    last = -1
    while True:
        url = f"http://{admin}/stats?filter=^http.ingress.downstream_rq_completed$"
        with urllib.request.urlopen(url, timeout=5) as r:
            m = re.search(rb": (\d+)", r.read())
        assert m is not None
        now = int(m.group(1))
        if now == last:
            return now
        last = now
        time.sleep(0.1)


@contextlib.contextmanager
def counted(gw: Gateway) -> Iterator[list[int]]:
    """Yields a list that holds, after the block, how many requests reached Envoy."""
    out: list[int] = []
    before = attempts_seen(gw)
    try:
        yield out
    finally:
        out.append(attempts_seen(gw) - before)


def sdk(gw: Gateway, key: str, retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=retries)


@pytest.mark.parametrize(("key", "alias", "status", "code"), [
    (BROKE_SECRET, "demo", 429, "insufficient_quota"),  # a budget that never resets
    (TPM_SECRET, "demo", 429, "rate_limit_exceeded"),  # larger than the tpm itself
    (SECRET, "unserved", 503, "service_unavailable"),  # no backend configured
])
def test_sdk_makes_one_attempt_when_a_retry_cannot_help(
        gw: Gateway, key: str, alias: str, status: int, code: str) -> None:
    with sdk(gw, key) as client, counted(gw) as n, \
            pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=5)
    assert (e.value.status_code, e.value.code) == (status, code)
    assert e.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in e.value.response.headers
    assert n == [1]


def test_sdk_retries_a_rate_limit_after_retry_after(gw: Gateway) -> None:
    """The key's burst spent (GET /v1/models counts as a request), the SDK's first attempt
    gets a 429 with `retry-after`, waits it, and its retry is admitted."""
    for _ in range(RPM * 3):
        req = urllib.request.Request(f"{gw.base_url}/v1/models",
                                     headers={"authorization": f"Bearer {RPM_SECRET}"})
        try:
            urllib.request.urlopen(req, timeout=5).close()
        except urllib.error.HTTPError as err:
            assert err.code == 429 and int(err.headers["retry-after"]) >= 1
            assert "x-should-retry" not in err.headers
            break
    else:
        raise AssertionError("the rpm limit never refused")
    t0 = time.monotonic()
    with sdk(gw, RPM_SECRET) as client, counted(gw) as n:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    assert n == [2]
    assert time.monotonic() - t0 >= 1.0  # it waited


# -- the libraries: success ---------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> Any:
    """LiteLLM, with its model cost map read from the package (no network fetch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm as lib

        lib.suppress_debug_info = True
        # Its sync calls dispatch service hooks on the thread's event loop and make one
        # (asyncio.get_event_loop) when there is none, never closed: give it one, closed
        # here, or its socket pair is collected, unclosed, in some later test.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            yield lib
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            _close_litellm_clients(lib)


def _close_litellm_clients(lib: Any) -> None:
    """Close the SDK clients LiteLLM cached, and collect the ones it made and dropped
    (on an error answer, say) here, quietly: else their sockets are closed by the
    collector, with a ResourceWarning, in whichever later test runs then."""
    cache = lib.in_memory_llm_clients_cache
    for client in list(cache.cache_dict.values()):
        close = getattr(client, "close", None)
        if callable(close) and not asyncio.iscoroutinefunction(close):
            close()
    cache.flush_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def litellm_kw(gw: Gateway, key: str) -> dict[str, Any]:
    return {"api_base": f"{gw.base_url}/v1", "api_key": key, "max_retries": 0}


def test_litellm_chat_stream_and_embeddings(gw: Gateway, litellm: Any) -> None:
    kw = litellm_kw(gw, SECRET)
    resp = litellm.completion(model="openai/demo", messages=MESSAGES, max_tokens=4, **kw)
    assert resp.choices[0].message.content and resp.usage.completion_tokens == 4
    chunks = list(litellm.completion(model="openai/demo", messages=MESSAGES, max_tokens=4,
                                     stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    emb = litellm.embedding(model="openai/demo", input=["hello", "gateway"], **kw)
    assert len(emb.data) == 2 and emb.data[0]["embedding"]


@contextlib.contextmanager
def langchain_chat(gw: Gateway, key: str, **kw: Any) -> Iterator[Any]:
    """LangChain's chat model, its OpenAI client closed after: else its sockets are
    closed by the collector, with a ResourceWarning, in some later test. LangChain shares
    HTTP clients between instances (a cache), so the cache is emptied too."""
    from langchain_openai import ChatOpenAI
    from langchain_openai.chat_models import _client_utils

    chat = ChatOpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, **kw)
    try:
        yield chat
    finally:
        chat.root_client.close()
        _client_utils._cached_sync_httpx_client.cache_clear()


def test_langchain_chat_stream_and_embeddings(gw: Gateway) -> None:
    from langchain_openai import OpenAIEmbeddings

    with langchain_chat(gw, SECRET, model="demo", max_tokens=4) as chat:
        msg = chat.invoke("Say hello to the gateway.")
        assert msg.content and msg.usage_metadata["output_tokens"] == 4
        assert "".join(str(c.content) for c in chat.stream("Say hello."))
    # Raw strings: its default tokenizes with tiktoken, whose files come from the network.
    emb = OpenAIEmbeddings(model="demo", base_url=f"{gw.base_url}/v1", api_key=SECRET,
                           max_retries=0, check_embedding_ctx_length=False)
    try:
        vectors = emb.embed_documents(["hello", "gateway"])
        assert len(vectors) == 2 and vectors[0]
    finally:  # its own OpenAI client (else its sockets are closed by the collector)
        emb.client._client.close()


# -- the libraries: every error status tokenbooth returns ---------------------------------

# (what, key, model, max_tokens, content, headers): a chat that gets that error.
Case = tuple[str, str, str, int, str, dict[str, str]]
CASES: list[Case] = [
    ("400 invalid_request", SECRET, "demo", 0, "hi", {}),
    ("401 invalid_api_key", REVOKED_SECRET, "demo", 4, "hi", {}),
    ("403 insufficient_scope", READ_ONLY_SECRET, "demo", 4, "hi", {}),
    ("403 model_not_allowed", LIMITED_SECRET, "other", 4, "hi", {}),
    ("404 model_not_found", SECRET, "nope", 4, "hi", {}),
    ("413 request_too_large", SECRET, "demo", 4, BIG, {}),
    ("429 rate_limit_exceeded", TPM_SECRET, "demo", 4, "hi", {}),
    ("429 insufficient_quota", BROKE_SECRET, "demo", 4, "hi", {}),
    ("502 upstream_error", SECRET, "demo", 4, "hi", SIM_500),
    ("503 service_unavailable", SECRET, "unserved", 4, "hi", {}),
]
# What each library raises (the README's table): the class, and the status it reports.
# LiteLLM's mapping for OpenAI-compatible providers reads the status and the message only
# and has no 403 branch: a 403 is its generic APIError (with status_code 403), whatever
# the body says. A 413 is a generic status error in every library, the openai SDK's too.
EXPECTED: dict[str, tuple[str, str, str]] = {  # openai, LiteLLM, langchain-openai
    "400": ("BadRequestError", "BadRequestError", "OpenAIInvalidRequestError"),
    "401": ("AuthenticationError", "AuthenticationError", "OpenAIAuthenticationError"),
    "403": ("PermissionDeniedError", "APIError", "OpenAIPermissionDeniedError"),
    "404": ("NotFoundError", "NotFoundError", "OpenAIModelNotFoundError"),
    "413": ("APIStatusError", "APIError", "APIStatusError"),
    "429": ("RateLimitError", "RateLimitError", "OpenAIRateLimitError"),
    "502": ("InternalServerError", "BadGatewayError", "OpenAIAPIError"),
    "503": ("InternalServerError", "ServiceUnavailableError", "OpenAIAPIError"),
}


def _raised(call: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as e:
        call()
    return e.value


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_library_raises_its_own_class(gw: Gateway, litellm: Any, case: Case) -> None:
    what, key, alias, max_tokens, content, headers = case
    status, code = what.split()
    messages = [{"role": "user", "content": content}]
    want_openai, want_litellm, want_langchain = EXPECTED[status]

    with sdk(gw, key, retries=0) as client:
        err = _raised(lambda: client.chat.completions.create(
            model=alias, messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
            extra_headers=headers))
    assert type(err).__name__ == want_openai and isinstance(err, openai.APIStatusError)
    assert (err.status_code, err.code) == (int(status), code)

    err = _raised(lambda: litellm.completion(
        model=f"openai/{alias}", messages=messages, max_tokens=max_tokens,
        extra_headers=headers, **litellm_kw(gw, key)))
    assert type(err).__module__ == "litellm.exceptions" and type(err).__name__ == want_litellm
    assert err.status_code == int(status)  # type: ignore[attr-defined]

    with langchain_chat(gw, key, model=alias, max_tokens=max_tokens,
                        default_headers=headers) as chat:
        err = _raised(lambda: chat.invoke(content))
    assert type(err).__name__ == want_langchain and isinstance(err, openai.APIStatusError)
    assert (err.status_code, err.code) == (int(status), code)
