//! Receiving side of one transfer.

use std::collections::VecDeque;
use std::io::Read;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, TransferError};
use crate::frame::{Ack, Frame, MAX_ACK_RANGES, Open};
use crate::id::TransferId;

/// Tuning for incoming transfers. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Largest payload accepted, checked against the OPEN before anything is buffered and
    /// again while inflating. Default 32 MiB.
    pub max_bundle_size: u64,
    /// Window advertised in ACKs, in chunks. Default 32.
    pub window: u32,
    /// Acknowledge at once after this many new chunks. Default 8.
    pub ack_every: u32,
    /// Otherwise acknowledge at most this long after the first unacknowledged chunk.
    /// Default 10 ms: short next to the sender's 1 s RTO, long enough to coalesce a burst.
    pub ack_delay: Duration,
    /// Give up (`timed_out`) after this long without any frame for the transfer. Default 30 s.
    pub idle_timeout: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            max_bundle_size: 32 * 1024 * 1024,
            window: 32,
            ack_every: 8,
            ack_delay: Duration::from_millis(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What a [`Receiver`] reports once, when it finishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// The whole payload, hash verified.
    Received {
        /// The verified payload.
        payload: Vec<u8>,
        /// Metadata from the OPEN.
        meta: String,
    },
    /// The transfer is over without a payload.
    Failed(TransferError),
}

/// One incoming transfer, sans-IO. Driven like [`crate::Sender`]: `handle_*`, then drain
/// [`poll_frame`](Self::poll_frame) (send to the sender) and [`poll_event`](Self::poll_event).
/// Most callers use [`crate::Receivers`], which also enforces per-sender and per-room limits.
#[derive(Debug)]
pub struct Receiver {
    id: TransferId,
    cfg: ReceiverConfig,
    open: Open,
    buf: Vec<u8>,
    have: Vec<bool>,
    held: u32,
    cumulative: u32,
    unacked: u32,
    ack_at: Option<Instant>,
    ack_now: bool,
    resume_report: bool,
    solicited: bool,
    last_heard: Instant,
    finished: bool,
    out: VecDeque<Frame>,
    events: VecDeque<ReceiverEvent>,
}

impl Receiver {
    /// Accepts an OPEN. Fails with `too_large` if the announced size exceeds the limit; the
    /// caller then sends the returned error as an ERROR frame.
    pub fn new(
        id: TransferId,
        open: Open,
        cfg: ReceiverConfig,
        now: Instant,
    ) -> Result<Receiver, TransferError> {
        if open.payload_size > cfg.max_bundle_size || open.wire_size > cfg.max_bundle_size {
            return Err(TransferError::local(
                ErrorCode::TooLarge,
                format!(
                    "bundle of {} bytes exceeds the receiver's limit of {} bytes; trim the chat history or raise max_bundle_size",
                    open.payload_size.max(open.wire_size),
                    cfg.max_bundle_size
                ),
            ));
        }
        let count = open.chunk_count() as usize;
        let mut r = Receiver {
            id,
            buf: vec![0u8; open.wire_size as usize],
            have: vec![false; count],
            held: 0,
            cumulative: 0,
            unacked: 0,
            // Confirm the OPEN soon even if no DATA follows, so the sender stops resending it.
            ack_at: Some(now + cfg.ack_delay),
            ack_now: false,
            resume_report: false,
            solicited: false,
            last_heard: now,
            finished: false,
            out: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
            open,
        };
        if count == 0 {
            r.finalize();
        }
        Ok(r)
    }

    /// Transfer id.
    pub fn id(&self) -> TransferId {
        self.id
    }

    /// The accepted OPEN.
    pub fn open(&self) -> &Open {
        &self.open
    }

    /// True once an event has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Wire bytes held so far, counted in whole chunks (the short last chunk as a full one),
    /// at most the OPEN's `wire_size`. Grows as chunks arrive; what progress reports count.
    pub fn held_bytes(&self) -> u64 {
        (u64::from(self.held) * u64::from(self.open.chunk_size)).min(self.open.wire_size)
    }

    /// The chunks held so far, by index, with their (wire) bytes; none once finished. What a
    /// relay forwarding this transfer downstream starts from.
    pub fn held_chunks(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        let cs = self.open.chunk_size as usize;
        let buf = if self.finished { &[][..] } else { &self.buf[..] };
        self.have.iter().enumerate().filter(move |(_, held)| **held && !buf.is_empty()).map(move |(i, _)| {
            let start = i * cs;
            (i as u32, &buf[start..(start + cs).min(buf.len())])
        })
    }

