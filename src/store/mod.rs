//! Durable room state (issue 14): what a baton that comes back to a room needs, behind one
//! trait, [`StateStore`], with two implementations:
//!
//! - [`EmbeddedStore`]: a file on the worker's machine (redb, an ACID key-value store with a
//!   crash-safe commit), the default; a restarted `baton worker` on the same machine finds its
//!   rooms there.
//! - [`RedisStore`]: Redis, shared by every worker of a deployment; keys scoped per room, each
//!   with a TTL, and a byte cap per room.
//!
//! What is kept per room ([`Snapshot`]): a [`RoomRecord`] (the floor holder, the handoff or
//! recovery under way and its phase, the last lines of the handoff timeline), the merged
//! checkpoint of each agent name (as a base `baton.checkpoint/1` payload, which the relay applies
//! again on restore), and the room's [`Lease`]: which baton coordinates it, with a fencing token
//! that grows with every new holder, so exactly one baton writes a room's state at a time.
//!
//! The room task never does store IO itself: it sends requests to the worker's store task
//! ([`StoreHandle`], [`spawn`]) and gets the answers back as messages. A write the backend could
//! not take (Redis restarted, disk full) is kept by the store task, latest state per key, and
//! retried every [`RETRY_EVERY`] until it is taken; the answer to each request goes out when its
//! state (or a later one of the same key) is durable. Meanwhile the store is *degraded*
//! (`baton_store_degraded` = 1, every failure counted in `baton_store_errors_total`) and the
//! rooms keep coordinating from memory.

mod embedded;
mod redis;
mod task;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;
pub use task::{Reply, Request, RoomStoreClient, StoreHandle, StoreSignal, StoreStatus, spawn};

/// How often the store task retries writes the backend did not take.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Lines of the handoff timeline kept per room (the newest).
pub const TIMELINE_LINES: usize = 64;

/// The floor holder as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorRecord {
    /// Participant identity of the agent that holds the floor.
    pub identity: String,
    /// Its agent name (`lk.agent.name`).
    pub agent: String,
}

/// A handoff or recovery under way, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffRecord {
    /// The handoff's id (`h-...`, `r-...` for a recovery).
    pub id: String,
    /// Identity of the agent handing off (or the crashed one).
    pub source: String,
    /// The target's agent name.
    pub target: String,
    /// Identity of the target, once one was chosen.
    pub target_identity: Option<String>,
    /// The last phase the timeline reached (`requested`, `bundle_received`, ...; the floor
    /// timeline's phase names).
    pub phase: String,
}

/// What is stored about a room besides its checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    /// Who holds the floor (None: nobody yet, or between a release and an activation).
    pub floor: Option<FloorRecord>,
    /// The handoff or recovery under way.
    pub handoff: Option<HandoffRecord>,
    /// The newest lines of the handoff timeline (JSON lines, oldest first), at most
    /// [`TIMELINE_LINES`].
    pub timeline: Vec<String>,
    /// Worker identity (`--agent-name` plus process) of the baton that wrote this, for operators.
    pub written_by: String,
    /// When it was written, Unix epoch milliseconds.
    pub updated_at_ms: u64,
}

impl RoomRecord {
    /// Appends a timeline line, dropping the oldest beyond [`TIMELINE_LINES`].
    pub fn push_timeline(&mut self, line: String) {
        self.timeline.push(line);
        let over = self.timeline.len().saturating_sub(TIMELINE_LINES);
        self.timeline.drain(..over);
    }
}

/// Which baton coordinates a room, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's id: unique per baton job (worker id and job id).
    pub holder: String,
    /// Fencing token: grows by one with every new holder of the room, never reused. Writes carry
    /// it, and the store refuses writes with an older one ([`StateError::Fenced`]).
    pub token: u64,
    /// When it lapses unless renewed, Unix epoch milliseconds.
    pub expires_at_ms: u64,
}

/// One lease [`StateStore::acquire_many`] takes or renews: `room`'s, for `holder`, for `ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    /// The room.
    pub room: String,
    /// The lease holder (worker process and job).
    pub holder: String,
    /// How long the lease lasts unless renewed.
    pub ttl: Duration,
}

/// The answer to [`StateStore::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The caller holds the room now (a new token, or its own lease renewed).
    Held(Lease),
    /// Another baton holds a live lease on the room.
    Busy(Lease),
}

/// Everything stored about a room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Floor, handoff, timeline.
    pub record: Option<RoomRecord>,
    /// Merged checkpoint per agent name: (owner identity, base `baton.checkpoint/1` payload).
    pub checkpoints: BTreeMap<String, (String, Vec<u8>)>,
    /// The room's lease, when one is live.
    pub lease: Option<Lease>,
}

/// One write to a room's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Replaces the room's record.
    Record(RoomRecord),
    /// Replaces the merged checkpoint of `agent`, owned by `owner`.
    Checkpoint {
        /// The agent name.
        agent: String,
        /// Identity of the participant whose checkpoints built it.
        owner: String,
        /// A base `baton.checkpoint/1` payload of the merged state.
        payload: Vec<u8>,
    },
    /// The session ended: drops everything stored about the room, lease included.
    Forget,
}

impl Write {
    /// What a later write of the same key replaces (the store task keeps only the newest
    /// pending write per key).
    pub fn key(&self) -> String {
        match self {
            Write::Record(_) => "record".into(),
            Write::Checkpoint { agent, .. } => format!("checkpoint/{agent}"),
            Write::Forget => "forget".into(),
        }
    }

