"""The agent side of baton's control protocol, with no SDK (docs/protocol.md sections 2 and 3).

Everything here is plain Python: it imports nothing from ``livekit``, reads no clock and opens
no socket, so it can drive any peer (livekit-agents through :mod:`lk_baton.agents`, a
hand-written agent, a test) and is tested with recording fakes.

* The codec of control envelopes: :func:`encode_control` (compact UTF-8 JSON that fits one data
  packet, or :class:`MessageTooLarge` naming the field that is too long) and
  :func:`decode_control` (bytes from the wire to a checked envelope, or
  :class:`ControlDecodeError`).
* :class:`FloorClient`: hello, activate/deactivate/prepare handling, the quiet after a handoff's
  last sentence, handoff requests and their answers, as a state machine.
* :func:`hello_schedule`: when an agent says ``hello`` again while baton has not answered.
* :class:`HeartbeatSender`: the ``heartbeat`` an agent sends every ``heartbeat_ms`` so baton
  notices its death within a second (docs/protocol.md, "Checkpoints, heartbeats and recovery").
* :func:`is_coordinator`: whether a participant is baton's, the only sender whose control
  messages and transfers an agent accepts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from .frames import MAX_FRAME_SIZE

__all__ = [
    "CONTROL_TOPIC",
    "COORDINATOR_ATTRIBUTE",
    "COORDINATOR_ROLE",
    "FILLER_TRACK_NAME",
    "HEARTBEAT_MS",
    "HELLO_RETRY",
    "MAX_FILLER_FADE_MS",
    "MAX_ID_LEN",
    "MAX_MESSAGE_SIZE",
    "MAX_TAIL_SIZE",
    "MAX_TOOL_RESULT_SIZE",
    "PARTICIPANT_KIND_AGENT",
    "PROTOCOL_VERSION",
    "BatonError",
    "ControlDecodeError",
    "ControlErrorName",
    "ControlSender",
    "CoordinatorMissing",
    "FloorClient",
    "FloorEffects",
    "FloorEventKind",
    "FloorListener",
    "HandoffCancelled",
    "HandoffRefused",
    "HeartbeatSender",
    "MessageTooLarge",
    "ParticipantLike",
    "RefusalLog",
    "decode_control",
    "encode_control",
    "envelope_problem",
    "filler_fade_ms",
    "hello_schedule",
    "is_coordinator",
]

log = logging.getLogger("lk_baton.floor")

CONTROL_TOPIC = "baton.control"
"""The data packet topic of control messages (docs/protocol.md section 1)."""
FILLER_TRACK_NAME = "baton-filler"
"""The name of the second audio track an agent publishes for its own filler (the *source
filler*, see :mod:`lk_baton.filler`; docs/protocol.md, "The source's filler"). It is the name of
baton's own filler track too: baton takes an agent's voice to be its first audio track not so
named, so it never mutes this one nor counts it as the agent speaking. A ``handoff`` request
with ``filler: true`` says it is playing."""
MAX_FILLER_FADE_MS = 5000
"""The longest fade of a ``filler_stop`` the adapter obeys, in milliseconds: a larger
``fade_ms`` is clamped to it (a filler still audible seconds after baton said stop would sound
like a second line under the new agent)."""
PROTOCOL_VERSION = 1
"""The envelope's ``v`` this adapter speaks."""
MAX_MESSAGE_SIZE = MAX_FRAME_SIZE
"""Bytes in one data packet's payload: 15 000 (docs/protocol.md section 1; LiveKit documents
15 KiB for reliable packets). A control message must fit in one."""
MAX_ID_LEN = 64
"""An envelope ``id`` is 1 to 64 characters (docs/protocol.md section 2)."""
COORDINATOR_ATTRIBUTE = "baton.role"
COORDINATOR_ROLE = "coordinator"
"""baton's participant carries ``baton.role = coordinator`` in the token it joins with
(``src/token.rs``), and is of kind agent."""
PARTICIPANT_KIND_AGENT = 4
"""``ParticipantInfo.Kind.AGENT`` in LiveKit's protocol (livekit_models.proto), the value of
``rtc.ParticipantKind.PARTICIPANT_KIND_AGENT``. The server sets a participant's kind from the
token it accepted, so a caller cannot claim it."""
HELLO_RETRY = 1.0
"""Seconds between repeated ``hello`` messages while baton has not answered (see
:func:`hello_schedule`)."""
MAX_TOOL_RESULT_SIZE = MAX_MESSAGE_SIZE - 1000
"""Bytes a ``tool_result`` may take as sent by an agent: baton forwards it with a new ``id``
and a ``source`` member, so 1 000 bytes are left for those (docs/protocol.md, ``tool_result``).
:meth:`FloorClient.tool_result` truncates ``output`` to fit."""
MAX_TAIL_SIZE = MAX_MESSAGE_SIZE - 1000
"""Bytes a ``tail`` may take as sent by an agent: baton forwards it with a new ``id`` and a
``source`` member (docs/protocol.md, ``tail``). :meth:`FloorClient.tail` splits the items over
as many messages as it takes."""
HEARTBEAT_MS = 250
"""Milliseconds between heartbeats, announced in ``hello`` as ``heartbeat_ms``. baton suspects a
crash after ``crash_suspect_after`` (1 s) without one, so four may be lost in a row first."""

