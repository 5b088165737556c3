//! baton's side of context transfer: receive a bundle from a source agent, keep it, deliver it
//! to a target agent.
//!
//! A thin shell over [`baton_transfer::Endpoint`] with no IO: packets, reconnects and timer
//! expiries come in with the current time, packets to publish go out through [`Relay::drain`]
//! into the room's [`Outbox`], and what happened comes back as [`RelayEvent`]s for the
//! coordinator. The relay semantics (two legs, ids, when the source is acknowledged, retention)
//! are specified in `docs/protocol.md`, section 4.10.
//!
//! ```text
//!  source agent ──leg 1 (id T, chosen by the source)──▶ baton ──leg 2 (id D, chosen by baton)──▶ target agent
//!               ◀── ACK … COMPLETE = stored and verified       ◀── ACK … COMPLETE = delivered and verified
//! ```
//!
//! - **Leg 1** ends when baton has verified the SHA-256 and put the bundle in its
//!   [`BundleStore`]; that is what the source's COMPLETE means. It does not wait for the
//!   target, which may not even have been dispatched yet.
//! - **Leg 2** is a new transfer with a fresh random id per delivery attempt, carrying the same
//!   bytes, the same SHA-256 and the source's meta string unchanged. The SHA-256 is the end to
//!   end correlation. A fresh id means a redelivery after a failure is never answered with the
//!   target's remembered verdict for the failed attempt.
//! - Only authorized senders (configured agents) may open transfers to baton. Packets from
//!   anyone else never reach the engine: OPEN and RESUME are answered with ERROR
//!   [`NOT_AUTHORIZED`], everything else is dropped; all are logged as security warnings.
//! - The store has a byte cap; an OPEN that would not fit in what the store has left (counting
//!   transfers already accepted and still arriving) is refused with `buffer_full` before
//!   anything is buffered, so a COMPLETE to the source always means "stored".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_transfer::{
    Endpoint, EndpointConfig, ErrorCode, Event, Frame, Output, ReceiversConfig, TransferError, TransferId,
};

use crate::room::Outbox;

/// LiveKit data topic of transfer frames.
pub const TOPIC: &str = baton_transfer::TOPIC;

/// Error code 13, `not_authorized`: the sender is not an agent in baton's configuration.
/// Answered (ERROR frame) to an OPEN or RESUME from such a participant.
pub const NOT_AUTHORIZED: ErrorCode = ErrorCode::NotAuthorized;

// ---------------------------------------------------------------------------------------------
// Store

/// What the store keeps about a bundle besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    /// Server-stamped identity of the agent that sent it.
    pub from: String,
    /// The OPEN's metadata string, as the source sent it.
    pub meta: String,
    /// Payload size in bytes.
    pub size: u64,
    /// SHA-256 of the payload (verified on receipt).
    pub sha256: [u8; 32],
    /// When baton finished receiving it.
    pub received_at: Instant,
}

/// A stored bundle: its description and its bytes (shared, so a delivery does not copy them
/// out of the store).
#[derive(Debug, Clone)]
pub struct StoredBundle {
    /// Who sent it and what it is.
    pub info: BundleInfo,
    /// The verified payload.
    pub payload: Arc<[u8]>,
}

/// Why a bundle could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Storing it would exceed the store's byte cap.
    #[error(
        "bundle store full: {used} of {capacity} bytes used, {need} more needed; deliver or remove stored bundles, or raise the store cap"
    )]
    Full {
        /// Bytes in use.
        used: u64,
        /// The cap.
        capacity: u64,
        /// Size of the bundle that did not fit.
        need: u64,
    },
    /// A bundle with this transfer id is already stored.
    #[error("a bundle with transfer id {0} is already stored")]
    Exists(TransferId),
    /// The backing storage failed (durable stores).
    #[error("bundle store failed: {0}")]
    Backend(String),
}

/// Where received bundles wait for delivery, keyed by the source's transfer id.
///
/// The in-memory [`MemoryStore`] is the only implementation today; a durable one (surviving a
/// baton restart) implements the same trait. Calls are synchronous and made from the room
/// task, so an implementation must be fast or buffer internally.
pub trait BundleStore: Send + fmt::Debug {
    /// Stores a bundle. Fails when full or when the id is taken; never replaces.
    fn put(&mut self, transfer_id: TransferId, bundle: StoredBundle) -> Result<(), StoreError>;
    /// The bundle, if stored.
    fn get(&self, transfer_id: TransferId) -> Option<StoredBundle>;
    /// The bundle's description, without loading its bytes.
    fn info(&self, transfer_id: TransferId) -> Option<BundleInfo>;
    /// Removes a bundle, returning its description.
    fn remove(&mut self, transfer_id: TransferId) -> Option<BundleInfo>;
    /// Payload bytes currently stored.
    fn used_bytes(&self) -> u64;
    /// Most payload bytes the store will hold.
    fn capacity(&self) -> u64;
    /// Number of stored bundles.
    fn len(&self) -> usize;
    /// Whether nothing is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bundles in memory, up to a byte cap.
#[derive(Debug)]
pub struct MemoryStore {
    capacity: u64,
    used: u64,
    bundles: HashMap<TransferId, StoredBundle>,
}

impl MemoryStore {
    /// An empty store that holds at most `capacity` payload bytes.
    pub fn new(capacity: u64) -> Self {
        MemoryStore { capacity, used: 0, bundles: HashMap::new() }
    }
}

impl BundleStore for MemoryStore {
    fn put(&mut self, transfer_id: TransferId, bundle: StoredBundle) -> Result<(), StoreError> {
        if self.bundles.contains_key(&transfer_id) {
            return Err(StoreError::Exists(transfer_id));
        }
        let need = bundle.payload.len() as u64;
        if self.used.saturating_add(need) > self.capacity {
            return Err(StoreError::Full { used: self.used, capacity: self.capacity, need });
        }
        self.used += need;
        self.bundles.insert(transfer_id, bundle);
        Ok(())
    }

    fn get(&self, transfer_id: TransferId) -> Option<StoredBundle> {
        self.bundles.get(&transfer_id).cloned()
    }

    fn info(&self, transfer_id: TransferId) -> Option<BundleInfo> {
        self.bundles.get(&transfer_id).map(|b| b.info.clone())
    }

    fn remove(&mut self, transfer_id: TransferId) -> Option<BundleInfo> {
        let b = self.bundles.remove(&transfer_id)?;
        self.used -= b.payload.len() as u64;
        Some(b.info)
    }

