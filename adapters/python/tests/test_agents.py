"""lk_baton.agents without a server: real AgentSessions driven headless (no room) with a scripted
LLM, and BatonLink over in-memory rooms with a scripted stand-in for baton (tests/fakes.py). The
floor state machine on its own is tested in test_floor.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest
from fakes import BATON_ATTRIBUTES, FakeBaton, FakeRoom, Net, ScriptedLLM, Step
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm

from lk_baton import bundle as bd
from lk_baton.agents import (
    BatonLink,
    ReceivedContext,
    build_handoff_bundle,
    chat_items_equal,
    read_bundle,
    seed_agent,
    state_from_dict,
    state_to_dict,
)
from lk_baton.floor import (
    CONTROL_TOPIC,
    PARTICIPANT_KIND_AGENT,
    BatonError,
    CoordinatorMissing,
    HandoffRefused,
    MessageTooLarge,
)
from lk_baton.transfer import TransferError, receive_bundle, send_bundle, transport_for

# ---------------------------------------------------------------------------------------------
# Scripts for the scripted LLM (fakes.ScriptedLLM)


def last(ctx: llm.ChatContext) -> llm.ChatItem:
    return ctx.items[-1]


def triage_script(ctx: llm.ChatContext) -> Step:
    it = last(ctx)
    if it.type == "message" and it.role == "user":
        return ("Let me look up your account.", [("lookup_account", {"account_id": "A-1001"})])
    if it.type == "function_call_output" and it.name == "lookup_account":
        return ("I'll pass you to billing.", [("transfer_to_billing", {})])
    return ("", [])


def billing_script(ctx: llm.ChatContext) -> Step:
    # speaks only from facts in its context: the lookup's output and the caller's words
    facts = [
        i for i in ctx.items if i.type == "function_call_output" and i.name == "lookup_account"
    ]
    said = [i for i in ctx.items if i.type == "message" and i.role == "user"]
    if facts and said:
        account = json.loads(facts[-1].output)["account_id"]
        return (f"Billing here. About account {account}: {said[0].text_content}", [])
    return ("Billing here. How can I help?", [])


# ---------------------------------------------------------------------------------------------
# User state types


@dataclass
class Address:
    city: str = ""


@dataclass
class Caller:
    name: str = ""
    account_id: str | None = None
    verified: bool = False
    address: Address = field(default_factory=Address)
    tags: list[str] = field(default_factory=list)


class CallerModel(pydantic.BaseModel):
    name: str
    account_id: str | None = None
    verified: bool = False
    workflow: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# Agents


class Triage(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are triage.")
        self.bundle: bd.Bundle | None = None

    @function_tool
    async def lookup_account(self, account_id: str) -> str:
        """Look up the caller's account."""
        return json.dumps({"account_id": account_id, "balance": -42.5, "plan": "pro"})

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[Caller]) -> None:
        """Transfer the caller to billing."""
        await ctx.wait_for_playout()
        ctx.userdata.verified = True
        self.bundle = build_handoff_bundle(
            self.chat_ctx,
            from_agent="triage",
            to_agent="billing",
            reason="caller disputes a charge",
            user_state=state_to_dict(ctx.userdata),
            tried=["looked up account", {"action": "explained charges", "outcome": "not accepted"}],
            outcome="needs billing",
            current_call=ctx.function_call,
        )


