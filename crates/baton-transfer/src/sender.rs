//! Sending side of one transfer.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, TransferError};
use crate::frame::{Ack, Frame, MAX_CHUNK_SIZE, MAX_META_LEN, MIN_CHUNK_SIZE, Open, truncate_reason};
use crate::id::TransferId;

/// Tuning for one outgoing transfer. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Bytes per DATA chunk (256..=14 976). Default: the maximum, 14 976, so each frame is
    /// exactly one 15 000-byte packet.
    pub chunk_size: u32,
    /// Most chunks in flight (sent, not acknowledged). Default 32 (about 480 KB). The link is
    /// SCTP, already reliable and ordered, so the window bounds what must be resent after a
    /// reconnect and what the receiver buffers out of order, not congestion.
    pub window: u32,
    /// First retransmission timeout. Default 1 s: the link does not lose packets on its own,
    /// so a timeout means a reconnect nobody told us about, not congestion.
    pub initial_rto: Duration,
    /// Cap for the doubling retransmission timeout. Default 8 s.
    pub max_rto: Duration,
    /// The transfer fails with `timed_out` if not confirmed within this. Default 60 s.
    pub deadline: Duration,
    /// Deflate the payload before chunking (kept only if it is actually smaller). Default
    /// false: bundles are small JSON that LiveKit moves fast; enable for large ones.
    pub compress: bool,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            chunk_size: MAX_CHUNK_SIZE,
            window: 32,
            initial_rto: Duration::from_secs(1),
            max_rto: Duration::from_secs(8),
            deadline: Duration::from_secs(60),
            compress: false,
        }
    }
}

/// What a [`Sender`] reports once, when it finishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The receiver reassembled the payload and verified its SHA-256.
    Completed,
    /// The transfer is over without confirmation.
    Failed(TransferError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Unsent,
    InFlight,
    Lost,
    Acked,
}

/// One outgoing transfer, sans-IO.
///
/// Drive it like this: after creating it and after every `handle_*` call, drain
/// [`poll_frame`](Self::poll_frame) (encode and send each frame to the receiver) and
/// [`poll_event`](Self::poll_event); call [`handle_timeout`](Self::handle_timeout) when the
/// instant from [`poll_timeout`](Self::poll_timeout) is reached. Frames produced by
/// `poll_frame` are stamped with the `now` of the latest `handle_*` call, which is why the
/// caller should drain it right after that call.
#[derive(Debug)]
pub struct Sender {
    id: TransferId,
    cfg: SenderConfig,
    open: Open,
    wire: Vec<u8>,
    /// For a forwarded transfer ([`Sender::forward`]): which chunks upstream has supplied so
    /// far. `None` when the whole payload was given at the start.
    supplied: Option<Vec<bool>>,
    chunks: Vec<Chunk>,
    last_tx: Vec<u64>,
    tx_count: u64,
    /// DATA payload bytes handed out by `poll_frame`, retransmissions included.
    bytes_sent: u64,
    /// Of `bytes_sent`, those of chunks sent again (found missing by a RESUME or a gap).
    bytes_resent: u64,
    resume_mark: Option<u64>,
    cum_acked: u32,
    next_new: u32,
    lost: BTreeSet<u32>,
    in_flight: u32,
    receiver_window: u32,
    open_acked: bool,
    ctrl: VecDeque<Frame>,
    rto: Duration,
    rto_at: Option<Instant>,
    deadline: Instant,
    now: Instant,
    finished: bool,
    events: VecDeque<SenderEvent>,
}

impl Sender {
    /// Starts a transfer of `payload` with application metadata `meta` (UTF-8, at most
    /// 4096 bytes, conventionally JSON). `id` must be unique per receiver; use 128 random bits.
    pub fn new(
        id: TransferId,
        payload: &[u8],
        meta: &str,
        cfg: SenderConfig,
        now: Instant,
    ) -> Result<Sender, TransferError> {
        check_start(cfg.chunk_size, meta)?;
        let sha256: [u8; 32] = Sha256::digest(payload).into();
        let mut deflate = false;
        let mut wire = payload.to_vec();
        if cfg.compress
            && let Some(z) = deflate_bytes(payload)
            && z.len() < payload.len()
        {
            wire = z;
            deflate = true;
        }
        let open = Open {
            payload_size: payload.len() as u64,
            wire_size: wire.len() as u64,
            chunk_size: cfg.chunk_size,
            sha256,
            deflate,
            meta: meta.to_owned(),
        };
        if wire.len().div_ceil(cfg.chunk_size as usize) > u32::MAX as usize {
            return Err(TransferError::local(ErrorCode::TooLarge, "payload too large"));
        }
        Ok(Sender::start(id, open, wire, None, cfg, now))
    }

