//! Binary frame codec for the `baton.xfer` topic.
//!
//! Every frame fits in one LiveKit reliable data packet (at most [`MAX_FRAME_SIZE`] bytes).
//! All integers are big-endian. The layout is specified byte by byte in
//! `docs/protocol.md (section 4)`; this module is the reference implementation and the golden
//! vectors in `tests/vectors/transfer/` pin it.
//!
//! Decoding is total: any byte string yields either a [`Frame`] or a [`DecodeError`], never a
//! panic, and no length read from the input is trusted before it is checked against the
//! remaining bytes and the protocol's bounds.

use crate::error::ErrorCode;
use crate::id::TransferId;
use thiserror::Error;

/// First byte of every frame. Lets a receiver tell a transfer frame from stray bytes before
/// looking at anything else.
pub const MAGIC: u8 = 0xBA;
/// The only frame format version this crate speaks.
pub const VERSION: u8 = 1;
/// Largest frame, header included: LiveKit documents 15 KiB for reliable packets and its own
/// data streams use 15 000-byte chunks, so we stay at the same conservative figure.
pub const MAX_FRAME_SIZE: usize = 15_000;
/// Common header: magic, version, kind, flags, 128-bit transfer id.
pub const HEADER_LEN: usize = 20;
/// DATA header: common header plus the chunk index.
pub const DATA_HEADER_LEN: usize = HEADER_LEN + 4;
/// Largest chunk a DATA frame can carry.
pub const MAX_CHUNK_SIZE: u32 = (MAX_FRAME_SIZE - DATA_HEADER_LEN) as u32;
/// Smallest chunk size an OPEN may announce (except that the last chunk may be shorter).
/// Bounds the receiver's per-chunk bookkeeping for a given bundle size.
pub const MIN_CHUNK_SIZE: u32 = 256;
/// Largest metadata field in an OPEN frame.
pub const MAX_META_LEN: usize = 4096;
/// Largest reason text in CANCEL/ERROR frames.
pub const MAX_REASON_LEN: usize = 1024;
/// Most selective-ack ranges one ACK carries; the receiver reports the lowest ones first.
pub const MAX_ACK_RANGES: usize = 256;

const OPEN_FIXED_LEN: usize = HEADER_LEN + 8 + 8 + 4 + 32 + 2;
const ACK_FIXED_LEN: usize = HEADER_LEN + 4 + 4 + 2;
const COMPLETE_LEN: usize = HEADER_LEN + 32;
const ABORT_FIXED_LEN: usize = HEADER_LEN + 2 + 2;
const RESUME_LEN: usize = HEADER_LEN + 4;

/// OPEN flag: the DATA stream is the raw-deflate (RFC 1951) encoding of the payload.
pub const OPEN_FLAG_DEFLATE: u8 = 0x01;
/// ACK flag: this ACK answers a reconnect; every chunk it does not cover is not held by the
/// receiver and should be sent again now rather than after a timeout.
pub const ACK_FLAG_RESUME: u8 = 0x01;
/// ACK flag, only with [`ACK_FLAG_RESUME`]: this report answers the sender's RESUME (rather
/// than announcing the receiver's own reconnect). Lets the sender ignore the second of two
/// crossing reports when both sides noticed the same reconnect.
pub const ACK_FLAG_SOLICITED: u8 = 0x02;

/// Frame kind byte (offset 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Sender → receiver: announces a transfer.
    Open = 1,
    /// Sender → receiver: one chunk.
    Data = 2,
    /// Receiver → sender: what the receiver holds.
    Ack = 3,
    /// Receiver → sender: payload reassembled and hash verified.
    Complete = 4,
    /// Sender → receiver: the sender abandons the transfer.
    Cancel = 5,
    /// Receiver → sender: the receiver refuses or failed the transfer.
    Error = 6,
    /// Sender → receiver: after a reconnect, asks for an ACK with [`ACK_FLAG_RESUME`].
    Resume = 7,
}

