"""Limits shared by every replica, in Redis: one Lua script per operation, one round trip.

Layout: all of a key's state shares the hash tag `{k:<key_id>}`, one Cluster slot.
  tb:{k:<id>}:gcra             GCRA TAT (string)                      TTL: until stale + window
  tb:{k:<id>}:tpm              HASH level, ts (the TPM bucket)          TTL: until full + window
  tb:{k:<id>}:conc             ZSET request_id -> lease expiry          TTL: longest lease + window
  tb:{k:<id>}:res:<rid>        HASH tokens, cost, period, exp           TTL: lease + window
  tb:{k:<id>}:budget:<period>  HASH spent, reserved, r:<rid> -> cost    no TTL (the ledger)
  tb:{k:<id>}:resv:<period>    ZSET request_id -> lease expiry          no TTL (empties itself)
Each hold's cost sits in the ledger hash (`r:<rid>`), not only in its `res` hash, so
purging an expired hold never depends on a TTL that may already have fired.

The scripts perform policy/admission.py's transitions (each block names the function
it mirrors) with policy/limits.py's arithmetic. Exactness: `now` and every float cross
as 17-significant-digit text (exact for doubles both ways), the Lua does the same IEEE
operations, in the same order (Python's float `//` is ported as-is), and money is
integers (HINCRBY; compared as `cost <= budget - spent - reserved`, exact below 2**53).
TTLs only clean up; liveness is always decided against the caller's `now`
(`admission.hold_live`: live while now < exp).
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError

from authz.state.limits.base import LimitStoreUnavailable
from authz.state.resp import RespClient
from policy.admission import Settled, check_ask, check_usage, settled
from policy.limits import WINDOW_S, Ask, Decision, Limits

# Shared helpers: exact float text, integer text, Python's float floor division,
# bucket (admission.bucket_now), save_bucket, and purge (Ledger.expire: drop the budget
# holds whose lease ended; KEYS budget, resv).
_LIB = """
local function f(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local function floordiv(a, b)
  local mod = math.fmod(a, b)
  local div = (a - mod) / b
  if div == 0 then return 0 end
  local q = math.floor(div)
  if div - q > 0.5 then q = q + 1 end
  return q
end
local function bucket(key, now, cap, w)
  local st = redis.call('HMGET', key, 'level', 'ts')
  if not st[1] then return cap end
  return math.min(cap, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * cap / w)
end
local function save_bucket(key, level, now_s, cap, w)
  redis.call('HSET', key, 'level', f(level), 'ts', now_s)
  local full = math.max(0, (cap - level) * w / cap)
  redis.call('PEXPIRE', key, int(math.ceil((full + w) * 1000)))
end
local function purge(bkey, vkey, now_s)
  local gone = redis.call('ZRANGEBYSCORE', vkey, '-inf', now_s)
  for _, r in ipairs(gone) do
    local c = redis.call('HGET', bkey, 'r:' .. r)
    if c then
      redis.call('HINCRBY', bkey, 'reserved', int(-tonumber(c)))
      redis.call('HDEL', bkey, 'r:' .. r)
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', vkey, '-inf', now_s) end
end
"""

# KEYS: gcra, tpm, conc, res, budget, resv.
# ARGV: now, rid, rpm, tpm, max_concurrent, budget ('' = unlimited), tokens, cost,
#       lease_s, window_s, period.
# Returns {allowed, reason, retry_after, remaining_req, reset_req, remaining_tok, reset_tok}
# as text ('' = none). Mirrors admission.admit: check, decision, then reserve.
_ADMIT = _LIB + """
local now_s, rid = ARGV[1], ARGV[2]
local now = tonumber(now_s)
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens, cost, lease, w = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
                               tonumber(ARGV[10])
local reason, retry = nil, nil
-- admission.check: a duplicate (admission.tracked, and the request_id's hold is live)
local tracked = tpm or maxc or budget
if tracked then
  local old = redis.call('HGET', KEYS[4], 'exp')
  if old and tonumber(old) > now then reason = 'duplicate' end
end
-- admission.check: requests, GCRA (policy.limits.gcra)
local tat, new_tat, gcra_ok, rem = nil, nil, true, 0
if rpm then
  local interval = w / rpm
  tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now_s), now)
  new_tat = tat + interval
  local allow_at = new_tat - w
  if now < allow_at then
    gcra_ok = false
    if not reason then reason, retry = 'requests', allow_at - now end
  else
    rem = math.min(floordiv(now - allow_at, interval), rpm - 1)
  end