class Billing(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are billing.")

    @function_tool
    async def refund(self, amount: float) -> str:
        """Refund an amount."""
        return "ok"


async def run_triage() -> tuple[Triage, AgentSession[Caller]]:
    session: AgentSession[Caller] = AgentSession(
        llm=ScriptedLLM(triage_script), userdata=Caller(name="Ada", address=Address("Paris"))
    )
    agent = Triage()
    await session.start(agent)
    await session.run(user_input="I was charged twice this month")
    return agent, session


def types_of(ctx: llm.ChatContext) -> list[str]:
    out = []
    for i in ctx.items:
        if i.type == "message":
            out.append(f"{i.role}")
        elif i.type in ("function_call", "function_call_output"):
            out.append(f"{i.type}:{i.name}")
        else:
            out.append(i.type)
    return out


# ---------------------------------------------------------------------------------------------
# Bundle from a real chat context


def test_bundle_from_real_session_keeps_order_timestamps_and_tool_calls() -> None:
    async def main() -> None:
        agent, session = await run_triage()
        b = agent.bundle
        assert b is not None
        bd.validate_bundle(b)  # summary included
        items = b["chat"]["items"]
        kinds = [(i["type"], i.get("name") or i.get("role")) for i in items]
        assert kinds[0] == ("message", "system")
        tail = [k for k in kinds if k[0] != "agent_config_update"][1:]
        assert tail == [
            ("message", "user"),
            ("message", "assistant"),
            ("function_call", "lookup_account"),
            ("function_call_output", "lookup_account"),
            ("message", "assistant"),
            ("function_call", "transfer_to_billing"),
            ("function_call_output", "transfer_to_billing"),
        ]
        stamps = [i["created_at"] for i in items]
        assert all(isinstance(t, float) for t in stamps)
        assert stamps == sorted(stamps), "items are in time order"
        # the source's own items are carried unchanged (ids, created_at)
        src = agent.chat_ctx.to_dict(exclude_timestamp=False)["items"]
        by_id = {i["id"]: i for i in items}
        for it in src:
            if it["type"] == "function_call" and it["name"] == "transfer_to_billing":
                continue  # after the bundle was built, the framework adds its own output
            if it["type"] == "function_call_output" and it["name"] == "transfer_to_billing":
                continue
            assert by_id[it["id"]] == it
        out = next(i for i in items if i.get("name") == "lookup_account" and "output" in i)
        assert json.loads(out["output"])["account_id"] == "A-1001"
        assert b["tool_calls_in_flight"] == []
        assert b["user_state"] == {
            "name": "Ada",
            "account_id": None,
            "verified": True,
            "address": {"city": "Paris"},
            "tags": [],
        }
        assert b["agent_state"]["attempts"][1] == {
            "action": "explained charges",
            "outcome": "not accepted",
        }
        assert (b["from_agent"], b["to_agent"]) == ("triage", "billing")
        await session.aclose()

    asyncio.run(main())


def test_unanswered_function_call_is_reported_in_flight() -> None:
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="book me", created_at=100.0)
    ctx.insert(
        llm.FunctionCall(call_id="c1", name="book", arguments='{"day":"mon"}', created_at=101.0)
    )
    b = build_handoff_bundle(ctx, from_agent="a", to_agent="b", reason="r")
    assert b["tool_calls_in_flight"] == [
        {
            "call_id": "c1",
            "name": "book",
            "arguments": '{"day":"mon"}',
            "started_at": 101.0,
            "idempotency_key": "c1",
            "rerun": "never",
            "note": "started before the handoff; its result is unknown",
        }
    ]


# ---------------------------------------------------------------------------------------------
# Receiving side


def test_receiving_side_rebuilds_an_equivalent_chat_context() -> None:
    async def main() -> None:
        agent, session = await run_triage()
        assert agent.bundle is not None
        wire = bd.encode_bundle(agent.bundle)
        got = read_bundle(bd.decode_bundle(wire), user_state_type=Caller)
        want = llm.ChatContext.from_dict(agent.bundle["chat"])
        assert chat_items_equal(got.chat_ctx, want)
        # and against the source agent's live context (its items up to the handoff)
        src = llm.ChatContext(
            [i for i in agent.chat_ctx.items if getattr(i, "name", None) != "transfer_to_billing"]
        )
        mine = llm.ChatContext(
            [i for i in got.chat_ctx.items if getattr(i, "name", None) != "transfer_to_billing"]
        )
        assert chat_items_equal(mine, src)
        assert got.reason == "caller disputes a charge"
        assert got.from_agent == "triage"
        assert got.user_state == Caller(
            name="Ada", verified=True, address=Address("Paris"), account_id=None
        )
        await session.aclose()

    asyncio.run(main())


