"""The Lua scripts of the Redis limit store (redis_limits.py), one per operation.

Layout: all of a key's state shares the hash tag `{k:<key_id>}`, one Cluster slot.
  tb:{k:<id>}:rpm              HASH level, ts (the GCRA's bucket), g    TTL: as tpm
  tb:{k:<id>}:gcra             the same rate as the last release kept   TTL: until full + window
                               it (an arrival time; `g`: the last one
                               written here), for a roll (`rate`)
  tb:{k:<id>}:tpm              HASH level, ts (the TPM bucket)          TTL: full at tpm 1 + window
  tb:{k:<id>}:conc             ZSET request_id -> lease expiry          TTL: longest lease + window
  tb:{k:<id>}:res:<rid>        HASH tokens, cost, period, exp, ask, at  TTL: lease + LOST_TTL_S
                               (`at`: the admission's `now`, exact text)
  tb:{k:<id>}:budget:<period>  HASH spent, reserved, r:<rid> -> cost,   no TTL (the ledger)
                               l:<rid> -> a lost hold's charged cost
  tb:{k:<id>}:resv:<period>    ZSET request_id -> lease expiry          no TTL (empties itself)
  tb:{k:<id>}:lost:<period>    ZSET request_id -> lease expiry of a     no TTL (pruned after
                               lost charge                              LOST_TTL_S)
Each hold's cost sits in the ledger hash (`r:<rid>`), not only in its `res` hash, so
purging an expired hold never depends on a TTL that may already have fired. A `res`
hash lives until its request settles or the sweep claims it: while it exists, the
request_id is held (a duplicate). Its `ask` (JSON) is the material of a lost record.
The sweep leaves in its place `lost` (its lease end; TTL LOST_TTL_S), so that a
late settlement knows it corrected a lost hold whether or not the key has a budget.

The index of holds, for the sweep: `tb:{holds}:due` (its own slot), see redis_limits.py.

The scripts perform policy/admission.py's transitions (each block names the function
it mirrors) with policy/limits.py's arithmetic. Exactness: `now` and every float cross
as 17-significant-digit text (exact for doubles both ways), the Lua does the same IEEE
operations, in the same order, and money is
integers (HINCRBY; compared as `cost <= budget - spent - reserved`, exact below 2**53).
TTLs only clean up; liveness is always decided against the caller's `now`
(`admission.hold_live`: live while now < exp), on the lease clock: the caller's `now`
shifted by its clock's offset from Redis' (`lnow`, redis_limits.py), so that replicas
whose clocks disagree by minutes agree on when a lease ends. Rates, buckets and the
admission time `at` keep the caller's own `now`.
"""

from __future__ import annotations

from policy.admission import LOST_TTL_S

# The longest a token bucket in debt is kept (ten years: past it, a debt is forgotten).
MAX_TTL_S = 10 * 365 * 86400.0

