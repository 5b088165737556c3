//! The Redis state store, shared by every baton worker of a deployment.
//!
//! Keys of room `R` (the `{R}` hash tag keeps a room's keys in one Redis Cluster slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `baton:{R}:record` | string | JSON [`RoomRecord`] |
//! | `baton:{R}:ckpt` | hash | agent name → owner length (4 bytes LE), owner, base checkpoint |
//! | `baton:{R}:lease` | string, PX = lease TTL | `<token>:<expires_ms>:<holder>` |
//! | `baton:{R}:token` | integer | the last fencing token handed out |
//! | `baton:rooms` | sorted set | room → epoch ms of its last write |
//!
//! Every room key gets the store's TTL again on each write, so a room's state disappears a TTL
//! after its last write; the sorted set is trimmed of rooms older than that on every
//! [`rooms`](StateStore::rooms). Writes and lease changes are Lua scripts, so the fencing check,
//! the byte cap and the write are one atomic step. The connection is redis-rs's
//! `ConnectionManager`, made lazily and reconnecting by itself; every command is bounded by
//! [`RESPONSE_TIMEOUT`], so a Redis that is down fails a call quickly instead of holding it.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Acquired, Lease, RoomRecord, Snapshot, StateError, StateStore, Write, epoch_ms};

/// Longest wait for one command's answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

const ROOMS: &str = "baton:rooms";

/// KEYS: lease, record, ckpt, token, rooms. ARGV: token, kind (record|ckpt|forget), field,
/// value, cap, ttl ms, now ms, room. Returns {status, detail}: {"ok", bytes}, {"fenced",
/// current token}, {"full", bytes needed}.
const WRITE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local tok = string.match(v, '^(%d+):')
  if tok ~= ARGV[1] then return {'fenced', tok or '0'} end
end
if ARGV[2] == 'forget' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[8])
  return {'ok', '0'}
end
local used = string.len(ARGV[4])
if ARGV[2] == 'ckpt' then used = used + string.len(ARGV[3]) + redis.call('STRLEN', KEYS[2]) end
for _, f in ipairs(redis.call('HKEYS', KEYS[3])) do
  if ARGV[2] == 'record' or f ~= ARGV[3] then
    used = used + string.len(f) + redis.call('HSTRLEN', KEYS[3], f)
  end
end
if used > tonumber(ARGV[5]) then return {'full', tostring(used)} end
if ARGV[2] == 'record' then
  redis.call('SET', KEYS[2], ARGV[4])
else
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
end
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[8])
return {'ok', tostring(used)}
";

/// KEYS: lease, token, rooms. ARGV: holder, lease ttl ms, expires ms, room ttl ms, now ms,
/// room. Returns {1, lease} when the caller holds the lease now, {0, lease} when another does.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local tok, holder = string.match(v, '^(%d+):%d+:(.*)$')
  if holder ~= ARGV[1] then return {0, v} end
  local nv = tok .. ':' .. ARGV[3] .. ':' .. ARGV[1]
  redis.call('SET', KEYS[1], nv, 'PX', ARGV[2])
  return {1, nv}
end
local tok = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local nv = tostring(tok) .. ':' .. ARGV[3] .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], nv, 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
return {1, nv}
";

/// KEYS: lease. ARGV: `<token>:` prefix, holder. Deletes the lease if it is that holder's.
const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] and string.match(v, '^%d+:%d+:(.*)$') == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// The ACQUIRE script's answer, `{held, lease}`, for `room`.
fn acquired(room: &str, (held, lease): (i64, String)) -> Result<Acquired, StateError> {
    let lease = parse_lease(&lease)
        .ok_or_else(|| StateError::Corrupt { room: room.into(), reason: format!("lease {lease:?}") })?;
    Ok(if held == 1 { Acquired::Held(lease) } else { Acquired::Busy(lease) })
}