end
-- admission.expire (the leases whose expiry passed), then admission.check: concurrency
if maxc then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_s)
  if not reason and redis.call('ZCARD', KEYS[3]) >= maxc then reason = 'concurrency' end
end
-- admission._check_tokens: the bucket must hold the whole reservation (bucket_take)
local level, after = 0, 0
if tpm then
  level = bucket(KEYS[2], now, tpm, w)
  after = level
  if tokens > tpm then
    reason = reason or 'tokens_too_large'
  elseif tokens <= level then
    after = level - tokens
  elseif not reason then
    reason, retry = 'tokens', (tokens - level) * w / tpm
  end
end
-- admission.check: budget, after Ledger.expire (policy.limits.budget_admits, exact integers)
if budget and not reason then
  purge(KEYS[5], KEYS[6], now_s)
  local b = redis.call('HMGET', KEYS[5], 'spent', 'reserved')
  if cost > budget - tonumber(b[1] or 0) - tonumber(b[2] or 0) then reason = 'budget' end
end
-- admission.decision: header material, the state after this decision (a denial took nothing)
local function reply(ok, lvl)
  local rem_r, reset_r, rem_t, reset_t = '', '', '', ''
  if rpm then
    if not gcra_ok then rem_r, reset_r = f(0), f(tat - now)
    elseif ok == 1 then rem_r, reset_r = f(rem), f(new_tat - now)
    else rem_r, reset_r = f(math.min(rem + 1, rpm)), f(tat - now) end
  end
  if tpm then rem_t, reset_t = f(math.floor(lvl)), f(math.max(0, (tpm - lvl) * w / tpm)) end
  return {ok, reason or '', retry and f(retry) or '', rem_r, reset_r, rem_t, reset_t}
end
if reason then return reply(0, level) end
-- admission.reserve: admitted, take everything
local exp = now + lease
local slack = w * 1000
if rpm then
  redis.call('SET', KEYS[1], f(new_tat), 'PX', int(math.ceil((new_tat - now) * 1000 + slack)))
end
if tpm then save_bucket(KEYS[2], after, now_s, tpm, w) end
if maxc then
  redis.call('ZADD', KEYS[3], f(exp), rid)
  local ttl = math.ceil(lease * 1000 + slack)
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], int(ttl)) end
end
if budget then
  redis.call('HINCRBY', KEYS[5], 'reserved', ARGV[8])
  redis.call('HSET', KEYS[5], 'r:' .. rid, ARGV[8])
  redis.call('ZADD', KEYS[6], f(exp), rid)
end
if tracked then
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[4], 'exp', f(exp), 'period', ARGV[11], 'cost', budget and ARGV[8] or '')
  if tpm then redis.call('HSET', KEYS[4], 'tokens', ARGV[7]) end
  redis.call('PEXPIRE', KEYS[4], int(math.ceil(lease * 1000 + slack)))
end
return reply(1, after)
"""

# KEYS: tpm, conc, res, budget, resv. ARGV: now, rid, tpm ('' = none), used, cost, window_s.
# Mirrors admission.settle. Returns 1 if it charged a live hold, 0 if it charged nothing
# (unknown, already settled, or past its lease: then it only cleans up).
_SETTLE = _LIB + """
local now_s, rid = ARGV[1], ARGV[2]
local now, tpm, w = tonumber(now_s), tonumber(ARGV[3]), tonumber(ARGV[6])
local res = redis.call('HMGET', KEYS[3], 'tokens', 'exp')
if not res[2] then return 0 end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], rid)
-- admission.settle_charges: only a live hold is charged and refunded
local live = now < tonumber(res[2])
local hold = redis.call('HGET', KEYS[4], 'r:' .. rid)
if hold then
  redis.call('HDEL', KEYS[4], 'r:' .. rid)
  redis.call('ZREM', KEYS[5], rid)
  redis.call('HINCRBY', KEYS[4], 'reserved', int(-tonumber(hold)))
  -- the real cost, past the hold too (an overrun is charged, never dropped)
  if live then redis.call('HINCRBY', KEYS[4], 'spent', ARGV[5]) end
end
if live and res[1] and tpm then
  local level = bucket(KEYS[1], now, tpm, w)
  save_bucket(KEYS[1], math.min(tpm, level + tonumber(res[1]) - tonumber(ARGV[4])), now_s,
              tpm, w)
