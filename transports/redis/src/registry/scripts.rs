//! The Lua scripts that change the registry: each runs atomically on the server, so a
//! reader never sees half a registration, and many sweepers report a death once.
//!
//! Every script takes no KEYS and builds its key names from `ARGV[1]`, the key prefix
//! (`{namespace}:reg:`): generated ids are only known inside the script. This is fine
//! for a standalone server or a replicated primary, not for Redis Cluster.

/// Registers a machine.
///
/// ARGV: prefix, id (empty: generate), type, host, process, context (empty: none),
/// has_version (`0`/`1`), version, accepts (JSON), metadata (JSON), ttl_ms, grace_ms,
/// origin, then 4 candidate 8-hex suffixes for a generated id.
/// Returns `{"ok", id, gen, event seq}`, `{"dup", id, 0, 0}` or `{"collide", "", 0, 0}`.
pub(crate) fn register() -> String {
    format!(
        "{KEEP_FN}\n{PUBLISH_FN}\n{}",
        r#"
local p = ARGV[1]
local id = ARGV[2]
local t = ARGV[3]
local n = redis.call('HINCRBY', p .. 'typeseq', t, 1)
if id == '' then
  for i = 14, 17 do
    local cand = t .. '-' .. n .. '-' .. ARGV[i]
    if redis.call('EXISTS', p .. 'm:' .. cand) == 0 then
      id = cand
      break
    end
  end
  if id == '' then return {'collide', '', 0, 0} end
elseif redis.call('EXISTS', p .. 'm:' .. id) == 1 then
  return {'dup', id, 0, 0}
end
local seq = redis.call('INCR', p .. 'seq')
local e = {
  id = id, type = t, host = ARGV[4], process = ARGV[5],
  accepts = ARGV[9], metadata = ARGV[10], ttl_ms = ARGV[11], grace_ms = ARGV[12],
  seq = tostring(seq)
}
if ARGV[6] ~= '' then e.context = ARGV[6] end
if ARGV[7] == '1' then e.version = ARGV[8] end
local flat = {}
for k, v in pairs(e) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', p .. 'm:' .. id, unpack(flat))
redis.call('ZADD', p .. 'machines', seq, id)
redis.call('ZADD', p .. 'type:' .. t, seq, id)
redis.call('SADD', p .. 'types', t)
redis.call('SET', p .. 'alive:' .. id, ARGV[13], 'PX', tonumber(ARGV[11]))
redis.call('DEL', p .. 'down:' .. id)
local gen = redis.call('INCR', p .. 'gen')
keep(p, id, t, 2 * tonumber(ARGV[11]) + tonumber(ARGV[12]))
local ev = publish(p, {kind = 'joined', origin = ARGV[13], gen = gen, entry = e})
return {'ok', id, gen, ev}
"#
    )
}

/// Housekeeping: the keys a live machine needs expire `ms` after its last registration or
/// heartbeat (2 × TTL + grace), so a namespace whose processes are all gone, and that no
/// sweeper tidies any more, leaves nothing behind. Only ever extends an expiry.
const KEEP_FN: &str = r#"
local function keep(p, id, t, ms)
  local keys = {p .. 'm:' .. id, p .. 'machines', p .. 'type:' .. t, p .. 'types',
    p .. 'typeseq', p .. 'seq', p .. 'gen', p .. 'evseq'}
  for _, k in ipairs(keys) do
    local cur = redis.call('PTTL', k)
    if cur == -1 or (cur >= 0 and cur < ms) then
      redis.call('PEXPIRE', k, ms)
    end
  end
end
"#;

/// Publishes an event with the next event sequence number, which it returns: events are
/// numbered in the order the server made the changes.
const PUBLISH_FN: &str = r#"
local function publish(p, ev)
  local n = redis.call('INCR', p .. 'evseq')
  ev.v = 1
  ev.seq = n
  redis.call('PUBLISH', p .. 'events', cjson.encode(ev))
  return n
end
"#;

