"""Real LiveKit SDK participants (the `livekit` package, libwebrtc inside) used as test peers."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc

from harness import LiveKitServer, token


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
