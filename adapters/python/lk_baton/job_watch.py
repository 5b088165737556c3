"""The agent worker's part in crash detection (docs/protocol.md, "Checkpoints, heartbeats and
recovery").

When a job process dies (SIGKILL, a segfault, the OOM killer), its adapter can say nothing: baton
notices the silence of its heartbeats (``crash_suspect_after``, then ``crash_confirm_after``, 3 s
by default), and the LiveKit server keeps the dead participant in the room for about 20 s. The
livekit-agents worker that ran the job knows within milliseconds: its process pool reports the
process closed with status ``FAILED`` (measured: 15 ms after a kill). The self-hosted server is
told too (``UpdateJobStatus``), but does not show it in ``ListDispatch`` (the job stays
``JS_RUNNING`` there), so baton cannot read it.

:func:`remove_crashed_jobs` closes that gap from the worker's side: when one of its job
processes dies, it removes the job's participant from the room (``RoomService.RemoveParticipant``
with the worker's own API key). baton sees the floor holder leave and confirms the crash at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from livekit import api
from livekit.agents import AgentServer

__all__ = ["remove_crashed_jobs"]

logger = logging.getLogger("lk_baton.job_watch")


def remove_crashed_jobs(server: AgentServer) -> None:
    """From the moment ``server`` starts, remove the participant of every job whose process dies
    with status ``FAILED`` (the worker's own credentials: ``LIVEKIT_URL``, ``LIVEKIT_API_KEY``,
    ``LIVEKIT_API_SECRET``, as the worker reads them). A job that ends normally is left alone.

    This reads livekit-agents' process pool, which has no public event for a dead job
    (``AgentServer`` emits only ``worker_started`` and ``worker_registered``): tested with
    livekit-agents 1.8. On a version without it, a warning is logged and nothing else changes
    (baton then confirms the crash from the heartbeats' silence)."""
    loop_tasks: set[asyncio.Task[None]] = set()

    def on_closed(proc: Any) -> None:
        job = getattr(proc, "running_job", None)
        if job is None or getattr(getattr(proc, "status", None), "value", None) != "failed":
            return
        room = job.job.room.name
        identity = job.accept_arguments.identity
        t = asyncio.get_running_loop().create_task(_remove(server, room, identity))
        loop_tasks.add(t)
        t.add_done_callback(loop_tasks.discard)

    def on_started() -> None:
        pool = getattr(server, "_proc_pool", None)
        if pool is None or not hasattr(pool, "on"):
            logger.warning("no livekit-agents process pool to watch: crashed jobs are not removed")
            return
        pool.on("process_closed", on_closed)

    server.on("worker_started", on_started)


async def _remove(server: AgentServer, room: str, identity: str) -> None:
    url = getattr(server, "_ws_url", "") or os.environ.get("LIVEKIT_URL", "")
    key = getattr(server, "_api_key", "") or os.environ.get("LIVEKIT_API_KEY", "")
    secret = getattr(server, "_api_secret", "") or os.environ.get("LIVEKIT_API_SECRET", "")
    try:
        async with api.LiveKitAPI(url, key, secret) as lk:
            who = api.RoomParticipantIdentity(room=room, identity=identity)
            await lk.room.remove_participant(who)
        logger.warning("job process died: removed its participant %s from room %s", identity, room)
    except Exception as e:  # the participant may be gone already; baton's heartbeat watch remains
        logger.warning("job process died: could not remove %s from room %s: %s", identity, room, e)
