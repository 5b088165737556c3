"""Tool calls exactly once across a handoff (issue 12), on a real LiveKit server with a real
baton and two real livekit-agents `AgentSession`s (triage and a warm billing), each linked to
baton with `BatonLink` over its own `rtc.Room`. The models are scripted (a function of the
context); the caller's turns go to triage's session directly (`generate_reply(user_input=...)`,
and `interrupt()` first for a barge-in, as the framework's text input does).

Every scenario checks "exactly once" twice: in billing's context (the calls and outputs its
model is sent) and in the tool's own call count (a booking backend that counts its calls).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from harness import ROOT, TRIAGE_THEN_BILLING, LiveKitServer, config_file, joined_baton, run, token, wait_until
from livekit import rtc
from livekit.agents import Agent, AgentSession, RunContext, function_tool, llm
from lk_baton import BatonLink, HandoffTicket, default_on_activate, seed_agent

sys.path.insert(0, str(ROOT / "adapters" / "python" / "tests"))
from fakes import (  # the adapter tests' stand-ins
    BookingBackend,
    BookingTools,
    ScriptedLLM,
    ScriptedRealtime,
    Step,
)

CONFIG = (
    TRIAGE_THEN_BILLING
    + """
[handoff]
source_quiet_timeout = 2
join_timeout = 15
ready_timeout = 8
max_filler = 8
release = "standby"

[handoff.start_dispatch]
attempts = 1
"""
)

BOOKING = {"date": "2026-12-24", "party": 4}
NOTE = {"text": "wants a table by the window"}


# ---------------------------------------------------------------------------------------------
# Scripts for the scripted model (adapters/python/tests/fakes.py: script(chat_ctx) -> (text, calls))


def user_said(ctx: llm.ChatContext) -> list[str]:
    return [i.text_content or "" for i in ctx.items if i.type == "message" and i.role == "user"]


def triage_script(batch: list[str]) -> Callable[[llm.ChatContext], Step]:
    """Greets; on 'book ... billing' emits `batch` in one response; on 'also billing' (after a
    barge-in) the transfer alone; nothing else."""

    def script(ctx: llm.ChatContext) -> Step:
        last = ctx.items[-1] if ctx.items else None
        said = user_said(ctx)
        if not said:
            return ("Hello, triage here.", [])
        if last is None or last.type != "message" or last.role != "user":
            return ("", [])
        if "billing" not in said[-1]:
            return ("Sure.", [])
        if "just billing" in said[-1]:
            return ("Transferring you.", [("transfer_to_billing", {})])
        args = {"create_reservation": BOOKING, "save_note": NOTE, "transfer_to_billing": {}}
        return ("One moment.", [(name, dict(args[name])) for name in batch])

    return script


def billing_script(ctx: llm.ChatContext) -> Step:
    """Speaks only from its context. Without any trace of triage's booking in it, it books the
    caller's table itself (what happened before the fix: two reservations)."""
    last = ctx.items[-1] if ctx.items else None
    calls = [i for i in ctx.items if i.type == "function_call" and i.name == "create_reservation"]
    wanted = any("table" in s for s in user_said(ctx))
    finals = [n for n, i in enumerate(ctx.items) if i.type == "function_call_output" and i.call_id.endswith("_final")]
    if finals and not any(i.type == "message" and i.role == "assistant" for i in ctx.items[finals[-1] :]):
        return ("Good news: your table is booked.", [])  # the late result, not answered yet
    if last is not None and last.type == "function_call_output":
        return ("", [])
    if wanted and not calls:
        return ("Let me book that table for you.", [("create_reservation", dict(BOOKING))])
    return ("Billing here. I can see your table request.", [])


# ---------------------------------------------------------------------------------------------
# Tools and agents


class Triage(BookingTools, Agent):
    """``sentence``: seconds the transfer tool waits before it asks for the handoff, standing for
    the sentence before the transfer being played out (these sessions have no audio, so
    ``wait_for_playout`` returns at once): 0.8 s puts the accept where the issue saw it."""

    def __init__(self, backend: BookingBackend, sentence: float = 0.8) -> None:
        super().__init__(instructions="You are triage.")
        self.backend = backend
        self.sentence = sentence
        self.link: BatonLink | None = None
        self.ticket: HandoffTicket | None = None

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[None]) -> None:
        """Transfer the caller to billing."""
        assert self.link is not None
        await asyncio.sleep(self.sentence)
        self.ticket = await self.link.handoff("billing", reason="billing question", run_ctx=ctx)


