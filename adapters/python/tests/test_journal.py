"""Tool calls exactly once (issue 12): the journal (lk_baton.journal), the @journaled tools and
session hooks (lk_baton.agents), bundles built from the journal, the receiving side's pairing
and rerun guard, and the late result forwarded through a scripted baton. Real AgentSessions run
headless with the scripted model of tests/fakes.py; the same scenarios run against the real
server and baton in tests/e2e/test_tool_calls.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fakes import (
    BookingBackend,
    BookingTools,
    FakeBaton,
    FakeRoom,
    Net,
    ScriptedLLM,
    ScriptedRealtime,
    Step,
)
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm

from lk_baton import bundle as bd
from lk_baton.agents import (
    BatonLink,
    build_handoff_bundle,
    journal_for,
    journaled,
    read_bundle,
    seed_agent,
)
from lk_baton.floor import MAX_TOOL_RESULT_SIZE, FloorClient, encode_control
from lk_baton.journal import ToolJournal, canonical_arguments, released_output

BOOKING = {"date": "2026-12-24", "party": 4}

# ---------------------------------------------------------------------------------------------
# The journal on its own


def test_journal_records_each_call_once_and_the_first_end_wins() -> None:
    ended: list[str] = []
    j = ToolJournal(
        key_factory=iter(["k1", "k2"]).__next__, listener=lambda c: ended.append(c.state)
    )
    a = j.started("c1", "book", '{"b":1,"a":2}', now=10.0)
    again = j.started("c1", "book", '{"b":1,"a":2}', now=11.0, rerun="if_idempotent")
    assert a is again and a.idempotency_key == "k1" and a.started_at == 10.0
    assert a.rerun == "if_idempotent"
    assert j.finished("c1", "booked", now=12.0) is a
    assert j.finished("c1", "other", now=13.0, exact=False) is None, "the first end wins"
    assert j.cancelled("c1", "late", now=14.0) is None
    assert (a.state, a.output, a.finished_at) == ("finished", "booked", 12.0)
    j.started("c2", "note", "{}", now=15.0)
    assert [c.call_id for c in j.running()] == ["c2"]
    assert j.cancelled("c2", "cancelled by handoff", now=16.0) is not None
    assert ended == ["finished", "cancelled"]
    assert j.finished("nope", "x", now=1.0) is None


def test_a_running_call_is_released_once_and_its_result_still_ends_it() -> None:
    j = ToolJournal(key_factory=lambda: "k1")
    c = j.started("c1", "create_reservation", "{}", now=1.0)
    assert j.release("c1", "barge_in") is c and c.released == "barge_in"
    assert j.release("c1", "handoff") is None, "the first release wins"
    assert c.running, "the tool was not stopped"
    assert j.finished("c1", "R-1", now=2.0) is c and c.released == "barge_in"
    j.started("c2", "save_note", "{}", now=3.0)
    j.finished("c2", "saved", now=4.0)
    assert j.release("c2", "handoff") is None and j.release("nope", "handoff") is None
    by_handoff = released_output(c, "handoff", "billing")
    assert by_handoff.startswith("Cancelled by handoff") and "goes to billing" in by_handoff
    assert "k1" in by_handoff and "not stopped" in by_handoff
    by_barge_in = released_output(c, "barge_in")
    assert by_barge_in.startswith("Cancelled by barge-in") and "not stopped" in by_barge_in


def test_inherited_calls_match_on_name_and_canonical_arguments() -> None:
    j = ToolJournal()
    entry: bd.ToolCallInFlight = {
        "call_id": "c1",
        "name": "create_reservation",
        "arguments": json.dumps(BOOKING),
        "started_at": 1.0,
        "idempotency_key": "key-1",
        "rerun": "never",
    }
    j.inherit([entry], "triage")
    same = json.dumps({"party": 4, "date": "2026-12-24"}, indent=1)
    assert canonical_arguments(same) == canonical_arguments(entry["arguments"])
    m = j.inherited_match("create_reservation", same)
    assert m is not None and m.idempotency_key == "key-1" and m.from_agent == "triage"
    assert j.inherited_match("create_reservation", '{"date":"2026-12-25","party":4}') is None
    assert j.inherited_match("save_note", same) is None
    assert j.resolve_inherited("c1", "R-1", is_error=False, now=2.0) is m
    assert j.resolve_inherited("c1", "R-1", is_error=False, now=3.0) is None
    assert j.inherited_match("create_reservation", same) is None, "outcome known now"


def test_tool_result_is_truncated_to_leave_room_for_batons_forward() -> None:
    sent: list[dict[str, Any]] = []

    class Sender:
        def send(self, msg: dict[str, Any]) -> None:
            sent.append(msg)

    class Effects:
        def set_input(self, enabled: bool) -> None: ...
        def set_output(self, enabled: bool) -> None: ...
        def speaking(self) -> bool:
            return False

    fc = FloorClient("triage", Sender(), Effects())
    fc.tool_result("h-1", "c1", "create_reservation", "R-1 confirmed")
    assert sent[-1]["output"] == "R-1 confirmed" and "truncated" not in sent[-1]
    big = "é" * 20_000  # 40 000 bytes of UTF-8
    msg = fc.tool_result("h-1", "c2", "create_reservation", big)
    size = len(encode_control(msg))
    assert msg["truncated"] is True
    assert MAX_TOOL_RESULT_SIZE - 40 <= size <= MAX_TOOL_RESULT_SIZE, size  # id length varies
    assert big.startswith(msg["output"])


# ---------------------------------------------------------------------------------------------
# The decorator


def test_journaled_tool_hides_its_run_context_and_runs_directly() -> None:
    @function_tool
    @journaled("never")
    async def book(date: str) -> str:
        """Book."""
        return f"booked {date}"

    @journaled(read_only=True)
    @function_tool
    async def look(date: str) -> str:
        """Look."""
        return f"free {date}"

    schema = llm.utils.build_legacy_openai_schema(book)
    assert set(schema["function"]["parameters"]["properties"]) == {"date"}
    schema2 = llm.utils.build_legacy_openai_schema(look)
    assert set(schema2["function"]["parameters"]["properties"]) == {"date"}
    assert asyncio.run(book("mon")) == "booked mon"
    assert getattr(look._func, "__lk_baton_rerun__", None) == "safe"
    assert getattr(book._func, "__lk_baton_rerun__", None) == "never"


# ---------------------------------------------------------------------------------------------
# Source side: bundles from the journal


def triage_script(batch: list[str]) -> Any:
    def script(ctx: llm.ChatContext) -> Step:
        last = ctx.items[-1]
        if last.type == "message" and last.role == "user":
            calls: list[tuple[str, dict[str, Any]]] = []
            for name in batch:
                if name == "create_reservation":
                    calls.append((name, dict(BOOKING)))
                elif name == "save_note":
                    calls.append((name, {"text": "wants a table by the window"}))
                else:
                    calls.append((name, {}))
            return ("One moment.", calls)
        return ("Done.", [])

    return script


class Triage(BookingTools, Agent):
    """triage's tools: a slow booking, a note, and a transfer that builds the bundle the way
    BatonLink.handoff does (``handoff_after``: seconds until baton's accept)."""

    def __init__(self, backend: BookingBackend, handoff_after: float = 0.8) -> None:
        super().__init__(instructions="You are triage.")
        self.backend = backend
        self.handoff_after = handoff_after
        self.bundle: bd.Bundle | None = None

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[None]) -> None:
        """Transfer to billing."""
        await asyncio.sleep(self.handoff_after)
        self.bundle = build_handoff_bundle(
            self.chat_ctx,
            from_agent="triage",
            to_agent="billing",
            reason="billing question",
            current_call=ctx.function_call,
            journal=journal_for(ctx.session),
            agent_id=self.id,
            handoff_id="h-1",
        )