    /// Starts relaying a transfer whose bytes are still arriving from upstream (cut-through):
    /// announces `open` unchanged (the upstream transfer's sizes, chunk size, compression,
    /// SHA-256 and meta), and sends each chunk once [`supply`](Self::supply) has provided it,
    /// in order. The receiver verifies the upstream SHA-256 as for any transfer, so a chunk
    /// corrupted upstream fails the transfer instead of being received. `cfg.chunk_size`
    /// and `cfg.compress` are ignored: the chunking is upstream's.
    pub fn forward(
        id: TransferId,
        open: Open,
        cfg: SenderConfig,
        now: Instant,
    ) -> Result<Sender, TransferError> {
        check_start(open.chunk_size, &open.meta)?;
        let wire_size = usize::try_from(open.wire_size)
            .map_err(|_| TransferError::local(ErrorCode::TooLarge, "payload too large"))?;
        let count = open.chunk_count() as usize;
        let cfg = SenderConfig { chunk_size: open.chunk_size, compress: false, ..cfg };
        Ok(Sender::start(id, open, vec![0; wire_size], Some(vec![false; count]), cfg, now))
    }

    fn start(
        id: TransferId,
        open: Open,
        wire: Vec<u8>,
        supplied: Option<Vec<bool>>,
        cfg: SenderConfig,
        now: Instant,
    ) -> Sender {
        let count = wire.len().div_ceil(cfg.chunk_size as usize);
        let window = cfg.window.max(1);
        let mut ctrl = VecDeque::new();
        ctrl.push_back(Frame::Open { id, open: open.clone() });
        Sender {
            id,
            rto: cfg.initial_rto,
            rto_at: Some(now + cfg.initial_rto),
            deadline: now + cfg.deadline,
            cfg,
            open,
            wire,
            supplied,
            chunks: vec![Chunk::Unsent; count],
            last_tx: vec![0; count],
            tx_count: 0,
            bytes_sent: 0,
            bytes_resent: 0,
            resume_mark: None,
            cum_acked: 0,
            next_new: 0,
            lost: BTreeSet::new(),
            in_flight: 0,
            receiver_window: window,
            open_acked: false,
            ctrl,
            now,
            finished: false,
            events: VecDeque::new(),
        }
    }

    /// Provides chunk `index` of a forwarded transfer (see [`forward`](Self::forward)).
    /// Returns false, and changes nothing, for a transfer that was not forwarded, an index
    /// beyond the last, a length that is not the chunk's, or a chunk already supplied (the
    /// first copy wins, as in the receiver).
    pub fn supply(&mut self, index: u32, bytes: &[u8]) -> bool {
        let Some(supplied) = self.supplied.as_mut() else { return false };
        let Some(slot) = supplied.get_mut(index as usize).filter(|s| !**s) else {
            return false;
        };
        let cs = self.cfg.chunk_size as usize;
        let start = index as usize * cs;
        let end = (start + cs).min(self.wire.len());
        if bytes.len() != end - start {
            return false;
        }
        self.wire[start..end].copy_from_slice(bytes);
        *slot = true;
        true
    }

    /// Whether the next new chunk is still to come from upstream (forwarded transfers only).
    fn waiting_upstream(&self) -> bool {
        self.supplied.as_ref().is_some_and(|s| s.get(self.next_new as usize).is_some_and(|have| !have))
    }

    /// Transfer id.
    pub fn id(&self) -> TransferId {
        self.id
    }

    /// The OPEN this transfer announced.
    pub fn open(&self) -> &Open {
        &self.open
    }

    /// True once [`SenderEvent::Completed`] or [`SenderEvent::Failed`] has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Chunks the receiver has confirmed.
    pub fn acked_chunks(&self) -> u32 {
        self.chunks.iter().filter(|c| **c == Chunk::Acked).count() as u32
    }

    /// Wire bytes the receiver has confirmed, counted in whole chunks (the short last chunk
    /// as a full one), at most the OPEN's `wire_size`. What progress reports count.
    pub fn acked_bytes(&self) -> u64 {
        (u64::from(self.acked_chunks()) * u64::from(self.open.chunk_size)).min(self.open.wire_size)
    }

