"""The triage agent of the support desk: a livekit-agents worker named ``triage``.

It greets the caller, looks up their account (``lookup_account`` returns a fixed record), and
hands billing problems to the ``billing`` agent, another worker process, through baton
(``transfer_to_billing`` -> ``BatonLink.handoff``). Run: ``python triage.py`` with LIVEKIT_URL,
LIVEKIT_API_KEY and LIVEKIT_API_SECRET set (see README.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool, llm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from desk import (
    ACCOUNT_RE,
    Caller,
    Step,
    item_summary,
    make_llm,
    make_tts,
    run_worker,
    say,
    tool_output,
    user_messages,
)
from lk_baton import (
    RECOVERY_GREETING,
    BatonLink,
    HandoffRefused,
    chat_item_dict,
    current_tool_call,
    default_on_prepare,
    journaled,
    seed_agent,
)
from lk_baton.checkpoint import canonical

AGENT_NAME = "triage"

INSTRUCTIONS = (
    "You are the triage agent of a support desk. Greet the caller, ask for their account "
    "number, look the account up with lookup_account, and when the problem is about a bill, a "
    "charge or a refund, say one short sentence and call transfer_to_billing with a one-line "
    "reason. When the caller asks for a technician, book a visit with book_technician. Keep "
    "every answer short."
)

ACCOUNTS: dict[str, dict[str, Any]] = {
    "A-1001": {
        "account_id": "A-1001",
        "name": "Ada Lovelace",
        "plan": "Pro",
        "last_invoice": "March",
        "charges": [{"month": "March", "amount": 49.0}, {"month": "March", "amount": 49.0}],
    }
}

BILLING_WORDS = ("bill", "charge", "refund", "invoice", "paid", "payment")


def triage_script(ctx: llm.ChatContext) -> Step:
    """What the scripted stand-in for the model says and calls, given the context."""
    said = user_messages(ctx)
    account = tool_output(ctx, "lookup_account")
    last = ctx.items[-1] if ctx.items else None
    if last is not None and last.type == "message" and last.role == "system" and last.text_content == RECOVERY_GREETING:
        return (recovery_greeting(said, account), [])
    if not said:
        return ("Hello, this is the support desk. How can I help you today?", [])
    text = " ".join(said)
    if account is None:
        m = ACCOUNT_RE.search(text)
        if m is None:
            return ("Could you tell me your account number, please?", [])
        return ("One moment, let me look up your account.", [("lookup_account", {"account_id": m.group(1)})])
    transfers = sum(1 for i in ctx.items if i.type == "function_call" and i.name == "transfer_to_billing")
    if transfers == 1 and "again" in said[-1].lower():
        # the caller asks for billing once more after a handback ("please try billing again")
        reason = f"billing problem on account {account['account_id']}, second try: {said[0]}"
        return ("Let me try our billing team again.", [("transfer_to_billing", {"reason": reason})])
    if transfers:
        # baton handed the call back (billing never came): do not loop on transfers
        return (
            "I am sorry, our billing team is not available right now. "
            "I have noted your problem and they will call you back today.",
            [],
        )
    if (tech := technician_step(ctx, said[-1], account)) is not None:
        return tech
    if any(w in text.lower() for w in BILLING_WORDS):
        reason = f"billing problem on account {account['account_id']}: {said[0]}"
        return (
            f"Thanks {account['name'].split()[0]}, that is one for our billing team. I am transferring you now.",
            [("transfer_to_billing", {"reason": reason})],
        )
    return ("I see your account. What is the problem?", [])


EARLY_REQUEST = os.environ.get("DESK_EARLY_REQUEST", "1") != "0"
"""``DESK_EARLY_REQUEST=0``: ``BatonLink.attach(..., early_request=False)``, so the handoff is
asked for after the sentence said with the transfer tool (with ``quiet``), not when the tool is
called (the adapter's default: baton prepares billing during the sentence)."""
TOOL_HINT = os.environ.get("DESK_TOOL_HINT", "1") != "0"
"""``DESK_TOOL_HINT=0``: ``BatonLink.handoff(..., hint=False)``: with ``DESK_EARLY_REQUEST=0``,
billing is then dispatched after the sentence (a cold handoff) instead of when the transfer tool
is called."""
SOURCE_FILLER = os.environ.get("DESK_SOURCE_FILLER", "1") != "0"
"""``DESK_SOURCE_FILLER=0``: ``BatonLink.attach(..., source_filler=False)``, so triage plays no
filler of its own on a ``baton-filler`` track at a handoff and the caller hears baton's alone
(the adapter's default is to play both)."""
HINT = os.environ.get("DESK_HINT", "") == "1"
"""``DESK_HINT=1``: hint baton about billing as soon as the caller's words are about a bill
(:func:`hint_billing_on_words`), so billing is in the room, warm, when the transfer comes."""


def hint_billing_on_words(baton: BatonLink, session: AgentSession[Caller]) -> None:
    """A rule on the caller's words: a user turn about a bill, a charge or a refund makes a
    handoff to billing likely, so tell baton now (``BatonLink.hint``), while the model still
    looks the account up and talks. baton refuses a repeat within its ``hint_interval``, and a
    hint from an agent not holding the floor, so this needs no bookkeeping of its own."""

    def on_item(ev: Any) -> None:
        item = ev.item
        if item.type != "message" or item.role != "user" or not baton.floor.active:
            return
        if any(w in (item.text_content or "").lower() for w in BILLING_WORDS):
            baton.hint("billing")
            say(AGENT_NAME, f"hinted billing room={baton.room.name}")

    session.on("conversation_item_added", on_item)


def technician_step(ctx: llm.ChatContext, last_said: str, account: dict[str, Any]) -> Step | None:
    """The caller's last words ask for a technician: book one, then say how it went (a booking
    whose outcome is unknown, because the previous triage died while it ran, is not confirmed)."""
    if "technician" not in last_said.lower():
        return None
    asked = max(i for i, it in enumerate(ctx.items) if it.type == "message" and it.role == "user")
    since = ctx.items[asked + 1 :]
    out = next(
        (it for it in reversed(since) if it.type == "function_call_output" and it.name == "book_technician"), None
    )
    if out is not None:
        if '"booked"' in out.output:
            return ("A technician will visit you tomorrow.", [])
        return (
            "I cannot confirm that booking yet, so I will not book a second visit; I will check and call you back.",
            [],
        )
    if any(it.type == "function_call" and it.name == "book_technician" for it in since):
        return None
    return (
        "One moment, I am booking a technician visit.",
        [("book_technician", {"account_id": account["account_id"]})],
    )


def recovery_greeting(said: list[str], account: dict[str, Any] | None) -> str:
    """The replacement's first sentence after a crash: what the caller said last, so they hear
    that the conversation is known."""
    if not said:
        return "Sorry, we were cut off for a moment. How can I help you today?"
    who = f"{account['name'].split()[0]}, " if account else ""
    return f'Sorry, we were cut off for a moment. {who}you were saying: "{said[-1].rstrip(".!?")}". Let us carry on.'


TECHNICIAN_SECONDS = float(os.environ.get("DESK_TECHNICIAN_SECONDS", "1"))
"""How long ``book_technician``'s booking takes; tests/e2e/test_recovery_kills.py makes it long
enough to kill triage's job while the booking runs."""

REPORT_CHECKPOINTS = os.environ.get("DESK_REPORT_CHECKPOINTS") == "1"
"""Print every acknowledged checkpoint's items (id, digest) and the items a replacement
recovered, so a test can compare them item for item from outside (tests/e2e/test_recovery.py)."""


def digest(item: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(item)).hexdigest()[:16]


def report_checkpoint(link: BatonLink) -> None:
    t = link.checkpoints
    if t is not None:
        items = [[iid, hashlib.sha256(text.encode()).hexdigest()[:16]] for iid, text in t.sent_items()]
        say(AGENT_NAME, f"checkpoint acked seq={t.acked_seq} items={json.dumps(items)}")
        calls = [[e["name"], e["status"]] for e in t.sent_journal()]
        say(AGENT_NAME, f"checkpoint journal seq={t.acked_seq} calls={json.dumps(calls)}")


class TriageAgent(Agent):
    def __init__(self, baton: BatonLink | None) -> None:
        super().__init__(instructions=INSTRUCTIONS)
        self.baton = baton

    @function_tool
    async def lookup_account(self, ctx: RunContext[Caller], account_id: str) -> str:
        """Look up a customer account by its id (like A-1001)."""
        record = ACCOUNTS.get(account_id.strip().upper())
        if record is None:
            return json.dumps({"error": f"no account {account_id}"})
        ctx.userdata.account_id = record["account_id"]
        ctx.userdata.name = record["name"]
        ctx.userdata.plan = record["plan"]
        return json.dumps(record)

    @function_tool
    @journaled("never")
    async def book_technician(self, account_id: str) -> str:
        """Book a technician visit for an account. Not read-only: a second run books a second visit."""
        call = current_tool_call()
        say(AGENT_NAME, f"book_technician started pid={os.getpid()} key={call.idempotency_key if call else None}")
        await asyncio.sleep(TECHNICIAN_SECONDS)
        return json.dumps({"booked": "technician visit", "account_id": account_id, "day": "tomorrow"})

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[Caller], reason: str) -> str | None:
        """Transfer the caller to the billing team. `reason`: one line on the problem."""
        if self.baton is None:
            return "Transfers are not available right now."
        ctx.userdata.problem = reason
        try:
            ticket = await self.baton.handoff(
                "billing",
                reason=reason,
                run_ctx=ctx,
                tried=[{"action": "looked up account", "outcome": str(ctx.userdata.account_id)}],
                outcome="billing issue, needs the billing team",
                hint=TOOL_HINT,
            )
        except HandoffRefused as e:
            return f"The transfer to billing failed ({e.reason}); tell the caller and keep helping."
        say(AGENT_NAME, f"handoff accepted id={ticket.handoff_id} bundle_bytes={ticket.bundle_bytes}")
        if REPORT_CHECKPOINTS:
            # the bundle and what followed it as the tail (the sentence said with this call), in
            # the context's (time) order, as the target puts them together
            held = sorted([*ticket.bundle["chat"]["items"], *ticket.tail], key=lambda i: i.get("created_at", 0.0))
            items = [item_summary(i) for i in held]
            say(AGENT_NAME, f"handoff items={json.dumps(items)}")
        return None  # no reply: our own filler and baton's cover the gap until billing speaks