impl Kind {
    /// Which side of a transfer consumes frames of this kind.
    pub fn direction(self) -> Direction {
        match self {
            Kind::Open | Kind::Data | Kind::Cancel | Kind::Resume => Direction::ToReceiver,
            Kind::Ack | Kind::Complete | Kind::Error => Direction::ToSender,
        }
    }

    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Ack,
            4 => Kind::Complete,
            5 => Kind::Cancel,
            6 => Kind::Error,
            7 => Kind::Resume,
            _ => return None,
        })
    }
}

/// Who a frame is for. Lets one endpoint route a packet without knowing the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// OPEN, DATA, CANCEL, RESUME.
    ToReceiver,
    /// ACK, COMPLETE, ERROR.
    ToSender,
}

/// OPEN body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Size of the payload the receiver ends up with (after decompression).
    pub payload_size: u64,
    /// Size of the byte stream carried by DATA frames (equal to `payload_size` unless
    /// `deflate`).
    pub wire_size: u64,
    /// Size of every chunk but the last.
    pub chunk_size: u32,
    /// SHA-256 of the payload (after decompression).
    pub sha256: [u8; 32],
    /// Whether the DATA stream is raw deflate.
    pub deflate: bool,
    /// Small application metadata (UTF-8, conventionally a JSON object), at most
    /// [`MAX_META_LEN`] bytes.
    pub meta: String,
}

impl Open {
    /// Number of DATA chunks this transfer has.
    pub fn chunk_count(&self) -> u32 {
        // Bounded by decode/validate: wire_size / MIN_CHUNK_SIZE fits in u32.
        self.wire_size.div_ceil(u64::from(self.chunk_size)) as u32
    }
}

/// ACK body (also the resume report when `resume` is set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Chunks `0..cumulative` are all held.
    pub cumulative: u32,
    /// How many chunks past `cumulative` the sender may send.
    pub window: u32,
    /// Held chunks above `cumulative`, as half-open `[start, end)` ranges, ascending,
    /// non-overlapping and non-adjacent, each starting above `cumulative`.
    pub ranges: Vec<(u32, u32)>,
    /// Set when this ACK answers a reconnect (see [`ACK_FLAG_RESUME`]).
    pub resume: bool,
    /// Set when the resume report answers a RESUME frame (see [`ACK_FLAG_SOLICITED`]).
    pub solicited: bool,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Announces a transfer.
    Open {
        /// Transfer id.
        id: TransferId,
        /// The announced parameters.
        open: Open,
    },
    /// One chunk of the wire stream.
    Data {
        /// Transfer id.
        id: TransferId,
        /// Chunk index, from 0.
        index: u32,
        /// Chunk bytes.
        bytes: Vec<u8>,
    },
    /// Receiver state.
    Ack {
        /// Transfer id.
        id: TransferId,
        /// Acknowledgement state.
        ack: Ack,
    },
    /// The receiver verified this SHA-256 over the whole payload.
    Complete {
        /// Transfer id.
        id: TransferId,
        /// SHA-256 of the payload.
        sha256: [u8; 32],
    },
    /// The sender abandons the transfer.
    Cancel {
        /// Transfer id.
        id: TransferId,
        /// Error code.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// The receiver refuses or failed the transfer.
    Error {
        /// Transfer id.
        id: TransferId,
        /// Error code.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// After a reconnect, the sender asks for the receiver's state. `sent` is how many chunks
    /// the sender had sent (informational).
    Resume {
        /// Transfer id.
        id: TransferId,
        /// Chunks the sender had sent.
        sent: u32,
    },
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the frame kind needs.
    #[error("frame truncated: {len} bytes, need at least {need}")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes required.
        need: usize,
    },
    /// More than [`MAX_FRAME_SIZE`] bytes.
    #[error("frame too large: {0} bytes (max {MAX_FRAME_SIZE})")]
    TooLarge(usize),
    /// First byte is not [`MAGIC`].
    #[error("not a baton transfer frame (magic 0x{0:02x}, expected 0xba)")]
    BadMagic(u8),
    /// Version byte is not [`VERSION`]: the sender speaks a format this build does not.
    #[error("unsupported transfer frame version {0} (this build speaks {VERSION}); upgrade the older side")]
    UnsupportedVersion(u8),
    /// Kind byte unknown.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flags set that this version does not define.
    #[error("unknown flags 0x{flags:02x} on {kind:?} frame")]
    BadFlags {
        /// Frame kind.
        kind: Kind,
        /// The flags byte.
        flags: u8,
    },
    /// Bytes left after the frame's last field.
    #[error("{0} trailing bytes after frame")]
    Trailing(usize),
    /// A field violates the protocol's bounds.
    #[error("invalid field {field}: {why}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Which bound it breaks.
        why: &'static str,
    },
}