# Shared helpers: exact float text, integer text,
# bucket (admission.bucket_now), save_bucket (admission.bucket_save), and purge
# (Ledger.expire: charge the budget holds whose lease ended in full, remember them as
# lost, forget lost charges older than LOST_TTL_S; KEYS budget, resv, lost).
LIB = """
local function f(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local function bucket(key, now, cap, w)
  local st = redis.call('HMGET', key, 'level', 'ts')
  if not st[1] then return cap end
  return math.min(cap, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * cap / w)
end
-- admission.ahead: how far a bucket's time is ahead of `now` (waits start there)
local function ahead_of(key, now)
  local ts = redis.call('HGET', key, 'ts')
  if not ts then return 0 end
  return math.max(0, tonumber(ts) - now)
end
local function save_bucket(key, level, now_s, cap, w)
  -- admission.bucket_save: the bucket's time never goes back
  local ts, ahead = redis.call('HGET', key, 'ts'), 0
  if ts and tonumber(ts) > tonumber(now_s) then
    ahead, now_s = tonumber(ts) - tonumber(now_s), ts
  end
  redis.call('HSET', key, 'level', f(level), 'ts', now_s)
  -- Kept until full under any limit, since the key's tpm may be changed meanwhile: at
  -- or above zero that is a window at most; in debt, as slow as the lowest tpm (1)
  -- repays it (capped: Redis refuses an expiry past its range).
  local full = math.max(0, (cap - level) * w / cap)
  if level < 0 then full = math.min((1 - level) * w, MAX_TTL_S) end
  redis.call('PEXPIRE', key, int(math.ceil((full + ahead + w) * 1000)))
  return tonumber(now_s)
end
-- The request rate as the last release also reads it, for a roll where replicas of both
-- share one Redis: its GCRA kept an arrival time (`tat`, a string at :gcra). `rate`
-- reads this release's bucket and, when the last release has written :gcra since this
-- one did (it differs from the `g` this one wrote), takes its count too (the lower);
-- `save_rate` writes both, so either version counts the other's requests. Between
-- replicas of this release alone, `g` matches and the bucket decides, exact.
local function rate(key, gkey, now, rpm, w)
  local st = redis.call('HMGET', key, 'level', 'ts', 'g')  -- bucket(), and `g`
  local left = rpm
  if st[1] then
    left = math.min(rpm, tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * rpm / w)
  end
  local tat = redis.call('GET', gkey)
  if tat and tat ~= st[3] then
    left = math.min(left, (now + w - math.max(tonumber(tat), now)) * rpm / w)
  end
  return left
end
local function save_rate(key, gkey, left, now_s, rpm, w)
  local ts = save_bucket(key, left, now_s, rpm, w)
  -- the arrival time that leaves `left` requests at the bucket's time (the last
  -- release admits while max(tat, now) + w / rpm - w <= now, i.e. while left >= 1)
  local tat = ts + (rpm - left) * w / rpm
  local g = f(tat)
  redis.call('SET', gkey, g, 'PX', int(math.ceil((math.max(0, tat - ts) + w) * 1000)))
  redis.call('HSET', key, 'g', g)
end
local function purge(bkey, vkey, lkey, now_s)
  local gone = redis.call('ZRANGEBYSCORE', vkey, '-inf', now_s, 'WITHSCORES')
  for i = 1, #gone, 2 do
    local r = gone[i]
    local c = redis.call('HGET', bkey, 'r:' .. r)
    if c then
      redis.call('HINCRBY', bkey, 'reserved', int(-tonumber(c)))
      redis.call('HINCRBY', bkey, 'spent', c)
      redis.call('HDEL', bkey, 'r:' .. r)
      redis.call('HSET', bkey, 'l:' .. r, c)
      redis.call('ZADD', lkey, gone[i + 1], r)
    end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', vkey, '-inf', now_s) end
  local floor = f(tonumber(now_s) - LOST_TTL)
  local old = redis.call('ZRANGEBYSCORE', lkey, '-inf', floor)
  for _, r in ipairs(old) do redis.call('HDEL', bkey, 'l:' .. r) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', lkey, '-inf', floor) end
end
""".replace("LOST_TTL", repr(LOST_TTL_S)).replace("MAX_TTL_S", repr(MAX_TTL_S))

