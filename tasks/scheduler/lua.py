"""The scheduler's Lua scripts: every change to pending work is one atomic step in Redis.

All scripts share :data:`PRELUDE` (key builders, priority bands, fair shares, the choice of the
next task, position). Per-model and per-tenant keys are built inside the scripts from the
templates of :mod:`tasks.keys`, since which tenants and models a step touches is decided there
(standalone Redis, as kombu requires). Numbers cross into Redis as ``%.17g`` strings, so a
score read back is bit-for-bit the one written and positions agree exactly with releases.

Order of release, for one model (docs/scheduling.md):

1. the highest **band**: a task's priority plus one step per ``aging_s`` waited, capped at 9;
   its sort score ``submitted_at - priority * aging_s`` makes each tenant's zset a queue in
   aged-priority order, and band = floor((now - score) / aging_s);
2. within the band, the tenant with the lowest **virtual time** ``base + releases / weight``
   (start-time fair queuing; a tenant that becomes active starts at the model's virtual time,
   so idleness banks no credit);
3. ties: the older score, then the tenant name.
"""

from __future__ import annotations

from tasks.broker import END_TASK_LUA
from tasks.keys import (
    LEDGER_INDEX_KEY,
    LEDGER_KEY,
    MODELS_KEY,
    SCHED_BACKLOGGED_KEY,
    SCHED_BOUNDS_KEY,
    SCHED_HOSTS_KEY,
    SCHED_MESSAGES_KEY,
    SCHED_MODELS_KEY,
    SCHED_OFFERED_KEY,
    SCHED_SERVED_KEY,
    SCHED_TASKS_KEY,
    SCHED_WAITS_KEY,
    SCHED_WEIGHTS_KEY,
    sched_fair_key,
    sched_host_active_key,
    sched_host_busy_key,
    sched_host_key,
    sched_host_models_key,
    sched_released_key,
    sched_running_key,
    sched_state_key,
    sched_tenant_key,
    sched_tenants_key,
    sched_waiting_key,
)

MAX_PRIORITY = 9
STALE_BATCH = 20  # released or running entries past the horizon dropped per step
# Upper bounds of the wait-time histogram per priority band (seconds from submission to start),
# counted by STARTED in SCHED_WAITS_KEY: from an idle model's next start to an hour-long backlog.
WAIT_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TEMPLATES = {
    "waiting": sched_waiting_key("%s"),
    "tenants": sched_tenants_key("%s"),
    "tenant": sched_tenant_key("%s", "%s"),
    "fair": sched_fair_key("%s"),
    "state": sched_state_key("%s"),
    "released": sched_released_key("%s"),
    "running": sched_running_key("%s"),
    "host": sched_host_key("%s"),
    "host_models": sched_host_models_key("%s"),
    "host_busy": sched_host_busy_key("%s", "%s"),
    "active": sched_host_active_key("%s"),
}
_CONSTANTS = {
    "TASKS": SCHED_TASKS_KEY,
    "MESSAGES": SCHED_MESSAGES_KEY,
    "BOUNDS": SCHED_BOUNDS_KEY,
    "WEIGHTS": SCHED_WEIGHTS_KEY,
    "MODELS": SCHED_MODELS_KEY,
    "BACKLOGGED": SCHED_BACKLOGGED_KEY,
    "HOSTS": SCHED_HOSTS_KEY,
    "WAITS": SCHED_WAITS_KEY,
    "LEDGER": LEDGER_KEY,
    "LEDGER_INDEX": LEDGER_INDEX_KEY,
    "SERVED": SCHED_SERVED_KEY,
    "OFFERED": SCHED_OFFERED_KEY,
    "SUBMITTED": MODELS_KEY,
}

