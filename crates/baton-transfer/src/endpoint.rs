//! Many transfers with many participants: the [`Receivers`] manager (limits) and the [`Endpoint`]
//! that routes packets to senders and receivers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, TransferError};
use crate::frame::{Direction, Frame};
use crate::id::TransferId;
use crate::receiver::{Receiver, ReceiverConfig, ReceiverEvent};
use crate::sender::{Sender, SenderConfig, SenderEvent};

/// Limits and tuning for the receiving side of one room.
#[derive(Debug, Clone)]
pub struct ReceiversConfig {
    /// Per-transfer tuning and the maximum bundle size.
    pub transfer: ReceiverConfig,
    /// Transfers one sender may have in flight towards us at once. Default 4.
    pub max_transfers_per_sender: usize,
    /// Bytes reserved for all incoming transfers together (wire size, plus payload size when
    /// compressed, since both exist while inflating). Default 64 MiB.
    pub max_buffered_bytes: u64,
    /// How long a finished transfer's outcome is remembered, to answer late or repeated
    /// frames with the same COMPLETE/ERROR instead of `unknown_transfer` (which would make
    /// the sender start over). Must exceed the senders' deadline. Default 120 s.
    pub finished_linger: Duration,
    /// Most finished outcomes remembered; the oldest are forgotten first. Default 1024.
    pub max_finished: usize,
}

impl Default for ReceiversConfig {
    fn default() -> Self {
        ReceiversConfig {
            transfer: ReceiverConfig::default(),
            max_transfers_per_sender: 4,
            max_buffered_bytes: 64 * 1024 * 1024,
            finished_linger: Duration::from_secs(120),
            max_finished: 1024,
        }
    }
}

/// Something the application learns from the transfer layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A bundle arrived whole and verified. Produced exactly once per transfer.
    Received {
        /// Server-stamped identity of the sender.
        from: String,
        /// Transfer id.
        id: TransferId,
        /// The verified payload.
        payload: Vec<u8>,
        /// Metadata from the OPEN.
        meta: String,
    },
    /// An incoming transfer ended without a payload (cancelled by the sender, refused, timed
    /// out, corrupt).
    ReceiveFailed {
        /// Server-stamped identity of the sender.
        from: String,
        /// Transfer id.
        id: TransferId,
        /// What went wrong.
        error: TransferError,
    },
    /// The receiver confirmed our bundle (COMPLETE with the right hash).
    Sent {
        /// Identity of the receiver.
        to: String,
        /// Transfer id.
        id: TransferId,
        /// Chunk bytes sent for this transfer, retransmissions included (compressed bytes when
        /// it was deflated).
        bytes_sent: u64,
        /// Of `bytes_sent`, the bytes of chunks sent more than once (retransmissions).
        bytes_resent: u64,
    },
    /// An outgoing transfer ended without confirmation.
    SendFailed {
        /// Identity of the receiver.
        to: String,
        /// Transfer id.
        id: TransferId,
        /// What went wrong.
        error: TransferError,
    },
    /// A packet was dropped without affecting any transfer: undecodable, or about a transfer
    /// this side does not know. For logs and metrics.
    Rejected {
        /// Server-stamped identity of the packet's sender.
        from: String,
        /// Transfer id.
        id: Option<TransferId>,
        /// What went wrong.
        error: TransferError,
    },
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Publish `payload` as one reliable data packet, topic `baton.xfer`, with
    /// `destination_identities = [to]`.
    Transmit {
        /// Identity of the receiver.
        to: String,
        /// The verified payload.
        payload: Vec<u8>,
    },
    /// Tell the application.
    Event(Event),
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Completed([u8; 32]),
    Failed(ErrorCode),
}

/// All incoming transfers of one room, keyed by (sender identity, transfer id), with the
/// per-sender and total-buffer limits.
#[derive(Debug, Default)]
pub struct Receivers {
    cfg: ReceiversConfig,
    active: HashMap<(String, TransferId), (Receiver, u64)>,
    buffered: u64,
    finished: HashMap<(String, TransferId), (Instant, Outcome)>,
    finished_order: VecDeque<(Instant, (String, TransferId))>,
    out: VecDeque<Output>,
}

