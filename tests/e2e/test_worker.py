"""`baton worker` against a real LiveKit server: dispatch by RoomConfiguration, many rooms in one
process, re-registration after the server dies, and the errors an operator sees at start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from harness import (
    API_KEY,
    API_SECRET,
    BATON_BIN,
    ROOT,
    Baton,
    LiveKitServer,
    Process,
    baton_worker,
    dispatch_token,
    run,
)
from livekit import api, rtc

CONFIG = str(ROOT / "configs" / "baton.toml")


def room_name(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def registered(worker: Baton, timeout: float = 15.0, start: int = 0) -> None:
    worker.wait_for(r"worker registered", timeout, start)


async def joined(worker: Baton, room: str, timeout: float = 15.0) -> None:
    """Waits for the worker to report baton in `room` with its data channel open (not just listed)."""
    await asyncio.to_thread(worker.wait_for, rf"joined the room.*room={room} ", timeout)


async def baton_in(lk: api.LiveKitAPI, room: str, timeout: float = 15.0) -> api.ParticipantInfo:
    """Waits until baton is a participant of `room` and returns it."""
    deadline = time.monotonic() + timeout
    while True:
        res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
        for p in res.participants:
            if p.attributes.get("baton.role") == "coordinator":
                return p
        if time.monotonic() > deadline:
            raise TimeoutError(f"no baton in {room} after {timeout}s: {[p.identity for p in res.participants]}")
        await asyncio.sleep(0.1)


def test_room_config_dispatch_brings_baton_and_room_deletion_ends_the_job(server: LiveKitServer) -> None:
    worker = baton_worker(server, "--config", CONFIG)
    try:
        registered(worker)
        room = room_name()

        async def scenario() -> None:
            caller = rtc.Room()
            await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            try:
                async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                    p = await baton_in(lk, room)
                    assert p.kind == api.ParticipantInfo.Kind.AGENT
                    assert p.identity == "baton"
                    assert p.attributes.get("lk.agent_name") == "baton"
                    # Single PC: baton publishes (one audio track) and never subscribes.
                    assert not p.permission.can_subscribe
                    assert p.permission.can_publish and p.permission.can_publish_data
                    dispatches = await lk.agent_dispatch.list_dispatch(room)
                    assert [d.agent_name for d in dispatches] == ["baton"]
                    await joined(worker, room)
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            finally:
                await caller.disconnect()

        run(scenario())
        worker.wait_for(rf"job ended.*room={room}", 10)
        worker.wait_for(r"room freed rooms=0", 5)
        assert worker.proc.poll() is None, "the worker must outlive its rooms"
    finally:
        assert worker.stop() == 0, worker.text()


def test_everyone_leaving_ends_the_job(server: LiveKitServer) -> None:
    worker = baton_worker(server, "--config", CONFIG)
    try:
        registered(worker)
        room = room_name()

        async def scenario() -> None:
            caller = rtc.Room()
            await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                await baton_in(lk, room)
            await joined(worker, room)
            await caller.disconnect()

        run(scenario())
        # Only agents (dependent participants) left: the server closes the room after
        # departure_timeout (5 s in configs/livekit.yaml) and baton's job ends with it.
        worker.wait_for(rf"job ended.*room={room}", 20)
    finally:
        assert worker.stop() == 0, worker.text()


def test_twenty_rooms_at_once_each_get_a_baton(server: LiveKitServer) -> None:
    worker = baton_worker(server, "--config", CONFIG)
    rooms = [room_name("many") for _ in range(20)]
    try:
        registered(worker)

        async def scenario() -> float:
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                t0 = time.monotonic()
                await asyncio.gather(
                    *(
                        lk.room.create_room(
                            api.CreateRoomRequest(name=r, agents=[api.RoomAgentDispatch(agent_name="baton")])
                        )
                        for r in rooms
                    )
                )
                found = await asyncio.gather(*(baton_in(lk, r, timeout=30) for r in rooms))
                for r in rooms:
                    await joined(worker, r, timeout=30)
                elapsed = time.monotonic() - t0
                assert len(found) == 20
                await asyncio.gather(*(lk.room.delete_room(api.DeleteRoomRequest(room=r)) for r in rooms))
                return elapsed

        elapsed = run(scenario(), timeout=90)
        print(f"20 rooms had a baton {elapsed:.2f}s after creation")
        worker.wait_for(r"room freed rooms=0", 15)
        text = worker.text()
        assert text.count("joined the room") == 20
        assert "job failed" not in text
    finally:
        assert worker.stop() == 0, worker.text()


def test_full_worker_declines_extra_rooms(server: LiveKitServer) -> None:
    worker = baton_worker(server, "--config", CONFIG, "--max-rooms", "1")
    rooms = [room_name("cap") for _ in range(2)]
    try:
        registered(worker)

        async def scenario() -> None:
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                for r in rooms:
                    await lk.room.create_room(
                        api.CreateRoomRequest(name=r, agents=[api.RoomAgentDispatch(agent_name="baton")])
                    )
                await baton_in(lk, rooms[0])
                await joined(worker, rooms[0])
                await asyncio.sleep(3)
                res = await lk.room.list_participants(api.ListParticipantsRequest(room=rooms[1]))
                assert res.participants == [], "a full worker must not take a second room"
                for r in rooms:
                    await lk.room.delete_room(api.DeleteRoomRequest(room=r))

        run(scenario())
        assert worker.text().count("job assigned") == 1
    finally:
        assert worker.stop() == 0, worker.text()


def test_worker_registers_again_after_server_restart_and_takes_new_jobs() -> None:
    srv = LiveKitServer()
    srv.start()
    worker = baton_worker(srv, "--config", CONFIG)
    try:
        registered(worker)
        mark = len(worker.lines)
        srv.kill()
        worker.wait_for(r"connection to the LiveKit server lost", 10, mark)
        time.sleep(1.0)
        srv.start()
        registered(worker, timeout=30, start=mark)
        room = room_name("after")

        async def scenario() -> None:
            caller = rtc.Room()
            await caller.connect(srv.url, dispatch_token("caller", room, ["baton"]))
            try:
                async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
                    await baton_in(lk, room)
                    await joined(worker, room)
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            finally:
                await caller.disconnect()

        run(scenario())
        worker.wait_for(rf"job ended.*room={room}", 10)
    finally:
        code = worker.stop()
        srv.stop()
        srv.log_path.unlink(missing_ok=True)
    assert code == 0, worker.text()


def test_sigterm_leaves_rooms_and_exits_cleanly(server: LiveKitServer) -> None:
    worker = baton_worker(server, "--config", CONFIG)
    room = room_name()
    try:
        registered(worker)

        async def scenario() -> None:
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                await lk.room.create_room(
                    api.CreateRoomRequest(name=room, agents=[api.RoomAgentDispatch(agent_name="baton")])
                )
                await baton_in(lk, room)
                await joined(worker, room)

        run(scenario())
    finally:
        code = worker.stop(timeout=15)
    assert code == 0, worker.text()
    assert f"room={room}" in worker.text()
    worker.wait_for(r"job ended: left the room", 1)

    async def gone() -> list[str]:
        async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
            res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            return [p.identity for p in res.participants]

    assert "baton" not in run(gone())


def _run_worker_once(args: list[str], env: dict[str, str], timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BATON_BIN), "worker", *args],
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bad_credentials_fail_fast(server: LiveKitServer) -> None:
    res = _run_worker_once(
        ["--config", CONFIG],
        {"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": "wrong-secret-" + "x" * 32},
    )
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("baton: error:")]
    assert len(errors) == 1, res.stderr
    assert "refused the worker's credentials" in errors[0]


def test_invalid_config_is_rejected_with_file_and_line(tmp_path: Path, server: LiveKitServer) -> None:
    bad = tmp_path / "baton.toml"
    bad.write_text('[worker]\nagent_name = "baton"\n\n[handoff]\njoin_timout = 3\n')
    res = _run_worker_once(
        ["--config", str(bad)],
        {"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET},
    )
    assert res.returncode == 1
    assert f"baton: error: {bad}:5:1:" in res.stderr, res.stderr
    assert "join_timout" in res.stderr


def test_triage_stand_in_worker_joins_when_dispatched_and_answers_text(server: LiveKitServer) -> None:
    """The livekit-agents `triage` worker the handoff tests will use: dispatched, joins, answers."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "e2e" / "agents" / "triage_worker.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET},
        start_new_session=True,
    )
    triage = Process(proc)
    room = room_name("tri")
    try:
        triage.wait_for(r"triage: registered", 60)

        async def scenario() -> str:
            caller = rtc.Room()
            replies: asyncio.Queue[str] = asyncio.Queue()
            readers: set[asyncio.Task[None]] = set()

            def on_stream(reader: rtc.TextStreamReader, _who: str) -> None:
                async def read() -> None:
                    replies.put_nowait(await reader.read_all())

                task = asyncio.ensure_future(read())
                readers.add(task)
                task.add_done_callback(readers.discard)

            caller.register_text_stream_handler("lk.transcription", on_stream)
            await caller.connect(server.url, dispatch_token("caller", room, ["triage"]))
            try:
                await asyncio.to_thread(triage.wait_for, rf"triage: joined room={room}", 30)
                async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                    res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
                    agents = [p for p in res.participants if p.attributes.get("lk.agent_name") == "triage"]
                    assert len(agents) == 1, res.participants
                    await caller.local_participant.send_text("I have a billing question", topic="lk.chat")
                    reply = await asyncio.wait_for(replies.get(), 15)
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
                return reply
            finally:
                await caller.disconnect()

        reply = run(scenario(), timeout=90)
        assert "this is triage" in reply
        triage.wait_for(rf"triage: left room={room}", 15)
    finally:
        assert triage.stop() == 0, triage.text()
