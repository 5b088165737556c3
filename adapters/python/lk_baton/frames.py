"""Binary frame codec for the ``baton.xfer`` topic (docs/protocol.md (section 4)).

Byte-identical to the Rust crate ``baton-transfer`` (``frame.rs``); both are pinned by the golden
vectors in ``tests/vectors/transfer/``. All integers are big-endian. Decoding never raises
anything but :class:`DecodeError`, and every length is checked before it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = 0xBA
VERSION = 1
MAX_FRAME_SIZE = 15_000
HEADER_LEN = 20
DATA_HEADER_LEN = HEADER_LEN + 4
MAX_CHUNK_SIZE = MAX_FRAME_SIZE - DATA_HEADER_LEN  # 14 976
MIN_CHUNK_SIZE = 256
MAX_META_LEN = 4096
MAX_REASON_LEN = 1024
MAX_ACK_RANGES = 256

OPEN_FLAG_DEFLATE = 0x01
ACK_FLAG_RESUME = 0x01
ACK_FLAG_SOLICITED = 0x02

_OPEN_FIXED = HEADER_LEN + 8 + 8 + 4 + 32 + 2
_ACK_FIXED = HEADER_LEN + 4 + 4 + 2
_COMPLETE_LEN = HEADER_LEN + 32
_ABORT_FIXED = HEADER_LEN + 2 + 2
_RESUME_LEN = HEADER_LEN + 4
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_U128_MAX = (1 << 128) - 1


class Kind(IntEnum):
    OPEN = 1
    DATA = 2
    ACK = 3
    COMPLETE = 4
    CANCEL = 5
    ERROR = 6
    RESUME = 7


class ErrorCode(IntEnum):
    """Stable error codes: the number travels on the wire, the snake_case name in logs."""

    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TRANSFER = 3
    TOO_LARGE = 4
    TOO_MANY_TRANSFERS = 5
    BUFFER_FULL = 6
    HASH_MISMATCH = 7
    DECOMPRESSION_FAILED = 8
    TIMED_OUT = 9
    CANCELLED = 10
    CONFLICTING_OPEN = 11
    PROTOCOL_VIOLATION = 12
    NOT_AUTHORIZED = 13
    CHECKPOINT_REJECTED = 14
    """baton refused a checkpoint; the reason starts with why (``out_of_sequence``, ``no_base``,
    ``wrong_agent``, ``bad_checkpoint``, ``stale_sender``). Send a base next."""
    NOT_FLOOR_HOLDER = 15
    """baton takes bundles only from the agent holding the floor and the source of the handoff
    under way; this sender is neither (released after a handoff, or a standby)."""


def code_name(code: int) -> str:
    """snake_case name of a wire error code (``unknown_code`` for numbers from newer peers)."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown_code"


class DecodeError(ValueError):
    """Bytes that are not a valid frame. ``name`` is stable (see invalid.json)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail

    @property
    def code(self) -> ErrorCode:
        if self.name == "unsupported_version":
            return ErrorCode.UNSUPPORTED_VERSION
        return ErrorCode.BAD_FRAME


class EncodeError(ValueError):
    """A frame built outside the protocol's bounds."""