PRELUDE = (
    "local T = {"
    + ", ".join(f"{name} = {_lua_string(t)}" for name, t in _TEMPLATES.items())
    + "}\n"
    + "".join(f"local {name} = {_lua_string(v)}\n" for name, v in _CONSTANTS.items())
    + f"local TOP = {MAX_PRIORITY}\nlocal STALE_BATCH = {STALE_BATCH}\n"
    + f"local WAIT_BOUNDS = {{{', '.join(repr(float(b)) for b in WAIT_BUCKETS_S)}}}\n"
    + """
local function key(kind, a, b) return string.format(T[kind], a, b) end
local function num(x) return string.format('%.17g', x) end

-- band b holds the scores in (now - (b+1)*aging, now - b*aging]; the loops correct the
-- division's rounding so that ZCOUNT on these very thresholds counts the same tasks.
local function threshold(now, aging, b) return now - b * aging end
local function band(now, aging, score)
  local b = math.floor((now - score) / aging)
  while score > threshold(now, aging, b) do b = b - 1 end
  while score <= threshold(now, aging, b + 1) do b = b + 1 end
  if b > TOP then b = TOP end
  return b
end

-- A tenant's fair-share state on a model: virtual time = base + n / w. A changed weight takes
-- effect from the next release: base absorbs the releases made under the old one.
local function fair(model, tenant)
  local base, n, w = 0, 0, nil
  local raw = redis.call('HGET', key('fair', model), tenant)
  if raw then
    local a, b, c = string.match(raw, '^(%S+) (%S+) (%S+)$')
    base, n, w = tonumber(a), tonumber(b), tonumber(c)
  end
  local weight = tonumber(redis.call('HGET', WEIGHTS, tenant)) or 1
  if w ~= weight then
    if w then base = base + n / w end
    n, w = 0, weight
  end
  return base, n, w
end

local function save_fair(model, tenant, base, n, w)
  redis.call('HSET', key('fair', model), tenant, num(base) .. ' ' .. string.format('%d', n)
    .. ' ' .. num(w))
end

-- The indexes a release reads in place of every model a host serves: BACKLOGGED, the models
-- with pending work, and per host ('active') the models with tasks released for it or running
-- on it. Every step that adds to or takes from those sets keeps them, through these.
local function busy_add(host, model, task, at)
  redis.call('ZADD', key('host_busy', host, model), at, task)
  redis.call('SADD', key('active', host), model)
end

local function busy_remove(host, model, task)
  local bkey = key('host_busy', host, model)
  redis.call('ZREM', bkey, task)
  if redis.call('EXISTS', bkey) == 0 then redis.call('SREM', key('active', host), model) end
end

local function meta_of(task)
  local raw = redis.call('HGET', TASKS, task)
  return raw and cjson.decode(raw)
end

-- Count a task's wait from submission to start in its band's histogram (SCHED_WAITS_KEY).
local function observe_wait(b, wait)
  local bucket = 'inf'
  for i, bound in ipairs(WAIT_BOUNDS) do
    if wait <= bound then bucket = i - 1; break end
  end
  redis.call('HINCRBY', WAITS, b .. ':' .. bucket, 1)
  redis.call('HINCRBYFLOAT', WAITS, b .. ':sum', num(wait))
end

-- Does candidate a go before candidate b (each: band, tag, score, tenant)?
local function before(a, b)
  if a.band ~= b.band then return a.band > b.band end
  if a.tag ~= b.tag then return a.tag < b.tag end
  if a.score ~= b.score then return a.score < b.score end
  return a.tenant < b.tenant
end

-- The next task of the model: the best head among its tenants' queues.
local function choose(model, now, aging)
  local best
  for _, tenant in ipairs(redis.call('SMEMBERS', key('tenants', model))) do
    local head = redis.call('ZRANGE', key('tenant', model, tenant), 0, 0, 'WITHSCORES')
    if #head == 0 then
      redis.call('SREM', key('tenants', model), tenant)
    else
      local base, n, w = fair(model, tenant)
      local score = tonumber(head[2])
      local c = {tenant = tenant, task = head[1], score = score, band = band(now, aging, score),
                 tag = base + n / w, base = base, n = n, w = w}
      if not best or before(c, best) then best = c end
    end
  end
  return best
end

-- Take a task out of the pending structures (release, cancel, or a start without release).
local function unqueue(model, tenant, task)
  local tkey = key('tenant', model, tenant)
  redis.call('ZREM', tkey, task)
  redis.call('ZREM', key('waiting', model), task)
  redis.call('HDEL', MESSAGES, task)
  if redis.call('ZCARD', tkey) == 0 then redis.call('SREM', key('tenants', model), tenant) end
  if redis.call('EXISTS', key('waiting', model)) == 0 then redis.call('SREM', BACKLOGGED, model) end
end

-- Celery's queue in band order. Workers pop the oldest message (BRPOP takes the list's right
-- end), and a released task waits there until a worker has a free thread: a little after the
-- scheduler counted its slot free, since the task that ended there still stores its result
-- and acknowledges first. So a task released in a higher band goes in right after the first of
-- the lower band ones still there (LINSERT AFTER puts it nearer the right end), and is popped
-- before them, never behind work it overtook in the pending order. Within a band the order
-- stays first in, first out. The released zset is scored in the same order (band, then release
-- sequence), so its ZRANK is a released task's place in line.
local RELEASED_SPAN = 2 ^ 40  -- releases of a model before two bands' scores could meet
local function released_score(band, seq) return (TOP - band) * RELEASED_SPAN + seq end

local function enqueue(model, queue_key, message, band)
  local lower = redis.call('ZRANGEBYSCORE', key('released', model),
                           num(released_score(band - 1, 0)), '+inf')
  for _, task in ipairs(lower) do
    local meta = meta_of(task)
    local raw = meta and redis.call('HGET', LEDGER, meta.tag)  -- gone once a worker took it
    local entry = raw and cjson.decode(raw)
    if entry and entry[1] == queue_key
        and redis.call('LINSERT', queue_key, 'AFTER', entry[2], message) > 0 then
      return
    end
  end
  redis.call('LPUSH', queue_key, message)
end

-- Push the next task onto the model's Celery queue as kombu's transport would (the same message
-- on the same list, in band order: enqueue above), with its ledger entry in the same step as
-- tasks/broker.py. Released for a host, it counts as that host's work until it ends (or starts
-- elsewhere).
local function release_one(model, now, aging, host)
  local c = choose(model, now, aging)
  if not c then return nil end
  local entry = redis.call('HGET', MESSAGES, c.task)
  local meta = meta_of(c.task)
  unqueue(model, c.tenant, c.task)
  if not entry or not meta then  -- half a task (not written by admit): drop it, charge nobody
    redis.call('HDEL', TASKS, c.task)
    return false
  end
  save_fair(model, c.tenant, c.base, c.n + 1, c.w)
  local state = key('state', model)
  redis.call('HSET', state, 'vsys', num(c.tag))
  local queue_key, message = unpack(cjson.decode(entry))
  local clock = redis.call('TIME')
  enqueue(model, queue_key, message, c.band)
  redis.call('HSET', LEDGER, meta.tag, entry)
  redis.call('ZADD', LEDGER_INDEX, clock[1] .. '.' .. string.format('%06d', clock[2]), meta.tag)
  local seq = redis.call('HINCRBY', state, 'seq', 1)
  redis.call('ZADD', key('released', model), num(released_score(c.band, seq)), c.task)
  meta.state, meta.at, meta.band = 'released', num(now), c.band
  if host then
    meta.host = host
    busy_add(host, model, c.task, now)
  end
  redis.call('HSET', TASKS, c.task, cjson.encode(meta))
  return c.task
end

-- A released or running task leaves the scheduler: it ended, or it is a leftover.
local function forget(task, meta, model)
  model = meta and meta.model or model
  redis.call('ZREM', key('released', model), task)
  redis.call('ZREM', key('running', model), task)
  if meta and meta.host then busy_remove(meta.host, model, task) end
  redis.call('HDEL', TASKS, task)
end

-- Forget released or running entries older than the horizon (a task deadline): their message
-- was given up by the ledger or their worker never reported; they must not hold depth forever.
-- Released entries are read in their order in line (by band first): one behind fresher entries
-- of a higher band is reached once those start. Once per model in a step: a step that admits
-- and then releases, or ends a task and then releases, does not look twice.
local pruned = {}
local function prune(model, horizon)
  if pruned[model] then return end
  pruned[model] = true
  local released = key('released', model)
  for _, task in ipairs(redis.call('ZRANGE', released, 0, STALE_BATCH - 1)) do
    local meta = meta_of(task)
    if meta and tonumber(meta.at) >= horizon then break end
    forget(task, meta, model)
  end
  local running = key('running', model)
  for _, task in ipairs(redis.call('ZRANGEBYSCORE', running, '-inf', '(' .. num(horizon),
                                   'LIMIT', 0, STALE_BATCH)) do
    forget(task, meta_of(task), model)
  end
end

-- The host takes on a model (a load on the Ollama host): counted as a switch.
local function activate(host, model, now)
  redis.call('SADD', HOSTS, host)
  redis.call('ZADD', key('host_models', host), now, model)
  redis.call('HSET', key('host', host), 'model', model, 'since', num(now))
  redis.call('HINCRBY', key('host', host), 'switches', 1)
end

local function resident(host)
  local k = tonumber(redis.call('HGET', key('host', host), 'resident')) or 1
  if k < 1 then return 1 end
  return k
end

local function depth(model)
  return redis.call('ZCARD', key('waiting', model)) + redis.call('ZCARD', key('released', model))
end

-- How many tasks start before this one, the clock stopped at now: every released task, then
-- what the release order above takes first. Per other tenant: its tasks in a higher band, and
-- those of its tasks in the same band whose (virtual time, score, name) sorts before this
-- one's (each tenant's virtual times rise with every release, so the band is a merge).
-- O(tenants × log n); no walk over the backlog.
local function position(task, now, aging)
  local meta = meta_of(task)
  if not meta then return nil end
  local model = meta.model
  if meta.state == 'released' then return redis.call('ZRANK', key('released', model), task) end
  if meta.state ~= 'pending' then return nil end
  local tenant = meta.tenant
  local score = tonumber(redis.call('ZSCORE', key('tenant', model, tenant), task))
  if not score then return nil end
  local bx = band(now, aging, score)
  local higher = bx < TOP and num(threshold(now, aging, bx + 1))
  local same = num(threshold(now, aging, bx))
  local ahead = redis.call('ZRANK', key('tenant', model, tenant), task)
  local base, n, w = fair(model, tenant)
  local tag = base + (n + ahead) / w
  local pos = redis.call('ZCARD', key('released', model)) + ahead
  for _, other in ipairs(redis.call('SMEMBERS', key('tenants', model))) do
    if other ~= tenant then
      local okey = key('tenant', model, other)
      local h = higher and redis.call('ZCOUNT', okey, '-inf', higher) or 0
      local m = redis.call('ZCOUNT', okey, '-inf', same) - h
      local k = 0
      if m > 0 then
        local ob, on, ow = fair(model, other)
        local function first(i)  -- does the other tenant's i-th task in this band go first?
          local t = ob + (on + h + i) / ow
          if t ~= tag then return t < tag end
          local s = tonumber(redis.call('ZRANGE', okey, h + i, h + i, 'WITHSCORES')[2])
          if s ~= score then return s < score end
          return other < tenant
        end
        local lo, hi = 0, m  -- first(i) holds for i < k and fails after: find k
        while lo < hi do
          local mid = math.floor((lo + hi) / 2)
          if first(mid) then lo = mid + 1 else hi = mid end
        end
        k = lo
      end
      pos = pos + h + k
    end
  end
  return pos
end
"""
)