def items(b: bd.Bundle, type_: str, name: str) -> list[dict[str, Any]]:
    return [i for i in b["chat"]["items"] if i["type"] == type_ and i.get("name") == name]


def test_booking_in_the_transfer_batch_is_in_the_bundle_in_flight() -> None:
    async def main() -> None:
        backend = BookingBackend(booking_delay=2.0)
        agent = Triage(backend)
        s: AgentSession[None] = AgentSession(
            llm=ScriptedLLM(triage_script(["create_reservation", "transfer_to_billing"]))
        )
        await s.start(agent)
        await s.run(user_input="Book a table for four on Christmas Eve, then billing please")
        b = agent.bundle
        assert b is not None
        bd.validate_bundle(b)
        calls = items(b, "function_call", "create_reservation")
        assert len(calls) == 1, "the booking's call is in the bundle once"
        assert items(b, "function_call_output", "create_reservation") == []
        flight = b["tool_calls_in_flight"]
        assert [(f["name"], f["rerun"]) for f in flight] == [("create_reservation", "never")]
        assert flight[0]["call_id"] == calls[0]["call_id"]
        assert flight[0]["idempotency_key"] == backend.bookings[0][1], "the key the tool was given"
        assert len(backend.bookings) == 1
        await s.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "batch", [["transfer_to_billing", "save_note"], ["save_note", "transfer_to_billing"]]
)
def test_sibling_that_finished_first_is_in_the_bundle_with_its_output(batch: list[str]) -> None:
    async def main() -> None:
        backend = BookingBackend()
        agent = Triage(backend, handoff_after=1.2)  # save_note ends 0.7 s before the bundle
        s: AgentSession[None] = AgentSession(llm=ScriptedLLM(triage_script(batch)))
        await s.start(agent)
        await s.run(user_input="Note that I want the window, and put me through to billing")
        b = agent.bundle
        assert b is not None
        assert len(items(b, "function_call", "save_note")) == 1
        outs = items(b, "function_call_output", "save_note")
        assert [o["output"] for o in outs] == ["saved"]
        assert b["tool_calls_in_flight"] == []
        assert backend.notes == ["wants a table by the window"]
        await s.aclose()

    asyncio.run(main())