def test_specialist_keeps_tool_calls_it_has_no_tools_for() -> None:
    async def main() -> None:
        agent, session = await run_triage()
        assert agent.bundle is not None
        await session.aclose()
        received = read_bundle(agent.bundle)

        foreign = {"lookup_account", "transfer_to_billing"}

        def calls(ctx: llm.ChatContext) -> list[str]:
            return [
                f"{i.type}:{i.name}"
                for i in ctx.items
                if i.type in ("function_call", "function_call_output")
            ]

        # the framework's default drops them: that is what seed_agent works around
        plain = Agent(instructions="billing", chat_ctx=received.chat_ctx)
        assert not any(i.type == "function_call" for i in plain.chat_ctx.items)

        billing = await seed_agent(Billing(), received)
        expected = [
            "function_call:lookup_account",
            "function_call_output:lookup_account",
            "function_call:transfer_to_billing",
            "function_call_output:transfer_to_billing",
        ]
        assert calls(billing.chat_ctx) == expected
        ho = [i for i in billing.chat_ctx.items if i.type == "agent_handoff"]
        assert len(ho) == 1
        assert (ho[0].old_agent_id, ho[0].new_agent_id) == ("triage", "billing")
        assert billing.chat_ctx.items[-1].type == "agent_handoff", "handoff item comes last"
        assert chat_items_equal(billing.chat_ctx, received.chat_ctx, skip_types=("agent_handoff",))

        # ... and after a session starts the agent and it takes a turn
        model = ScriptedLLM(billing_script)
        s2: AgentSession[None] = AgentSession(llm=model)
        await s2.start(billing)
        assert calls(billing.chat_ctx) == expected
        result = await s2.run(user_input="so can you fix it?")
        assert calls(billing.chat_ctx) == expected
        # the model saw the foreign calls, so its reply uses facts only triage heard
        assert calls(model.seen[-1]) == expected
        reply = [e.item for e in result.events if e.type == "message"]
        assert "A-1001" in reply[-1].text_content
        assert "charged twice" in reply[-1].text_content
        # timestamps and order survived the start
        inst = "lk.agent_task.instructions"
        kept = [
            i for i in billing.chat_ctx.items if i.id in {x.id for x in received.chat_ctx.items}
        ]
        assert [i.id for i in kept if i.id != inst] == [
            i.id for i in received.chat_ctx.items if i.id != inst and i.id in {k.id for k in kept}
        ]
        for i in kept:
            if i.id != inst:
                orig = next(x for x in received.chat_ctx.items if x.id == i.id)
                assert i.created_at == orig.created_at
        assert foreign.isdisjoint({t.id for t in billing.tools})
        await s2.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# User state


def test_user_state_round_trips_dataclass_and_pydantic() -> None:
    c = Caller(name="Bo", account_id="A-7", verified=True, address=Address("Oslo"), tags=["vip"])
    d = state_to_dict(c)
    assert json.loads(json.dumps(d)) == d
    assert state_from_dict(d, Caller) == c

    m = CallerModel(name="Bo", account_id="A-7", workflow={"step": 3})
    dm = state_to_dict(m)
    assert dm == {"name": "Bo", "account_id": "A-7", "verified": False, "workflow": {"step": 3}}
    assert state_from_dict(dm, CallerModel) == m

    assert state_to_dict(None) == {}
    assert state_to_dict({"a": 1}) == {"a": 1}

    class Opaque:
        def __init__(self) -> None:
            self.x = 1

    with pytest.raises(TypeError, match="user_state_serializer"):
        state_to_dict(Opaque())
    assert state_to_dict(Opaque(), lambda o: {"x": o.x}) == {"x": 1}

    # through a whole bundle with an app deserializer
    b = build_handoff_bundle(
        llm.ChatContext.empty(), from_agent="a", to_agent="b", reason="r", user_state=dm
    )
    got = read_bundle(b, user_state_deserializer=lambda raw: CallerModel(**raw))
    assert got.user_state == m


# ---------------------------------------------------------------------------------------------
# BatonLink over in-memory rooms, with a scripted baton


class LinkedTriage(Triage):
    def __init__(self) -> None:
        super().__init__()
        self.link: BatonLink | None = None
        self.ticket: Any = None
        self.refused: HandoffRefused | None = None

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[Caller]) -> None:
        """Transfer the caller to billing."""
        assert self.link is not None
        try:
            self.ticket = await self.link.handoff(
                "billing", reason="disputed charge", run_ctx=ctx, tried=["looked up account"]
            )
        except HandoffRefused as e:
            self.refused = e


async def linked_triage(
    net: Net, **options: Any
) -> tuple[FakeRoom, AgentSession[Caller], BatonLink]:
    """triage's room, session (the scripted triage model, caller Ada) and link to baton."""
    room = FakeRoom(net, "agent-triage")
    session: AgentSession[Caller] = AgentSession(
        llm=ScriptedLLM(triage_script), userdata=Caller(name="Ada")
    )
    link = await BatonLink.attach(room, session, agent_name="triage", **options)  # type: ignore[arg-type]
    return room, session, link