class Billing(BookingTools, Agent):
    def __init__(self, backend: BookingBackend) -> None:
        super().__init__(instructions="You are billing.")
        self.backend = backend


@dataclass
class Side:
    room: rtc.Room
    session: AgentSession[None]
    link: BatonLink
    model: Any
    """The scripted model: a ScriptedLLM, or a ScriptedRealtime."""


async def join(
    server: LiveKitServer,
    room: str,
    name: str,
    script: Callable[[llm.ChatContext], Step],
    agent: Agent,
    **options: Any,
) -> Side:
    lk_room = rtc.Room()
    attrs = {"lk.agent.name": name, "lk.agent_name": name}
    await lk_room.connect(server.url, token(f"agent-{name}", room, kind="agent", attributes=attrs))
    model = options.pop("model", None) or ScriptedLLM(script)
    session: AgentSession[None] = AgentSession(llm=model)
    link = await BatonLink.attach(lk_room, session, agent_name=name, answer_timeout=10, **options)
    await session.start(agent)
    return Side(lk_room, session, link, model)


def said(ctx: llm.ChatContext) -> list[llm.ChatMessage]:
    return [i for i in ctx.items if i.type == "message" and i.role == "assistant"]


def types(ctx: llm.ChatContext) -> list[str]:
    return [f"{i.type}:{getattr(i, 'name', None) or getattr(i, 'role', '')}" for i in ctx.items]


def tool_items(ctx: llm.ChatContext, name: str) -> tuple[list[llm.FunctionCall], list[llm.FunctionCallOutput]]:
    calls = [i for i in ctx.items if i.type == "function_call" and i.name == name]
    outs = [i for i in ctx.items if i.type == "function_call_output" and i.name == name]
    return calls, outs


async def scenario(
    server: LiveKitServer,
    room: str,
    batch: list[str],
    *,
    barge_in_at: float | None = None,
    backend: BookingBackend | None = None,
    sentence: float = 0.8,
    after_barge_in: Callable[[Side, Triage], None] | None = None,
) -> tuple[Side, Side, Triage, Billing, BookingBackend]:
    backend = backend or BookingBackend()
    billing = Billing(backend)

    async def on_prepare(link: BatonLink, msg: dict[str, Any]) -> None:
        received = await link.receive_context(timeout=10)
        await seed_agent(billing, received)
        await link.ready()

    b = await join(server, room, "billing", billing_script, billing, on_prepare=on_prepare)
    triage = Triage(backend, sentence)
    a = await join(server, room, "triage", triage_script(batch), triage)
    triage.link = a.link
    await wait_until(lambda: a.link.floor.active, 10, "triage never got the floor")
    await wait_until(lambda: not b.link.floor.active and b.link.floor.answered, 10, "billing not on standby")
    if barge_in_at is None:
        a.session.generate_reply(user_input="Book a table for four on Christmas Eve, then billing please")
    else:
        a.session.generate_reply(user_input="Book a table for four on Christmas Eve, no billing yet")
        await asyncio.sleep(barge_in_at)
        await a.session.interrupt()  # the caller cuts in, as the framework's text input does
        if after_barge_in is not None:
            after_barge_in(a, triage)
        a.session.generate_reply(user_input="Actually, just billing please")
    await wait_until(lambda: b.link.floor.active, 20, "billing never got the floor")
    return a, b, triage, billing, backend


async def close(*sides: Side) -> None:
    for s in sides:
        await s.link.aclose()
        await s.session.aclose()
        await s.room.disconnect()


# ---------------------------------------------------------------------------------------------
# Scenarios


