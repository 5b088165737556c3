"""asyncio glue against the in-memory stand-in for livekit.rtc.Room in fakes.py (no server
needed), with 2 ms from publish to delivery."""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes import FakeRoom, Net, Packet, Participant

from lk_baton import frames as fr
from lk_baton.transfer import TOPIC, TransferError, receive_bundle, send_bundle, transport_for


def test_send_and_receive_bundle() -> None:
    async def main() -> None:
        net = Net(delay=0.002)
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
        assert all(e.dest in ("agent-a", "agent-b") for e in net.log)

    asyncio.run(main())


def test_reconnect_resumes_without_restart() -> None:
    async def main() -> None:
        net = Net(delay=0.002)
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
        kinds = [e.payload[2] for e in net.log if e.src == "agent-a"]
        assert fr.Kind.RESUME in kinds, "the reconnect went through the resume path"
        assert kinds.count(fr.Kind.OPEN) <= 2, "no restart from scratch"

    asyncio.run(main())


def test_send_to_absent_participant_fails_with_timed_out() -> None:
    async def main() -> None:
        net = Net(delay=0.002)
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
        net = Net(delay=0.002)
        b = FakeRoom(net, "agent-b")
        t = transport_for(b)
        b.emit("data_received", Packet(b"\xba\x01junk", "baton.control", Participant("x")))
        b.emit("data_received", Packet(b"junk", TOPIC, Participant("x")))
        assert len(t.rejected) == 1

    asyncio.run(main())


def test_gate_refuses_transfers_from_others_without_buffering() -> None:
    """With ``accept_from`` set, an OPEN from anyone else is answered ``not_authorized`` (the
    sender fails at once) and nothing reaches the engine; the accepted peer still delivers."""

    async def main() -> None:
        net = Net(delay=0.002)
        agent = FakeRoom(net, "agent")
        caller, friend = FakeRoom(net, "caller"), FakeRoom(net, "friend")
        t = transport_for(agent)
        t.accept_from = lambda p: p.identity == "friend"
        with pytest.raises(TransferError) as e:
            await asyncio.wait_for(send_bundle(caller, "agent", b"x" * 100_000), 5)
        assert e.value.name == "not_authorized" and e.value.remote
        assert t.endpoint.receivers.active == 0 and t.endpoint.receivers.buffered == 0
        assert {r.error.name for r in t.rejected} == {"not_authorized"}
        answered = [fr.decode(p.payload) for p in net.log if p.src == "agent"]
        assert [type(f).__name__ for f in answered] == ["Error"], "only the OPEN was answered"
        await asyncio.wait_for(send_bundle(friend, "agent", b"ok"), 5)
        got, _ = await receive_bundle(agent, timeout=1)
        assert got == b"ok"

    asyncio.run(main())


def test_unclaimed_bundles_are_bounded_oldest_dropped_first() -> None:
    async def main() -> None:
        net = Net(delay=0.002)
        a, b = FakeRoom(net, "agent-a"), FakeRoom(net, "agent-b")
        t = transport_for(b)
        t.max_unclaimed_bytes = 25_000
        for n in range(4):
            await asyncio.wait_for(send_bundle(a, "agent-b", bytes([n]) * 10_000), 5)
        assert [d.payload[0] for d in t._inbox] == [2, 3], "the two newest fit 25,000 bytes"
        got, _ = await receive_bundle(b, timeout=1)
        assert got == bytes([2]) * 10_000
        assert t._inbox_bytes == 10_000
        # one bundle over the cap alone is still kept: the newest is never dropped
        t.max_unclaimed_bytes = 1
        await asyncio.wait_for(send_bundle(a, "agent-b", b"z" * 5000), 5)
        assert [d.payload[:1] for d in t._inbox] == [b"z"]

    asyncio.run(main())


def test_a_disconnected_room_forgets_its_transport() -> None:
    async def main() -> None:
        net = Net(delay=0.002)
        room = FakeRoom(net, "agent-a")
        t = transport_for(room)
        assert transport_for(room) is t
        room.emit("disconnected")
        assert transport_for(room) is not t
        assert t._on_data not in room._handlers["data_received"]

    asyncio.run(main())
