"""A real livekit-agents worker registered as `triage`, with a deterministic stand-in LLM.

Run: `python tests/e2e/agents/triage_worker.py` with LIVEKIT_URL, LIVEKIT_API_KEY and
LIVEKIT_API_SECRET set (TRIAGE_AGENT_NAME overrides the agent name). It registers with the server,
joins every room it is dispatched to, starts an AgentSession with no STT/TTS (text in, text out)
and stays until the room ends. It prints one line per event on stdout for tests to wait on:
`triage: registered`, `triage: joined room=<room> identity=<identity>`, `triage: left room=<room>`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    Agent,
    AgentServer,
    AgentSession,
    APIConnectOptions,
    JobContext,
    JobExecutorType,
    NotGivenOr,
    llm,
    room_io,
)

REPLY = "Hello, this is triage. How can I help you today?"


class FakeLLM(llm.LLM):
    """Always answers `REPLY`, in three chunks, so no model or network is involved."""

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        **_: NotGivenOr[Any],
    ) -> llm.LLMStream:
        return FakeStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class FakeStream(llm.LLMStream):
    async def _run(self) -> None:
        request_id = f"fake-{uuid.uuid4().hex[:8]}"
        words = REPLY.split(" ")
        for i in range(0, len(words), 4):
            piece = " ".join(words[i : i + 4]) + " "
            self._event_ch.send_nowait(
                llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=piece))
            )
            await asyncio.sleep(0)


def say(line: str) -> None:
    print(f"triage: {line}", flush=True)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session: AgentSession[None] = AgentSession(llm=FakeLLM())
    await session.start(
        agent=Agent(instructions="You are the triage agent."),
        room=ctx.room,
        room_options=room_io.RoomOptions(audio_input=False, audio_output=False),
    )
    say(f"joined room={ctx.room.name} identity={ctx.room.local_participant.identity}")
    ctx.add_shutdown_callback(_left(ctx.room.name))


def _left(room: str) -> Any:
    async def report() -> None:
        say(f"left room={room}")

    return report


async def main() -> None:
    server = AgentServer(
        # Threads, not processes: quick to start, and a test worker holds only a few rooms.
        job_executor_type=JobExecutorType.THREAD,
        num_idle_processes=0,
        port=0,
    )
    server.rtc_session(entrypoint, agent_name=os.environ.get("TRIAGE_AGENT_NAME", "triage"))
    server.on("worker_registered", lambda *_: say("registered"))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(server.run(devmode=True))
    await stop.wait()
    await server.aclose()
    run.cancel()
    say("stopped")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