def test_booking_in_the_transfer_batch_reaches_billing_in_flight_then_its_result_once(server: LiveKitServer) -> None:
    room = f"tools-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def main() -> None:
            a, b, triage, billing, backend = await scenario(server, room, ["create_reservation", "transfer_to_billing"])
            try:
                assert triage.ticket is not None
                flight = triage.ticket.bundle["tool_calls_in_flight"]
                assert [(f["name"], f["rerun"]) for f in flight] == [("create_reservation", "never")]
                assert flight[0]["idempotency_key"] == backend.bookings[0][1]
                cid = flight[0]["call_id"]
                # the booking ends ~1.2 s after the accept: baton forwards triage's result to billing
                await wait_until(lambda: bool(b.link.late_results), 10, "the late result never reached billing")
                await wait_until(
                    lambda: any("is booked" in (i.text_content or "") for i in said(billing.chat_ctx)),
                    10,
                    "billing never told the caller",
                )
                await asyncio.sleep(1.0)  # a second copy, if any, would have arrived
                calls, outs = tool_items(billing.chat_ctx, "create_reservation")
                assert [c.call_id for c in calls] == [cid, f"{cid}_final"], "no booking by billing"
                assert [o.call_id for o in outs] == [cid, f"{cid}_final"]
                assert "In flight at the handoff" in outs[0].output and flight[0]["idempotency_key"] in outs[0].output
                assert json.loads(outs[1].output)["reservation"] == "R-1", "triage's result, once"
                assert len(b.link.late_results) == 1
                # the model was sent the in-flight pairing (not a dropped, unpaired call)
                first = next(s for s in b.model.seen if any(getattr(i, "call_id", None) == cid for i in s.items))
                assert any(i.type == "function_call_output" and i.call_id == cid for i in first.items)
                # the tool's own count: one booking, by triage; billing's journal never ran it
                assert len(backend.bookings) == 1
                assert [c.name for c in b.link.journal.calls()] == []
                # triage's own context closed the booking at the handoff, cancelled by handoff, so
                # a handback finds no call left open; its result landed there later as the
                # <call_id>_final pair, once ...
                t_calls, t_outs = tool_items(triage.chat_ctx, "create_reservation")
                assert [c.call_id for c in t_calls] == [cid, f"{cid}_final"]
                assert [o.call_id for o in t_outs] == [cid, f"{cid}_final"]
                assert t_outs[0].output.startswith("Cancelled by handoff") and "billing" in t_outs[0].output
                assert '"reservation"' in t_outs[1].output
                assert a.link.journal.get(cid) is not None and a.link.journal.get(cid).released == "handoff"
                # ... and its model was not asked to reply to it once it had lost the floor (two
                # requests: the greeting and the caller's turn)
                assert len(a.model.seen) == 2, [types(c) for c in a.model.seen]
            finally:
                await close(a, b)

        run(main(), timeout=120)


@pytest.mark.parametrize("batch", [["transfer_to_billing", "save_note"], ["save_note", "transfer_to_billing"]])
def test_sibling_that_finished_first_is_in_billings_context_once(server: LiveKitServer, batch: list[str]) -> None:
    room = f"tools-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def main() -> None:
            # save_note (0.5 s) ends 0.7 s before the bundle is built, as in the issue
            backend = BookingBackend(note_delay=0.5)
            a, b, triage, billing, backend = await scenario(server, room, batch, backend=backend, sentence=1.2)
            try:
                await asyncio.sleep(0.5)
                calls, outs = tool_items(billing.chat_ctx, "save_note")
                assert len(calls) == 1 and [o.output for o in outs] == ["saved"]
                assert outs[0].call_id == calls[0].call_id
                assert backend.notes == [NOTE["text"]]
                assert triage.ticket is not None and triage.ticket.bundle["tool_calls_in_flight"] == []
            finally:
                await close(a, b)

        run(main(), timeout=120)