# KEYS: rpm, tpm, conc, res, budget, resv, lost, gcra (the last release's rate: `rate`).
# ARGV: now, rid, rpm, tpm, max_concurrent, budget ('' = unlimited), tokens, cost,
#       lease_s, window_s, period, the Ask as JSON (kept for the sweep's lost record),
#       take ('0': decide only, reserve nothing), deadline (Redis' own clock, '' = none),
#       the lease clock's now ('' or absent: `now`).
# Returns {allowed, reason, retry_after, remaining_req, reset_req, remaining_tok, reset_tok}
# as text ('' = none). Mirrors admission.admit: check, decision, then reserve. Past its
# deadline (a Redis that stalled ran it after its caller gave up and answered 503) it
# does nothing and says 'stale': its hold would be charged as lost once its lease ended.
ADMIT = LIB + """
if ARGV[14] and ARGV[14] ~= '' then
  local t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1000000 > tonumber(ARGV[14]) then
    return {0, 'stale', '', '', '', '', ''}
  end
end
local now_s, rid = ARGV[1], ARGV[2]
local now = tonumber(now_s)
local lnow_s = (ARGV[15] and ARGV[15] ~= '') and ARGV[15] or now_s
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxc, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens, cost, lease, w = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
                               tonumber(ARGV[10])
local reason, retry = nil, nil
-- admission.check: a duplicate (admission.tracked, and admission.held: the request_id
-- holds, live or ended and not yet claimed)
local tracked = tpm or maxc or budget
-- (a hold's `exp`: the mark a claimed hold leaves, below, holds nothing)
if tracked and redis.call('HEXISTS', KEYS[4], 'exp') == 1 then reason = 'duplicate' end
-- admission.check: requests, GCRA's bucket (policy.limits.gcra)
local requests, gcra_ok, rem, ahead_r, ahead_t = 0, true, 0, 0, 0
if rpm then
  requests = rate(KEYS[1], KEYS[8], now, rpm, w)
  ahead_r = ahead_of(KEYS[1], now)
  if requests < 1 then
    gcra_ok = false
    if not reason then reason, retry = 'requests', (1 - requests) * w / rpm + ahead_r end
  else
    rem = math.min(math.floor(requests - 1), rpm - 1)
  end
end
-- admission.expire (the leases whose expiry passed), then admission.check: concurrency
if maxc then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', lnow_s)
  if not reason and redis.call('ZCARD', KEYS[3]) >= maxc then reason = 'concurrency' end
end
-- admission._check_tokens: the bucket must hold the whole reservation (bucket_take)
local level, after = 0, 0
if tpm then
  level = bucket(KEYS[2], now, tpm, w)
  ahead_t = ahead_of(KEYS[2], now)
  after = level
  if tokens > tpm then
    if reason ~= 'duplicate' then reason, retry = 'tokens_too_large', nil end  -- said first
  elseif tokens <= level then
    after = level - tokens
  elseif not reason then
    reason, retry = 'tokens', (tokens - level) * w / tpm + ahead_t
  elseif reason == 'requests' then  -- both rates spent: the longer wait (admission.check)
    retry = math.max(retry, (tokens - level) * w / tpm + ahead_t)
  end
end
-- admission.check: budget, after Ledger.expire (policy.limits.budget_admits, exact integers)
if budget and not reason then
  purge(KEYS[5], KEYS[6], KEYS[7], lnow_s)
  local b = redis.call('HMGET', KEYS[5], 'spent', 'reserved')
  local spent = tonumber(b[1] or 0)
  if cost > budget - spent - tonumber(b[2] or 0) then
    if cost > budget - spent then reason = 'budget' else reason = 'budget_held' end
  end
end
-- admission.decision: header material, the state after this decision (a denial took nothing)
local function reply(ok, lvl)
  local rem_r, reset_r, rem_t, reset_t = '', '', '', ''
  if rpm then
    if not gcra_ok then rem_r, reset_r = f(0), f((rpm - requests) * w / rpm + ahead_r)
    elseif ok == 1 then
      rem_r, reset_r = f(rem), f((rpm - (requests - 1)) * w / rpm + ahead_r)
    else
      rem_r = f(math.min(math.floor(requests), rpm))
      reset_r = f(math.max(0, (rpm - requests) * w / rpm) + ahead_r)
    end
  end
  if tpm then
    rem_t, reset_t = f(math.floor(lvl)), f(math.max(0, (tpm - lvl) * w / tpm) + ahead_t)
  end
  return {ok, reason or '', retry and f(retry) or '', rem_r, reset_r, rem_t, reset_t}
end
if reason then return reply(0, level) end
if ARGV[13] == '0' then return reply(1, after) end
-- admission.reserve: admitted, take everything
local exp = tonumber(lnow_s) + lease
local slack = w * 1000
if rpm then save_rate(KEYS[1], KEYS[8], requests - 1, now_s, rpm, w) end
if tpm then save_bucket(KEYS[2], after, now_s, tpm, w) end
if tracked then  -- a lease whatever its limits: a max_concurrent set later counts it
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
  redis.call('HSET', KEYS[4], 'exp', f(exp), 'period', ARGV[11], 'cost', budget and ARGV[8] or '',
             'ask', ARGV[12], 'at', now_s)
  if tpm then redis.call('HSET', KEYS[4], 'tokens', ARGV[7]) end
  redis.call('PEXPIRE', KEYS[4], int(math.ceil((lease + LOST_TTL) * 1000)))
end
return reply(1, after)
""".replace("LOST_TTL", repr(LOST_TTL_S))

