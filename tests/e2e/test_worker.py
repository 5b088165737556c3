"""`baton worker` against a real LiveKit server: dispatch by RoomConfiguration, many rooms in one
process, re-registration after the server dies, the errors an operator sees at start, and the
starting agent's dispatch retries (a no-show, and a worker that comes up during the retries)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
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


@contextlib.contextmanager
def registered_worker(server: LiveKitServer, *flags: str) -> Iterator[Baton]:
    """`baton worker` with `flags`, registered; on the way out it must exit cleanly (0)."""
    worker = baton_worker(server, *flags)
    try:
        registered(worker)
        yield worker
    finally:
        assert worker.stop() == 0, worker.text()


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


def agent_replies(room: rtc.Room) -> asyncio.Queue[str]:
    """What agents say to this participant (their `lk.transcription` text streams), as each ends."""
    replies: asyncio.Queue[str] = asyncio.Queue()
    readers: set[asyncio.Task[None]] = set()

    def on_stream(reader: rtc.TextStreamReader, _who: str) -> None:
        async def read() -> None:
            replies.put_nowait(await reader.read_all())

        task = asyncio.ensure_future(read())
        readers.add(task)
        task.add_done_callback(readers.discard)

    room.register_text_stream_handler("lk.transcription", on_stream)
    return replies


async def ask_then_close(caller: rtc.Room, lk: api.LiveKitAPI, room: str, replies: asyncio.Queue[str]) -> str:
    """The caller asks a question by text, the agent's first reply comes back, and the room is
    deleted, which must end every job in it."""
    await caller.local_participant.send_text("I have a billing question", topic="lk.chat")
    reply = await asyncio.wait_for(replies.get(), 15)
    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
    return reply


def test_room_config_dispatch_brings_baton_and_room_deletion_ends_the_job(server: LiveKitServer) -> None:
    with registered_worker(server, "--config", CONFIG) as worker:
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
                    await joined(worker, room)
                    # The token dispatched baton; baton then dispatches the starting agent (triage
                    # in configs/baton.toml), once. Wait for that second dispatch rather than racing it.
                    deadline = time.monotonic() + 10
                    while True:
                        names = sorted(d.agent_name for d in await lk.agent_dispatch.list_dispatch(room))
                        if "triage" in names or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.1)
                    assert names == ["baton", "triage"], names
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            finally:
                await caller.disconnect()

        run(scenario())
        worker.wait_for(rf"job ended.*room={room}", 10)
        worker.wait_for(r"room freed rooms=0", 5)
        assert worker.proc.poll() is None, "the worker must outlive its rooms"


def test_everyone_leaving_ends_the_job(server: LiveKitServer) -> None:
    with registered_worker(server, "--config", CONFIG) as worker:
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


def test_twenty_rooms_at_once_each_get_a_baton(server: LiveKitServer) -> None:
    rooms = [room_name("many") for _ in range(20)]
    with registered_worker(server, "--config", CONFIG) as worker:

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


def test_full_worker_declines_extra_rooms(server: LiveKitServer) -> None:
    rooms = [room_name("cap") for _ in range(2)]
    with registered_worker(server, "--config", CONFIG, "--max-rooms", "1") as worker:

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
    triage = start_triage_worker(server)
    room = room_name("tri")
    try:
        triage.wait_for(r"triage: registered", 60)

        async def scenario() -> str:
            caller = rtc.Room()
            replies = agent_replies(caller)
            await caller.connect(server.url, dispatch_token("caller", room, ["triage"]))
            try:
                await asyncio.to_thread(triage.wait_for, rf"triage: joined room={room}", 30)
                async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                    res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
                    agents = [p for p in res.participants if p.attributes.get("lk.agent_name") == "triage"]
                    assert len(agents) == 1, res.participants
                    reply = await ask_then_close(caller, lk, room, replies)
                return reply
            finally:
                await caller.disconnect()

        reply = run(scenario(), timeout=90)
        assert "this is triage" in reply
        triage.wait_for(rf"triage: left room={room}", 15)
    finally:
        assert triage.stop() == 0, triage.text()


# --- The starting agent's dispatch: retries, the no-show report, and a worker that comes up late ---

DISPATCH_LINE = "dispatching agent agent=triage"
NO_SHOW = re.compile(r"ERROR .*agent `triage` never joined the room after (\d+) dispatch attempts.* agent=triage ")


def dispatch_config(tmp_path: Path, *, join_timeout: float, attempts: int, backoff: float, backoff_max: float) -> str:
    path = tmp_path / "baton.toml"
    path.write_text(
        f"""[worker]
agent_name = "baton"

[[agents]]
name = "triage"
start = true

[handoff]
join_timeout = {join_timeout}

[handoff.start_dispatch]
attempts = {attempts}
backoff_initial = {backoff}
backoff_max = {backoff_max}
"""
    )
    return str(path)


def log_time(line: str) -> float:
    """The timestamp baton's log line carries (UTC, seconds since the epoch)."""
    return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