    /// Handles a frame from the receiver (ACK, COMPLETE, ERROR). Frames meant for a receiver
    /// are ignored.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        self.now = now;
        if self.finished {
            return;
        }
        match frame {
            Frame::Ack { ack, .. } => self.on_ack(&ack, now),
            Frame::Complete { sha256, .. } => {
                if sha256 == self.open.sha256 {
                    self.finish(SenderEvent::Completed);
                } else {
                    self.fail_and_cancel(
                        ErrorCode::HashMismatch,
                        "receiver confirmed a different SHA-256 than the one sent".into(),
                    );
                }
            }
            Frame::Error { code, reason, .. } => {
                if code == ErrorCode::UnknownTransfer {
                    // The receiver lost its state (restart or idle timeout) while we still had
                    // time: start over rather than fail, bounded by the deadline.
                    self.restart(now);
                } else {
                    self.finish(SenderEvent::Failed(TransferError::remote(code, reason)));
                }
            }
            _ => {}
        }
    }

    /// Call after the connection to the receiver was re-established (either side reconnected).
    /// Chunks in flight may be gone: the sender asks the receiver what it holds (RESUME) and
    /// continues from there instead of starting over.
    pub fn resume(&mut self, now: Instant) {
        self.now = now;
        if self.finished {
            return;
        }
        self.ctrl.clear();
        if !self.open_acked {
            self.ctrl.push_back(Frame::Open { id: self.id, open: self.open.clone() });
        }
        self.ctrl.push_back(Frame::Resume { id: self.id, sent: self.next_new });
        // The report answering this RESUME describes exactly what was sent before it (the
        // link is ordered); chunks sent later are left alone.
        self.resume_mark = Some(self.tx_count);
        self.rto = self.cfg.initial_rto;
        self.rto_at = Some(now + self.rto);
    }

    /// Abandons the transfer: a CANCEL goes to the receiver and the event is
    /// `Failed(cancelled)`.
    pub fn cancel(&mut self, reason: &str, now: Instant) {
        self.now = now;
        if !self.finished {
            self.fail_and_cancel(ErrorCode::Cancelled, truncate_reason(reason));
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        Some(match self.rto_at {
            Some(t) => t.min(self.deadline),
            None => self.deadline,
        })
    }

    /// Advances timers: deadline, then retransmission timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.finished {
            return;
        }
        if now >= self.deadline {
            self.fail_and_cancel(
                ErrorCode::TimedOut,
                format!(
                    "not confirmed within {:?} ({} of {} chunks acknowledged); check that the receiver is in the room",
                    self.cfg.deadline,
                    self.acked_chunks(),
                    self.chunks.len()
                ),
            );
            return;
        }
        if self.rto_at.is_some_and(|t| now >= t) {
            if self.in_flight == 0 && self.lost.is_empty() && self.open_acked && self.waiting_upstream() {
                // Everything sent so far is acknowledged and the rest has not arrived from
                // upstream: nothing to time out until the next chunk goes out.
                self.rto_at = None;
                return;
            }
            // Nothing heard for a whole RTO. The link is reliable and ordered, so what is in
            // flight has either arrived at a slow receiver or was lost to a reconnect nobody
            // told us about. Resending it all would double the load on a receiver that is
            // merely behind; instead ask what it holds (RESUME, answered after everything sent
            // before it) and resend only what the answer says is missing. A dead link gets one
            // small probe per (doubling) timeout.
            if !self.open_acked {
                self.ctrl.push_back(Frame::Open { id: self.id, open: self.open.clone() });
            }
            self.ctrl.push_back(Frame::Resume { id: self.id, sent: self.next_new });
            self.resume_mark = Some(self.tx_count);
            self.rto = (self.rto * 2).min(self.cfg.max_rto);
            self.rto_at = Some(now + self.rto);
        }
    }

    /// Next frame to send to the receiver, if the window allows one.
    pub fn poll_frame(&mut self) -> Option<Frame> {
        if self.finished {
            // A terminal CANCEL may still be queued.
            return self.ctrl.pop_front();
        }
        if let Some(f) = self.ctrl.pop_front() {
            return Some(f);
        }
        let window = self.cfg.window.min(self.receiver_window).max(1);
        if self.in_flight >= window {
            return None;
        }
        let resend = !self.lost.is_empty();
        let index = if let Some(i) = self.lost.pop_first() {
            i
        } else if (self.next_new as usize) < self.chunks.len()
            && self.next_new < self.cum_acked.saturating_add(window)
            && !self.waiting_upstream()
        {
            self.next_new += 1;
            self.next_new - 1
        } else {
            return None;
        };
        self.chunks[index as usize] = Chunk::InFlight;
        self.tx_count += 1;
        self.last_tx[index as usize] = self.tx_count;
        self.in_flight += 1;
        if self.rto_at.is_none() {
            self.rto_at = Some(self.now + self.rto);
        }
        let cs = self.cfg.chunk_size as usize;
        let start = index as usize * cs;
        let end = (start + cs).min(self.wire.len());
        self.bytes_sent += (end - start) as u64;
        if resend {
            self.bytes_resent += (end - start) as u64;
        }
        Some(Frame::Data { id: self.id, index, bytes: self.wire[start..end].to_vec() })
    }

    /// Of [`bytes_sent`](Self::bytes_sent), the bytes of chunks sent more than once.
    pub fn bytes_resent(&self) -> u64 {
        self.bytes_resent
    }

    /// Chunk bytes sent so far (DATA payloads, retransmissions included; compressed bytes when
    /// the transfer is deflated).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// The final outcome, once.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    fn on_ack(&mut self, ack: &Ack, now: Instant) {
        let count = self.chunks.len() as u32;
        if ack.cumulative > count || ack.ranges.last().is_some_and(|r| r.1 > count) {
            self.fail_and_cancel(
                ErrorCode::ProtocolViolation,
                format!("ACK names chunks beyond the last ({count})"),
            );
            return;
        }
        let mut progress = !self.open_acked;
        self.open_acked = true;
        let ranges = std::iter::once((0, ack.cumulative)).chain(ack.ranges.iter().copied());
        for (s, e) in ranges {
            for i in s..e {
                let c = &mut self.chunks[i as usize];
                match *c {
                    Chunk::Acked => continue,
                    Chunk::InFlight => self.in_flight -= 1,
                    Chunk::Lost => {
                        self.lost.remove(&i);
                    }
                    // The receiver holds a chunk we never sent: only after a restart where the
                    // receiver kept state; harmless, it just saves a send.
                    Chunk::Unsent => {}
                }
                *c = Chunk::Acked;
                progress = true;
            }
        }
        while (self.cum_acked as usize) < self.chunks.len()
            && self.chunks[self.cum_acked as usize] == Chunk::Acked
        {
            self.cum_acked += 1;
        }
        while (self.next_new as usize) < self.chunks.len()
            && self.chunks[self.next_new as usize] == Chunk::Acked
        {
            self.next_new += 1;
        }
        self.receiver_window = ack.window.max(1);
        if ack.resume {
            // A report after a reconnect is authoritative for what was sent before it was
            // asked for: what the receiver does not hold is gone, resend it now. Which
            // transmissions it covers depends on who asked.
            let cutoff = match (ack.solicited, self.resume_mark) {
                // The answer to our RESUME: covers what we sent before the RESUME.
                (true, Some(mark)) => {
                    self.resume_mark = None;
                    Some(mark)
                }
                // A second answer, or the receiver's own report while ours is pending: the
                // pending answer will be more precise.
                (true, None) | (false, Some(_)) => None,
                // The receiver reconnected without us noticing: everything in flight.
                (false, None) => Some(u64::MAX),
            };
            if let Some(cutoff) = cutoff {
                for i in self.cum_acked..self.next_new {
                    if self.chunks[i as usize] == Chunk::InFlight && self.last_tx[i as usize] <= cutoff {
                        self.chunks[i as usize] = Chunk::Lost;
                        self.lost.insert(i);
                        self.in_flight -= 1;
                    }
                }
                progress = true;
            }
        }
        if progress {
            self.rto = self.cfg.initial_rto;
            self.rto_at = Some(now + self.rto);
        }
    }

    fn restart(&mut self, now: Instant) {
        self.open_acked = false;
        self.cum_acked = 0;
        self.next_new = 0;
        self.in_flight = 0;
        self.resume_mark = None;
        self.lost.clear();
        self.chunks.iter_mut().for_each(|c| *c = Chunk::Unsent);
        self.ctrl.clear();
        self.ctrl.push_back(Frame::Open { id: self.id, open: self.open.clone() });
        self.rto = self.cfg.initial_rto;
        self.rto_at = Some(now + self.rto);
    }

    fn fail_and_cancel(&mut self, code: ErrorCode, reason: String) {
        self.ctrl.clear();
        self.ctrl.push_back(Frame::Cancel { id: self.id, code, reason: reason.clone() });
        self.finish(SenderEvent::Failed(TransferError::local(code, reason)));
    }

    fn finish(&mut self, ev: SenderEvent) {
        self.finished = true;
        self.rto_at = None;
        self.events.push_back(ev);
    }
}