# KEYS: tpm, conc, res, budget, resv, lost. ARGV: now, rid, tpm ('' = none), used, cost,
# window_s[, latest lease end, admitted at ('' = none), the lease clock's now]. Mirrors
# admission.settle. Returns 1 if it settled the request, 2 if that corrected a lost
# charge, 0 if it found nothing (unknown, or already settled). With a latest lease end
# and an admission time (a settlement from a record, policy/recorded.py: resettle.py,
# the sweep): only the record's own hold (or the sweep's mark of one), admitted at that
# time (its `at`); one admitted by a release before this one (no `at`) by its lease
# ending no later. Another request under the same id is not touched (0).
SETTLE = LIB + """
local now_s, rid = ARGV[1], ARGV[2]
local now, tpm, w = tonumber(now_s), tonumber(ARGV[3]), tonumber(ARGV[6])
local lnow = tonumber(ARGV[9] or '') or now
local res = redis.call('HMGET', KEYS[3], 'tokens', 'exp', 'at')
local latest = tonumber(ARGV[7] or '')
if latest then
  local exp, at = res[2], res[3]
  if not exp then
    local mark = redis.call('HMGET', KEYS[3], 'lost', 'at')
    exp, at = mark[1], mark[2]
  end
  if not exp then return 0 end
  local admitted = tonumber(ARGV[8] or '')
  if at and admitted then
    if tonumber(at) ~= admitted then return 0 end
  elseif tonumber(exp) > latest then
    return 0
  end
end
if res[2] then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[2], rid)
end
-- the sweep's mark (SWEEP): its hold was charged as lost, budget or not; correctable
-- as a ledger's lost charge is (Ledger.expire: until its lease end + LOST_TTL)
local claimed = false
if not res[2] then
  local mark = redis.call('HGET', KEYS[3], 'lost')
  if mark then
    redis.call('DEL', KEYS[3])
    claimed = tonumber(mark) > lnow - LOST_TTL
  end
end
-- Ledger.charge: the real cost (past the hold too: an overrun is charged, never
-- dropped); a hold already charged as lost is corrected to it
local charged = 0
local hold = redis.call('HGET', KEYS[4], 'r:' .. rid)
if hold then
  redis.call('HDEL', KEYS[4], 'r:' .. rid)
  redis.call('ZREM', KEYS[5], rid)
  redis.call('HINCRBY', KEYS[4], 'reserved', int(-tonumber(hold)))
  redis.call('HINCRBY', KEYS[4], 'spent', ARGV[5])
  charged = 1
else
  local lost = redis.call('HGET', KEYS[4], 'l:' .. rid)
  if lost then
    redis.call('HDEL', KEYS[4], 'l:' .. rid)
    redis.call('ZREM', KEYS[6], rid)
    redis.call('HINCRBY', KEYS[4], 'spent', int(tonumber(ARGV[5]) - tonumber(lost)))
    charged = 2
  end
end
-- admission.settle_charges: only a live hold gives back its unused tokens
-- (admission.give_back: added as stored, its time unchanged; an overrun taken from the
-- bucket as it is now)
if res[2] and lnow < tonumber(res[2]) and res[1] and tpm then
  local back = tonumber(res[1]) - tonumber(ARGV[4])
  if back >= 0 then
    local stored = redis.call('HGET', KEYS[1], 'level')
    if stored then redis.call('HSET', KEYS[1], 'level', f(tonumber(stored) + back)) end
  else
    save_bucket(KEYS[1], math.min(tpm, bucket(KEYS[1], now, tpm, w) + back), now_s, tpm, w)
  end
end
if charged == 2 or claimed then return 2 end
if res[2] or charged == 1 then return 1 end
return 0
""".replace("LOST_TTL", repr(LOST_TTL_S))