    /// Handles a frame from the sender (OPEN repeat, DATA, CANCEL, RESUME).
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.finished {
            return;
        }
        self.last_heard = now;
        match frame {
            Frame::Open { open, .. } => {
                if open == self.open {
                    self.schedule_ack(now);
                } else {
                    self.fail(
                        ErrorCode::ConflictingOpen,
                        "a second OPEN with this id announced different parameters; use a fresh id per transfer".into(),
                    );
                }
            }
            Frame::Data { index, bytes, .. } => self.on_data(index, &bytes, now),
            Frame::Resume { .. } => {
                self.ack_now = true;
                self.resume_report = true;
                self.solicited = true;
            }
            Frame::Cancel { code, reason, .. } => {
                self.finished = true;
                self.events.push_back(ReceiverEvent::Failed(TransferError::remote(code, reason)));
            }
            _ => {}
        }
    }

    /// Ends the transfer from this side before it arrived whole: ERROR `code` with `reason` to
    /// the sender and a `Failed` outcome, as for any refusal. Does nothing once finished.
    pub fn abort(&mut self, code: ErrorCode, reason: String) {
        if !self.finished {
            self.fail(code, reason);
        }
    }

    /// Call after a reconnect of either side: reports what is held (ACK with the resume flag),
    /// so the sender resends only what is missing.
    pub fn resume(&mut self, now: Instant) {
        if !self.finished {
            self.last_heard = now;
            self.ack_now = true;
            self.resume_report = true;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        let idle = self.last_heard + self.cfg.idle_timeout;
        Some(self.ack_at.map_or(idle, |a| a.min(idle)))
    }

    /// Advances timers: delayed ACK and idle timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        if now >= self.last_heard + self.cfg.idle_timeout {
            self.fail(
                ErrorCode::TimedOut,
                format!(
                    "no frame from the sender for {:?} ({} of {} chunks held)",
                    self.cfg.idle_timeout,
                    self.held,
                    self.have.len()
                ),
            );
            return;
        }
        if self.ack_at.is_some_and(|t| now >= t) {
            self.ack_now = true;
        }
    }

    /// Next frame for the sender.
    pub fn poll_frame(&mut self) -> Option<Frame> {
        if let Some(f) = self.out.pop_front() {
            return Some(f);
        }
        if self.finished || !self.ack_now {
            return None;
        }
        self.ack_now = false;
        self.ack_at = None;
        self.unacked = 0;
        let resume = std::mem::take(&mut self.resume_report);
        let mut ack = self.ack_state(resume);
        ack.solicited = resume && std::mem::take(&mut self.solicited);
        Some(Frame::Ack { id: self.id, ack })
    }

    /// The outcome, once.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Current acknowledgement state (lowest [`MAX_ACK_RANGES`] ranges).
    pub fn ack_state(&self, resume: bool) -> Ack {
        let mut ranges = Vec::new();
        let mut i = self.cumulative as usize;
        while i < self.have.len() && ranges.len() < MAX_ACK_RANGES {
            if self.have[i] {
                let s = i;
                while i < self.have.len() && self.have[i] {
                    i += 1;
                }
                ranges.push((s as u32, i as u32));
            } else {
                i += 1;
            }
        }
        Ack { cumulative: self.cumulative, window: self.cfg.window, ranges, resume, solicited: false }
    }

    fn schedule_ack(&mut self, now: Instant) {
        let t = now + self.cfg.ack_delay;
        self.ack_at = Some(self.ack_at.map_or(t, |a| a.min(t)));
    }

    fn on_data(&mut self, index: u32, bytes: &[u8], now: Instant) {
        let count = self.have.len() as u32;
        if index >= count {
            self.fail(ErrorCode::ProtocolViolation, format!("chunk {index} beyond the last ({count})"));
            return;
        }
        let cs = self.open.chunk_size as usize;
        let start = index as usize * cs;
        let end = (start + cs).min(self.buf.len());
        if bytes.len() != end - start {
            self.fail(
                ErrorCode::ProtocolViolation,
                format!("chunk {index} has {} bytes, expected {}", bytes.len(), end - start),
            );
            return;
        }
        if self.have[index as usize] {
            // A duplicate means the sender thinks it may be lost: tell it soon what we hold.
            self.schedule_ack(now);
            return;
        }
        self.buf[start..end].copy_from_slice(bytes);
        self.have[index as usize] = true;
        self.held += 1;
        while (self.cumulative as usize) < self.have.len() && self.have[self.cumulative as usize] {
            self.cumulative += 1;
        }
        if self.held == count {
            self.finalize();
            return;
        }
        self.unacked += 1;
        if self.unacked >= self.cfg.ack_every.max(1) {
            self.ack_now = true;
        } else {
            self.schedule_ack(now);
        }
    }

    fn finalize(&mut self) {
        let payload = if self.open.deflate {
            match inflate_bounded(&self.buf, self.open.payload_size) {
                Ok(p) => p,
                Err(code) => {
                    self.fail(
                        code,
                        "the deflate stream is corrupt or does not inflate to the announced size".into(),
                    );
                    return;
                }
            }
        } else {
            std::mem::take(&mut self.buf)
        };
        let sha: [u8; 32] = Sha256::digest(&payload).into();
        if sha != self.open.sha256 {
            self.fail(
                ErrorCode::HashMismatch,
                "reassembled payload does not match the announced SHA-256; the sender should retry with a new id".into(),
            );
            return;
        }
        self.buf = Vec::new();
        self.finished = true;
        self.out.push_back(Frame::Complete { id: self.id, sha256: sha });
        self.events.push_back(ReceiverEvent::Received { payload, meta: self.open.meta.clone() });
    }

    fn fail(&mut self, code: ErrorCode, reason: String) {
        self.finished = true;
        self.buf = Vec::new();
        self.out.push_back(Frame::Error {
            id: self.id,
            code,
            reason: crate::frame::truncate_reason(&reason),
        });
        self.events.push_back(ReceiverEvent::Failed(TransferError::local(code, reason)));
    }
}

