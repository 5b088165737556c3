//! The relay: one room's transfer endpoint at baton, its bundle store and its membership rules,
//! as a sans-IO state machine (no sockets, no clock, no tasks; time comes in with every call).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use baton_transfer::frame::truncate_reason;
use baton_transfer::{
    Direction, Endpoint, EndpointConfig, ErrorCode, Event, Frame, Kind, Open, Output, TransferError,
    TransferId,
};

use super::members::{Members, Standing};
use super::store::{BundleInfo, BundleStore, MemoryStore, StoreError, StoredBundle};
use crate::recovery::checkpoint::{self, Checkpoints, Limits, Refusal};
use crate::room::{Change, Roster};

/// Who starts deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Only [`Relay::deliver`] does: the floor arbiter decides which bundle goes to which
    /// target, and when.
    #[default]
    OnCommand,
    /// The relay delivers every bundle whose OPEN metadata is a JSON object naming a target
    /// (`{"to": "<identity>"}`) to that identity, once it is in the room as an agent
    /// participant: forwarded while it arrives when the target is already there, from the store
    /// otherwise (and again from the store if the forward failed). For a baton with no agents
    /// configured, which has no arbiter (`docs/protocol.md`, section 4.10).
    MetaTarget,
}

/// Configuration of one room's relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Agent names that may send bundles to baton; empty allows every agent participant.
    pub allowed_agents: BTreeSet<String>,
    /// Who starts deliveries.
    pub routing: Routing,
    /// Payload bytes the in-memory store of [`Relay::new`] holds. Default 128 MiB. The room's
    /// merged checkpoints are capped at the store's capacity too (kept apart from it).
    pub store_bytes: u64,
    /// How long a stored bundle is kept after it arrived, delivered or not, so it can be
    /// delivered again (fallback to another agent, hand back). `None` keeps it until
    /// [`Relay::remove`]. Default 10 minutes.
    pub retention: Option<Duration>,
    /// The transfer engine's configuration: sender tuning, and the limits on what baton
    /// receives (largest bundle, transfers per sender, bytes buffered while arriving). Its
    /// defaults are the protocol's (`docs/protocol.md`, section 4.5).
    pub endpoint: EndpointConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            allowed_agents: BTreeSet::new(),
            routing: Routing::OnCommand,
            store_bytes: 128 * 1024 * 1024,
            retention: Some(Duration::from_secs(600)),
            endpoint: EndpointConfig::default(),
        }
    }
}

/// A data packet to publish: reliable, topic [`baton_transfer::TOPIC`], addressed to `to`
/// only (`destination_identities = [to]`), bulk priority (it may wait behind control messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The one participant identity the packet is for.
    pub to: String,
    /// One encoded transfer frame, at most [`MAX_FRAME_SIZE`](baton_transfer::frame::MAX_FRAME_SIZE)
    /// bytes.
    pub payload: Vec<u8>,
}

/// Why [`Relay::deliver`] could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// No bundle with this id is stored or arriving (never received, removed, or expired).
    #[error("no bundle with transfer id {0} is stored or arriving (never received, removed or expired)")]
    UnknownBundle(TransferId),
    /// A delivery of this bundle to this participant is already under way.
    #[error("bundle {transfer_id} is already being delivered to {to}")]
    AlreadyDelivering {
        /// The bundle.
        transfer_id: TransferId,
        /// The target.
        to: String,
    },
    /// The target is not in the room as an agent participant; bundles go to agents only.
    #[error("{0} is not an agent participant in the room; bundles are delivered to agents only")]
    NotAnAgent(String),
    /// The store could not be read.
    #[error("cannot read the stored bundle: {0}")]
    Store(StoreError),
    /// The transfer engine refused to start the transfer.
    #[error("cannot start the delivery: {0}")]
    Transfer(TransferError),
}