def report_recovered(agent: Agent) -> None:
    if REPORT_CHECKPOINTS:
        items = [[i.id, digest(chat_item_dict(i))] for i in agent.chat_ctx.items]
        say(AGENT_NAME, f"recovered items={json.dumps(items)}")
        outputs = [[i.name, i.output] for i in agent.chat_ctx.items if i.type == "function_call_output"]
        say(AGENT_NAME, f"recovered outputs={json.dumps(outputs)}")


async def prepared_on_standby(link: BatonLink, msg: dict[str, Any]) -> None:
    """A standby triage chosen to replace a crashed one: the adapter's default (bundle, seed,
    ready), then the report of what it recovered."""
    running = link.session.agent_state != "initializing"  # else the entrypoint prepares itself
    await default_on_prepare(link, msg)
    if running:
        report_recovered(link.session.current_agent)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session: AgentSession[Caller] = AgentSession(llm=make_llm(triage_script), tts=make_tts("en-us"), userdata=Caller())
    baton = await BatonLink.attach(
        ctx,
        session,
        role="triage",
        on_prepare=prepared_on_standby,
        source_filler=SOURCE_FILLER,
        early_request=EARLY_REQUEST,
    )
    agent = TriageAgent(baton)
    if baton.preparing:
        # a replacement after a crash (prepare with cause "recovery"): the crashed triage's
        # last checkpoint arrives as a bundle; go on from it
        received = await baton.receive_context(timeout=10, user_state_type=Caller)
        say(
            AGENT_NAME,
            f"context from={received.from_agent} cause={received.cause} items={len(received.chat_ctx.items)} "
            f"recovery={received.handoff_id}",
        )
        agent = await seed_agent(TriageAgent(baton), received)
        if isinstance(received.user_state, Caller):
            session.userdata = received.user_state
        report_recovered(agent)
    if REPORT_CHECKPOINTS:
        baton.on_checkpoint_acked = report_checkpoint
    if HINT:
        hint_billing_on_words(baton, session)
    session.on(
        "conversation_item_added",
        lambda ev: (
            say(AGENT_NAME, f"said: {ev.item.text_content}")
            if ev.item.type == "message" and ev.item.role == "assistant"
            else None
        ),
    )
    await session.start(
        agent=agent,
        room=ctx.room,
        room_options=baton.room_options(audio_input=False),  # the caller types (lk.chat)
    )
    if baton.preparing:
        await baton.ready()
    say(
        AGENT_NAME,
        f"joined room={ctx.room.name} identity={ctx.room.local_participant.identity} pid={os.getpid()}",
    )


if __name__ == "__main__":
    run_worker(AGENT_NAME, entrypoint)