@pytest.mark.parametrize("early", [True, False], ids=["asked_at_the_tool_call", "asked_after"])
def test_link_source_and_target_through_a_scripted_baton(early: bool) -> None:
    """The default (``early``): triage asks when its transfer tool is called, with ``speaking``,
    and sends its sentence as the ``tail`` before ``quiet``; the older order asks after the
    sentence with ``quiet``. Either way billing's first reply knows the account and the
    problem, and with ``early`` its context holds triage's last sentence."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)

        # --- source: triage
        room_a, s1, link_a = await linked_triage(net, role="triage", early_request=early)
        assert link_a.baton_identity == "baton-1"
        assert link_a.floor.active, "baton answered hello with activate"
        triage = LinkedTriage()
        triage.link = link_a
        await s1.start(triage)
        await s1.run(user_input="I was charged twice this month")
        assert triage.ticket is not None and triage.ticket.handoff_id == "h-1"
        # The bundle went out with the request, before baton named the handoff.
        assert "handoff_id" not in triage.ticket.bundle
        await asyncio.wait_for(triage.ticket.upload, 5)
        await asyncio.sleep(0.02)
        request = next(m for w, m in baton.got if w == "agent-triage" and m["type"] == "handoff")
        tails = [m for w, m in baton.got if w == "agent-triage" and m["type"] == "tail"]
        if early:
            # Asked when the tool was called (no hint: the request itself prepares billing),
            # and its sentence followed as the tail, before its quiet.
            assert baton.types_from("agent-triage") == ["hello", "handoff", "tail", "quiet"]
            assert request.get("speaking") is True and "quiet" not in request, request
            said = [i for t in tails for i in t["items"] if i.get("role") == "assistant"]
            assert [i["content"] for i in said] == [["I'll pass you to billing."]], tails
            assert all(
                i["id"] not in {j["id"] for j in triage.ticket.bundle["chat"]["items"]}
                for t in tails
                for i in t["items"]
            ), "only what the bundle lacks"
        else:
            # The hint went first, when the tool was called (hint=True, the default).
            assert baton.types_from("agent-triage") == ["hello", "hint", "handoff", "quiet"]
            # Asked after its sentence played out: it tells baton it is already quiet.
            assert request.get("quiet") is True, request
            assert not tails
        # It started its own filler as the sentence ended, on its baton-filler track, published
        # while the sentence played out: the request says so.
        assert request.get("filler") is True, request
        assert link_a.filler is not None and link_a.filler.playing
        assert [p.track.name for p in room_a.tracks.values()] == ["baton-filler"]
        if not early:
            # and since when (it built its bundle in between): baton's settle counts from then
            assert isinstance(request.get("quiet_ms"), int) and 0 <= request["quiet_ms"] < 2000
        # It names the bundle it uploads: the transfer id the upload resolved to.
        assert "bundle_follows" not in request, request
        assert request["transfer"] == f"{triage.ticket.upload.result():032x}", request
        assert not link_a.floor.active
        assert (s1.output.audio_enabled, s1.input.audio_enabled) == (False, False)
        payload, meta = await receive_bundle(baton.room, "agent-triage", timeout=1)
        assert json.loads(meta) == bd.META

        # --- target: billing (baton forwards the bundle after prepare)
        room_b = FakeRoom(net, "agent-billing")
        model = ScriptedLLM(billing_script)
        s2: AgentSession[Caller] = AgentSession(llm=model)
        link_b = await BatonLink.attach(room_b, s2, agent_name="billing")  # type: ignore[arg-type]
        assert link_b.preparing and not link_b.floor.active
        fwd = asyncio.ensure_future(send_bundle(baton.room, "agent-billing", payload, meta))
        received = await link_b.receive_context(timeout=5, user_state_type=Caller)
        await fwd
        assert isinstance(received, ReceivedContext)
        assert received.handoff_id == "h-1" and received.from_agent == "triage"
        assert received.user_state.name == "Ada"
        billing = await seed_agent(Billing(), received)
        s2.userdata = received.user_state
        await s2.start(billing)
        await link_b.ready()
        await asyncio.sleep(0.02)
        assert baton.types_from("agent-billing") == ["hello", "ready"]
        assert s2.output.audio_enabled is False, "silent until activated"

        replies: list[str] = []
        s2.on(
            "conversation_item_added",
            lambda ev: (
                replies.append(ev.item.text_content)
                if ev.item.type == "message" and ev.item.role == "assistant"
                else None
            ),
        )
        for t in tails:  # as baton forwards them: before the activate
            fields = {k: v for k, v in t.items() if k not in ("v", "type", "id")}
            baton.send("agent-billing", "tail", **fields, source="triage")
        baton.send("agent-billing", "activate", cause="handoff", handoff="h-1")
        await asyncio.wait_for(link_b.wait_active(), 2)
        for _ in range(200):
            if replies:
                break
            await asyncio.sleep(0.01)
        assert s2.output.audio_enabled and s2.input.audio_enabled
        assert replies and "A-1001" in replies[0] and "charged twice" in replies[0]
        said = [i.text_content for i in billing.chat_ctx.items if i.type == "message"]
        # in the bundle when asked after it; from the tail when asked at the tool call
        assert "I'll pass you to billing." in said, said
        in_bundle = [i.get("content") for i in triage.ticket.bundle["chat"]["items"]]
        assert (["I'll pass you to billing."] in in_bundle) is not early, in_bundle

        # release(leave) without a job context disconnects the room
        baton.send("agent-triage", "release", handoff="h-1", mode="leave")
        for _ in range(100):
            if room_a.disconnected:
                break
            await asyncio.sleep(0.01)
        assert room_a.disconnected
        # nothing was ever sent to anyone but baton
        assert {e.dest for e in net.log if e.src != "baton-1"} == {"baton-1"}
        for x in (link_a, link_b):
            await x.aclose()
        await s1.aclose()
        await s2.aclose()

    asyncio.run(main())


def test_link_refused_handoff_raises_and_keeps_the_floor() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        baton.refuse = "unknown_target"
        _room, s1, link = await linked_triage(net)
        triage = LinkedTriage()
        triage.link = link
        await s1.start(triage)
        await s1.run(user_input="I was charged twice")
        assert triage.refused is not None and triage.refused.reason == "unknown_target"
        assert link.floor.active and s1.output.audio_enabled
        assert "quiet" not in baton.types_from("agent-triage")
        await link.aclose()
        await s1.aclose()

    asyncio.run(main())


def test_text_input_only_reaches_the_floor_holder() -> None:
    async def main() -> None:
        from livekit.agents.voice.room_io import RoomOptions, TextInputEvent, TextInputOptions

        net = Net()
        FakeBaton(net)
        room = FakeRoom(net, "agent-billing")
        s: AgentSession[None] = AgentSession(llm=ScriptedLLM(billing_script))
        link = await BatonLink.attach(room, s, agent_name="billing", answer_timeout=0.5)  # type: ignore[arg-type]
        heard: list[str] = []

        async def cb(_: Any, ev: TextInputEvent) -> None:
            heard.append(ev.text)

        opts = link.room_options(RoomOptions(text_input=TextInputOptions(text_input_cb=cb)))
        ti = opts.get_text_input_options()
        assert ti is not None
        await ti.text_input_cb(s, TextInputEvent(text="hello?"))  # type: ignore[misc]
        assert heard == []
        link.floor.handle({"v": 1, "type": "activate", "id": "b-9", "cause": "start"})
        await ti.text_input_cb(s, TextInputEvent(text="now?"))  # type: ignore[misc]
        assert heard == ["now?"]
        assert link.room_options(text_input=False).text_input is False
        await link.aclose()

    asyncio.run(main())


def test_dataclass_helpers_are_plain() -> None:
    # ReceivedContext is a plain dataclass apps can build themselves (e.g. from dispatch metadata)
    r = ReceivedContext(chat_ctx=llm.ChatContext.empty(), user_state={}, reason="x", from_agent="a")
    assert dataclasses.asdict(r)["reason"] == "x"


# ---------------------------------------------------------------------------------------------
# Protocol edges (issue 11): message size, and who an agent listens to


GREEK = "αβγδεζηθικλμνξοπρστυφχψω"


def test_link_handoff_with_a_greek_reason_fits_and_an_impossible_one_fails_at_once() -> None:
    """Issue 11, item 1, through BatonLink.handoff: a 2,600-letter Greek reason reaches baton
    in one packet of about 5,300 bytes and is accepted; a reason that cannot fit raises
    MessageTooLarge naming ``reason`` at once (not HandoffRefused("timeout") 5 s later), and
    baton gets no handoff."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        _room, s1, link = await linked_triage(net)
        agent = Triage()
        await s1.start(agent)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(MessageTooLarge) as e:
            await link.handoff("billing", reason="😀" * 4096, agent=agent)
        assert e.value.field == "reason"
        assert loop.time() - t0 < 1.0, "failed at once"
        await asyncio.sleep(0.02)
        assert baton.types_from("agent-triage") == ["hello"]

        reason = "".join(GREEK[i % len(GREEK)] for i in range(2600))
        ticket = await link.handoff("billing", reason=reason, agent=agent)
        assert ticket.handoff_id == "h-1" and ticket.bundle["reason"] == reason
        sent = [p for p in net.log if p.src == "agent-triage" and p.topic == CONTROL_TOPIC]
        handoff = next(p for p in sent if json.loads(p.payload)["type"] == "handoff")
        assert 5_200 < len(handoff.payload) < 5_400
        assert json.loads(handoff.payload)["reason"] == reason
        await link.aclose()
        await s1.aclose()

    asyncio.run(main())