# admit(a), a: task, model, tenant, priority, submitted_at, now, aging_s, default bound, ledger
# entry, delivery tag, horizon, with position ('' to skip it: a producer that does not report it).
# Returns {outcome, position, depth, bound, mean run time or ''}; outcome: admitted | full | known
# (admitted before: nothing changes, so a retried submit is harmless); position -1 when not asked.
ADMIT_FUNCTION = """
local function admit(a)
  local task, model, tenant = a[1], a[2], a[3]
  local now, aging = tonumber(a[6]), tonumber(a[7])
  local place = a[12] ~= ''
  prune(model, tonumber(a[11]))
  local bound = tonumber(redis.call('HGET', BOUNDS, model)) or tonumber(a[8])
  local d = depth(model)
  local service = redis.call('HGET', key('state', model), 'service_s') or ''
  if redis.call('HEXISTS', TASKS, task) == 1 then
    return {'known', place and position(task, now, aging) or -1, d, bound, service}
  end
  if d >= bound then return {'full', -1, d, bound, service} end
  local tkey = key('tenant', model, tenant)
  if redis.call('ZCARD', tkey) == 0 then
    -- the tenant becomes active: no earlier than the model's virtual time (no banked credit)
    local base, n, w = fair(model, tenant)
    local vsys = tonumber(redis.call('HGET', key('state', model), 'vsys'))
    if vsys and base + n / w < vsys then base, n = vsys, 0 end
    save_fair(model, tenant, base, n, w)
    redis.call('SADD', key('tenants', model), tenant)
  end
  local submitted = tonumber(a[5])
  redis.call('ZADD', tkey, num(submitted - tonumber(a[4]) * aging), task)
  redis.call('ZADD', key('waiting', model), a[5], task)
  redis.call('SADD', BACKLOGGED, model)
  redis.call('HSET', MESSAGES, task, a[9])
  redis.call('HSET', TASKS, task, cjson.encode({model = model, tenant = tenant, tag = a[10],
                                                state = 'pending', submitted = a[5]}))
  redis.call('SADD', MODELS, model)
  return {'admitted', place and position(task, now, aging) or -1, d + 1, bound, service}
end
"""

