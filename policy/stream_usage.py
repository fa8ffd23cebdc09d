"""Metering an OpenAI SSE response: find the usage, count what was generated.

A meter is fed the response body chunk by chunk, as Envoy delivers it (one
chunk per socket read: events arrive split or merged). `StreamMeter` reads chat
and completions streams: with `strip_usage` it also removes the usage-only
chunk that the gateway asked for on the client's behalf, passing every other
byte through unchanged. `ResponsesStreamMeter` reads the Responses API's typed
events: the usage is in `response.completed`, which the client always gets.
`meter_for` picks one by the endpoint's kind.

An event over the parser's size limit (policy/sse.py) is passed through as it arrives,
never decoded and so never stripped; the meter counts it and its bytes
(`oversize_events`, `oversize_bytes`): without a usage chunk, its bytes are estimated
as generated text.

A chat or completions stream may end in an error event (vLLM's generation failed after
some chunks: `data: {"error": {"message", "type", "code"}}`, then `[DONE]`; older vLLM
releases sent `{"object": "error", "message", ..., "code"}`): `error_status` is the status
its record says (`stream_error_status`), and the stream is charged as a cut one.
"""

from __future__ import annotations

from typing import Any

import orjson

from policy.endpoints import Kind
from policy.sse import MAX_EVENT_BYTES, Event, SSEParser
from policy.tokens import estimate_bytes
from policy.usage import Usage, loads_lenient, usage_from_obj

DONE = b"[DONE]"
# The status of a stream's error event whose `code` is not an HTTP error status.
STREAM_ERROR_STATUS = 500
# Responses API events that end a response; each carries it, usage included.
RESPONSE_ENDS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
RESPONSE_FAILED = b"response.failed"
ERROR_EVENT = b"error"  # the Responses API's event for a stream that failed
# The Responses API event that opens an output item (a function call's carries its name).
ITEM_ADDED = b"response.output_item.added"


# Tokens by `_text_tokens` that one token's text hardly ever reaches (a long word, a run
# of spaces): a chunk's text past this times the tokens it carries holds merged steps.
MERGED_TEXT_TOKENS = 4
# Choice indexes remembered (n and best_of are capped far below; a backend sending more
# distinct indexes gets no merged count past them).
_MAX_CHOICES_SEEN = 4096


