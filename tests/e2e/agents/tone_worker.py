"""A real livekit-agents worker whose job is a protocol-speaking tone agent (tests/e2e/tone_agent.py).

Environment: LIVEKIT_URL/API_KEY/API_SECRET, TONE_AGENT_NAME (the agent name it registers as),
TONE_FREQ (Hz), TONE_NEVER_READY=1 (never answers `prepare`: a target that never gets ready),
TONE_SPEAK_AT_JOIN=1 (plays its tone from the moment it has published, without waiting for
baton's `activate`: the naive handoff of bench/handoff.py). It runs under the support desk's
worker runner (examples/support-desk/desk.py `run_worker`), which reports the share of
DESK_MAX_JOBS it runs as its load, so a busy machine still gets jobs. Prints `tone: registered`
once registered and `tone: joined room=<room>` per job.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from livekit.agents import JobContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "support-desk"))
from desk import run_worker, say
from tone_agent import ToneAgent

# run_worker registers under the same variable's value.
NAME = os.environ.get("TONE_AGENT_NAME", "tone")


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    agent = ToneAgent(
        ctx.room,
        NAME,
        float(os.environ.get("TONE_FREQ", "880")),
        never_ready=os.environ.get("TONE_NEVER_READY") == "1",
    )
    agent.speaking = os.environ.get("TONE_SPEAK_AT_JOIN") == "1"
    await agent.start()
    say("tone", f"joined room={ctx.room.name}")
    done = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: done.set())
    while not done.is_set() and agent.bundle is None:
        await asyncio.sleep(0.05)
    if agent.bundle is not None:
        ok = agent.bundle == bytes(range(256)) * (len(agent.bundle) // 256)
        say("tone", f"bundle bytes={len(agent.bundle)} pattern={'ok' if ok else 'corrupt'}")
    await done.wait()


if __name__ == "__main__":
    run_worker("tone", entrypoint)