impl Receivers {
    /// Empty manager.
    pub fn new(cfg: ReceiversConfig) -> Self {
        Receivers { cfg, ..Default::default() }
    }

    /// Bytes currently reserved by incoming transfers.
    pub fn buffered_bytes(&self) -> u64 {
        self.buffered
    }

    /// Incoming transfers in progress.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Handles a decoded frame addressed to a receiver.
    pub fn handle_frame(&mut self, from: &str, frame: Frame, now: Instant) {
        self.expire(now);
        let id = frame.id();
        let key = (from.to_owned(), id);
        if let Some((r, _)) = self.active.get_mut(&key) {
            r.handle_frame(frame, now);
            self.drain(&key, now);
            return;
        }
        if let Some(&(_, outcome)) = self.finished.get(&key) {
            // Repeat the verdict: the sender missed it (reconnect) and is asking again.
            if !matches!(frame, Frame::Cancel { .. }) {
                let reply = match outcome {
                    Outcome::Completed(sha256) => Frame::Complete { id, sha256 },
                    Outcome::Failed(code) => {
                        Frame::Error { id, code, reason: "transfer already failed".into() }
                    }
                };
                self.transmit(from, &reply);
            }
            return;
        }
        match frame {
            Frame::Open { open, .. } => {
                let reject = |code, reason: String| TransferError::local(code, reason);
                let per_sender = self.active.keys().filter(|(p, _)| p == from).count();
                let reserve = open.wire_size.saturating_add(if open.deflate { open.payload_size } else { 0 });
                let refused = if per_sender >= self.cfg.max_transfers_per_sender {
                    Some(reject(
                        ErrorCode::TooManyTransfers,
                        format!(
                            "{per_sender} transfers from this sender already in flight (limit {}); wait for one to finish",
                            self.cfg.max_transfers_per_sender
                        ),
                    ))
                } else if open.payload_size <= self.cfg.transfer.max_bundle_size
                    && self.buffered.saturating_add(reserve) > self.cfg.max_buffered_bytes
                {
                    Some(reject(
                        ErrorCode::BufferFull,
                        format!(
                            "receiver buffers {} of {} bytes; retry after current transfers finish",
                            self.buffered, self.cfg.max_buffered_bytes
                        ),
                    ))
                } else {
                    None
                };
                let result = match refused {
                    Some(e) => Err(e),
                    None => Receiver::new(id, open, self.cfg.transfer.clone(), now),
                };
                match result {
                    Ok(r) => {
                        self.buffered += reserve;
                        self.active.insert(key.clone(), (r, reserve));
                        self.drain(&key, now);
                    }
                    Err(error) => {
                        // Refusals are not remembered: the sender fails on the ERROR, and a
                        // later OPEN with a new id may well fit.
                        self.transmit(
                            from,
                            &Frame::Error {
                                id,
                                code: error.code,
                                reason: crate::frame::truncate_reason(&error.reason),
                            },
                        );
                        self.event(Event::Rejected { from: from.to_owned(), id: Some(id), error });
                    }
                }
            }
            Frame::Resume { .. } => {
                // RESUME travels after OPEN on the same ordered link, so not knowing the
                // transfer means its state is gone: tell the sender to start over.
                self.transmit(
                    from,
                    &Frame::Error {
                        id,
                        code: ErrorCode::UnknownTransfer,
                        reason: "receiver has no state for this transfer".into(),
                    },
                );
                self.unknown(from, id);
            }
            // DATA may legitimately precede a retransmitted OPEN; drop it silently.
            _ => self.unknown(from, id),
        }
    }

    /// A reconnect happened: every incoming transfer from `identity` (or from everyone when
    /// `None`, i.e. we reconnected) reports what it holds.
    pub fn reconnected(&mut self, identity: Option<&str>, now: Instant) {
        let keys: Vec<_> =
            self.active.keys().filter(|(p, _)| identity.is_none_or(|x| x == p)).cloned().collect();
        for key in keys {
            if let Some((r, _)) = self.active.get_mut(&key) {
                r.resume(now);
            }
            self.drain(&key, now);
        }
    }