# KEYS: conc, res, budget, resv, lost. ARGV: now (the lease clock's), rid.
# Mirrors admission.sweep for one hold, then Ledger.expire: the hold is claimed as lost
# if its lease ended unsettled. Returns its Ask (JSON, as admitted) to the one caller
# that claims it (it writes the record); {exp} if the hold is still live (its index
# entry was early); 0 if there is none (settled, claimed, or never admitted). The hold
# becomes a mark, kept as long as a lost charge is correctable, by which a late SETTLE
# says it corrected a lost hold (2) for a key without a budget too (a release before
# this one deleted the hold: its SETTLE reads no `exp` in the mark, and finds nothing).
# The mark keeps the Ask: a SWEEP of it again (its caller never had the reply, a
# timeout, and its index entry came back) returns it again, so that its `lost` record
# is written (a second one is dropped by readers; review: a timed-out SWEEP left a
# charge with no record).
SWEEP = LIB + """
local now_s, rid = ARGV[1], ARGV[2]
local res = redis.call('HMGET', KEYS[2], 'exp', 'ask', 'at')
if not res[1] then
  local mark = redis.call('HMGET', KEYS[2], 'lost', 'ask')
  if mark[1] and mark[2] then return mark[2] end
  return 0
end
if tonumber(res[1]) > tonumber(now_s) then return {res[1]} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'lost', res[1])
if res[2] then redis.call('HSET', KEYS[2], 'ask', res[2]) end
if res[3] then redis.call('HSET', KEYS[2], 'at', res[3]) end
redis.call('PEXPIRE', KEYS[2], int(LOST_TTL * 1000))
redis.call('ZREM', KEYS[1], rid)
purge(KEYS[3], KEYS[4], KEYS[5], now_s)
return res[2] or ''
""".replace("LOST_TTL", repr(LOST_TTL_S))

# KEYS: due. ARGV: now (the lease clock's), claimed until, limit. The index entries due
# by `now` (lease ended), each moved to `claimed until` so no other sweep takes it meanwhile.
CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0,
                       tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"""

# Mirrors admission.consume: usage admitted elsewhere (a local limiter during an outage),
# counted on return: `n` arrivals against the GCRA and `t` tokens out of the bucket (it
# may go negative).
# KEYS: rpm, tpm, gcra[, the batch's mark]. ARGV: now, rpm ('' = none), tpm ('' = none),
# n, t, window_s[, batch id]: a batch counted once already (a Redis that stalled runs
# the try whose caller gave up, then its repeat) changes nothing.
CONSUME = LIB + """
if ARGV[7] and ARGV[7] ~= '' then
  if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', 3600000) then return 0 end
end
local now_s = ARGV[1]
local now, rpm, tpm, w = tonumber(now_s), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local n, t = tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm and n > 0 then
  save_rate(KEYS[1], KEYS[3], rate(KEYS[1], KEYS[3], now, rpm, w) - n, now_s, rpm, w)
end
if tpm and t > 0 then
  save_bucket(KEYS[2], bucket(KEYS[2], now, tpm, w) - t, now_s, tpm, w)
end
return 1
"""

# A settlement whose hold Redis lost (it restarted empty, or was flushed, after the
# admission; authz/state/limits/redis_limits.py tells): its real cost goes to the ledger,
# once (a mark per request makes a repeat a no-op). KEYS: budget. ARGV: rid, cost.
# Returns 1 when charged, 0 for a repeat.
CHARGE_LOST_HOLD = """
if redis.call('HSETNX', KEYS[1], 'x:' .. ARGV[1], '1') == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[2])
return 1
"""

# Mirrors Ledger.balance. KEYS: budget, resv, lost. ARGV: now (the lease clock's).
# Returns {spent, reserved} as text.
BUDGET = LIB + """
purge(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local b = redis.call('HMGET', KEYS[1], 'spent', 'reserved')
return {b[1] or '0', b[2] or '0'}
"""
