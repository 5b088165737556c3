"""Chunked, acknowledged, resumable transfer of context bundles (docs/protocol.md (section 4)).

Two layers:

* A sans-IO engine (:class:`Sender`, :class:`Receiver`, :class:`Receivers`, :class:`Endpoint`)
  mirroring the Rust crate ``baton-transfer``: no sockets, no clock, no tasks. Time is a float
  number of seconds from any monotonic origin, passed into every call; outputs are values.
* Thin asyncio glue for ``livekit.rtc.Room``: :func:`send_bundle`, :func:`receive_bundle` and
  :class:`RoomTransport`, which feeds the engine the room's ``data_received`` packets, timers and
  reconnects, and publishes its frames reliably to exactly one participant.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import frames as fr
from .frames import ErrorCode

__all__ = [
    "TOPIC",
    "BundleReceived",
    "Endpoint",
    "EndpointConfig",
    "Event",
    "Output",
    "ReceiveFailed",
    "Received",
    "Receiver",
    "ReceiverConfig",
    "Receivers",
    "ReceiversConfig",
    "Rejected",
    "RoomTransport",
    "SendFailed",
    "Sender",
    "SenderConfig",
    "Sent",
    "TransferError",
    "Transmit",
    "new_transfer_id",
    "receive_bundle",
    "send_bundle",
    "transport_for",
]

log = logging.getLogger("lk_baton.transfer")

TOPIC = "baton.xfer"


class TransferError(Exception):
    """Why a transfer failed. ``code`` is a wire number, ``name`` its stable snake_case string."""

    def __init__(self, code: int, reason: str, remote: bool = False) -> None:
        super().__init__(code, reason)
        self.code = int(code)
        self.reason = reason
        self.remote = remote

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransferError) and (self.code, self.reason, self.remote) == (
            other.code,
            other.reason,
            other.remote,
        )

    __hash__ = Exception.__hash__

    @property
    def name(self) -> str:
        return fr.code_name(self.code)

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def _truncate(reason: str) -> str:
    b = reason.encode()[: fr.MAX_REASON_LEN]
    return b.decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------
# Sender


@dataclass
class SenderConfig:
    """Defaults match the Rust crate (see docs/protocol.md (section 4), "Timers and defaults")."""

    chunk_size: int = fr.MAX_CHUNK_SIZE
    window: int = 32
    initial_rto: float = 1.0
    max_rto: float = 8.0
    deadline: float = 60.0
    compress: bool = False


_UNSENT, _IN_FLIGHT, _LOST, _ACKED = 0, 1, 2, 3


class Sender:
    """One outgoing transfer. After every call, drain :meth:`poll_frame` and :meth:`poll_event`;
    call :meth:`handle_timeout` at :meth:`poll_timeout`."""

    def __init__(self, id: int, payload: bytes, meta: str, cfg: SenderConfig, now: float) -> None:
        if not fr.MIN_CHUNK_SIZE <= cfg.chunk_size <= fr.MAX_CHUNK_SIZE:
            raise TransferError(ErrorCode.PROTOCOL_VIOLATION, "chunk_size outside 256..=14976")
        if len(meta.encode()) > fr.MAX_META_LEN:
            raise TransferError(
                ErrorCode.TOO_LARGE, "meta longer than 4096 bytes; put large data in the payload"
            )
        sha = hashlib.sha256(payload).digest()
        wire, deflate = bytes(payload), False
        if cfg.compress:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            z = c.compress(payload) + c.flush()
            if len(z) < len(payload):
                wire, deflate = z, True
        self.id = id
        self.cfg = cfg
        self.open = fr.Open(id, len(payload), len(wire), cfg.chunk_size, sha, deflate, meta)
        self._wire = wire
        n = self.open.chunk_count
        self._chunks = [_UNSENT] * n
        self._last_tx = [0] * n
        self._tx_count = 0
        self._resume_mark: int | None = None
        self._cum_acked = 0
        self._next_new = 0
        self._lost: set[int] = set()
        self._in_flight = 0
        self._receiver_window = max(cfg.window, 1)
        self._open_acked = False
        self._ctrl: deque[fr.Frame] = deque([self.open])
        self._rto = cfg.initial_rto
        self._rto_at: float | None = now + cfg.initial_rto
        self._deadline = now + cfg.deadline
        self._now = now
        self.finished = False
        self._events: deque[TransferError | None] = deque()

    def acked_chunks(self) -> int:
        return sum(1 for c in self._chunks if c == _ACKED)

    def handle_frame(self, frame: fr.Frame, now: float) -> None:
        self._now = now
        if self.finished:
            return
        if isinstance(frame, fr.Ack):
            self._on_ack(frame, now)
        elif isinstance(frame, fr.Complete):
            if frame.sha256 == self.open.sha256:
                self._finish(None)
            else:
                self._fail_and_cancel(
                    ErrorCode.HASH_MISMATCH,
                    "receiver confirmed a different SHA-256 than the one sent",
                )
        elif isinstance(frame, fr.Error):
            if frame.code == ErrorCode.UNKNOWN_TRANSFER:
                self._restart(now)
            else:
                self._finish(TransferError(frame.code, frame.reason, remote=True))

    def resume(self, now: float) -> None:
        self._now = now
        if self.finished:
            return
        self._ctrl.clear()
        if not self._open_acked:
            self._ctrl.append(self.open)
        self._ctrl.append(fr.Resume(self.id, self._next_new))
        self._resume_mark = self._tx_count
        self._rto = self.cfg.initial_rto
        self._rto_at = now + self._rto

    def cancel(self, reason: str, now: float) -> None:
        self._now = now
        if not self.finished:
            self._fail_and_cancel(ErrorCode.CANCELLED, _truncate(reason))

    def poll_timeout(self) -> float | None:
        if self.finished:
            return None
        return self._deadline if self._rto_at is None else min(self._rto_at, self._deadline)

    def handle_timeout(self, now: float) -> None:
        self._now = now
        if self.finished:
            return
        if now >= self._deadline:
            self._fail_and_cancel(
                ErrorCode.TIMED_OUT,
                f"not confirmed within {self.cfg.deadline}s ({self.acked_chunks()} of "
                f"{len(self._chunks)} chunks acknowledged); check that the receiver is in the room",
            )
            return
        if self._rto_at is not None and now >= self._rto_at:
            # Silence on a reliable, ordered link: the receiver is behind, or a reconnect went
            # unreported. Ask what it holds and resend only what the report says is missing
            # (docs/protocol.md 4.3, rule 6) rather than a whole window.
            if not self._open_acked:
                self._ctrl.append(self.open)
            self._ctrl.append(fr.Resume(self.id, self._next_new))
            self._resume_mark = self._tx_count
            self._rto = min(self._rto * 2, self.cfg.max_rto)
            self._rto_at = now + self._rto

    def poll_frame(self) -> fr.Frame | None:
        if self._ctrl:
            return self._ctrl.popleft()
        if self.finished:
            return None
        window = max(min(self.cfg.window, self._receiver_window), 1)
        if self._in_flight >= window:
            return None
        if self._lost:
            index = min(self._lost)
            self._lost.discard(index)
        elif self._next_new < len(self._chunks) and self._next_new < self._cum_acked + window:
            index = self._next_new
            self._next_new += 1
        else:
            return None
        self._chunks[index] = _IN_FLIGHT
        self._tx_count += 1
        self._last_tx[index] = self._tx_count
        self._in_flight += 1
        if self._rto_at is None:
            self._rto_at = self._now + self._rto
        cs = self.cfg.chunk_size
        return fr.Data(self.id, index, self._wire[index * cs : (index + 1) * cs])

    def poll_event(self) -> TransferError | bool | None:
        """``False`` when nothing is pending, ``None`` for success, a TransferError on failure."""
        return self._events.popleft() if self._events else False

    def _on_ack(self, ack: fr.Ack, now: float) -> None:
        count = len(self._chunks)
        if ack.cumulative > count or (ack.ranges and ack.ranges[-1][1] > count):
            self._fail_and_cancel(
                ErrorCode.PROTOCOL_VIOLATION, f"ACK names chunks beyond the last ({count})"
            )
            return
        progress = not self._open_acked
        self._open_acked = True
        for s, e in ((0, ack.cumulative), *ack.ranges):
            for i in range(s, e):
                c = self._chunks[i]
                if c == _ACKED:
                    continue
                if c == _IN_FLIGHT:
                    self._in_flight -= 1
                elif c == _LOST:
                    self._lost.discard(i)
                self._chunks[i] = _ACKED
                progress = True
        while self._cum_acked < count and self._chunks[self._cum_acked] == _ACKED:
            self._cum_acked += 1
        while self._next_new < count and self._chunks[self._next_new] == _ACKED:
            self._next_new += 1
        self._receiver_window = max(ack.window, 1)
        if ack.resume:
            cutoff: int | None
            if ack.solicited and self._resume_mark is not None:
                cutoff, self._resume_mark = self._resume_mark, None
            elif ack.solicited or self._resume_mark is not None:
                cutoff = None
            else:
                cutoff = self._tx_count
            if cutoff is not None:
                for i in range(self._cum_acked, self._next_new):
                    if self._chunks[i] == _IN_FLIGHT and self._last_tx[i] <= cutoff:
                        self._chunks[i] = _LOST
                        self._lost.add(i)
                        self._in_flight -= 1
                progress = True
        if progress:
            self._rto = self.cfg.initial_rto
            self._rto_at = now + self._rto

    def _restart(self, now: float) -> None:
        self._open_acked = False
        self._cum_acked = self._next_new = self._in_flight = 0
        self._resume_mark = None
        self._lost.clear()
        self._chunks = [_UNSENT] * len(self._chunks)
        self._ctrl = deque([self.open])
        self._rto = self.cfg.initial_rto
        self._rto_at = now + self._rto

    def _fail_and_cancel(self, code: int, reason: str) -> None:
        self._ctrl = deque([fr.Cancel(self.id, code, _truncate(reason))])
        self._finish(TransferError(code, reason))

    def _finish(self, outcome: TransferError | None) -> None:
        self.finished = True
        self._rto_at = None
        self._events.append(outcome)


# ---------------------------------------------------------------------------------------------
# Receiver


@dataclass
class ReceiverConfig:
    max_bundle_size: int = 32 * 1024 * 1024
    window: int = 32
    ack_every: int = 8
    ack_delay: float = 0.010
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class Received:
    payload: bytes
    meta: str


class Receiver:
    """One incoming transfer; most callers use :class:`Receivers`."""

    def __init__(self, open: fr.Open, cfg: ReceiverConfig, now: float) -> None:
        if max(open.payload_size, open.wire_size) > cfg.max_bundle_size:
            raise TransferError(
                ErrorCode.TOO_LARGE,
                f"bundle of {max(open.payload_size, open.wire_size)} bytes exceeds the receiver's "
                f"limit of {cfg.max_bundle_size} bytes; trim the chat history or raise "
                "max_bundle_size",
            )
        self.id = open.id
        self.open = open
        self.cfg = cfg
        self._buf = bytearray(open.wire_size)
        self._have = [False] * open.chunk_count
        self._held = 0
        self._cumulative = 0
        self._unacked = 0
        self._ack_at: float | None = now + cfg.ack_delay
        self._ack_now = False
        self._resume_report = False
        self._solicited = False
        self._last_heard = now
        self.finished = False
        self._out: deque[fr.Frame] = deque()
        self._events: deque[Received | TransferError] = deque()
        if not self._have:
            self._finalize()

    def handle_frame(self, frame: fr.Frame, now: float) -> None:
        if self.finished:
            return
        self._last_heard = now
        if isinstance(frame, fr.Open):
            if frame == self.open:
                self._schedule_ack(now)
            else:
                self._fail(
                    ErrorCode.CONFLICTING_OPEN,
                    "a second OPEN with this id announced different parameters; "
                    "use a fresh id per transfer",
                )
        elif isinstance(frame, fr.Data):
            self._on_data(frame, now)
        elif isinstance(frame, fr.Resume):
            self._ack_now = self._resume_report = self._solicited = True
        elif isinstance(frame, fr.Cancel):
            self.finished = True
            self._events.append(TransferError(frame.code, frame.reason, remote=True))

    def resume(self, now: float) -> None:
        if not self.finished:
            self._last_heard = now
            self._ack_now = self._resume_report = True

    def poll_timeout(self) -> float | None:
        if self.finished:
            return None
        idle = self._last_heard + self.cfg.idle_timeout
        return idle if self._ack_at is None else min(self._ack_at, idle)

    def handle_timeout(self, now: float) -> None:
        if self.finished:
            return
        if now >= self._last_heard + self.cfg.idle_timeout:
            self._fail(
                ErrorCode.TIMED_OUT,
                f"no frame from the sender for {self.cfg.idle_timeout}s "
                f"({self._held} of {len(self._have)} chunks held)",
            )
            return
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_now = True

    def poll_frame(self) -> fr.Frame | None:
        if self._out:
            return self._out.popleft()
        if self.finished or not self._ack_now:
            return None
        self._ack_now = False
        self._ack_at = None
        self._unacked = 0
        resume, self._resume_report = self._resume_report, False
        solicited = resume and self._solicited
        if resume:
            self._solicited = False
        return self.ack_state(resume, solicited)

    def poll_event(self) -> Received | TransferError | None:
        return self._events.popleft() if self._events else None

    def ack_state(self, resume: bool = False, solicited: bool = False) -> fr.Ack:
        ranges: list[tuple[int, int]] = []
        i, n = self._cumulative, len(self._have)
        while i < n and len(ranges) < fr.MAX_ACK_RANGES:
            if self._have[i]:
                s = i
                while i < n and self._have[i]:
                    i += 1
                ranges.append((s, i))
            else:
                i += 1
        return fr.Ack(self.id, self._cumulative, self.cfg.window, tuple(ranges), resume, solicited)

    def _schedule_ack(self, now: float) -> None:
        t = now + self.cfg.ack_delay
        self._ack_at = t if self._ack_at is None else min(self._ack_at, t)

    def _on_data(self, d: fr.Data, now: float) -> None:
        count = len(self._have)
        if d.index >= count:
            self._fail(ErrorCode.PROTOCOL_VIOLATION, f"chunk {d.index} beyond the last ({count})")
            return
        cs = self.open.chunk_size
        start = d.index * cs
        end = min(start + cs, len(self._buf))
        if len(d.data) != end - start:
            self._fail(
                ErrorCode.PROTOCOL_VIOLATION,
                f"chunk {d.index} has {len(d.data)} bytes, expected {end - start}",
            )
            return
        if self._have[d.index]:
            self._schedule_ack(now)
            return
        self._buf[start:end] = d.data
        self._have[d.index] = True
        self._held += 1
        while self._cumulative < count and self._have[self._cumulative]:
            self._cumulative += 1
        if self._held == count:
            self._finalize()
            return
        self._unacked += 1
        if self._unacked >= max(self.cfg.ack_every, 1):
            self._ack_now = True
        else:
            self._schedule_ack(now)

    def _finalize(self) -> None:
        if self.open.deflate:
            try:
                payload = _inflate_bounded(bytes(self._buf), self.open.payload_size)
            except TransferError as e:
                self._fail(e.code, e.reason)
                return
        else:
            payload = bytes(self._buf)
        sha = hashlib.sha256(payload).digest()
        if sha != self.open.sha256:
            self._fail(
                ErrorCode.HASH_MISMATCH,
                "reassembled payload does not match the announced SHA-256; "
                "the sender should retry with a new id",
            )
            return
        self._buf = bytearray()
        self.finished = True
        self._out.append(fr.Complete(self.id, sha))
        self._events.append(Received(payload, self.open.meta))

    def _fail(self, code: int, reason: str) -> None:
        self.finished = True
        self._buf = bytearray()
        self._out.append(fr.Error(self.id, code, _truncate(reason)))
        self._events.append(TransferError(code, reason))


def _inflate_bounded(data: bytes, expected: int) -> bytes:
    """Raw inflate that stops at ``expected + 1`` bytes: zip-bomb safe while inflating."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data, expected + 1)
    except zlib.error:
        raise TransferError(ErrorCode.DECOMPRESSION_FAILED, "corrupt deflate stream") from None
    if len(out) > expected:
        raise TransferError(ErrorCode.TOO_LARGE, "deflate stream inflates beyond announced size")
    if len(out) != expected or not d.eof:
        raise TransferError(
            ErrorCode.DECOMPRESSION_FAILED, "deflate stream does not inflate to the announced size"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Many transfers: Receivers (limits) and Endpoint (routing)


@dataclass
class ReceiversConfig:
    transfer: ReceiverConfig = field(default_factory=ReceiverConfig)
    max_transfers_per_sender: int = 4
    max_buffered_bytes: int = 64 * 1024 * 1024
    finished_linger: float = 120.0
    max_finished: int = 1024


@dataclass(frozen=True)
class Transmit:
    """Publish ``payload`` reliably on topic ``baton.xfer`` to ``to`` only."""

    to: str
    payload: bytes


@dataclass(frozen=True)
class BundleReceived:
    sender: str
    id: int
    payload: bytes
    meta: str


@dataclass(frozen=True)
class ReceiveFailed:
    sender: str
    id: int
    error: TransferError


@dataclass(frozen=True)
class Sent:
    to: str
    id: int


@dataclass(frozen=True)
class SendFailed:
    to: str
    id: int
    error: TransferError


@dataclass(frozen=True)
class Rejected:
    """A packet dropped without affecting any transfer (for logs and metrics)."""

    sender: str
    id: int | None
    error: TransferError


Event = BundleReceived | ReceiveFailed | Sent | SendFailed | Rejected
Output = Transmit | Event


class Receivers:
    """All incoming transfers of a room keyed by (sender, id), with per-sender and total limits."""

    def __init__(self, cfg: ReceiversConfig | None = None) -> None:
        self.cfg = cfg or ReceiversConfig()
        self._active: dict[tuple[str, int], tuple[Receiver, int]] = {}
        self.buffered = 0
        # (sender, id) -> (finished_at, sha256 or error code)
        self._finished: dict[tuple[str, int], tuple[float, bytes | int]] = {}
        self._out: deque[Output] = deque()

    @property
    def active(self) -> int:
        return len(self._active)

    def handle_frame(self, sender: str, frame: fr.Frame, now: float) -> None:
        self._expire(now)
        key = (sender, frame.id)
        if key in self._active:
            self._active[key][0].handle_frame(frame, now)
            self._drain(key, now)
            return
        if key in self._finished:
            if not isinstance(frame, fr.Cancel):
                verdict = self._finished[key][1]
                reply: fr.Frame = (
                    fr.Complete(frame.id, verdict)
                    if isinstance(verdict, bytes)
                    else fr.Error(frame.id, verdict, "transfer already failed")
                )
                self._transmit(sender, reply)
            return
        if isinstance(frame, fr.Open):
            per_sender = sum(1 for p, _ in self._active if p == sender)
            reserve = frame.wire_size + (frame.payload_size if frame.deflate else 0)
            try:
                if per_sender >= self.cfg.max_transfers_per_sender:
                    raise TransferError(
                        ErrorCode.TOO_MANY_TRANSFERS,
                        f"{per_sender} transfers from this sender already in flight (limit "
                        f"{self.cfg.max_transfers_per_sender}); wait for one to finish",
                    )
                if (
                    frame.payload_size <= self.cfg.transfer.max_bundle_size
                    and self.buffered + reserve > self.cfg.max_buffered_bytes
                ):
                    raise TransferError(
                        ErrorCode.BUFFER_FULL,
                        f"receiver buffers {self.buffered} of {self.cfg.max_buffered_bytes} "
                        "bytes; retry after current transfers finish",
                    )
                r = Receiver(frame, self.cfg.transfer, now)
            except TransferError as e:
                self._transmit(sender, fr.Error(frame.id, e.code, _truncate(e.reason)))
                self._out.append(Rejected(sender, frame.id, e))
                return
            self.buffered += reserve
            self._active[key] = (r, reserve)
            self._drain(key, now)
        elif isinstance(frame, fr.Resume):
            self._transmit(
                sender,
                fr.Error(
                    frame.id, ErrorCode.UNKNOWN_TRANSFER, "receiver has no state for this transfer"
                ),
            )
            self._unknown(sender, frame.id)
        else:
            self._unknown(sender, frame.id)

    def reconnected(self, identity: str | None, now: float) -> None:
        for key in [k for k in self._active if identity is None or k[0] == identity]:
            self._active[key][0].resume(now)
            self._drain(key, now)

    def poll_timeout(self) -> float | None:
        ts = [t for r, _ in self._active.values() if (t := r.poll_timeout()) is not None]
        return min(ts) if ts else None

    def handle_timeout(self, now: float) -> None:
        self._expire(now)
        for key in list(self._active):
            r = self._active[key][0]
            t = r.poll_timeout()
            if t is not None and t <= now:
                r.handle_timeout(now)
                self._drain(key, now)

    def poll_output(self) -> Output | None:
        return self._out.popleft() if self._out else None

    def _unknown(self, sender: str, id: int) -> None:
        self._out.append(
            Rejected(
                sender,
                id,
                TransferError(
                    ErrorCode.UNKNOWN_TRANSFER, "frame for a transfer this receiver does not know"
                ),
            )
        )

    def _drain(self, key: tuple[str, int], now: float) -> None:
        r, reserve = self._active[key]
        while (f := r.poll_frame()) is not None:
            self._transmit(key[0], f)
        outcome: bytes | int | None = None
        while (ev := r.poll_event()) is not None:
            if isinstance(ev, Received):
                outcome = r.open.sha256
                self._out.append(BundleReceived(key[0], key[1], ev.payload, ev.meta))
            else:
                outcome = ev.code
                self._out.append(ReceiveFailed(key[0], key[1], ev))
        if outcome is not None:
            del self._active[key]
            self.buffered -= reserve
            self._finished[key] = (now, outcome)
            while len(self._finished) > self.cfg.max_finished:
                del self._finished[next(iter(self._finished))]

    def _expire(self, now: float) -> None:
        # dicts keep insertion order, which is finishing order.
        while self._finished:
            k = next(iter(self._finished))
            if now - self._finished[k][0] <= self.cfg.finished_linger:
                break
            del self._finished[k]

    def _transmit(self, to: str, frame: fr.Frame) -> None:
        self._out.append(Transmit(to, fr.encode(frame)))


@dataclass
class EndpointConfig:
    sender: SenderConfig = field(default_factory=SenderConfig)
    receivers: ReceiversConfig = field(default_factory=ReceiversConfig)


class Endpoint:
    """Both directions for one room; what the IO glue drives.

    Feed :meth:`handle_packet` (with the server-stamped sender identity), :meth:`handle_timeout`
    at :meth:`poll_timeout`, :meth:`participant_reconnected` / :meth:`reconnected`; after each call
    drain :meth:`poll_output` and act on every :class:`Transmit` and event.
    """

    def __init__(self, cfg: EndpointConfig | None = None) -> None:
        self.cfg = cfg or EndpointConfig()
        self._senders: dict[tuple[str, int], Sender] = {}
        self.receivers = Receivers(self.cfg.receivers)
        self._out: deque[Output] = deque()

    def send(
        self,
        to: str,
        id: int,
        payload: bytes,
        meta: str,
        now: float,
        cfg: SenderConfig | None = None,
    ) -> None:
        key = (to, id)
        if key in self._senders:
            raise TransferError(
                ErrorCode.CONFLICTING_OPEN,
                "a transfer with this id to this receiver is in progress",
            )
        self._senders[key] = Sender(id, payload, meta, cfg or self.cfg.sender, now)
        self._drain_sender(key)

    def cancel(self, to: str, id: int, reason: str, now: float) -> bool:
        s = self._senders.get((to, id))
        if s is None:
            return False
        s.cancel(reason, now)
        self._drain_sender((to, id))
        return True

    def handle_packet(self, sender: str, data: bytes, now: float) -> None:
        try:
            frame = fr.decode(data)
        except fr.DecodeError as e:
            self._out.append(Rejected(sender, None, TransferError(e.code, str(e))))
            return
        if isinstance(frame, fr.TO_RECEIVER):
            self.receivers.handle_frame(sender, frame, now)
            self._pull_receivers()
            return
        key = (sender, frame.id)
        s = self._senders.get(key)
        if s is not None:
            s.handle_frame(frame, now)
            self._drain_sender(key)
            return
        if isinstance(frame, fr.Ack):
            self._out.append(
                Transmit(
                    sender,
                    fr.encode(
                        fr.Cancel(
                            frame.id, ErrorCode.UNKNOWN_TRANSFER, "sender has no such transfer"
                        )
                    ),
                )
            )
        self._out.append(
            Rejected(
                sender,
                frame.id,
                TransferError(
                    ErrorCode.UNKNOWN_TRANSFER, "frame for a transfer this sender does not know"
                ),
            )
        )

    def refuse_packet(self, sender: str, data: bytes, reason: str) -> None:
        """A packet from a participant this endpoint takes no transfers from (the glue decides
        who). Nothing reaches a receiver and nothing is buffered. An OPEN or a RESUME is
        answered ERROR ``not_authorized``, so that sender fails at once instead of at its
        deadline; any other frame is dropped unanswered (no reflection), as baton does for its
        own senders (docs/protocol.md section 4.10). Reported as :class:`Rejected`."""
        error = TransferError(ErrorCode.NOT_AUTHORIZED, reason)
        try:
            frame = fr.decode(data)
        except fr.DecodeError:
            self._out.append(Rejected(sender, None, error))
            return
        if isinstance(frame, fr.Open | fr.Resume):
            answer = fr.Error(frame.id, ErrorCode.NOT_AUTHORIZED, _truncate(reason))
            self._out.append(Transmit(sender, fr.encode(answer)))
        self._out.append(Rejected(sender, frame.id, error))

    def participant_reconnected(self, identity: str, now: float) -> None:
        self._resume(identity, now)

    def reconnected(self, now: float) -> None:
        self._resume(None, now)

    def poll_timeout(self) -> float | None:
        ts = [t for s in self._senders.values() if (t := s.poll_timeout()) is not None]
        r = self.receivers.poll_timeout()
        if r is not None:
            ts.append(r)
        return min(ts) if ts else None

    def handle_timeout(self, now: float) -> None:
        for key in list(self._senders):
            s = self._senders.get(key)
            if s is None:
                continue
            t = s.poll_timeout()
            if t is not None and t <= now:
                s.handle_timeout(now)
                self._drain_sender(key)
        self.receivers.handle_timeout(now)
        self._pull_receivers()

    def poll_output(self) -> Output | None:
        return self._out.popleft() if self._out else None

    @property
    def sending(self) -> int:
        return len(self._senders)

    def _resume(self, identity: str | None, now: float) -> None:
        for key in [k for k in self._senders if identity is None or k[0] == identity]:
            self._senders[key].resume(now)
            self._drain_sender(key)
        self.receivers.reconnected(identity, now)
        self._pull_receivers()

    def _pull_receivers(self) -> None:
        while (o := self.receivers.poll_output()) is not None:
            self._out.append(o)

    def _drain_sender(self, key: tuple[str, int]) -> None:
        s = self._senders[key]
        while (f := s.poll_frame()) is not None:
            self._out.append(Transmit(key[0], fr.encode(f)))
        done = False
        while (ev := s.poll_event()) is not False:
            done = True
            if ev is None:
                self._out.append(Sent(key[0], key[1]))
            else:
                assert isinstance(ev, TransferError)
                self._out.append(SendFailed(key[0], key[1], ev))
        if done:
            del self._senders[key]


def new_transfer_id() -> int:
    """128 random bits: unique per receiver without coordination."""
    return int.from_bytes(os.urandom(16), "big")


# ---------------------------------------------------------------------------------------------
# asyncio glue for livekit.rtc.Room


class RoomTransport:
    """Runs an :class:`Endpoint` on a ``livekit.rtc.Room``: one per room and process.

    Listens to ``data_received`` (topic ``baton.xfer``), ``reconnected`` (our connection
    resumed: every transfer resumes), ``participant_connected`` (a participant came back:
    transfers with it resume) and ``disconnected`` (the room is over: :meth:`close`);
    publishes every frame with ``reliable=True`` to exactly one identity.

    ``accept_from(participant) -> bool``, when set, decides whose frames reach the engine; the
    rest go to :meth:`Endpoint.refuse_packet` (nothing buffered; OPEN and RESUME answered
    ``not_authorized``). ``BatonLink`` sets it to "baton's participant only". Bundles
    received but not yet taken by :meth:`receive` are kept up to ``max_unclaimed_bytes`` in
    all (the oldest is dropped first, and logged); the newest is always kept.
    ``intercept(received) -> bool``, when set, sees each verified bundle first and keeps it
    from :meth:`receive` by returning True (a receiver that routes by meta, as baton routes
    checkpoints).
    """

    def __init__(
        self,
        room: Any,
        cfg: EndpointConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        accept_from: Callable[[Any], bool] | None = None,
        max_unclaimed_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.room = room
        self.endpoint = Endpoint(cfg)
        self.accept_from = accept_from
        self.intercept: Callable[[BundleReceived], bool] | None = None
        self.max_unclaimed_bytes = max_unclaimed_bytes
        self._clock = clock
        self._send_waiters: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._inbox: deque[BundleReceived] = deque()
        self._inbox_bytes = 0
        self._inbox_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Task[None] | None = None
        self.rejected: deque[Rejected] = deque(maxlen=100)
        self.receive_failures: deque[ReceiveFailed] = deque(maxlen=100)
        room.on("data_received", self._on_data)
        room.on("reconnected", self._on_reconnected)
        room.on("participant_connected", self._on_participant_connected)
        room.on("disconnected", self._on_disconnected)

    def close(self) -> None:
        """Stop listening, fail pending sends with ``cancelled``, drop unclaimed bundles, and
        forget this transport in :func:`transport_for`'s registry."""
        for ev, cb in (
            ("data_received", self._on_data),
            ("reconnected", self._on_reconnected),
            ("participant_connected", self._on_participant_connected),
            ("disconnected", self._on_disconnected),
        ):
            with contextlib.suppress(Exception):
                self.room.off(ev, cb)
        if self._timer is not None:
            self._timer.cancel()
        for fut in self._send_waiters.values():
            if not fut.done():
                fut.set_exception(TransferError(ErrorCode.CANCELLED, "transport closed"))
        self._inbox.clear()
        self._inbox_bytes = 0
        if _TRANSPORTS.get(id(self.room)) is self:
            del _TRANSPORTS[id(self.room)]

    # -- room callbacks (synchronous, on the event loop) --

    def _on_data(self, packet: Any) -> None:
        if getattr(packet, "topic", None) != TOPIC or packet.participant is None:
            return
        sender = packet.participant.identity
        if self.accept_from is not None and not self.accept_from(packet.participant):
            self.endpoint.refuse_packet(
                sender, bytes(packet.data), "this agent takes transfers from baton only"
            )
        else:
            self.endpoint.handle_packet(sender, bytes(packet.data), self._clock())
        self._pump()

    def _on_disconnected(self, *_: Any) -> None:
        self.close()

    def _on_reconnected(self, *_: Any) -> None:
        self.endpoint.reconnected(self._clock())
        self._pump()

    def _on_participant_connected(self, participant: Any) -> None:
        self.endpoint.participant_reconnected(participant.identity, self._clock())
        self._pump()

    # -- engine driving --

    def _pump(self) -> None:
        while (o := self.endpoint.poll_output()) is not None:
            if isinstance(o, Transmit):
                self._publish(o)
            elif isinstance(o, BundleReceived):
                self._keep(o)
            elif isinstance(o, Sent | SendFailed):
                fut = self._send_waiters.pop((o.to, o.id), None)
                if fut is not None and not fut.done():
                    if isinstance(o, Sent):
                        fut.set_result(None)
                    else:
                        fut.set_exception(o.error)
            elif isinstance(o, ReceiveFailed):
                self.receive_failures.append(o)
            else:
                self.rejected.append(o)
        self._arm_timer()

    def _keep(self, d: BundleReceived) -> None:
        if self.intercept is not None and self.intercept(d):
            return
        self._inbox.append(d)
        self._inbox_bytes += len(d.payload)
        while self._inbox_bytes > self.max_unclaimed_bytes and len(self._inbox) > 1:
            old = self._inbox.popleft()
            self._inbox_bytes -= len(old.payload)
            log.warning(
                "dropped an unclaimed bundle of %d bytes from %r: unclaimed bundles over %d bytes",
                len(old.payload),
                old.sender,
                self.max_unclaimed_bytes,
            )
        self._inbox_event.set()

    def _publish(self, t: Transmit) -> None:
        coro = self.room.local_participant.publish_data(
            t.payload, reliable=True, destination_identities=[t.to], topic=TOPIC
        )
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A failed publish is a lost packet: the engine's timers recover it. Retrieve the
        # exception so asyncio does not log it as unhandled.
        if not task.cancelled():
            task.exception()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.endpoint.poll_timeout()
        if at is None:
            return
        self._timer = asyncio.ensure_future(self._fire_at(at))

    async def _fire_at(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self._clock()))
        self._timer = None
        self.endpoint.handle_timeout(self._clock())
        self._pump()

    # -- public API --

    async def send(
        self,
        to_identity: str,
        payload: bytes,
        meta: str = "",
        *,
        transfer_id: int | None = None,
        cfg: SenderConfig | None = None,
    ) -> int:
        tid = new_transfer_id() if transfer_id is None else transfer_id
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._send_waiters[(to_identity, tid)] = fut
        try:
            self.endpoint.send(to_identity, tid, payload, meta, self._clock(), cfg)
        except TransferError:
            self._send_waiters.pop((to_identity, tid), None)
            raise
        self._pump()
        try:
            await fut
        except asyncio.CancelledError:
            # The caller gave up on it (a refused handoff): tell the receiver (CANCEL) rather
            # than leave the transfer running to its end.
            if self.endpoint.cancel(to_identity, tid, "cancelled by the sender", self._clock()):
                self._pump()
            self._send_waiters.pop((to_identity, tid), None)
            raise
        return tid

    async def receive(
        self, from_identity: str | None = None, timeout: float | None = None
    ) -> BundleReceived:
        async def wait() -> BundleReceived:
            while True:
                for i, d in enumerate(self._inbox):
                    if from_identity is None or d.sender == from_identity:
                        del self._inbox[i]
                        self._inbox_bytes -= len(d.payload)
                        return d
                self._inbox_event.clear()
                await self._inbox_event.wait()

        return await asyncio.wait_for(wait(), timeout)


_TRANSPORTS: dict[int, RoomTransport] = {}


def transport_for(room: Any, cfg: EndpointConfig | None = None) -> RoomTransport:
    """The room's transport, created on first use (one endpoint per room, so receiving and
    sending share state and every packet is seen once); forgotten when the room disconnects."""
    t = _TRANSPORTS.get(id(room))
    if t is None or t.room is not room:
        t = RoomTransport(room, cfg)
        _TRANSPORTS[id(room)] = t
    return t


async def send_bundle(
    room: Any,
    to_identity: str,
    payload: bytes,
    meta: str | dict[str, Any] = "",
    *,
    compress: bool = False,
    deadline: float = 60.0,
    transfer_id: int | None = None,
    window: int = 32,
) -> int:
    """Send ``payload`` to one participant; returns the transfer id once the receiver has
    verified the SHA-256 and confirmed (COMPLETE). Raises :class:`TransferError` otherwise.

    ``window`` is the number of chunks in flight. A data channel delivers in order, so
    everything this participant publishes afterwards (a ``quiet`` during a handoff) waits
    behind up to ``window`` chunks: use a small window when control messages must stay prompt."""
    import json

    meta_s = meta if isinstance(meta, str) else json.dumps(meta, separators=(",", ":"))
    t = transport_for(room)
    cfg = SenderConfig(compress=compress, deadline=deadline, window=window)
    return await t.send(to_identity, payload, meta_s, transfer_id=transfer_id, cfg=cfg)


async def receive_bundle(
    room: Any, from_identity: str | None = None, timeout: float | None = None
) -> tuple[bytes, str]:
    """Wait for the next verified bundle (optionally from one identity); returns
    ``(payload, meta)``. Raises ``TimeoutError`` after ``timeout`` seconds.

    Bundles are only captured once the room's transport exists: call ``transport_for(room)``
    right after connecting, so a bundle that arrives before this call is not missed."""
    d = await transport_for(room).receive(from_identity, timeout)
    return d.payload, d.meta