@pytest.mark.parametrize("barge_in_at", [0.5, 2.5], ids=["while-booking-runs", "after-it-finished"])
def test_barge_in_then_handoff_keeps_the_booking_once(server: LiveKitServer, barge_in_at: float) -> None:
    """One batch [create_reservation (2 s), save_note (4 s)]; the caller cuts in while both run
    (0.5 s) or after the booking finished and while the note still runs (2.5 s), then asks for
    billing.

    Right after the barge-in, triage's own context holds every call of the batch closed: a
    finished one with its result, a running one with a "cancelled by barge-in" output while its
    tool runs on (the journal's release; without it the interruption waits for the tools). Then
    billing's context holds each call exactly once (finished with its output, or in flight and
    then its result, forwarded from the journal), and the backend ran each once."""
    room = f"tools-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def main() -> None:
            seen: dict[str, Any] = {}

            def snapshot(a: Side, triage: Triage) -> None:
                outs = {i.name: i.output for i in triage.chat_ctx.items if i.type == "function_call_output"}
                seen["outs"] = outs
                seen["running"] = {c.name: c.released for c in a.link.journal.running()}

            backend = BookingBackend(booking_delay=2.0, note_delay=4.0)
            a, b, _, billing, backend = await scenario(
                server,
                room,
                ["create_reservation", "save_note"],
                barge_in_at=barge_in_at,
                backend=backend,
                after_barge_in=snapshot,
            )
            try:
                running = {"save_note": "barge_in"}
                if barge_in_at < 2.0:
                    running["create_reservation"] = "barge_in"
                assert seen["running"] == running, seen
                assert set(seen["outs"]) == {"create_reservation", "save_note"}, seen
                for name in running:
                    assert seen["outs"][name].startswith("Cancelled by barge-in"), seen
                if "create_reservation" not in running:
                    assert '"reservation"' in seen["outs"]["create_reservation"], seen

                await wait_until(lambda: not a.link.journal.running(), 10, "the tools never ended")
                await wait_until(
                    lambda: len(b.link.late_results) == len(running), 10, "late results never reached billing"
                )
                await asyncio.sleep(1.0)  # a second copy, if any, would have arrived
                for name, result in (("create_reservation", '"reservation"'), ("save_note", "saved")):
                    calls, outs = tool_items(billing.chat_ctx, name)
                    original = [c for c in calls if not c.call_id.endswith("_final")]
                    assert len(original) == 1, (name, [c.call_id for c in calls])
                    cid = original[0].call_id
                    results = [o for o in outs if result in o.output]
                    assert len(results) == 1, (name, [o.output for o in outs])
                    assert results[0].call_id == (f"{cid}_final" if name in running else cid)
                    assert [o.call_id for o in outs].count(cid) == 1
                    assert not any(o.output.startswith("Cancelled by") for o in outs), "triage's own closing"
                assert len(backend.bookings) == 1 and backend.notes == [NOTE["text"]]
            finally:
                await close(a, b)

        run(main(), timeout=120)


# ---------------------------------------------------------------------------------------------
# A handback to a realtime model

HANDBACK_CONFIG = CONFIG.replace("ready_timeout = 8", "ready_timeout = 2")


def realtime_triage_script(conversation: llm.ChatContext, instructions: str | None) -> Step:
    """triage on a realtime model. On 'book ... billing': one response with a lookup the
    realtime backend runs itself (its output has no name), the booking and the transfer. On the
    handback ('did not work' in the instructions): a booking whose call has no output looks
    unanswered, and the model books again (the duplicate this test guards against)."""
    said = user_said(conversation)
    if not said:
        return ("Hello, triage here.", [])
    last = conversation.items[-1]
    if last.type == "message" and last.role == "user" and "billing" in said[-1]:
        calls = [("check_availability", dict(BOOKING)), ("create_reservation", dict(BOOKING))]
        return ("One moment.", [*calls, ("transfer_to_billing", {})])
    if instructions and "did not work" in instructions:
        answered = {i.call_id for i in conversation.items if i.type == "function_call_output"}
        booked = [i for i in conversation.items if i.type == "function_call" and i.name == "create_reservation"]
        if not any(c.call_id in answered for c in booked):
            return ("Let me book that table for you.", [("create_reservation", dict(BOOKING))])
        return ("Billing is not available right now; your booking is under way.", [])
    return ("", [])