# ---------------------------------------------------------------------------------------------
# Errors


class BatonError(Exception):
    """Base class for the adapter's errors about baton and its protocol."""


class CoordinatorMissing(BatonError):
    """No baton in the room: no participant of kind agent with ``baton.role = coordinator``
    (and the given identity, if one was asked for) joined within ``waited`` seconds.

    ``code`` is ``"coordinator_missing"``. The usual cause is a room created before the token
    that dispatches baton was used: the LiveKit server ignores a token's agent dispatch for a
    room that already exists. Fix it where rooms are made (``lk_baton.launch.ensure_coordinator``
    or ``baton ensure``)."""

    code = "coordinator_missing"

    def __init__(self, room: str, waited: float, identity: str | None = None) -> None:
        who = (
            f"participant {identity!r}"
            if identity
            else "participant of kind agent with baton.role=coordinator"
        )
        super().__init__(
            f"coordinator_missing: baton is not in room {room!r} after {waited:g} s (no {who}); "
            "the room may have been created before the token that dispatches baton "
            "(use lk_baton.launch.ensure_coordinator or `baton ensure`)"
        )
        self.room = room
        self.waited = waited
        self.identity = identity


class HandoffRefused(BatonError):
    """baton refused a handoff; ``reason`` is the protocol's refusal code
    (``handoff_in_progress``, ``not_floor_holder``, ``unknown_target``, ``same_agent``,
    ``session_ended``, ``reason_too_long``, ``message_too_large``), or ``timeout`` when baton
    did not answer at all."""

    def __init__(self, reason: str, target: str) -> None:
        super().__init__(f"handoff to {target!r} refused: {reason}")
        self.reason = reason
        self.target = target


class HandoffCancelled(BatonError):
    """baton cancelled the handoff this agent was preparing for (``handoff_cancelled``)."""

    def __init__(self, handoff: str, reason: str) -> None:
        super().__init__(f"handoff {handoff} cancelled by baton: {reason}")
        self.handoff = handoff
        self.reason = reason


class MessageTooLarge(BatonError, ValueError):
    """A control message that cannot fit one data packet, raised before anything is sent.

    ``type``: the message type; ``size``: its encoded size in bytes; ``limit``:
    :data:`MAX_MESSAGE_SIZE`; ``field``: the member whose value takes the most bytes (the one to
    shorten); ``field_size``: that value's encoded size; ``field_limit``: the most bytes its
    encoding may take with every other member unchanged (JSON escapes count, so a character may
    take up to 6 bytes).
    """

    def __init__(self, type_: str, size: int, field: str, field_size: int) -> None:
        self.type = type_
        self.size = size
        self.limit = MAX_MESSAGE_SIZE
        self.field = field
        self.field_size = field_size
        self.field_limit = max(0, field_size - (size - MAX_MESSAGE_SIZE))
        super().__init__(
            f"{type_} message of {size} bytes does not fit a data packet ({self.limit} bytes): "
            f"field {field!r} takes {field_size} bytes encoded, at most {self.field_limit} fit"
        )


ControlErrorName = Literal["too_large", "malformed", "unsupported_version"]


