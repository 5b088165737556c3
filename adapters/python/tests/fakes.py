"""The adapter tests' stand-ins, in one place.

* In-memory rooms (:class:`Net`, :class:`FakeRoom`) that mimic the parts of ``livekit.rtc.Room``
  the adapter uses: ``on``/``off`` callbacks, ``local_participant.publish_data(payload,
  reliable=, destination_identities=, topic=)`` (async), ``remote_participants``, and
  ``data_received`` packets whose ``participant`` carries ``identity``, ``kind`` and
  ``attributes`` as the sender's room has them (the server's word, as in LiveKit); and
  ``publish_track`` / ``unpublish_track`` / ``isconnected`` for the source filler's track.
* Audio stand-ins for :class:`lk_baton.filler.SourceFiller`: :class:`FakeAudioSource` (records
  every frame, paced at real time) and :class:`FakeTrack`.
* A virtual clock (:func:`run_virtual`): an event loop whose selector advances time instead of
  sleeping, so timed tests take no wall-clock seconds and the times asserted are exact.
* Recording fakes for :class:`lk_baton.floor.FloorClient` (:class:`FakeSender`,
  :class:`FakeEffects`) and :func:`b`, a control envelope from baton.
* A scripted ``llm.LLM`` (:class:`ScriptedLLM`) and a scripted ``llm.RealtimeModel``
  (:class:`ScriptedRealtime`): the only cloud services the tests replace, and a booking service
  for tools to call (:class:`BookingBackend`).
* Stand-ins for baton's arbiter (:class:`FakeBaton`, :class:`ArbiterBaton`): they answer the
  way crates/baton-floor does for the scenario a test needs, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import selectors
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from livekit import rtc
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, function_tool, llm

from lk_baton.agents import current_tool_call, journaled
from lk_baton.checkpoint import MergedState, merge_checkpoints
from lk_baton.floor import (
    CONTROL_TOPIC,
    COORDINATOR_ATTRIBUTE,
    COORDINATOR_ROLE,
    PARTICIPANT_KIND_AGENT,
)
from lk_baton.transfer import BundleReceived, transport_for

KIND_STANDARD = 0
BATON_ATTRIBUTES = {COORDINATOR_ATTRIBUTE: COORDINATOR_ROLE}

# ---------------------------------------------------------------------------------------------
# In-memory rooms


@dataclass
class Participant:
    identity: str
    attributes: dict[str, str] = field(default_factory=dict)
    kind: int = KIND_STANDARD


@dataclass
class Packet:
    data: bytes
    topic: str
    participant: Participant


class Published(NamedTuple):
    src: str
    dest: str
    topic: str
    payload: bytes
    reliable: bool = True


class Net:
    """The rooms of one test, by identity. ``delay``: seconds from publish to delivery;
    ``down``: packets published meanwhile are lost; ``log``: every publish."""

    def __init__(self, delay: float = 0.001) -> None:
        self.rooms: dict[str, FakeRoom] = {}
        self.delay = delay
        self.down = False
        self.lossy_drop = False
        """Lose every lossy (unreliable) packet, as a congested link may."""
        self.log: list[Published] = []


@dataclass
class FakePublication:
    sid: str
    track: Any
    options: Any


class LocalParticipant:
    def __init__(self, room: FakeRoom) -> None:
        self.room = room

    async def publish_track(self, track: Any, options: Any = None) -> FakePublication:
        """Publishes at once, or after ``room.publish_delay`` seconds; raises
        ``room.publish_error`` when set."""
        room = self.room
        if room.publish_delay:
            await asyncio.sleep(room.publish_delay)
        if room.publish_error is not None:
            raise RuntimeError(room.publish_error)
        room.published_count += 1
        pub = FakePublication(f"TR_{room.identity}_{room.published_count}", track, options)
        room.tracks[pub.sid] = pub
        return pub

    async def unpublish_track(self, track_sid: str) -> None:
        self.room.tracks.pop(track_sid)
        self.room.unpublished.append(track_sid)

    async def publish_data(
        self,
        payload: bytes,
        *,
        reliable: bool = True,
        destination_identities: list[str] | None = None,
        topic: str = "",
    ) -> None:
        dests = list(destination_identities or [])
        assert reliable or (topic == CONTROL_TOPIC and b'"type":"heartbeat"' in payload), (
            "baton traffic goes on the reliable channel, heartbeats excepted"
        )
        assert len(dests) == 1, "addressed to exactly one participant, never broadcast"
        net = self.room.net
        net.log.append(Published(self.room.identity, dests[0], topic, bytes(payload), reliable))
        target = net.rooms.get(dests[0])
        if net.down or target is None or (not reliable and net.lossy_drop):
            return
        pkt = Packet(bytes(payload), topic, self.room.as_participant())
        asyncio.get_running_loop().call_later(net.delay, target.emit, "data_received", pkt)


class FakeRoom:
    name = "room-1"

    def __init__(
        self,
        net: Net,
        identity: str,
        attributes: dict[str, str] | None = None,
        *,
        kind: int = KIND_STANDARD,
    ) -> None:
        self.net = net
        self.identity = identity
        self.attributes = attributes or {}
        self.kind = kind
        self.local_participant = LocalParticipant(self)
        self._handlers: dict[str, list[Any]] = defaultdict(list)
        self.disconnected = False
        self.tracks: dict[str, FakePublication] = {}
        """The tracks this participant has published now, by sid."""
        self.unpublished: list[str] = []
        self.published_count = 0
        self.publish_delay = 0.0
        self.publish_error: str | None = None
        net.rooms[identity] = self

    def isconnected(self) -> bool:
        return not self.disconnected

    def as_participant(self) -> Participant:
        return Participant(self.identity, self.attributes, self.kind)

    @property
    def remote_participants(self) -> dict[str, Participant]:
        return {i: r.as_participant() for i, r in self.net.rooms.items() if i != self.identity}

    def on(self, event: str, callback: Any) -> Any:
        self._handlers[event].append(callback)
        return callback

    def off(self, event: str, callback: Any) -> None:
        self._handlers[event].remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for cb in list(self._handlers[event]):
            cb(*args)

    async def disconnect(self) -> None:
        self.disconnected = True


def baton_room(net: Net, identity: str) -> FakeRoom:
    """A room joined the way baton joins: kind agent, ``baton.role = coordinator``."""
    return FakeRoom(net, identity, dict(BATON_ATTRIBUTES), kind=PARTICIPANT_KIND_AGENT)


# ---------------------------------------------------------------------------------------------
# Audio stand-ins for the source filler


class FakeAudioSource:
    """Stands in for ``rtc.AudioSource``: keeps every frame captured (``frames``, int16 arrays,
    with ``times``, the loop time each came in), and paces as the real one does once its queue
    is full: one frame per frame duration. ``clear_queue`` is counted (``cleared``)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray[Any, np.dtype[np.int16]]] = []
        self.times: list[float] = []
        self.cleared = 0
        self.closed = False

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        assert (frame.sample_rate, frame.num_channels) == (48_000, 1)
        self.frames.append(np.frombuffer(bytes(frame.data.cast("B")), dtype=np.int16).copy())
        self.times.append(asyncio.get_running_loop().time())
        await asyncio.sleep(frame.samples_per_channel / frame.sample_rate)

    def clear_queue(self) -> None:
        self.cleared += 1

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeTrack:
    name: str