/// Removes one machine and its index entries (returns the new gen and the event
/// sequence number, or false when the machine was not registered); shared by deregister and the sweeper.
const REMOVE_FN: &str = r#"
local function remove(p, id, origin, reason)
  local t = redis.call('HGET', p .. 'm:' .. id, 'type')
  if not t then
    redis.call('ZREM', p .. 'machines', id)
    redis.call('DEL', p .. 'alive:' .. id, p .. 'down:' .. id)
    return false
  end
  redis.call('DEL', p .. 'm:' .. id, p .. 'alive:' .. id, p .. 'down:' .. id)
  redis.call('ZREM', p .. 'machines', id)
  redis.call('ZREM', p .. 'type:' .. t, id)
  if redis.call('ZCARD', p .. 'type:' .. t) == 0 then
    redis.call('SREM', p .. 'types', t)
  end
  local gen = redis.call('INCR', p .. 'gen')
  local ev = publish(p, {kind = 'left', origin = origin, gen = gen, id = id, reason = reason})
  return gen, ev
end
"#;

/// Deregisters a machine. ARGV: prefix, id, origin. Returns `{gen, event seq}`, or
/// `{0, 0}` when the machine is not registered.
pub(crate) fn deregister() -> String {
    format!(
        "{PUBLISH_FN}\n{REMOVE_FN}\nlocal g, ev = remove(ARGV[1], ARGV[2], ARGV[3], 'deregistered')\nif g then return {{g, ev}} end\nreturn {{0, 0}}\n"
    )
}

/// Heartbeat. ARGV: prefix, id, origin.
/// Returns `{0, 0}` when the machine is not registered, `{1, 0}` when refreshed,
/// `{2, event seq}` when it was reported unhealthy and is healthy again (then `health`
/// true is published).
pub(crate) fn heartbeat() -> String {
    format!(
        "{KEEP_FN}\n{PUBLISH_FN}\n{}",
        r#"
local p = ARGV[1]
local id = ARGV[2]
local f = redis.call('HMGET', p .. 'm:' .. id, 'ttl_ms', 'grace_ms', 'type')
if not f[1] then return {0, 0} end
local ttl = tonumber(f[1]) or 1000
redis.call('SET', p .. 'alive:' .. id, ARGV[3], 'PX', ttl)
keep(p, id, f[3] or '', 2 * ttl + (tonumber(f[2]) or 0))
if redis.call('DEL', p .. 'down:' .. id) == 1 then
  return {2, publish(p, {kind = 'health', origin = ARGV[3], id = id, healthy = true})}
end
return {1, 0}
"#
    )
}

/// One sweep. ARGV: prefix, origin, lock_ms.
///
/// At most one sweep per `lock_ms` does the work, whichever process gets there first.
/// A machine without its alive key is reported unhealthy once (the `down:` marker keeps
/// the server time of the report); `grace_ms` after that it is removed.
/// Returns a flat list of `kind, id` pairs (`down` or `left`).
pub(crate) fn sweep() -> String {
    format!(
        "{PUBLISH_FN}\n{REMOVE_FN}\n{}",
        r#"
local p = ARGV[1]
local origin = ARGV[2]
if not redis.call('SET', p .. 'sweep', origin, 'NX', 'PX', tonumber(ARGV[3])) then
  return {}
end
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
local ids = redis.call('ZRANGE', p .. 'machines', 0, -1)
for _, id in ipairs(ids) do
  if redis.call('EXISTS', p .. 'alive:' .. id) == 0 then
    local down = redis.call('GET', p .. 'down:' .. id)
    if not down then
      local f = redis.call('HMGET', p .. 'm:' .. id, 'ttl_ms', 'grace_ms')
      local horizon = 2 * (tonumber(f[1]) or 0) + (tonumber(f[2]) or 0) + 1000
      redis.call('SET', p .. 'down:' .. id, tostring(now), 'PX', horizon)
      publish(p, {kind = 'health', origin = origin, id = id, healthy = false})
      out[#out + 1] = 'down'
      out[#out + 1] = id
    else
      local grace = tonumber(redis.call('HGET', p .. 'm:' .. id, 'grace_ms') or '0') or 0
      if now - (tonumber(down) or 0) >= grace then
        if remove(p, id, origin, 'expired') then
          out[#out + 1] = 'left'
          out[#out + 1] = id
        end
      end
    end
  end
end
return out
"#
    )
}

/// Reads the entries of the given types. ARGV: prefix, types...
/// Returns one flat field/value list per machine (any order; callers sort by `seq`).
pub(crate) const FETCH_TYPES: &str = r#"
local p = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local ids = redis.call('ZRANGE', p .. 'type:' .. ARGV[i], 0, -1)
  for _, id in ipairs(ids) do
    local h = redis.call('HGETALL', p .. 'm:' .. id)
    if #h > 0 then out[#out + 1] = h end
  end
end
return out
"#;