    /// Earliest timer among incoming transfers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active.values().filter_map(|(r, _)| r.poll_timeout()).min()
    }

    /// Advances timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        let due: Vec<_> = self
            .active
            .iter()
            .filter(|(_, (r, _))| r.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some((r, _)) = self.active.get_mut(&key) {
                r.handle_timeout(now);
            }
            self.drain(&key, now);
        }
    }

    /// Next output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The incoming transfer `id` from `from`, while it is in progress.
    pub fn receiver(&self, from: &str, id: TransferId) -> Option<&Receiver> {
        self.active.get(&(from.to_owned(), id)).map(|(r, _)| r)
    }

    /// Ends the incoming transfer `id` from `from` while it is in progress: ERROR `code` with
    /// `reason` to the sender, a [`Event::ReceiveFailed`], and the failure is remembered like
    /// any other outcome. Returns false when no such transfer is in progress.
    pub fn abort(&mut self, from: &str, id: TransferId, code: ErrorCode, reason: &str, now: Instant) -> bool {
        let key = (from.to_owned(), id);
        let Some((r, _)) = self.active.get_mut(&key) else {
            return false;
        };
        r.abort(code, reason.to_owned());
        self.drain(&key, now);
        true
    }

    /// The application refused a transfer that arrived whole (it could not store it, or it
    /// refused its content): from now on, repeats of its frames are answered with ERROR `code`
    /// instead of the COMPLETE remembered for it. Returns false when no completed transfer
    /// `id` from `from` is remembered.
    pub fn reject_completed(&mut self, from: &str, id: TransferId, code: ErrorCode) -> bool {
        match self.finished.get_mut(&(from.to_owned(), id)) {
            Some((_, outcome @ Outcome::Completed(_))) => {
                *outcome = Outcome::Failed(code);
                true
            }
            _ => false,
        }
    }

    fn unknown(&mut self, from: &str, id: TransferId) {
        self.event(Event::Rejected {
            from: from.to_owned(),
            id: Some(id),
            error: TransferError::local(
                ErrorCode::UnknownTransfer,
                "frame for a transfer this receiver does not know",
            ),
        });
    }

    fn drain(&mut self, key: &(String, TransferId), now: Instant) {
        let Some((r, reserve)) = self.active.get_mut(key) else {
            return;
        };
        let reserve = *reserve;
        let mut frames = Vec::new();
        while let Some(f) = r.poll_frame() {
            frames.push(f);
        }
        let mut outcome = None;
        let mut events = Vec::new();
        while let Some(ev) = r.poll_event() {
            outcome = Some(match &ev {
                ReceiverEvent::Received { .. } => Outcome::Completed(r.open().sha256),
                ReceiverEvent::Failed(e) => Outcome::Failed(e.code),
            });
            events.push(ev);
        }
        for f in &frames {
            self.transmit(&key.0, f);
        }
        for ev in events {
            self.event(match ev {
                ReceiverEvent::Received { payload, meta } => {
                    Event::Received { from: key.0.clone(), id: key.1, payload, meta }
                }
                ReceiverEvent::Failed(error) => {
                    Event::ReceiveFailed { from: key.0.clone(), id: key.1, error }
                }
            });
        }
        if let Some(outcome) = outcome {
            self.active.remove(key);
            self.buffered -= reserve;
            self.finished.insert(key.clone(), (now, outcome));
            self.finished_order.push_back((now, key.clone()));
            while self.finished.len() > self.cfg.max_finished {
                self.forget_oldest();
            }
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((t, k)) = self.finished_order.pop_front()
            && self.finished.get(&k).is_some_and(|(ft, _)| *ft == t)
        {
            self.finished.remove(&k);
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .finished_order
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.cfg.finished_linger)
        {
            self.forget_oldest();
        }
    }

    fn transmit(&mut self, to: &str, frame: &Frame) {
        if let Ok(payload) = frame.encode() {
            self.out.push_back(Output::Transmit { to: to.to_owned(), payload });
        }
    }

    fn event(&mut self, ev: Event) {
        self.out.push_back(Output::Event(ev));
    }
}