/// Inflates raw deflate, refusing to produce more than `expected` bytes (zip-bomb safe: the
/// output is capped while inflating, not measured afterwards) and requiring exactly
/// `expected` bytes.
fn inflate_bounded(data: &[u8], expected: u64) -> Result<Vec<u8>, ErrorCode> {
    let dec = flate2::read::DeflateDecoder::new(data);
    let mut out = Vec::with_capacity(expected.min(1 << 20) as usize);
    dec.take(expected.saturating_add(1)).read_to_end(&mut out).map_err(|_| ErrorCode::DecompressionFailed)?;
    if out.len() as u64 > expected {
        return Err(ErrorCode::TooLarge);
    }
    if (out.len() as u64) != expected {
        return Err(ErrorCode::DecompressionFailed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn open_for(payload: &[u8], chunk: u32) -> Open {
        Open {
            payload_size: payload.len() as u64,
            wire_size: payload.len() as u64,
            chunk_size: chunk,
            sha256: Sha256::digest(payload).into(),
            deflate: false,
            meta: "{\"purpose\":\"handoff\"}".into(),
        }
    }

    fn data(index: u32, payload: &[u8]) -> Frame {
        let s = index as usize * 256;
        Frame::Data {
            id: TransferId::new(9),
            index,
            bytes: payload[s..(s + 256).min(payload.len())].to_vec(),
        }
    }

    #[test]
    fn out_of_order_with_duplicates_is_received_once() {
        let now = Instant::now();
        let p: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut r =
            Receiver::new(TransferId::new(9), open_for(&p, 256), ReceiverConfig::default(), now).unwrap();
        for i in [3, 1, 1, 0, 3, 2] {
            r.handle_frame(data(i, &p), now);
        }
        let frames: Vec<Frame> = std::iter::from_fn(|| r.poll_frame()).collect();
        assert!(matches!(frames.last(), Some(Frame::Complete { .. })));
        match r.poll_event() {
            Some(ReceiverEvent::Received { payload, meta }) => {
                assert_eq!(payload, p);
                assert_eq!(meta, "{\"purpose\":\"handoff\"}");
            }
            other => panic!("{other:?}"),
        }
        r.handle_frame(data(0, &p), now);
        assert_eq!(r.poll_event(), None, "received only once");
    }

    #[test]
    fn acks_coalesce_then_flush_on_count_or_delay() {
        let now = Instant::now();
        let p = vec![5u8; 256 * 20];
        let cfg = ReceiverConfig { ack_every: 4, ..Default::default() };
        let mut r = Receiver::new(TransferId::new(9), open_for(&p, 256), cfg, now).unwrap();
        for i in 0..3 {
            r.handle_frame(data(i, &p), now);
            assert_eq!(r.poll_frame(), None);
        }
        r.handle_frame(data(5, &p), now);
        match r.poll_frame() {
            Some(Frame::Ack { ack, .. }) => {
                assert_eq!(ack.cumulative, 3);
                assert_eq!(ack.ranges, vec![(5, 6)]);
                assert!(!ack.resume);
            }
            other => panic!("{other:?}"),
        }
        r.handle_frame(data(3, &p), now);
        assert_eq!(r.poll_frame(), None);
        let t = r.poll_timeout().unwrap();
        assert_eq!(t, now + Duration::from_millis(10));
        r.handle_timeout(t);
        assert!(matches!(r.poll_frame(), Some(Frame::Ack { ack, .. }) if ack.cumulative == 4));
        r.handle_frame(Frame::Resume { id: TransferId::new(9), sent: 6 }, t);
        assert!(matches!(r.poll_frame(), Some(Frame::Ack { ack, .. }) if ack.resume && ack.solicited));
        r.resume(t);
        assert!(matches!(r.poll_frame(), Some(Frame::Ack { ack, .. }) if ack.resume && !ack.solicited));
    }

    #[test]
    fn corrupted_chunk_fails_with_hash_mismatch() {
        let now = Instant::now();
        let p = vec![1u8; 300];
        let mut r =
            Receiver::new(TransferId::new(9), open_for(&p, 256), ReceiverConfig::default(), now).unwrap();
        let mut bad = p.clone();
        bad[0] ^= 1;
        r.handle_frame(data(0, &bad), now);
        r.handle_frame(data(1, &p), now);
        assert!(matches!(r.poll_frame(), Some(Frame::Error { code: ErrorCode::HashMismatch, .. })));
        assert!(
            matches!(r.poll_event(), Some(ReceiverEvent::Failed(e)) if e.code == ErrorCode::HashMismatch)
        );
    }

    #[test]
    fn wrong_length_and_index_are_protocol_violations() {
        let now = Instant::now();
        let p = vec![1u8; 600];
        let mut r =
            Receiver::new(TransferId::new(9), open_for(&p, 256), ReceiverConfig::default(), now).unwrap();
        r.handle_frame(Frame::Data { id: TransferId::new(9), index: 0, bytes: vec![0; 10] }, now);
        assert!(
            matches!(r.poll_event(), Some(ReceiverEvent::Failed(e)) if e.code == ErrorCode::ProtocolViolation)
        );
        let mut r =
            Receiver::new(TransferId::new(9), open_for(&p, 256), ReceiverConfig::default(), now).unwrap();
        r.handle_frame(Frame::Data { id: TransferId::new(9), index: 3, bytes: vec![0; 10] }, now);
        assert!(
            matches!(r.poll_event(), Some(ReceiverEvent::Failed(e)) if e.code == ErrorCode::ProtocolViolation)
        );
    }

    #[test]
    fn too_large_refused_from_open() {
        let cfg = ReceiverConfig { max_bundle_size: 100, ..Default::default() };
        let e = Receiver::new(TransferId::new(1), open_for(&[0; 101], 256), cfg, Instant::now()).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
    }

    #[test]
    fn zip_bomb_is_capped_while_inflating() {
        // 1 MiB of zeros compresses to about 1 KB; announcing 1000 bytes must not inflate it.
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![0u8; 1 << 20]).unwrap();
        let z = enc.finish().unwrap();
        assert_eq!(inflate_bounded(&z, 1000), Err(ErrorCode::TooLarge));
        assert_eq!(inflate_bounded(&z, 2 << 20), Err(ErrorCode::DecompressionFailed));
        assert_eq!(inflate_bounded(&[0xff, 0xff], 10), Err(ErrorCode::DecompressionFailed));
        assert_eq!(inflate_bounded(&z, 1 << 20).map(|v| v.len()), Ok(1 << 20));
    }

    #[test]
    fn idle_timeout_fails_and_tells_sender() {
        let now = Instant::now();
        let p = vec![1u8; 600];
        let mut r =
            Receiver::new(TransferId::new(9), open_for(&p, 256), ReceiverConfig::default(), now).unwrap();
        let _ = r.poll_frame();
        let mut t = now;
        let mut errors = vec![];
        while let Some(next) = r.poll_timeout() {
            t = next;
            r.handle_timeout(t);
            while let Some(f) = r.poll_frame() {
                if let Frame::Error { code, .. } = f {
                    errors.push(code);
                }
            }
        }
        assert_eq!(t, now + Duration::from_secs(30));
        assert_eq!(errors, vec![ErrorCode::TimedOut], "the sender is told");
        assert!(matches!(r.poll_event(), Some(ReceiverEvent::Failed(e)) if e.code == ErrorCode::TimedOut));
    }
}
