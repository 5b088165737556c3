"""asyncio glue against an in-memory stand-in for livekit.rtc.Room (no server needed).

The fake mimics the parts of the SDK the glue uses: ``Room.on/off`` callbacks,
``local_participant.publish_data(payload, reliable=, destination_identities=, topic=)``
(async), and ``data_received`` packets with ``.data``, ``.topic`` and ``.participant.identity``.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest

from lk_baton import frames as fr
from lk_baton.transfer import TOPIC, TransferError, receive_bundle, send_bundle, transport_for


@dataclass
class Participant:
    identity: str


@dataclass
class Packet:
    data: bytes
    topic: str
    participant: Participant


class Net:
    def __init__(self) -> None:
        self.rooms: dict[str, FakeRoom] = {}
        self.down = False
        self.log: list[tuple[str, str, int, list[str]]] = []


class LocalParticipant:
    def __init__(self, room: FakeRoom) -> None:
        self.room = room

    async def publish_data(
        self,
        payload: bytes,
        *,
        reliable: bool = True,
        destination_identities: list[str] | None = None,
        topic: str = "",
    ) -> None:
        assert reliable, "transfer frames must go on the reliable channel"
        dests = list(destination_identities or [])
        assert len(dests) == 1, "addressed to exactly one participant, never broadcast"
        net = self.room.net
        net.log.append((self.room.identity, dests[0], payload[2], dests))
        if net.down:
            return
        target = net.rooms.get(dests[0])
        if target is None:
            return
        pkt = Packet(bytes(payload), topic, Participant(self.room.identity))
        asyncio.get_running_loop().call_later(0.002, target.emit, "data_received", pkt)


class FakeRoom:
    def __init__(self, net: Net, identity: str) -> None:
        self.net = net
        self.identity = identity
        self.local_participant = LocalParticipant(self)
        self._handlers: dict[str, list[Any]] = defaultdict(list)
        net.rooms[identity] = self

    def on(self, event: str, callback: Any) -> Any:
        self._handlers[event].append(callback)
        return callback

    def off(self, event: str, callback: Any) -> None:
        self._handlers[event].remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for cb in list(self._handlers[event]):
            cb(*args)


def test_send_and_receive_bundle() -> None:
    async def main() -> None:
        net = Net()
        a, b = FakeRoom(net, "agent-a"), FakeRoom(net, "agent-b")
        transport_for(b)  # start listening before anything is sent
        payload = json.dumps({"chat": {"items": [{"n": i} for i in range(3000)]}}).encode()
        recv = asyncio.create_task(receive_bundle(b, from_identity="agent-a", timeout=5))
        tid = await asyncio.wait_for(
            send_bundle(a, "agent-b", payload, {"purpose": "handoff"}, compress=True), 5
        )
        got, meta = await recv
        assert got == payload
        assert json.loads(meta) == {"purpose": "handoff"}
        assert isinstance(tid, int) and tid > 0
        assert all(t in ("agent-a", "agent-b") for _, t, _, _ in net.log)

    asyncio.run(main())


def test_reconnect_resumes_without_restart() -> None:
    async def main() -> None:
        net = Net()
        a, b = FakeRoom(net, "agent-a"), FakeRoom(net, "agent-b")
        transport_for(b)
        payload = bytes(range(256)) * 2000  # 512 KB, 35 chunks
        send = asyncio.create_task(send_bundle(a, "agent-b", payload))
        await asyncio.sleep(0.003)
        net.down = True  # packets published now are lost
        await asyncio.sleep(0.02)
        net.down = False
        a.emit("reconnected")
        b.emit("reconnected")
        await asyncio.wait_for(send, 5)
        got, _ = await receive_bundle(b, timeout=1)
        assert got == payload
        kinds = [k for src, _, k, _ in net.log if src == "agent-a"]
        assert fr.Kind.RESUME in kinds, "the reconnect went through the resume path"
        assert kinds.count(fr.Kind.OPEN) <= 2, "no restart from scratch"

    asyncio.run(main())


def test_send_to_absent_participant_fails_with_timed_out() -> None:
    async def main() -> None:
        net = Net()
        a = FakeRoom(net, "agent-a")
        t = transport_for(a)
        with pytest.raises(TransferError) as e:
            await t.send(
                "nobody", b"x" * 1000, cfg=__import__("lk_baton").SenderConfig(deadline=0.3)
            )
        assert e.value.name == "timed_out"

    asyncio.run(main())


def test_ignores_other_topics() -> None:
    async def main() -> None:
        net = Net()
        b = FakeRoom(net, "agent-b")
        t = transport_for(b)
        b.emit("data_received", Packet(b"\xba\x01junk", "baton.control", Participant("x")))
        b.emit("data_received", Packet(b"junk", TOPIC, Participant("x")))
        assert len(t.rejected) == 1

    asyncio.run(main())