# ---------------------------------------------------------------------------------------------
# A virtual clock: time moves only when the loop would otherwise sleep


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _SkippingSelector(selectors.BaseSelector):
    """Polls the real selector without blocking; when nothing is ready and the loop wants to wait
    for its next timer, jumps the clock forward by the wait instead of sleeping."""

    def __init__(self, clock: _Clock) -> None:
        self._sel = selectors.DefaultSelector()
        self._clock = clock

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._sel.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._sel.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._sel.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._sel.select(0)
        if ready:
            return ready
        if timeout is None:  # no timer at all: only another thread can wake us, wait for real
            return self._sel.select(0.05)
        self._clock.now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._sel.get_map()

    def close(self) -> None:
        self._sel.close()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = _Clock()
        super().__init__(_SkippingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


def run_virtual(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        runner.run(asyncio.wait_for(main(), 120))


# ---------------------------------------------------------------------------------------------
# FloorClient fakes


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]


class FakeEffects:
    def __init__(self) -> None:
        self.input = True
        self.output = True
        self.is_speaking = False
        self.log: list[tuple[str, bool]] = []

    def set_input(self, enabled: bool) -> None:
        self.input = enabled
        self.log.append(("input", enabled))

    def set_output(self, enabled: bool) -> None:
        self.output = enabled
        self.log.append(("output", enabled))

    def speaking(self) -> bool:
        return self.is_speaking


def b(type_: str, **kw: Any) -> dict[str, Any]:
    """A control envelope from baton."""
    return {"v": 1, "type": type_, "id": f"b-{uuid.uuid4().hex[:6]}", **kw}


# ---------------------------------------------------------------------------------------------
# A scripted LLM: a function of the chat context returns (text, [(tool, args), ...])

Step = tuple[str, list[tuple[str, dict[str, Any]]]]


class ScriptedLLM(llm.LLM):
    def __init__(self, script: Callable[[llm.ChatContext], Step]) -> None:
        super().__init__()
        self.script = script
        self.seen: list[llm.ChatContext] = []

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: Any,
    ) -> llm.LLMStream:
        self.seen.append(chat_ctx.copy())
        return ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        assert isinstance(self._llm, ScriptedLLM)
        text, calls = self._llm.script(self._chat_ctx)
        rid = uuid.uuid4().hex[:8]
        if text:
            delta = llm.ChoiceDelta(role="assistant", content=text)
            self._event_ch.send_nowait(llm.ChatChunk(id=rid, delta=delta))
        for name, args in calls:
            call = llm.FunctionToolCall(
                name=name, arguments=json.dumps(args), call_id=f"call_{uuid.uuid4().hex[:8]}"
            )
            delta = llm.ChoiceDelta(role="assistant", tool_calls=[call])
            self._event_ch.send_nowait(llm.ChatChunk(id=rid, delta=delta))


