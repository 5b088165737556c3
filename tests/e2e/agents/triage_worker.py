"""A real livekit-agents worker registered as `triage`, with a deterministic stand-in LLM.

Run: `python tests/e2e/agents/triage_worker.py` with LIVEKIT_URL, LIVEKIT_API_KEY and
LIVEKIT_API_SECRET set (TRIAGE_AGENT_NAME overrides the agent name). It registers with the server,
joins every room it is dispatched to, starts an AgentSession with no STT/TTS (text in, text out)
and stays until the room ends. It runs under the support desk's worker runner
(examples/support-desk/desk.py `run_worker`: job-count load, so a busy machine still gets jobs).
It prints one line per event on stdout for tests to wait on: `triage: registered`,
`triage: joined room=<room> identity=<identity>`, `triage: left room=<room>`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from livekit.agents import Agent, AgentSession, JobContext, room_io

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "support-desk"))
from desk import ScriptedLLM, run_worker, say

REPLY = "Hello, this is triage. How can I help you today?"


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    # Always answers REPLY, so no model or network is involved.
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(lambda _: (REPLY, [])))
    await session.start(
        agent=Agent(instructions="You are the triage agent."),
        room=ctx.room,
        room_options=room_io.RoomOptions(audio_input=False, audio_output=False),
    )
    say("triage", f"joined room={ctx.room.name} identity={ctx.room.local_participant.identity}")
    ctx.add_shutdown_callback(_left(ctx.room.name))


def _left(room: str) -> Any:
    async def report() -> None:
        say("triage", f"left room={room}")

    return report


if __name__ == "__main__":
    run_worker("triage", entrypoint)
