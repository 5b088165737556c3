"""The billing agent of the support desk: a livekit-agents worker named ``billing``.

baton dispatches it when triage hands a call over. It receives triage's context bundle, builds
its agent from it (keeping triage's ``lookup_account`` call and result although billing has no
such tool), tells baton it is ready, and when activated speaks first with what triage learnt.
Run: ``python billing.py`` with LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool, llm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from desk import (
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
    chat_item_dict,
    default_on_activate,
    default_on_prepare,
    seed_agent,
)

AGENT_NAME = "billing"

BASE_INSTRUCTIONS = (
    "You are the billing agent of a support desk. The caller was transferred to you. Speak "
    "first: in one or two sentences, show that you know who they are and what their problem "
    "is from the conversation so far (never ask them to repeat it), then solve it. You can "
    "refund duplicate charges with refund_charge. Keep answers short."
)


READY_DELAY = float(os.environ.get("DESK_BILLING_READY_DELAY", "0"))
"""Seconds a prepared billing waits before it says ``ready``: tests/e2e/test_recovery_kills.py
kills billing's job in that window (a handoff target dying while it is prepared)."""


def billing_instructions(reason: str | None) -> str:
    if not reason:
        return BASE_INSTRUCTIONS
    return f"{BASE_INSTRUCTIONS}\nTriage transferred the call because: {reason}"


def billing_script(ctx: llm.ChatContext) -> Step:
    """The scripted stand-in: its first sentence uses only facts from triage's context."""
    account = tool_output(ctx, "lookup_account")
    said = user_messages(ctx)
    spoke = any(i.type == "message" and i.role == "assistant" and i.created_at > _handoff_at(ctx) for i in ctx.items)
    last_item = ctx.items[-1] if ctx.items else None
    if last_item is not None and last_item.type == "message" and last_item.role == "system":
        if last_item.text_content == RECOVERY_GREETING:  # a replacement after a crash
            where = f'you were saying: "{said[-1].rstrip(".!?")}"' if said else "how can I help?"
            return (f"Sorry, we were cut off for a moment. This is billing again; {where}.", [])
    if not spoke:
        if account is None or not said:
            return ("Hello, this is billing. How can I help you?", [])
        first = account["name"].split()[0]
        return (
            f"Hello {first}, this is billing. I have your account {account['account_id']} on the "
            f"{account['plan']} plan, and I understand {as_heard(said[0])}. "
            "I can see the duplicate charge.",
            [],
        )
    last = ctx.items[-1]
    if last.type == "function_call_output" and last.name == "refund_charge":
        return ("Done: the duplicate charge is refunded. Anything else?", [])
    if said and any(w in said[-1].lower() for w in ("yes", "please", "refund", "ok")):
        month = "March"
        if account and account.get("last_invoice"):
            month = str(account["last_invoice"])
        amount = 0.0
        if account and account.get("charges"):
            amount = float(account["charges"][-1]["amount"])
        return ("", [("refund_charge", {"month": month, "amount": amount})])
    return ("Shall I refund the duplicate charge?", [])


def as_heard(words: str) -> str:
    """The caller's problem in the second person: "I was charged twice for March." ->
    "you were charged twice for March"."""
    m = re.search(r"\bI (was|am|have|need|got|can't|cannot)\b(.*)", words)
    if m is None:
        return f'you said: "{words.rstrip(".")}"'
    verb = {"was": "were", "am": "are"}.get(m.group(1), m.group(1))
    return f"you {verb}{m.group(2).rstrip('.!?')}"


def _handoff_at(ctx: llm.ChatContext) -> float:
    at = [i.created_at for i in ctx.items if i.type == "agent_handoff"]
    return at[-1] if at else 0.0


def dispatched_for_handoff(metadata: str | None) -> bool:
    """Whether the job's dispatch metadata says baton sent us as a handoff target
    (``{"baton": {"purpose": "handoff", ...}}``)."""
    try:
        meta = json.loads(metadata or "")
    except ValueError:
        return False
    baton = meta.get("baton") if isinstance(meta, dict) else None
    return isinstance(baton, dict) and baton.get("purpose") == "handoff"


