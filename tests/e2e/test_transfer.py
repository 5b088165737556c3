"""Context transfer through baton against a real LiveKit server (docs/protocol.md (section 4)).

Agents are real `livekit` SDK participants with token kind "agent" using the `lk_baton`
adapter (`send_bundle` / `receive_bundle`). A bundle whose meta names `"to": <identity>` is
stored by baton and delivered to that agent once it is in the room (leg 1: agent -> baton,
leg 2: baton -> agent, each acknowledged end to end).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from harness import Baton, LiveKitServer, baton_join, run, token, wait_until
from livekit import rtc
from lk_baton import frames as fr
from lk_baton.transfer import TransferError, receive_bundle, send_bundle, transport_for
from peers import Peer

MIB = 1024 * 1024
NOT_AUTHORIZED = fr.ErrorCode.NOT_AUTHORIZED  # 13, docs/protocol.md section 4.6


def room_name() -> str:
    return f"x-{uuid.uuid4().hex[:8]}"


async def agent(server: LiveKitServer, room: str, identity: str, kind: str = "agent") -> rtc.Room:
    """A connected SDK participant whose transfer transport listens from the start."""
    r = rtc.Room()
    transport_for(r)
    await r.connect(server.url, token(identity, room, kind=kind))
    return r


async def sees(room: rtc.Room, identity: str, timeout: float = 10.0) -> None:
    await wait_until(lambda: identity in room.remote_participants, timeout, f"{identity} never joined")


async def known_to_baton(baton: Baton, identity: str, timeout: float = 10.0) -> None:
    """baton drops transfer frames from identities its roster does not know yet (the sender's
    RTO would resend them); waiting for its join log keeps the tests' timing exact."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None,
        lambda: baton.wait_for(rf"participant joined.*{re.escape(identity)}|{re.escape(identity)}.*joined", timeout),
    )


async def agents_a_and_b(server: LiveKitServer, baton: Baton, room: str) -> tuple[rtc.Room, rtc.Room]:
    """Agents `agent-a` and `agent-b` in `room`, both known to baton."""
    a = await agent(server, room, "agent-a")
    b = await agent(server, room, "agent-b")
    await known_to_baton(baton, "agent-a")
    await known_to_baton(baton, "agent-b")
    return a, b


def delivered_once(baton: Baton) -> dict[str, str]:
    """The fields (`key=value`) of baton's one `bundle delivered` log line; fails unless there is
    exactly one."""
    lines = [dict(re.findall(r"(\w+)=(\S+)", ln)) for ln in baton.text().splitlines() if "bundle delivered" in ln]
    assert len(lines) == 1, baton.text()
    return lines[0]


def count_frames(room: rtc.Room, kind: int) -> list[int]:
    """Counts `baton.xfer` frames of `kind` arriving at `room` (a one-element list, mutated)."""
    n = [0]

    def on_data(pkt: rtc.DataPacket) -> None:
        if pkt.topic == "baton.xfer" and len(pkt.data) > 2 and pkt.data[2] == kind:
            n[0] += 1

    room.on("data_received", on_data)
    return n


def relay_scenario(server: LiveKitServer, body: Callable[[Baton, str], Awaitable[None]], timeout: float = 90) -> Baton:
    room = room_name()
    baton = baton_join(server, room)
    try:
        baton.wait_for("joined: data channel open")
        run(body(baton, room), timeout)
    finally:
        assert baton.stop() == 0, baton.text()
    return baton