# ARGV: model, free slots, now, aging_s, horizon, capacity ('' for none). With a capacity (the
# model's slots over all its workers), at most capacity - released - running go, counted in the
# same step: releasers racing on one slot cannot both fill it. Returns the task ids, in order.
RELEASE = (
    PRELUDE
    + """
local model, now, aging = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
prune(model, tonumber(ARGV[5]))
local slots = tonumber(ARGV[2])
local capacity = tonumber(ARGV[6])
if capacity then
  local released = redis.call('ZCARD', key('released', model))
  slots = math.min(slots, capacity - released - redis.call('ZCARD', key('running', model)))
end
local out = {}
for _ = 1, slots do
  local task = release_one(model, now, aging)
  if task == nil then break end
  if task then table.insert(out, task) end
end
return out
"""
)

# release_for_host(a), a: host, its slots, now, aging_s, horizon, max model wait, and the models
# the host's workers serve, each with its slots over all live workers, as one argument:
# "model capacity model capacity ..." (tasks.scheduler.pending.Served).
#
# The host keeps up to `resident` models loaded (its hash; 1 unless learned). A loaded model
# keeps its place while it has pending work or tasks released for or running on this host.
# A model with pending work takes a place that is free, or that of a loaded model with nothing
# left to do here (the longest loaded first); once its oldest task has waited longer than the
# max model wait, it takes the place of the longest loaded model that has held it at least as
# long. Each model taken on counts as a switch (a load). Then the loaded models with pending
# work, oldest first, release into the host's free slots (its slots minus its released and
# running tasks), each within its capacity (minus its released and running tasks everywhere).
# Returns {the model taken on last (or the host's model), switches, task ids...}.
#
# Only the served models with work are read (pruned, their oldest pending task, their tasks
# here): those in the host's 'active' index and in BACKLOGGED. Every other served model has
# neither pending work nor tasks here, which is all the rules above ask of it: it is idle.
RELEASE_FOR_HOST_FUNCTION = """
local function release_for_host(a)
  local host, slots, now, aging = a[1], tonumber(a[2]), tonumber(a[3]), tonumber(a[4])
  local horizon, max_wait = tonumber(a[5]), tonumber(a[6])
  local akey, active = key('host_models', host), key('active', host)
  local caps, names = {}, {}
  for m, c in string.gmatch(a[7] or '', '(%S+) (%S+)') do
    caps[m] = tonumber(c)
    table.insert(names, m)
  end
  local served = {}  -- the served models with work, as read now
  local function visit(m)
    if served[m] then return end
    prune(m, horizon)
    local o = redis.call('ZRANGE', key('waiting', m), 0, 0, 'WITHSCORES')
    local here = redis.call('ZCARD', key('host_busy', host, m))
    if not o[2] then redis.call('SREM', BACKLOGGED, m) end  -- an index is only ever a hint
    if here == 0 then redis.call('SREM', active, m) end
    served[m] = {cap = caps[m], oldest = o[2] and tonumber(o[2]), here = here}
  end
  for _, m in ipairs(redis.call('SMEMBERS', active)) do
    if caps[m] then visit(m) end
  end
  if #names > 0 and #names <= redis.call('SCARD', BACKLOGGED) then
    local flags = redis.call('SMISMEMBER', BACKLOGGED, unpack(names))
    for i, m in ipairs(names) do
      if flags[i] == 1 then visit(m) end
    end
  else
    for _, m in ipairs(redis.call('SMEMBERS', BACKLOGGED)) do
      if caps[m] then visit(m) end
    end
  end
  local idle = {here = 0}
  local function state(m) return served[m] or idle end
  local loaded, count = {}, 0
  local raw = redis.call('ZRANGE', akey, 0, -1, 'WITHSCORES')
  for i = 1, #raw, 2 do
    if caps[raw[i]] then
      loaded[raw[i]], count = tonumber(raw[i + 1]), count + 1
    else
      redis.call('ZREM', akey, raw[i])  -- no longer served here
    end
  end
  local function in_use(m) return state(m).oldest ~= nil or state(m).here > 0 end
  local function older(x, y)
    if served[x].oldest ~= served[y].oldest then return served[x].oldest < served[y].oldest end
    return x < y
  end
  -- the loaded model to give up: the longest loaded one that qualifies
  local function victim(qualifies)
    local v
    for m, since in pairs(loaded) do
      if qualifies(m, since) and (not v or since < loaded[v] or (since == loaded[v] and m < v)) then
        v = m
      end
    end
    return v
  end
  local waiting = {}
  for m, s in pairs(served) do
    if s.oldest and not loaded[m] then table.insert(waiting, m) end
  end
  table.sort(waiting, older)
  local k, switches = resident(host), 0
  local last = redis.call('HGET', key('host', host), 'model') or ''
  for _, m in ipairs(waiting) do
    if count >= k then
      local v = victim(function(x) return not in_use(x) end)
      if not v and now - served[m].oldest > max_wait then
        v = victim(function(_, since) return now - since >= max_wait end)
      end
      if not v then break end
      loaded[v], count = nil, count - 1
      redis.call('ZREM', akey, v)
    end
    loaded[m], count = now, count + 1
    activate(host, m, now)
    switches, last = switches + 1, m
  end
  local free = slots
  for _, s in pairs(served) do free = free - s.here end
  local ready = {}
  for m in pairs(loaded) do
    if state(m).oldest then table.insert(ready, m) end
  end
  table.sort(ready, older)
  local out = {last, switches}
  for _, m in ipairs(ready) do
    if free <= 0 then break end
    local room = served[m].cap - redis.call('ZCARD', key('released', m))
      - redis.call('ZCARD', key('running', m))
    for _ = 1, math.min(free, room) do
      local task = release_one(m, now, aging, host)
      if task == nil then break end
      if task then
        table.insert(out, task)
        free = free - 1
      end
    end
  end
  return out
end
"""

