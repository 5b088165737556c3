//! The embedded state store: one redb file on the worker's machine.
//!
//! redb commits with a crash-safe two-phase write (fsync by default), so a write that returned
//! `Ok` survives a SIGKILL of the worker and a power cut. Its calls block; each runs on tokio's
//! blocking pool, never on a room task.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    Acquired, Lease, RoomRecord, Snapshot, StateError, StateStore, Write, decode_checkpoint,
    encode_checkpoint, epoch_ms,
};

/// room → JSON [`RoomRecord`].
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// `room \0 agent` → owner length (4 bytes, little endian), owner, base checkpoint payload.
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
/// room → JSON [`Lease`].
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// room → the last fencing token handed out (kept while the room has state).
const TOKENS: TableDefinition<&str, u64> = TableDefinition::new("tokens");
/// room → epoch ms of its last write (what the TTL counts from).
const TOUCHED: TableDefinition<&str, u64> = TableDefinition::new("touched");

/// Room state in a redb file (`<dir>/state.redb`). Cheap to clone (one shared database).
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    room_bytes: u64,
    ttl: Duration,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("room_bytes", &self.room_bytes).field("ttl", &self.ttl).finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn checkpoint_key(room: &str, agent: &str) -> String {
    format!("{room}\0{agent}")
}