def test_5_mib_bundle_from_agent_through_baton_to_agent_byte_exact(server: LiveKitServer) -> None:
    payload = os.urandom(5 * MIB)
    meta = {"to": "agent-b", "content_type": "application/vnd.baton.bundle+json", "purpose": "handoff"}

    async def body(baton: Baton, room: str) -> None:
        a, b = await agents_a_and_b(server, baton, room)
        await sees(a, "baton")
        got = asyncio.ensure_future(receive_bundle(b, from_identity="baton", timeout=60))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tid = await send_bundle(a, "baton", payload, meta, deadline=60)
        stored = loop.time() - t0
        data, got_meta = await got
        total = loop.time() - t0
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
        assert data == payload
        assert '"to":"agent-b"' in got_meta, "meta is forwarded unchanged"
        assert isinstance(tid, int)
        print(f"5 MiB: stored after {stored * 1000:.0f} ms, delivered after {total * 1000:.0f} ms")
        await a.disconnect()
        await b.disconnect()

    baton = relay_scenario(server, body)
    delivered = delivered_once(baton)
    assert delivered["to"] == "agent-b"
    assert int(delivered["bytes_sent"]) == 5 * MIB, "no loss on loopback: every chunk sent once"
    # B was in the room when A's OPEN came, so baton forwarded while the bundle was arriving
    # (docs/protocol.md 4.10, cut-through) instead of after storing it.
    assert "delivering bundle while it arrives (cut-through)" in baton.text(), baton.text()


def test_receiver_connection_dropped_mid_transfer_resumes(server: LiveKitServer) -> None:
    payload = os.urandom(5 * MIB)
    drop_after = 150  # DATA frames (~2.1 MiB) before B's connection is torn down
    held_at_drop: list[int] = []

    async def body(baton: Baton, room: str) -> None:
        a, b = await agents_a_and_b(server, baton, room)
        data_frames = count_frames(b, int(fr.Kind.DATA))
        events: list[str] = []
        b.on("reconnecting", lambda *_: events.append("reconnecting"))
        b.on("reconnected", lambda *_: events.append("reconnected"))
        got = asyncio.ensure_future(receive_bundle(b, from_identity="baton", timeout=60))
        sent = asyncio.ensure_future(send_bundle(a, "baton", payload, {"to": "agent-b"}, deadline=60))
        await wait_until(lambda: data_frames[0] >= drop_after, 30, "delivery never started")
        at_drop = data_frames[0]
        held_at_drop.append(at_drop * fr.MAX_CHUNK_SIZE)
        # A full reconnect: the SDK tears down its peer connections and joins again with the
        # same identity; whatever was in flight to B is lost.
        await b.simulate_scenario(rtc.SimulateScenarioKind.SIMULATE_FULL_RECONNECT)
        await sent
        data, _ = await got
        assert data == payload
        assert "reconnected" in events, f"B never reconnected: {events}"
        print(f"dropped after {at_drop} DATA frames; B saw {data_frames[0]} DATA frames in total")
        await a.disconnect()
        await b.disconnect()

    baton = relay_scenario(server, body)
    bytes_sent = int(delivered_once(baton)["bytes_sent"])
    print(f"baton sent {bytes_sent} chunk bytes for a {5 * MIB}-byte bundle")
    # A restart would resend the ~2.1 MiB B held before the drop; a resume resends at most what
    # was in flight (a window of 32 chunks, ~0.46 MiB), a few times over at worst.
    assert bytes_sent < 5 * MIB + int(1.5 * MIB), f"resent {bytes_sent - 5 * MIB} bytes: restarted?"
    assert bytes_sent - 5 * MIB < held_at_drop[0], "resent more than B held at the drop: a restart, not a resume"


def test_oversized_bundle_refused_with_too_large(server: LiveKitServer) -> None:
    async def body(baton: Baton, room: str) -> None:
        a = await agent(server, room, "agent-a")
        await known_to_baton(baton, "agent-a")
        with pytest.raises(TransferError) as e:
            await send_bundle(a, "baton", b"\0" * (32 * MIB + 1), {"to": "agent-b"}, deadline=20)
        assert e.value.code == fr.ErrorCode.TOO_LARGE and e.value.name == "too_large", str(e.value)
        assert e.value.remote
        # Refused at the OPEN, before anything was buffered: a normal bundle still goes through.
        small = os.urandom(MIB)
        await send_bundle(a, "baton", small, {"to": "nobody-yet"}, deadline=20)
        await a.disconnect()

    relay_scenario(server, body, timeout=60)