# ARGV: host, now, resident ('' to keep), then the models its /api/ps lists. Records how many
# models the host keeps loaded, and, unless tasks are released for or run on its loaded
# models (then the scheduler's own dispatch is the truer picture), what it has loaded. Not a
# switch: the scheduler caused no load.
NOTE_LOADED = (
    PRELUDE
    + """
local host, now = ARGV[1], tonumber(ARGV[2])
local hkey, akey = key('host', host), key('host_models', host)
if ARGV[3] ~= '' or #ARGV >= 4 then redis.call('SADD', HOSTS, host) end
if ARGV[3] ~= '' then redis.call('HSET', hkey, 'resident', ARGV[3]) end
for _, m in ipairs(redis.call('ZRANGE', akey, 0, -1)) do
  if redis.call('ZCARD', key('host_busy', host, m)) > 0 then return 0 end
end
redis.call('DEL', akey)
for i = 4, #ARGV do redis.call('ZADD', akey, now, ARGV[i]) end
if #ARGV >= 4 then redis.call('HSET', hkey, 'model', ARGV[4], 'since', num(now)) end
return 1
"""
)

# ARGV: host. Rebuilds the indexes that release_for_host reads from what they index: BACKLOGGED
# over every model that had pending work, and the host's 'active' set over those and the models
# it keeps loaded. Data written before the indexes existed (or by an older producer) is found
# this way. Returns how many entries were wrong.
REINDEX = (
    PRELUDE
    + """
local host = ARGV[1]
local active = key('active', host)
local models = redis.call('SUNION', MODELS, BACKLOGGED, active)
for _, m in ipairs(redis.call('ZRANGE', key('host_models', host), 0, -1)) do
  table.insert(models, m)
end
local wrong = 0
for _, m in ipairs(models) do
  if redis.call('EXISTS', key('waiting', m)) == 1 then
    wrong = wrong + redis.call('SADD', BACKLOGGED, m)
  else
    wrong = wrong + redis.call('SREM', BACKLOGGED, m)
  end
  if redis.call('EXISTS', key('host_busy', host, m)) == 1 then
    wrong = wrong + redis.call('SADD', active, m)
  else
    wrong = wrong + redis.call('SREM', active, m)
  end
end
return wrong
"""
)

