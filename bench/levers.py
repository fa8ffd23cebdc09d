"""Variants of the no-op floor F for the paced-stream section: what a lever buys the
plumbing itself, before any decision is made on it (the issue: measure, not assume).

- F-duplex: the response body FULL_DUPLEX_STREAMED (Envoy sends chunks without waiting for
  an answer; trailers SEND, as Envoy requires of that mode); the no-op servicer sends every
  byte back as streamed_response, chunks that queued up while it wrote coalesced into one.
- F-observe: the response body goes to a second ext_proc filter in `observability_mode`
  (Envoy sends, never waits, ignores answers; the servicer sends none); the deciding
  filter sees no response at all. The shape a "client asked for usage: nothing to strip"
  stream could take.
- F-lua: no response body to ext_proc at all; a Lua filter meters every chunk instead
  (SSE events split across any chunk boundary, content events counted, the usage event's
  counts read, all left in dynamic metadata): the floor of metering inside Envoy, the one
  record per request left to be reported some other way.

Each is F's rendered bootstrap with the ext_proc filter's config changed, nothing else.

For the request section, the "before" of a lever already switched on:
- F-split / B-split: F and B-memory with a backend's small JSON answer reaching ext_proc as
  it comes (its bytes, then an empty end: two messages) instead of whole (one message):
  `envoy.whole_answer_bytes: 0`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import gateways
from bench.gateways import Gateway

EXT_PROC = "envoy.filters.http.ext_proc"
OBSERVE = "tokenbooth.ext_proc_observe"
LUA = "tokenbooth.meter_in_envoy"
VARIANTS = ("F-duplex", "F-observe", "F-lua")
SPLIT_VARIANTS = ("F-split", "B-split")
SPLIT = {"whole_answer_bytes": 0}  # every answer reaches ext_proc as it comes
# Meters in Envoy: splits the stream into SSE events across any chunk split (a carry of
# the unfinished event), counts content events and reads the usage event's counts, then
# leaves them in dynamic metadata. Chunks pass as they come (nothing is buffered).
_LUA_METER = """\
function envoy_on_response(h)
  local carry, content, prompt, completion = "", 0, -1, -1
  for chunk in h:bodyChunks() do
    carry = carry .. chunk:getBytes(0, chunk:length())
    local start = 1
    while true do
      local e = string.find(carry, "\\n\\n", start, true)
      if e == nil then break end
      local ev = string.sub(carry, start, e - 1)
      if string.find(ev, '"usage":{', 1, true) then
        prompt = tonumber(string.match(ev, '"prompt_tokens":%s*(%d+)')) or prompt
        completion = tonumber(string.match(ev, '"completion_tokens":%s*(%d+)')) or completion
      elseif string.find(ev, '"content":"[^"]') then
        content = content + 1
      end
      start = e + 2
    end
    carry = string.sub(carry, start)
  end
  local md = h:streamInfo():dynamicMetadata()
  md:set("tokenbooth.meter", "content_events", content)
  md:set("tokenbooth.meter", "prompt_tokens", prompt)
  md:set("tokenbooth.meter", "completion_tokens", completion)
end
"""


def _filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def _ext_proc(filters: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    for i, f in enumerate(filters):
        if f["name"] == EXT_PROC:
            conf: dict[str, Any] = f["typed_config"]
            return i, conf
    raise RuntimeError("bench: no ext_proc filter in the rendered bootstrap")


def duplex(bootstrap: dict[str, Any]) -> dict[str, Any]:
    _, conf = _ext_proc(_filters(bootstrap))
    conf["processing_mode"]["response_body_mode"] = "FULL_DUPLEX_STREAMED"
    conf["processing_mode"]["response_trailer_mode"] = "SEND"
    return bootstrap


def observe(bootstrap: dict[str, Any]) -> dict[str, Any]:
    filters = _filters(bootstrap)
    i, conf = _ext_proc(filters)
    watcher = copy.deepcopy(conf)
    conf["processing_mode"]["response_body_mode"] = "NONE"
    watcher["observability_mode"] = True
    watcher["processing_mode"] = {
        "request_header_mode": "SKIP", "response_header_mode": "SKIP",
        "request_body_mode": "NONE", "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}
    watcher.pop("request_attributes", None)
    filters.insert(i + 1, {"name": OBSERVE, "typed_config": watcher})
    return bootstrap


def lua(bootstrap: dict[str, Any]) -> dict[str, Any]:
    filters = _filters(bootstrap)
    i, conf = _ext_proc(filters)
    conf["processing_mode"]["response_body_mode"] = "NONE"
    filters.insert(i + 1, {"name": LUA, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": _LUA_METER}}})
    return bootstrap


def starter(config: str, run_dir: Path, sim_url: str) -> Callable[[], Gateway]:
    if config == "F-split":
        return lambda: gateways.start_noop(run_dir, sim_url, config, envoy=SPLIT)
    if config == "B-split":
        return lambda: gateways.start_tokenbooth(run_dir, sim_url, "memory", config,
                                                 envoy=SPLIT)
    if config == "F-duplex":
        return lambda: gateways.start_noop(run_dir, sim_url, config, duplex, ["--duplex"])
    if config == "F-observe":
        return lambda: gateways.start_noop(run_dir, sim_url, config, observe)
    if config == "F-lua":
        return lambda: gateways.start_noop(run_dir, sim_url, config, lua)
    raise ValueError(f"unknown lever variant {config!r}")