class StreamMeter:
    __slots__ = ("_choices_seen", "_data_events", "_fed", "_inline_usage", "_parser",
                 "_read_event", "_usage", "_usage_only", "content_chunks", "done", "echo",
                 "ended", "error_first", "error_status", "first_chunks", "merged_tokens",
                 "oversize_bytes", "strip_usage", "tokens_per_chunk")

    def __init__(self, strip_usage: bool, max_event_bytes: int = MAX_EVENT_BYTES,
                 tokens_per_chunk: int = 1) -> None:
        self._parser = SSEParser(max_event_bytes)
        self.strip_usage = strip_usage
        # Generated tokens one content chunk may carry (vLLM's stream_interval).
        self.tokens_per_chunk = tokens_per_chunk
        self._usage: Usage | None = None  # from the usage-only chunk: the whole request's
        self._usage_only = False  # a usage-only chunk came (its usage read or malformed)
        # From a chunk that also carries choices: vLLM's continuous_usage_stats, which
        # counts that one choice (one sequence of one prompt) so far, not the request.
        self._inline_usage: Usage | None = None
        self.content_chunks = 0  # chunks that carried generated tokens (vLLM: one per step)
        # Tokens past `tokens_per_chunk` that chunks held (merged steps), and the chunks
        # that opened a choice (a batch's next prompt may begin after a long prefill).
        self.merged_tokens = 0
        self.first_chunks = 0
        # The request asked vLLM to echo its prompt: a choice's first chunk holds it, and
        # counts one chunk's worth (set by the caller).
        self.echo = False
        self._choices_seen: set[int] = set()  # choice indexes whose first chunk passed
        self.oversize_bytes = 0  # bytes of events over the size limit (not decoded)
        self.done = False
        self.ended = False  # the body ended (`finish`), not cut
        # The status of the stream's first error event (0: none): generation failed.
        self.error_status = 0
        # That error event was the stream's first event: vLLM sends its first chunk (a
        # chat's role chunk too) once the engine has produced output, so nothing ran.
        self.error_first = False
        self._data_events = 0  # events with data (or passed unread: oversize)
        self._fed = 0  # bytes fed
        self._read_event = False  # an event with data (or an oversize one) was seen

    @property
    def usage(self) -> Usage | None:
        """The request's usage: the usage-only chunk's (`choices: []`, the last one wins),
        when it counts at least a token a content chunk.
        Usage inside a chunk with choices counts only for a stream that ended with
        `[DONE]` and no usage-only chunk (a backend that puts it on its last chunk): in a
        vLLM stream it is `continuous_usage_stats`, one choice's count so far, and a
        stream cut after it (n > 1, a batch) would otherwise be charged that choice's.
        A stream that failed (an error event, then vLLM's `[DONE]`) is such a cut one."""
        if self._usage_only and self._usage is None:
            return None  # the last usage-only chunk said no count (malformed)
        if self._usage is not None:
            # Fewer completion tokens than the chunks carried (each at least one, vLLM
            # sending a chunk per step at most): no count of this stream; estimated from
            # its chunks instead (hostile-backend tester: 0 for five chunks, exact).
            return self._usage if self._usage.completion_tokens >= self.content_chunks else None
        inline = self._inline_usage
        if inline is None or not self.done or self.error_status:
            return None
        # Fewer tokens than the chunks carried (each at least one): one choice's count of
        # several (n > 1), not the request's; estimated instead (review).
        return inline if inline.completion_tokens >= self.content_chunks else None

    @property
    def refused(self) -> bool:
        """The backend refused the request in its stream: a client error (4xx) event came
        first (vLLM 0.32 answers so a request it validates only once the stream began:
        a structured-output grammar that does not compile, say), before any chunk. Its
        counters did not move: nothing was read or generated, as its JSON 400 says."""
        return (self.error_first and 400 <= self.error_status < 500
                and not self.content_chunks and not self.oversize_bytes
                and self.usage is None)

    @property
    def unreadable(self) -> bool:
        """The body ended without one SSE data event: not a stream this meter can read (a
        compressed body, an HTML page, or no bytes at all: a chunked empty 200, which
        reaches the client before its end is seen), so nothing tells what was generated."""
        return self.ended and not self._read_event and self.usage is None

    @property
    def oversize_events(self) -> int:
        """Events over the size limit: passed through unread."""
        return self._parser.oversize_events

    @property
    def completion_estimate(self) -> int:
        """Generated tokens by what was seen, for a stream without a usage chunk: up to
        `tokens_per_chunk` per content chunk (more where it held merged steps), and ~4
        bytes a token of any oversize event."""
        return self.tokens_seen + estimate_bytes(self.oversize_bytes)

    @property
    def tokens_seen(self) -> int:
        """Generated tokens the content chunks carried (at most)."""
        return self.content_chunks * self.tokens_per_chunk + self.merged_tokens

    def restore(self, content_chunks: int, oversize_events: int, oversize_bytes: int,
                done: bool, unreadable: bool = False, ended: bool = False,
                merged_tokens: int = 0) -> None:
        """Take the counts a meter elsewhere (Envoy's, see policy/meter_report.py) made;
        `unreadable`: it found a whole body that is not an event stream; `ended`: the body
        ended (no abort's steps are owed for a stream that was not cut)."""
        self.content_chunks = content_chunks
        self.merged_tokens = merged_tokens  # (the services' count of the same, by text)
        self._parser.oversize_events = oversize_events
        self.oversize_bytes = oversize_bytes
        self.done = done
        self._fed = 1 if unreadable else 0
        # The other meter decided what it could read: an ended body it read is no
        # unreadable one here.
        self._read_event = self._read_event or not unreadable
        self.ended = self.ended or unreadable or ended

    def feed(self, chunk: bytes) -> bytes | None:
        """Observe a chunk; return what the client should get instead, or None for 'as is'."""
        self._fed += len(chunk)
        events = self._parser.feed(chunk)
        return self._after(events, b"")

    def finish(self) -> bytes | None:
        """End of the response body: the bytes still owed to the client (or None). A body
        with no SSE event at all may be a whole JSON answer (a backend that does not
        stream): its `usage` counts."""
        events, tail = self._parser.finish()
        self.ended = True
        out = self._after(events, tail)
        if not self._read_event and self._usage is None and tail:
            obj = _json_object(tail)
            if obj is not None:
                self._usage = usage_from_obj(obj.get("usage"), generates=True)
        return out

    def _after(self, events: list[Event], tail: bytes) -> bytes | None:
        keep: list[bytes] = []
        for ev in events:
            self._read_event = self._read_event or ev.oversize or ev.data is not None
            if ev.oversize or ev.data is not None:  # (a comment, `: keep-alive`, is none)
                self._data_events += 1
            if ev.oversize:  # never read, so never stripped
                self.oversize_bytes += len(ev.raw)
            elif self._observe(ev) and self.strip_usage:
                continue
            keep.append(ev.raw)
        if not self.strip_usage:
            return None
        keep.append(tail)
        return b"".join(keep)

    def _count_merged_steps(self, choice: dict[str, Any]) -> None:
        """Tokens past `tokens_per_chunk` in this chunk of a choice: vLLM merges the steps
        it could not send yet into one chunk (its reader lagged, or its own event loop).
        Its logprobs name each token; without them, its text's tokens as `_text_tokens`
        reckons them, past what one chunk's may spell. Not a choice's first chunk, which
        with `echo` carries the prompt too: it counts one chunk's worth."""
        index = choice.get("index")
        if type(index) is not int:
            return  # not vLLM's
        if index not in self._choices_seen and len(self._choices_seen) < _MAX_CHOICES_SEEN:
            # (Past that many, a choice counts as opened already: each of its chunks
            # opening one would excuse every pause.)
            self._choices_seen.add(index)
            self.first_chunks += 1
            if self.echo:
                return
            # Without echo a first chunk is generated text too: one that opens after the
            # reader paused carries every step vLLM merged meanwhile.
        tokens = _logprob_tokens(choice)
        if not tokens:
            tokens = _text_tokens(choice)
            if tokens <= MERGED_TEXT_TOKENS * self.tokens_per_chunk:
                return  # what one chunk's tokens may spell
        self.merged_tokens += max(0, tokens - self.tokens_per_chunk)

    def _observe(self, ev: Event) -> bool:
        """Account for one event; True when it is the usage-only chunk."""
        data = ev.data
        if data is None:
            return False
        if data == DONE:
            self.done = True
            return False
        try:
            obj: Any = loads_lenient(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        if not self.error_status:
            self.error_status = stream_error_status(obj)
            self.error_first = bool(self.error_status) and self._data_events == 1
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if _has_text(choice):
                    self.content_chunks += 1
                    self._count_merged_steps(choice)
                    break
        # The usage-only chunk: a `usage` key and no choice (`"choices": []`, vLLM's; or
        # none at all). Stripped whatever its usage says (a malformed one, null or
        # negative counts, is no count: the stream is estimated), as Envoy's meter does
        # (authz/envoy_config/stream_meter.py): the client did not ask for it.
        only = ("usage" in obj and "error" not in obj and obj.get("object") != "error"
                and (choices is None or (isinstance(choices, list) and not choices)))
        usage = usage_from_obj(obj.get("usage"), generates=True)
        if only:
            self._usage, self._usage_only = usage, True  # the last one wins
        elif usage is not None and isinstance(choices, list) and choices:
            self._inline_usage = usage
        return only


def stream_error_status(obj: dict[str, Any]) -> int:
    """The status of a stream event that says generation failed (0: not one): OpenAI's
    and vLLM's `{"error": {..., "code": 500}}`, or older vLLM's `{"object": "error", ...,
    "code": 500}`; its `code` when that is an HTTP error status (vLLM's is: 500, or 503
    for a retryable failure), else STREAM_ERROR_STATUS (OpenAI's codes are names). An
    event with `choices` is a chunk, whatever else it holds. The Lua meter
    (authz/envoy_config/stream_meter.py) hands such events over raw, to be read here."""
    if "choices" in obj:
        return 0
    err = obj.get("error")
    if isinstance(err, dict):
        code = err.get("code")
    elif obj.get("object") == "error":
        code = obj.get("code")
    else:
        return 0
    return _code_status(code)


def _code_status(code: Any) -> int:
    """An error event's `code` as a status: itself when an HTTP error status (a number or
    its digits), OpenAI's `rate_limit_exceeded` / `too_many_requests` 429, its
    `invalid_*` codes (a bad prompt or image) 400, else STREAM_ERROR_STATUS
    (`server_error` and the rest)."""
    if isinstance(code, str) and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    if code in ("rate_limit_exceeded", "too_many_requests"):
        return 429
    if isinstance(code, str) and code.startswith("invalid_"):
        return 400
    return STREAM_ERROR_STATUS


def _has_text(choice: Any) -> bool:
    """Whether a choice carries generated tokens. vLLM sends one chunk per generation
    step, and a step's text may be empty (a token that ends inside a UTF-8 character,
    EOS): any chat delta but the opening role chunk counts, and any completions `text`.
    A role chunk counts only with text, reasoning (vLLM 0.32 sends `reasoning`, older
    releases `reasoning_content`) or a tool call's name or argument fragment (some
    servers put the first token there). The Lua meter
    (authz/envoy_config/stream_meter.py, `classify`) counts the same events."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        if "role" not in delta:
            return True
        return (bool(delta.get("content")) or bool(delta.get("reasoning"))
                or bool(delta.get("reasoning_content"))
                or _has_tool_text(delta.get("tool_calls")))
    return isinstance(choice.get("text"), str)


def _logprob_tokens(choice: dict[str, Any]) -> int:
    """How many tokens a choice's logprobs name (0 without logprobs): one entry each in a
    chat chunk's `logprobs.content`, a completions chunk's `logprobs.tokens`."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return 0
    entries = logprobs.get("content")
    if entries is None:
        entries = logprobs.get("tokens")
    return len(entries) if isinstance(entries, list) else 0


def _text_tokens(choice: dict[str, Any]) -> int:
    """Tokens of generated text in a chunk's choice (a chat delta's content, reasoning
    and tool-call arguments, or a completions `text`), reckoned as BPE tokenizers spell
    them: ~4 ASCII characters a token, and a token for every other character (CJK text
    runs about one a character; ~4 bytes a token would charge it a quarter)."""
    delta = choice.get("delta")
    parts: list[Any] = [choice.get("text")]
    if isinstance(delta, dict):
        parts += [delta.get("content"), delta.get("reasoning"), delta.get("reasoning_content")]
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            parts += [c.get("function", {}).get("arguments") for c in calls
                      if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    tokens = 0
    for part in parts:
        if isinstance(part, str):
            ascii_chars = len(part.encode("ascii", "ignore"))
            tokens += (ascii_chars + 3) // 4 + len(part) - ascii_chars
    return tokens


def _has_tool_text(calls: Any) -> bool:
    if not isinstance(calls, list):
        return False
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and (_nonempty_str(fn.get("arguments"))
                                     or _nonempty_str(fn.get("name"))):
            return True
    return False


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


_NON_ASCII = bytes(range(0x80, 0x100))  # deleted by `translate`: what is left is ASCII


class ResponsesStreamMeter(StreamMeter):
    """The Responses API's SSE: `event: <type>` + `data: {"type": <type>, ...}`. Only the
    final event and the rare `response.output_item.added` are decoded (by their `event:`
    name; events without one are decoded to find their type); `*.delta` events count as
    content (`response.function_call_arguments.delta` included), and so does a
    function-call item's opening event, which carries the call's name."""

    __slots__ = ()

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        super().__init__(strip_usage=False, max_event_bytes=max_event_bytes)

    def _observe(self, ev: Event) -> bool:
        data = ev.data
        if data is None:
            return False
        name = ev.event
        obj: Any = None
        if name is None:
            obj = _json_object(data)
            kind = obj.get("type") if obj is not None else None
            name = kind.encode() if isinstance(kind, str) else b""
        if name.endswith(b".delta"):  # text, reasoning, function_call_arguments, ...
            self.content_chunks += 1
            # vLLM sends no delta for a token that ends inside a UTF-8 character: the
            # character's other bytes may each have been one (a byte-fallback tokenizer),
            # up to one token a byte past the first of its non-ASCII bytes (real vLLM:
            # 56-59 deltas for 60 tokens; every cut stream was charged short).
            wide = len(data) - len(data.translate(None, _NON_ASCII))
            if wide > 1:
                self.merged_tokens += wide - 1
        elif name == ITEM_ADDED:
            # A function call's name comes whole in its item's first event (as in a chat
            # stream's first tool-call delta, which counts): one more content event.
            obj = obj or _json_object(data)
            item = obj.get("item") if obj is not None else None
            if (isinstance(item, dict) and item.get("type") == "function_call"
                    and _nonempty_str(item.get("name"))):
                self.content_chunks += 1
        elif name in RESPONSE_ENDS:
            obj = obj or _json_object(data)
            response = obj.get("response") if obj is not None else None
            if isinstance(response, dict):
                self._usage = usage_from_obj(response.get("usage"), generates=True)
            if name == RESPONSE_FAILED and not self.error_status:
                error = response.get("error") if isinstance(response, dict) else None
                self.error_status = _code_status(
                    error.get("code") if isinstance(error, dict) else None)
            self.done = True
        elif name == ERROR_EVENT or (not name and obj is not None):
            # OpenAI's `error` event (`code`, `message`: the stream failed, no response
            # follows), or a chat-style `{"error": {...}}` with no type (vLLM's error
            # body): the record says its status, the stream is charged as a cut one.
            obj = obj or _json_object(data)
            if obj is not None and not self.error_status:
                # Its code at the top (the API reference's shape) or in a nested
                # `error` object (what OpenAI's stream has been seen to send).
                nested = obj.get("error")
                code = obj.get("code")
                if code is None and isinstance(nested, dict):
                    code = nested.get("code")
                self.error_status = _code_status(code) if name else stream_error_status(obj)
        return False


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = loads_lenient(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def meter_for(kind: Kind, client_wants_usage: bool,
              max_event_bytes: int = MAX_EVENT_BYTES, tokens_per_chunk: int = 1) -> StreamMeter:
    """The meter of a stream from an endpoint of `kind`."""
    if kind is Kind.RESPONSES:
        return ResponsesStreamMeter(max_event_bytes)
    return StreamMeter(not client_wants_usage, max_event_bytes, tokens_per_chunk)
