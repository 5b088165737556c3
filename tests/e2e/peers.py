"""Real LiveKit SDK participants (the `livekit` package, libwebrtc inside) used as test peers."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from harness import LiveKitServer, token
from livekit import rtc


@dataclass
class Received:
    sender: str
    topic: str
    data: bytes


@dataclass
class Peer:
    """A connected participant that records every data packet it receives."""

    room: rtc.Room
    identity: str
    inbox: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)

    @classmethod
    async def join(cls, server: LiveKitServer, room_name: str, identity: str, **token_args: object) -> Peer:
        room = rtc.Room()
        peer = cls(room, identity)

        def on_data(pkt: rtc.DataPacket) -> None:
            sender = pkt.participant.identity if pkt.participant else ""
            peer.inbox.put_nowait(Received(sender, pkt.topic or "", bytes(pkt.data)))

        room.on("data_received", on_data)
        await room.connect(server.url, token(identity, room_name, **token_args))  # type: ignore[arg-type]
        return peer

    async def send(self, topic: str, data: bytes, to: list[str]) -> None:
        await self.room.local_participant.publish_data(data, reliable=True, destination_identities=to, topic=topic)

    async def next(self, topic: str, timeout: float = 5.0) -> Received:
        """The next packet on `topic` (others are dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{self.identity}: nothing on {topic} within {timeout}s")
            msg = await asyncio.wait_for(self.inbox.get(), left)
            if msg.topic == topic:
                return msg

    async def ping(self, to: str = "baton", timeout: float = 5.0) -> tuple[dict[str, object], float]:
        """Sends a baton `ping`; returns the `pong` and the round trip in seconds."""
        pid = f"p-{uuid.uuid4().hex[:12]}"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await self.send("baton.control", json.dumps({"v": 1, "type": "ping", "id": pid}).encode(), [to])
        while True:
            msg = await self.next("baton.control", timeout)
            body = json.loads(msg.data)
            if body.get("re") == pid:
                return body, loop.time() - t0

    async def wait_participant(self, identity: str, timeout: float = 10.0) -> rtc.RemoteParticipant:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            p = self.room.remote_participants.get(identity)
            if p is not None:
                return p
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{identity} did not join within {timeout}s")

    async def close(self) -> None:
        await self.room.disconnect()


def rms_dbfs(samples: np.ndarray) -> float:
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) / 32768.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


async def record(track: rtc.Track, seconds: float) -> np.ndarray:
    """Decoded audio of a subscribed track, 48 kHz mono int16, as the SDK's receiver plays it."""
    stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
    chunks: list[np.ndarray] = []
    got = 0
    try:
        async for ev in stream:
            frame = np.frombuffer(ev.frame.data, dtype=np.int16).copy()
            chunks.append(frame)
            got += frame.size
            if got >= seconds * 48000:
                break
    finally:
        await stream.aclose()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def window_levels(pcm: np.ndarray, ms: int = 20) -> list[float]:
    n = 48 * ms
    return [rms_dbfs(pcm[i : i + n]) for i in range(0, pcm.size - n + 1, n)]


FILLER_TRACK = "baton-filler"
"""The name of a filler track: baton's own, and the one a handoff source plays its own filler on
(docs/protocol.md, "The source's filler")."""

SOURCE_FILLER = "/filler"
"""The label suffix of a source's filler track: ``agent-triage/filler``."""


def track_label(p: rtc.RemoteParticipant, track_name: str) -> str:
    """Whose sound a track is, for the caller's analysis: the participant's identity, except a
    source's own filler track (named ``baton-filler``, published by an agent that is not baton,
    the participant with ``baton.role = coordinator``), labelled ``<identity>/filler`` so an
    agent's filler never counts as the agent speaking."""
    is_baton = p.attributes.get("baton.role") == "coordinator"
    if track_name == FILLER_TRACK and not is_baton:
        return p.identity + SOURCE_FILLER
    return p.identity


def is_filler(label: str, baton: str = "baton") -> bool:
    """Whether a :class:`Recorder` label is filler: baton's track or a source's own."""
    return label == baton or label.endswith(SOURCE_FILLER)