# ARGV: task, now, aging_s. Returns {position, running tasks of its model, mean run time or
# '', model, state (pending or released)}, or false once started or unknown: all that an ETA
# needs, in one step.
POSITION = (
    PRELUDE
    + """
local pos = position(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
if not pos then return false end
local meta = meta_of(ARGV[1])
return {pos, redis.call('ZCARD', key('running', meta.model)),
        redis.call('HGET', key('state', meta.model), 'service_s') or '', meta.model, meta.state}
"""
)

# For other scripts (a cancel, tasks/lifecycle.py): drop_pending(task) takes a pending task out
# of the scheduler, so that it is never released. Returns the state it had, or false.
DROP_PENDING = (
    PRELUDE
    + """
local function drop_pending(task)
  local meta = meta_of(task)
  if not meta then return false end
  if meta.state == 'pending' then
    unqueue(meta.model, meta.tenant, task)
    redis.call('HDEL', TASKS, task)
  end
  return meta.state
end
"""
)

# Purge a model's pending work (tasks/queues.py purge_model): every pending task leaves the
# scheduler and ends as cancelled, in one step. ARGV: tasks.broker.end_task_args(), then the
# model. Returns the ids of the tasks ended.
PURGE_PENDING = (
    DROP_PENDING
    + END_TASK_LUA
    + """
local ended = {}
for _, task in ipairs(redis.call('ZRANGE', key('waiting', ARGV[8]), 0, -1)) do
  drop_pending(task)
  if end_task(task) then table.insert(ended, task) end
end
return ended
"""
)