class ControlDecodeError(BatonError, ValueError):
    """Bytes that are not a control envelope this adapter accepts. ``name`` is stable and
    matches baton's own rejections (docs/protocol.md section 2): ``too_large`` (over
    :data:`MAX_MESSAGE_SIZE`), ``malformed`` (not UTF-8 JSON, not an object, ``v`` / ``type`` /
    ``id`` missing or ill-typed), ``unsupported_version`` (``v`` other than 1)."""

    def __init__(self, name: ControlErrorName, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name: ControlErrorName = name
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# The control codec


def _cut_to_fit(
    item: Mapping[str, Any], fits: Callable[[Mapping[str, Any]], bool]
) -> dict[str, Any] | None:
    """``item`` with its longest text (a string of ``content``, ``arguments`` or ``output``)
    cut to the longest prefix for which ``fits`` holds, or None if even an empty one does not."""
    texts: list[tuple[int, Any, Any]] = []  # (length, container key path) of each candidate
    content = item.get("content")
    if isinstance(content, list):
        texts += [(len(c), "content", i) for i, c in enumerate(content) if isinstance(c, str)]
    for key in ("arguments", "output"):
        if isinstance(item.get(key), str):
            texts.append((len(item[key]), key, None))
    if not texts:
        return None
    _, key, index = max(texts, key=lambda t: t[0])
    full: str = item[key][index] if index is not None else item[key]

    def with_text(text: str) -> dict[str, Any]:
        out = dict(item)
        if index is not None:
            out[key] = [*item[key][:index], text, *item[key][index + 1 :]]
        else:
            out[key] = text
        return out

    if not fits(with_text("")):
        return None
    return with_text(_longest_prefix(full, lambda t: fits(with_text(t))))


def _longest_prefix(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of ``text`` for which ``fits`` holds (``fits("")`` is assumed), by
    bisection: ``fits`` must hold for every prefix shorter than one that holds."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def _json(value: Any) -> bytes:
    # Plain UTF-8 with compact separators: escaping every non-ASCII character as \uXXXX made a
    # valid 2,600-letter Greek reason 15,694 bytes, over the packet limit (issue 11, item 1).
    # NaN and infinities are not JSON; refuse them here rather than let a peer reject them.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def encode_control(msg: Mapping[str, Any]) -> bytes:
    """One control envelope as the bytes of a data packet: compact JSON, UTF-8, non-ASCII
    characters unescaped, members in ``msg``'s order.

    Raises :class:`MessageTooLarge` when the result is over :data:`MAX_MESSAGE_SIZE` bytes,
    naming the member that takes the most bytes; ``ValueError`` for values JSON cannot carry
    (NaN, a lone surrogate); ``TypeError`` for values that are not JSON types.
    """
    data = _json(dict(msg))
    if len(data) > MAX_MESSAGE_SIZE:
        sizes = {k: len(_json(v)) for k, v in msg.items()}
        field = max(sizes, key=lambda k: sizes[k])
        raise MessageTooLarge(str(msg.get("type")), len(data), field, sizes[field])
    return data


def envelope_problem(msg: Any) -> ControlDecodeError | None:
    """What makes ``msg`` (parsed JSON) not an envelope of this protocol version, or ``None``:
    an object with an integer ``v`` equal to :data:`PROTOCOL_VERSION`, a string ``type`` and a
    string ``id`` of 1 to 64 characters (docs/protocol.md section 2)."""
    if not isinstance(msg, Mapping):
        return ControlDecodeError("malformed", "not a JSON object")
    v = msg.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        return ControlDecodeError("malformed", "v missing or not an integer")
    if not isinstance(msg.get("type"), str):
        return ControlDecodeError("malformed", "type missing or not a string")
    mid = msg.get("id")
    if not isinstance(mid, str) or not 1 <= len(mid) <= MAX_ID_LEN:
        return ControlDecodeError("malformed", f"id missing or not a string of 1..{MAX_ID_LEN}")
    if v != PROTOCOL_VERSION:
        return ControlDecodeError("unsupported_version", f"v is {v}, this adapter speaks 1")
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_control(data: bytes) -> dict[str, Any]:
    """A data packet's payload (topic ``baton.control``) as a checked envelope.

    Raises :class:`ControlDecodeError` (and nothing else): ``too_large`` over
    :data:`MAX_MESSAGE_SIZE` bytes (refused unread), ``malformed`` for anything that is not
    strict UTF-8 JSON holding an envelope (see :func:`envelope_problem`; ``NaN`` and
    ``Infinity`` are not JSON), ``unsupported_version`` for another ``v``. Members the envelope
    does not know are kept (docs/protocol.md section 2: receivers ignore them).
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise ControlDecodeError("too_large", f"{len(data)} bytes, over {MAX_MESSAGE_SIZE}")
    try:
        doc = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ControlDecodeError("malformed", f"not UTF-8 JSON ({e})") from None
    problem = envelope_problem(doc)
    if problem is not None:
        raise problem
    return dict(doc)


def filler_fade_ms(msg: Mapping[str, Any], default: int = 250) -> int:
    """The fade of a ``filler_stop`` message, in milliseconds, clamped to
    ``0..MAX_FILLER_FADE_MS`` (0: stop at once). A ``fade_ms`` that is missing or not a finite
    number gives ``default`` (250 ms, baton's own ``filler_fade``): the message still means stop,
    and a short fade is what an unknown request is best answered with."""
    raw = msg.get("fade_ms")
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return default
    return max(0, min(MAX_FILLER_FADE_MS, round(raw)))


# ---------------------------------------------------------------------------------------------
# Who may speak to an agent


class ParticipantLike(Protocol):
    """The two facts of a LiveKit participant the adapter's authorisation reads (as
    ``rtc.RemoteParticipant`` has them): ``kind`` (an int, ``ParticipantKind``) and
    ``attributes``."""

    @property
    def kind(self) -> int: ...

    @property
    def attributes(self) -> Mapping[str, str]: ...


def is_coordinator(participant: ParticipantLike | None) -> bool:
    """Whether ``participant`` is baton's: kind agent **and** attribute ``baton.role`` equal to
    ``coordinator``, both from the token the server accepted (``src/token.rs``). The adapter
    takes control messages and transfers (``baton.xfer``) from no one else (docs/protocol.md
    section 1: the sender is the server's word). A participant object without ``kind`` (a
    stand-in) is not baton's."""
    if participant is None:
        return False
    kind = getattr(participant, "kind", None)
    attributes = getattr(participant, "attributes", None) or {}
    return kind == PARTICIPANT_KIND_AGENT and attributes.get(COORDINATOR_ATTRIBUTE) == (
        COORDINATOR_ROLE
    )


class RefusalLog:
    """A rate-limited security log of refused input, in constant memory.

    :meth:`refused` counts every refusal; the first is logged at once (``WARNING``), later ones
    at most once per ``interval`` seconds as one line with the count since the last line and
    the last sender. A flood of junk from one participant costs a counter, not a log line per
    packet. Time is passed in (any monotonic seconds).
    """

    def __init__(self, what: str, interval: float = 10.0, logger: logging.Logger | None = None):
        self.what = what
        self.interval = interval
        self.total = 0
        """Refusals counted since creation."""
        self._logger = logger or log
        self._unreported = 0
        self._next_at: float | None = None

    def refused(self, now: float, sender: str, why: str) -> bool:
        """Count one refusal of input from ``sender`` (an identity) for reason ``why``; returns
        whether a line was logged now."""
        self.total += 1
        self._unreported += 1
        if self._next_at is not None and now < self._next_at:
            return False
        self._logger.warning(
            "security: refused %d %s (%d in all); last from %r: %s",
            self._unreported,
            self.what,
            self.total,
            sender,
            why,
        )
        self._unreported = 0
        self._next_at = now + self.interval
        return True


# ---------------------------------------------------------------------------------------------
# When to say hello


def hello_schedule(answer_timeout: float, interval: float = HELLO_RETRY) -> list[float]:
    """When to say ``hello`` while baton has not answered, in seconds from the first one: every
    ``interval`` seconds (a fixed interval, no backoff) up to ``answer_timeout``, with the last
    one at ``answer_timeout`` itself. ``hello_schedule(5)`` is ``[0, 1, 2, 3, 4, 5]``,
    ``hello_schedule(3.5)`` is ``[0, 1, 2, 3, 3.5]``.

    Why resend at all: baton hears a ``hello`` only from a participant the server has told it
    about, and the server announces a participant that publishes no track up to about 3 s late
    (it batches those updates); a ``hello`` that overtakes that news is dropped unanswered. A
    repeated ``hello`` is harmless: baton answers each with the agent's current state, and
    :class:`FloorClient` acts on a repeated ``activate`` once. Why no backoff: a ``hello`` is
    about 80 bytes, and the first one baton hears ends the resending.
    """
    if not (math.isfinite(answer_timeout) and answer_timeout >= 0):
        raise ValueError("answer_timeout must be a finite number of seconds >= 0")
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError("interval must be a finite number of seconds > 0")
    times: list[float] = []
    k = 0
    while k * interval < answer_timeout:
        times.append(k * interval)
        k += 1
    times.append(answer_timeout)
    return times


# ---------------------------------------------------------------------------------------------
# Heartbeats


class HeartbeatSender:
    """The ``heartbeat`` messages of one agent (docs/protocol.md, "Checkpoints, heartbeats and
    recovery"): ``{"v":1,"type":"heartbeat","id":"h-<seq>","seq":<seq>}``, ``seq`` from 0, +1
    per message, never reset (a reconnect keeps counting).

    :meth:`next` is the sans-IO part: the next message's bytes. :meth:`run` sends them every
    ``interval_ms`` milliseconds with ``send`` until cancelled; it runs as its own asyncio task
    on the agent's event loop on purpose, so a hung loop stops the heartbeat and baton replaces
    the agent (a hung agent cannot speak either). ``send`` should publish a **lossy** data
    packet to baton only: a late heartbeat is worthless and must not queue behind a bundle. A
    ``send`` that raises is logged and the beat skipped (the next one may get through).
    """

    def __init__(self, interval_ms: int = HEARTBEAT_MS) -> None:
        if not (isinstance(interval_ms, int) and interval_ms > 0):
            raise ValueError("interval_ms must be a positive integer")
        self.interval_ms = interval_ms
        self.seq = 0
        """The ``seq`` of the next heartbeat."""
        self.failures = 0
        """Heartbeats whose ``send`` raised."""

    def next(self) -> bytes:
        """The next heartbeat as a data packet's payload."""
        seq = self.seq
        self.seq += 1
        return encode_control(
            {"v": PROTOCOL_VERSION, "type": "heartbeat", "id": f"h-{seq}", "seq": seq}
        )

    async def run(
        self,
        send: Callable[[bytes], Awaitable[None]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Send a heartbeat now and then every ``interval_ms`` until cancelled."""
        while True:
            try:
                await send(self.next())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("heartbeat not sent (%d so far): %s", self.failures, e)
            await sleep(self.interval_ms / 1000)


# ---------------------------------------------------------------------------------------------
# The floor state machine


class ControlSender(Protocol):
    """Where :class:`FloorClient` puts outgoing control envelopes (complete dicts, already
    checked by :func:`encode_control` to fit a data packet)."""

    def send(self, msg: dict[str, Any]) -> None: ...


class FloorEffects(Protocol):
    """What :class:`FloorClient` does to the agent."""

    def set_input(self, enabled: bool) -> None:
        """Turn the agent's hearing (audio input, text input) on or off."""

    def set_output(self, enabled: bool) -> None:
        """Turn the agent's voice (audio output, transcription) on or off."""

    def speaking(self) -> bool:
        """Whether the agent is speaking now (its sentence is not finished)."""


FloorEventKind = Literal[
    "activated",  # activate received (msg: the activate)
    "deactivated",  # deactivate received
    "quiet",  # we told baton we are quiet (msg: the quiet we sent)
    "prepare",  # we are the target of a handoff (msg: the prepare)
    "bundle_unavailable",
    "handoff_cancelled",
    "handoff_failed",  # our handoff failed; an activate(handback) follows
    "tool_result",  # the late result of a call handed to us in flight (msg: the tool_result)
    "tail",  # what our handoff's source said after its bundle was built (msg: the tail)
    "filler_stop",  # stop our source filler (msg: the filler_stop; see filler_fade_ms)
    "release",
    "error",
]
FloorListener = Callable[[FloorEventKind, dict[str, Any]], None]


class FloorClient:
    """The agent side of docs/protocol.md (section 3), as a state machine.

    Feed it baton's control messages with :meth:`handle` and the agent's speaking state with
    :meth:`speaking_changed`; it answers through ``sender`` and acts through ``effects``.
    ``listener(kind, msg)`` hears every notable event (see :data:`FloorEventKind`).

    Starts silent: input and output off until baton's ``activate``. Every message it builds is
    checked with :func:`encode_control` before it is handed to ``sender``: one that cannot fit a
    data packet raises :class:`MessageTooLarge` from the call that built it, and nothing is sent.
    """

    def __init__(
        self,
        agent_name: str,
        sender: ControlSender,
        effects: FloorEffects,
        *,
        role: str | None = None,
        listener: FloorListener | None = None,
        id_prefix: str | None = None,
        heartbeat_ms: int | None = None,
    ) -> None:
        self.agent_name = agent_name
        self.role = role
        self.heartbeat_ms = heartbeat_ms
        """Announced in ``hello`` when set: this agent sends ``heartbeat`` that often."""
        self._sender = sender
        self._effects = effects
        self._listener = listener
        self._prefix = id_prefix or f"a{os.urandom(3).hex()}"
        self._seq = 0
        self.active = False
        """True while this agent holds the floor (between ``activate`` and ``deactivate``)."""
        self.quiet_pending: str | None = None
        """The handoff id of a ``deactivate(handoff)`` we have not yet answered with ``quiet``."""
        self._silent_since: float | None = None
        self.quiet_held = False
        """While true, the end of the sentence does not send ``quiet``: a handoff asked for at
        the start of its sentence sends its ``tail`` first (:meth:`hold_quiet`)."""
        self.prepare: dict[str, Any] | None = None
        """The ``prepare`` of the handoff this agent is the target of, until activated/cancelled."""
        self.last_activate: dict[str, Any] | None = None
        self.answered = False
        """True once baton answered our ``hello`` (activate, deactivate or prepare)."""
        self.last_handoff: str | None = None
        """The handoff id of our last request baton accepted (``handoff_accepted``)."""
        self._requests: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._unanswered: dict[str, dict[str, Any]] = {}
        effects.set_input(False)
        effects.set_output(False)

    # -- outgoing --

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}-{self._seq}"

    def _send(self, type_: str, **fields: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": type_, "id": self._next_id()}
        msg.update({k: v for k, v in fields.items() if v is not None})
        encode_control(msg)  # fail here, at the caller, rather than in the writer later
        self._sender.send(msg)
        return msg

    def hello(self) -> dict[str, Any]:
        """Announce this agent (at start, and again after any reconnect of either side), with
        ``heartbeat_ms`` when this agent sends heartbeats."""
        return self._send(
            "hello", agent_name=self.agent_name, role=self.role, heartbeat_ms=self.heartbeat_ms
        )

    def ping(self) -> dict[str, Any]:
        return self._send("ping")

    def request_handoff(
        self,
        target: str,
        reason: str,
        *,
        bundle_follows: bool = False,
        transfer: str | None = None,
        quiet: bool = False,
        quiet_ms: int | None = None,
        filler: bool = False,
        speaking: bool = False,
    ) -> tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]:
        """Send ``handoff``; the future resolves with baton's ``handoff_accepted`` or
        ``handoff_refused`` (whichever answers this request's id). Needs a running loop.

        ``quiet``: the agent has already finished speaking, so baton may start its filler at
        once rather than after the ``deactivate`` -> ``quiet`` round trip; ``quiet_ms``: for
        how long it has been (baton's settle before the switch counts from then). ``filler``:
        the agent plays its own filler on its :data:`FILLER_TRACK_NAME` track (sent as
        ``"filler": true``, left out when false), so baton owes it a ``filler_stop``.
        ``speaking`` (ignored with ``quiet``): asked at the start of the sentence said with the
        transfer tool; this agent sends ``quiet`` itself when the sentence has played out
        (after its ``tail``: see :meth:`hold_quiet`), and baton prepares the target meanwhile
        and waits up to its ``sentence_timeout`` (20 s) rather than ``source_quiet_timeout``. Raises
        :class:`MessageTooLarge` (nothing sent) when ``reason`` or ``target`` cannot fit."""
        loop = asyncio.get_running_loop()
        self._silent_since = None  # a silence reported for an earlier request is not this one's
        msg = self._send(
            "handoff",
            target=target,
            reason=reason,
            transfer=transfer,
            bundle_follows=True if bundle_follows else None,
            quiet=True if quiet else None,
            quiet_ms=max(0, int(quiet_ms)) if quiet and quiet_ms is not None else None,
            filler=True if filler else None,
            speaking=True if speaking and not quiet else None,
        )
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._requests[msg["id"]] = fut
        self._unanswered[msg["id"]] = msg
        return msg, fut

    def check_handoff(self, target: str, reason: str) -> None:
        """Raise :class:`MessageTooLarge` if a ``handoff`` request for ``target`` and ``reason``
        could not fit one packet, without sending anything: checked with the longest id this
        client could give it (20 digits), naming a bundle, ``quiet``, a ``quiet_ms`` of 10
        digits and ``filler``, so a request that passes always fits (a reason of at most
        14 000 bytes always passes). ``speaking`` is never sent with ``quiet``, and is shorter
        than ``quiet`` and its ``quiet_ms``."""
        encode_control(
            {
                "v": PROTOCOL_VERSION,
                "type": "handoff",
                "id": f"{self._prefix}-{'9' * 20}",
                "target": target,
                "reason": reason,
                "transfer": "f" * 32,
                "quiet": True,
                "quiet_ms": 2**31 - 1,
                "filler": True,
            }
        )

    def resend_requests(self) -> list[dict[str, Any]]:
        """Send every ``handoff`` request baton has not answered yet again, unchanged (same
        ``id``): after a reconnect the answer may have been lost, and baton answers a repeated
        request the way it answered it the first time (docs/protocol.md section 3). Returns the
        messages sent."""
        for msg in self._unanswered.values():
            self._sender.send(msg)
        return list(self._unanswered.values())

    def ready(self, handoff: str) -> dict[str, Any]:
        """Tell baton this target has loaded the context and started its pipeline."""
        return self._send("ready", handoff=handoff)

    def hint(self, target: str) -> dict[str, Any]:
        """Tell baton a handoff to ``target`` is likely soon, so it brings an instance of it
        into the room as a muted standby (docs/protocol.md, ``hint``). Never answered; baton
        ignores it (and logs why) unless this agent holds the floor, ``target`` is another
        configured agent, and the previous hint is ``hint_interval`` old."""
        return self._send("hint", target=target)

    def tool_result(
        self,
        handoff: str,
        call_id: str,
        name: str,
        output: str,
        *,
        is_error: bool = False,
        status: Literal["finished", "cancelled"] = "finished",
    ) -> dict[str, Any]:
        """Send the result of a call this agent handed over in flight (in the bundle of
        ``handoff``) that ended after the handoff; baton forwards it to the agent holding the
        floor. ``output`` is cut at a character boundary so the message takes at most
        :data:`MAX_TOOL_RESULT_SIZE` bytes, and then ``truncated`` is true."""
        fields: dict[str, Any] = {
            "handoff": handoff,
            "call_id": call_id,
            "name": name,
            "status": status,
            "is_error": is_error,
        }
        probe = {"v": PROTOCOL_VERSION, "type": "tool_result", "id": "x" * 24, **fields}
        room = MAX_TOOL_RESULT_SIZE - len(_json({**probe, "output": ""}))
        if len(_json(output)) > room:
            left = room - len(',"truncated":true')
            fields["output"] = _longest_prefix(output, lambda t: len(_json(t)) <= left)
            fields["truncated"] = True
        else:
            fields["output"] = output
        return self._send("tool_result", **fields)

    def tail(
        self,
        handoff: str,
        items: Sequence[Mapping[str, Any]],
        user_state: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Send what this agent's context gained after the bundle of ``handoff`` was built
        (chat items as a bundle's ``chat.items`` has them, in context order; ``user_state``
        when it changed), as ``tail`` messages of at most :data:`MAX_TAIL_SIZE` bytes each:
        items in order, as many per message as fit, ``user_state`` in the last one. An item
        too large for a message of its own has its longest text (a message's content, a call's
        arguments or output) cut at a character boundary until it fits, and a warning is
        logged; a ``user_state`` too large for one is not sent (logged as an error). Returns
        the messages sent: none when there is nothing to send."""
        probe = {"v": PROTOCOL_VERSION, "type": "tail", "id": "x" * 24, "handoff": handoff}

        def size(chunk: list[Mapping[str, Any]], state: Mapping[str, Any] | None = None) -> int:
            body: dict[str, Any] = {**probe, "items": chunk}
            if state is not None:
                body["user_state"] = state
            return len(_json(body))

        chunks: list[list[Mapping[str, Any]]] = [[]]
        for item in items:
            if size([item]) > MAX_TAIL_SIZE:
                fitted = _cut_to_fit(item, lambda i: size([i]) <= MAX_TAIL_SIZE)
                if fitted is None:
                    log.error(
                        "tail of %s: item %r cannot fit a message; not sent",
                        handoff,
                        item.get("id"),
                    )
                    continue
                log.warning("tail of %s: item %r cut to fit one message", handoff, item.get("id"))
                item = fitted
            if chunks[-1] and size([*chunks[-1], item]) > MAX_TAIL_SIZE:
                chunks.append([])
            chunks[-1].append(item)
        state = dict(user_state) if user_state is not None else None
        if state is not None and size([], state) > MAX_TAIL_SIZE:
            log.error("tail of %s: the user state cannot fit a message; not sent", handoff)
            state = None
        if state is not None and size(chunks[-1], state) > MAX_TAIL_SIZE:
            chunks.append([])
        if state is None and not chunks[-1]:
            chunks.pop()
        sent = []
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            sent.append(
                self._send(
                    "tail", handoff=handoff, items=list(chunk), user_state=state if last else None
                )
            )
        return sent

    def hold_quiet(self) -> None:
        """From now on the end of this agent's sentence does not send ``quiet`` by itself:
        :meth:`release_quiet` does (a handoff asked for with ``speaking`` sends its ``tail``
        before its ``quiet``, so that baton has it before the target's ``activate``)."""
        self.quiet_held = True

    def release_quiet(self, silent_since: float | None = None) -> None:
        """End :meth:`hold_quiet`, and send the ``quiet`` owed to a ``deactivate(handoff)``
        now if the agent is no longer speaking (else at the end of its sentence).
        ``silent_since``: ``time.monotonic()`` when the agent's voice last went out; the
        ``quiet`` then says for how long (``quiet_ms``), and baton's settle before the switch
        counts from then."""
        self.quiet_held = False
        self._silent_since = silent_since
        if self.quiet_pending is not None and not self.active and not self._effects.speaking():
            self._go_quiet()

    def forget_request(self, msg_id: str) -> None:
        self._unanswered.pop(msg_id, None)
        fut = self._requests.pop(msg_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    # -- incoming --

    def _notify(self, kind: FloorEventKind, msg: dict[str, Any]) -> None:
        if self._listener is not None:
            self._listener(kind, msg)

    def handle(self, msg: Mapping[str, Any]) -> None:
        """One control envelope from baton (already checked to come from baton's participant);
        an envelope :func:`envelope_problem` finds fault with is logged and ignored."""
        problem = envelope_problem(msg)
        if problem is not None:
            log.warning("ignored control message: %s", problem)
            return
        m = dict(msg)
        t = m["type"]
        if t in ("handoff_accepted", "handoff_refused"):
            self._unanswered.pop(str(m.get("re")), None)
            fut = self._requests.pop(str(m.get("re")), None)
            if fut is not None and t == "handoff_accepted" and isinstance(m.get("handoff"), str):
                self.last_handoff = m["handoff"]
            if fut is not None and not fut.done():
                fut.set_result(m)
            return
        if t == "activate":
            self.answered = True
            prev = self.last_activate
            key = (m.get("cause"), m.get("handoff"))
            if (
                self.active
                and prev is not None
                and (key[0] == "start" or key == (prev.get("cause"), prev.get("handoff")))
            ):
                # baton's answer to a repeated hello (a resend before its first answer arrived,
                # or a hello after a reconnect): we hold the floor already. baton answers such a
                # hello with cause "start" whatever gave us the floor (a handoff, a handback).
                # Acting again would run the activate hook twice (the agent would greet the
                # caller twice, or say its first sentence again after a handoff).
                log.debug("repeated activate (%s) ignored: floor already held", m.get("cause"))
                return
            self.active = True
            self.quiet_pending = None
            self._silent_since = None
            self.prepare = None
            self.last_activate = m
            self._effects.set_input(True)
            self._effects.set_output(True)
            self._notify("activated", m)
        elif t == "deactivate":
            self.answered = True
            self.active = False
            self._effects.set_input(False)
            if m.get("reason") == "handoff":
                # finish the current sentence, then go quiet (speaking_changed finishes this)
                self.quiet_pending = str(m.get("handoff") or "")
                self._notify("deactivated", m)
                if not self._effects.speaking() and not self.quiet_held:
                    self._go_quiet()
            else:
                self.quiet_pending = None
                self._effects.set_output(False)
                self._notify("deactivated", m)
        elif t == "prepare":
            self.answered = True
            self.prepare = m
            self._notify("prepare", m)
        elif t == "bundle_unavailable":
            self._notify("bundle_unavailable", m)
        elif t == "handoff_cancelled":
            if self.prepare is not None and m.get("handoff") == self.prepare.get("handoff"):
                self.prepare = None
            self._silence()
            self._notify("handoff_cancelled", m)
        elif t == "handoff_failed":
            self._notify("handoff_failed", m)
        elif t == "tool_result":
            self._notify("tool_result", m)
        elif t == "tail":
            self._notify("tail", m)
        elif t == "filler_stop":
            # The listener decides: BatonLink ignores a stop for an earlier handoff than the
            # one its filler plays for.
            self._notify("filler_stop", m)
        elif t == "release":
            self.quiet_pending = None
            self._silence()
            self._notify("release", m)
        elif t == "error":
            log.warning("baton error %s: %s", m.get("code"), m.get("message"))
            self._notify("error", m)
        elif t == "pong":
            pass
        else:
            log.debug("ignored control message of unknown type %r", t)

    def _silence(self) -> None:
        self.active = False
        self._effects.set_input(False)
        self._effects.set_output(False)

    def speaking_changed(self, speaking: bool) -> None:
        """The agent started or stopped speaking."""
        if (
            not speaking
            and self.quiet_pending is not None
            and not self.active
            and not self.quiet_held
        ):
            self._go_quiet()

    def _go_quiet(self) -> None:
        handoff = self.quiet_pending
        self.quiet_pending = None
        self._effects.set_output(False)
        since, self._silent_since = self._silent_since, None
        quiet_ms = None if since is None else max(0, round((time.monotonic() - since) * 1000))
        msg = self._send("quiet", handoff=handoff or None, quiet_ms=quiet_ms)
        self._notify("quiet", msg)