    fn used_bytes(&self) -> u64 {
        self.used
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn len(&self) -> usize {
        self.bundles.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Relay

/// Limits and tuning of one room's relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Largest bundle accepted (payload bytes, after decompression). Default 32 MiB.
    pub max_bundle_size: u64,
    /// Transfers one sender may have in flight towards baton at once. Default 4.
    pub max_transfers_per_sender: usize,
    /// Bytes all incoming transfers of the room may hold while arriving. Default 64 MiB.
    pub max_buffered_bytes: u64,
    /// Payload bytes the (default, in-memory) store holds. Default 128 MiB.
    pub store_bytes: u64,
    /// How long a stored bundle is kept after it arrived, delivered or not, so the coordinator
    /// can deliver it again (fallback to another agent, hand back). `None` keeps it until
    /// [`Relay::remove`]. Default 10 minutes.
    pub retention: Option<Duration>,
    /// Engine tuning (window, timers, deadline). Its receiver limits are overwritten by the
    /// fields above.
    pub endpoint: EndpointConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_bundle_size: 32 * 1024 * 1024,
            max_transfers_per_sender: 4,
            max_buffered_bytes: 64 * 1024 * 1024,
            store_bytes: 128 * 1024 * 1024,
            retention: Some(Duration::from_secs(600)),
            endpoint: EndpointConfig::default(),
        }
    }
}

/// Why [`Relay::deliver`] could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// No bundle with this id is stored (never received, removed, or expired).
    #[error("no stored bundle with transfer id {0} (never received, removed or expired)")]
    UnknownBundle(TransferId),
    /// A delivery of this bundle to this participant is already under way.
    #[error("bundle {transfer_id} is already being delivered to {to}")]
    AlreadyDelivering {
        /// The stored bundle.
        transfer_id: TransferId,
        /// The target.
        to: String,
    },
    /// The engine refused to start the transfer.
    #[error("cannot start the delivery: {0}")]
    Transfer(TransferError),
}

/// What the coordinator learns from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// An authorized sender's OPEN was accepted: the bundle is arriving and can already be
    /// delivered onwards ([`Relay::deliver`] forwards it while it arrives).
    Receiving {
        /// The source agent.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// Payload size announced.
        size: u64,
        /// The OPEN's metadata string.
        meta: String,
    },
    /// A bundle arrived whole, verified, and is stored under `transfer_id`; the source has been
    /// sent COMPLETE.
    BundleReceived {
        /// The source agent.
        from: String,
        /// The source's transfer id; the key in the store.
        transfer_id: TransferId,
        /// Payload size.
        size: u64,
        /// The OPEN's metadata string.
        meta: String,
    },
    /// An incoming transfer from an authorized sender failed (cancelled, timed out, corrupt,
    /// or could not be stored).
    ReceiveFailed {
        /// The source.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// What went wrong.
        error: TransferError,
    },
    /// The target confirmed the bundle (COMPLETE with the right SHA-256).
    Delivered {
        /// The target.
        to: String,
        /// The stored bundle's id (the source's transfer id).
        transfer_id: TransferId,
        /// The id of this delivery (leg 2).
        delivery_id: TransferId,
        /// Chunk bytes baton sent for this delivery, retransmissions included.
        bytes_sent: u64,
    },
    /// A delivery ended without confirmation.
    DeliveryFailed {
        /// The target.
        to: String,
        /// The stored bundle's id.
        transfer_id: TransferId,
        /// The id of this delivery.
        delivery_id: TransferId,
        /// What went wrong.
        error: TransferError,
    },
    /// A packet was refused or dropped without affecting a transfer: undecodable, about an
    /// unknown transfer, over a limit, or from a sender that is not authorized.
    Rejected {
        /// The packet's server-stamped sender.
        from: String,
        /// The transfer id, when the packet had one.
        transfer_id: Option<TransferId>,
        /// Why.
        error: TransferError,
    },
    /// A stored bundle was dropped because its retention ran out.
    Expired {
        /// The stored bundle's id.
        transfer_id: TransferId,
    },
}

#[derive(Debug)]
struct Delivery {
    transfer_id: TransferId,
    bytes_sent: u64,
}

#[derive(Debug, Clone, Copy)]
struct Admitted {
    payload_size: u64,
    sha256: [u8; 32],
}

/// baton's transfer endpoint for one room plus the bundle store. See the module docs.
///
/// Drive it like the engine: call [`on_packet`](Self::on_packet) for every `baton.xfer`
/// packet, [`on_timeout`](Self::on_timeout) when [`poll_timeout`](Self::poll_timeout) is
/// reached, [`peer_reconnected`](Self::peer_reconnected) / [`reconnected`](Self::reconnected)
/// on (re)joins, and after each call (and after [`deliver`](Self::deliver) /
/// [`cancel`](Self::cancel)) [`drain`](Self::drain) into the room's outbox.
#[derive(Debug)]
pub struct Relay {
    endpoint: Endpoint,
    store: Box<dyn BundleStore>,
    retention: Option<Duration>,
    max_bundle_size: u64,
    /// Incoming transfers the relay let through to the engine, with what they will store.
    admitted: HashMap<(String, TransferId), Admitted>,
    /// Outgoing deliveries by (target, delivery id).
    deliveries: HashMap<(String, TransferId), Delivery>,
    /// Stored bundles by expiry time.
    expiry: BTreeMap<(Instant, TransferId), ()>,
    /// Packets refused from unauthorized senders, per identity (for rate-limited warnings).
    unauthorized: HashMap<String, u64>,
    tx: Vec<(String, Vec<u8>)>,
    events: Vec<RelayEvent>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay::new(RelayConfig::default())
    }
}

impl Relay {
    /// A relay with an in-memory store of `cfg.store_bytes`.
    pub fn new(cfg: RelayConfig) -> Self {
        let store = Box::new(MemoryStore::new(cfg.store_bytes));
        Relay::with_store(cfg, store)
    }