impl DecodeError {
    /// Stable snake_case name of the failure (used in golden vectors and logs).
    pub fn name(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::BadMagic(_) => "bad_magic",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::BadFlags { .. } => "bad_flags",
            DecodeError::Trailing(_) => "trailing",
            DecodeError::Invalid { .. } => "invalid",
        }
    }

    /// The error code the other end or the local application sees for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a frame cannot be encoded (the caller built one outside the protocol's bounds).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot encode frame: {0}")]
pub struct EncodeError(pub &'static str);

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated { len: self.buf.len(), need: usize::MAX })?;
        let s =
            self.buf.get(self.pos..end).ok_or(DecodeError::Truncated { len: self.buf.len(), need: end })?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// The common header: kind, flags and transfer id, after the size, magic and version checks.
fn header(buf: &[u8]) -> Result<(Kind, u8, TransferId), DecodeError> {
    if buf.len() > MAX_FRAME_SIZE {
        return Err(DecodeError::TooLarge(buf.len()));
    }
    // Magic and version are checked before the length so that a frame from a future version
    // with a different header is reported as a version problem, not truncation.
    match buf.first() {
        None => return Err(DecodeError::Truncated { len: 0, need: 1 }),
        Some(&m) if m != MAGIC => return Err(DecodeError::BadMagic(m)),
        Some(_) => {}
    }
    match buf.get(1) {
        None => return Err(DecodeError::Truncated { len: 1, need: 2 }),
        Some(&v) if v != VERSION => return Err(DecodeError::UnsupportedVersion(v)),
        Some(_) => {}
    }
    let mut r = Reader { buf, pos: 0 };
    let [_, _, kind_b, flags] = r.arr::<4>()?;
    let kind = Kind::from_u8(kind_b).ok_or(DecodeError::UnknownKind(kind_b))?;
    let id = TransferId::from_be_bytes(r.arr()?);
    Ok((kind, flags, id))
}

/// `reason` cut to at most [`MAX_REASON_LEN`] bytes at a character boundary, so it fits a
/// CANCEL or ERROR frame.
pub fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn invalid(field: &'static str, why: &'static str) -> DecodeError {
    DecodeError::Invalid { field, why }
}

fn utf8(bytes: &[u8], field: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(field, "not UTF-8"))
}

/// Checks an OPEN's fields against the protocol bounds; shared by the decoder and encoder so
/// the two can never disagree.
fn check_open(o: &Open) -> Result<(), &'static str> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&o.chunk_size) {
        return Err("chunk_size out of range 256..=14976");
    }
    if !o.deflate && o.wire_size != o.payload_size {
        return Err("wire_size differs from payload_size without deflate");
    }
    if o.wire_size.div_ceil(u64::from(o.chunk_size)) > u64::from(u32::MAX) {
        return Err("too many chunks");
    }
    if o.meta.len() > MAX_META_LEN {
        return Err("meta longer than 4096 bytes");
    }
    Ok(())
}

fn check_ack(a: &Ack) -> Result<(), &'static str> {
    if a.solicited && !a.resume {
        return Err("solicited flag without resume flag");
    }
    if a.ranges.len() > MAX_ACK_RANGES {
        return Err("more than 256 ack ranges");
    }
    let mut floor = a.cumulative;
    for &(s, e) in &a.ranges {
        // Strictly above the previous end: canonical ranges, so two encoders of the same state
        // produce the same bytes.
        if s <= floor || e <= s {
            return Err("ack ranges not ascending, disjoint, non-adjacent and above cumulative");
        }
        floor = e;
    }
    Ok(())
}