def test_a_transfer_call_already_in_the_context_is_answered_not_in_flight() -> None:
    """livekit-agents' realtime path records a call in the context when its tool starts, so
    the transfer call being executed is there, unanswered, when the bundle is built; and a
    realtime plugin's output may have no name."""
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="billing please", created_at=1.0)
    out = llm.FunctionCallOutput(call_id="c0", name="", output="ok", is_error=False, created_at=1.2)
    transfer = llm.FunctionCall(
        call_id="t1", name="transfer_to_billing", arguments="{}", created_at=1.3
    )
    ctx.insert(
        [
            llm.FunctionCall(call_id="c0", name="lookup", arguments="{}", created_at=1.1),
            out,
            transfer,
        ]
    )
    b = build_handoff_bundle(
        ctx, from_agent="triage", to_agent="billing", reason="r", current_call=transfer
    )
    assert b["tool_calls_in_flight"] == []
    outs = [i for i in b["chat"]["items"] if i["type"] == "function_call_output"]
    assert [(o["call_id"], o.get("name")) for o in outs] == [
        ("c0", "lookup"),
        ("t1", "transfer_to_billing"),
    ]
    assert out.name == "", "the source's own item is left as it was"


# ---------------------------------------------------------------------------------------------
# Receiving side


def in_flight_bundle(*, name_less: bool = False) -> bd.Bundle:
    chat = llm.ChatContext.empty()
    chat.add_message(
        role="user", content="book a table for four on Christmas Eve", created_at=100.0
    )
    chat.insert(
        llm.FunctionCall(
            call_id="c1", name="create_reservation", arguments=json.dumps(BOOKING), created_at=101.0
        )
    )
    chat.insert(llm.FunctionCall(call_id="c0", name="lookup", arguments="{}", created_at=100.5))
    chat.insert(
        llm.FunctionCallOutput(
            call_id="c0", name="lookup", output="ok", is_error=False, created_at=100.6
        )
    )
    d = chat.to_dict(exclude_timestamp=False)
    if name_less:
        for it in d["items"]:
            if it["type"] == "function_call_output":
                del it["name"]
    return bd.build_bundle(
        from_agent="triage",
        to_agent="billing",
        reason="billing question",
        chat=d,
        tool_calls_in_flight=[
            {
                "call_id": "c1",
                "name": "create_reservation",
                "arguments": json.dumps(BOOKING),
                "started_at": 101.0,
                "idempotency_key": "key-1",
                "rerun": "never",
            }
        ],
        created_at=102.0,
    )