# ARGV: task. Removes a pending task; returns its state before: pending (now removed),
# released, running, or false when unknown.
CANCEL = (
    DROP_PENDING
    + """
return drop_pending(ARGV[1])
"""
)

# started(task, now, host), host '' if unknown. A worker starts the task: it leaves the
# released set for the running one, and counts as its host's work. A pending task started
# anyway (its message sent outside the scheduler, e.g. a retried publish) leaves the pending
# structures, so it cannot be released and run a second time. A task not released for its host
# (released for another, or started without a release) of a model the host had not loaded makes
# the host load it: the host takes the model on (learned from dispatch). A released task's wait
# since submission is counted in the histogram of the band it was released in, once (a
# redelivered task that starts again is running already).
# Returns the model, or false for a task the scheduler does not know.
STARTED_FUNCTION = """
local function started(task, now, host)
  local meta = meta_of(task)
  if not meta then return false end
  local model = meta.model
  if meta.state == 'pending' then unqueue(model, meta.tenant, task) end
  if meta.state == 'released' and meta.band and meta.submitted then
    observe_wait(meta.band, math.max(0, tonumber(now) - tonumber(meta.submitted)))
  end
  redis.call('ZREM', key('released', model), task)
  redis.call('ZADD', key('running', model), now, task)
  if host ~= '' and meta.host ~= host then
    if meta.host then busy_remove(meta.host, model, task) end
    meta.host = host
    local akey = key('host_models', host)
    if not redis.call('ZSCORE', akey, model) then
      if redis.call('ZCARD', akey) >= resident(host) then
        redis.call('ZREMRANGEBYRANK', akey, 0, redis.call('ZCARD', akey) - resident(host))
      end
      activate(host, model, tonumber(now))
    end
  end
  if meta.host then busy_add(meta.host, model, task, now) end
  meta.state, meta.at = 'running', now
  redis.call('HSET', TASKS, task, cjson.encode(meta))
  return model
end
"""

# finished(a), a: task, model, run seconds ('' if unknown), now, EWMA weight. Ends the task's
# entry (pending, released or running) and folds its run time into the model's mean
# (service_s). Returns the new mean, or false.
FINISHED_FUNCTION = """
local function finished(a)
  local task, model = a[1], a[2]
  local meta = meta_of(task)
  local run = tonumber(a[3])
  if meta then
    if not run and meta.state == 'running' then run = tonumber(a[4]) - tonumber(meta.at) end
    model = meta.model
    if meta.state == 'pending' then unqueue(model, meta.tenant, task) end
  end
  forget(task, meta, model)
  if not run or run < 0 then return false end
  local state = key('state', model)
  local mean = tonumber(redis.call('HGET', state, 'service_s'))
  local alpha = tonumber(a[5])
  if mean then mean = alpha * run + (1 - alpha) * mean else mean = run end
  redis.call('HSET', state, 'service_s', num(mean))
  return num(mean)
end
"""

# A running task takes the next pending tasks of its model along into its own calls (tasks/
# take_along.py): each leaves the scheduler as if released and started at once, charged to its
# tenant and counted in the wait histogram, but holds no slot (the running task's covers its
# share of the calls) and is never pushed onto Celery's queue. Its message is recorded as
# delivered and unacknowledged, as kombu's transport records a message it hands to a worker,
# so a worker that dies with it lets it go back to its queue after the visibility timeout.
# KEYS: kombu's unacked hash and its index. ARGV: model, now, aging_s, horizon, the Celery task
# name taken (the pending order stops at a task of another name), the header that says how many
# units a task brings (its inputs; 1 without it), and the most units to take.
# Returns the taken tasks' ledger entries ([queue key, message]), in order.
TAKE_ALONG = (
    PRELUDE
    + """
local model, now, aging = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
prune(model, tonumber(ARGV[4]))
local name, units_header, room = ARGV[5], ARGV[6], tonumber(ARGV[7])
local taken = {}
while room > 0 do
  local c = choose(model, now, aging)
  if not c then break end
  local entry = redis.call('HGET', MESSAGES, c.task)
  local meta = meta_of(c.task)
  if not entry or not meta then break end  -- half a task: release_one drops it
  local message = cjson.decode(entry)[2]
  local m = cjson.decode(message)
  local h, p = m.headers, m.properties
  if type(h) ~= 'table' or h.task ~= name or type(p) ~= 'table' or type(h.id) ~= 'string'
      or type(p.delivery_info) ~= 'table' or type(p.delivery_tag) ~= 'string' then
    break
  end
  if (h.eta and h.eta ~= cjson.null) or (h.expires and h.expires ~= cjson.null) then break end
  local units = tonumber(h[units_header]) or 1
  if units > room then break end
  room = room - units
  unqueue(model, c.tenant, c.task)
  save_fair(model, c.tenant, c.base, c.n + 1, c.w)
  redis.call('HSET', key('state', model), 'vsys', num(c.tag))
  observe_wait(c.band, math.max(0, now - (tonumber(meta.submitted) or now)))
  redis.call('HDEL', TASKS, c.task)
  local info = p.delivery_info
  redis.call('HSET', KEYS[1], p.delivery_tag, '[' .. message .. ',' .. cjson.encode(info.exchange)
    .. ',' .. cjson.encode(info.routing_key) .. ']')
  redis.call('ZADD', KEYS[2], num(now), p.delivery_tag)
  table.insert(taken, entry)
end
return taken
"""
)

