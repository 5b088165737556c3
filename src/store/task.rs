//! The worker's store task: the one place that talks to the [`StateStore`]; rooms send it
//! requests and get answers as messages, so no room task ever waits on store IO.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Acquired, RETRY_EVERY, Snapshot, StateError, StateStore, Write};

/// What a room asks of the store task.
#[derive(Debug)]
pub enum Request {
    /// Apply a write with the room's lease token; answered once it is durable (or refused).
    Write {
        /// The room.
        room: String,
        /// The writer's lease token.
        token: u64,
        /// The write.
        write: Write,
        /// Where the answer goes.
        reply: Option<oneshot::Sender<Reply>>,
    },
    /// Everything stored about a room.
    Load {
        /// The room.
        room: String,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Snapshot, StateError>>,
    },
    /// Take or renew a room's lease.
    Acquire {
        /// The room.
        room: String,
        /// The holder (unique per baton job).
        holder: String,
        /// How long the lease lasts unless renewed.
        ttl: Duration,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Acquired, StateError>>,
    },
    /// Let go of a lease.
    Release {
        /// The room.
        room: String,
        /// The holder.
        holder: String,
        /// Its token.
        token: u64,
    },
    /// Rooms with stored state.
    Rooms {
        /// Where the answer goes.
        reply: oneshot::Sender<Result<super::RoomLeases, StateError>>,
    },
}

/// The answer to a write: `Ok` once durable; an error the store task will not retry
/// ([`StateError::Fenced`], [`StateError::Full`]). A write that failed with
/// [`StateError::Unavailable`] is not answered until a retry succeeds.
pub type Reply = Result<(), StateError>;

/// Whether the store is taking writes, and how many failures it has seen.
#[derive(Debug, Default)]
pub struct StoreStatus {
    degraded: AtomicBool,
    errors: AtomicU64,
    pending: AtomicU64,
    /// Rooms whose stored state may be gone: the backend was unreachable while they held a
    /// lease (a Redis restarted without persistence comes back empty).
    lost: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl StoreStatus {
    /// True while writes wait for the backend to come back.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
    /// Failed backend calls since start (`baton_store_errors_total`).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    /// Writes waiting for a retry.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
    /// True once after the backend came back from an outage during which `room` held a lease:
    /// the room should write its whole state again, since the backend may have lost it.
    pub fn take_lost(&self, room: &str) -> bool {
        self.lost.lock().map(|mut lost| lost.remove(room)).unwrap_or(false)
    }
    /// Marks `rooms` as lost (see [`StoreStatus::take_lost`]).
    pub(crate) fn mark_lost<'a>(&self, rooms: impl IntoIterator<Item = &'a String>) {
        if let Ok(mut lost) = self.lost.lock() {
            lost.extend(rooms.into_iter().cloned());
        }
    }
}

/// A cheap, cloneable way to reach the store task.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::UnboundedSender<Request>,
    status: Arc<StoreStatus>,
}

fn gone() -> StateError {
    StateError::Unavailable("the store task has stopped".into())
}

impl StoreHandle {
    /// The store's health, shared with the store task.
    pub fn status(&self) -> &Arc<StoreStatus> {
        &self.status
    }

    /// Sends a request; a stopped store task drops it (its reply channel then closes).
    pub fn send(&self, request: Request) {
        let _ = self.tx.send(request);
    }

    /// Writes and waits until durable (or refused).
    pub async fn write(&self, room: &str, token: u64, write: Write) -> Reply {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Write { room: room.into(), token, write, reply: Some(reply) });
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Everything stored about `room`.
    pub async fn load(&self, room: &str) -> Result<Snapshot, StateError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Load { room: room.into(), reply });
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Takes or renews `room`'s lease for `holder`.
    pub async fn acquire(&self, room: &str, holder: &str, ttl: Duration) -> Result<Acquired, StateError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Acquire { room: room.into(), holder: holder.into(), ttl, reply });
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Lets go of `room`'s lease (fire and forget).
    pub fn release(&self, room: &str, holder: &str, token: u64) {
        self.send(Request::Release { room: room.into(), holder: holder.into(), token });
    }

    /// Rooms with stored state, and their live leases.
    pub async fn rooms(&self) -> Result<super::RoomLeases, StateError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Rooms { reply });
        rx.await.unwrap_or_else(|_| Err(gone()))
    }
}

impl StoreHandle {
    /// A handle with no store task behind it: requests wait in the returned receiver (tests).
    pub fn detached() -> (StoreHandle, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (StoreHandle { tx, status: Arc::default() }, rx)
    }
}

/// One room's access to the store: its name, its lease, the handle.
#[derive(Debug, Clone)]
pub struct RoomStoreClient {
    /// The store task.
    pub handle: StoreHandle,
    /// The room.
    pub room: String,
    /// This baton's lease holder id.
    pub holder: String,
    /// The lease token writes carry (0: no lease was had, the store was down at join).
    pub token: u64,
}