/// What the relay reports, for the floor arbiter and the logs. Every event is also logged by
/// the relay itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// An authorized sender's OPEN was accepted: the bundle is arriving and can already be
    /// delivered onwards ([`Relay::deliver`] forwards it while it arrives).
    Receiving {
        /// The source agent.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// Payload size announced, in bytes.
        size: u64,
        /// The OPEN's metadata string.
        meta: String,
    },
    /// A bundle arrived whole, verified, and is stored under `transfer_id`; the source is told
    /// COMPLETE.
    BundleReceived {
        /// The source agent.
        from: String,
        /// The source's transfer id; the key in the store.
        transfer_id: TransferId,
        /// Payload size in bytes.
        size: u64,
        /// The OPEN's metadata string.
        meta: String,
    },
    /// More of an incoming bundle arrived: baton now holds `bytes` of it (wire bytes, in whole
    /// chunks, counted from the start of the transfer). Reported when the count grows, so the
    /// floor's deadlines can follow a bundle that is still moving.
    UploadProgress {
        /// The source agent.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// Bytes baton holds.
        bytes: u64,
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
        /// The bundle's id (the source's transfer id).
        transfer_id: TransferId,
        /// The id of this delivery (leg 2).
        delivery_id: TransferId,
        /// Chunk bytes baton sent for this delivery, retransmissions included.
        bytes_sent: u64,
        /// Of `bytes_sent`, the bytes of chunks sent more than once.
        bytes_resent: u64,
    },
    /// The target acknowledged more of a delivery: it now holds `bytes` of it (wire bytes, in
    /// whole chunks, counted from the start of the delivery). Reported when the count grows.
    DeliveryProgress {
        /// The target.
        to: String,
        /// The bundle's id (the source's transfer id).
        transfer_id: TransferId,
        /// The id of this delivery (leg 2).
        delivery_id: TransferId,
        /// Bytes the target acknowledged.
        bytes: u64,
    },
    /// A delivery ended without confirmation.
    DeliveryFailed {
        /// The target.
        to: String,
        /// The bundle's id.
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
        /// The bundle's id.
        transfer_id: TransferId,
    },
    /// A checkpoint (OPEN meta `purpose: "checkpoint"`) arrived whole and was merged into the
    /// room's state for its agent name; the source is told COMPLETE. Nothing is stored as a
    /// bundle.
    CheckpointApplied {
        /// The source agent's identity.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// The payload's agent name (the source's `lk.agent.name`).
        agent: String,
        /// The checkpoint's `seq`.
        seq: u64,
        /// Whether it was a base.
        base: bool,
        /// Payload size in bytes.
        bytes: u64,
        /// What the room's merged checkpoints (every agent name) take now, in the units of the
        /// cap ([`Merged::bytes`](crate::recovery::checkpoint::Merged::bytes)).
        state_bytes: u64,
    },
    /// A checkpoint was not applied: refused at OPEN (its sender was declared stale), refused by
    /// the merge after it arrived (the source gets ERROR instead of COMPLETE), or its transfer
    /// failed (cancelled, timed out, corrupt, or aborted by [`Relay::declare_stale`]). Refusals
    /// by the transfer engine's own limits (`too_large`, `too_many_transfers`) come as
    /// [`RelayEvent::Rejected`], as for any transfer.
    CheckpointRejected {
        /// The source's identity.
        from: String,
        /// The source's transfer id.
        transfer_id: TransferId,
        /// What the source was told: code 14 `checkpoint_rejected` with a reason starting with
        /// the refusal's token (`out_of_sequence`, `no_base`, `wrong_agent`, `bad_checkpoint`,
        /// `stale_sender`), code 6 `buffer_full` over the room's cap, or the transfer's failure.
        error: TransferError,
    },
}

/// An incoming transfer the relay let through to the engine, with what it will store.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    payload_size: u64,
    sha256: [u8; 32],
}

/// baton's end of context transfer for one room. See the module docs for what it does; this
/// is how to drive it.
///
/// - **Getters**: [`store`](Self::store), [`checkpoints`](Self::checkpoints),
///   [`receiving`](Self::receiving), [`delivering`](Self::delivering),
///   [`is_delivering`](Self::is_delivering).
/// - **`handle_*`**, what the room reports: [`handle_packet`](Self::handle_packet) for every
///   data packet on topic `baton.xfer`, [`handle_change`](Self::handle_change) for every roster
///   change, [`handle_connected`](Self::handle_connected) when baton itself (re)joined,
///   [`handle_timeout`](Self::handle_timeout) once the instant from `poll_timeout` is reached.
/// - **Mutators**, what the coordinator decides: [`deliver`](Self::deliver),
///   [`cancel_deliveries`](Self::cancel_deliveries), [`remove`](Self::remove),
///   [`declare_stale`](Self::declare_stale), [`recovery_bundle`](Self::recovery_bundle).
/// - **`poll_*`**, what comes out: [`poll_transmit`](Self::poll_transmit) (packets to
///   publish), [`poll_event`](Self::poll_event) (what happened),
///   [`poll_timeout`](Self::poll_timeout) (when to call `handle_timeout`).
///
/// After any mutation (a `handle_*` call or a mutator), poll until `poll_transmit` and
/// `poll_event` return `None`, then ask `poll_timeout`: packets and events wait in the relay
/// until polled, and every call can move the next deadline.
#[derive(Debug)]
pub struct Relay {
    endpoint: Endpoint,
    store: Box<dyn BundleStore>,
    members: Members,
    routing: Routing,
    retention: Option<Duration>,
    max_bundle_size: u64,
    /// Who may upload a new bundle besides being an authorized agent: `None` lets every
    /// authorized agent (a bare relay); `Some` names the floor holder and the source of the
    /// handoff under way, kept current by the coordinator (`set_uploaders`).
    uploaders: Option<BTreeSet<String>>,
    /// Incoming bundles admitted to the engine, by (source, transfer id).
    admitted: HashMap<(String, TransferId), Admitted>,
    /// The room's merged checkpoints, one state per agent name (issue 13).
    checkpoints: Checkpoints,
    /// Incoming checkpoints admitted to the engine, by (source, transfer id). Kept apart from
    /// `admitted`: a checkpoint reserves no store bytes, reports no upload progress (the floor
    /// would take it for a handoff's bundle) and can never be delivered onwards.
    checkpoints_arriving: HashSet<(String, TransferId)>,
    /// Deliveries under way: (target, delivery id) -> the bundle's transfer id.
    deliveries: HashMap<(String, TransferId), TransferId>,
    /// Bytes last reported as progress, per transfer in the engine: (the other end, the
    /// engine's transfer id: the source's id of an upload, the delivery id of a delivery).
    progress: HashMap<(String, TransferId), u64>,
    /// [`Routing::MetaTarget`]: bundles waiting for their target, (transfer id, target).
    pending: Vec<(TransferId, String)>,
    /// Stored bundles by expiry time.
    expiry: BTreeSet<(Instant, TransferId)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<RelayEvent>,
    /// Hold each checkpoint's COMPLETE until [`release_ack`](Self::release_ack): set when the
    /// room's state goes to a durable store, so COMPLETE means "stored durably" (issue 14).
    hold_acks: bool,
    /// COMPLETEs held for checkpoints applied in memory, by (source, transfer id).
    held_acks: HashMap<(String, TransferId), Transmit>,
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