end
if live then return 1 end
return 0
"""

# Mirrors admission.consume: usage admitted elsewhere (a local limiter during an outage),
# counted on return: `n` arrivals against the GCRA and `t` tokens out of the bucket (it
# may go negative).
# KEYS: gcra, tpm. ARGV: now, rpm ('' = none), tpm ('' = none), n, t, window_s.
_CONSUME = _LIB + """
local now_s = ARGV[1]
local now, rpm, tpm, w = tonumber(now_s), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local n, t = tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm and n > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now_s), now) + n * w / rpm
  redis.call('SET', KEYS[1], f(tat), 'PX', int(math.ceil((tat - now) * 1000 + w * 1000)))
end
if tpm and t > 0 then
  save_bucket(KEYS[2], bucket(KEYS[2], now, tpm, w) - t, now_s, tpm, w)
end
return 1
"""

# Mirrors Ledger.balance. KEYS: budget, resv. ARGV: now. Returns {spent, reserved} as text.
_BUDGET = _LIB + """
purge(KEYS[1], KEYS[2], ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'spent', 'reserved')
return {b[1] or '0', b[2] or '0'}
"""


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)


class RedisLimitStore:
    """Limits in Redis shared by every replica; every call bounded by `timeout_s`."""

    def __init__(self, url: str, *, timeout_s: float = 0.25, window_s: float = WINDOW_S
                 ) -> None:
        # No I/O here or in start(): the first call connects (and loads the scripts).
        # The lean pipelined client: admission and settlement run twice per request.
        self._redis = RespClient(url, timeout_s)
        self._window = window_s

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    def _ns(key_id: str) -> str:
        return f"tb:{{k:{key_id}}}:"

    async def admit(self, limits: Limits, ask: Ask, now: float) -> Decision:
        check_ask(limits, ask)
        ns = self._ns(ask.key_id)
        keys = [ns + "gcra", ns + "tpm", ns + "conc", ns + "res:" + ask.request_id,
                ns + "budget:" + ask.period, ns + "resv:" + ask.period]
        args = [repr(float(now)), ask.request_id, _opt(limits.rpm), _opt(limits.tpm),
                _opt(limits.max_concurrent), _opt(limits.budget_nano), str(ask.tokens),
                str(ask.cost_nano), repr(float(ask.lease_s)), repr(float(self._window)),
                ask.period]
        out = await self._call(self._redis.evalsha(_ADMIT, keys, args))
        ok, reason, retry, rem_r, reset_r, rem_t, reset_t = (
            v.decode() if isinstance(v, bytes) else v for v in out)
        return Decision(
            allowed=ok == 1, reason=reason, retry_after_s=float(retry) if retry else None,
            limit_requests=limits.rpm,
            remaining_requests=int(float(rem_r)) if rem_r else None,
            reset_requests_s=float(reset_r) if reset_r else 0.0,
            limit_tokens=limits.tpm,
            remaining_tokens=int(float(rem_t)) if rem_t else None,
            reset_tokens_s=float(reset_t) if reset_t else 0.0,
        )

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        check_usage(used_tokens, cost_nano)
        ns = self._ns(ask.key_id)
        keys = [ns + "tpm", ns + "conc", ns + "res:" + ask.request_id,
                ns + "budget:" + ask.period, ns + "resv:" + ask.period]
        args = [repr(float(now)), ask.request_id, _opt(limits.tpm), str(used_tokens),
                str(cost_nano), repr(float(self._window))]
        done = await self._call(self._redis.evalsha(_SETTLE, keys, args))
        return settled(ask, used_tokens, cost_nano, applied=done == 1)

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float) -> None:
        ns = self._ns(key_id)
        await self._call(self._redis.evalsha(
            _CONSUME, [ns + "gcra", ns + "tpm"],
            [repr(float(now)), _opt(limits.rpm), _opt(limits.tpm), str(requests),
             str(tokens), repr(float(self._window))]))

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        ns = self._ns(key_id)
        spent, reserved = await self._call(self._redis.evalsha(
            _BUDGET, [ns + "budget:" + period, ns + "resv:" + period], [repr(float(now))]))
        return int(spent), int(reserved)

    async def _call(self, awaitable: Any) -> Any:
        # Bounded by the client's socket timeouts, no retries. The caller (Admission) logs
        # the failure once per request; the message keeps the cause (a Lua error too).
        try:
            return await awaitable
        except (RedisError, OSError) as e:  # TimeoutError is an OSError
            raise LimitStoreUnavailable(f"redis limit store: {type(e).__name__}: {e}") from None