/// Room state in Redis. Cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    room_bytes: u64,
    ttl: Duration,
    write: std::sync::Arc<redis::Script>,
    acquire: std::sync::Arc<redis::Script>,
    release: std::sync::Arc<redis::Script>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("room_bytes", &self.room_bytes).field("ttl", &self.ttl).finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn key(room: &str, what: &str) -> String {
    format!("baton:{{{room}}}:{what}")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses `<token>:<expires_ms>:<holder>`.
fn parse_lease(v: &str) -> Option<Lease> {
    let mut parts = v.splitn(3, ':');
    let token = parts.next()?.parse().ok()?;
    let expires_at_ms = parts.next()?.parse().ok()?;
    let holder = parts.next()?.to_owned();
    Some(Lease { holder, token, expires_at_ms })
}

impl RedisStore {
    /// A store at `url` (`redis://[:password@]host:port[/db]`). Connects lazily: a Redis that
    /// is down now makes the first calls fail with [`StateError::Unavailable`], not this one.
    /// Errors: the URL is not a Redis URL.
    pub fn new(url: &str, room_bytes: u64, ttl: Duration) -> Result<Self, StateError> {
        let client = redis::Client::open(url).map_err(|e| unavailable(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        Ok(RedisStore {
            conn,
            room_bytes,
            ttl,
            write: std::sync::Arc::new(redis::Script::new(WRITE)),
            acquire: std::sync::Arc::new(redis::Script::new(ACQUIRE)),
            release: std::sync::Arc::new(redis::Script::new(RELEASE)),
        })
    }

    /// The ACQUIRE script called for `room`'s lease, for `holder`, at `now` (epoch ms).
    fn acquire_invocation(
        &self,
        room: &str,
        holder: &str,
        ttl: Duration,
        now: u64,
    ) -> redis::ScriptInvocation<'_> {
        let mut call = self.acquire.key(key(room, "lease"));
        call.key(key(room, "token"))
            .key(ROOMS)
            .arg(holder)
            .arg(ms(ttl).max(1))
            .arg(now.saturating_add(ms(ttl)))
            .arg(ms(self.ttl))
            .arg(now)
            .arg(room);
        call
    }
}

impl StateStore for RedisStore {
    async fn write(&self, room: &str, token: u64, write: &Write) -> Result<(), StateError> {
        let (kind, field, value) = match write {
            Write::Record(r) => ("record", String::new(), serde_json::to_vec(r).map_err(unavailable)?),
            Write::Checkpoint { agent, owner, payload } => {
                ("ckpt", agent.clone(), super::encode_checkpoint(owner, payload))
            }
            Write::Forget => ("forget", String::new(), Vec::new()),
        };
        let mut conn = self.conn.clone();
        let (status, detail): (String, String) = self
            .write
            .key(key(room, "lease"))
            .key(key(room, "record"))
            .key(key(room, "ckpt"))
            .key(key(room, "token"))
            .key(ROOMS)
            .arg(token)
            .arg(kind)
            .arg(field)
            .arg(value)
            .arg(self.room_bytes)
            .arg(ms(self.ttl))
            .arg(epoch_ms())
            .arg(room)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        match status.as_str() {
            "ok" => Ok(()),
            "fenced" => Err(StateError::Fenced {
                room: room.into(),
                current: detail.parse().unwrap_or(0),
                ours: token,
            }),
            "full" => Err(StateError::Full {
                room: room.into(),
                needed: detail.parse().unwrap_or(u64::MAX),
                cap: self.room_bytes,
            }),
            other => Err(unavailable(format!("unexpected answer from the write script: {other}"))),
        }
    }

    async fn load(&self, room: &str) -> Result<Snapshot, StateError> {
        let mut conn = self.conn.clone();
        type Stored = (Option<Vec<u8>>, BTreeMap<String, Vec<u8>>, Option<String>);
        let (record, ckpt, lease): Stored = redis::pipe()
            .get(key(room, "record"))
            .hgetall(key(room, "ckpt"))
            .get(key(room, "lease"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let corrupt = |reason: String| StateError::Corrupt { room: room.into(), reason };
        let record = match record {
            Some(v) => {
                Some(serde_json::from_slice::<RoomRecord>(&v).map_err(|e| corrupt(format!("record: {e}")))?)
            }
            None => None,
        };
        let mut checkpoints = BTreeMap::new();
        for (agent, v) in ckpt {
            let decoded =
                super::decode_checkpoint(&v).ok_or_else(|| corrupt(format!("checkpoint of {agent}")))?;
            checkpoints.insert(agent, decoded);
        }
        let lease = lease.as_deref().and_then(parse_lease);
        Ok(Snapshot { record, checkpoints, lease })
    }

    async fn acquire(&self, room: &str, holder: &str, ttl: Duration) -> Result<Acquired, StateError> {
        let mut conn = self.conn.clone();
        let answer: (i64, String) = self
            .acquire_invocation(room, holder, ttl, epoch_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        acquired(room, answer)
    }

    async fn acquire_many(
        &self,
        leases: &[super::LeaseAsk],
    ) -> Result<Vec<Result<Acquired, StateError>>, StateError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = epoch_ms();
        let mut pipe = redis::pipe();
        // Each call's error is its room's alone (a key of the wrong type), not the batch's.
        pipe.ignore_errors();
        // SCRIPT LOAD first: EVALSHA in a pipeline is not retried as EVAL on NOSCRIPT (a Redis
        // restarted since the script was last used has forgotten it).
        pipe.load_script(&self.acquire).ignore();
        for ask in leases {
            pipe.invoke_script(&self.acquire_invocation(&ask.room, &ask.holder, ask.ttl, now));
        }
        let mut conn = self.conn.clone();
        let answers: Vec<redis::RedisResult<(i64, String)>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        if answers.len() != leases.len() {
            return Err(unavailable(format!("{} answers to {} lease renewals", answers.len(), leases.len())));
        }
        Ok(leases
            .iter()
            .zip(answers)
            .map(|(ask, answer)| match answer {
                Ok(answer) => acquired(&ask.room, answer),
                Err(e) => Err(StateError::Corrupt { room: ask.room.clone(), reason: e.to_string() }),
            })
            .collect())
    }

    async fn release(&self, room: &str, holder: &str, token: u64) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(key(room, "lease"))
            .arg(format!("{token}:"))
            .arg(holder)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn rooms(&self) -> Result<super::RoomLeases, StateError> {
        let mut conn = self.conn.clone();
        let cutoff = epoch_ms().saturating_sub(ms(self.ttl));
        let (rooms,): (Vec<String>,) = redis::pipe()
            .zrembyscore(ROOMS, "-inf", format!("({cutoff}"))
            .ignore()
            .zrange(ROOMS, 0, -1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = rooms.iter().map(|r| key(r, "lease")).collect();
        let leases: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await.map_err(unavailable)?;
        Ok(rooms.into_iter().zip(leases).map(|(r, l)| (r, l.as_deref().and_then(parse_lease))).collect())
    }
}