def test_in_flight_call_is_paired_with_an_output_the_model_sees() -> None:
    async def main() -> None:
        received = read_bundle(in_flight_bundle())
        outs = [
            i
            for i in received.chat_ctx.items
            if i.type == "function_call_output" and i.call_id == "c1"
        ]
        assert len(outs) == 1
        text = outs[0].output
        assert "In flight at the handoff" in text and "outcome unknown" in text
        assert "key-1" in text and "Check before retrying" in text
        assert outs[0].created_at == 102.0

        model = ScriptedLLM(lambda ctx: ("Let me check on that booking.", []))
        agent = await seed_agent(Agent(instructions="billing"), received)
        s: AgentSession[None] = AgentSession(llm=model)
        await s.start(agent)
        await s.generate_reply()
        sent = model.seen[-1]
        got = [
            (i.type, i.call_id)
            for i in sent.items
            if i.type in ("function_call", "function_call_output")
        ]
        assert ("function_call", "c1") in got and ("function_call_output", "c1") in got
        await s.aclose()

    asyncio.run(main())


def test_name_less_output_gets_the_name_of_its_call() -> None:
    b = in_flight_bundle(name_less=True)
    assert all("name" not in i for i in b["chat"]["items"] if i["type"] == "function_call_output")
    received = read_bundle(b)
    out = next(
        i for i in received.chat_ctx.items if i.type == "function_call_output" and i.call_id == "c0"
    )
    assert out.name == "lookup"


class Billing(BookingTools, Agent):
    def __init__(self, backend: BookingBackend) -> None:
        super().__init__(instructions="You are billing.")
        self.backend = backend


def naive_billing(ctx: llm.ChatContext) -> Step:
    """A model that books whenever the context has no confirmed booking."""
    last = ctx.items[-1]
    if last.type == "function_call_output" and last.name == "create_reservation":
        return ("Noted.", [])
    if not any(
        i.type == "function_call_output" and '"reservation":' in i.output for i in ctx.items
    ):
        return ("Let me book that.", [("create_reservation", dict(BOOKING))])
    return ("Your table is booked.", [])


async def billing_asked_after_handoff(billing: Agent) -> tuple[AgentSession[None], Agent]:
    """``billing`` seeded with ``in_flight_bundle()`` (triage's booking in flight, rerun "never")
    on a session that inherited the call, after the caller asks about the booking; the session
    and the seeded agent."""
    received = read_bundle(in_flight_bundle())
    s: AgentSession[None] = AgentSession(llm=ScriptedLLM(naive_billing))
    journal_for(s).inherit(received.tool_calls_in_flight, received.from_agent)
    agent = await seed_agent(billing, received)
    await s.start(agent)
    await s.run(user_input="is my table booked?")
    return s, agent


def test_rerun_never_call_is_not_run_again_unchecked() -> None:
    async def main() -> None:
        backend = BookingBackend(booking_delay=0.0)
        s, agent = await billing_asked_after_handoff(Billing(backend))
        assert backend.bookings == [], "the booking was not run a second time"
        out = [
            i
            for i in agent.chat_ctx.items
            if i.type == "function_call_output" and i.output.startswith("Not run")
        ]
        assert len(out) == 1 and "key-1" in out[0].output
        await s.aclose()

    asyncio.run(main())


