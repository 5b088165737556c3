"""A handoff target that drops and rejoins keeps the handoff (issue 11 item 6), on the real
server with real SDK peers (`ToneAgent`s publishing a track) and a real baton.

billing gets `prepare`, its connection drops, and it joins again with the same identity 150 ms
later. It used to lose the handoff at once (`target_left`, the call handed back to triage) and its
`hello` went unanswered. Now baton awaits it for `rejoin_grace`, answers its `hello` with the
same `prepare`, and gives it the floor once it is ready.
"""

from __future__ import annotations

import asyncio
import uuid

from harness import TRIAGE_THEN_BILLING, LiveKitServer, config_file, joined_baton, run, wait_until
from peers import Peer
from test_handoff import agent
from tone_agent import ToneAgent

CONFIG = (
    TRIAGE_THEN_BILLING
    + """
[handoff]
ready_timeout = 6
max_filler = 8
release = "standby"

[handoff.start_dispatch]
attempts = 1
"""
)


def test_a_target_that_rejoins_150ms_later_keeps_the_handoff(server: LiveKitServer) -> None:
    room = f"rejoin-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)):

        async def scenario() -> tuple[ToneAgent, ToneAgent, list[str]]:
            caller = await Peer.join(server, room, "caller")
            triage = await agent(server, room, "triage", 440)
            await wait_until(lambda: triage.got("activate"), 10, "triage activated")
            # billing waits in the room; this connection never says ready, so the handoff is
            # still open when it drops.
            first = await agent(server, room, "billing", 880, never_ready=True)
            await wait_until(lambda: first.got("deactivate"), 10, "billing on standby")
            await triage.handoff("billing", "caller wants a refund")
            await wait_until(lambda: first.got("prepare"), 5, "billing prepared")
            await first.close()
            await asyncio.sleep(0.15)
            billing = await agent(server, room, "billing", 880)
            await wait_until(lambda: billing.got("activate"), 5, "rejoined billing activated")
            await wait_until(lambda: triage.got("release"), 5, "triage released")
            failed = [str(m.get("reason")) for m in triage.got("handoff_failed")]
            await triage.close()
            await billing.close()
            await caller.close()
            return first, billing, failed

        first, billing, failed = run(scenario())  # type: ignore[misc]
        handoff = first.got("prepare")[0]["handoff"]
        assert [m["handoff"] for m in billing.got("prepare")][:1] == [handoff], billing.received
        assert billing.got("activate")[0].get("cause") == "handoff", billing.received
        assert billing.got("activate")[0].get("handoff") == handoff
        assert failed == [], failed
