"""A protocol-speaking test agent: a real `livekit` participant that "speaks" a tone.

It says `hello` to baton, plays its tone only while it holds the floor (between `activate` and
`deactivate`, plus a short sentence tail), reports `quiet`, answers `prepare` with `ready`, and can
ask for a handoff. The caller's recording then shows exactly who was audible when.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc
from lk_baton.transfer import receive_bundle, send_bundle, transport_for

SAMPLE_RATE = 48000
FRAME_MS = 10


@dataclass
class ToneAgent:
    room: rtc.Room
    agent_name: str
    freq: float
    baton: str = "baton"
    sentence_tail: float = 0.15
    ignore_deactivate: bool = False
    never_ready: bool = False
    # Seconds between `prepare` (and the bundle) and `ready`: a slow target, so the caller hears
    # filler.
    ready_delay: float = 0.0
    speaking: bool = False
    received: list[dict[str, object]] = field(default_factory=list)
    bundle: bytes | None = None
    _phase: float = 0.0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        transport_for(self.room)  # capture bundles from the moment we are in the room
        self.source = rtc.AudioSource(SAMPLE_RATE, 1, queue_size_ms=40)
        track = rtc.LocalAudioTrack.create_audio_track(f"{self.agent_name}-voice", self.source)
        opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(track, opts)
        self.room.on("data_received", self._on_data)
        self._spawn(self._play())
        await self.send({"type": "hello", "agent_name": self.agent_name, "role": self.agent_name})

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, body: dict[str, object]) -> None:
        msg = {"v": 1, "id": f"{self.agent_name}-{uuid.uuid4().hex[:8]}", **body}
        await self.room.local_participant.publish_data(
            json.dumps(msg).encode(), reliable=True, destination_identities=[self.baton], topic="baton.control"
        )

    async def handoff(self, target: str, reason: str, bundle: bytes | None = None) -> None:
        body: dict[str, object] = {"type": "handoff", "target": target, "reason": reason}
        if bundle is not None:
            body["bundle_follows"] = True
        await self.send(body)
        if bundle is not None:
            # A small window keeps our own `quiet` from queueing behind the whole bundle.
            meta = {"from": self.agent_name, "to_agent": target}
            await send_bundle(self.room, self.baton, bundle, meta, window=4)

    def _on_data(self, pkt: rtc.DataPacket) -> None:
        if pkt.topic != "baton.control" or pkt.participant is None or pkt.participant.identity != self.baton:
            return
        msg = json.loads(pkt.data)
        self.received.append(msg)
        kind = msg.get("type")
        if kind == "activate":
            self.speaking = True
        elif kind == "deactivate" and not self.ignore_deactivate:
            self._spawn(self._finish_sentence(msg.get("handoff")))
        elif kind == "prepare" and not self.never_ready:
            self._spawn(self._prepare(msg))

    async def _prepare(self, msg: dict[str, object]) -> None:
        if msg.get("bundle"):
            self.bundle, _meta = await receive_bundle(self.room, self.baton, timeout=30)
        await asyncio.sleep(self.ready_delay)
        await self.send({"type": "ready", "handoff": msg["handoff"]})

    async def _finish_sentence(self, handoff: object) -> None:
        await asyncio.sleep(self.sentence_tail)
        self.speaking = False
        # "Quiet" means played out: let what is already queued in the audio source drain.
        await asyncio.sleep(0.06)
        body: dict[str, object] = {"type": "quiet"}
        if handoff:
            body["handoff"] = handoff
        await self.send(body)

    async def _announce(self, speaking: bool) -> None:
        # livekit-agents publishes its state in this attribute; baton, which subscribes to no
        # audio and so gets no speaker updates, learns from it that the agent is talking.
        state = "speaking" if speaking else "listening"
        await self.room.local_participant.set_attributes({"lk.agent.state": state})

    async def _play(self) -> None:
        n = SAMPLE_RATE * FRAME_MS // 1000
        step = 2 * math.pi * self.freq / SAMPLE_RATE
        announced = False
        while True:
            if self.speaking != announced:
                announced = self.speaking
                self._spawn(self._announce(announced))
            if self.speaking:
                t = self._phase + step * np.arange(n)
                self._phase = float((self._phase + step * n) % (2 * math.pi))
                pcm = (np.sin(t) * 0.25 * 32767).astype(np.int16)
            else:
                pcm = np.zeros(n, dtype=np.int16)
            frame = rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, n)
            await self.source.capture_frame(frame)

    def got(self, kind: str) -> list[dict[str, object]]:
        return [m for m in self.received if m.get("type") == kind]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.room.disconnect()
