"""`baton ensure` and `lk_baton.ensure_coordinator` against a real LiveKit server and a real
`baton worker`: a room created before the caller's token gets no baton from that token (LiveKit
applies a token's RoomConfiguration only when the join creates the room), and the launcher is
what brings it; running it twice dispatches once; a missing room is created with the dispatch.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from harness import API_KEY, API_SECRET, BATON_BIN, Baton, LiveKitServer, baton_worker, dispatch_token, run
from livekit import api, rtc
from lk_baton import EnsureResult, ensure_coordinator


def room_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(server: LiveKitServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    """One `baton worker` (agent name `baton`, no agents to coordinate) for the module."""
    config = tmp_path_factory.mktemp("ensure") / "baton.toml"
    config.write_text('[worker]\nagent_name = "baton"\n')
    w = baton_worker(server, "--config", str(config))
    try:
        w.wait_for(r"worker registered", 15)
        yield w
    finally:
        assert w.stop() == 0, w.text()


def ensure(server: LiveKitServer, room: str, *extra: str, secret: str = API_SECRET) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": secret}
    return subprocess.run(
        [str(BATON_BIN), "ensure", "--room", room, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def lkapi(server: LiveKitServer) -> api.LiveKitAPI:
    return api.LiveKitAPI(server.http_url, API_KEY, API_SECRET)


async def batons(lk: api.LiveKitAPI, room: str) -> list[api.ParticipantInfo]:
    res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
    return [p for p in res.participants if p.attributes.get("baton.role") == "coordinator"]


async def dispatch_names(lk: api.LiveKitAPI, room: str) -> list[str]:
    return sorted(d.agent_name for d in await lk.agent_dispatch.list_dispatch(room))


async def room_exists(lk: api.LiveKitAPI, room: str) -> bool:
    res = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
    return any(r.name == room for r in res.rooms)


def test_room_created_first_gets_baton_from_ensure_not_from_the_callers_token(
    server: LiveKitServer, worker: Baton
) -> None:
    room = room_name("first")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            caller = rtc.Room()
            await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            try:
                # The known LiveKit behaviour this launcher exists for: the room existed, so the
                # caller's RoomConfiguration dispatched nothing and no baton comes.
                await asyncio.sleep(2)
                assert "baton" not in await dispatch_names(lk, room)
                assert await batons(lk, room) == []

                res = await asyncio.to_thread(ensure, server, room)
                assert res.returncode == 0, res.stdout + res.stderr
                assert "dispatched `baton` to room" in res.stdout, res.stdout
                assert f"baton is in room `{room}` (identity `baton`)" in res.stdout, res.stdout
                assert [p.identity for p in await batons(lk, room)] == ["baton"]
                assert (await dispatch_names(lk, room)).count("baton") == 1
                # The room was there: ensure did not say it created it.
                assert "created it" not in res.stdout
            finally:
                await caller.disconnect()

    run(scenario())


def test_ensure_twice_dispatches_once(server: LiveKitServer, worker: Baton) -> None:
    room = room_name("twice")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            first = await asyncio.to_thread(ensure, server, room, "--wait", "0")
            assert first.returncode == 0, first.stdout + first.stderr
            assert "dispatched `baton` to room" in first.stdout, first.stdout
            # At once, while baton may still be on its way: the dispatch is found, not repeated.
            second = await asyncio.to_thread(ensure, server, room)
            assert second.returncode == 0, second.stdout + second.stderr
            assert "dispatched `baton` to room" not in second.stdout, second.stdout
            assert "is already dispatched to room" in second.stdout or "is already in room" in second.stdout, (
                second.stdout
            )
            assert len(await batons(lk, room)) == 1
            third = await asyncio.to_thread(ensure, server, room)
            assert third.returncode == 0, third.stdout + third.stderr
            assert f"baton is already in room `{room}` (identity `baton`); nothing to do" in third.stdout
            assert (await dispatch_names(lk, room)).count("baton") == 1
            assert len(await batons(lk, room)) == 1

    run(scenario())


def test_missing_room_is_created_and_gets_baton(server: LiveKitServer, worker: Baton) -> None:
    room = room_name("missing")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            assert not await room_exists(lk, room)
            res = await asyncio.to_thread(ensure, server, room)
            assert res.returncode == 0, res.stdout + res.stderr
            assert f"room `{room}` did not exist: created it" in res.stdout, res.stdout
            assert "dispatched `baton` to room" in res.stdout, res.stdout
            assert await room_exists(lk, room)
            assert [p.identity for p in await batons(lk, room)] == ["baton"]
            assert (await dispatch_names(lk, room)).count("baton") == 1

    run(scenario())


def test_dispatch_nobody_takes_exits_3_and_is_not_repeated(server: LiveKitServer, worker: Baton) -> None:
    """No worker registers as `nobody`: the server drops the dispatch; ensure says so after its
    wait (exit 3), and a second run inside the staleness window does not dispatch again."""
    room = room_name("nobody")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            first = await asyncio.to_thread(ensure, server, room, "--agent-name", "nobody", "--wait", "1")
            assert first.returncode == 3, first.stdout + first.stderr
            assert "dispatched `nobody` to room" in first.stdout, first.stdout
            assert "is a `baton worker` running with agent name `nobody`" in first.stderr, first.stderr
            second = await asyncio.to_thread(ensure, server, room, "--agent-name", "nobody", "--wait", "1")
            assert second.returncode == 3, second.stdout + second.stderr
            assert "`nobody` is already dispatched" in second.stdout, second.stdout
            assert (await dispatch_names(lk, room)).count("nobody") == 1

    run(scenario())


def test_bad_credentials_fail_with_one_line(server: LiveKitServer) -> None:
    res = ensure(server, room_name("creds"), secret="wrong-secret-" + "x" * 32)
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("baton: error:")]
    assert len(errors) == 1, res.stderr
    assert "LIVEKIT_API_SECRET" in errors[0], errors[0]


def test_help_explains_why_and_the_exit_codes() -> None:
    res = subprocess.run([str(BATON_BIN), "ensure", "--help"], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    for needle in ("RoomConfiguration", "CreateDispatch", "idempotent", "--wait", "3 when baton is dispatched"):
        assert needle in res.stdout, (needle, res.stdout)


# ---- the Python helper, lk_baton.ensure_coordinator -------------------------------------------


async def helper(server: LiveKitServer, room: str, agent_name: str = "baton", wait: float = 0.0) -> EnsureResult:
    return await ensure_coordinator(
        room, url=server.url, api_key=API_KEY, api_secret=API_SECRET, agent_name=agent_name, wait=wait
    )


def test_helper_brings_baton_to_a_room_created_first(server: LiveKitServer, worker: Baton) -> None:
    room = room_name("py-first")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            result = await helper(server, room, wait=15)
            assert result.action == "dispatched", result
            assert result.identity == "baton", result
            assert result.dispatch_id and result.dispatch_id.startswith("AD_"), result
            assert [p.identity for p in await batons(lk, room)] == ["baton"]

    run(scenario())


def test_helper_twice_dispatches_once(server: LiveKitServer, worker: Baton) -> None:
    room = room_name("py-twice")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            first = await helper(server, room)
            assert first.action == "dispatched", first
            second = await helper(server, room, wait=15)
            assert second.action in ("already_dispatched", "present"), second
            if second.action == "already_dispatched":
                assert second.dispatch_id == first.dispatch_id, (first, second)
            assert second.identity == "baton", second
            third = await helper(server, room)
            assert third.action == "present", third
            assert (await dispatch_names(lk, room)).count("baton") == 1

    run(scenario())


def test_helper_creates_a_missing_room_with_its_room_configuration(server: LiveKitServer, worker: Baton) -> None:
    room = room_name("py-missing")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            assert not await room_exists(lk, room)
            result = await helper(server, room, wait=15)
            assert result.action == "created", result
            assert result.identity == "baton", result
            # Created with its RoomConfiguration in one call: baton's dispatch is the room's
            # only one (a room created without agents also gets the server's default dispatch
            # for unnamed workers, agent name "").
            assert await dispatch_names(lk, room) == ["baton"]
            assert [p.identity for p in await batons(lk, room)] == ["baton"]

    run(scenario())


def test_helper_wait_zero_returns_before_baton_joins_and_reports_no_identity(server: LiveKitServer) -> None:
    """Without a worker for `nobody`, the helper dispatches, does not wait and says baton is not
    there; asked again at once, it does not dispatch a second time."""
    room = room_name("py-nobody")

    async def scenario() -> None:
        async with lkapi(server) as lk:
            await lk.room.create_room(api.CreateRoomRequest(name=room))
            first = await helper(server, room, agent_name="nobody")
            assert first.action == "dispatched" and first.identity is None, first
            second = await helper(server, room, agent_name="nobody")
            assert second.action == "already_dispatched" and second.dispatch_id == first.dispatch_id, second
            assert (await dispatch_names(lk, room)).count("nobody") == 1

    run(scenario())
