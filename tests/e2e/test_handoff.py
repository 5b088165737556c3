"""The handoff as the caller hears it: real server, baton, protocol-speaking tone agents, and a
caller recording every track separately."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid

from harness import LiveKitServer, baton_join, run
from peers import Peer, Recorder, audible_grid, longest_run
from tone_agent import ToneAgent

CONFIG = """
[[agents]]
name = "triage"
start = true

[[agents]]
name = "billing"

[handoff]
source_quiet_timeout = 2
join_timeout = 3
ready_timeout = 2
max_filler = 8
filler_fade = "200ms"
release = "standby"

[handoff.start_dispatch]
attempts = 1
"""


def config_file() -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    f.write(CONFIG)
    f.close()
    return f.name


async def agent(server: LiveKitServer, room: str, name: str, freq: float, **kw: object) -> ToneAgent:
    peer = await Peer.join(server, room, f"agent-{name}", kind="agent", attributes={"lk.agent_name": name})
    a = ToneAgent(peer.room, name, freq, **kw)  # type: ignore[arg-type]
    await a.start()
    return a


async def wait_until(pred: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


def test_warm_handoff_source_then_target_without_gap_or_overlap(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    baton = baton_join(server, room, "--config", config_file())
    try:
        baton.wait_for("joined: data channel open")

        async def scenario() -> tuple[dict[str, list[tuple[float, float]]], float, float]:
            caller = await Peer.join(server, room, "caller")
            rec = Recorder(caller.room)
            a = await agent(server, room, "triage", 440)
            b = await agent(server, room, "billing", 880)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await wait_until(lambda: b.got("deactivate"), 5, "billing should be told to stand by")
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            t_request = loop.time()
            await a.handoff("billing", reason="caller wants a refund")
            await wait_until(lambda: b.speaking, 8, "billing never got the floor")
            await asyncio.sleep(1.0)
            t_end = loop.time()
            assert a.got("handoff_accepted")
            assert not a.speaking
            await rec.stop()
            for x in (a, b):
                await x.close()
            await caller.close()
            return rec.levels, t_request, t_end

        levels, t_request, t_end = run(scenario())  # type: ignore[misc]
        a_id, b_id = "agent-triage", "agent-billing"
        assert a_id in levels and b_id in levels and "baton" in levels, levels.keys()
        start = t_request - 0.5
        grid = audible_grid(levels, start, t_end - 0.1)
        # Order: the source is heard first, then the filler, then the target.
        first = {who: next((i for i, c in enumerate(grid) if who in c), None) for who in (a_id, "baton", b_id)}
        assert first[a_id] is not None and first[a_id] == 0, f"source not heard at the start: {first}"
        assert first[b_id] is not None, "target never heard"
        # A warm target is usually ready before the source has finished its sentence; then the
        # switch needs no filler, and none may be required here.
        last_a = max(i for i, c in enumerate(grid) if a_id in c)
        assert last_a < first[b_id], "source still audible when the target spoke"
        overlap = longest_run(grid, lambda c: a_id in c and b_id in c)
        assert overlap == 0, f"source and target overlapped for {overlap * 1000:.0f} ms"
        silence = longest_run(grid, lambda c: not c)
        print(f"longest silence {silence * 1000:.0f} ms; switch at slot {first[b_id]} after source end {last_a}")
        assert silence <= 0.06, f"caller heard {silence * 1000:.0f} ms of silence"
        out = baton.wait_for(r'"outcome":"completed"', timeout=5)[1]
        timeline = json.loads(out[out.index("{") :])
        assert timeline["target"] in ("billing", b_id)
    except BaseException:
        print(baton.text())
        raise
    finally:
        assert baton.stop() == 0, baton.text()