def test_verify_hook_decides_and_a_rerun_reuses_the_idempotency_key() -> None:
    async def main() -> None:
        for verdict in ("R-9 exists for key-1", None):
            backend = BookingBackend(booking_delay=0.0)
            asked: list[str] = []

            async def verify(
                prior: Any, run_ctx: Any, verdict: str | None = verdict, asked: list[str] = asked
            ) -> str | None:
                asked.append(prior.idempotency_key)
                return verdict

            class Checked(Agent):
                def __init__(self, backend: BookingBackend) -> None:
                    super().__init__(instructions="billing")
                    self.backend = backend

                @function_tool
                @journaled("never", verify=verify)
                async def create_reservation(self, date: str, party: int) -> str:
                    """Book a table."""
                    return await self.backend.create_reservation(date, party)

            s, agent = await billing_asked_after_handoff(Checked(backend))
            assert asked == ["key-1"]
            if verdict is None:
                assert [k for _, k in backend.bookings] == ["key-1"], (
                    "run again with the inherited key"
                )
            else:
                assert backend.bookings == []
                assert any(
                    i.type == "function_call_output" and i.output == verdict
                    for i in agent.chat_ctx.items
                )
            await s.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Through a scripted baton: the late result, the cancelled reply, the reply not heard


class ForwardingBaton(FakeBaton):
    """FakeBaton that forwards a ``tool_result`` to billing once, as baton does."""

    def on_control(self, who: str, msg: dict[str, Any]) -> None:
        if msg["type"] == "tool_result":
            self.got.append((who, msg))
            fwd = {k: v for k, v in msg.items() if k not in ("v", "type", "id")}
            self.send("agent-billing", "tool_result", source="triage", **fwd)
            return
        super().on_control(who, msg)


class LinkedTriage(Triage):
    link: BatonLink | None = None

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[None]) -> None:  # type: ignore[override]
        """Transfer to billing."""
        assert self.link is not None
        ticket = await self.link.handoff("billing", reason="billing question", run_ctx=ctx)
        self.bundle = ticket.bundle


def test_late_result_reaches_the_new_holder_once_and_the_source_does_not_reply() -> None:
    async def main() -> None:
        net = Net()
        baton = ForwardingBaton(net)
        backend = BookingBackend(booking_delay=2.0)
        room_a = FakeRoom(net, "agent-triage")
        triage_model = ScriptedLLM(triage_script(["create_reservation", "transfer_to_billing"]))
        s1: AgentSession[None] = AgentSession(llm=triage_model)
        link_a = await BatonLink.attach(room_a, s1, agent_name="triage")  # type: ignore[arg-type]
        triage = LinkedTriage(backend)
        triage.link = link_a
        heard: list[llm.ChatMessage] = []
        s1.on(
            "conversation_item_added",
            lambda ev: (
                heard.append(ev.item)
                if ev.item.type == "message" and ev.item.role == "assistant"
                else None
            ),
        )
        await s1.start(triage)
        run = asyncio.ensure_future(s1.run(user_input="Book a table for four, then billing"))
        for _ in range(300):
            if triage.bundle is not None:
                break
            await asyncio.sleep(0.01)
        b = triage.bundle
        assert b is not None and [f["name"] for f in b["tool_calls_in_flight"]] == [
            "create_reservation"
        ]

        room_b = FakeRoom(net, "agent-billing")
        seen_by_billing = ScriptedLLM(lambda ctx: ("Billing here.", []))
        s2: AgentSession[None] = AgentSession(llm=seen_by_billing)
        link_b = await BatonLink.attach(room_b, s2, agent_name="billing")  # type: ignore[arg-type]
        received = read_bundle(b)
        link_b.journal.inherit(received.tool_calls_in_flight, received.from_agent)
        billing = await seed_agent(Billing(backend), received)
        await s2.start(billing)
        baton.send("agent-billing", "activate", cause="handoff", handoff="h-1")
        await run  # the booking has finished: the batch is done
        for _ in range(300):
            if link_b.late_results:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)

        results = [m for w, m in baton.got if w == "agent-triage" and m["type"] == "tool_result"]
        assert len(results) == 1 and results[0]["handoff"] == "h-1"
        assert json.loads(results[0]["output"])["reservation"] == "R-1"
        finals = [
            i
            for i in billing.chat_ctx.items
            if i.type == "function_call_output" and "R-1" in i.output
        ]
        assert len(finals) == 1, "billing has triage's result once"
        cid = b["tool_calls_in_flight"][0]["call_id"]
        assert finals[0].call_id == f"{cid}_final"
        assert [i.call_id for i in billing.chat_ctx.items if i.type == "function_call"].count(
            cid
        ) == 1
        assert len(backend.bookings) == 1, "booked once"
        # triage's own context closed the booking when it handed over (cancelled by handoff),
        # and its result landed there later as the <call_id>_final pair, once
        mine = [
            (i.type, i.call_id)
            for i in triage.chat_ctx.items
            if i.type in ("function_call", "function_call_output")
            and i.name == "create_reservation"
        ]
        assert mine == [
            ("function_call", cid),
            ("function_call_output", cid),
            ("function_call", f"{cid}_final"),
            ("function_call_output", f"{cid}_final"),
        ]
        closing = next(
            i
            for i in triage.chat_ctx.items
            if i.type == "function_call_output" and i.call_id == cid
        )
        assert closing.output.startswith("Cancelled by handoff") and "billing" in closing.output
        assert link_a.journal.get(cid) is not None
        assert link_a.journal.get(cid).released == "handoff"  # type: ignore[union-attr]
        # triage's model was not asked to reply to the booking after it lost the floor
        assert len(triage_model.seen) == 2  # its greeting and the caller's turn, no reply after
        assert all(not m.interrupted for m in heard if m.text_content == "One moment.")
        for x in (link_a, link_b):
            await x.aclose()
        await s1.aclose()
        await s2.aclose()

    asyncio.run(main())