    /// A relay over any store (the store's own cap applies; `cfg.store_bytes` is ignored).
    pub fn with_store(cfg: RelayConfig, store: Box<dyn BundleStore>) -> Self {
        let mut ecfg = cfg.endpoint.clone();
        ecfg.receivers = ReceiversConfig {
            max_transfers_per_peer: cfg.max_transfers_per_sender,
            max_buffered_bytes: cfg.max_buffered_bytes,
            ..ecfg.receivers
        };
        ecfg.receivers.transfer.max_bundle_size = cfg.max_bundle_size;
        Relay {
            endpoint: Endpoint::new(ecfg),
            store,
            retention: cfg.retention,
            max_bundle_size: cfg.max_bundle_size,
            admitted: HashMap::new(),
            deliveries: HashMap::new(),
            expiry: BTreeMap::new(),
            unauthorized: HashMap::new(),
            tx: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The bundle store (for counters and look-ups).
    pub fn store(&self) -> &dyn BundleStore {
        self.store.as_ref()
    }

    /// Description of a stored bundle.
    pub fn stored(&self, transfer_id: TransferId) -> Option<BundleInfo> {
        self.store.info(transfer_id)
    }

    /// Deliveries under way.
    pub fn delivering(&self) -> usize {
        self.deliveries.len()
    }

    /// Incoming transfers under way.
    pub fn receiving(&self) -> usize {
        self.endpoint.receivers().active()
    }

    /// One packet on topic `baton.xfer` from `from` (the server-stamped identity).
    ///
    /// `authorized` says whether `from` may send bundles to baton (a configured agent). An
    /// unauthorized sender's packets never reach the engine and nothing is buffered; the only
    /// exception is an acknowledgement for a delivery baton itself is making to `from`.
    pub fn on_packet(&mut self, from: &str, payload: &[u8], authorized: bool, now: Instant) {
        let kind = payload.get(2).copied();
        if !authorized {
            self.unauthorized_packet(from, payload, now);
            return;
        }
        if kind == Some(1) {
            // OPEN: admission against the store before the engine buffers anything.
            if let Ok(Frame::Open { id, open }) = Frame::decode(payload) {
                let key = (from.to_owned(), id);
                if !self.admitted.contains_key(&key) {
                    if !self.admit(from, id, &open) {
                        return;
                    }
                    self.admitted.insert(
                        key.clone(),
                        Admitted { payload_size: open.payload_size, sha256: open.sha256 },
                    );
                    let before = self.endpoint.receivers().active();
                    self.endpoint.handle_packet(from, payload, now);
                    let accepted = self.endpoint.receivers().active() > before;
                    if accepted {
                        self.events.push(RelayEvent::Receiving {
                            from: from.to_owned(),
                            transfer_id: id,
                            size: open.payload_size,
                            meta: open.meta.clone(),
                        });
                    }
                    self.pull_with(now);
                    if !accepted {
                        // Refused by the engine (limits), answered by it; or completed at once
                        // (empty bundle), already stored by pull_with.
                        self.admitted.remove(&key);
                    }
                    return;
                }
            }
        }
        self.endpoint.handle_packet(from, payload, now);
        self.pull_with(now);
    }

    /// Starts delivering a bundle to `to`; returns the new delivery's id. A stored bundle is
    /// sent from the store; one still arriving is forwarded chunk by chunk as it arrives
    /// (cut-through), and that delivery fails if the arrival does. The outcome arrives as
    /// [`RelayEvent::Delivered`] or [`RelayEvent::DeliveryFailed`].
    pub fn deliver(
        &mut self,
        transfer_id: TransferId,
        to: &str,
        now: Instant,
    ) -> Result<TransferId, RelayError> {
        if self.is_delivering(transfer_id, to) {
            return Err(RelayError::AlreadyDelivering { transfer_id, to: to.to_owned() });
        }
        let stored = self.store.get(transfer_id);
        let arriving = self
            .admitted
            .iter()
            .find(|((_, id), _)| *id == transfer_id)
            .map(|((from, _), a)| (from.clone(), *a));
        let delivery_id = loop {
            let id = TransferId::new(rand::random());
            if !self.deliveries.contains_key(&(to.to_owned(), id)) {
                break id;
            }
        };
        let (started, bytes, how) = match (&stored, arriving) {
            (Some(bundle), _) => (
                self.endpoint.send(to, delivery_id, &bundle.payload, &bundle.info.meta, now),
                bundle.payload.len() as u64,
                "delivering bundle",
            ),
            (None, Some((from, a))) => (
                self.endpoint.forward(to, delivery_id, &from, transfer_id, now),
                a.payload_size,
                "delivering bundle while it arrives (cut-through)",
            ),
            (None, None) => return Err(RelayError::UnknownBundle(transfer_id)),
        };
        started.map_err(RelayError::Transfer)?;
        self.deliveries.insert((to.to_owned(), delivery_id), Delivery { transfer_id, bytes_sent: 0 });
        tracing::info!(
            %to,
            transfer_id = %format_args!("{transfer_id}"),
            delivery_id = %delivery_id,
            bytes,
            "{how}"
        );
        self.pull_with(now);
        Ok(delivery_id)
    }

    /// Whether a delivery of this bundle to `to` is under way.
    pub fn is_delivering(&self, transfer_id: TransferId, to: &str) -> bool {
        self.deliveries.iter().any(|((t, _), d)| t == to && d.transfer_id == transfer_id)
    }

    /// Cancels a delivery (CANCEL `cancelled` to the target). Returns false if it is unknown or
    /// already over. The stored bundle stays.
    pub fn cancel(&mut self, to: &str, delivery_id: TransferId, reason: &str, now: Instant) -> bool {
        let done = self.endpoint.cancel(to, delivery_id, reason, now);
        self.pull_with(now);
        done
    }

    /// Drops a stored bundle (the handoff is over). Deliveries under way keep their own copy.
    pub fn remove(&mut self, transfer_id: TransferId) -> Option<BundleInfo> {
        let info = self.store.remove(transfer_id)?;
        self.expiry.retain(|(_, id), _| *id != transfer_id);
        Some(info)
    }

    /// A participant (re-)joined the room: transfers with it in both directions resume from
    /// what was acknowledged. Harmless for a participant with no transfers.
    pub fn peer_reconnected(&mut self, identity: &str, now: Instant) {
        self.endpoint.peer_reconnected(identity, now);
        self.pull_with(now);
    }

    /// baton's own connection resumed or re-joined: every transfer resumes.
    pub fn reconnected(&mut self, now: Instant) {
        self.endpoint.reconnected(now);
        self.pull_with(now);
    }

    /// When [`on_timeout`](Self::on_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.expiry.keys().next().map(|(t, _)| *t);
        match (self.endpoint.poll_timeout(), expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances the engine's timers and drops expired bundles.
    pub fn on_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.pull_with(now);
        while let Some(&(at, id)) = self.expiry.keys().next() {
            if at > now {
                break;
            }
            self.expiry.remove(&(at, id));
            if self.store.remove(id).is_some() {
                tracing::info!(transfer_id = %id, "stored bundle expired");
                self.events.push(RelayEvent::Expired { transfer_id: id });
            }
        }
    }

    /// Moves every packet to publish into `out` (topic `baton.xfer`, addressed to its one
    /// participant) and returns what happened since the last drain.
    pub fn drain(&mut self, out: &mut Outbox) -> Vec<RelayEvent> {
        for (to, payload) in self.tx.drain(..) {
            out.send(TOPIC, payload, &to);
        }
        std::mem::take(&mut self.events)
    }

    /// Store admission for a new OPEN from an authorized sender. Answers and reports a refusal
    /// itself and returns false; returns true when the engine should see the OPEN.
    fn admit(&mut self, from: &str, id: TransferId, open: &baton_transfer::Open) -> bool {
        if let Some(info) = self.store.info(id) {
            // The bundle is already stored (its COMPLETE was lost and the engine has forgotten
            // the transfer), or another agent reuses the id.
            if info.from == from && info.sha256 == open.sha256 && info.size == open.payload_size {
                self.transmit(from, &Frame::Complete { id, sha256: info.sha256 });
            } else {
                self.refuse(
                    from,
                    id,
                    ErrorCode::ConflictingOpen,
                    "a different bundle with this transfer id is stored; use a fresh random id".into(),
                );
            }
            return false;
        }
        if open.payload_size > self.max_bundle_size {
            return true; // the engine answers too_large with its own wording
        }
        let reserved: u64 = self.admitted.values().map(|a| a.payload_size).sum();
        let used = self.store.used_bytes();
        let cap = self.store.capacity();
        if used.saturating_add(reserved).saturating_add(open.payload_size) > cap {
            self.refuse(
                from,
                id,
                ErrorCode::BufferFull,
                format!(
                    "baton's bundle store holds {used} of {cap} bytes ({reserved} more arriving); retry after stored bundles are delivered"
                ),
            );
            return false;
        }
        true
    }

    fn refuse(&mut self, from: &str, id: TransferId, code: ErrorCode, reason: String) {
        tracing::warn!(%from, transfer_id = %id, %code, %reason, "refused bundle");
        self.transmit(from, &Frame::Error { id, code, reason: truncate(&reason) });
        self.events.push(RelayEvent::Rejected {
            from: from.to_owned(),
            transfer_id: Some(id),
            error: TransferError { code, reason, remote: false },
        });
    }

    fn unauthorized_packet(&mut self, from: &str, payload: &[u8], now: Instant) {
        let frame = Frame::decode(payload).ok();
        if let Some(f) = &frame
            && f.direction() == baton_transfer::Direction::ToSender
            && self.deliveries.contains_key(&(from.to_owned(), f.id()))
        {
            // Our own delivery target acknowledging: not a bundle sent to baton.
            self.endpoint.handle_packet(from, payload, now);
            self.pull_with(now);
            return;
        }
        let n = self.unauthorized.entry(from.to_owned()).or_insert(0);
        *n += 1;
        let reason = format!(
            "{from} is not an agent in baton's configuration; only configured agents may send bundles"
        );
        if *n == 1 || n.is_power_of_two() {
            tracing::warn!(
                %from,
                packets = *n,
                kind = frame.as_ref().map(|f| format!("{:?}", f.kind())).unwrap_or_else(|| "undecodable".into()),
                "security: transfer frame from a participant that is not an authorized agent; refused"
            );
        }
        let id = frame.as_ref().map(Frame::id);
        if let Some(Frame::Open { id, .. } | Frame::Resume { id, .. }) = &frame {
            self.transmit(from, &Frame::Error { id: *id, code: NOT_AUTHORIZED, reason: truncate(&reason) });
        }
        self.events.push(RelayEvent::Rejected {
            from: from.to_owned(),
            transfer_id: id,
            error: TransferError { code: NOT_AUTHORIZED, reason, remote: false },
        });
    }

    fn transmit(&mut self, to: &str, frame: &Frame) {
        if let Ok(p) = frame.encode() {
            self.tx.push((to.to_owned(), p));
        }
    }

    /// Moves the engine's outputs into the relay's queues.
    fn pull_with(&mut self, now: Instant) {
        while let Some(o) = self.endpoint.poll_output() {
            match o {
                Output::Transmit { to, payload } => {
                    if payload.len() > 24
                        && payload[2] == 2
                        && let Some(d) = self.deliveries.get_mut(&(to.clone(), frame_id(&payload)))
                    {
                        d.bytes_sent += (payload.len() - 24) as u64;
                    }
                    self.tx.push((to, payload));
                }
                Output::Event(ev) => self.on_event(ev, now),
            }
        }
    }

    fn on_event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Delivered { from, id, payload, meta } => {
                let admitted = self.admitted.remove(&(from.clone(), id));
                let size = payload.len() as u64;
                let sha256 = match admitted {
                    Some(a) => a.sha256,
                    None => sha256(&payload),
                };
                let info =
                    BundleInfo { from: from.clone(), meta: meta.clone(), size, sha256, received_at: now };
                match self.store.put(id, StoredBundle { info, payload: payload.into() }) {
                    Ok(()) => {
                        if let Some(r) = self.retention {
                            self.expiry.insert((now + r, id), ());
                        }
                        tracing::info!(%from, transfer_id = %id, size, "bundle received and stored");
                        self.events.push(RelayEvent::BundleReceived { from, transfer_id: id, size, meta });
                    }
                    Err(e) => {
                        tracing::error!(%from, transfer_id = %id, error = %e, "received bundle could not be stored");
                        self.events.push(RelayEvent::ReceiveFailed {
                            from,
                            transfer_id: id,
                            error: TransferError {
                                code: ErrorCode::BufferFull,
                                reason: e.to_string(),
                                remote: false,
                            },
                        });
                    }
                }
            }
            Event::ReceiveFailed { from, id, error } => {
                self.admitted.remove(&(from.clone(), id));
                tracing::warn!(%from, transfer_id = %id, %error, "incoming bundle failed");
                self.events.push(RelayEvent::ReceiveFailed { from, transfer_id: id, error });
            }
            Event::Sent { to, id } => {
                if let Some(d) = self.deliveries.remove(&(to.clone(), id)) {
                    tracing::info!(
                        %to,
                        transfer_id = %d.transfer_id,
                        delivery_id = %id,
                        bytes_sent = d.bytes_sent,
                        "bundle delivered"
                    );
                    self.events.push(RelayEvent::Delivered {
                        to,
                        transfer_id: d.transfer_id,
                        delivery_id: id,
                        bytes_sent: d.bytes_sent,
                    });
                }
            }
            Event::SendFailed { to, id, error } => {
                if let Some(d) = self.deliveries.remove(&(to.clone(), id)) {
                    tracing::warn!(
                        %to,
                        transfer_id = %d.transfer_id,
                        delivery_id = %id,
                        %error,
                        "bundle delivery failed"
                    );
                    self.events.push(RelayEvent::DeliveryFailed {
                        to,
                        transfer_id: d.transfer_id,
                        delivery_id: id,
                        error,
                    });
                }
            }
            Event::Rejected { peer, id, error } => {
                tracing::debug!(from = %peer, transfer_id = ?id.map(|i| i.to_string()), %error, "transfer packet rejected");
                self.events.push(RelayEvent::Rejected { from: peer, transfer_id: id, error });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary room wiring

/// Temporary glue between the room task and the [`Relay`] until the coordinator's own transfer
/// wiring lands: the coordinator forwards its `RoomHandler` calls here.
///
/// Rules it implements:
/// - a sender is authorized when its participant kind is AGENT (to be replaced by baton's agent
///   configuration); packets from identities the roster does not know yet are dropped without
///   an answer (data can overtake the join announcement; the sender's RTO resends the OPEN);
/// - when a bundle whose meta is a JSON object with `"to": "<identity>"` is stored, it is
///   delivered to that identity as soon as it is in the room as an AGENT (never to anyone
///   else: a caller's client never receives a bundle);
/// - a participant that joins again resumes its transfers; baton's own reconnect resumes all.
#[derive(Debug, Default)]
pub struct Hookup {
    /// The relay it drives.
    pub relay: Relay,
    /// Identities in the room: `Some(agent name)` for agents (empty when unnamed), `None` for
    /// everyone else.
    present: HashMap<String, Option<String>>,
    /// Stored bundles waiting for their target: (transfer id, target identity).
    pending: Vec<(TransferId, String)>,
    /// Agent names allowed to send bundles; empty means any agent-kind participant.
    pub allowed_agents: std::collections::BTreeSet<String>,
    /// Deliver bundles whose meta names a target (`"to"`) by themselves. Off when the floor
    /// arbiter decides deliveries.
    pub auto_deliver: bool,
}

impl Hookup {
    /// A `baton.xfer` packet arrived.
    pub fn on_data(
        &mut self,
        msg: &crate::room::Incoming,
        now: Instant,
        out: &mut Outbox,
    ) -> Vec<RelayEvent> {
        match self.present.get(&msg.from) {
            None => {
                tracing::debug!(from = %msg.from, "transfer frame from an identity the roster does not know yet; dropped")
            }
            Some(agent) => {
                let authorized = agent
                    .as_ref()
                    .is_some_and(|name| self.allowed_agents.is_empty() || self.allowed_agents.contains(name));
                self.relay.on_packet(&msg.from, &msg.payload, authorized, now)
            }
        }
        self.pump(now, out)
    }

    /// Cancels every delivery of a stored bundle to `to`.
    pub fn cancel_bundle(&mut self, transfer_id: TransferId, to: &str, now: Instant) {
        let ids: Vec<TransferId> = self
            .relay
            .deliveries
            .iter()
            .filter(|((t, _), d)| t == to && d.transfer_id == transfer_id)
            .map(|((_, id), _)| *id)
            .collect();
        for id in ids {
            self.relay.cancel(to, id, "handoff cancelled", now);
        }
    }

    /// Starts delivering a stored bundle (on the floor arbiter's word).
    pub fn deliver(
        &mut self,
        transfer_id: TransferId,
        to: &str,
        now: Instant,
        out: &mut Outbox,
    ) -> Vec<RelayEvent> {
        if let Err(e) = self.relay.deliver(transfer_id, to, now) {
            tracing::warn!(%to, error = %e, "could not deliver bundle");
        }
        self.pump(now, out)
    }

    /// A participant joined, changed or left.
    pub fn on_change(
        &mut self,
        change: &crate::room::Change,
        now: Instant,
        out: &mut Outbox,
    ) -> Vec<RelayEvent> {
        use crate::room::Change;
        match change {
            Change::Joined(m) => {
                self.present.insert(m.identity.clone(), is_agent(m));
                self.relay.peer_reconnected(&m.identity, now);
            }
            Change::Updated { after, .. } => {
                self.present.insert(after.identity.clone(), is_agent(after));
            }
            Change::Left(m) => {
                self.present.remove(&m.identity);
            }
        }
        self.pump(now, out)
    }

    /// baton (re)connected: the roster is current, every transfer resumes.
    pub fn on_connected(
        &mut self,
        roster: &crate::room::Roster,
        now: Instant,
        out: &mut Outbox,
    ) -> Vec<RelayEvent> {
        self.present = roster.members().map(|m| (m.identity.clone(), is_agent(m))).collect();
        self.relay.reconnected(now);
        self.pump(now, out)
    }

    /// When [`on_timeout`](Self::on_timeout) is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.relay.poll_timeout()
    }

    /// Timers.
    pub fn on_timeout(&mut self, now: Instant, out: &mut Outbox) -> Vec<RelayEvent> {
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            self.relay.on_timeout(now);
        }
        self.pump(now, out)
    }

    /// Drains the relay into the outbox; returns its events for the coordinator.
    fn pump(&mut self, now: Instant, out: &mut Outbox) -> Vec<RelayEvent> {
        let mut events = Vec::new();
        loop {
            for ev in self.relay.drain(out) {
                match &ev {
                    // From the OPEN on: a target already in the room gets the bundle forwarded
                    // while it arrives. Once stored, a target that was not there (or whose
                    // forward failed) gets it from the store.
                    RelayEvent::Receiving { transfer_id, meta, .. }
                    | RelayEvent::BundleReceived { transfer_id, meta, .. }
                        if self.auto_deliver =>
                    {
                        if let Some(to) = meta_target(meta) {
                            let entry = (*transfer_id, to);
                            if !self.pending.contains(&entry) {
                                self.pending.push(entry);
                            }
                        }
                    }
                    RelayEvent::ReceiveFailed { transfer_id, .. } => {
                        self.pending.retain(|(id, _)| id != transfer_id);
                    }
                    _ => {}
                }
                events.push(ev);
            }
            let mut started = false;
            let mut keep = Vec::new();
            for (id, to) in std::mem::take(&mut self.pending) {
                if self.relay.is_delivering(id, &to) {
                    continue;
                }
                if !self.present.get(&to).is_some_and(Option::is_some) {
                    keep.push((id, to));
                    continue;
                }
                match self.relay.deliver(id, &to, now) {
                    Ok(_) => started = true,
                    Err(e) => tracing::warn!(%to, error = %e, "could not deliver bundle"),
                }
            }
            self.pending = keep;
            if !started {
                return events;
            }
        }
    }
}

/// The identity a bundle's meta names as its target (`{"to": "<identity>"}`), if any.
fn meta_target(meta: &str) -> Option<String> {
    match serde_json::from_str(meta) {
        Ok(serde_json::Value::Object(m)) => match m.get("to") {
            Some(serde_json::Value::String(to)) => Some(to.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// `Some(agent name)` for an agent participant (empty when it has none), else `None`.
fn is_agent(m: &crate::room::Member) -> Option<String> {
    (m.kind == livekit_protocol::participant_info::Kind::Agent)
        .then(|| m.agent_name().unwrap_or_default().to_string())
}

fn frame_id(p: &[u8]) -> TransferId {
    let mut b = [0u8; 16];
    b.copy_from_slice(&p[4..20]);
    TransferId::from_be_bytes(b)
}

fn sha256(p: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(p).into()
}

fn truncate(s: &str) -> String {
    let max = baton_transfer::frame::MAX_REASON_LEN;
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn t(n: u128) -> TransferId {
        TransferId::new(n)
    }

    /// A source endpoint, the relay and target endpoints, wired back to back through an
    /// in-memory "server" in virtual time. Every packet is addressed to one identity.
    struct Net {
        now: Instant,
        relay: Relay,
        peers: BTreeMap<String, Endpoint>,
        agents: Vec<String>,
        wire: VecDeque<(String, String, Vec<u8>)>,
        /// Identities whose packets (both ways) are lost, as if disconnected.
        offline: Vec<String>,
        events: Vec<(String, Event)>,
        relay_events: Vec<RelayEvent>,
        to_baton: Vec<(String, Vec<u8>)>,
    }

    impl Net {
        fn new(cfg: RelayConfig, peers: &[&str], agents: &[&str]) -> Net {
            Net {
                now: Instant::now(),
                relay: Relay::new(cfg),
                peers: peers
                    .iter()
                    .map(|p| (p.to_string(), Endpoint::new(EndpointConfig::default())))
                    .collect(),
                agents: agents.iter().map(|s| s.to_string()).collect(),
                wire: VecDeque::new(),
                offline: Vec::new(),
                events: Vec::new(),
                relay_events: Vec::new(),
                to_baton: Vec::new(),
            }
        }

        fn peer(&mut self, id: &str) -> &mut Endpoint {
            self.peers.get_mut(id).expect("peer")
        }

        fn collect(&mut self) {
            for (name, ep) in self.peers.iter_mut() {
                while let Some(o) = ep.poll_output() {
                    match o {
                        Output::Transmit { to, payload } => self.wire.push_back((name.clone(), to, payload)),
                        Output::Event(e) => self.events.push((name.clone(), e)),
                    }
                }
            }
            let mut out = Outbox::default();
            self.relay_events.extend(self.relay.drain(&mut out));
            for (topic, payload, to) in out.data {
                assert_eq!(topic, TOPIC);
                assert_eq!(to.len(), 1, "relay packets go to exactly one identity");
                self.wire.push_back(("baton".into(), to[0].clone(), payload));
            }
        }

        /// Delivers packets and fires timers until nothing is left to do or `limit` passes.
        fn run(&mut self, limit: Duration) {
            let end = self.now + limit;
            loop {
                self.collect();
                if let Some((from, to, bytes)) = self.wire.pop_front() {
                    if self.offline.contains(&from) || self.offline.contains(&to) {
                        continue;
                    }
                    if to == "baton" {
                        self.to_baton.push((from.clone(), bytes.clone()));
                        let auth = self.agents.contains(&from);
                        self.relay.on_packet(&from, &bytes, auth, self.now);
                    } else {
                        let now = self.now;
                        self.peer(&to).handle_packet(&from, &bytes, now);
                    }
                    continue;
                }
                let next = self
                    .peers
                    .values()
                    .filter_map(Endpoint::poll_timeout)
                    .chain(self.relay.poll_timeout())
                    .min();
                match next {
                    Some(t) if t <= end => {
                        self.now = self.now.max(t);
                        let now = self.now;
                        for ep in self.peers.values_mut() {
                            if ep.poll_timeout().is_some_and(|t| t <= now) {
                                ep.handle_timeout(now);
                            }
                        }
                        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
                            self.relay.on_timeout(now);
                        }
                    }
                    _ => return,
                }
            }
        }

        fn send(&mut self, from: &str, id: TransferId, payload: &[u8], meta: &str) {
            let now = self.now;
            self.peer(from).send("baton", id, payload, meta, now).expect("send");
        }

        fn delivered_to(&self, who: &str) -> Vec<(TransferId, Vec<u8>, String)> {
            self.events
                .iter()
                .filter(|(n, _)| n == who)
                .filter_map(|(_, e)| match e {
                    Event::Delivered { id, payload, meta, .. } => Some((*id, payload.clone(), meta.clone())),
                    _ => None,
                })
                .collect()
        }

        fn send_outcome(&self, who: &str, tid: TransferId) -> Option<Result<(), TransferError>> {
            self.events.iter().filter(|(n, _)| n == who).find_map(|(_, e)| match e {
                Event::Sent { id, .. } if *id == tid => Some(Ok(())),
                Event::SendFailed { id, error, .. } if *id == tid => Some(Err(error.clone())),
                _ => None,
            })
        }
    }

    fn bundle(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn received(events: &[RelayEvent]) -> Vec<(String, TransferId, u64, String)> {
        events
            .iter()
            .filter_map(|e| match e {
                RelayEvent::BundleReceived { from, transfer_id, size, meta } => {
                    Some((from.clone(), *transfer_id, *size, meta.clone()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn source_to_relay_to_target_byte_exact() {
        let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
        let payload = bundle(5 * 1024 * 1024 + 17, 1);
        let meta = r#"{"to":"b","purpose":"handoff"}"#;
        net.send("a", t(7), &payload, meta);
        net.run(Duration::from_secs(5));
        // Leg 1 is acknowledged once the bundle is stored, before any delivery exists.
        assert_eq!(net.send_outcome("a", t(7)), Some(Ok(())));
        assert_eq!(received(&net.relay_events), vec![("a".into(), t(7), payload.len() as u64, meta.into())]);
        let info = net.relay.stored(t(7)).expect("stored");
        assert_eq!(info.from, "a");
        assert_eq!(info.sha256, sha256(&payload));
        assert_eq!(net.relay.store().used_bytes(), payload.len() as u64);
        assert!(net.delivered_to("b").is_empty());

        let did = net.relay.deliver(t(7), "b", net.now).expect("deliver");
        assert_ne!(did, t(7), "each delivery gets a fresh id");
        assert_eq!(
            net.relay.deliver(t(7), "b", net.now),
            Err(RelayError::AlreadyDelivering { transfer_id: t(7), to: "b".into() })
        );
        net.run(Duration::from_secs(5));
        let got = net.delivered_to("b");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, did);
        assert!(got[0].1 == payload, "payload differs");
        assert_eq!(got[0].2, meta, "meta is forwarded unchanged");
        let delivered: Vec<_> = net
            .relay_events
            .iter()
            .filter_map(|e| match e {
                RelayEvent::Delivered { to, transfer_id, delivery_id, bytes_sent } => {
                    Some((to.clone(), *transfer_id, *delivery_id, *bytes_sent))
                }
                _ => None,
            })
            .collect();
        assert_eq!(delivered, vec![("b".into(), t(7), did, payload.len() as u64)]);
        assert_eq!(net.relay.delivering(), 0);
        // The bundle stays stored (for a fallback) until removed.
        assert!(net.relay.stored(t(7)).is_some());
        assert_eq!(net.relay.remove(t(7)).map(|i| i.size), Some(payload.len() as u64));
        assert_eq!(net.relay.store().used_bytes(), 0);
        assert_eq!(net.relay.deliver(t(7), "b", net.now), Err(RelayError::UnknownBundle(t(7))));
    }

    #[test]
    fn unauthorized_sender_is_refused_and_nothing_is_buffered() {
        let mut net = Net::new(RelayConfig::default(), &["caller", "a"], &["a"]);
        let payload = bundle(200_000, 2);
        net.send("caller", t(9), &payload, r#"{"to":"a"}"#);
        net.run(Duration::from_secs(90));
        let err = net.send_outcome("caller", t(9)).expect("outcome").expect_err("refused");
        assert_eq!(err.code, NOT_AUTHORIZED);
        assert!(err.remote);
        assert!(err.reason.contains("not an agent"), "{}", err.reason);
        assert!(received(&net.relay_events).is_empty());
        assert!(net.relay.store().is_empty());
        assert_eq!(net.relay.receiving(), 0);
        assert!(net.delivered_to("a").is_empty());
        let rejected = net
            .relay_events
            .iter()
            .filter(|e| matches!(e, RelayEvent::Rejected { from, error, .. } if from == "caller" && error.code == NOT_AUTHORIZED))
            .count();
        assert!(rejected >= 1);
        // DATA frames from the unauthorized sender get no answer and are not buffered either.
        let data = Frame::Data { id: t(9), index: 0, bytes: vec![1; 300] }.encode().unwrap();
        net.relay.on_packet("caller", &data, false, net.now);
        let mut out = Outbox::default();
        let ev = net.relay.drain(&mut out);
        assert!(out.data.is_empty());
        assert!(matches!(&ev[..], [RelayEvent::Rejected { transfer_id: Some(id), .. }] if *id == t(9)));
        assert_eq!(net.relay.receiving(), 0);
    }

    #[test]
    fn store_cap_refuses_before_buffering_and_frees_on_remove() {
        let cfg = RelayConfig { store_bytes: 100_000, ..RelayConfig::default() };
        let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
        net.send("a", t(1), &bundle(70_000, 3), "");
        net.run(Duration::from_secs(5));
        assert_eq!(net.send_outcome("a", t(1)), Some(Ok(())));
        net.send("a", t(2), &bundle(40_000, 4), "");
        net.run(Duration::from_secs(5));
        let err = net.send_outcome("a", t(2)).expect("outcome").expect_err("full");
        assert_eq!(err.code, ErrorCode::BufferFull);
        assert!(err.reason.contains("bundle store"), "{}", err.reason);
        assert_eq!(net.relay.store().len(), 1);
        // Two concurrent transfers that fit one at a time: the second is refused at OPEN,
        // because the first's bytes are reserved while it arrives.
        net.relay.remove(t(1));
        net.send("a", t(3), &bundle(60_000, 5), "");
        net.send("a", t(4), &bundle(60_000, 6), "");
        net.run(Duration::from_secs(5));
        assert_eq!(net.send_outcome("a", t(3)), Some(Ok(())));
        assert_eq!(
            net.send_outcome("a", t(4)).expect("outcome").expect_err("full").code,
            ErrorCode::BufferFull
        );
        assert_eq!(net.relay.store().used_bytes(), 60_000);
        // The store itself enforces its cap too.
        let mut s = MemoryStore::new(10);
        let b = |n: usize| StoredBundle {
            info: BundleInfo {
                from: "a".into(),
                meta: String::new(),
                size: n as u64,
                sha256: [0; 32],
                received_at: net.now,
            },
            payload: vec![0u8; n].into(),
        };
        assert!(s.put(t(1), b(8)).is_ok());
        assert_eq!(s.put(t(1), b(1)), Err(StoreError::Exists(t(1))));
        assert!(matches!(s.put(t(2), b(3)), Err(StoreError::Full { used: 8, capacity: 10, need: 3 })));
    }

    #[test]
    fn oversized_bundle_refused_with_too_large() {
        let cfg = RelayConfig { max_bundle_size: 50_000, ..RelayConfig::default() };
        let mut net = Net::new(cfg, &["a"], &["a"]);
        net.send("a", t(5), &bundle(50_001, 7), "");
        net.run(Duration::from_secs(5));
        let err = net.send_outcome("a", t(5)).expect("outcome").expect_err("too large");
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert!(net.relay.store().is_empty());
        // Only the OPEN (and perhaps the first window) reached baton; nothing was buffered.
        assert_eq!(net.relay.receiving(), 0);
    }

    /// Moves packets one at a time until `done` holds (no timers: a clean link).
    fn step_until(net: &mut Net, done: impl Fn(&Net) -> bool) {
        for _ in 0..100_000 {
            net.collect();
            if done(net) {
                return;
            }
            let Some((from, to, bytes)) = net.wire.pop_front() else {
                panic!("link idle before the condition held")
            };
            let now = net.now;
            if to == "baton" {
                let auth = net.agents.contains(&from);
                net.relay.on_packet(&from, &bytes, auth, now);
            } else {
                net.peer(&to).handle_packet(&from, &bytes, now);
            }
        }
        panic!("condition never held");
    }

    #[test]
    fn a_bundle_still_arriving_is_forwarded_as_it_arrives() {
        let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
        let payload = bundle(600 * 1024 + 5, 4);
        net.send("a", t(7), &payload, r#"{"to":"b"}"#);
        step_until(&mut net, |n| {
            n.relay_events
                .iter()
                .any(|e| matches!(e, RelayEvent::Receiving { transfer_id, .. } if *transfer_id == t(7)))
        });
        assert!(net.relay.stored(t(7)).is_none(), "not stored yet");
        let did =
            net.relay.deliver(t(7), "b", net.now).expect("forwarding starts before the bundle is whole");
        // b gets chunks while a is still sending: b holds part of the bundle before baton has all of it.
        step_until(&mut net, |n| {
            n.peers["b"].receivers().receiver("baton", did).is_some_and(|r| r.held_chunks().count() > 2)
        });
        assert!(net.relay.stored(t(7)).is_none(), "b is receiving while leg 1 is still arriving");
        net.run(Duration::from_secs(5));
        assert_eq!(net.send_outcome("a", t(7)), Some(Ok(())));
        assert_eq!(net.delivered_to("b"), vec![(did, payload.clone(), r#"{"to":"b"}"#.into())]);
        let sent = net.relay_events.iter().find_map(|e| match e {
            RelayEvent::Delivered { to, transfer_id, delivery_id, bytes_sent }
                if to == "b" && *transfer_id == t(7) =>
            {
                Some((*delivery_id, *bytes_sent))
            }
            _ => None,
        });
        assert_eq!(sent, Some((did, payload.len() as u64)), "every chunk forwarded once");
        assert!(net.relay.stored(t(7)).is_some(), "and kept for a later delivery");
    }

    #[test]
    fn a_forward_fails_when_its_source_cancels() {
        let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
        let payload = bundle(2 * 1024 * 1024, 5); // more than one window (32 chunks)
        net.send("a", t(7), &payload, "{}");
        step_until(&mut net, |n| {
            n.relay_events
                .iter()
                .any(|e| matches!(e, RelayEvent::Receiving { transfer_id, .. } if *transfer_id == t(7)))
        });
        let did = net.relay.deliver(t(7), "b", net.now).expect("forward");
        step_until(&mut net, |n| n.peers["b"].receivers().receiver("baton", did).is_some());
        let now = net.now;
        assert!(net.peer("a").cancel("baton", t(7), "the caller hung up", now));
        net.run(Duration::from_secs(5));
        assert!(net.delivered_to("b").is_empty());
        assert!(net.relay.stored(t(7)).is_none());
        let failed = net.relay_events.iter().find_map(|e| match e {
            RelayEvent::DeliveryFailed { to, delivery_id, error, .. } if to == "b" && *delivery_id == did => {
                Some(error.clone())
            }
            _ => None,
        });
        let failed = failed.expect("the forward failed");
        assert_eq!(failed.code, ErrorCode::Cancelled);
        assert!(failed.reason.contains("the caller hung up"), "{failed}");
        assert!(
            net.events.iter().any(|(n, e)| n == "b" && matches!(e, Event::ReceiveFailed { .. })),
            "b was told"
        );
    }

    #[test]
    fn delivery_resumes_after_target_reconnect_without_restarting() {
        let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
        let payload = bundle(3 * 1024 * 1024, 8);
        net.send("a", t(11), &payload, "");
        net.run(Duration::from_secs(5));
        net.relay.deliver(t(11), "b", net.now).expect("deliver");
        // Let about two thirds through (~2 MB), then cut b off.
        let mut delivered_packets = 0;
        while delivered_packets < 140 {
            net.collect();
            let Some((from, to, bytes)) = net.wire.pop_front() else {
                break;
            };
            let now = net.now;
            if to == "baton" {
                net.relay.on_packet(&from, &bytes, true, now);
            } else {
                net.peer(&to).handle_packet(&from, &bytes, now);
                delivered_packets += 1;
            }
        }
        net.offline.push("b".into());
        net.run(Duration::from_millis(2500)); // RTO fires while b is away: those resends are lost
        net.offline.clear();
        let now = net.now;
        net.relay.peer_reconnected("b", now);
        net.peer("b").reconnected(now);
        net.run(Duration::from_secs(30));
        let got = net.delivered_to("b");
        assert_eq!(got.len(), 1);
        assert!(got[0].1 == payload);
        let sent = net
            .relay_events
            .iter()
            .find_map(|e| match e {
                RelayEvent::Delivered { bytes_sent, .. } => Some(*bytes_sent),
                _ => None,
            })
            .expect("delivered");
        let window = 32 * 14_976;
        // A restart would resend everything held before the cut (~2 MB); a resume resends
        // what was in flight at the cut, plus the RTO's resends lost during the outage.
        eprintln!("bytes sent for {} after the outage: {sent}", payload.len());
        assert!(sent > payload.len() as u64, "the outage cost nothing: nothing was cut");
        assert!(sent < payload.len() as u64 + 2 * window, "{sent} bytes sent for {}", payload.len());
    }

    #[test]
    fn ack_for_unknown_transfer_answered_and_others_continue() {
        let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
        let payload = bundle(400_000, 9);
        net.send("a", t(21), &payload, "");
        let ack = Frame::Ack {
            id: t(99),
            ack: baton_transfer::Ack {
                cumulative: 1,
                window: 32,
                ranges: vec![],
                resume: false,
                solicited: false,
            },
        };
        net.relay.on_packet("b", &ack.encode().unwrap(), true, net.now);
        let mut out = Outbox::default();
        let ev = net.relay.drain(&mut out);
        assert_eq!(out.data.len(), 1);
        assert_eq!(out.data[0].2, vec!["b".to_string()]);
        match Frame::decode(&out.data[0].1).unwrap() {
            Frame::Cancel { id, code, .. } if id == t(99) => assert_eq!(code, ErrorCode::UnknownTransfer),
            f => panic!("expected CANCEL, got {f:?}"),
        }
        assert!(matches!(&ev[..], [RelayEvent::Rejected { transfer_id: Some(id), .. }] if *id == t(99)));
        // Garbage and corrupt frames in the middle of a transfer change nothing.
        for junk in [&b"\xba\x01\x02"[..], b"hello", &[0xba, 9, 1, 0][..]] {
            net.relay.on_packet("a", junk, true, net.now);
        }
        net.run(Duration::from_secs(5));
        assert_eq!(net.send_outcome("a", t(21)), Some(Ok(())));
        assert_eq!(net.relay.stored(t(21)).map(|i| i.size), Some(400_000));
    }

    #[test]
    fn repeated_open_for_a_stored_bundle_is_confirmed_not_refetched() {
        let cfg = RelayConfig {
            endpoint: EndpointConfig {
                receivers: ReceiversConfig { finished_linger: Duration::from_secs(1), ..Default::default() },
                ..Default::default()
            },
            ..RelayConfig::default()
        };
        let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
        let payload = bundle(50_000, 10);
        net.send("a", t(31), &payload, "");
        net.run(Duration::from_secs(5));
        net.now += Duration::from_secs(5); // past the engine's linger
        net.send("a", t(31), &payload, "");
        net.run(Duration::from_secs(5));
        assert_eq!(received(&net.relay_events).len(), 1, "stored once");
        let oks = net
            .events
            .iter()
            .filter(|(n, e)| n == "a" && matches!(e, Event::Sent { id, .. } if *id == t(31)))
            .count();
        assert_eq!(oks, 2);
        // Another agent reusing the id is refused.
        net.send("b", t(31), &bundle(50_000, 11), "");
        net.run(Duration::from_secs(5));
        assert_eq!(net.send_outcome("b", t(31)).unwrap().unwrap_err().code, ErrorCode::ConflictingOpen);
    }

    #[test]
    fn stored_bundles_expire_after_retention() {
        let cfg = RelayConfig { retention: Some(Duration::from_secs(60)), ..RelayConfig::default() };
        let mut net = Net::new(cfg, &["a"], &["a"]);
        net.send("a", t(41), &bundle(1000, 12), "");
        net.run(Duration::from_secs(5));
        assert!(net.relay.stored(t(41)).is_some());
        net.run(Duration::from_secs(120));
        assert!(net.relay.stored(t(41)).is_none());
        assert!(net.relay_events.contains(&RelayEvent::Expired { transfer_id: t(41) }));
        assert_eq!(net.relay.poll_timeout(), None);
    }
}