# The steps as scripts, each ARGV as its function's arguments.
ADMIT = PRELUDE + ADMIT_FUNCTION + "return admit(ARGV)\n"
RELEASE_FOR_HOST = PRELUDE + RELEASE_FOR_HOST_FUNCTION + "return release_for_host(ARGV)\n"
STARTED = PRELUDE + STARTED_FUNCTION + "return started(ARGV[1], ARGV[2], ARGV[3])\n"
FINISHED = PRELUDE + FINISHED_FUNCTION + "return finished(ARGV)\n"

# A worker's task ends (its lease end comes first, tasks/lifecycle.py): finished, then release
# into the slot it freed, in one step. finish_and_release(ARGV from i): FINISHED's 5 arguments,
# then RELEASE_FOR_HOST's, or none when the worker's host is not in the plan. Returns
# RELEASE_FOR_HOST's answer, or {} without a release.
FINISH_AND_RELEASE_FUNCTION = (
    FINISHED_FUNCTION
    + RELEASE_FOR_HOST_FUNCTION
    + """
local function finish_and_release(i)
  finished({unpack(ARGV, i, i + 4)})
  if #ARGV < i + 5 then return {} end
  return release_for_host({unpack(ARGV, i + 5)})
end
"""
)
FINISH_AND_RELEASE = PRELUDE + FINISH_AND_RELEASE_FUNCTION + "return finish_and_release(1)\n"

# A producer admits a task and releases what has room, in one step. ARGV, in sections:
# - ADMIT's 12 arguments;
# - the oldest sighting of the model that counts as served, and as offered (tasks/scheduler/
#   served.py), or two '' to skip the check: an unserved model is refused;
# - the task record (tasks.keys.task_key; '' for none), its TTL, the count of its field/value
#   pairs and the pairs: written, and the model added to the submitted models, unless refused
#   (a retry changes nothing; its state, once set, is kept);
# - the count of held task-sent events, each as (topic, message): published once the task is
#   admitted for the first time;
# - for each host serving the model, the count of its RELEASE_FOR_HOST arguments and those.
# Returns ADMIT's answer (outcome unserved, too), then the ids of the tasks released.
ADMIT_AND_RELEASE = (
    PRELUDE
    + ADMIT_FUNCTION
    + RELEASE_FOR_HOST_FUNCTION
    + """
local model = ARGV[2]
if ARGV[13] ~= '' then
  local served = tonumber(redis.call('ZSCORE', SERVED, model))
  local offered = tonumber(redis.call('ZSCORE', OFFERED, model))
  if (served or 0) < tonumber(ARGV[13]) and (offered or 0) < tonumber(ARGV[14]) then
    return {'unserved', -1, 0, 0, ''}
  end
end
local answer = admit({unpack(ARGV, 1, 12)})
if answer[1] == 'full' then return answer end
local record, fields = ARGV[15], tonumber(ARGV[17])
local i = 18 + 2 * fields
if record ~= '' then
  if fields > 0 then redis.call('HSET', record, unpack(ARGV, 18, i - 1)) end
  redis.call('HSETNX', record, 'state', 'queued')
  redis.call('EXPIRE', record, ARGV[16])
  redis.call('SADD', SUBMITTED, model)
end
local events = tonumber(ARGV[i])
if answer[1] == 'admitted' then
  for e = i + 1, i + 2 * events, 2 do redis.call('PUBLISH', ARGV[e], ARGV[e + 1]) end
end
i = i + 2 * events + 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local step = release_for_host({unpack(ARGV, i + 1, i + n)})
  for t = 3, #step do table.insert(answer, step[t]) end
  i = i + n + 1
end
return answer
"""
)