impl Frame {
    /// The transfer this frame belongs to.
    pub fn id(&self) -> TransferId {
        match self {
            Frame::Open { id, .. }
            | Frame::Data { id, .. }
            | Frame::Ack { id, .. }
            | Frame::Complete { id, .. }
            | Frame::Cancel { id, .. }
            | Frame::Error { id, .. }
            | Frame::Resume { id, .. } => *id,
        }
    }

    /// The frame's kind byte.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Open { .. } => Kind::Open,
            Frame::Data { .. } => Kind::Data,
            Frame::Ack { .. } => Kind::Ack,
            Frame::Complete { .. } => Kind::Complete,
            Frame::Cancel { .. } => Kind::Cancel,
            Frame::Error { .. } => Kind::Error,
            Frame::Resume { .. } => Kind::Resume,
        }
    }

    /// Which side of a transfer consumes this frame.
    pub fn direction(&self) -> Direction {
        self.kind().direction()
    }

    /// The kind and transfer id of an encoded frame, read from its common header without
    /// decoding the body; `None` when the header is not a valid one (too long, wrong magic or
    /// version, unknown kind, shorter than [`HEADER_LEN`]). The body may still be invalid: only
    /// [`decode`](Self::decode) says a frame is.
    pub fn peek(buf: &[u8]) -> Option<(Kind, TransferId)> {
        header(buf).ok().map(|(kind, _, id)| (kind, id))
    }

    /// Encodes the frame. Fails only if the frame violates the protocol's bounds, in which
    /// case the receiving decoder would have rejected it anyway.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut flags = 0u8;
        let mut body = Vec::new();
        match self {
            Frame::Open { open, .. } => {
                check_open(open).map_err(EncodeError)?;
                if open.deflate {
                    flags |= OPEN_FLAG_DEFLATE;
                }
                body.extend_from_slice(&open.payload_size.to_be_bytes());
                body.extend_from_slice(&open.wire_size.to_be_bytes());
                body.extend_from_slice(&open.chunk_size.to_be_bytes());
                body.extend_from_slice(&open.sha256);
                body.extend_from_slice(&(open.meta.len() as u16).to_be_bytes());
                body.extend_from_slice(open.meta.as_bytes());
            }
            Frame::Data { index, bytes, .. } => {
                if bytes.is_empty() || bytes.len() > MAX_CHUNK_SIZE as usize {
                    return Err(EncodeError("chunk must be 1..=14976 bytes"));
                }
                body.extend_from_slice(&index.to_be_bytes());
                body.extend_from_slice(bytes);
            }
            Frame::Ack { ack, .. } => {
                check_ack(ack).map_err(EncodeError)?;
                if ack.resume {
                    flags |= ACK_FLAG_RESUME;
                }
                if ack.solicited {
                    flags |= ACK_FLAG_SOLICITED;
                }
                body.extend_from_slice(&ack.cumulative.to_be_bytes());
                body.extend_from_slice(&ack.window.to_be_bytes());
                body.extend_from_slice(&(ack.ranges.len() as u16).to_be_bytes());
                for (s, e) in &ack.ranges {
                    body.extend_from_slice(&s.to_be_bytes());
                    body.extend_from_slice(&e.to_be_bytes());
                }
            }
            Frame::Complete { sha256, .. } => body.extend_from_slice(sha256),
            Frame::Cancel { code, reason, .. } | Frame::Error { code, reason, .. } => {
                if reason.len() > MAX_REASON_LEN {
                    return Err(EncodeError("reason longer than 1024 bytes"));
                }
                body.extend_from_slice(&code.to_u16().to_be_bytes());
                body.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                body.extend_from_slice(reason.as_bytes());
            }
            Frame::Resume { sent, .. } => body.extend_from_slice(&sent.to_be_bytes()),
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&[MAGIC, VERSION, self.kind() as u8, flags]);
        out.extend_from_slice(&self.id().to_be_bytes());
        out.extend_from_slice(&body);
        debug_assert!(out.len() <= MAX_FRAME_SIZE);
        Ok(out)
    }

    /// Decodes one frame. Never panics; every length is checked before use.
    pub fn decode(buf: &[u8]) -> Result<Frame, DecodeError> {
        let (kind, flags, id) = header(buf)?;
        let mut r = Reader { buf, pos: HEADER_LEN };
        let allowed = match kind {
            Kind::Open => OPEN_FLAG_DEFLATE,
            Kind::Ack => ACK_FLAG_RESUME | ACK_FLAG_SOLICITED,
            _ => 0,
        };
        let solicited_alone = kind == Kind::Ack && flags & 0x03 == ACK_FLAG_SOLICITED;
        if flags & !allowed != 0 || solicited_alone {
            return Err(DecodeError::BadFlags { kind, flags });
        }
        let need = match kind {
            Kind::Open => OPEN_FIXED_LEN,
            Kind::Data => DATA_HEADER_LEN + 1,
            Kind::Ack => ACK_FIXED_LEN,
            Kind::Complete => COMPLETE_LEN,
            Kind::Cancel | Kind::Error => ABORT_FIXED_LEN,
            Kind::Resume => RESUME_LEN,
        };
        if buf.len() < need {
            return Err(DecodeError::Truncated { len: buf.len(), need });
        }
        let frame = match kind {
            Kind::Open => {
                let payload_size = r.u64()?;
                let wire_size = r.u64()?;
                let chunk_size = r.u32()?;
                let sha256 = r.arr()?;
                let meta_len = usize::from(r.u16()?);
                if meta_len > MAX_META_LEN {
                    return Err(invalid("meta_len", "longer than 4096"));
                }
                let meta = utf8(r.take(meta_len)?, "meta")?;
                let open = Open {
                    payload_size,
                    wire_size,
                    chunk_size,
                    sha256,
                    deflate: flags & OPEN_FLAG_DEFLATE != 0,
                    meta,
                };
                check_open(&open).map_err(|why| invalid("open", why))?;
                Frame::Open { id, open }
            }
            Kind::Data => {
                let index = r.u32()?;
                let bytes = r.rest().to_vec();
                Frame::Data { id, index, bytes }
            }
            Kind::Ack => {
                let cumulative = r.u32()?;
                let window = r.u32()?;
                let n = usize::from(r.u16()?);
                if n > MAX_ACK_RANGES {
                    return Err(invalid("range_count", "more than 256"));
                }
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    ranges.push((r.u32()?, r.u32()?));
                }
                let ack = Ack {
                    cumulative,
                    window,
                    ranges,
                    resume: flags & ACK_FLAG_RESUME != 0,
                    solicited: flags & ACK_FLAG_SOLICITED != 0,
                };
                check_ack(&ack).map_err(|why| invalid("ranges", why))?;
                Frame::Ack { id, ack }
            }
            Kind::Complete => Frame::Complete { id, sha256: r.arr()? },
            Kind::Cancel | Kind::Error => {
                let code = ErrorCode::from_u16(r.u16()?);
                let len = usize::from(r.u16()?);
                if len > MAX_REASON_LEN {
                    return Err(invalid("reason_len", "longer than 1024"));
                }
                let reason = utf8(r.take(len)?, "reason")?;
                if kind == Kind::Cancel {
                    Frame::Cancel { id, code, reason }
                } else {
                    Frame::Error { id, code, reason }
                }
            }
            Kind::Resume => Frame::Resume { id, sent: r.u32()? },
        };
        r.finish()?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Open {
                id: TransferId::new(7),
                open: Open {
                    payload_size: 100,
                    wire_size: 60,
                    chunk_size: 256,
                    sha256: [3; 32],
                    deflate: true,
                    meta: "{\"a\":1}".into(),
                },
            },
            Frame::Data { id: TransferId::new(u128::MAX), index: 3, bytes: vec![9; MAX_CHUNK_SIZE as usize] },
            Frame::Ack {
                id: TransferId::new(1),
                ack: Ack {
                    cumulative: 2,
                    window: 32,
                    ranges: vec![(4, 6), (8, 9)],
                    resume: true,
                    solicited: true,
                },
            },
            Frame::Complete { id: TransferId::new(2), sha256: [0xab; 32] },
            Frame::Cancel {
                id: TransferId::new(3),
                code: ErrorCode::Cancelled,
                reason: "user hung up".into(),
            },
            Frame::Error { id: TransferId::new(4), code: ErrorCode::Other(999), reason: String::new() },
            Frame::Resume { id: TransferId::new(5), sent: 17 },
        ]
    }

    #[test]
    fn round_trip_and_size_bound() {
        for f in samples() {
            let b = f.encode().expect("encodable");
            assert!(b.len() <= MAX_FRAME_SIZE);
            assert_eq!(Frame::decode(&b), Ok(f.clone()));
            // Every strict prefix must be rejected, never accepted as a different frame.
            // A DATA prefix that keeps at least one byte is a valid, shorter DATA frame.
            let last = if f.kind() == Kind::Data { DATA_HEADER_LEN + 1 } else { b.len() };
            for cut in 0..last {
                assert!(Frame::decode(&b[..cut]).is_err(), "{:?} cut at {cut}", f.kind());
            }
            let mut longer = b.clone();
            longer.push(0);
            if f.kind() != Kind::Data {
                assert_eq!(Frame::decode(&longer), Err(DecodeError::Trailing(1)));
            }
        }
    }

    #[test]
    fn header_errors_are_typed() {
        let good = Frame::Resume { id: TransferId::new(1), sent: 0 }.encode().unwrap();
        let mut b = good.clone();
        b[0] = 0;
        assert_eq!(Frame::decode(&b), Err(DecodeError::BadMagic(0)));
        let mut b = good.clone();
        b[1] = 2;
        let e = Frame::decode(&b).unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedVersion(2));
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        // A future version is reported as such even when its header is shorter than ours.
        assert_eq!(Frame::decode(&[MAGIC, 9]), Err(DecodeError::UnsupportedVersion(9)));
        let mut b = good.clone();
        b[2] = 42;
        assert_eq!(Frame::decode(&b), Err(DecodeError::UnknownKind(42)));
        let mut b = good;
        b[3] = 1;
        assert!(matches!(Frame::decode(&b), Err(DecodeError::BadFlags { .. })));
        assert_eq!(
            Frame::decode(&vec![MAGIC; MAX_FRAME_SIZE + 1]),
            Err(DecodeError::TooLarge(MAX_FRAME_SIZE + 1))
        );
    }

    #[test]
    fn bounds_enforced_both_ways() {
        let mut open = Open {
            payload_size: 10,
            wire_size: 10,
            chunk_size: 255,
            sha256: [0; 32],
            deflate: false,
            meta: String::new(),
        };
        let f = Frame::Open { id: TransferId::new(1), open: open.clone() };
        assert!(f.encode().is_err());
        open.chunk_size = 256;
        let mut b = Frame::Open { id: TransferId::new(1), open: open.clone() }.encode().unwrap();
        b[36..40].copy_from_slice(&255u32.to_be_bytes());
        assert!(matches!(Frame::decode(&b), Err(DecodeError::Invalid { .. })));
        open.wire_size = 11;
        assert!(Frame::Open { id: TransferId::new(1), open }.encode().is_err());
        let bad_ack = Ack { cumulative: 5, window: 1, ranges: vec![(5, 7)], resume: false, solicited: false };
        assert!(Frame::Ack { id: TransferId::new(1), ack: bad_ack }.encode().is_err());
        let adjacent =
            Ack { cumulative: 1, window: 1, ranges: vec![(3, 5), (5, 7)], resume: false, solicited: false };
        assert!(Frame::Ack { id: TransferId::new(1), ack: adjacent }.encode().is_err());
        assert!(Frame::Data { id: TransferId::new(1), index: 0, bytes: vec![] }.encode().is_err());
    }
}