@dataclass(frozen=True)
class Open:
    id: int
    payload_size: int
    wire_size: int
    chunk_size: int
    sha256: bytes
    deflate: bool = False
    meta: str = ""

    @property
    def chunk_count(self) -> int:
        return -(-self.wire_size // self.chunk_size)


@dataclass(frozen=True)
class Data:
    id: int
    index: int
    data: bytes


@dataclass(frozen=True)
class Ack:
    id: int
    cumulative: int
    window: int
    ranges: tuple[tuple[int, int], ...] = ()
    resume: bool = False
    solicited: bool = False


@dataclass(frozen=True)
class Complete:
    id: int
    sha256: bytes


@dataclass(frozen=True)
class Cancel:
    id: int
    code: int
    reason: str = ""


@dataclass(frozen=True)
class Error:
    id: int
    code: int
    reason: str = ""


@dataclass(frozen=True)
class Resume:
    id: int
    sent: int = 0


Frame = Open | Data | Ack | Complete | Cancel | Error | Resume

_KIND_OF: dict[type, Kind] = {
    Open: Kind.OPEN,
    Data: Kind.DATA,
    Ack: Kind.ACK,
    Complete: Kind.COMPLETE,
    Cancel: Kind.CANCEL,
    Error: Kind.ERROR,
    Resume: Kind.RESUME,
}

TO_RECEIVER = (Open, Data, Cancel, Resume)
TO_SENDER = (Ack, Complete, Error)


def kind_of(frame: Frame) -> Kind:
    return _KIND_OF[type(frame)]


def _check_open(o: Open) -> str | None:
    if not MIN_CHUNK_SIZE <= o.chunk_size <= MAX_CHUNK_SIZE:
        return "chunk_size out of range 256..=14976"
    if not o.deflate and o.wire_size != o.payload_size:
        return "wire_size differs from payload_size without deflate"
    if -(-o.wire_size // o.chunk_size) > _U32_MAX:
        return "too many chunks"
    if len(o.meta.encode()) > MAX_META_LEN:
        return "meta longer than 4096 bytes"
    return None


def _check_ack(a: Ack) -> str | None:
    if a.solicited and not a.resume:
        return "solicited flag without resume flag"
    if len(a.ranges) > MAX_ACK_RANGES:
        return "more than 256 ack ranges"
    floor = a.cumulative
    for s, e in a.ranges:
        if s <= floor or e <= s:
            return "ack ranges not ascending, disjoint, non-adjacent and above cumulative"
        floor = e
    return None


def _check_int(v: int, hi: int, what: str) -> None:
    if not 0 <= v <= hi:
        raise EncodeError(f"{what} out of range")


def encode(frame: Frame) -> bytes:
    """Encode a frame; raises :class:`EncodeError` if it breaks the protocol's bounds."""
    _check_int(frame.id, _U128_MAX, "id")
    flags = 0
    body: bytes
    if isinstance(frame, Open):
        why = _check_open(frame)
        if why:
            raise EncodeError(why)
        if len(frame.sha256) != 32:
            raise EncodeError("sha256 must be 32 bytes")
        _check_int(frame.payload_size, _U64_MAX, "payload_size")
        _check_int(frame.wire_size, _U64_MAX, "wire_size")
        flags = OPEN_FLAG_DEFLATE if frame.deflate else 0
        meta = frame.meta.encode()
        body = (
            struct.pack(">QQI", frame.payload_size, frame.wire_size, frame.chunk_size)
            + frame.sha256
            + struct.pack(">H", len(meta))
            + meta
        )
    elif isinstance(frame, Data):
        if not 1 <= len(frame.data) <= MAX_CHUNK_SIZE:
            raise EncodeError("chunk must be 1..=14976 bytes")
        _check_int(frame.index, _U32_MAX, "index")
        body = struct.pack(">I", frame.index) + bytes(frame.data)
    elif isinstance(frame, Ack):
        why = _check_ack(frame)
        if why:
            raise EncodeError(why)
        _check_int(frame.cumulative, _U32_MAX, "cumulative")
        _check_int(frame.window, _U32_MAX, "window")
        for _, e in frame.ranges:
            _check_int(e, _U32_MAX, "range end")
        flags = (ACK_FLAG_RESUME if frame.resume else 0) | (
            ACK_FLAG_SOLICITED if frame.solicited else 0
        )
        body = struct.pack(">IIH", frame.cumulative, frame.window, len(frame.ranges)) + b"".join(
            struct.pack(">II", s, e) for s, e in frame.ranges
        )
    elif isinstance(frame, Complete):
        if len(frame.sha256) != 32:
            raise EncodeError("sha256 must be 32 bytes")
        body = frame.sha256
    elif isinstance(frame, Cancel | Error):
        reason = frame.reason.encode()
        if len(reason) > MAX_REASON_LEN:
            raise EncodeError("reason longer than 1024 bytes")
        _check_int(frame.code, 0xFFFF, "code")
        body = struct.pack(">HH", frame.code, len(reason)) + reason
    elif isinstance(frame, Resume):
        _check_int(frame.sent, _U32_MAX, "sent")
        body = struct.pack(">I", frame.sent)
    else:  # pragma: no cover - exhaustive over Frame
        raise EncodeError(f"not a frame: {frame!r}")
    return bytes([MAGIC, VERSION, kind_of(frame), flags]) + frame.id.to_bytes(16, "big") + body


def _text(buf: bytes, pos: int, length: int, limit: int, what: str) -> tuple[str, int]:
    """The UTF-8 field ``what`` of ``length`` bytes (at most ``limit``) at ``pos``, and the
    position after it; DecodeError if it is too long, cut short or not UTF-8."""
    if length > limit:
        raise DecodeError("invalid", f"{what}_len longer than {limit}")
    if len(buf) < pos + length:
        raise DecodeError("truncated", what)
    try:
        return bytes(buf[pos : pos + length]).decode("utf-8"), pos + length
    except UnicodeDecodeError:
        raise DecodeError("invalid", f"{what} not UTF-8") from None


def decode(buf: bytes) -> Frame:
    """Decode one frame or raise :class:`DecodeError` (never anything else)."""
    n = len(buf)
    if n > MAX_FRAME_SIZE:
        raise DecodeError("too_large", f"{n} bytes (max {MAX_FRAME_SIZE})")
    # Magic and version first, so a future version with another header reads as a version
    # problem rather than truncation.
    if n < 1:
        raise DecodeError("truncated", "empty")
    if buf[0] != MAGIC:
        raise DecodeError("bad_magic", f"0x{buf[0]:02x}")
    if n < 2:
        raise DecodeError("truncated", "1 byte")
    if buf[1] != VERSION:
        raise DecodeError(
            "unsupported_version",
            f"version {buf[1]} (this build speaks {VERSION}); upgrade the older side",
        )
    if n < 4:
        raise DecodeError("truncated", f"{n} bytes")
    kind_b, flags = buf[2], buf[3]
    try:
        kind = Kind(kind_b)
    except ValueError:
        raise DecodeError("unknown_kind", str(kind_b)) from None
    if n < HEADER_LEN:
        raise DecodeError("truncated", f"{n} bytes, header needs {HEADER_LEN}")
    fid = int.from_bytes(buf[4:20], "big")
    allowed = {Kind.OPEN: OPEN_FLAG_DEFLATE, Kind.ACK: ACK_FLAG_RESUME | ACK_FLAG_SOLICITED}.get(
        kind, 0
    )
    if flags & ~allowed or (kind == Kind.ACK and flags & 0x03 == ACK_FLAG_SOLICITED):
        raise DecodeError("bad_flags", f"0x{flags:02x} on {kind.name}")
    need = {
        Kind.OPEN: _OPEN_FIXED,
        Kind.DATA: DATA_HEADER_LEN + 1,
        Kind.ACK: _ACK_FIXED,
        Kind.COMPLETE: _COMPLETE_LEN,
        Kind.CANCEL: _ABORT_FIXED,
        Kind.ERROR: _ABORT_FIXED,
        Kind.RESUME: _RESUME_LEN,
    }[kind]
    if n < need:
        raise DecodeError("truncated", f"{n} bytes, need {need}")
    pos = HEADER_LEN
    frame: Frame
    if kind == Kind.OPEN:
        payload_size, wire_size, chunk_size = struct.unpack_from(">QQI", buf, pos)
        sha = bytes(buf[pos + 20 : pos + 52])
        (meta_len,) = struct.unpack_from(">H", buf, pos + 52)
        meta, pos = _text(buf, pos + 54, meta_len, MAX_META_LEN, "meta")
        frame = Open(fid, payload_size, wire_size, chunk_size, sha, bool(flags & 1), meta)
        why = _check_open(frame)
        if why:
            raise DecodeError("invalid", why)
    elif kind == Kind.DATA:
        (index,) = struct.unpack_from(">I", buf, pos)
        frame = Data(fid, index, bytes(buf[pos + 4 :]))
        pos = n
    elif kind == Kind.ACK:
        cumulative, window, count = struct.unpack_from(">IIH", buf, pos)
        pos += 10
        if count > MAX_ACK_RANGES:
            raise DecodeError("invalid", "more than 256 ranges")
        if n < pos + 8 * count:
            raise DecodeError("truncated", "ack ranges")
        ranges = tuple(struct.unpack_from(">II", buf, pos + 8 * i) for i in range(count))
        pos += 8 * count
        frame = Ack(fid, cumulative, window, ranges, bool(flags & 1), bool(flags & 2))
        why = _check_ack(frame)
        if why:
            raise DecodeError("invalid", why)
    elif kind == Kind.COMPLETE:
        frame = Complete(fid, bytes(buf[pos : pos + 32]))
        pos += 32
    elif kind in (Kind.CANCEL, Kind.ERROR):
        code, rlen = struct.unpack_from(">HH", buf, pos)
        reason, pos = _text(buf, pos + 4, rlen, MAX_REASON_LEN, "reason")
        frame = Cancel(fid, code, reason) if kind == Kind.CANCEL else Error(fid, code, reason)
    else:
        (sent,) = struct.unpack_from(">I", buf, pos)
        pos += 4
        frame = Resume(fid, sent)
    if pos != n:
        raise DecodeError("trailing", f"{n - pos} bytes after frame")
    return frame