def test_a_reply_made_while_the_output_is_off_is_marked_not_heard() -> None:
    async def main() -> None:
        net = Net()
        FakeBaton(net)
        room = FakeRoom(net, "agent-triage")
        s: AgentSession[None] = AgentSession(llm=ScriptedLLM(lambda ctx: ("Still here.", [])))
        link = await BatonLink.attach(room, s, agent_name="triage")  # type: ignore[arg-type]
        agent = Agent(instructions="triage")
        await s.start(agent)
        await s.run(user_input="hello")
        link.floor.handle({"v": 1, "type": "deactivate", "id": "b-9", "reason": "standby"})
        assert not link.effects.voiced
        await s.run(user_input="anyone?")
        said = [i for i in agent.chat_ctx.items if i.type == "message" and i.role == "assistant"]
        assert [m.interrupted for m in said][-2:] == [False, True]  # after its greeting
        await link.aclose()
        await s.aclose()

    asyncio.run(main())


async def until(pred: Any, what: str, tries: int = 300) -> None:
    """Polls ``pred`` every 10 ms, ``tries`` times at most."""
    for _ in range(tries):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def barge_in_on_the_booking(s: AgentSession[None], j: ToolJournal) -> Any:
    """The caller asks for a booking, then cuts in while its tool runs (``interrupt()``, as the
    framework's text input does). Returns the booking's journal entry."""
    s.generate_reply(user_input="Book a table for four on Christmas Eve")
    await until(lambda: bool(j.running()), "the booking never started")
    [call] = j.running()
    await s.interrupt()
    return call


def test_barge_in_closes_a_running_call_at_once_and_its_result_follows() -> None:
    """The caller cuts in while the booking runs: the interruption does not wait for the tool
    (livekit-agents would wait up to 5 s); the agent's context holds the call closed as
    cancelled by barge-in at once, the tool runs on and books once, and its result follows as
    the <call_id>_final pair, which (no baton link: nothing takes the floor away) the model is
    asked to answer."""

    async def main() -> None:
        backend = BookingBackend(booking_delay=1.0)
        model = ScriptedLLM(triage_script(["create_reservation"]))
        agent = Triage(backend)
        s: AgentSession[None] = AgentSession(llm=model)
        await s.start(agent)
        call = await barge_in_on_the_booking(s, journal_for(s))
        assert call.running and call.released == "barge_in", "interrupted, not waited for"
        outs = [
            i
            for i in agent.chat_ctx.items
            if i.type == "function_call_output" and i.call_id == call.call_id
        ]
        assert len(outs) == 1 and outs[0].output.startswith("Cancelled by barge-in")
        final = f"{call.call_id}_final"
        await until(
            lambda: any(getattr(i, "call_id", None) == final for i in model.seen[-1].items),
            "the model was never asked about the result",
        )
        finals = [
            i
            for i in agent.chat_ctx.items
            if i.type == "function_call_output" and i.call_id == f"{call.call_id}_final"
        ]
        assert len(finals) == 1 and '"reservation": "R-1"' in finals[0].output
        assert call.state == "finished" and len(backend.bookings) == 1
        assert any(
            getattr(i, "call_id", None) == f"{call.call_id}_final" for i in model.seen[-1].items
        ), "the model was asked to answer the result"
        await s.aclose()

    asyncio.run(main())