    /// A relay over any store (the store's own cap applies; `cfg.store_bytes` is used only when
    /// the store cannot say its cap). A checkpoint is bounded by the transfer's
    /// `max_bundle_size`, the room's merged checkpoints by the store's cap.
    pub fn with_store(cfg: RelayConfig, store: Box<dyn BundleStore>) -> Self {
        let max_bundle_size = cfg.endpoint.receivers.transfer.max_bundle_size;
        let cap = store.usage().map_or(cfg.store_bytes, |u| u.capacity);
        let limits = Limits {
            max_checkpoint_size: usize::try_from(max_bundle_size).unwrap_or(usize::MAX),
            max_state_bytes: usize::try_from(cap).unwrap_or(usize::MAX),
        };
        Relay {
            max_bundle_size,
            endpoint: Endpoint::new(cfg.endpoint),
            store,
            members: Members::new(cfg.allowed_agents),
            routing: cfg.routing,
            retention: cfg.retention,
            uploaders: None,
            admitted: HashMap::new(),
            checkpoints: Checkpoints::new(limits),
            checkpoints_arriving: HashSet::new(),
            deliveries: HashMap::new(),
            progress: HashMap::new(),
            pending: Vec::new(),
            expiry: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            hold_acks: false,
            held_acks: HashMap::new(),
        }
    }

    /// Limits new uploads (OPEN) to these identities, or lifts the limit with `None`. A new
    /// OPEN from anyone else is answered ERROR `not_floor_holder` (15) and nothing is stored;
    /// transfers already admitted carry on. With agents configured the coordinator keeps this
    /// to the floor holder and the source of the handoff under way, so an agent released after
    /// a handoff (or a standby) cannot put bundles into baton's store (issue 11, item 4).
    pub fn set_uploaders(&mut self, uploaders: Option<BTreeSet<String>>) {
        self.uploaders = uploaders;
    }

    /// Holds the COMPLETE of every applied checkpoint until [`release_ack`](Self::release_ack)
    /// (or [`refuse_ack`](Self::refuse_ack)): for a room whose merged state goes to a durable
    /// store, so the agent's COMPLETE means the state survives baton.
    pub fn hold_checkpoint_acks(&mut self, hold: bool) {
        self.hold_acks = hold;
    }

    /// Sends the held COMPLETE of checkpoint `id` from `from` (its state is durable now).
    /// Returns false when none was held.
    pub fn release_ack(&mut self, from: &str, id: TransferId) -> bool {
        match self.held_acks.remove(&(from.to_owned(), id)) {
            Some(t) => {
                self.transmits.push_back(t);
                true
            }
            None => false,
        }
    }

    /// Answers checkpoint `id` from `from` with ERROR `buffer_full` instead of its held COMPLETE
    /// (the store refused the state: over the room's cap, or the room's lease is lost). The
    /// merged state in memory stays; the agent's next checkpoint is a base.
    pub fn refuse_ack(&mut self, from: &str, id: TransferId, reason: &str) -> bool {
        if self.held_acks.remove(&(from.to_owned(), id)).is_none() {
            return false;
        }
        let reason = format!("baton could not store the checkpoint durably: {reason}");
        self.transmit(
            from,
            &Frame::Error { id, code: ErrorCode::BufferFull, reason: truncate_reason(&reason) },
        );
        self.endpoint.reject_completed(from, id, ErrorCode::BufferFull);
        true
    }

    /// Applies a merged state a durable store kept (a base checkpoint from
    /// [`Merged::base_checkpoint`](crate::recovery::checkpoint::Merged::base_checkpoint)) as
    /// if `owner` had sent it, when a baton comes back to a room. Errors: the payload does not
    /// apply (see [`Refusal`]).
    pub fn restore_checkpoint(&mut self, owner: &str, agent: &str, payload: &[u8]) -> Result<(), Refusal> {
        self.checkpoints.apply(owner, Some(agent), payload).map(|_| ())
    }

    // --- getters ---------------------------------------------------------------------------

    /// The bundle store (for counters and look-ups).
    pub fn store(&self) -> &dyn BundleStore {
        self.store.as_ref()
    }

    /// The room's merged checkpoints (per agent name: owner, last `seq`, items, bytes).
    pub fn checkpoints(&self) -> &Checkpoints {
        &self.checkpoints
    }

    /// Incoming transfers under way (bundles and checkpoints).
    pub fn receiving(&self) -> usize {
        self.endpoint.receivers().active()
    }

    /// Deliveries under way.
    pub fn delivering(&self) -> usize {
        self.deliveries.len()
    }

    /// Whether a delivery of bundle `transfer_id` to `to` is under way.
    pub fn is_delivering(&self, transfer_id: TransferId, to: &str) -> bool {
        self.deliveries.iter().any(|((t, _), b)| t == to && *b == transfer_id)
    }

    // --- handle_* --------------------------------------------------------------------------