def baton_lines(worker: Baton, needle: str) -> list[str]:
    return [line for line in worker.text().splitlines() if needle in line]


def created_ids(worker: Baton) -> list[str]:
    """The dispatch ids baton reports creating, in order (triage's only: baton is dispatched by token)."""
    return [m.group(1) for m in re.finditer(r"dispatch created dispatch_id=(\S+)", worker.text())]


def server_lines(server: LiveKitServer, room: str, *needles: str) -> list[str]:
    """livekit-server's log lines about `room` that contain every one of `needles`."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if f'"room": "{room}"' in line and all(n in line for n in needles)]


def server_time(line: str) -> float:
    """The timestamp of a livekit-server log line (UTC, seconds since the epoch)."""
    return datetime.fromisoformat(line.split("\t", 1)[0]).timestamp()


def server_dispatch_calls(server: LiveKitServer, method: str, room: str) -> list[str]:
    """livekit-server's own record of AgentDispatchService calls for `room` (its API log lines)."""
    return server_lines(server, room, f"API AgentDispatchService.{method}\t")


def creates_of_triage(server: LiveKitServer, room: str) -> int:
    return sum('"agentName": "triage"' in line for line in server_dispatch_calls(server, "CreateDispatch", room))


def start_triage_worker(server: LiveKitServer) -> Process:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "e2e" / "agents" / "triage_worker.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET},
        start_new_session=True,
    )
    return Process(proc)


async def room_agents(lk: api.LiveKitAPI, room: str, name: str) -> list[api.ParticipantInfo]:
    res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
    return [p for p in res.participants if p.attributes.get("lk.agent_name") == name]


def test_start_agent_no_show_is_reported_after_the_configured_attempts(tmp_path: Path, server: LiveKitServer) -> None:
    """No `triage` worker anywhere: baton dispatches it `attempts` times, each with its own join
    timeout and backoff, deletes every dispatch that went unanswered, names the agent in one error,
    and then stops dispatching (the call stays up, baton in it)."""
    join_timeout, attempts, backoff, backoff_max = 2.0, 3, 0.5, 1.0
    config = dispatch_config(
        tmp_path, join_timeout=join_timeout, attempts=attempts, backoff=backoff, backoff_max=backoff_max
    )
    worker = baton_worker(server, "--config", config)
    room = room_name("noshow")
    try:
        registered(worker)

        async def scenario() -> None:
            caller = rtc.Room()
            await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            try:
                async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                    await joined(worker, room)
                    _, error = await asyncio.to_thread(worker.wait_for, NO_SHOW.pattern, 30)
                    no_show = NO_SHOW.search(error)
                    assert no_show and int(no_show.group(1)) == attempts, error
                    assert f"attempts={attempts}" in error, error

                    # Every attempt waited its join timeout, with the backoff between attempts
                    # (0.5 s, then 1 s): the error cannot come sooner than that after the first.
                    dispatched = baton_lines(worker, DISPATCH_LINE)
                    assert len(dispatched) == attempts, dispatched
                    waited = log_time(error) - log_time(dispatched[0])
                    least = attempts * join_timeout + backoff + min(2 * backoff, backoff_max)
                    assert least - 0.1 <= waited < least + 3, f"no-show reported {waited:.2f}s after the first dispatch"
                    for earlier, later in itertools.pairwise(dispatched):
                        assert log_time(later) - log_time(earlier) >= join_timeout + backoff - 0.1, dispatched

                    # Nothing more once it gave up: wait longer than another attempt would take.
                    await asyncio.sleep(join_timeout + backoff_max + 1.5)
                    assert len(baton_lines(worker, DISPATCH_LINE)) == attempts, worker.text()
                    assert len(NO_SHOW.findall(worker.text())) == 1, worker.text()

                    # The server saw exactly those attempts, each a different dispatch, each deleted.
                    assert creates_of_triage(server, room) == attempts, server.log_tail()
                    ids = created_ids(worker)
                    assert len(ids) == attempts and len(set(ids)) == attempts, ids
                    deleted = server_dispatch_calls(server, "DeleteDispatch", room)
                    assert sorted(i for i in ids if any(f'"dispatchID": "{i}"' in d for d in deleted)) == sorted(ids)
                    left = await lk.agent_dispatch.list_dispatch(room)
                    assert [d.agent_name for d in left] == ["baton"], left
                    assert await room_agents(lk, room, "triage") == []
                    # The no-show is reported, not fatal: baton is still in the call.
                    await baton_in(lk, room, timeout=2)
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            finally:
                await caller.disconnect()

        run(scenario(), timeout=60)
        worker.wait_for(rf"job ended.*room={room}", 10)
        assert worker.proc.poll() is None
    except BaseException:
        print(worker.text())
        raise
    finally:
        assert worker.stop() == 0, worker.text()