/// The key range of one room's checkpoints: `room\0` up to `room\u{1}`.
fn checkpoint_range(room: &str) -> (String, String) {
    (format!("{room}\0"), format!("{room}\u{1}"))
}

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/state.redb`, creating `dir`, and drops rooms whose last write
    /// is older than `ttl`. Errors: the directory or file cannot be created or opened (another
    /// process holding the file is one cause: one worker per directory).
    pub fn open(dir: &Path, room_bytes: u64, ttl: Duration) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let store = EmbeddedStore { db: Arc::new(db), room_bytes, ttl };
        store.init_and_purge()?;
        Ok(store)
    }

    /// Creates the tables and drops expired rooms.
    fn init_and_purge(&self) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let _ = txn.open_table(RECORDS).map_err(unavailable)?;
            let _ = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
            let _ = txn.open_table(LEASES).map_err(unavailable)?;
            let _ = txn.open_table(TOKENS).map_err(unavailable)?;
            let touched = txn.open_table(TOUCHED).map_err(unavailable)?;
            let cutoff = epoch_ms().saturating_sub(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
            let mut expired = Vec::new();
            for entry in touched.iter().map_err(unavailable)? {
                let (room, at) = entry.map_err(unavailable)?;
                if at.value() < cutoff {
                    expired.push(room.value().to_owned());
                }
            }
            drop(touched);
            // redb locks the file: no other process holds these rooms. The leases left are
            // those of a worker that died; this one takes their rooms over.
            txn.open_table(LEASES).map_err(unavailable)?.retain(|_, _| false).map_err(unavailable)?;
            for room in expired {
                tracing::info!(%room, "room state expired; dropped");
                forget(&txn, &room)?;
            }
        }
        txn.commit().map_err(unavailable)
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.map_err(unavailable)?
    }

    fn write_now(&self, room: &str, token: u64, write: &Write) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let now = epoch_ms();
            if let Some(lease) = live_lease(&txn.open_table(LEASES).map_err(unavailable)?, room, now)?
                && lease.token != token
            {
                return Err(StateError::Fenced { room: room.into(), current: lease.token, ours: token });
            }
            match write {
                Write::Forget => forget(&txn, room)?,
                Write::Record(record) => {
                    let json = serde_json::to_vec(record).map_err(unavailable)?;
                    let others = room_bytes(&txn, room, None)?;
                    self.check_cap(room, others + json.len() as u64)?;
                    txn.open_table(RECORDS)
                        .map_err(unavailable)?
                        .insert(room, json.as_slice())
                        .map_err(unavailable)?;
                }
                Write::Checkpoint { agent, owner, payload } => {
                    let value = encode_checkpoint(owner, payload);
                    let others = room_bytes(&txn, room, Some(agent))?;
                    self.check_cap(room, others + value.len() as u64)?;
                    txn.open_table(CHECKPOINTS)
                        .map_err(unavailable)?
                        .insert(checkpoint_key(room, agent).as_str(), value.as_slice())
                        .map_err(unavailable)?;
                }
            }
            if *write != Write::Forget {
                txn.open_table(TOUCHED).map_err(unavailable)?.insert(room, now).map_err(unavailable)?;
            }
        }
        txn.commit().map_err(unavailable)
    }

    fn check_cap(&self, room: &str, needed: u64) -> Result<(), StateError> {
        if needed > self.room_bytes {
            return Err(StateError::Full { room: room.into(), needed, cap: self.room_bytes });
        }
        Ok(())
    }

    fn load_now(&self, room: &str) -> Result<Snapshot, StateError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let corrupt = |reason: String| StateError::Corrupt { room: room.into(), reason };
        let record = match txn.open_table(RECORDS).map_err(unavailable)?.get(room).map_err(unavailable)? {
            Some(v) => Some(
                serde_json::from_slice::<RoomRecord>(v.value())
                    .map_err(|e| corrupt(format!("record: {e}")))?,
            ),
            None => None,
        };
        let mut checkpoints = std::collections::BTreeMap::new();
        let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
        let (lo, hi) = checkpoint_range(room);
        for entry in table.range(lo.as_str()..hi.as_str()).map_err(unavailable)? {
            let (k, v) = entry.map_err(unavailable)?;
            let agent = k.value().split_once('\0').map(|(_, a)| a.to_owned()).unwrap_or_default();
            let decoded =
                decode_checkpoint(v.value()).ok_or_else(|| corrupt(format!("checkpoint of {agent}")))?;
            checkpoints.insert(agent, decoded);
        }
        let lease = live_lease_read(&txn.open_table(LEASES).map_err(unavailable)?, room, epoch_ms())?;
        Ok(Snapshot { record, checkpoints, lease })
    }

    fn acquire_now(&self, room: &str, holder: &str, ttl: Duration) -> Result<Acquired, StateError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let acquired = Self::acquire_in(&txn, room, holder, ttl, epoch_ms())?;
        txn.commit().map_err(unavailable)?;
        Ok(acquired)
    }

    /// Every lease in one transaction: one commit (one fsync) per renewal tick, not per room.
    fn acquire_many_now(
        &self,
        leases: &[super::LeaseAsk],
    ) -> Result<Vec<Result<Acquired, StateError>>, StateError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let now = epoch_ms();
        let mut out = Vec::with_capacity(leases.len());
        for ask in leases {
            match Self::acquire_in(&txn, &ask.room, &ask.holder, ask.ttl, now) {
                Err(e @ StateError::Unavailable(_)) => return Err(e),
                result => out.push(result),
            }
        }
        txn.commit().map_err(unavailable)?;
        Ok(out)
    }

    fn acquire_in(
        txn: &redb::WriteTransaction,
        room: &str,
        holder: &str,
        ttl: Duration,
        now: u64,
    ) -> Result<Acquired, StateError> {
        let expires_at_ms = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let acquired = {
            let mut leases = txn.open_table(LEASES).map_err(unavailable)?;
            match live_lease(&leases, room, now)? {
                Some(lease) if lease.holder != holder => Acquired::Busy(lease),
                current => {
                    let token = match current {
                        Some(lease) => lease.token,
                        None => {
                            let mut tokens = txn.open_table(TOKENS).map_err(unavailable)?;
                            let next = tokens.get(room).map_err(unavailable)?.map_or(0, |t| t.value()) + 1;
                            tokens.insert(room, next).map_err(unavailable)?;
                            next
                        }
                    };
                    let lease = Lease { holder: holder.into(), token, expires_at_ms };
                    let json = serde_json::to_vec(&lease).map_err(unavailable)?;
                    leases.insert(room, json.as_slice()).map_err(unavailable)?;
                    txn.open_table(TOUCHED).map_err(unavailable)?.insert(room, now).map_err(unavailable)?;
                    Acquired::Held(lease)
                }
            }
        };
        Ok(acquired)
    }

    fn release_now(&self, room: &str, holder: &str, token: u64) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut leases = txn.open_table(LEASES).map_err(unavailable)?;
            if live_lease(&leases, room, epoch_ms())?.is_some_and(|l| l.holder == holder && l.token == token)
            {
                leases.remove(room).map_err(unavailable)?;
            }
        }
        txn.commit().map_err(unavailable)
    }

    fn rooms_now(&self) -> Result<super::RoomLeases, StateError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let touched = txn.open_table(TOUCHED).map_err(unavailable)?;
        let leases = txn.open_table(LEASES).map_err(unavailable)?;
        let cutoff = epoch_ms().saturating_sub(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
        let mut rooms = Vec::new();
        for entry in touched.iter().map_err(unavailable)? {
            let (room, at) = entry.map_err(unavailable)?;
            if at.value() >= cutoff {
                let room = room.value().to_owned();
                let lease = live_lease_read(&leases, &room, epoch_ms())?;
                rooms.push((room, lease));
            }
        }
        Ok(rooms)
    }
}

/// The room's lease if it has not lapsed at `now`.
fn live_lease(table: &redb::Table<&str, &[u8]>, room: &str, now: u64) -> Result<Option<Lease>, StateError> {
    let Some(v) = table.get(room).map_err(unavailable)? else { return Ok(None) };
    lease_if_live(room, v.value(), now)
}

fn live_lease_read(
    table: &redb::ReadOnlyTable<&str, &[u8]>,
    room: &str,
    now: u64,
) -> Result<Option<Lease>, StateError> {
    let Some(v) = table.get(room).map_err(unavailable)? else { return Ok(None) };
    lease_if_live(room, v.value(), now)
}

fn lease_if_live(room: &str, bytes: &[u8], now: u64) -> Result<Option<Lease>, StateError> {
    let lease: Lease = serde_json::from_slice(bytes)
        .map_err(|e| StateError::Corrupt { room: room.into(), reason: format!("lease: {e}") })?;
    Ok((lease.expires_at_ms > now).then_some(lease))
}

/// Bytes `room` stores now, without the checkpoint of `except` (about to be replaced) or, with
/// `None`, without the record (about to be replaced).
fn room_bytes(txn: &redb::WriteTransaction, room: &str, except: Option<&str>) -> Result<u64, StateError> {
    let mut bytes = 0u64;
    if except.is_some()
        && let Some(v) = txn.open_table(RECORDS).map_err(unavailable)?.get(room).map_err(unavailable)?
    {
        bytes += v.value().len() as u64;
    }
    let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
    let (lo, hi) = checkpoint_range(room);
    let skip = except.map(|a| checkpoint_key(room, a));
    for entry in table.range(lo.as_str()..hi.as_str()).map_err(unavailable)? {
        let (k, v) = entry.map_err(unavailable)?;
        if skip.as_deref() != Some(k.value()) {
            bytes += v.value().len() as u64;
        }
    }
    Ok(bytes)
}

/// Drops everything stored about `room`.
fn forget(txn: &redb::WriteTransaction, room: &str) -> Result<(), StateError> {
    txn.open_table(RECORDS).map_err(unavailable)?.remove(room).map_err(unavailable)?;
    txn.open_table(LEASES).map_err(unavailable)?.remove(room).map_err(unavailable)?;
    txn.open_table(TOKENS).map_err(unavailable)?.remove(room).map_err(unavailable)?;
    txn.open_table(TOUCHED).map_err(unavailable)?.remove(room).map_err(unavailable)?;
    let (lo, hi) = checkpoint_range(room);
    txn.open_table(CHECKPOINTS)
        .map_err(unavailable)?
        .retain_in(lo.as_str()..hi.as_str(), |_, _| false)
        .map_err(unavailable)?;
    Ok(())
}

impl StateStore for EmbeddedStore {
    async fn write(&self, room: &str, token: u64, write: &Write) -> Result<(), StateError> {
        let (room, write) = (room.to_owned(), write.clone());
        self.blocking(move |s| s.write_now(&room, token, &write)).await
    }

    async fn load(&self, room: &str) -> Result<Snapshot, StateError> {
        let room = room.to_owned();
        self.blocking(move |s| s.load_now(&room)).await
    }

    async fn acquire(&self, room: &str, holder: &str, ttl: Duration) -> Result<Acquired, StateError> {
        let (room, holder) = (room.to_owned(), holder.to_owned());
        self.blocking(move |s| s.acquire_now(&room, &holder, ttl)).await
    }

    async fn acquire_many(
        &self,
        leases: &[super::LeaseAsk],
    ) -> Result<Vec<Result<Acquired, StateError>>, StateError> {
        let leases = leases.to_vec();
        self.blocking(move |s| s.acquire_many_now(&leases)).await
    }

    async fn release(&self, room: &str, holder: &str, token: u64) -> Result<(), StateError> {
        let (room, holder) = (room.to_owned(), holder.to_owned());
        self.blocking(move |s| s.release_now(&room, &holder, token)).await
    }

    async fn rooms(&self) -> Result<super::RoomLeases, StateError> {
        self.blocking(|s| s.rooms_now()).await
    }
}