/// Configuration of an [`Endpoint`].
#[derive(Debug, Clone, Default)]
pub struct EndpointConfig {
    /// Defaults for outgoing transfers ([`Endpoint::send_with`] can override per transfer).
    pub sender: SenderConfig,
    /// Incoming side and its limits.
    pub receivers: ReceiversConfig,
}

/// Both directions of the transfer protocol for one room: the single object the IO shell
/// drives.
///
/// The loop:
/// 1. On a data packet with topic `baton.xfer`: [`handle_packet`](Self::handle_packet) with
///    the server-stamped sender identity.
/// 2. When [`poll_timeout`](Self::poll_timeout) is reached: [`handle_timeout`](Self::handle_timeout).
/// 3. When another participant's connection or ours was re-established:
///    [`participant_reconnected`](Self::participant_reconnected) / [`reconnected`](Self::reconnected).
/// 4. After each of the above and after [`send`](Self::send): drain
///    [`poll_output`](Self::poll_output) until `None`; publish every `Transmit` reliably,
///    addressed to `to` only; hand `Event`s to the application.
#[derive(Debug, Default)]
pub struct Endpoint {
    cfg: EndpointConfig,
    senders: HashMap<(String, TransferId), Sender>,
    receivers: Receivers,
    /// Cut-through: an incoming transfer (from, id) and the outgoing ones (to, id) that
    /// forward its chunks as they arrive.
    forwards: HashMap<(String, TransferId), Vec<(String, TransferId)>>,
    out: VecDeque<Output>,
}

impl Endpoint {
    /// New endpoint with no transfers.
    pub fn new(cfg: EndpointConfig) -> Self {
        Endpoint {
            receivers: Receivers::new(cfg.receivers.clone()),
            cfg,
            senders: HashMap::new(),
            forwards: HashMap::new(),
            out: VecDeque::new(),
        }
    }

    /// Starts sending `payload` to `to` with the default sender configuration.
    pub fn send(
        &mut self,
        to: &str,
        id: TransferId,
        payload: &[u8],
        meta: &str,
        now: Instant,
    ) -> Result<(), TransferError> {
        let cfg = self.cfg.sender.clone();
        self.send_with(to, id, payload, meta, cfg, now)
    }

    /// Starts sending with a specific configuration (compression, deadline, window).
    pub fn send_with(
        &mut self,
        to: &str,
        id: TransferId,
        payload: &[u8],
        meta: &str,
        cfg: SenderConfig,
        now: Instant,
    ) -> Result<(), TransferError> {
        let key = self.free_key(to, id)?;
        let s = Sender::new(id, payload, meta, cfg, now)?;
        self.senders.insert(key.clone(), s);
        self.drain_sender(&key);
        Ok(())
    }

    /// Starts sending to `to`, as transfer `id`, the incoming transfer `upstream` from `from`
    /// while it is still arriving (cut-through relay): same OPEN, and each chunk goes out as
    /// soon as it is held, after the ones held already. If the incoming transfer fails, this
    /// one is cancelled with the reason. The receiver checks the upstream SHA-256, so the
    /// guarantees of a COMPLETE are those of any transfer.
    pub fn forward(
        &mut self,
        to: &str,
        id: TransferId,
        from: &str,
        upstream: TransferId,
        now: Instant,
    ) -> Result<(), TransferError> {
        let key = self.free_key(to, id)?;
        let Some(r) = self.receivers.receiver(from, upstream) else {
            return Err(TransferError::local(
                ErrorCode::UnknownTransfer,
                "no incoming transfer in progress with this id from this sender to forward",
            ));
        };
        let mut s = Sender::forward(id, r.open().clone(), self.cfg.sender.clone(), now)?;
        for (index, bytes) in r.held_chunks() {
            s.supply(index, bytes);
        }
        self.senders.insert(key.clone(), s);
        self.forwards.entry((from.to_owned(), upstream)).or_default().push(key.clone());
        self.drain_sender(&key);
        Ok(())
    }

