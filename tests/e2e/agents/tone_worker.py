"""A real livekit-agents worker whose job is a protocol-speaking tone agent (tests/e2e/tone_agent.py).

Environment: LIVEKIT_URL/API_KEY/API_SECRET, TONE_AGENT_NAME (the agent name it registers as),
TONE_FREQ (Hz), TONE_NEVER_READY=1 (never answers `prepare`: a target that never gets ready),
TONE_SPEAK_AT_JOIN=1 (plays its tone from the moment it has published, without waiting for
baton's `activate`: the naive handoff of bench/handoff.py), TONE_ZERO_LOAD=1 (reports a load of
0: livekit-agents reports the whole machine's CPU, and livekit-server stops dispatching to a
worker at its target load, which a busy shared 2-core machine reaches; see bench/worker.py).
Prints `tone: registered` once registered and `tone: joined room=<room>` per job.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from livekit.agents import AgentServer, JobContext, JobExecutorType, worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tone_agent import ToneAgent

NAME = os.environ.get("TONE_AGENT_NAME", "billing")
if os.environ.get("TONE_ZERO_LOAD") == "1":
    worker._DefaultLoadCalc.get_load = classmethod(lambda cls, w: 0.0)  # type: ignore[method-assign]


def say(line: str) -> None:
    print(f"tone: {line}", flush=True)


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
    say(f"joined room={ctx.room.name}")
    done = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: done.set())
    while not done.is_set() and agent.bundle is None:
        await asyncio.sleep(0.05)
    if agent.bundle is not None:
        ok = agent.bundle == bytes(range(256)) * (len(agent.bundle) // 256)
        say(f"bundle bytes={len(agent.bundle)} pattern={'ok' if ok else 'corrupt'}")
    await done.wait()


async def main() -> None:
    server = AgentServer(job_executor_type=JobExecutorType.THREAD, num_idle_processes=0, port=0)
    server.rtc_session(entrypoint, agent_name=NAME)
    server.on("worker_registered", lambda *_: say("registered"))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(server.run(devmode=True))
    await stop.wait()
    await server.aclose()
    run.cancel()


if __name__ == "__main__":
    asyncio.run(main())