def test_start_agent_whose_worker_comes_up_during_the_retries_joins_once(tmp_path: Path, server: LiveKitServer) -> None:
    """The `triage` worker starts only after baton's first dispatch went unanswered: a later
    attempt reaches it, triage joins once for that dispatch, baton stops retrying and reports no
    no-show, and the caller is answered by triage."""
    join_timeout, attempts, backoff, backoff_max = 5.0, 6, 1.0, 2.0
    config = dispatch_config(
        tmp_path, join_timeout=join_timeout, attempts=attempts, backoff=backoff, backoff_max=backoff_max
    )
    worker = baton_worker(server, "--config", config)
    triage: Process | None = None
    room = room_name("late")
    try:
        registered(worker)

        async def scenario() -> str:
            nonlocal triage
            caller = rtc.Room()
            replies = agent_replies(caller)
            await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            try:
                async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                    await joined(worker, room)
                    # The first attempt timed out unanswered (there was no worker): baton retries.
                    await asyncio.to_thread(worker.wait_for, DISPATCH_LINE, 15)
                    mark = len(worker.lines)
                    await asyncio.to_thread(worker.wait_for, DISPATCH_LINE, join_timeout + backoff + 5, mark)
                    assert await room_agents(lk, room, "triage") == []
                    first = created_ids(worker)[0]

                    triage = start_triage_worker(server)
                    await asyncio.to_thread(triage.wait_for, r"triage: registered", 60)
                    await asyncio.to_thread(triage.wait_for, rf"triage: joined room={room} ", 60)
                    agents = await room_agents(lk, room, "triage")
                    assert len(agents) == 1, agents
                    assert agents[0].kind == api.ParticipantInfo.Kind.AGENT

                    # Matched to baton's current dispatch. The server holds one triage dispatch,
                    # the last baton created (not the first, which nobody served); every earlier
                    # one was deleted before it was created; and the server assigned triage's job
                    # (the participant `agent-<job id>`) once, after that last dispatch.
                    dispatches = [d for d in await lk.agent_dispatch.list_dispatch(room) if d.agent_name == "triage"]
                    assert len(dispatches) == 1, dispatches
                    ids = created_ids(worker)
                    assert dispatches[0].id == ids[-1] != first, (dispatches, ids)
                    creates = [
                        c for c in server_dispatch_calls(server, "CreateDispatch", room) if '"agentName": "triage"' in c
                    ]
                    deletes = server_dispatch_calls(server, "DeleteDispatch", room)
                    for old in ids[:-1]:
                        gone = [d for d in deletes if f'"dispatchID": "{old}"' in d]
                        assert len(gone) == 1 and server_time(gone[0]) <= server_time(creates[-1]), (old, deletes)
                    assigned = server_lines(server, room, "assigned job to worker", '"agentName": "triage"')
                    assert len(assigned) == 1, assigned
                    assert server_time(assigned[0]) >= server_time(creates[-1]), (assigned, creates)
                    assert f'"jobID": "{agents[0].identity.removeprefix("agent-")}"' in assigned[0], assigned

                    # baton stops retrying: after longer than another attempt would take there is
                    # still one dispatch, one triage, and no no-show.
                    tries = len(baton_lines(worker, DISPATCH_LINE))
                    assert 2 <= tries < attempts, worker.text()
                    await asyncio.sleep(join_timeout + backoff_max + 1.5)
                    assert len(baton_lines(worker, DISPATCH_LINE)) == tries, worker.text()
                    assert creates_of_triage(server, room) == tries, server.log_tail()
                    assert [a.identity for a in await room_agents(lk, room, "triage")] == [agents[0].identity]
                    assert not NO_SHOW.search(worker.text()), worker.text()
                    # Its dispatch is kept (deleting it would make the server end triage's job).
                    kept = server_dispatch_calls(server, "DeleteDispatch", room)
                    assert not [d for d in kept if f'"dispatchID": "{ids[-1]}"' in d], kept
                    assert len(baton_lines(worker, "deleting dispatch agent=triage")) == tries - 1, worker.text()

                    # The call proceeds: triage answers the caller.
                    reply = await ask_then_close(caller, lk, room, replies)
                return reply
            finally:
                await caller.disconnect()

        reply = run(scenario(), timeout=150)
        assert "this is triage" in reply
        worker.wait_for(rf"job ended.*room={room}", 10)
        assert triage is not None
        triage.wait_for(rf"triage: left room={room}", 15)
        assert triage.text().count("triage: joined") == 1, triage.text()
    except BaseException:
        print(worker.text())
        if triage is not None:
            print(triage.text())
        raise
    finally:
        code = worker.stop()
        if triage is not None:
            assert triage.stop() == 0, triage.text()
    assert code == 0, worker.text()