def test_handback_to_a_realtime_triage_finds_no_call_open_and_books_once(server: LiveKitServer) -> None:
    """triage runs on a realtime model (livekit-agents' realtime path; a scripted stand-in for
    the model). One response: a lookup run by the realtime backend (a name-less output, as
    realtime plugins write), a booking that takes 6 s, and the transfer. billing receives the
    bundle but never gets ready, so baton hands the call back (target_not_ready) while the
    booking still runs.

    At the handback, triage's realtime conversation has an output for every call (the booking
    closed as cancelled by handoff), so the model does not book again; the booking's result
    lands in triage's context once (not forwarded: the floor came back); the name-less output
    reached billing with its call's name."""
    room = f"tools-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(HANDBACK_CONFIG)):

        async def main() -> None:
            backend = BookingBackend(booking_delay=6.0)
            billing = Billing(backend)
            got: dict[str, Any] = {}

            async def on_prepare(link: BatonLink, msg: dict[str, Any]) -> None:
                got["received"] = await link.receive_context(timeout=10)  # and never ready()

            b = await join(server, room, "billing", billing_script, billing, on_prepare=on_prepare)
            lookup_tool = {"check_availability": lambda args: "available"}
            model = ScriptedRealtime(realtime_triage_script, backend_tools=lookup_tool)
            triage = Triage(backend)

            async def on_activate(link: BatonLink, msg: dict[str, Any]) -> None:
                if msg.get("cause") == "handback":
                    conversation = model.sessions[-1].items
                    answered = {i.call_id for i in conversation if i.type == "function_call_output"}
                    calls = [i for i in conversation if i.type == "function_call"]
                    got["open"] = [i.name for i in calls if i.call_id not in answered]
                    got["running"] = {c.name: c.released for c in link.journal.running()}
                    outputs = [i for i in triage.chat_ctx.items if i.type == "function_call_output"]
                    got["lookup"] = [o.name for o in outputs if o.output == "available"]
                    got["responses"] = len(model.sessions[-1].responses)
                    got["handback"] = msg
                await default_on_activate(link, msg)

            a = await join(server, room, "triage", realtime_triage_script, triage, model=model, on_activate=on_activate)
            triage.link = a.link
            try:
                await wait_until(lambda: a.link.floor.active, 10, "triage never got the floor")
                await wait_until(lambda: not b.link.floor.active and b.link.floor.answered, 10, "billing standby")
                a.session.generate_reply(user_input="Book a table for four on Christmas Eve, then billing please")
                await wait_until(lambda: "handback" in got, 20, "no handback")
                assert got["handback"]["reason"] == "target_not_ready"
                assert got["running"] == {"create_reservation": "handoff"}, got
                assert got["open"] == [], "a call still open in the realtime conversation at the handback"
                # the greeting and the caller's turn: no response asked for while billing had the call
                assert got["responses"] == 2, got

                await wait_until(lambda: not a.link.journal.running(), 10, "the booking never ended")
                await asyncio.sleep(1.5)  # the result's reply, and any second booking, have happened
                assert len(backend.bookings) == 1, "booked again after the handback"
                conversation = model.sessions[-1].items
                booked = [i for i in conversation if i.type == "function_call" and i.name == "create_reservation"]
                assert len([c for c in booked if not c.call_id.endswith("_final")]) == 1, "no second call"
                calls, outs = tool_items(triage.chat_ctx, "create_reservation")
                cid = calls[0].call_id
                assert [c.call_id for c in calls] == [cid, f"{cid}_final"]
                assert [o.call_id for o in outs] == [cid, f"{cid}_final"]
                assert outs[0].output.startswith("Cancelled by handoff")
                assert json.loads(outs[1].output)["reservation"] == "R-1", "its result, once"
                assert b.link.late_results == [], "not forwarded: triage holds the floor again"

                # the backend's lookup: name-less in triage's own context (at the handback; the
                # framework drops it later, a call of a tool triage does not have, when it
                # inserts the booking's result), named in billing's
                assert got["lookup"] == [""], "the realtime path wrote it without a name"
                received = got["received"]
                outputs = [i for i in received.chat_ctx.items if i.type == "function_call_output"]
                named = [o for o in outputs if o.output == "available"]
                assert [o.name for o in named] == ["check_availability"]
                in_bundle = [i for i in received.bundle["chat"]["items"] if i.get("output") == "available"]
                assert [o.get("name") for o in in_bundle] == ["check_availability"]
            finally:
                await close(a, b)

        run(main(), timeout=120)