    /// One data packet on topic `baton.xfer` from `from` (the server-stamped identity).
    ///
    /// A sender the room has not announced is ignored. A sender that is not an authorized
    /// agent never reaches the engine and nothing of it is buffered: OPEN and RESUME are
    /// answered with ERROR `not_authorized`, the rest is dropped; the one exception is an
    /// acknowledgement for a delivery baton itself is making to `from`. An authorized sender's
    /// OPEN is checked against the store before the engine buffers anything.
    pub fn handle_packet(&mut self, from: &str, payload: &[u8], now: Instant) {
        match self.members.standing(from) {
            Standing::Unknown => {
                tracing::debug!(%from, "transfer frame from an identity the room has not announced; dropped")
            }
            Standing::Unauthorized => self.unauthorized_packet(from, payload, now),
            Standing::Authorized => self.authorized_packet(from, payload, now),
        }
        self.route(now);
    }

    /// A participant joined, changed or left. A participant that (re)joins resumes its
    /// transfers in both directions from what was acknowledged.
    pub fn handle_change(&mut self, change: &Change, now: Instant) {
        if let Some(identity) = self.members.apply(change) {
            self.endpoint.participant_reconnected(identity, now);
            self.pull(now);
        }
        self.route(now);
    }

    /// baton itself (re)joined the room: `roster` is who is there now, and every transfer
    /// resumes.
    pub fn handle_connected(&mut self, roster: &Roster, now: Instant) {
        self.members.reset(roster);
        self.endpoint.reconnected(now);
        self.pull(now);
        self.route(now);
    }

