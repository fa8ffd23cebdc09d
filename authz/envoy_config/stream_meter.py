"""Streams metered inside Envoy (`envoy.stream_metering: envoy`): a Lua meter reads the
chunks of a chat or completions stream as they pass, strips the usage chunk the client
did not ask for, and leaves what it read in dynamic metadata; Envoy's gRPC access log
then carries that to the services once per stream (also for a stream cut short), where
the record is written and the hold settled. No per-chunk message reaches the services.

The meter sits in the upstream-errors Lua filter (after ext_proc in the chain, so it sees
the response first). It meters only when ext_proc's answer to the request body asked for
it (`meter`: `strip` or `keep` in ext_proc's metadata) and the response is not an error:
the same predicate the services apply when they hand the response over (see
authz/services/lifecycle.py, `hand_over`).

Metadata it leaves under METER_NS (read by authz/services/meter_reports.py):
  events         content events seen so far (kept current, so a cut stream has it): every
                 chunk with a choice but a role chunk without text (policy/stream_usage.py's
                 `_has_text` counts the same)
  oversize_bytes bytes of events over envoy.max_event_bytes (passed through unread)
  oversize_events how many such events
  usage          the last event whose JSON has a `"usage":{...}` object, raw: the services
                 parse it with the same SSE and JSON code as ext_proc metering (set as it
                 passes, as `done`: a client may leave before the body's last bytes)
  error          the first event that may say generation failed (`"error": {...}` or
                 `"object": "error"`, no `"choices"`), raw, set as it passes: the services
                 read its status as ext_proc metering does
  merged         tokens past one chunk's in content events that held steps vLLM merged
                 while the reader paused (their text, as the services' meter counts it)
  first_us       when the first content event passed (µs since the epoch)
  last_us        when the last one passed (kept current)
  done           1 once `data: [DONE]` passed
  ended          1 once the body ended (absent: the stream was cut)
  unreadable     1 when the answer is not an event stream (a server that ignores
                 `stream: true`, an HTML error page, a compressed body) or ended without
                 one ended event: it passes untouched and unread, and the services charge
                 its hold, as for a JSON answer whose usage they cannot read
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog, AccessLogFilter, MetadataFilter
from envoy_data_plane.envoy.config.core.v3 import ApiVersion, GrpcService, GrpcServiceEnvoyGrpc
from envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 import (
    CommonGrpcAccessLogConfig,
    HttpGrpcAccessLogConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    ValueMatcher,
)

from authz.envoy_config.common import SERVICES_CLUSTER, ms, pack
from policy.config import Config

METER_NS = "tokenbooth.meter"
METER_KEY = "meter"  # in ext_proc's metadata: "strip" or "keep"
METER_STEPS_KEY = "meter_steps"  # ... and the tokens a chunk carries (stream_interval)
METER_ECHO_KEY = "meter_echo"  # ... and, set, that the first chunk echoes the prompt
ALS_NAME = "envoy.access_loggers.http_grpc"
LOG_NAME = "tokenbooth.meter"
# Envoy sends its buffered access-log entries this often (or when 16 KiB are waiting):
# the delay between a stream's end and its settlement.
FLUSH_MS = 50

# The meter. `carry` holds the unfinished event as parts (joined once it ends: linear in
# the bytes whatever the split); `tail` the bytes that may begin its end ("\r?\n\r?\n").
# With `strip`, a chunk goes on as the complete events it finished, the usage-only event
# left out, and the unfinished one waits for its end (an unfinished event at the end of
# the body is not an SSE event: clients drop it too).
_METER_LUA = """\
local NS = "{ns}"
local MAX_EVENT = {max_event}

-- The metadata object is fetched anew each time: Envoy's Lua wrappers do not outlive
-- the step (a chunk) they were fetched in.
local function set(h, key, value)
  h:streamInfo():dynamicMetadata():set(NS, key, value)
end