# ---------------------------------------------------------------------------------------------
# A scripted realtime model: the same kind of script, answering on a realtime session

RealtimeScript = Callable[[llm.ChatContext, str | None], Step]
"""``script(conversation, instructions)``: the server's conversation when a response is asked
for, and the response's instructions (``generate_reply(instructions=...)``)."""


class ScriptedRealtime(llm.RealtimeModel):
    """A realtime model whose responses come from a script, on sessions that keep the
    conversation the way a realtime server does (what livekit-agents' realtime path talks to).

    The conversation holds each item as the server stores it: a ``function_call_output``
    without ``name`` (the OpenAI realtime format has none; livekit-agents' conversion,
    ``openai_item_to_livekit_item``, leaves it empty). A response's text and function calls
    are added to it; a call to a tool named in ``backend_tools`` is run by the server itself
    (as GPT-Live's backend runs tools), which adds the call and its name-less output and reports
    both as remote items (``remote_item_added``). Text only: no audio, no turn detection."""

    def __init__(
        self, script: RealtimeScript, backend_tools: dict[str, Callable[[str], str]] | None = None
    ) -> None:
        super().__init__(
            capabilities=llm.RealtimeCapabilities(
                message_truncation=False,
                turn_detection=False,
                user_transcription=False,
                auto_tool_reply_generation=False,
                audio_output=False,
                manual_function_calls=True,
                mutable_chat_context=True,
                mutable_instructions=True,
                mutable_tools=True,
            )
        )
        self.script = script
        self.backend_tools = dict(backend_tools or {})
        self.sessions: list[ScriptedRealtimeSession] = []

    def session(self, *, turn_detection_disabled: bool = False) -> ScriptedRealtimeSession:
        s = ScriptedRealtimeSession(self)
        self.sessions.append(s)
        return s

    async def aclose(self) -> None:
        pass


def _as_server_item(item: llm.ChatItem) -> llm.ChatItem:
    if item.type == "function_call_output":
        return llm.FunctionCallOutput(
            id=item.id, call_id=item.call_id, output=item.output, is_error=item.is_error
        )
    return item.model_copy()