    /// Advances the engine's timers and drops stored bundles whose retention ran out.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.pull(now);
        while let Some(&(at, id)) = self.expiry.first() {
            if at > now {
                break;
            }
            self.expiry.remove(&(at, id));
            match self.store.remove(id) {
                Ok(Some(_)) => {
                    tracing::info!(transfer_id = %id, "stored bundle expired");
                    self.events.push_back(RelayEvent::Expired { transfer_id: id });
                }
                Ok(None) => {}
                // Not retried: a store that cannot remove keeps the bundle until its own
                // retention (or an operator) drops it.
                Err(e) => {
                    tracing::error!(transfer_id = %id, error = %e, "expired bundle could not be removed")
                }
            }
        }
        self.route(now);
    }

    // --- mutators --------------------------------------------------------------------------

    /// Starts delivering bundle `transfer_id` to `to`, an agent participant in the room;
    /// returns the new delivery's id. A stored bundle is sent from the store; one still
    /// arriving is forwarded chunk by chunk as it arrives (cut-through), and that delivery
    /// fails if the arrival does. The outcome comes as [`RelayEvent::Delivered`] or
    /// [`RelayEvent::DeliveryFailed`].
    pub fn deliver(
        &mut self,
        transfer_id: TransferId,
        to: &str,
        now: Instant,
    ) -> Result<TransferId, RelayError> {
        let started = self.start_delivery(transfer_id, to, now);
        self.route(now);
        started
    }

    fn start_delivery(
        &mut self,
        transfer_id: TransferId,
        to: &str,
        now: Instant,
    ) -> Result<TransferId, RelayError> {
        if !self.members.is_agent(to) {
            return Err(RelayError::NotAnAgent(to.to_owned()));
        }
        if self.is_delivering(transfer_id, to) {
            return Err(RelayError::AlreadyDelivering { transfer_id, to: to.to_owned() });
        }
        let stored = self.store.get(transfer_id).map_err(RelayError::Store)?;
        let arriving = self
            .admitted
            .iter()
            .find(|((_, id), _)| *id == transfer_id)
            .map(|((from, _), a)| (from.clone(), *a));
        // A fresh id per delivery attempt: a redelivery is never answered with the target's
        // remembered verdict on an earlier attempt (section 4.10).
        let delivery_id = loop {
            let id = TransferId::new(rand::random());
            if !self.deliveries.contains_key(&(to.to_owned(), id)) {
                break id;
            }
        };
        let (started, bytes, how) = match (stored, arriving) {
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
        self.deliveries.insert((to.to_owned(), delivery_id), transfer_id);
        tracing::info!(%to, %transfer_id, %delivery_id, bytes, "{how}");
        self.pull(now);
        Ok(delivery_id)
    }

    /// Cancels every delivery of bundle `transfer_id` to `to` (CANCEL `cancelled` with
    /// `reason`); returns how many were under way. The stored bundle stays.
    pub fn cancel_deliveries(
        &mut self,
        transfer_id: TransferId,
        to: &str,
        reason: &str,
        now: Instant,
    ) -> usize {
        let ids: Vec<TransferId> = self
            .deliveries
            .iter()
            .filter(|((t, _), b)| t == to && **b == transfer_id)
            .map(|((_, id), _)| *id)
            .collect();
        for &id in &ids {
            self.endpoint.cancel(to, id, reason, now);
        }
        self.pull(now);
        self.route(now);
        ids.len()
    }

    /// Drops a stored bundle (its handoff is over). Deliveries under way keep their own copy.
    pub fn remove(&mut self, transfer_id: TransferId) -> Result<Option<BundleInfo>, StoreError> {
        let info = self.store.remove(transfer_id)?;
        self.expiry.retain(|(_, id)| *id != transfer_id);
        Ok(info)
    }

    /// `identity` was declared crashed or replaced (issue 13). Its checkpoints are refused from
    /// now on (ERROR 14 `stale_sender`), and so are its new bundles (ERROR 15
    /// `not_floor_holder`); transfers still arriving from it are aborted with the same codes,
    /// each reported as it ends ([`RelayEvent::CheckpointRejected`], or
    /// [`RelayEvent::ReceiveFailed`] for a bundle). The merged state it owns stays, for its
    /// replacement ([`recovery_bundle`](Self::recovery_bundle)). There is no way back: a
    /// replacement joins under a new identity.
    pub fn declare_stale(&mut self, identity: &str, now: Instant) {
        self.checkpoints.declare_stale(identity);
        let refusal = Refusal::StaleSender { identity: identity.to_owned() };
        let arriving: Vec<(TransferId, ErrorCode, String)> = self
            .checkpoints_arriving
            .iter()
            .filter(|(from, _)| from == identity)
            .map(|(_, id)| (*id, refusal.code(), refusal.to_string()))
            .chain(
                self.admitted
                    .keys()
                    .filter(|(from, _)| from == identity)
                    .map(|(_, id)| (*id, ErrorCode::NotFloorHolder, stale_bundle_reason(identity))),
            )
            .collect();
        tracing::info!(%identity, aborted = arriving.len(), "declared stale: its checkpoints and bundles are refused from now on");
        for (id, code, reason) in arriving {
            self.endpoint.abort_incoming(identity, id, code, &reason, now);
        }
        self.pull(now);
        self.route(now);
    }

    /// Builds the `baton.bundle/1` that hydrates a replacement for `agent` (an agent name) from
    /// the room's merged checkpoints ([`Merged::recovery_bundle`]: `"cause":"recovery"`,
    /// `handoff_id` = `recovery_id`, `reason` (the spec's `"recovery after <signal>"`),
    /// `created_at` in epoch seconds) and stores it like a received bundle: under a fresh random
    /// transfer id, with meta `{"content_type":"application/vnd.baton.bundle+json",
    /// "purpose":"recovery"}`, `from` = the identity that owns the state, and the store's
    /// retention. [`deliver`](Self::deliver) then sends it to the replacement as it sends a
    /// handoff's bundle. Returns the id and the size in bytes; `None` (logged) when no
    /// checkpoint of `agent` was applied or the store refused it. No event: the caller holds
    /// the answer.
    ///
    /// [`Merged::recovery_bundle`]: crate::recovery::checkpoint::Merged::recovery_bundle
    pub fn recovery_bundle(
        &mut self,
        agent: &str,
        recovery_id: &str,
        reason: &str,
        created_at: f64,
        now: Instant,
    ) -> Option<(TransferId, u64)> {
        let Some(merged) = self.checkpoints.get(agent) else {
            tracing::warn!(%agent, %recovery_id, "no recovery bundle: baton holds no checkpoint of this agent");
            return None;
        };
        let payload = merged.recovery_bundle(reason, Some(recovery_id), created_at);
        let (owner, seq) = (merged.owner().to_owned(), merged.last_seq());
        let meta = serde_json::json!({
            "content_type": checkpoint::BUNDLE_CONTENT_TYPE,
            "purpose": checkpoint::RECOVERY_PURPOSE,
        })
        .to_string();
        let sha256 = {
            use sha2::Digest;
            sha2::Sha256::digest(&payload).into()
        };
        let size = payload.len() as u64;
        // 128 random bits: a collision with a stored or arriving id is not worth a retry loop;
        // the store's `Exists` would refuse it.
        let id = TransferId::new(rand::random());
        let info = BundleInfo { from: owner, meta, size, sha256 };
        match self.store.put(id, StoredBundle { info, payload: payload.into() }) {
            Ok(()) => {
                if let Some(r) = self.retention {
                    self.expiry.insert((now + r, id));
                }
                tracing::info!(%agent, %recovery_id, transfer_id = %id, size, seq, "recovery bundle built and stored");
                Some((id, size))
            }
            Err(e) => {
                tracing::error!(%agent, %recovery_id, error = %e, "recovery bundle could not be stored");
                None
            }
        }
    }

    // --- poll_* ----------------------------------------------------------------------------

    /// The next packet to publish.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.expiry.first().map(|(t, _)| *t);
        [self.endpoint.poll_timeout(), expiry].into_iter().flatten().min()
    }

    // --- internals -------------------------------------------------------------------------

    fn authorized_packet(&mut self, from: &str, payload: &[u8], now: Instant) {
        if let Some((Kind::Open, id)) = Frame::peek(payload)
            && !self.arriving(from, id)
            && let Ok(Frame::Open { open, .. }) = Frame::decode(payload)
        {
            self.open(from, id, &open, payload, now);
            return;
        }
        self.endpoint.handle_packet(from, payload, now);
        if let Some((_, id)) = Frame::peek(payload) {
            self.report_progress(from, id);
        }
        self.pull(now);
    }

    /// Reports the progress a packet from `from` about transfer `id` made, if it made any:
    /// chunks of an upload baton received, or chunks of a delivery the target acknowledged.
    fn report_progress(&mut self, from: &str, id: TransferId) {
        let key = (from.to_owned(), id);
        let (bytes, event) = if self.admitted.contains_key(&key) {
            let Some(bytes) = self.endpoint.receivers().receiver(from, id).map(|r| r.held_bytes()) else {
                return;
            };
            (bytes, RelayEvent::UploadProgress { from: from.to_owned(), transfer_id: id, bytes })
        } else if let Some(&transfer_id) = self.deliveries.get(&key) {
            let Some(bytes) = self.endpoint.sender(from, id).map(|s| s.acked_bytes()) else { return };
            let to = from.to_owned();
            (bytes, RelayEvent::DeliveryProgress { to, transfer_id, delivery_id: id, bytes })
        } else {
            return;
        };
        let last = self.progress.entry(key).or_insert(0);
        if bytes > *last {
            *last = bytes;
            self.emit(event);
        }
    }

    /// Whether transfer `id` from `from` was admitted and is still arriving.
    fn arriving(&self, from: &str, id: TransferId) -> bool {
        let key = (from.to_owned(), id);
        self.admitted.contains_key(&key) || self.checkpoints_arriving.contains(&key)
    }

    /// A new OPEN from an authorized sender: admission (a checkpoint's, or a bundle's against
    /// the store), then the engine.
    fn open(&mut self, from: &str, id: TransferId, open: &Open, payload: &[u8], now: Instant) {
        let key = (from.to_owned(), id);
        let checkpoint = meta_member(&open.meta, "purpose").as_deref() == Some(checkpoint::PURPOSE);
        if checkpoint {
            // Any configured agent may checkpoint, not only the floor holder: a standby keeps
            // its own state (docs/protocol.md, "Checkpoints").
            if self.checkpoints.is_stale(from) {
                let refusal = Refusal::StaleSender { identity: from.to_owned() };
                let error =
                    TransferError { code: refusal.code(), reason: refusal.to_string(), remote: false };
                self.transmit(
                    from,
                    &Frame::Error { id, code: error.code, reason: truncate_reason(&error.reason) },
                );
                self.checkpoint_rejected(from.to_owned(), id, error);
                return;
            }
            self.checkpoints_arriving.insert(key.clone());
        } else {
            if !self.admit(from, id, open) {
                return;
            }
            self.admitted
                .insert(key.clone(), Admitted { payload_size: open.payload_size, sha256: open.sha256 });
        }
        let before = self.endpoint.receivers().active();
        self.endpoint.handle_packet(from, payload, now);
        let accepted = self.endpoint.receivers().active() > before;
        if accepted && checkpoint {
            tracing::debug!(%from, transfer_id = %id, size = open.payload_size, "receiving checkpoint");
        } else if accepted {
            self.emit(RelayEvent::Receiving {
                from: from.to_owned(),
                transfer_id: id,
                size: open.payload_size,
                meta: open.meta.clone(),
            });
        }
        self.pull(now);
        if !accepted {
            // Refused by the engine (its limits), which answered; or completed at once (an
            // empty payload), already handled by `pull`.
            self.admitted.remove(&key);
            self.checkpoints_arriving.remove(&key);
        }
    }

    /// Store admission for a new OPEN. Answers and reports a refusal itself and returns false;
    /// returns true when the engine should see the OPEN.
    fn admit(&mut self, from: &str, id: TransferId, open: &Open) -> bool {
        let refuse = |relay: &mut Relay, code, reason: String| {
            relay.refuse(from, id, code, reason);
            false
        };
        match self.store.info(id) {
            Ok(None) => {}
            Ok(Some(info)) => {
                // Already stored: its COMPLETE was lost and the engine has forgotten the
                // transfer, or another agent reuses the id.
                if info.from == from && info.sha256 == open.sha256 && info.size == open.payload_size {
                    self.transmit(from, &Frame::Complete { id, sha256: info.sha256 });
                    return false;
                }
                let reason = "a different bundle with this transfer id is stored; use a fresh random id";
                return refuse(self, ErrorCode::ConflictingOpen, reason.into());
            }
            Err(e) => {
                return refuse(self, ErrorCode::BufferFull, format!("baton's bundle store failed: {e}"));
            }
        }
        if self.checkpoints.is_stale(from) {
            return refuse(self, ErrorCode::NotFloorHolder, stale_bundle_reason(from));
        }
        if let Some(uploaders) = &self.uploaders
            && !uploaders.contains(from)
        {
            tracing::warn!(
                target: crate::logging::SECURITY_TARGET,
                %from,
                "security: stale_sender: bundle from an agent that neither holds the floor nor is the source of the handoff under way; refused"
            );
            let reason = format!(
                "{from} does not hold the floor and is not the source of the handoff under way; baton takes bundles only from them"
            );
            return refuse(self, ErrorCode::NotFloorHolder, reason);
        }
        if open.payload_size > self.max_bundle_size {
            return true; // the engine answers too_large with its own wording
        }
        let usage = match self.store.usage() {
            Ok(u) => u,
            Err(e) => {
                return refuse(self, ErrorCode::BufferFull, format!("baton's bundle store failed: {e}"));
            }
        };
        // Transfers still arriving have their bytes reserved, so a COMPLETE always means stored.
        let reserved: u64 = self.admitted.values().map(|a| a.payload_size).sum();
        if usage.bytes.saturating_add(reserved).saturating_add(open.payload_size) > usage.capacity {
            let reason = format!(
                "baton's bundle store holds {} of {} bytes ({reserved} more arriving); retry after stored bundles are delivered",
                usage.bytes, usage.capacity
            );
            return refuse(self, ErrorCode::BufferFull, reason);
        }
        true
    }

    fn refuse(&mut self, from: &str, id: TransferId, code: ErrorCode, reason: String) {
        tracing::warn!(%from, transfer_id = %id, %code, %reason, "refused bundle");
        self.transmit(from, &Frame::Error { id, code, reason: truncate_reason(&reason) });
        self.emit(RelayEvent::Rejected {
            from: from.to_owned(),
            transfer_id: Some(id),
            error: TransferError { code, reason, remote: false },
        });
    }

    fn unauthorized_packet(&mut self, from: &str, payload: &[u8], now: Instant) {
        let header = Frame::peek(payload);
        if let Some((kind, id)) = header
            && kind.direction() == Direction::ToSender
            && self.deliveries.contains_key(&(from.to_owned(), id))
        {
            // Our own delivery target acknowledging: not a bundle sent to baton.
            self.endpoint.handle_packet(from, payload, now);
            self.report_progress(from, id);
            self.pull(now);
            return;
        }
        // Rate-limited with counts by the log setup (crate::logging), like every security line.
        tracing::warn!(
            target: crate::logging::SECURITY_TARGET,
            %from,
            kind = header.map(|(k, _)| format!("{k:?}")).unwrap_or_else(|| "undecodable".into()),
            "security: transfer frame from a participant that is not an authorized agent; refused"
        );
        let reason = format!(
            "{from} is not an agent in baton's configuration; only configured agents may send bundles"
        );
        if let Some((Kind::Open | Kind::Resume, id)) = header {
            let code = ErrorCode::NotAuthorized;
            self.transmit(from, &Frame::Error { id, code, reason: truncate_reason(&reason) });
        }
        self.emit(RelayEvent::Rejected {
            from: from.to_owned(),
            transfer_id: header.map(|(_, id)| id),
            error: TransferError { code: ErrorCode::NotAuthorized, reason, remote: false },
        });
    }

    fn transmit(&mut self, to: &str, frame: &Frame) {
        if let Ok(payload) = frame.encode() {
            self.transmits.push_back(Transmit { to: to.to_owned(), payload });
        }
    }

    /// Moves the engine's outputs into the relay's queues.
    fn pull(&mut self, now: Instant) {
        while let Some(o) = self.endpoint.poll_output() {
            match o {
                Output::Transmit { to, payload } => {
                    // The engine answers a sender that asks again about a finished transfer
                    // with the COMPLETE it remembers; for a held checkpoint that answer waits
                    // for `release_ack` too.
                    if !self.held_acks.is_empty()
                        && let Some((Kind::Complete, id)) = Frame::peek(&payload)
                        && self.held_acks.contains_key(&(to.clone(), id))
                    {
                        continue;
                    }
                    self.transmits.push_back(Transmit { to, payload })
                }
                Output::Event(ev) => self.on_engine_event(ev, now),
            }
        }
    }

    fn on_engine_event(&mut self, ev: Event, now: Instant) {
        match &ev {
            Event::Received { from: who, id, .. }
            | Event::ReceiveFailed { from: who, id, .. }
            | Event::Sent { to: who, id, .. }
            | Event::SendFailed { to: who, id, .. } => {
                self.progress.remove(&(who.clone(), *id));
            }
            Event::Rejected { .. } => {}
        }
        match ev {
            Event::Received { from, id, payload, .. }
                if self.checkpoints_arriving.remove(&(from.clone(), id)) =>
            {
                self.apply_checkpoint(from, id, &payload)
            }
            Event::Received { from, id, payload, meta } => self.store_received(from, id, payload, meta, now),
            Event::ReceiveFailed { from, id, error }
                if self.checkpoints_arriving.remove(&(from.clone(), id)) =>
            {
                self.checkpoint_rejected(from, id, error)
            }
            Event::ReceiveFailed { from, id, error } => {
                self.admitted.remove(&(from.clone(), id));
                tracing::warn!(%from, transfer_id = %id, %error, "incoming bundle failed");
                self.emit(RelayEvent::ReceiveFailed { from, transfer_id: id, error });
            }
            Event::Sent { to, id, bytes_sent, bytes_resent } => {
                if let Some(transfer_id) = self.deliveries.remove(&(to.clone(), id)) {
                    tracing::info!(%to, %transfer_id, delivery_id = %id, bytes_sent, bytes_resent, "bundle delivered");
                    self.emit(RelayEvent::Delivered {
                        to,
                        transfer_id,
                        delivery_id: id,
                        bytes_sent,
                        bytes_resent,
                    });
                }
            }
            Event::SendFailed { to, id, error } => {
                if let Some(transfer_id) = self.deliveries.remove(&(to.clone(), id)) {
                    tracing::warn!(%to, %transfer_id, delivery_id = %id, %error, "bundle delivery failed");
                    self.emit(RelayEvent::DeliveryFailed { to, transfer_id, delivery_id: id, error });
                }
            }
            Event::Rejected { from, id, error } => {
                tracing::debug!(%from, transfer_id = ?id, %error, "transfer packet rejected");
                self.emit(RelayEvent::Rejected { from, transfer_id: id, error });
            }
        }
    }

    /// A bundle arrived whole and verified: store it. The engine has queued COMPLETE for the
    /// source; if the store refuses the bundle, that answer becomes an ERROR before anything
    /// is published, so the source's COMPLETE always means "stored".
    fn store_received(&mut self, from: String, id: TransferId, payload: Vec<u8>, meta: String, now: Instant) {
        let sha256 = match self.admitted.remove(&(from.clone(), id)) {
            Some(a) => a.sha256,
            None => {
                use sha2::Digest;
                sha2::Sha256::digest(&payload).into()
            }
        };
        let size = payload.len() as u64;
        let info = BundleInfo { from: from.clone(), meta: meta.clone(), size, sha256 };
        match self.store.put(id, StoredBundle { info, payload: payload.into() }) {
            Ok(()) => {
                if let Some(r) = self.retention {
                    self.expiry.insert((now + r, id));
                }
                tracing::info!(%from, transfer_id = %id, size, "bundle received and stored");
                self.emit(RelayEvent::BundleReceived { from, transfer_id: id, size, meta });
            }
            Err(e) => {
                tracing::error!(%from, transfer_id = %id, error = %e, "received bundle could not be stored");
                let error =
                    TransferError { code: ErrorCode::BufferFull, reason: e.to_string(), remote: false };
                self.overrule_complete(&from, id, &error);
                self.emit(RelayEvent::ReceiveFailed { from, transfer_id: id, error });
            }
        }
    }

    /// A transfer arrived whole and verified, and the engine has queued COMPLETE for the
    /// source, but baton refuses what arrived (the store is full, the checkpoint does not
    /// merge): that answer becomes an ERROR before anything is published, and a source asking
    /// again is told the same, so COMPLETE always means "stored" or "applied".
    fn overrule_complete(&mut self, from: &str, id: TransferId, error: &TransferError) {
        let complete = self
            .transmits
            .iter_mut()
            .rev()
            .find(|t| t.to == from && Frame::peek(&t.payload) == Some((Kind::Complete, id)));
        if let Some(t) = complete
            && let Ok(p) =
                (Frame::Error { id, code: error.code, reason: truncate_reason(&error.reason) }).encode()
        {
            t.payload = p;
        }
        self.endpoint.reject_completed(from, id, error.code);
    }

    /// A checkpoint arrived whole and verified: merge it, or refuse it in place of the queued
    /// COMPLETE. The payload's `agent` must be the sender's `lk.agent.name`, which the server
    /// stamped on the participant (never taken from the packet).
    fn apply_checkpoint(&mut self, from: String, id: TransferId, payload: &[u8]) {
        let agent_name = self.members.agent_name(&from).map(str::to_owned);
        match self.checkpoints.apply(&from, agent_name.as_deref(), payload) {
            Ok(a) => {
                let state_bytes = self.checkpoints.bytes() as u64;
                let bytes = payload.len() as u64;
                tracing::debug!(
                    %from, transfer_id = %id, agent = %a.agent, seq = a.seq, base = a.base, bytes,
                    items = a.items, state_bytes, "checkpoint applied"
                );
                let (agent, seq, base) = (a.agent, a.seq, a.base);
                if self.hold_acks {
                    // Whether the engine queued its COMPLETE yet or not, the one that goes out
                    // is this, at `release_ack`; `pull` drops the engine's.
                    self.transmits
                        .retain(|t| !(t.to == from && Frame::peek(&t.payload) == Some((Kind::Complete, id))));
                    let sha256 = {
                        use sha2::Digest;
                        sha2::Sha256::digest(payload).into()
                    };
                    if let Ok(complete) = (Frame::Complete { id, sha256 }).encode() {
                        self.held_acks
                            .insert((from.clone(), id), Transmit { to: from.clone(), payload: complete });
                    }
                }
                self.emit(RelayEvent::CheckpointApplied {
                    from,
                    transfer_id: id,
                    agent,
                    seq,
                    base,
                    bytes,
                    state_bytes,
                });
            }
            Err(refusal) => {
                let error =
                    TransferError { code: refusal.code(), reason: refusal.to_string(), remote: false };
                self.overrule_complete(&from, id, &error);
                self.checkpoint_rejected(from, id, error);
            }
        }
    }

    fn checkpoint_rejected(&mut self, from: String, id: TransferId, error: TransferError) {
        tracing::warn!(%from, transfer_id = %id, %error, "checkpoint not applied");
        self.emit(RelayEvent::CheckpointRejected { from, transfer_id: id, error });
    }

    fn emit(&mut self, ev: RelayEvent) {
        if self.routing == Routing::MetaTarget {
            match &ev {
                // From the OPEN on, a target already in the room gets the bundle forwarded while
                // it arrives; once stored, a target that was not there (or whose forward failed)
                // gets it from the store.
                RelayEvent::Receiving { transfer_id, meta, .. }
                | RelayEvent::BundleReceived { transfer_id, meta, .. } => {
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
        }
        self.events.push_back(ev);
    }

    /// [`Routing::MetaTarget`]: starts the deliveries whose target is in the room, until no
    /// new one starts (a delivery can end at once and make its bundle pending again).
    fn route(&mut self, now: Instant) {
        loop {
            let mut started = false;
            for (id, to) in std::mem::take(&mut self.pending) {
                if self.is_delivering(id, &to) {
                    continue;
                }
                if !self.members.is_agent(&to) {
                    self.pending.push((id, to));
                    continue;
                }
                match self.start_delivery(id, &to, now) {
                    Ok(_) => started = true,
                    Err(e) => tracing::warn!(%to, error = %e, "could not deliver bundle"),
                }
            }
            if !started {
                return;
            }
        }
    }
}

/// The identity a bundle's meta names as its target (`{"to": "<identity>"}`), if any.
fn meta_target(meta: &str) -> Option<String> {
    meta_member(meta, "to")
}

/// The string member `key` of a transfer's meta, when the meta is a JSON object that has one.
fn meta_member(meta: &str, key: &str) -> Option<String> {
    match serde_json::from_str(meta) {
        Ok(serde_json::Value::Object(m)) => match m.get(key) {
            Some(serde_json::Value::String(v)) => Some(v.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// What a sender declared stale is told about a bundle.
fn stale_bundle_reason(identity: &str) -> String {
    format!("{identity} was declared crashed or replaced; baton takes no more bundles from it")
}