-- A raw event as protobuf takes a string: each byte not of valid UTF-8 as `?`. (The
-- access log message with one is refused whole by the services' gRPC decoder: every
-- stream's report batched in it was lost. JSON keeps its shape: such bytes are only
-- inside strings.)
local function utf8_clean(s)
  if not string.find(s, "[\\128-\\255]") then return s end
  local out, i, n, from = {{}}, 1, #s, 1
  local byte = string.byte
  while i <= n do
    local c = byte(s, i)
    local len = 1
    if c >= 0x80 then
      len = 0
      local lo, hi = 0x80, 0xBF
      if c >= 0xC2 and c <= 0xDF then len = 2
      elseif c >= 0xE0 and c <= 0xEF then
        len = 3
        if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
      elseif c >= 0xF0 and c <= 0xF4 then
        len = 4
        if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
      end
      if len > 0 and i + len - 1 <= n then
        local c2 = byte(s, i + 1)
        if c2 < lo or c2 > hi then len = 0 end
        for k = 2, len - 1 do
          local ck = byte(s, i + k)
          if ck < 0x80 or ck > 0xBF then len = 0 end
        end
      else
        len = 0
      end
      if len == 0 then
        out[#out + 1] = string.sub(s, from, i - 1)
        out[#out + 1] = "?"
        len, from = 1, i + 1
      end
    end
    i = i + len
  end
  out[#out + 1] = string.sub(s, from, n)
  return table.concat(out)
end

-- Now, in µs since the epoch, as text (pcall'd: an Envoy without it meters all the same).
local function stamp(h)
  return h:timestampString(EnvoyTimestampResolution.MICROSECOND)
end

-- Where the first event in `s` ends: the last byte of the blank line that ends it (SSE
-- line ends are CRLF, LF or CR alone), or nil. A CR the bytes end with may be the first
-- half of a CRLF: inside an event, a line end only once the next byte is known (the
-- caller keeps the last bytes, `tail`, and searches them again with the next chunk); as
-- the blank line's end, the event ends there (CR-only streams end every event so) and
-- an LF that follows in the next chunk is still the event's (`meter`: `lf_owed`).
local function event_end(s, i)
  while true do
    local a = string.find(s, "[\\r\\n]", i)
    if a == nil then return nil end
    local b = a
    if string.byte(s, a) == 13 then
      local n = string.byte(s, a + 1)
      if n == nil then return nil end
      if n == 10 then b = a + 1 end
    end
    local c = string.byte(s, b + 1)
    if c == 10 then return b + 1 end
    if c == 13 then
      if string.byte(s, b + 2) == 10 then return b + 2 end
      return b + 1
    end
    if c == nil then return nil end
    i = b + 1
  end
end

-- Tokens of an event's generated text, as the services reckon a chunk's text
-- (policy/stream_usage.py, `_text_tokens`): ~4 ASCII characters a token and one for
-- any other character, in the string values of its text fields (a JSON escape counts
-- its characters: a little more, never less).
local TEXT_KEYS = {{'"content"%s*:%s*"', '"reasoning"%s*:%s*"', '"reasoning_content"%s*:%s*"',
                   '"text"%s*:%s*"', '"arguments"%s*:%s*"'}}
local function text_tokens(ev)
  local tokens = 0
  for _, key in ipairs(TEXT_KEYS) do
    local init = 1
    while true do
      local _, open = string.find(ev, key, init)
      if open == nil then break end
      -- The string's end: the next quote no backslash escapes.
      local i, close = open + 1, #ev + 1
      while true do
        local q = string.find(ev, '["\\\\]', i)
        if q == nil then break end
        if string.byte(ev, q) == 92 then i = q + 2 else close = q; break end
      end
      local s = string.sub(ev, open + 1, close - 1)
      local _, high = string.gsub(s, "[\\128-\\255]", "")
      local _, lead = string.gsub(s, "[\\192-\\255]", "")
      tokens = tokens + math.floor((#s - high + 3) / 4) + lead
      init = close + 1
    end
  end
  return tokens
end

-- A content event that holds the steps vLLM merged while its reader paused (its text
-- past what one chunk of `steps` tokens may spell, as the services' own meter counts
-- them, `_count_merged_steps`): the tokens past one chunk's. Read only where the event
-- is longer than the smallest content event by what such text takes (two bytes a
-- token at the least), so a stream of ordinary chunks costs one length compare each.
local function merged_steps(ev, st)
  local small = st.small
  if small == nil or #ev < small then st.small = #ev end
  if small == nil then
    -- The first has no length to compare with: read, unless it echoes the prompt (a
    -- first chunk after a pause holds what was merged: retest tester).
    if st.echo then return end
  elseif #ev + 32 <= small + 8 * st.steps then return end
  -- A choice with an index, as vLLM writes it (the services' meter reads no other).
  if not string.find(ev, '"index"%s*:%s*%d') then return end
  local t = text_tokens(ev)
  if t > 4 * st.steps then st.merged = st.merged + t - st.steps end
end

-- A usage or error event past RAW_MAX goes to the services as what they read of it
-- alone: its usage object, or its error's code. (Reports of events of megabytes, batched,
-- overflowed the access log's stream: Envoy dropped them, other streams' with them.)
local RAW_MAX = 4096

-- The event's usage object: the last `"usage": {{...}}` that holds a token count (JSON
-- reads a key given twice so; a `"usage"` nested elsewhere holding none is none; one
-- that opens with a nested object counts: retest). At most USAGE_TRIES are looked at.
local USAGE_TRIES = 64

local function usage_object(ev)
  local found, from = nil, 1
  for _ = 1, USAGE_TRIES do
    local _, brace = string.find(ev, '"usage"%s*:%s*{{', from)
    if brace == nil then break end
    local obj = string.match(ev, '^(%b{{}})', brace)
    if obj ~= nil and string.find(obj, '"[%a_]*tokens"%s*:%s*%d') then found = obj end
    from = brace + 1
  end
  return found
end

local function compact_usage(ev, obj, only)
  if #ev <= RAW_MAX then return ev end
  if #obj > RAW_MAX then return nil end
  return 'data: {{"choices":' .. (only and '[]' or '[{{"index":0}}]') .. ',"usage":' .. obj
    .. '}}\\n\\n'
end

local function compact_error(ev)
  if #ev <= RAW_MAX then return ev end
  -- The error object's own `code` (not one nested in it), as the services read it: a
  -- number, or a name of word characters (another string reads as no code: 500).
  local obj = string.match(ev, '"error"%s*:%s*(%b{{}})') or string.match(ev, 'data:%s*(%b{{}})')
  local code = "null"
  if obj ~= nil then
    local flat = string.gsub(string.sub(obj, 2, -2), "%b{{}}", "")
    code = string.match(flat, '"code"%s*:%s*(%-?%d+)')
      or string.match(flat, '"code"%s*:%s*("[%w_%-]*")') or "null"
  end
  if #code > 256 then code = "null" end
  return 'data: {{"error":{{"message":"(an error event of ' .. #ev .. ' bytes)","code":'
    .. code .. '}}}}\\n\\n'
end

-- The event's JSON object with each object nested in it emptied: its own keys, to be
-- found as the services' meter finds them (a `"usage"` nested elsewhere is none).
local function top_level(ev)
  local obj = string.match(ev, 'data:%s*(%b{{}})')
  if obj == nil then return "" end
  return (string.gsub(string.sub(obj, 2, -2), "%b{{}}", "{{}}"))
end

local function classify(ev, st)
  -- A line of its own (a content chunk's text may say `data: [DONE]`; JSON escapes
  -- every line end in it); an `id:` or `event:` line may come before it.
  if string.find("\\n" .. ev, "[\\r\\n]data: ?%[DONE%][\\r\\n]") then
    st.done = 1
    st.seen = true
    return false
  end
  -- An event saying generation failed (`{{"error": {{...}}}}`, older vLLM's `"object":
  -- "error"`), never a chunk: the first goes to the services raw, at once (a client may
  -- leave before the end), to be read there (policy/stream_usage.py,
  -- `stream_error_status`).
  -- `error_first`: it was the stream's first event with data (vLLM refused the request
  -- in it); a comment (`: keep-alive`) is none.
  local first = not st.seen
  if string.find("\\n" .. ev, "[\\r\\n]data:") then st.seen = true end
  if not st.error and not string.find(ev, '"choices"%s*:')
      and (string.find(ev, '"error"%s*:%s*{{') or string.find(ev, '"object"%s*:%s*"error"')) then
    st.error = true
    if first then set(st.h, "error_first", 1) end
    set(st.h, "error", utf8_clean(compact_error(ev)))
  end
  -- A usage object with token counts (not a `"usage"` key nested elsewhere that holds
  -- none: its event is no usage chunk, to strip or to read).
  local usage_obj = string.find(ev, '"usage"', 1, true) and usage_object(ev) or nil
  local has_usage = usage_obj ~= nil
  -- Generated tokens: vLLM sends a chunk per generation step, whose text may be empty
  -- (a token ending inside a UTF-8 character): any chunk with a choice counts but the
  -- opening role chunk, which counts only with text, reasoning (vLLM 0.32's `reasoning`,
  -- older `reasoning_content`) or a tool call's name or arguments.
  -- (`%s*`: a server other than vLLM may write a space after the colon.)
  -- (The role is a chat delta's first key, as vLLM writes it: a completions chunk has
  -- none, and its logprobs may hold a token `role` as a key.)
  if string.find(ev, '"choices"%s*:%s*%[%s*{{') and (string.find(ev, '"delta"%s*:')
      or string.find(ev, '"text"%s*:')) then
    if not string.find(ev, '"delta"%s*:%s*{{%s*"role"%s*:')
        or string.find(ev, '"content"%s*:%s*"[^"]') or string.find(ev, '"reasoning"%s*:%s*"[^"]')
        or string.find(ev, '"reasoning_content"%s*:%s*"[^"]')
        or (string.find(ev, '"tool_calls"%s*:')
            and (string.find(ev, '"arguments"%s*:%s*"[^"]')
                 or string.find(ev, '"name"%s*:%s*"[^"]'))) then
      st.events = st.events + 1
      merged_steps(ev, st)
    end
  end
  -- The usage-only chunk: a `"usage"` key, no choice (`"choices": []`, or no `"choices"`
  -- at all) and no error: stripped whatever its usage says, and the last one is the
  -- request's usage (one with no count, null or negative, is reported so: the services
  -- read it as none). A chunk with choices and usage (vLLM's continuous_usage_stats)
  -- counts only while there is none, as the services' own meter reads them
  -- (policy/stream_usage.py).
  local only = false
  if string.find(ev, '"usage"%s*:') then
    local top = top_level(ev)
    only = string.find(top, '"usage"%s*:') ~= nil and not string.find(top, '"error"%s*:')
      and not string.find(top, '"object"%s*:%s*"error"')
      and (string.find(top, '"choices"%s*:%s*%[%s*%]') ~= nil
           or not string.find(top, '"choices"%s*:'))
  end
  if only then
    local kept = has_usage and compact_usage(ev, usage_obj, true) or nil
    if kept == nil then
      kept = #ev <= RAW_MAX and ev or 'data: {{"choices":[],"usage":null}}\\n\\n'
    end
    st.usage = kept
    st.usage_new = true
    st.usage_only = true
  elseif has_usage and not st.usage_only then
    local kept = compact_usage(ev, usage_obj, false)
    if kept ~= nil then
      st.usage = kept
      st.usage_new = true
    end
  end
  return only
end

-- A `content-encoding` other than identity: bytes no meter can read (a backend, or a
-- proxy before it, that compresses although asked for `accept-encoding: identity`).
local function encoded(content_encoding)
  local rest = string.gsub(string.lower(content_encoding or ""), "identity", "")
  return string.find(rest, "[^%s,]") ~= nil
end

local function meter(h, strip, content_type, content_encoding, steps, echo)
  local st = {{events = 0, oversize = 0, oversize_events = 0, usage = nil, done = 0,
               error = false, seen = false, h = h, usage_new = false, done_set = false,
               usage_only = false, steps = math.max(1, tonumber(steps) or 1), merged = 0,
               small = nil, echo = echo ~= nil}}
  set(h, "events", 0)
  -- The content type is not asked: a stream is read by its bytes, whatever it says it
  -- is, as the services' own meter reads it (an SSE stream sent as `text/plain` kept its
  -- usage chunk and was charged its hold here, exact there).
  if encoded(content_encoding) then
    -- Compressed: no meter can read it, and held until a blank line that never comes it
    -- would reach the client as nothing (a gzipped stream has none). It passes as it is
    -- and the services charge its hold, as ext_proc metering does.
    set(h, "unreadable", 1)
    for _ in h:bodyChunks() do
    end
    set(h, "ended", 1)
    return
  end
  -- `lf_owed`: the last event ended at a CR that ended the chunk ("keep" or "drop",
  -- as that event went): an LF the next chunk begins with completes its CRLF.
  local parts, size, skipping, tail, lf_owed = {{}}, 0, false, "", nil
  local last = nil
  for chunk in h:bodyChunks() do
    last = chunk
    local data = chunk:getBytes(0, chunk:length())
    -- The chunk is rewritten only when its bytes are not the client's as they are:
    -- held bytes of an earlier chunk go out in it, or some of its own are held or cut.
    local out, changed = {{}}, size > 0
    local before = st.events
    local pos = 1
    if lf_owed ~= nil and string.byte(data, 1) == 10 then
      if lf_owed == "keep" then out[1] = "\\n" else changed = true end
      pos = 2
    end
    if #data > 0 then lf_owed = nil end
    while pos <= #data do
      -- Where the current event ends (`upto`, in `data`): an end that straddles two
      -- chunks begins in `tail` (the event's last bytes before this chunk) and ends
      -- within this chunk's first bytes; else it is searched in `data` alone, from
      -- `pos`, never copying the rest of the chunk (a chunk of many events cost the
      -- square of its size: streams2 tester, a 1 MiB read of short events blocked the
      -- worker for seconds).
      local upto = nil
      if #tail > 0 then
        local s = tail .. string.sub(data, pos, pos + 3)
        local w = event_end(s, 1)
        -- A blank line's CR at the end of these few bytes may be a CRLF's first half
        -- (the chunk goes on): that end lies in `data` alone, and is searched there
        -- (review: a chunk beginning with an event's last byte, then CR LF CR LF, gave the
        -- next event that last LF).
        if w ~= nil and not (w == #s and string.byte(s, w) == 13 and pos + 3 < #data) then
          upto = pos + w - #tail - 1
        end
      end
      if upto == nil then upto = event_end(data, pos) end
      if upto == nil then
        local rest = string.sub(data, pos)
        if not skipping and size + #rest > MAX_EVENT then
          -- Over the limit: what was held goes out now, the rest as it comes, unread.
          st.oversize_events = st.oversize_events + 1
          st.seen = true
          for _, p in ipairs(parts) do
            out[#out + 1] = p
            st.oversize = st.oversize + #p
          end
          parts, size, skipping = {{}}, 0, true
        end
        if skipping then
          st.oversize = st.oversize + #rest
          out[#out + 1] = rest
        else
          parts[#parts + 1] = rest
          size = size + #rest
          changed = true
        end
        tail = string.sub(tail .. string.sub(data, math.max(pos, #data - 2)), -3)
        break
      end
      local piece = string.sub(data, pos, upto)
      local kept = true
      if skipping then
        st.oversize = st.oversize + #piece
        out[#out + 1] = piece
        skipping = false
      else
        parts[#parts + 1] = piece
        local ev = table.concat(parts)
        if #ev > MAX_EVENT then
          st.oversize_events = st.oversize_events + 1
          st.seen = true
          st.oversize = st.oversize + #ev
          out[#out + 1] = ev
        elseif classify(ev, st) and strip then
          changed, kept = true, false
        else
          out[#out + 1] = ev
        end
      end
      if upto == #data and string.byte(data, upto) == 13 then
        lf_owed = kept and "keep" or "drop"
      end
      parts, size, tail = {{}}, 0, ""
      pos = upto + 1
    end
    if strip and changed then
      chunk:setBytes(table.concat(out))
    end
    if st.events ~= before then
      -- When generated text passed, in µs since epoch: the first (time to first token)
      -- and the last (where the silence before a cut began: the services charge it at
      -- the stream's pace, as ext_proc's meter does).
      local ok, now = pcall(stamp, h)
      if ok then
        now = tonumber(now)
        if before == 0 then
          set(h, "first_us", now)
        end
        set(h, "last_us", now)
      end
      set(h, "events", st.events)
      if st.merged > 0 then set(h, "merged", st.merged) end
    end
    if st.oversize > 0 then
      set(h, "oversize_bytes", st.oversize)
      set(h, "oversize_events", st.oversize_events)
    end
    -- As they pass, as `events`: a client that leaves at `[DONE]`, before the body's
    -- last bytes, cuts the stream, and what was read must not go with it.
    if st.usage_new then
      set(h, "usage", utf8_clean(st.usage))
      st.usage_new = false
    end
    if st.done == 1 and not st.done_set then
      set(h, "done", 1)
      st.done_set = true
    end
  end
  if size > 0 then
    -- The body ended inside an event (no blank line after it: `data: [DONE]\\n` alone,
    -- events a single LF apart). It is no SSE event, so unread, as ext_proc metering
    -- leaves it; the client still gets its bytes, held until now, in the last chunk
    -- (its wrapper lives on when the end came with data or an empty end of stream, not
    -- after trailers).
    if strip and last ~= nil then
      pcall(function()
        last:setBytes(last:getBytes(0, last:length()) .. table.concat(parts))
      end)
    end
  end
  if not st.seen then
    -- Not one event with data read (no bytes, comments only, or one unended event): the
    -- services charge the hold, as for an unreadable body (ext_proc metering's rule).
    set(h, "unreadable", 1)
  end
  set(h, "done", st.done)
  set(h, "ended", 1)
end
"""


def meter_lua(cfg: Config) -> str:
    """The meter's Lua functions (`meter(h, strip)`), for the upstream-errors filter."""
    return _METER_LUA.format(ns=METER_NS, max_event=cfg.envoy.max_event_bytes)


def meter_access_log() -> AccessLog:
    """Envoy's gRPC access log to the services, for metered streams only (the meter
    set METER_NS's `events` at their start): each stream's one report, at its end."""
    only_metered = AccessLogFilter(metadata_filter=MetadataFilter(matcher=MetadataMatcher(
        filter=METER_NS, path=[MetadataMatcherPathSegment(key="events")],
        value=ValueMatcher(present_match=True))))
    return AccessLog(name=ALS_NAME, filter=only_metered, typed_config=pack(
        HttpGrpcAccessLogConfig(common_config=CommonGrpcAccessLogConfig(
            log_name=LOG_NAME,
            grpc_service=GrpcService(
                envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SERVICES_CLUSTER)),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=ms(FLUSH_MS)))))

