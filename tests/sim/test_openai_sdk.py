"""The official openai SDK parses the simulator's responses (what gateway clients will use)."""

from __future__ import annotations

import openai

from authz.sim.tokens import output_text

from .conftest import Sim

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},  # 4 tokens (with ".") + 3
    {"role": "user", "content": "Hello, world!"},  # 4 tokens + 3
]
PROMPT_TOKENS = 4 + 3 + 4 + 3 + 3


async def test_openai_sdk_chat_stream_with_usage(sim: Sim) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x") as client:
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == output_text(6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert usage_chunks == [chunks[-1]]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        PROMPT_TOKENS,
        6,
        PROMPT_TOKENS + 6,
    )


async def test_openai_sdk_non_stream_and_errors(sim: Sim) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-llama", "other-model"]
        completion = await client.completions.create(model="other-model", prompt="a b c")
        assert completion.model == "other-model"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 3
        assert completion.usage.completion_tokens == 16
        try:
            await client.chat.completions.create(model="missing", messages=MESSAGES)
        except openai.NotFoundError as err:
            assert err.status_code == 404
            assert "The model `missing` does not exist." in str(err)
        else:
            raise AssertionError("expected a 404")