class BillingAgent(Agent):
    def __init__(self, reason: str | None = None) -> None:
        super().__init__(instructions=billing_instructions(reason))

    @function_tool
    async def refund_charge(self, ctx: RunContext[Caller], month: str, amount: float) -> str:
        """Refund a duplicate charge of `amount` for `month`."""
        ctx.userdata.notes.append(f"refunded {amount} for {month}")
        return json.dumps({"refunded": amount, "month": month, "account": ctx.userdata.account_id})


REPORT_ITEMS = os.environ.get("DESK_REPORT_CHECKPOINTS") == "1"
"""Print the items a billing prepared on standby holds (``item_summary``), so a test can compare
them with the bundle triage sent (tests/e2e/test_standby.py)."""


async def prepared_on_standby(link: BatonLink, msg: dict[str, Any]) -> None:
    """A standby billing chosen as the target (a warm handoff): the adapter's default (bundle,
    seed into the running agent, ready), then, if asked, the report of what it holds."""
    running = link.session.agent_state != "initializing"  # else the entrypoint prepares itself
    await default_on_prepare(link, msg)
    if running:
        say(AGENT_NAME, f"prepared on standby room={link.room.name} identity={link.room.local_participant.identity}")
        if REPORT_ITEMS:
            items = [item_summary(chat_item_dict(i)) for i in link.session.current_agent.chat_ctx.items]
            say(AGENT_NAME, f"standby items={json.dumps(items)}")


async def reported_on_activate(link: BatonLink, msg: dict[str, Any]) -> None:
    """The adapter's default (speak first), after the report of what billing holds now that
    the source's tail is in (``DESK_REPORT_CHECKPOINTS=1``)."""
    if REPORT_ITEMS and msg.get("cause") == "handoff":
        items = [item_summary(chat_item_dict(i)) for i in link.session.current_agent.chat_ctx.items]
        say(AGENT_NAME, f"activated items={json.dumps(items)}")
    await default_on_activate(link, msg)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session: AgentSession[Caller] = AgentSession(llm=make_llm(billing_script), tts=make_tts("en-gb"), userdata=Caller())
    baton = await BatonLink.attach(
        ctx, session, role="billing", on_prepare=prepared_on_standby, on_activate=reported_on_activate
    )
    agent = BillingAgent()
    if not baton.preparing and dispatched_for_handoff(ctx.job.metadata):
        # baton dispatched us for a handoff but its prepare is not here yet: wait for it
        with contextlib.suppress(TimeoutError):
            await baton.wait_prepare(timeout=8)
    if baton.preparing:
        received = await baton.receive_context(timeout=10, user_state_type=Caller)
        say(
            AGENT_NAME,
            f"context from={received.from_agent} items={len(received.chat_ctx.items)} handoff={received.handoff_id}",
        )
        agent = await seed_agent(BillingAgent(received.reason), received)
        if isinstance(received.user_state, Caller):
            session.userdata = received.user_state
    session.on(
        "conversation_item_added",
        lambda ev: (
            say(AGENT_NAME, f"said: {ev.item.text_content}")
            if ev.item.type == "message" and ev.item.role == "assistant"
            else None
        ),
    )
    await session.start(agent=agent, room=ctx.room, room_options=baton.room_options(audio_input=False))
    if baton.preparing:
        say(
            AGENT_NAME,
            f"prepared room={ctx.room.name} identity={ctx.room.local_participant.identity} pid={os.getpid()}",
        )
        await asyncio.sleep(READY_DELAY)
        await baton.ready()
    say(AGENT_NAME, f"joined room={ctx.room.name} identity={ctx.room.local_participant.identity} pid={os.getpid()}")


if __name__ == "__main__":
    run_worker(AGENT_NAME, entrypoint)
