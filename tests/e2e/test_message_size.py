"""baton accepts only what it can forward (issue 11 item 2), on the real server with a real SDK
peer speaking the protocol.

A `handoff` of 14 990 bytes whose reason is 14 926 ASCII bytes used to be accepted; the `prepare`
baton built from it was 15 023 bytes, was never sent ("data packet not sent"), and the caller sat
on filler for 6 s before the call was handed back. baton now refuses it at once with
`reason_too_long`, and the requester keeps the floor.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from harness import TRIAGE_THEN_BILLING, LiveKitServer, config_file, joined_baton, run
from peers import Peer

CONFIG = (
    TRIAGE_THEN_BILLING
    + """
[handoff.start_dispatch]
attempts = 1
"""
)


async def control(peer: Peer, timeout: float) -> dict[str, object]:
    return json.loads((await peer.next("baton.control", timeout)).data)  # type: ignore[no-any-return]


async def activated(triage: Peer) -> None:
    """Says hello every second, as the protocol asks, until baton answers with `activate`."""
    for n in range(10):
        hello = {"v": 1, "type": "hello", "id": f"hello-{n}", "agent_name": "triage"}
        await triage.send("baton.control", json.dumps(hello).encode(), ["baton"])
        try:
            while True:
                msg = await control(triage, 1.0)
                if msg["type"] == "activate":
                    return
        except TimeoutError:
            continue
    raise TimeoutError("triage was never activated")


def test_a_handoff_whose_prepare_would_not_fit_is_refused_at_once(server: LiveKitServer) -> None:
    room = f"size-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)) as baton:

        async def scenario() -> tuple[dict[str, object], float, list[dict[str, object]]]:
            caller = await Peer.join(server, room, "caller")
            triage = await Peer.join(server, room, "agent-triage", kind="agent", attributes={"lk.agent.name": "triage"})
            await triage.wait_participant("baton")
            await activated(triage)
            reason = "x" * 14_926
            request = json.dumps(
                {"v": 1, "type": "handoff", "id": "a", "target": "billing", "reason": reason},
                separators=(",", ":"),
            ).encode()
            assert len(request) == 14_990
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await triage.send("baton.control", request, ["baton"])
            while True:
                answer = await control(triage, 5.0)
                if answer.get("re") == "a":
                    break
            waited = loop.time() - t0
            # Nothing follows the refusal: no deactivate, the requester keeps the floor.
            later: list[dict[str, object]] = []
            try:
                while True:
                    later.append(await control(triage, 1.5))
            except TimeoutError:
                pass
            await triage.close()
            await caller.close()
            return answer, waited, later

        answer, waited, later = run(scenario())  # type: ignore[misc]
        assert answer["type"] == "handoff_refused", answer
        assert answer["reason"] == "reason_too_long", answer
        assert waited < 2.0, f"answered after {waited:.2f}s"
        assert [m["type"] for m in later] == [], later
        assert "data packet not sent" not in baton.text()