fn check_start(chunk_size: u32, meta: &str) -> Result<(), TransferError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(TransferError::local(
            ErrorCode::ProtocolViolation,
            format!("chunk_size {chunk_size} outside 256..=14976"),
        ));
    }
    if meta.len() > MAX_META_LEN {
        return Err(TransferError::local(
            ErrorCode::TooLarge,
            format!(
                "meta is {} bytes, at most {MAX_META_LEN} allowed; put large data in the payload",
                meta.len()
            ),
        ));
    }
    Ok(())
}

fn deflate_bytes(data: &[u8]) -> Option<Vec<u8>> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).ok()?;
    enc.finish().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn drain(s: &mut Sender) -> Vec<Frame> {
        std::iter::from_fn(|| s.poll_frame()).collect()
    }

    fn cfg(window: u32) -> SenderConfig {
        SenderConfig { chunk_size: 256, window, ..Default::default() }
    }

    fn ack(cumulative: u32, ranges: Vec<(u32, u32)>, resume: bool) -> Frame {
        Frame::Ack {
            id: TransferId::new(1),
            ack: Ack { cumulative, window: 64, ranges, resume, solicited: resume },
        }
    }

    #[test]
    fn window_limits_in_flight_and_acks_open_it() {
        let now = t0();
        let mut s = Sender::new(TransferId::new(1), &[7u8; 256 * 10], "{}", cfg(4), now).unwrap();
        let f = drain(&mut s);
        assert!(matches!(f[0], Frame::Open { .. }));
        assert_eq!(f.len(), 5, "OPEN + 4 chunks");
        s.handle_frame(ack(2, vec![], false), now);
        let f = drain(&mut s);
        let idx: Vec<u32> = f
            .iter()
            .filter_map(|f| match f {
                Frame::Data { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(idx, vec![4, 5]);
    }

    #[test]
    fn selective_ack_and_resume_resend_only_missing() {
        let now = t0();
        let mut s = Sender::new(TransferId::new(1), &[1u8; 256 * 6], "", cfg(8), now).unwrap();
        assert_eq!(drain(&mut s).len(), 7);
        s.resume(now);
        let f = drain(&mut s);
        assert!(matches!(f.as_slice(), [Frame::Open { .. }, Frame::Resume { sent: 6, .. }]));
        s.handle_frame(ack(1, vec![(3, 5)], true), now);
        let idx: Vec<u32> = drain(&mut s)
            .iter()
            .filter_map(|f| match f {
                Frame::Data { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(idx, vec![1, 2, 5]);
        assert_eq!((s.bytes_sent(), s.bytes_resent()), (9 * 256, 3 * 256), "six first sends, three resends");
    }

    #[test]
    fn rto_backs_off_and_deadline_fails_with_cancel() {
        let now = t0();
        let c = SenderConfig { deadline: Duration::from_secs(10), ..cfg(4) };
        let mut s = Sender::new(TransferId::new(1), &[1u8; 1000], "", c, now).unwrap();
        drain(&mut s);
        let mut fires = vec![];
        while let Some(t) = s.poll_timeout() {
            s.handle_timeout(t);
            fires.push(t - now);
            drain(&mut s);
        }
        // 1, 1+2, 3+4, 7+8 capped by the deadline at 10.
        let secs: Vec<u64> = fires.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![1, 3, 7, 10]);
        match s.poll_event() {
            Some(SenderEvent::Failed(e)) => assert_eq!(e.code, ErrorCode::TimedOut),
            other => panic!("{other:?}"),
        }
    }

    fn data_indices(frames: &[Frame]) -> Vec<u32> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Data { index, .. } => Some(*index),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_timeout_probes_instead_of_resending_and_resends_only_what_is_missing() {
        let now = t0();
        let mut s = Sender::new(TransferId::new(1), &[3u8; 256 * 6], "", cfg(8), now).unwrap();
        assert_eq!(drain(&mut s).len(), 7, "OPEN + 6 chunks");
        s.handle_frame(ack(0, vec![], false), now); // the OPEN arrived; the receiver is behind
        let rto = s.poll_timeout().unwrap();
        s.handle_timeout(rto);
        let f = drain(&mut s);
        assert!(matches!(f.as_slice(), [Frame::Resume { sent: 6, .. }]), "a probe, no data: {f:?}");
        // The slow receiver had everything but chunk 4 (lost to a reconnect nobody reported).
        s.handle_frame(ack(4, vec![(5, 6)], true), rto);
        assert_eq!(data_indices(&drain(&mut s)), vec![4]);
        // A receiver that was merely slow: the answer holds everything, nothing is resent.
        let mut s = Sender::new(TransferId::new(1), &[3u8; 256 * 6], "", cfg(8), now).unwrap();
        drain(&mut s);
        let rto = s.poll_timeout().unwrap();
        s.handle_timeout(rto);
        let f = drain(&mut s);
        assert!(matches!(f.as_slice(), [Frame::Open { .. }, Frame::Resume { .. }]), "{f:?}");
        s.handle_frame(ack(6, vec![], true), rto);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_forward_sends_chunks_in_order_as_they_are_supplied() {
        let now = t0();
        let src =
            Sender::new(TransferId::new(9), &[5u8; 256 * 4 + 10], "{\"to\":\"b\"}", cfg(8), now).unwrap();
        let open = src.open().clone();
        let mut s = Sender::forward(
            TransferId::new(2),
            open.clone(),
            SenderConfig { chunk_size: 999, ..cfg(8) },
            now,
        )
        .unwrap();
        assert!(
            matches!(drain(&mut s).as_slice(), [Frame::Open { id, open: o }] if id.get() == 2 && *o == open)
        );
        assert!(s.supply(1, &[5u8; 256]));
        assert!(drain(&mut s).is_empty(), "chunk 0 first");
        assert!(!s.supply(0, &[5u8; 255]), "wrong length");
        assert!(s.supply(0, &[5u8; 256]));
        assert!(!s.supply(0, &[6u8; 256]), "the first copy wins");
        assert_eq!(data_indices(&drain(&mut s)), vec![0, 1]);
        s.handle_frame(ack(2, vec![], false), now);
        // Waiting on upstream with everything acknowledged: no timer, no probe.
        let rto = s.poll_timeout().unwrap();
        s.handle_timeout(rto);
        assert!(drain(&mut s).is_empty());
        assert!(!s.supply(5, &[5u8; 10]), "beyond the last chunk");
        assert!(s.supply(4, &[5u8; 10]) && s.supply(2, &[5u8; 256]) && s.supply(3, &[5u8; 256]));
        assert_eq!(data_indices(&drain(&mut s)), vec![2, 3, 4]);
        assert!(
            !Sender::new(TransferId::new(1), b"x", "", cfg(4), now).unwrap().supply(0, b"x"),
            "not a forward"
        );
    }

    #[test]
    fn complete_with_wrong_hash_fails() {
        let now = t0();
        let mut s = Sender::new(TransferId::new(1), b"abc", "", cfg(4), now).unwrap();
        drain(&mut s);
        s.handle_frame(Frame::Complete { id: TransferId::new(1), sha256: [0; 32] }, now);
        let f = drain(&mut s);
        assert!(matches!(f.as_slice(), [Frame::Cancel { code: ErrorCode::HashMismatch, .. }]));
        assert!(matches!(s.poll_event(), Some(SenderEvent::Failed(e)) if e.code == ErrorCode::HashMismatch));
    }

    #[test]
    fn bogus_ack_is_a_protocol_violation_not_a_panic() {
        let now = t0();
        let mut s = Sender::new(TransferId::new(1), &[0u8; 300], "", cfg(4), now).unwrap();
        drain(&mut s);
        s.handle_frame(ack(99, vec![], false), now);
        assert!(
            matches!(s.poll_event(), Some(SenderEvent::Failed(e)) if e.code == ErrorCode::ProtocolViolation)
        );
    }

    #[test]
    fn compression_only_when_smaller() {
        let now = t0();
        let c = SenderConfig { compress: true, ..cfg(4) };
        let s = Sender::new(TransferId::new(1), &[b'a'; 5000], "", c.clone(), now).unwrap();
        assert!(s.open().deflate && s.open().wire_size < 5000);
        let s = Sender::new(TransferId::new(1), b"x", "", c, now).unwrap();
        assert!(!s.open().deflate);
    }
}