    /// Bytes the write stores (what the room's byte cap counts).
    pub fn bytes(&self) -> usize {
        match self {
            Write::Record(r) => r.timeline.iter().map(String::len).sum::<usize>() + r.written_by.len() + 256,
            Write::Checkpoint { agent, owner, payload } => agent.len() + owner.len() + payload.len(),
            Write::Forget => 0,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The backend is unreachable or failed (Redis down, disk error); the text is the backend's.
    /// The store task retries writes that failed this way.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The room's lease is held by another baton (or by a newer token): this baton no longer
    /// coordinates the room and must not write its state.
    #[error("room {room} is coordinated by another baton now (lease token {current}, ours {ours})")]
    Fenced {
        /// The room.
        room: String,
        /// The token of the lease now in force (0: none).
        current: u64,
        /// The token the write carried.
        ours: u64,
    },
    /// The write would take the room over its byte cap.
    #[error("room {room} would hold {needed} bytes in the state store, over its cap of {cap}")]
    Full {
        /// The room.
        room: String,
        /// Bytes the room would take.
        needed: u64,
        /// The cap.
        cap: u64,
    },
    /// What the store holds cannot be read back (written by an incompatible version).
    #[error("stored state of room {room} is unreadable: {reason}")]
    Corrupt {
        /// The room.
        room: String,
        /// What failed.
        reason: String,
    },
}

/// Where room state lives. Implementations scope everything by room name, keep at most their
/// byte cap per room, and let nothing outlive its call by more than their TTL.
///
/// Every method is a single round trip (Redis) or transaction (embedded); none retries. A
/// write carries the writer's lease token and is refused with [`StateError::Fenced`] when the
/// room's live lease has another token; with no live lease the write is taken (a baton whose
/// lease lapsed while the store was down catches up, then renews).
pub trait StateStore: Send + Sync + 'static {
    /// Applies one write to `room`.
    fn write(
        &self,
        room: &str,
        token: u64,
        write: &Write,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Everything stored about `room` (an empty snapshot for an unknown room).
    fn load(&self, room: &str) -> impl Future<Output = Result<Snapshot, StateError>> + Send;

    /// Takes the room's lease for `holder` for `ttl`: a new token when the room has no live
    /// lease, the same token renewed when `holder` already holds it, [`Acquired::Busy`] when
    /// another holder's lease is live.
    fn acquire(
        &self,
        room: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquired, StateError>> + Send;

    /// [`acquire`](Self::acquire) for many rooms at once (a worker's periodic lease renewals):
    /// one pipeline (Redis) or one transaction (embedded) instead of one per room, answered
    /// in the order asked. The outer error is the backend's (every lease failed alike), an inner
    /// one a single room's (its stored lease is corrupt).
    fn acquire_many(
        &self,
        leases: &[LeaseAsk],
    ) -> impl Future<Output = Result<Vec<Result<Acquired, StateError>>, StateError>> + Send;

    /// Lets go of the lease if `holder` with `token` still holds it.
    fn release(
        &self,
        room: &str,
        holder: &str,
        token: u64,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Rooms with stored state and who last held each (`None`: no live lease), for a worker
    /// that comes back and looks for the rooms it held.
    fn rooms(&self) -> impl Future<Output = Result<RoomLeases, StateError>> + Send;
}

/// A stored checkpoint's value: owner length (4 bytes, little endian), owner, payload.
fn encode_checkpoint(owner: &str, payload: &[u8]) -> Vec<u8> {
    let owner = &owner.as_bytes()[..owner.len().min(u32::MAX as usize)];
    let mut v = Vec::with_capacity(4 + owner.len() + payload.len());
    v.extend_from_slice(&(owner.len() as u32).to_le_bytes());
    v.extend_from_slice(owner);
    v.extend_from_slice(payload);
    v
}

/// (owner, payload) of a value [`encode_checkpoint`] made; `None` when it is not one.
fn decode_checkpoint(v: &[u8]) -> Option<(String, Vec<u8>)> {
    let len = u32::from_le_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let owner = std::str::from_utf8(v.get(4..4usize.checked_add(len)?)?).ok()?.to_owned();
    Some((owner, v.get(4 + len..)?.to_vec()))
}

/// Rooms with stored state and the live lease of each, as [`StateStore::rooms`] answers.
pub type RoomLeases = Vec<(String, Option<Lease>)>;

/// Unix epoch milliseconds now.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Which backend, from `[store]` in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// No durable state (`[store] kind = "memory"`): a restarted baton starts rooms afresh.
    Memory,
    /// A redb file in `dir` (`state.redb`).
    Embedded {
        /// The directory (created if missing).
        dir: std::path::PathBuf,
        /// Most bytes stored per room.
        room_bytes: u64,
        /// How long a room's state outlives its last write.
        ttl: Duration,
    },
    /// Redis at `url` (`redis://host:port/db`).
    Redis {
        /// The URL.
        url: String,
        /// Most bytes stored per room.
        room_bytes: u64,
        /// How long a room's keys outlive its last write.
        ttl: Duration,
    },
}

/// Defaults of `[store]`: 64 MiB per room (the merged checkpoints' cap), kept 2 h after the last
/// write.
pub const DEFAULT_ROOM_BYTES: u64 = 64 << 20;
/// See [`DEFAULT_ROOM_BYTES`].
pub const DEFAULT_TTL: Duration = Duration::from_secs(2 * 3600);

#[cfg(test)]
mod tests;
