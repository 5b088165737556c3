"""Checkpoints and recovery in the livekit-agents glue (issue 13): a real AgentSession linked to
a stand-in baton over in-memory rooms streams its state at every turn boundary and around tool
calls, the stand-in merges the chain as baton does (lk_baton.checkpoint.merge_checkpoints), and
a replacement is rebuilt from the recovery bundle."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from fakes import BookingBackend, BookingTools, FakeBaton, FakeRoom, Net, ScriptedLLM, Step
from livekit.agents import Agent, AgentSession, llm

from lk_baton import bundle as bd
from lk_baton.agents import (
    ACTIVATION_CHECKPOINT_WAIT_S,
    RECOVERY_GREETING,
    BatonLink,
    chat_item_dict,
    seed_agent,
)
from lk_baton.checkpoint import RECOVERY_META, merge_checkpoints, recovery_bundle
from lk_baton.floor import CONTROL_TOPIC
from lk_baton.transfer import send_bundle, transport_for


@dataclass
class Caller:
    account: str | None = None


def desk_script(ctx: llm.ChatContext) -> Step:
    it = ctx.items[-1]
    users = [i for i in ctx.items if i.type == "message" and i.role == "user"]
    if it.type == "message" and it.role == "user" and "note" in (it.text_content or ""):
        return ("Noting that.", [("save_note", {"text": it.text_content or ""})])
    if it.type == "function_call_output":
        return ("Done.", [])
    return (f"You said {len(users)} things.", [])


class Desk(BookingTools, Agent):
    def __init__(self, backend: BookingBackend) -> None:
        super().__init__(instructions="help")
        self.backend = backend


async def linked_desk(net: Net) -> tuple[AgentSession[Caller], BatonLink, Desk]:
    room = FakeRoom(net, "agent-triage")
    session: AgentSession[Caller] = AgentSession(llm=ScriptedLLM(desk_script), userdata=Caller())
    link = await BatonLink.attach(room, session, agent_name="triage")  # type: ignore[arg-type]
    agent = Desk(BookingBackend(note_delay=0.05))
    await session.start(agent)
    return session, link, agent


async def settle(link: BatonLink) -> None:
    """Until no checkpoint is in flight or owed."""
    t = link.checkpoints
    assert t is not None
    for _ in range(200):
        await asyncio.sleep(0.01)
        if t.in_flight is None and not t.pending and not link._checkpoint_scheduled:
            return
    raise AssertionError("checkpoints did not settle")


async def desk_after_hello() -> tuple[FakeBaton, AgentSession[Caller], BatonLink, Desk]:
    """A stand-in baton and a linked desk agent after one turn, its checkpoints settled."""
    net = Net()
    baton = FakeBaton(net)
    session, link, agent = await linked_desk(net)
    await session.run(user_input="hello")
    await settle(link)
    return baton, session, link, agent


def test_checkpoints_follow_every_turn_and_merge_into_the_agents_context() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        session, link, agent = await linked_desk(net)
        assert link.floor.active
        await session.run(user_input="hello there")
        await settle(link)
        merged = baton.checkpoints["triage"]
        assert merged.items == [chat_item_dict(i) for i in agent.chat_ctx.items]
        assert [i["type"] for i in merged.items][-2:] == ["message", "message"]

        session.userdata.account = "A-1001"
        await session.run(user_input="please take a note: call me back")
        await settle(link)
        merged = baton.checkpoints["triage"]
        assert merged.items == [chat_item_dict(i) for i in agent.chat_ctx.items]
        assert merged.user_state == {"account": "A-1001"}
        assert [e["status"] for e in merged.journal] == ["finished"]
        assert merged.journal[0]["name"] == "save_note" and merged.journal[0]["rerun"] == (
            "if_idempotent"
        )

        docs = [d for _, d in baton.checkpoint_log]
        assert [d["seq"] for d in docs] == list(range(len(docs)))
        assert docs[0]["base"] and not any(d["base"] for d in docs[1:])
        statuses = [e["status"] for d in docs for e in d["journal"]]
        assert statuses[:1] == ["started"] and statuses[-1] == "finished", statuses
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_no_checkpoints_while_not_holding_the_floor_and_a_base_after_activation() -> None:
    async def main() -> None:
        baton, session, link, _agent = await desk_after_hello()
        n = len(baton.checkpoint_log)
        link.floor.handle({"v": 1, "type": "deactivate", "id": "b-x", "reason": "standby"})
        link.checkpoint_soon()
        await asyncio.sleep(0.05)
        assert len(baton.checkpoint_log) == n
        link.floor.handle({"v": 1, "type": "activate", "id": "b-y", "cause": "handback"})
        await settle(link)
        # the handback's reply makes more: the first after the activation is a base
        assert len(baton.checkpoint_log) > n and baton.checkpoint_log[n][1]["base"]
        assert not any(d["base"] for _, d in baton.checkpoint_log[1:n])
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_the_base_after_an_activation_waits_for_the_first_words_or_one_second() -> None:
    """Built at once, the activation's base checkpoint ran on the event loop ahead of the reply
    the activation asks for (the caller's wait): it comes with the agent's first words, or
    ACTIVATION_CHECKPOINT_WAIT_S after the activation when the agent says nothing."""

    async def main() -> None:
        baton, session, link, _agent = await desk_after_hello()
        link.floor.handle({"v": 1, "type": "deactivate", "id": "b-x", "reason": "standby"})
        await asyncio.sleep(0.05)
        # no reply on this activation: the base comes after the wait
        link.on_activate = None
        n = len(baton.checkpoint_log)
        link.floor.handle({"v": 1, "type": "activate", "id": "b-y", "cause": "start"})
        await asyncio.sleep(ACTIVATION_CHECKPOINT_WAIT_S / 2)
        assert len(baton.checkpoint_log) == n, "not at the activation"
        await asyncio.sleep(ACTIVATION_CHECKPOINT_WAIT_S)
        await settle(link)
        assert len(baton.checkpoint_log) == n + 1 and baton.checkpoint_log[n][1]["base"]
        # a reply on this one: the base comes once the agent speaks, not before
        link.floor.handle({"v": 1, "type": "deactivate", "id": "b-z", "reason": "standby"})
        await asyncio.sleep(0.05)
        states: list[str] = []
        session.on("agent_state_changed", lambda ev: states.append(ev.new_state))
        baton.checkpoint_log.clear()
        seen_at_first_checkpoint: list[list[str]] = []
        link.on_checkpoint_acked = lambda _l: seen_at_first_checkpoint.append(list(states))
        link.on_activate = lambda lk, _m: lk.session.generate_reply()
        link.floor.handle({"v": 1, "type": "activate", "id": "b-w", "cause": "handback"})
        await asyncio.sleep(ACTIVATION_CHECKPOINT_WAIT_S / 2)
        await settle(link)
        assert baton.checkpoint_log and baton.checkpoint_log[0][1]["base"]
        assert seen_at_first_checkpoint and "speaking" in seen_at_first_checkpoint[0], states
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_a_lost_checkpoint_is_followed_by_a_base() -> None:
    async def main() -> None:
        baton, session, link, agent = await desk_after_hello()
        t = link.checkpoints
        assert t is not None
        payload = link.checkpoint_payload()
        assert payload is None, "nothing changed"
        await session.run(user_input="again")
        # baton refuses or the transfer fails: the adapter cannot know what baton holds
        t.in_flight = None
        t.failed()
        link.checkpoint_soon()
        await settle(link)
        last = baton.checkpoint_log[-1][1]
        assert last["base"] and baton.checkpoints["triage"].items == [
            chat_item_dict(i) for i in agent.chat_ctx.items
        ]
        assert json.dumps(last, sort_keys=True)  # what was merged is plain JSON
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_no_checkpoint_starts_between_a_handoff_request_and_its_bundle() -> None:
    """The adapter names its bundle in the request (``transfer``), so baton cannot take a
    checkpoint for it, and starts no checkpoint between the request and the bundle's upload:
    the next transfer it opens after ``handoff`` is the bundle, with the id the request named."""
    from test_agents import LinkedTriage, linked_triage

    from lk_baton import frames as fr
    from lk_baton.transfer import TOPIC

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        _room, session, link = await linked_triage(net)
        triage = LinkedTriage()
        triage.link = link
        await session.start(triage)
        await session.run(user_input="I was charged twice this month")
        assert triage.ticket is not None
        await asyncio.wait_for(triage.ticket.upload, 5)
        await asyncio.sleep(0.05)
        assert baton.checkpoint_log, "the turns before the handoff were checkpointed"

        order: list[tuple[str, int | None]] = []  # what triage sent baton, in order
        named: int | None = None
        for p in net.log:
            if p.src != "agent-triage":
                continue
            if p.topic == CONTROL_TOPIC and b'"type":"handoff"' in p.payload:
                named = int(json.loads(p.payload)["transfer"], 16)
                order.append(("handoff", None))
            elif p.topic == TOPIC:
                f = fr.decode(p.payload)
                if isinstance(f, fr.Open):
                    order.append((json.loads(f.meta)["purpose"] + "_open", f.id))
        at = order.index(("handoff", None))
        assert order[at + 1] == ("handoff_open", named), order
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


class RecoveryBaton(FakeBaton):
    """Answers a hello with a recovery's ``prepare`` and delivers ``bundle`` (baton's recovery
    bundle), then activates the replacement once it is ready."""

    def __init__(self, net: Net, bundle: bytes, greeting: bool) -> None:
        super().__init__(net)
        self.bundle = bundle
        self.greeting = greeting

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        self.got.append((who, msg))
        if msg["type"] == "hello":
            self.send(
                who,
                "prepare",
                handoff="r-1",
                source="triage",
                reason="recovery after job_failed",
                bundle=True,
                cause="recovery",
                greeting=self.greeting,
            )
            task = asyncio.ensure_future(send_bundle(self.room, who, self.bundle, RECOVERY_META))
            self._tasks.add(task)  # type: ignore[arg-type]
        elif msg["type"] == "ready":
            self.send(who, "activate", handoff=msg["handoff"], cause="recovery")


def recovery_script(ctx: llm.ChatContext) -> Step:
    it = ctx.items[-1]
    if it.type == "message" and it.role == "system" and it.text_content == RECOVERY_GREETING:
        said = [i.text_content for i in ctx.items if i.type == "message" and i.role == "user"]
        return (f"Sorry, we were cut off; you said {said[-1]}.", [])
    if it.type == "message" and it.role == "user":
        return ("Booking again.", [("create_reservation", {"date": "friday", "party": 4})])
    return ("", [])


def test_a_replacement_goes_on_from_the_recovery_bundle_and_does_not_book_twice() -> None:
    """prepare(cause recovery, greeting) -> the recovery bundle -> the session holds the crashed
    agent's context item for item, the call in flight is paired with an 'outcome unknown'
    output, a `rerun: never` call with the same arguments is not run again, and the first
    reply after the activation is the recovery greeting."""
    t0 = 1796049000.0
    items = [
        {
            "id": "u1",
            "type": "message",
            "role": "user",
            "content": ["a table for 4 on friday"],
            "interrupted": False,
            "extra": {},
            "created_at": t0,
        },
        {
            "id": "fc1",
            "type": "function_call",
            "call_id": "c1",
            "name": "create_reservation",
            "arguments": '{"date": "friday", "party": 4}',
            "extra": {},
            "created_at": t0 + 1,
        },
    ]
    journal = [
        {
            "call_id": "c1",
            "name": "create_reservation",
            "arguments": '{"date": "friday", "party": 4}',
            "started_at": t0 + 1,
            "idempotency_key": "key-c1",
            "rerun": "never",
            "status": "started",
            "note": None,
            "output": None,
        },
    ]
    base = {
        "schema": "baton.checkpoint/1",
        "agent": "triage",
        "seq": 0,
        "base": True,
        "created_at": t0 + 2,
        "items": items,
        "journal": journal,
        "user_state": {"account": None},
        "agent_state": {},
    }
    state = merge_checkpoints(None, base)
    reason = "recovery after job_failed"
    bundle = recovery_bundle(state, reason=reason, recovery_id="r-1", now=t0 + 3)

    async def main() -> None:
        net = Net()
        RecoveryBaton(net, bd.encode_bundle(bundle), greeting=True)
        room = FakeRoom(net, "agent-triage-2")
        model = ScriptedLLM(recovery_script)
        session: AgentSession[Caller] = AgentSession(llm=model, userdata=Caller())
        link = await BatonLink.attach(room, session, agent_name="triage")  # type: ignore[arg-type]
        assert link.preparing and link.last_prepare is not None
        assert link.last_prepare["cause"] == "recovery"
        received = await link.receive_context(timeout=5)
        assert received.cause == "recovery" and received.handoff_id == "r-1"
        backend = BookingBackend(booking_delay=0.01)
        agent = await seed_agent(Desk(backend), received)
        ids = [i.id for i in agent.chat_ctx.items]
        assert "u1" in ids and "fc1" in ids
        assert not any(i.type == "agent_handoff" for i in agent.chat_ctx.items), (
            "a recovery goes on"
        )
        paired = next(
            i
            for i in agent.chat_ctx.items
            if i.type == "function_call_output" and i.call_id == "c1"
        )
        assert "cut off" in paired.output and "key-c1" in paired.output
        await session.start(agent)
        await link.ready()
        await link.wait_active(timeout=2)
        for _ in range(100):
            await asyncio.sleep(0.02)
            said = [
                i.text_content
                for i in agent.chat_ctx.items
                if i.type == "message" and i.role == "assistant"
            ]
            if said:
                break
        assert said and "cut off" in (said[0] or "") and "friday" in (said[0] or ""), said
        await session.run(user_input="please book it")
        assert backend.bookings == [], "a rerun: never call in flight at the crash is not run again"
        outs = [i.output for i in agent.chat_ctx.items if i.type == "function_call_output"]
        assert any(o.startswith("Not run:") and "key-c1" in o for o in outs), outs
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_a_refused_checkpoint_or_a_reconnect_makes_the_next_one_a_base() -> None:
    """baton answers a checkpoint's OPEN with an ERROR (here not_authorized; code 14
    checkpoint_rejected works the same): the adapter sends a base next. A reconnect too."""

    async def main() -> None:
        baton, session, link, agent = await desk_after_hello()
        t = transport_for(baton.room)
        t.accept_from = lambda p: False  # refuse the next transfer
        n = len(baton.checkpoint_log)
        await session.run(user_input="again")
        await settle(link)
        assert len(baton.checkpoint_log) == n, "refused: nothing merged"
        assert link.checkpoints is not None and link.checkpoints.acked_seq == n - 1
        t.accept_from = None
        await session.run(user_input="and again")
        await settle(link)
        first_after = baton.checkpoint_log[n][1]
        assert first_after["base"], first_after
        now = [chat_item_dict(i) for i in agent.chat_ctx.items]
        assert baton.checkpoints["triage"].items == now

        m = len(baton.checkpoint_log)
        link.room.emit("reconnected")
        await session.run(user_input="after the reconnect")
        await settle(link)
        assert baton.checkpoint_log[m][1]["base"]

        m = len(baton.checkpoint_log)
        link.room.emit("participant_connected", baton.room.as_participant())  # baton rejoined
        await session.run(user_input="after baton came back")
        await settle(link)
        assert baton.checkpoint_log[m][1]["base"]
        await link.aclose()
        await session.aclose()

    asyncio.run(main())