def test_abuse_is_rejected_with_documented_errors_while_a_transfer_continues(server: LiveKitServer) -> None:
    """Corrupted frames, a non-agent sender, an ACK for an unknown transfer and a broken DATA
    frame, all while a 3 MiB bundle flows from A through baton to B: each is answered as
    docs/protocol.md (section 4) says, nothing crashes, the bundle arrives intact."""
    payload = os.urandom(3 * MIB)

    async def body(baton: Baton, room: str) -> None:
        a, b = await agents_a_and_b(server, baton, room)
        caller = await Peer.join(server, room, "caller")  # kind standard: the caller's client
        await known_to_baton(baton, "caller")
        inbox: list[bytes] = []
        got = asyncio.ensure_future(receive_bundle(b, from_identity="baton", timeout=60))
        sent = asyncio.ensure_future(send_bundle(a, "baton", payload, {"to": "agent-b"}, deadline=60))

        # 1. The caller's client (not an agent) tries to send a bundle: refused with
        #    not_authorized (13), nothing is buffered or delivered.
        caller_room: Any = caller.room
        transport_for(caller_room)
        with pytest.raises(TransferError) as e:
            await send_bundle(caller_room, "baton", os.urandom(100_000), {"to": "agent-b"}, deadline=10)
        assert e.value.code == NOT_AUTHORIZED and e.value.remote, str(e.value)

        # 2. Corrupted frames from an agent: no answer (decoders never crash), logged.
        probe = Peer(a, "agent-a")
        junk = [b"\x00garbage", b"\xba\x09\x01\x00" + bytes(16), b"\xba\x01\x63\x00" + bytes(16), b"\xba\x01\x01"]
        for j in junk:
            await probe.send("baton.xfer", j, ["baton"])

        # 3. An ACK for a transfer baton does not know: answered CANCEL unknown_transfer (3).
        raw = await Peer.join(server, room, "agent-raw", kind="agent")
        await known_to_baton(baton, "agent-raw")
        unknown = int.from_bytes(os.urandom(16), "big")
        await raw.send("baton.xfer", fr.encode(fr.Ack(unknown, 1, 32)), ["baton"])
        reply = fr.decode((await raw.next("baton.xfer", timeout=5)).data)
        assert isinstance(reply, fr.Cancel) and reply.id == unknown, reply
        assert reply.code == fr.ErrorCode.UNKNOWN_TRANSFER

        # 4. A DATA frame whose length breaks the OPEN's rules: ERROR protocol_violation (12).
        tid = int.from_bytes(os.urandom(16), "big")
        body_bytes = os.urandom(1000)
        opn = fr.Open(tid, 1000, 1000, 256, hashlib.sha256(body_bytes).digest(), False, "{}")
        await raw.send("baton.xfer", fr.encode(opn), ["baton"])
        await raw.send("baton.xfer", fr.encode(fr.Data(tid, 0, body_bytes[:100])), ["baton"])
        err = None
        while err is None:
            f = fr.decode((await raw.next("baton.xfer", timeout=5)).data)
            if isinstance(f, fr.Error):
                err = f
        assert err.id == tid and err.code == fr.ErrorCode.PROTOCOL_VIOLATION, err

        # 5. A RESUME for a transfer baton never saw: ERROR unknown_transfer.
        await raw.send("baton.xfer", fr.encode(fr.Resume(unknown, 3)), ["baton"])
        f = fr.decode((await raw.next("baton.xfer", timeout=5)).data)
        assert isinstance(f, fr.Error) and f.code == fr.ErrorCode.UNKNOWN_TRANSFER, f

        # Meanwhile the real bundle went through, and B got only that one.
        await sent
        data, _ = await got
        assert data == payload
        more = asyncio.ensure_future(receive_bundle(b, from_identity="baton", timeout=1.5))
        with pytest.raises(asyncio.TimeoutError):
            inbox.append((await more)[0])
        assert not inbox, "something besides the real bundle was delivered"
        pong, _ = await raw.ping()
        assert pong["type"] == "pong", "baton stopped answering"
        for r in (a, b, caller.room, raw.room):
            await r.disconnect()

    baton = relay_scenario(server, body)
    log = baton.text()
    assert re.search(
        r"security: transfer frame from a participant that is not an authorized agent.*caller|caller.*security", log
    ), log
    assert "bad_frame" in log and "unsupported_version" in log, "corrupted frames were not reported"
    assert delivered_once(baton)["to"] == "agent-b", log
