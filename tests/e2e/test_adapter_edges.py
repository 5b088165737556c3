"""The Python adapter (`lk_baton.agents.BatonLink` on a real livekit-agents `AgentSession`) at the
protocol's edges, against a real LiveKit server and a real baton.

Issue 11, item 8: a caller pushed valid bundles on `baton.xfer` straight to an agent, and the
adapter accepted, acknowledged and kept them (10 x 8 MiB grew the agent's process by 89 MB). An
agent takes transfers and control messages from baton's participant only (kind agent and
`baton.role = coordinator`); anyone else's are refused without being stored.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from harness import LiveKitServer, config_file, joined_baton, run, token
from livekit import rtc
from livekit.agents import Agent, AgentSession
from lk_baton import BatonLink, CoordinatorMissing, TransferError, bundle, send_bundle, transport_for
from peers import Peer

CONFIG = """
[[agents]]
name = "triage"

[[agents]]
name = "billing"
"""


def valid_bundle(size: int) -> bytes:
    """A bundle that validates (docs/bundle.md), padded to about `size` bytes."""
    b = bundle.build_bundle(
        from_agent="billing",
        to_agent="triage",
        reason="take this context",
        chat={"items": []},
        tool_calls_in_flight=[],
        user_state={"padding": "x" * size},
        agent_state={},
    )
    return bundle.encode_bundle(b)


async def adapter_agent(server: LiveKitServer, room: str, name: str) -> tuple[rtc.Room, BatonLink, AgentSession[None]]:
    """An agent as livekit-agents runs one: a participant of kind agent named by its token, an
    `AgentSession` (text only), linked to baton with `BatonLink.attach` before it starts."""
    lk_room = rtc.Room()
    attrs = {"lk.agent.name": name, "lk.agent_name": name}
    await lk_room.connect(server.url, token(f"agent-{name}", room, kind="agent", attributes=attrs))
    session: AgentSession[None] = AgentSession()
    link = await BatonLink.attach(lk_room, session, agent_name=name, answer_timeout=10)
    await session.start(Agent(instructions=f"You are {name}."))
    return lk_room, link, session


def test_agent_refuses_a_bundle_and_control_messages_pushed_by_the_caller(server: LiveKitServer) -> None:
    room = f"edge-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def scenario() -> None:
            agent_room, link, session = await adapter_agent(server, room, "triage")
            # a caller who also put baton's role in its own token: still not of kind agent
            caller = await Peer.join(server, room, "caller", attributes={"baton.role": "coordinator"})
            try:
                assert link.floor.answered, "baton's answer to hello was taken"
                assert link.baton_identity is not None and link.baton_identity != "caller"
                floor_events = list(link.events)
                active = link.floor.active

                forged: list[dict[str, Any]] = [
                    {"v": 1, "type": "activate", "id": "c-1", "cause": "start"},
                    {"v": 1, "type": "deactivate", "id": "c-2", "reason": "standby"},
                    {"v": 1, "type": "release", "id": "c-3", "handoff": "h-1", "mode": "leave"},
                ]
                for msg in forged:
                    await caller.send("baton.control", json.dumps(msg).encode(), ["agent-triage"])

                loop = asyncio.get_running_loop()
                for size in (1 << 20, 8 << 20):
                    pushed = valid_bundle(size)
                    t0 = loop.time()
                    try:
                        await asyncio.wait_for(send_bundle(caller.room, "agent-triage", pushed, bundle.META), 30)
                    except TransferError as e:
                        assert e.name == "not_authorized" and e.remote, e
                    else:
                        raise AssertionError("the agent accepted a bundle from the caller")
                    # refused at the OPEN, not at the sender's 60 s deadline
                    assert loop.time() - t0 < 10

                await asyncio.sleep(0.5)
                transport = transport_for(agent_room)
                assert transport.endpoint.receivers.active == 0
                assert transport.endpoint.receivers.buffered == 0
                assert not transport._inbox, "nothing from the caller was kept"
                assert {r.error.name for r in transport.rejected} == {"not_authorized"}
                assert {r.sender for r in transport.rejected} == {"caller"}
                assert link.events == floor_events, "the forged control messages changed nothing"
                assert link.floor.active == active
                assert agent_room.isconnected(), "a forged release(leave) did not make it leave"
                assert link.refusals.total >= len(forged) + 2
            finally:
                await caller.close()
                await link.aclose()
                await session.aclose()
                await agent_room.disconnect()

        run(scenario(), timeout=120)


def test_a_single_hello_right_after_joining_is_answered(server: LiveKitServer) -> None:
    """Issue 11, item 3: an agent that publishes no track and sends one `hello` right after
    connecting can be announced to baton up to about 3 s later (the server batches that news).
    baton holds such a message until the sender is announced (up to 5 s): six agents, one
    `hello` each and never again, all six answered."""
    room = f"hello-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def one(i: int) -> dict[str, Any]:
            peer = await Peer.join(server, room, f"billing-{i}", kind="agent", attributes={"lk.agent.name": "billing"})
            try:
                hello = {"v": 1, "type": "hello", "id": f"a-{i}", "agent_name": "billing"}
                await peer.send("baton.control", json.dumps(hello).encode(), ["baton"])
                answer: dict[str, Any] = json.loads((await peer.next("baton.control", timeout=8)).data)
                return answer
            finally:
                await peer.close()

        async def scenario() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(one(i) for i in range(6))))

        answers = run(scenario())
        assert isinstance(answers, list) and len(answers) == 6
        for a in answers:
            assert a["type"] in ("deactivate", "activate", "prepare"), a


def test_attach_in_a_room_without_baton_reports_coordinator_missing(server: LiveKitServer) -> None:
    """Issue 11, item 5: an agent whose room has no baton learns it within `find_timeout` (5 s
    by default), as `CoordinatorMissing` with code `coordinator_missing`, not after 10 s."""
    room = f"nobaton-{uuid.uuid4().hex[:8]}"

    async def scenario() -> float:
        lk_room = rtc.Room()
        attrs = {"lk.agent.name": "triage"}
        await lk_room.connect(server.url, token("agent-triage", room, kind="agent", attributes=attrs))
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            session: AgentSession[None] = AgentSession()
            try:
                await BatonLink.attach(lk_room, session, agent_name="triage")
            except CoordinatorMissing as e:
                assert e.code == "coordinator_missing" and e.room == room, e
                return loop.time() - start
            raise AssertionError("attach succeeded in a room without baton")
        finally:
            await lk_room.disconnect()

    waited = run(scenario())
    assert isinstance(waited, float) and 4.9 <= waited < 7.0, waited