def test_link_takes_control_and_transfers_from_baton_only() -> None:
    """Issue 11, item 8: a caller (and a caller that gave itself ``baton.role``, and an agent
    without it) can neither drive the floor nor push context: control messages are dropped,
    a transfer's OPEN is answered ``not_authorized`` and nothing is buffered or kept; the
    refusals are counted. baton's own messages and bundle still get through."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room = FakeRoom(net, "agent-billing")
        s2: AgentSession[None] = AgentSession(llm=ScriptedLLM(billing_script))
        link = await BatonLink.attach(room, s2, agent_name="billing")  # type: ignore[arg-type]
        assert link.preparing and not link.floor.active
        transport = transport_for(room)
        intruders = [
            FakeRoom(net, "caller"),
            FakeRoom(net, "impostor", dict(BATON_ATTRIBUTES)),
            FakeRoom(net, "other-agent", kind=PARTICIPANT_KIND_AGENT),
        ]
        payload = bd.encode_bundle(
            build_handoff_bundle(
                llm.ChatContext.empty(), from_agent="triage", to_agent="billing", reason="x"
            )
        )
        for n, intruder in enumerate(intruders):
            forged = {"v": 1, "type": "activate", "id": f"x-{n}", "cause": "start"}
            await intruder.local_participant.publish_data(
                json.dumps(forged).encode(),
                destination_identities=[room.identity],
                topic=CONTROL_TOPIC,
            )
            with pytest.raises(TransferError) as e:
                await asyncio.wait_for(send_bundle(intruder, room.identity, payload, bd.META), 5)
            assert e.value.name == "not_authorized", e.value
        await asyncio.sleep(0.05)
        assert not link.floor.active and link.floor.last_activate is None
        assert link.refusals.total >= 2 * len(intruders)
        assert transport.endpoint.receivers.active == 0
        assert transport.endpoint.receivers.buffered == 0
        assert not transport._inbox, "nothing kept"

        # baton's bundle and activate are taken
        fwd = asyncio.ensure_future(send_bundle(baton.room, room.identity, payload, bd.META))
        received = await link.receive_context(timeout=5)
        await fwd
        assert received.from_agent == "triage"
        baton.send(room.identity, "activate", cause="handoff", handoff="h-1")
        await asyncio.wait_for(link.wait_active(), 2)
        await link.aclose()
        await s2.aclose()

    asyncio.run(main())


def test_link_sends_lossy_heartbeats_to_baton_only_from_hello_until_closed() -> None:
    """docs/protocol.md, "Checkpoints, heartbeats and recovery": hello announces heartbeat_ms,
    then a heartbeat every heartbeat_ms on baton.control, lossy, addressed to baton only;
    nothing after the link closes."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        FakeRoom(net, "caller")
        room = FakeRoom(net, "agent-triage")
        s: AgentSession[None] = AgentSession(llm=ScriptedLLM(billing_script))
        link = await BatonLink.attach(room, s, agent_name="triage", heartbeat_ms=50)  # type: ignore[arg-type]
        hello = next(m for _, m in baton.got if m["type"] == "hello")
        assert hello["heartbeat_ms"] == 50
        await asyncio.sleep(0.3)
        await link.aclose()
        beats = [p for p in net.log if b'"heartbeat"' in p.payload]
        assert len(beats) >= 3
        assert all((p.dest, p.reliable) == ("baton-1", False) for p in beats)
        seqs = [m["seq"] for _, m in baton.heartbeats]
        assert seqs == list(range(len(seqs))), seqs
        n = len(net.log)
        await asyncio.sleep(0.15)
        assert len(net.log) == n, "no heartbeat after aclose"

    asyncio.run(main())