class ScriptedRealtimeSession(llm.RealtimeSession[Any]):
    def __init__(self, model: ScriptedRealtime) -> None:
        super().__init__(model)
        self.model = model
        self.items: list[llm.ChatItem] = []
        """The server's conversation."""
        self.responses: list[llm.ChatContext] = []
        """The conversation at each response asked for."""
        self.instructions = ""
        self._tools = llm.ToolContext.empty()

    @property
    def chat_ctx(self) -> llm.ChatContext:
        return llm.ChatContext([i.model_copy() for i in self.items])

    @property
    def tools(self) -> llm.ToolContext:
        return self._tools.copy()

    async def update_instructions(self, instructions: str) -> None:
        self.instructions = instructions

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        kinds = ("message", "function_call", "function_call_output")
        self.items = [_as_server_item(i) for i in chat_ctx.items if i.type in kinds]

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        self._tools = llm.ToolContext(tools)

    def update_options(self, *, tool_choice: Any = None) -> None:
        pass

    def push_audio(self, frame: Any) -> None:
        pass

    def push_video(self, frame: Any) -> None:
        pass

    def commit_audio(self) -> None:
        pass

    def clear_audio(self) -> None:
        pass

    def interrupt(self) -> None:
        pass

    def truncate(self, **_: Any) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def _add(self, item: llm.ChatItem, *, report: bool) -> None:
        prev = self.items[-1].id if self.items else None
        self.items.append(item)
        if report:
            self.emit(
                "remote_item_added", llm.RemoteItemAddedEvent(previous_item_id=prev, item=item)
            )

    def generate_reply(
        self, *, instructions: Any = None, tool_choice: Any = None, tools: Any = None
    ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        said = instructions if isinstance(instructions, str) else None
        self.responses.append(self.chat_ctx)
        text, calls = self.model.script(self.chat_ctx, said)
        rid = uuid.uuid4().hex[:8]
        client_calls: list[llm.FunctionCall] = []
        for name, args in calls:
            call = llm.FunctionCall(
                call_id=f"call_{uuid.uuid4().hex[:8]}", name=name, arguments=json.dumps(args)
            )
            run = self.model.backend_tools.get(name)
            if run is None:
                self._add(call, report=False)  # the client runs it, and reports the output
                client_calls.append(call)
                continue
            self._add(call, report=True)
            out = llm.FunctionCallOutput(
                call_id=call.call_id, output=run(call.arguments), is_error=False
            )
            self._add(out, report=True)
        msg_id = f"msg_{rid}"
        if text:
            self._add(llm.ChatMessage(id=msg_id, role="assistant", content=[text]), report=False)

        async def texts() -> AsyncIterator[str]:
            if text:
                yield text

        async def no_audio() -> AsyncIterator[Any]:
            return
            yield

        async def messages() -> AsyncIterator[llm.MessageGeneration]:
            modalities: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            modalities.set_result(["text"])
            yield llm.MessageGeneration(
                message_id=msg_id,
                text_stream=texts(),
                audio_stream=no_audio(),
                modalities=modalities,
            )

        async def functions() -> AsyncIterator[llm.FunctionCall]:
            for call in client_calls:
                yield call

        fut: asyncio.Future[llm.GenerationCreatedEvent] = asyncio.get_running_loop().create_future()
        fut.set_result(
            llm.GenerationCreatedEvent(
                message_stream=messages(),
                function_stream=functions(),
                user_initiated=True,
                response_id=rid,
            )
        )
        return fut


class BookingBackend:
    """The service behind the tests' tools: counts its calls and records the idempotency key
    each was given (``bookings``: ``(arguments, key)``). ``booking_delay`` / ``note_delay``:
    seconds a call takes."""

    def __init__(self, booking_delay: float = 2.0, note_delay: float = 0.5) -> None:
        self.booking_delay = booking_delay
        self.note_delay = note_delay
        self.bookings: list[tuple[dict[str, Any], str | None]] = []
        self.notes: list[str] = []

    async def create_reservation(self, date: str, party: int) -> str:
        call = current_tool_call()
        args = {"date": date, "party": party}
        self.bookings.append((args, call.idempotency_key if call else None))
        await asyncio.sleep(self.booking_delay)
        return json.dumps({"reservation": f"R-{len(self.bookings)}", **args})

    async def save_note(self, text: str) -> str:
        await asyncio.sleep(self.note_delay)
        self.notes.append(text)
        return "saved"


class BookingTools:
    """Tools on a :class:`BookingBackend` (``self.backend``), to mix into an ``Agent`` subclass:
    a booking that must never run twice unchecked, and an idempotent note."""

    backend: BookingBackend

    @function_tool
    @journaled("never")
    async def create_reservation(self, date: str, party: int) -> str:
        """Book a table."""
        return await self.backend.create_reservation(date, party)

    @function_tool
    @journaled("if_idempotent")
    async def save_note(self, text: str) -> str:
        """Save a note about the caller."""
        return await self.backend.save_note(text)


# ---------------------------------------------------------------------------------------------
# baton stand-ins


class StandInBaton:
    """A room joined as baton that records the control messages it gets and sends its own."""

    def __init__(self, net: Net, identity: str) -> None:
        self.room = baton_room(net, identity)
        self.sent: list[tuple[float, str, dict[str, Any]]] = []
        self.heartbeats: list[tuple[str, dict[str, Any]]] = []
        """(sender, heartbeat) per heartbeat received, kept apart from the other messages."""
        self._n = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.room.on("data_received", self._on_packet)
        self.checkpoints: dict[str, MergedState] = {}
        """Merged checkpoints per agent name, merged as baton merges them."""
        self.checkpoint_log: list[tuple[str, dict[str, Any]]] = []
        """(sender, checkpoint) per checkpoint received."""
        transport_for(self.room).intercept = self._on_bundle

    def _on_bundle(self, d: BundleReceived) -> bool:
        """Checkpoints are merged, not kept as bundles (docs/protocol.md section 4.10)."""
        if json.loads(d.meta or "{}").get("purpose") != "checkpoint":
            return False
        doc = json.loads(d.payload)
        self.checkpoint_log.append((d.sender, doc))
        name = str(doc.get("agent"))
        self.checkpoints[name] = merge_checkpoints(
            self.checkpoints.get(name), d.payload, sender=d.sender
        )
        return True

    def send(self, to: str, type_: str, **kw: Any) -> None:
        self._n += 1
        msg = {"v": 1, "type": type_, "id": f"b-{self._n}", **kw}
        self.sent.append((asyncio.get_running_loop().time(), to, msg))
        task = asyncio.ensure_future(
            self.room.local_participant.publish_data(
                json.dumps(msg).encode(), destination_identities=[to], topic=CONTROL_TOPIC
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def sent_types(self, to: str) -> list[str]:
        return [m["type"] for _, t, m in self.sent if t == to]

    def _on_packet(self, pkt: Packet) -> None:
        if pkt.topic == CONTROL_TOPIC:
            msg = json.loads(pkt.data)
            if msg.get("type") == "heartbeat":  # never answered (docs/protocol.md)
                self.heartbeats.append((pkt.participant.identity, msg))
                return
            self.on_control(pkt.participant.identity, msg)

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        raise NotImplementedError


class FakeBaton(StandInBaton):
    """Answers like baton's arbiter for one handoff triage -> billing."""

    def __init__(self, net: Net) -> None:
        super().__init__(net, "baton-1")
        self.got: list[tuple[str, dict[str, Any]]] = []
        transport_for(self.room)
        self.refuse: str | None = None
        self.silent = False
        """Leave handoff requests unanswered (the adapter's request times out)."""

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        self.got.append((who, msg))
        if msg["type"] == "hello" and msg["agent_name"] == "triage":
            self.send(who, "activate", cause="start")
        elif msg["type"] == "hello":
            self.send(
                who,
                "prepare",
                handoff="h-1",
                source="triage",
                reason="disputed charge",
                bundle=True,
            )
        elif msg["type"] == "handoff" and self.silent:
            pass
        elif msg["type"] == "handoff" and self.refuse:
            self.send(who, "handoff_refused", re=msg["id"], reason=self.refuse)
        elif msg["type"] == "handoff":
            self.send(who, "handoff_accepted", re=msg["id"], handoff="h-1", target=msg["target"])
            self.send(who, "deactivate", handoff="h-1", reason="handoff")

    def types_from(self, who: str) -> list[str]:
        return [m["type"] for w, m in self.got if w == who]


class ArbiterBaton(StandInBaton):
    """baton's answers to ``hello`` (crates/baton-floor/src/arbiter.rs ``on_hello``): it hears a
    ``hello`` only from a participant it knows (from ``knows_at`` on; before that the hello is a
    security event and gets no reply); the floor holder (``holder``) gets ``activate`` with
    ``cause: "start"`` for every hello, anyone else ``deactivate(standby)``. Each answer leaves
    ``answer_delay`` seconds after the hello arrived."""

    def __init__(
        self,
        net: Net,
        *,
        holder: str = "triage",
        knows_at: float = 0.0,
        answer_delay: float = 0.0,
    ) -> None:
        super().__init__(net, "baton")
        self.holder = holder
        self.knows_at = knows_at
        self.answer_delay = answer_delay
        self.hellos: list[tuple[float, bool]] = []
        """(time, heard) per hello received."""

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        if msg["type"] != "hello":
            return
        now = asyncio.get_running_loop().time()
        heard = now >= self.knows_at
        self.hellos.append((now, heard))
        if not heard:
            return
        if msg["agent_name"] == self.holder:
            answer: tuple[str, dict[str, Any]] = ("activate", {"cause": "start"})
        else:
            answer = ("deactivate", {"reason": "standby"})
        asyncio.get_running_loop().call_later(
            self.answer_delay, lambda: self.send(who, answer[0], **answer[1])
        )