    fn free_key(&self, to: &str, id: TransferId) -> Result<(String, TransferId), TransferError> {
        let key = (to.to_owned(), id);
        if self.senders.contains_key(&key) {
            return Err(TransferError::local(
                ErrorCode::ConflictingOpen,
                "a transfer with this id to this receiver is already in progress",
            ));
        }
        Ok(key)
    }

    /// Cancels an outgoing transfer. Returns false if it is unknown or already finished.
    pub fn cancel(&mut self, to: &str, id: TransferId, reason: &str, now: Instant) -> bool {
        let key = (to.to_owned(), id);
        let Some(s) = self.senders.get_mut(&key) else {
            return false;
        };
        s.cancel(reason, now);
        self.drain_sender(&key);
        true
    }

    /// Handles one `baton.xfer` packet from `from` (the server-stamped identity).
    pub fn handle_packet(&mut self, from: &str, bytes: &[u8], now: Instant) {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.out.push_back(Output::Event(Event::Rejected {
                    from: from.to_owned(),
                    id: None,
                    error: TransferError::local(e.code(), e.to_string()),
                }));
                return;
            }
        };
        match frame.direction() {
            Direction::ToReceiver => {
                let upstream = (from.to_owned(), frame.id());
                let chunk = match &frame {
                    Frame::Data { index, bytes, .. } if self.forwards.contains_key(&upstream) => {
                        Some((*index, bytes.clone()))
                    }
                    _ => None,
                };
                self.receivers.handle_frame(from, frame, now);
                if let Some((index, bytes)) = chunk {
                    self.supply_forwards(&upstream, index, &bytes);
                }
                self.pull_receivers(now);
            }
            Direction::ToSender => {
                let key = (from.to_owned(), frame.id());
                if let Some(s) = self.senders.get_mut(&key) {
                    s.handle_frame(frame, now);
                    self.drain_sender(&key);
                } else {
                    if matches!(frame, Frame::Ack { .. }) {
                        // A receiver still waiting on a transfer we no longer have (we
                        // restarted): let it free its buffer now rather than at its timeout.
                        if let Ok(payload) = (Frame::Cancel {
                            id: key.1,
                            code: ErrorCode::UnknownTransfer,
                            reason: "sender has no such transfer".into(),
                        })
                        .encode()
                        {
                            self.out.push_back(Output::Transmit { to: from.to_owned(), payload });
                        }
                    }
                    self.out.push_back(Output::Event(Event::Rejected {
                        from: from.to_owned(),
                        id: Some(key.1),
                        error: TransferError::local(
                            ErrorCode::UnknownTransfer,
                            "frame for a transfer this sender does not know",
                        ),
                    }));
                }
            }
        }
    }

    /// Ends the incoming transfer `id` from `from` before it arrived whole (ERROR `code` with
    /// `reason` to the sender, [`Event::ReceiveFailed`] to the application; a forward of it is
    /// cancelled). Returns false when no such transfer is in progress.
    pub fn abort_incoming(
        &mut self,
        from: &str,
        id: TransferId,
        code: ErrorCode,
        reason: &str,
        now: Instant,
    ) -> bool {
        let aborted = self.receivers.abort(from, id, code, reason, now);
        self.pull_receivers(now);
        aborted
    }

    /// The application refused an incoming transfer after it arrived whole (see
    /// [`Receivers::reject_completed`]): a sender asking again gets ERROR `code`, not COMPLETE.
    pub fn reject_completed(&mut self, from: &str, id: TransferId, code: ErrorCode) -> bool {
        self.receivers.reject_completed(from, id, code)
    }

    /// The participant `identity` reconnected (it left and came back, or its connection resumed):
    /// transfers with it in both directions resume from what was acknowledged.
    pub fn participant_reconnected(&mut self, identity: &str, now: Instant) {
        self.resume(Some(identity), now);
    }

    /// Our own connection to the room was re-established: every transfer resumes.
    pub fn reconnected(&mut self, now: Instant) {
        self.resume(None, now);
    }

    fn resume(&mut self, identity: Option<&str>, now: Instant) {
        let keys: Vec<_> =
            self.senders.keys().filter(|(p, _)| identity.is_none_or(|x| x == p)).cloned().collect();
        for key in keys {
            if let Some(s) = self.senders.get_mut(&key) {
                s.resume(now);
            }
            self.drain_sender(&key);
        }
        self.receivers.reconnected(identity, now);
        self.pull_receivers(now);
    }

    /// Earliest instant at which [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let s = self.senders.values().filter_map(|s| s.poll_timeout()).min();
        match (s, self.receivers.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<_> = self
            .senders
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(s) = self.senders.get_mut(&key) {
                s.handle_timeout(now);
            }
            self.drain_sender(&key);
        }
        self.receivers.handle_timeout(now);
        self.pull_receivers(now);
    }

    /// Next thing to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Outgoing transfers not yet finished.
    pub fn sending(&self) -> usize {
        self.senders.len()
    }

    /// The outgoing transfer `id` to `to`, while it is in progress.
    pub fn sender(&self, to: &str, id: TransferId) -> Option<&Sender> {
        self.senders.get(&(to.to_owned(), id))
    }

    /// The receiving side, for its counters.
    pub fn receivers(&self) -> &Receivers {
        &self.receivers
    }

    /// Hands a chunk of a forwarded incoming transfer to the transfers forwarding it.
    fn supply_forwards(&mut self, upstream: &(String, TransferId), index: u32, bytes: &[u8]) {
        let Some(downstream) = self.forwards.get_mut(upstream) else { return };
        // A forwarding transfer that finished (or was cancelled) is gone from `senders`.
        downstream.retain(|k| self.senders.contains_key(k));
        let keys = downstream.clone();
        if keys.is_empty() {
            self.forwards.remove(upstream);
        }
        for key in keys {
            if let Some(s) = self.senders.get_mut(&key) {
                s.supply(index, bytes);
            }
            self.drain_sender(&key);
        }
    }

    /// Moves the receivers' outputs out; an incoming transfer that ended stops being
    /// forwarded, and if it failed, so do the transfers forwarding it.
    fn pull_receivers(&mut self, now: Instant) {
        while let Some(o) = self.receivers.poll_output() {
            match &o {
                // Every chunk has been supplied already.
                Output::Event(Event::Received { from, id, .. }) => {
                    self.forwards.remove(&(from.clone(), *id));
                }
                Output::Event(Event::ReceiveFailed { from, id, error }) => {
                    let reason = format!("the incoming transfer this one forwards failed: {error}");
                    for key in self.forwards.remove(&(from.clone(), *id)).unwrap_or_default() {
                        if let Some(s) = self.senders.get_mut(&key) {
                            s.cancel(&reason, now);
                        }
                        self.drain_sender(&key);
                    }
                }
                _ => {}
            }
            self.out.push_back(o);
        }
    }

    fn drain_sender(&mut self, key: &(String, TransferId)) {
        let Some(s) = self.senders.get_mut(key) else {
            return;
        };
        while let Some(f) = s.poll_frame() {
            if let Ok(payload) = f.encode() {
                self.out.push_back(Output::Transmit { to: key.0.clone(), payload });
            }
        }
        let mut done = false;
        while let Some(ev) = s.poll_event() {
            done = true;
            self.out.push_back(Output::Event(match ev {
                SenderEvent::Completed => Event::Sent {
                    to: key.0.clone(),
                    id: key.1,
                    bytes_sent: s.bytes_sent(),
                    bytes_resent: s.bytes_resent(),
                },
                SenderEvent::Failed(error) => Event::SendFailed { to: key.0.clone(), id: key.1, error },
            }));
        }
        if done {
            self.senders.remove(key);
        }
    }
}