@dataclass
class Recorder:
    """Records every audio track the caller subscribes to, separately, with arrival times.

    Frames are 10 ms at 48 kHz; their arrival time at the caller is when the receiver plays them,
    so levels of different tracks can be lined up on one clock.

    ``levels`` is keyed by **track** sid (``owners`` maps each to its participant's identity): a
    participant that publishes again under the same identity (a rejoin, a server restart) has
    two tracks, possibly playing at once for a while, and one series of both would hold 200
    frames a second, which :func:`played_at` would push back in time by as much as they
    overlapped (issue 13: a filler placed 13 s early). :meth:`played` and :meth:`arrived` give
    the series per identity, each track placed on its own first.

    A track's recording stops when it is unsubscribed: the subscriber's receiver can be reused
    for the next track, and a stream still reading it heard the next agent under the old
    identity (a killed triage "audible" 8 s after its death in `./scripts/demo --crash`).
    """

    room: rtc.Room
    levels: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _by_sid: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.room.on("track_subscribed", self._on_track)
        self.room.on("track_unsubscribed", self._on_gone)

    def _on_track(self, track: rtc.Track, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self.owners[track.sid] = track_label(p, pub.name)
            task = asyncio.ensure_future(self._record(track.sid, track))
            self._tasks.append(task)
            self._by_sid[track.sid] = task

    def _on_gone(self, track: rtc.Track, _pub: rtc.RemoteTrackPublication, _p: rtc.RemoteParticipant) -> None:
        task = self._by_sid.pop(track.sid, None)
        if task is not None:
            task.cancel()

    async def _record(self, sid: str, track: rtc.Track) -> None:
        out = self.levels.setdefault(sid, [])
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
        loop = asyncio.get_running_loop()
        try:
            async for ev in stream:
                pcm = np.frombuffer(ev.frame.data, dtype=np.int16)
                out.append((loop.time(), rms_dbfs(pcm)))
        finally:
            await stream.aclose()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def played(self) -> dict[str, list[tuple[float, float]]]:
        """The levels on the playout clock (see :func:`played_at`, applied per track), per
        participant identity, in time order."""
        return self._by_identity(played_at)

    def arrived(self) -> dict[str, list[tuple[float, float]]]:
        """The levels at their arrival times, per participant identity, in time order."""
        return self._by_identity(list)

    def _by_identity(
        self, place: Callable[[list[tuple[float, float]]], list[tuple[float, float]]]
    ) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for sid, series in self.levels.items():
            out.setdefault(self.owners.get(sid, sid), []).extend(place(series))
        for series in out.values():
            series.sort(key=lambda x: x[0])
        return out


def played_at(series: list[tuple[float, float]], frame: float = 0.01) -> list[tuple[float, float]]:
    """Frame times on the receiver's playout clock instead of the Python loop's arrival clock.

    The receiver renders one 10 ms frame every 10 ms (concealment or silence when packets are
    missing), but a busy event loop takes them late and in bursts. Walking backwards, each frame
    was played no later than it arrived and at least one frame before the next one, so a burst
    is spread back over the stall that caused it. A real gap in rendering is not a burst and
    stays a gap."""
    out = list(series)
    for i in range(len(out) - 2, -1, -1):
        t, level = out[i]
        out[i] = (min(t, out[i + 1][0] - frame), level)
    return out


def audible_grid(
    levels: dict[str, list[tuple[float, float]]], start: float, end: float, threshold: float = -55.0, step: float = 0.01
) -> list[set[str]]:
    """For each `step` slot between start and end, the set of tracks audible (above threshold)."""
    slots = int((end - start) / step)
    grid: list[set[str]] = [set() for _ in range(slots)]
    for who, series in levels.items():
        for t, level in series:
            i = int((t - start) / step)
            if 0 <= i < slots and level > threshold:
                grid[i].add(who)
    return grid


def longest_run(grid: list[set[str]], pred: object, step: float = 0.01) -> float:
    best = cur = 0
    for cell in grid:
        cur = cur + 1 if pred(cell) else 0  # type: ignore[operator]
        best = max(best, cur)
    return best * step


def runs(grid: list[set[str]], pred: object, min_len: int = 4) -> list[tuple[int, int]]:
    """(start slot, length) of every run of at least `min_len` slots satisfying `pred`."""
    out: list[tuple[int, int]] = []
    start = None
    for i, cell in enumerate([*grid, None]):
        ok = cell is not None and pred(cell)  # type: ignore[operator]
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start >= min_len:
                out.append((start, i - start))
            start = None
    return out
