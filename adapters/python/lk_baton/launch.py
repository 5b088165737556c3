"""Making sure a room has its coordinator: the Python twin of ``baton ensure`` (``src/launch.rs``).

LiveKit applies a token's ``RoomConfiguration.agents`` only when that join creates the room. A
room made beforehand (``CreateRoom``, or another participant first) gets no baton from the
caller's token, and nothing says so. Call :func:`ensure_coordinator` from the code that creates
rooms or hands out tokens, before or after the room exists.

Needs the LiveKit server SDK, ``livekit-api`` (``pip install livekit-api``); it is imported when
:func:`ensure_coordinator` runs, so importing :mod:`lk_baton` does not need it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .floor import COORDINATOR_ATTRIBUTE, COORDINATOR_ROLE

if TYPE_CHECKING:
    from livekit import api

__all__ = ["UNASSIGNED_DISPATCH_STALE", "EnsureResult", "assess_coordinator", "ensure_coordinator"]

UNASSIGNED_DISPATCH_STALE = 30.0
"""Seconds after which a dispatch of baton that never got a job no longer counts: the server
drops a dispatch, without retrying, when no worker with that agent name is registered, and a
worker normally gets the job within a second. Same value as ``baton ensure``."""

_AGENT = 4  # ParticipantInfo.Kind.AGENT (livekit_models.proto)
_JOB_PENDING, _JOB_RUNNING = 0, 1  # JobStatus.JS_PENDING, JS_RUNNING (livekit_agent.proto)
_POLL = 0.25


@dataclass(frozen=True)
class EnsureResult:
    """What :func:`ensure_coordinator` found and did.

    ``action``: ``"present"`` (baton was in the room; nothing done), ``"already_dispatched"``
    (a dispatch of baton was under way; not dispatched again), ``"dispatched"`` (this call
    dispatched baton with ``CreateDispatch``) or ``"created"`` (the room did not exist; this call
    created it with a ``RoomConfiguration`` that dispatches baton). ``dispatch_id`` is the
    dispatch concerned (``None`` for ``"present"``), ``identity`` baton's participant identity
    when it is in the room (after ``wait``), else ``None``.
    """

    action: Literal["present", "already_dispatched", "dispatched", "created"]
    dispatch_id: str | None
    identity: str | None


def assess_coordinator(
    participants: Iterable[api.ParticipantInfo],
    dispatches: Iterable[api.AgentDispatch],
    agent_name: str,
    now_ns: int,
) -> tuple[Literal["present", "dispatched", "missing"], str | None]:
    """Judges a room from ``ListParticipants`` and ``ListDispatch``: ``("present", identity)``
    when a participant of kind agent with ``baton.role = coordinator`` is in it,
    ``("dispatched", dispatch_id)`` when a dispatch of ``agent_name`` is under way (not
    deleted; no job yet and younger than :data:`UNASSIGNED_DISPATCH_STALE`, or a job pending or
    running), else ``("missing", None)``. ``now_ns`` is nanoseconds since the Unix epoch, the
    clock of a dispatch's ``created_at``."""
    for p in participants:
        if p.kind == _AGENT and p.attributes.get(COORDINATOR_ATTRIBUTE) == COORDINATOR_ROLE:
            return "present", p.identity
    stale_ns = int(UNASSIGNED_DISPATCH_STALE * 1e9)
    for d in dispatches:
        if d.agent_name != agent_name:
            continue
        if not d.HasField("state"):
            return "dispatched", d.id
        if d.state.deleted_at:
            continue
        jobs = list(d.state.jobs)
        if not jobs:
            if now_ns - d.state.created_at < stale_ns:
                return "dispatched", d.id
            continue
        if any(
            not j.HasField("state") or j.state.status in (_JOB_PENDING, _JOB_RUNNING) for j in jobs
        ):
            return "dispatched", d.id
    return "missing", None


async def ensure_coordinator(
    room: str,
    *,
    url: str,
    api_key: str,
    api_secret: str,
    agent_name: str = "baton",
    wait: float = 0.0,
) -> EnsureResult:
    """Makes sure ``room`` has its coordinator (baton) and returns what it did.

    A missing room is created with a ``RoomConfiguration`` whose ``agents`` dispatch
    ``agent_name`` (``CreateRoom``; created that way, the room also gets no default dispatch for
    unnamed workers). An existing room gets ``CreateDispatch(agent_name)`` unless baton is in it
    or a dispatch of it is under way (:func:`assess_coordinator`), so calling this twice
    dispatches once. Two calls for the same existing room at the same moment can both dispatch;
    call it from one place per room.

    ``url`` is the server's URL (``ws(s)://`` or ``http(s)://``), ``api_key`` / ``api_secret``
    sign the server API calls. ``wait`` is how many seconds to wait for baton's participant
    before returning (0: return once dispatched); ``EnsureResult.identity`` says whether it
    came. A ``baton worker`` registered under ``agent_name`` must be running, or the server
    drops the dispatch. Errors are ``livekit.api``'s (``TwirpError``: unreachable server, wrong
    key or secret).
    """
    from livekit import api

    async with api.LiveKitAPI(url, api_key, api_secret) as lk:
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
        created = False
        if not any(r.name == room for r in listed.rooms):
            # A room created with its dispatch in one call: no moment without a baton on the
            # way. CreateRoom returns the existing room if someone else created it meanwhile,
            # ignoring our agents, which the look at the dispatches below then catches.
            await lk.room.create_room(
                api.CreateRoomRequest(
                    name=room, agents=[api.RoomAgentDispatch(agent_name=agent_name)]
                )
            )
            created = True

        async def coordinator() -> str | None:
            res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            found, identity = assess_coordinator(res.participants, [], agent_name, time.time_ns())
            return identity if found == "present" else None

        res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
        dispatches = await lk.agent_dispatch.list_dispatch(room)
        found, which = assess_coordinator(res.participants, dispatches, agent_name, time.time_ns())
        action: Literal["present", "already_dispatched", "dispatched", "created"]
        if found == "present":
            return EnsureResult("present", None, which)
        if found == "dispatched":
            action, dispatch_id = ("created" if created else "already_dispatched"), which
        else:
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent_name, room=room)
            )
            action, dispatch_id = "dispatched", d.id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        identity = await coordinator()
        while identity is None and loop.time() < deadline:
            await asyncio.sleep(min(_POLL, max(0.0, deadline - loop.time())))
            identity = await coordinator()
        return EnsureResult(action, dispatch_id, identity)