/// A write that waits for the backend: the newest state of its key, and everyone waiting on it.
struct Pending {
    room: String,
    token: u64,
    write: Write,
    replies: Vec<oneshot::Sender<Reply>>,
}

/// Starts the store task on the current tokio runtime and returns its handle. `on_change` is
/// told every backend failure (`error = true`) and every change of the degraded state
/// (`degraded`), for logs and metrics.
pub fn spawn<S: StateStore>(store: S, on_change: Arc<dyn Fn(StoreSignal) + Send + Sync>) -> StoreHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let status = Arc::new(StoreStatus::default());
    tokio::spawn(run(store, rx, status.clone(), on_change));
    StoreHandle { tx, status }
}

/// What the store task reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSignal {
    /// A backend call failed.
    Error(String),
    /// The store became degraded (true) or caught up (false).
    Degraded(bool),
    /// Another baton holds the lease of a room this worker was coordinating.
    LeaseLost(String),
}

/// How often held leases are looked at (each is renewed once a third of its TTL has passed).
const RENEW_TICK: Duration = Duration::from_millis(250);

async fn run<S: StateStore>(
    store: S,
    mut rx: mpsc::UnboundedReceiver<Request>,
    status: Arc<StoreStatus>,
    on_change: Arc<dyn Fn(StoreSignal) + Send + Sync>,
) {
    // (room, key) -> the newest write waiting for the backend; `order` keeps first-failed first.
    let mut pending: BTreeMap<(String, String), Pending> = BTreeMap::new();
    let mut order: VecDeque<(String, String)> = VecDeque::new();
    // Leases this worker's rooms hold: room -> (holder, token, ttl, renewed at).
    let mut held: BTreeMap<String, (String, u64, Duration, tokio::time::Instant)> = BTreeMap::new();
    let mut renew = tokio::time::interval(RENEW_TICK);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set by a failure of the backend, cleared by the next call it answers: the rooms held
    // meanwhile are then marked lost.
    let outage = AtomicBool::new(false);
    let back = |held: &BTreeMap<String, (String, u64, Duration, tokio::time::Instant)>| {
        if outage.swap(false, Ordering::Relaxed) {
            tracing::info!(
                rooms = held.len(),
                "state store reachable again: its rooms write their whole state again"
            );
            status.mark_lost(held.keys());
        }
    };
    let fail = |e: &StateError| {
        let repeated = matches!(e, StateError::Unavailable(_)) && outage.swap(true, Ordering::Relaxed);
        status.errors.fetch_add(1, Ordering::Relaxed);
        if repeated {
            // Every lease renewal fails while the backend is down: one warning per outage.
            tracing::debug!(error = %e, "state store call failed");
        } else {
            tracing::warn!(error = %e, "state store call failed");
        }
        on_change(StoreSignal::Error(e.to_string()));
    };
    let set_degraded = |d: bool, pending: usize| {
        status.pending.store(pending as u64, Ordering::Relaxed);
        if status.degraded.swap(d, Ordering::Relaxed) != d {
            if d {
                tracing::error!(
                    "state store unavailable: rooms keep coordinating from memory; writes wait and are retried"
                );
            } else {
                tracing::info!("state store back: pending writes caught up");
            }
            on_change(StoreSignal::Degraded(d));
        }
    };
    loop {
        tokio::select! {
            request = rx.recv() => {
                let Some(request) = request else { break };
                match request {
                    Request::Write { room, token, write, reply } => {
                        // The room's lease as renewed here: a lease that lapsed while the
                        // store was down and was taken again has a newer token.
                        let token = held.get(&room).map_or(token, |h| h.1);
                        if write == Write::Forget {
                            held.remove(&room);
                        }
                        let k = (room.clone(), write.key());
                        if let Some(p) = pending.get_mut(&k) {
                            // Newest state wins; everyone who waited on the key waits on it.
                            p.write = write;
                            p.token = token;
                            p.replies.extend(reply);
                            continue;
                        }
                        if !pending.is_empty() {
                            // Degraded: queue behind the others rather than probe on every write.
                            order.push_back(k.clone());
                            pending.insert(k, Pending { room, token, write, replies: reply.into_iter().collect() });
                            set_degraded(true, pending.len());
                            continue;
                        }
                        match store.write(&room, token, &write).await {
                            Err(StateError::Unavailable(e)) => {
                                fail(&StateError::Unavailable(e));
                                order.push_back(k.clone());
                                pending.insert(k, Pending { room, token, write, replies: reply.into_iter().collect() });
                                set_degraded(true, pending.len());
                            }
                            result => {
                                if let Err(e) = &result {
                                    fail(e);
                                }
                                if let Some(reply) = reply {
                                    let _ = reply.send(result);
                                }
                            }
                        }
                    }
                    Request::Load { room, reply } => {
                        let mut result = store.load(&room).await;
                        if let Err(e) = &result {
                            fail(e);
                        } else if let Ok(snapshot) = result.as_mut() {
                            overlay_pending(snapshot, &room, &pending);
                        }
                        let _ = reply.send(result);
                    }
                    Request::Acquire { room, holder, ttl, reply } => {
                        let result = store.acquire(&room, &holder, ttl).await;
                        match &result {
                            Err(e) => fail(e),
                            Ok(Acquired::Held(lease)) => {
                                held.insert(room, (holder, lease.token, ttl, tokio::time::Instant::now()));
                            }
                            Ok(Acquired::Busy(_)) => {}
                        }
                        let _ = reply.send(result);
                    }
                    Request::Release { room, holder, token } => {
                        held.remove(&room);
                        if let Err(e) = store.release(&room, &holder, token).await {
                            fail(&e);
                        }
                    }
                    Request::Rooms { reply } => {
                        let result = store.rooms().await;
                        if let Err(e) = &result {
                            fail(e);
                        }
                        let _ = reply.send(result);
                    }
                }
            }
            _ = renew.tick(), if !held.is_empty() => {
                let now = tokio::time::Instant::now();
                let due: Vec<String> = held
                    .iter()
                    .filter(|(_, (_, _, ttl, at))| now.duration_since(*at) >= *ttl / 3)
                    .map(|(room, _)| room.clone())
                    .collect();
                // One call for all of them: a Redis that is down costs one timeout per tick, not
                // one per room, and the embedded store one commit.
                let asks: Vec<super::LeaseAsk> = due
                    .iter()
                    .filter_map(|room| {
                        let (holder, _, ttl, _) = held.get(room)?;
                        Some(super::LeaseAsk { room: room.clone(), holder: holder.clone(), ttl: *ttl })
                    })
                    .collect();
                let results = match store.acquire_many(&asks).await {
                    Ok(results) => {
                        back(&held);
                        results
                    }
                    Err(e) => {
                        // Down: keep trying; the rooms keep running from memory.
                        fail(&e);
                        Vec::new()
                    }
                };
                for (ask, result) in asks.into_iter().zip(results) {
                    let room = ask.room;
                    let Some((holder, token, ttl, _)) = held.get(&room).cloned() else { continue };
                    match result {
                        Ok(Acquired::Held(lease)) if lease.token == token => {
                            held.insert(room, (holder, token, ttl, now));
                        }
                        Ok(Acquired::Held(lease)) => {
                            // Ours lapsed (the store was down longer than the lease) and no one
                            // took it: the new token is ours, but writes carry the old one.
                            tracing::warn!(%room, old = token, new = lease.token, "room lease lapsed and was taken again; writes with the old token are fenced");
                            held.insert(room, (holder, lease.token, ttl, now));
                        }
                        Ok(Acquired::Busy(lease)) => {
                            tracing::error!(%room, holder = %lease.holder, token = lease.token, "room lease lost to another baton: this one no longer coordinates the room");
                            on_change(StoreSignal::LeaseLost(room.clone()));
                            held.remove(&room);
                        }
                        Err(e) => fail(&e),
                    }
                }
            }
            _ = retry.tick(), if !pending.is_empty() => {
                while let Some(k) = order.front().cloned() {
                    let Some(p) = pending.get(&k) else {
                        order.pop_front();
                        continue;
                    };
                    let token = held.get(&p.room).map_or(p.token, |h| h.1);
                    match store.write(&p.room, token, &p.write).await {
                        Err(StateError::Unavailable(e)) => {
                            fail(&StateError::Unavailable(e));
                            break;
                        }
                        result => {
                            if let Err(e) = &result {
                                fail(e);
                            }
                            back(&held);
                            order.pop_front();
                            if let Some(p) = pending.remove(&k) {
                                for reply in p.replies {
                                    let _ = reply.send(result.clone());
                                }
                            }
                        }
                    }
                }
                set_degraded(!pending.is_empty(), pending.len());
            }
        }
    }
}

/// A load while writes wait: the room's pending writes are newer than what the backend holds.
fn overlay_pending(snapshot: &mut Snapshot, room: &str, pending: &BTreeMap<(String, String), Pending>) {
    for ((r, _), p) in pending {
        if r != room {
            continue;
        }
        match &p.write {
            Write::Record(record) => snapshot.record = Some(record.clone()),
            Write::Checkpoint { agent, owner, payload } => {
                snapshot.checkpoints.insert(agent.clone(), (owner.clone(), payload.clone()));
            }
            Write::Forget => *snapshot = Snapshot::default(),
        }
    }
}