def test_a_checkpoint_leaves_out_the_barge_in_output_of_a_call_still_running() -> None:
    """A recovery from this checkpoint must see the booking in flight (outcome unknown), not
    "its result follows": the tool died with the crashed agent."""

    async def main() -> None:
        net = Net()
        baton = FakeBaton(net)
        backend = BookingBackend(booking_delay=1.0)
        model = ScriptedLLM(triage_script(["create_reservation"]))
        s: AgentSession[None] = AgentSession(llm=model)
        link = await BatonLink.attach(FakeRoom(net, "agent-triage"), s, agent_name="triage")  # type: ignore[arg-type]
        agent = Triage(backend)
        await s.start(agent)
        call = await barge_in_on_the_booking(s, link.journal)
        assert any(
            i.type == "function_call_output" and i.call_id == call.call_id
            for i in agent.chat_ctx.items
        ), "closed in the context (cancelled by barge-in)"

        def merged() -> tuple[list[Any], list[Any]]:
            state = baton.checkpoints["triage"]
            outs = [
                i["output"]
                for i in state.items
                if i.get("type") == "function_call_output" and i.get("call_id") == call.call_id
            ]
            return outs, [e["status"] for e in state.journal if e["call_id"] == call.call_id]

        async def settled() -> None:
            t = link.checkpoints
            assert t is not None
            link.checkpoint_soon()
            await asyncio.sleep(0.01)
            await until(
                lambda: t.in_flight is None and not t.pending and not link._checkpoint_scheduled,
                "checkpoints did not settle",
            )

        await settled()
        assert call.running and merged() == ([], ["started"])
        await until(lambda: not call.running, "the booking never ended")
        await asyncio.sleep(0.2)
        await settled()
        outs, status = merged()
        assert status == ["finished"] and len(outs) == 1
        assert outs[0].startswith("Cancelled by barge-in")
        await link.aclose()
        await s.aclose()

    asyncio.run(main())


def test_a_barge_in_on_a_realtime_model_closes_the_running_call_in_its_conversation() -> None:
    """The realtime path (a scripted stand-in for the model, fakes.ScriptedRealtime): the
    caller cuts in while the booking runs; the model's conversation gets the call's output at
    once, so the model is not left with an open call (the deadlock public reports describe),
    and the booking's result follows there once."""

    def script(conversation: llm.ChatContext, instructions: str | None) -> Step:
        last = conversation.items[-1] if conversation.items else None
        if last is not None and last.type == "message" and last.role == "user":
            return ("One moment.", [("create_reservation", dict(BOOKING))])
        return ("", [])

    async def main() -> None:
        backend = BookingBackend(booking_delay=1.0)
        model = ScriptedRealtime(script)
        s: AgentSession[None] = AgentSession(llm=model)
        agent = Triage(backend)
        await s.start(agent)
        call = await barge_in_on_the_booking(s, journal_for(s))

        def closing() -> list[llm.ChatItem]:
            return [
                i
                for i in model.sessions[-1].items
                if i.type == "function_call_output" and i.call_id == call.call_id
            ]

        await until(lambda: bool(closing()), "the call stayed open in the conversation", 100)
        outs = closing()
        assert call.running, "closed before the tool returned"
        assert len(outs) == 1 and outs[0].output.startswith("Cancelled by barge-in")
        await until(lambda: not call.running, "the booking never ended")
        await asyncio.sleep(0.3)
        conversation = model.sessions[-1].items
        finals = [
            i
            for i in conversation
            if i.type == "function_call_output" and i.call_id == f"{call.call_id}_final"
        ]
        assert len(finals) == 1 and '"reservation": "R-1"' in finals[0].output
        assert len(backend.bookings) == 1
        await s.aclose()

    asyncio.run(main())