def test_attach_without_baton_raises_coordinator_missing_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only an impostor (baton's attribute without kind agent) and another agent are in the
    room: attach gives up after ``find_timeout`` with ``coordinator_missing``, names the room,
    and logs it as an error."""

    async def main() -> None:
        net = Net()
        FakeRoom(net, "impostor", dict(BATON_ATTRIBUTES))
        FakeRoom(net, "other-agent", kind=PARTICIPANT_KIND_AGENT)
        room = FakeRoom(net, "agent-triage")
        session: AgentSession[None] = AgentSession()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(CoordinatorMissing) as e:
            await BatonLink.attach(room, session, agent_name="triage", find_timeout=0.3)  # type: ignore[arg-type]
        waited = loop.time() - start
        assert 0.3 <= waited < 2.0, waited
        assert e.value.code == "coordinator_missing" and e.value.room == room.name
        assert str(e.value).startswith("coordinator_missing: baton is not in room")
        assert isinstance(e.value, BatonError)

    with caplog.at_level("ERROR", logger="lk_baton.agents"):
        asyncio.run(main())
    assert any("coordinator_missing" in r.getMessage() for r in caplog.records), caplog.text


# ---------------------------------------------------------------------------------------------
# The tail of a handoff asked for at the start of the source's sentence


def _bundle(items: list[llm.ChatItem], **kw: Any) -> bd.Bundle:
    return build_handoff_bundle(
        llm.ChatContext(items), from_agent="triage", to_agent="billing", reason="r", **kw
    )


def test_the_tail_is_what_the_context_gained_by_call_id_for_calls() -> None:
    from lk_baton.agents import context_tail

    user = llm.ChatMessage(role="user", content=["I was charged twice"], created_at=1.0)
    said = llm.ChatMessage(role="assistant", content=["One moment, I'll pass"], created_at=2.0)
    transfer = llm.FunctionCall(
        call_id="c-t", name="transfer_to_billing", arguments="{}", created_at=2.1
    )
    slow = llm.FunctionCall(call_id="c-s", name="lookup", arguments="{}", created_at=2.1)
    flight: list[bd.ToolCallInFlight] = [
        {
            "call_id": "c-s",
            "name": "lookup",
            "arguments": "{}",
            "started_at": 2.1,
            "idempotency_key": "c-s",
            "rerun": "never",
            "note": "",
        }
    ]
    draft = _bundle(
        [user, slow], current_call=transfer, tool_calls_in_flight=flight, user_state={"name": "Ada"}
    )
    # the end of the sentence: the sentence was cut by a barge-in, the caller spoke, and the
    # slow call is still owed to the target (its output goes as a tool_result)
    cut = said.model_copy(update={"content": ["One moment"], "interrupted": True})
    more = llm.ChatMessage(role="user", content=["wait"], created_at=3.0)
    done = llm.FunctionCallOutput(
        call_id="c-s", name="lookup", output="{}", is_error=False, created_at=3.1
    )
    ctx = llm.ChatContext([user, cut, slow, done, more])
    items, state = context_tail(draft, ctx, {"name": "Ada", "verified": True})
    assert [i["id"] for i in items] == [said.id, more.id], items
    assert items[0]["content"] == ["One moment"] and items[0]["interrupted"] is True
    assert state == {"name": "Ada", "verified": True}
    # nothing gained: nothing to send
    assert context_tail(draft, llm.ChatContext([user, slow]), {"name": "Ada"}) == ([], None)
    # a message that changed is sent again under its id; an unchanged one is not
    draft2 = _bundle([user, said])
    items, _ = context_tail(draft2, llm.ChatContext([user, cut]), {})
    assert [(i["id"], i["content"]) for i in items] == [(said.id, ["One moment"])]
    assert context_tail(draft2, llm.ChatContext([user, said]), {}) == ([], None)
    # not owed (it ended before the accept): its output is in the tail, from the context ...
    items, _ = context_tail(draft, ctx, {"name": "Ada"}, owed=())
    assert [i["id"] for i in items] == [said.id, done.id, more.id]
    # ... or, before the framework committed it, from the journal
    from lk_baton.journal import ToolJournal

    journal = ToolJournal()
    journal.started("c-s", "lookup", "{}", now=2.1)
    journal.finished("c-s", '{"found": 1}', is_error=False, now=2.9)
    items, _ = context_tail(
        draft, llm.ChatContext([user, slow]), {"name": "Ada"}, journal=journal, owed=()
    )
    assert [(i["type"], i["call_id"], i["output"]) for i in items] == [
        ("function_call_output", "c-s", '{"found": 1}')
    ]


def test_a_target_puts_the_tail_into_its_context_before_its_first_reply() -> None:
    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        room = FakeRoom(net, "agent-billing")
        session: AgentSession[Caller] = AgentSession(
            llm=ScriptedLLM(billing_script), userdata=Caller(name="Ada")
        )
        link = await BatonLink.attach(room, session, agent_name="billing")  # type: ignore[arg-type]
        assert link.preparing
        agent = Billing()
        await session.start(agent)
        said = llm.ChatMessage(
            role="assistant", content=["I'll pass you to billing."], created_at=time.time()
        )
        later = llm.ChatMessage(role="user", content=["thanks"], created_at=time.time())
        as_dicts = llm.ChatContext([said, later]).to_dict(exclude_timestamp=False)["items"]
        baton.send("agent-billing", "tail", handoff="h-1", source="triage", items=as_dicts[:1])
        baton.send("agent-billing", "tail", handoff="h-9", source="triage", items=as_dicts[1:])
        baton.send(
            "agent-billing", "tail", handoff="h-1", source="triage", items=[{"type": "nope"}]
        )
        baton.send(
            "agent-billing",
            "tail",
            handoff="h-1",
            source="triage",
            items=[],
            user_state={"name": "Ada", "verified": True},
        )
        replies: list[str] = []
        session.on("conversation_item_added", lambda ev: replies.append(ev.item.type))
        baton.send("agent-billing", "activate", cause="handoff", handoff="h-1")
        await asyncio.wait_for(link.wait_active(), 2)
        for _ in range(200):
            if "message" in replies:
                break
            await asyncio.sleep(0.01)
        texts = [i.text_content for i in agent.chat_ctx.items if i.type == "message"]
        # in time order, before the reply it asked for; another handoff's tail is not ours,
        # and an invalid one is dropped (logged)
        assert texts[:2] == ["You are billing.", "I'll pass you to billing."], texts
        assert "thanks" not in texts and len(texts) == 3, texts
        assert isinstance(session.userdata, Caller) and session.userdata.verified
        # one that comes after the activation is applied as it comes
        baton.send("agent-billing", "tail", handoff="h-1", source="triage", items=as_dicts[1:])
        for _ in range(100):
            if any(
                i.type == "message" and i.text_content == "thanks" for i in agent.chat_ctx.items
            ):
                break
            await asyncio.sleep(0.01)
        assert any(i.type == "message" and i.text_content == "thanks" for i in agent.chat_ctx.items)
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_a_baton_that_came_back_gets_our_hello_before_our_unanswered_request() -> None:
    """A request resent to a baton that came back before our hello was answered reached a
    baton that had not given us the floor again, and was refused (not_floor_holder)."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        baton.silent = True  # the request goes unanswered: baton died meanwhile
        room, session, link = await linked_triage(net)
        _, fut = link.floor.request_handoff("billing", "refund", speaking=True)
        await asyncio.sleep(0.02)
        before = len(baton.got)
        baton.silent = False
        room.emit("participant_connected", baton.room.as_participant())  # baton is back
        await asyncio.wait_for(fut, 2)
        after = [m["type"] for _, m in baton.got[before:]]
        assert after.index("hello") < after.index("handoff"), after
        assert fut.result()["type"] == "handoff_accepted"
        await link.aclose()
        await session.aclose()

    asyncio.run(main())


def test_voice_drain_is_the_last_time_the_queue_ran_empty() -> None:
    from lk_baton.agents import VoiceDrain

    async def main() -> None:
        levels = [0.0, 0.3, 0.2, 0.0, 0.0, 0.1, 0.0]  # a refill between two sentences
        seen: list[float | None] = []  # the drain time as each poll finds it

        def queued() -> float:
            seen.append(drain.drained_at if polls else None)
            polls.append(1)
            return levels[min(len(polls), len(levels)) - 1]

        polls: list[int] = []
        drain = VoiceDrain(queued)
        while len(polls) < len(levels) + 1:
            await asyncio.sleep(0.005)
        last = drain.stop()
        # after each poll: none, none (audio), none, the first drain, the same, none (the
        # refill), the last drain
        assert [t is None for t in seen[1:8]] == [True, True, True, False, False, True, False]
        assert seen[4] == seen[5] and last == seen[7] and last is not None and last > seen[4]
        never = VoiceDrain(lambda: 0.0)
        await asyncio.sleep(0.02)
        assert never.stop() is None, "never seen holding audio: no drain"

    asyncio.run(main())
