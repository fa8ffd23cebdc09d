"""HTTPS through Envoy with a locally generated CA, with the openai SDK, over HTTP/1.1
and HTTP/2 (ALPN)."""

from __future__ import annotations

import ssl

import httpx2
import openai
import pytest

from tests.e2e.conftest import run_gateway
from tests.helpers import SECRET
from tests.tls import make_test_ca

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_openai_sdk_over_https(http2: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    ca, cert, key = make_test_ca(tmp_path_factory.mktemp("ca"))
    with run_gateway(tmp_path_factory.mktemp("gw-tls"),
                     tls={"cert": str(cert), "key": str(key)}) as gw:
        port = gw.base_url.rsplit(":", 1)[1]
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx2.Client(verify=ctx, http2=http2, http1=not http2) as http:
            client = openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=SECRET,
                                   http_client=http, max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert raw.http_response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert raw.parse().usage.completion_tokens == 3  # type: ignore[union-attr]
            chunks = list(client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            # An untrusted client is refused at the handshake.
            with httpx2.Client(http2=http2) as untrusted, pytest.raises(openai.APIConnectionError):
                openai.OpenAI(base_url=f"https://localhost:{port}/v1", api_key=SECRET,
                              http_client=untrusted, max_retries=0).models.list()
