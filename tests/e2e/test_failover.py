"""baton survives itself (issue 14), end to end: a real LiveKit server, ``baton worker`` with the
repository's configuration and an embedded room-state store, the support desk's workers
(livekit-agents) and a caller typing to them; real processes get SIGKILL.

* ``baton worker`` is killed mid-call and started again on the same store: a baton is back in
  the room (the restarted worker dispatches itself into the rooms its store holds), triage keeps
  the floor (from the store and the room, not from the config's starting agent), and the
  handoff afterwards carries what the caller said before the kill.
* Two ``baton worker`` processes share one real ``redis-server``: the one whose baton holds the
  room gets SIGKILL; once the room's lease lapses the other worker dispatches baton into the room
  and takes it over (the floor from Redis, the turn said before the kill in the next handoff).
* Redis is killed mid-call (no persistence: it comes back empty) and started again on the same
  port 8 s later: meanwhile a turn is said and checkpointed, baton keeps coordinating from memory,
  logs the degraded store and reports ``baton_store_degraded`` 1 on ``/metrics``; when Redis is
  back the waiting writes go in (the metric goes back to 0, the room's record and triage's
  checkpoint are in Redis again) and the handoff afterwards carries the turn said during the
  outage.
* ``baton worker`` is killed in the middle of a handoff (triage -> billing accepted, billing
  dispatched, not yet activated) and started again on the same store: the unfinished handoff fails
  back to triage, exactly one agent's track is unmuted (triage's), and the handoff asked again
  afterwards ("please try billing again") reaches billing with the context. What the caller
  heard between the kill and the restored floor is measured and printed (baton's filler is
  baton's own track: it dies with it).
* livekit-server is SIGKILLed mid-call and started again on the same ports: baton, the agents
  and the caller come back to the room; baton does not end the session if it is back before the
  caller (it waits for the caller, bounded), triage keeps the floor and the handoff afterwards
  carries the turn said before the restart.
* The room is dispatched baton a second time while a baton coordinates it (a launcher retrying):
  the second job finds the room's lease held and does not join, so the running baton is not
  evicted (``DuplicateIdentity``) and the call goes on.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashes import FIRST, demo
from harness import (
    API_KEY,
    API_SECRET,
    ROOT,
    Baton,
    LiveKitServer,
    Process,
    RedisServer,
    baton_worker,
    dispatch_token,
    free_port,
    holder_of,
    redis_server,
    run,
)
from livekit import api
from peers import FILLER_TRACK, SOURCE_FILLER, audible_grid, longest_run
from test_observe import scrape, value

CONFIG = ROOT / "configs" / "baton.toml"
# The longest silence the caller may hear while no baton runs in the middle of a handoff (the
# source's own filler plays on): the handoff benchmark's gap limit (docs/BENCHMARKS.md 4),
# measured on the caller's arrival clock in 10 ms slots.
KILL_SILENCE_LIMIT_S = 0.06


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A real ``redis-server`` of the test's own (free port, temporary directory)."""
    with redis_server() as srv:
        yield srv


def desk(server: LiveKitServer) -> tuple[Process, Process]:
    """The desk's triage and billing workers, registered."""
    triage = demo.agent_worker(server, "triage.py")
    billing = demo.agent_worker(server, "billing.py")
    triage.wait_for(r"^triage: registered", 60)
    billing.wait_for(r"^billing: registered", 60)
    return triage, billing


def stop_all(*procs: Process) -> None:
    for p in procs:
        demo._stop_group("agent", p.proc)


def stop_and_keep_logs(tmp_path: Path, agents: tuple[Process, ...], batons: dict[str, Baton | None]) -> None:
    """Stops the desk's workers and every baton started, keeping the logs in `tmp_path`: each
    baton's as `<name>.log`, the agents' as `agent-<index>.log`."""
    stop_all(*agents)
    for i, agent in enumerate(agents):
        (tmp_path / f"agent-{i}.log").write_text(agent.text())
    for name, b in batons.items():
        if b is not None:
            b.stop()
            (tmp_path / f"{name}.log").write_text(b.text())


async def greeted(caller: demo.Caller, url: str, room: str, *, account: bool = True) -> str:
    """The caller joins `room` (its token dispatches baton) and triage greets it; with `account`
    the caller then gives its account (``FIRST``) and triage asks for the problem. Returns
    triage's identity."""
    await caller.room.connect(url, dispatch_token(demo.CALLER, room, ["baton"]))
    await caller.wait_line("triage", r"support desk", timeout=60)
    holder = caller.agent_identity("triage")
    assert holder is not None
    if account:
        n = len(caller.transcript)
        await caller.say(FIRST)
        await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
    return holder


async def handoff_to_billing(caller: demo.Caller, n: int) -> str:
    """The caller states a billing problem; returns billing's first line."""
    await caller.say(demo.PROBLEM)
    line = await caller.wait_line("billing", r".", timeout=60, after=n)
    return line.text


@pytest.mark.timeout(180)
def test_sigkill_of_baton_mid_call_a_restarted_worker_takes_the_room_back_and_triage_keeps_the_floor(
    server: LiveKitServer, tmp_path: Path
) -> None:
    store = tempfile.mkdtemp(prefix="baton-state-")
    env = {"BATON_STORE_PATH": store}
    first = baton_worker(server, "--config", str(CONFIG), env=env)
    triage, billing = desk(server)
    first.wait_for(r"worker registered", 30)
    room = f"failover-{uuid.uuid4().hex[:6]}"
    second: Baton | None = None

    async def call() -> tuple[str, str, str | None, str]:
        nonlocal second
        caller = demo.Caller()
        try:
            holder = await greeted(caller, server.url, room)
            # The checkpoint of that turn was acknowledged, so it is durable in the store.
            await asyncio.sleep(2.0)
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait()
            await asyncio.sleep(1.0)
            second = baton_worker(server, "--config", str(CONFIG), env=env)
            await asyncio.to_thread(second.wait_for, r"floor restored from the state store", 45)
            n = len(caller.transcript)
            text = await handoff_to_billing(caller, n)
            return holder, text, caller.agent_identity("triage"), "\n".join(x.text for x in caller.transcript)
        finally:
            await caller.room.disconnect()

    try:
        holder, billing_line, triage_after, transcript = run(call(), timeout=160)
    finally:
        stop_and_keep_logs(tmp_path, (triage, billing), {"baton-killed": first, "baton-restarted": second})
    log = f"\nbaton (restarted):\n{second.text()[-5000:] if second else ''}\ntranscript:\n{transcript}"
    assert second is not None
    restored = re.search(r"floor restored from the state store.*identity=(\S+)", second.text())
    assert restored is not None and restored.group(1) == holder, "the floor went back to triage" + log
    assert triage_after == holder, "no other triage took the call" + log
    assert "dispatching baton into it" in second.text(), "the restarted worker dispatched itself" + log
    # The desk's billing repeats the first thing the caller said in the bundle it got: said
    # before the kill, to the baton that died.
    assert 'you said: "Hi, my account is A-1001"' in billing_line, (
        f"billing's first line carries what the caller said before the kill: {billing_line!r}" + log
    )


@pytest.mark.timeout(180)
def test_two_workers_sharing_redis_the_survivor_takes_over_the_room_of_the_killed_one(
    server: LiveKitServer, redis: RedisServer, tmp_path: Path
) -> None:
    env = {"BATON_STORE_URL": redis.url}
    workers = [baton_worker(server, "--config", str(CONFIG), env=env) for _ in range(2)]
    for w in workers:
        w.wait_for(r"worker registered", 30)
        w.wait_for(r"room state in Redis", 5)
    triage, billing = desk(server)
    room = f"shared-{uuid.uuid4().hex[:6]}"
    marks: dict[str, object] = {}

    async def call() -> tuple[str, str, str | None, str]:
        caller = demo.Caller()
        try:
            holder = await greeted(caller, server.url, room)
            first = await holder_of(room, workers, 10)
            survivor = workers[1 - workers.index(first)]
            marks["survivor"] = survivor
            await asyncio.sleep(2.0)  # the turn's checkpoint is acknowledged, so it is in Redis
            marks["start"] = len(survivor.lines)
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait()
            await asyncio.to_thread(survivor.wait_for, r"floor restored from the state store", 45, marks["start"])
            text = await handoff_to_billing(caller, len(caller.transcript))
            return holder, text, caller.agent_identity("triage"), "\n".join(x.text for x in caller.transcript)
        finally:
            await caller.room.disconnect()

    try:
        holder, billing_line, triage_after, transcript = run(call(), timeout=160)
    finally:
        stop_and_keep_logs(tmp_path, (triage, billing), {f"baton-{i}": w for i, w in enumerate(workers)})
    survivor = marks["survivor"]
    assert isinstance(survivor, Baton)
    after = "\n".join(line for _, line in survivor.lines[int(str(marks["start"])) :])
    log = f"\nsurvivor's log after the kill:\n{after[-6000:]}\ntranscript:\n{transcript}"
    assert any(f"room={room}" in x for x in after.splitlines() if "dispatching baton into it" in x), (
        "the survivor dispatched baton" + log
    )
    tokens = [re.search(r"token=(\d+)", x) for x in after.splitlines() if "room lease taken" in x and room in x]
    assert tokens and tokens[0] is not None and int(tokens[0].group(1)) >= 2, (
        "a new token, after the killed one's" + log
    )
    restored = re.search(r"floor restored from the state store.*identity=(\S+)", after)
    assert restored is not None and restored.group(1) == holder, "the floor went back to triage" + log
    assert triage_after == holder, "no other triage took the call" + log
    assert 'you said: "Hi, my account is A-1001"' in billing_line, (
        f"billing's first line carries what the caller said before the kill: {billing_line!r}" + log
    )
    assert "panicked" not in after, log


async def unmuted_agents(server: LiveKitServer, room: str) -> set[str]:
    """Agents (participant kind AGENT, baton excepted) whose voice (an audio track not named
    ``baton-filler``: that is a source's own filler) the server does not hold muted: the ones the
    caller can hear speak."""
    async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
        res = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
    return {
        p.identity
        for p in res.participants
        if p.kind == api.ParticipantInfo.Kind.AGENT
        and p.identity != "baton"
        and any(t.type == api.TrackType.AUDIO and t.name != FILLER_TRACK and not t.muted for t in p.tracks)
    }


@pytest.mark.timeout(180)
def test_sigkill_of_baton_mid_handoff_a_restarted_baton_leaves_one_audible_agent_and_a_later_handoff_works(
    server: LiveKitServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold handoff asked after triage's sentence, no hint at the tool call: billing's
    # dispatch and start give the kill its window between handoff_accepted and activate.
    monkeypatch.setenv("DESK_TOOL_HINT", "0")
    monkeypatch.setenv("DESK_EARLY_REQUEST", "0")
    env = {"BATON_STORE_PATH": tempfile.mkdtemp(prefix="baton-state-")}
    first = baton_worker(server, "--config", str(CONFIG), env=env)
    triage, billing = desk(server)
    first.wait_for(r"worker registered", 30)
    room = f"midhandoff-{uuid.uuid4().hex[:6]}"
    second: Baton | None = None
    seen: dict[str, object] = {}

    async def call() -> tuple[str, str]:
        nonlocal second
        loop = asyncio.get_running_loop()
        caller = demo.Caller()
        try:
            holder = await greeted(caller, server.url, room)
            await asyncio.sleep(2.0)  # its checkpoint is durable
            start = len(first.lines)
            await caller.say(demo.PROBLEM)  # triage hands off to billing
            await asyncio.to_thread(first.wait_for, r"handoff phase.*phase=TargetDispatched", 30, start)
            # The handoff's record reaches the store a moment later; billing takes over a second
            # to join and say ready, so the kill still comes before its activation.
            await asyncio.sleep(0.3)
            t_kill = loop.time()
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait()
            seen["killed_after"] = [x for _, x in first.lines[start:] if "handoff phase" in x][-1][-120:]
            second = baton_worker(server, "--config", str(CONFIG), env=env)
            await asyncio.to_thread(second.wait_for, r"floor restored from the state store", 45)
            t_restored = loop.time()
            await asyncio.sleep(5.0)
            seen["unmuted_after_restore"] = await unmuted_agents(server, room)
            levels = caller.recorder.arrived()
            grid = audible_grid(levels, t_kill, t_restored)
            seen["kill_to_restored_s"] = round(t_restored - t_kill, 2)
            seen["silent_s_kill_to_restored"] = round(longest_run(grid, lambda a: not a), 2)
            seen["heard_kill_to_restored"] = sorted({w for cell in grid for w in cell})
            after = audible_grid(levels, t_restored, loop.time())
            seen["heard_after_restored"] = sorted({w for cell in after for w in cell})
            n = len(caller.transcript)
            # The desk's triage does not transfer twice unless asked again (after a handback).
            await caller.say("Please try billing again.")
            line = await caller.wait_line("billing", r".", timeout=60, after=n)
            await asyncio.sleep(3.0)
            seen["unmuted_after_handoff"] = await unmuted_agents(server, room)
            seen["billing"] = caller.agent_identity("billing")
            return holder, line.text
        finally:
            await caller.room.disconnect()

    try:
        holder, billing_line = run(call(), timeout=170)
    finally:
        stop_and_keep_logs(tmp_path, (triage, billing), {"baton-killed": first, "baton-restarted": second})
    print("mid-handoff kill:", seen)
    assert second is not None
    text = second.text()
    log = f"\nseen: {seen}\nbaton (restarted):\n{text[-6000:]}"
    assert "phase=TargetActivated" not in first.text(), "killed before billing's activation" + log
    restored = re.search(r"floor restored from the state store.*identity=(\S+) unfinished=Some\(\"(h-\d+)\"\)", text)
    assert restored is not None and restored.group(1) == holder, "triage got the floor back" + log
    assert seen["unmuted_after_restore"] == {holder}, "exactly one audible agent: triage" + log
    # Nothing of baton ran between the kill and the restore: triage's own filler covered it
    # (docs/protocol.md, "The source's filler").
    assert f"{holder}{SOURCE_FILLER}" in seen["heard_kill_to_restored"], "triage's filler was heard" + log
    assert seen["silent_s_kill_to_restored"] <= KILL_SILENCE_LIMIT_S, "silence while baton was down" + log
    assert 'you said: "Hi, my account is A-1001"' in billing_line, (
        f"the later handoff reached billing with the context: {billing_line!r}" + log
    )
    assert seen["unmuted_after_handoff"] == {seen["billing"]}, "exactly one audible agent: billing" + log
    assert "panicked" not in text, log


@pytest.mark.timeout(180)
def test_livekit_server_restart_mid_call_the_call_goes_on_and_a_later_handoff_works(tmp_path: Path) -> None:
    srv = LiveKitServer()
    srv.start()
    baton = baton_worker(srv, "--config", str(CONFIG))
    triage, billing = desk(srv)
    baton.wait_for(r"worker registered", 30)
    room = f"restart-{uuid.uuid4().hex[:6]}"
    seen: dict[str, object] = {}

    async def call() -> tuple[str, str]:
        caller = demo.Caller()
        reconnected = asyncio.Event()
        caller.room.on("reconnected", lambda *_: reconnected.set())
        try:
            holder = await greeted(caller, srv.url, room)
            await asyncio.sleep(2.0)
            mark = len(baton.lines)
            seen["mark"] = mark
            srv.kill()
            await asyncio.sleep(1.0)
            srv.start()
            await asyncio.to_thread(baton.wait_for, r"rejoined", 45, mark)
            await asyncio.wait_for(reconnected.wait(), 45)
            # The agents' workers register again and their jobs rejoin: triage must be back
            # and activated before it can hand off.
            await asyncio.to_thread(baton.wait_for, rf"kind=\"activate\"|floor_granted.*{holder}", 45, mark)
            await asyncio.sleep(2.0)
            n = len(caller.transcript)
            await caller.say(demo.PROBLEM)
            try:
                line = (await caller.wait_line("billing", r".", timeout=60, after=n)).text
            except TimeoutError as e:
                line, seen["no_handoff"] = "", str(e)
            seen["end"] = len(baton.lines)
            return holder, line
        finally:
            await caller.room.disconnect()

    try:
        holder, billing_line = run(call(), timeout=170)
    finally:
        stop_and_keep_logs(tmp_path, (triage, billing), {"baton": baton})
        srv.stop()
    after = "\n".join(x for _, x in baton.lines[int(str(seen["mark"])) : int(str(seen["end"]))])
    log = f"\nbaton after the restart:\n{after[-6000:]}"
    print("baton waited:", "not in the room after the rejoin" in after, "| back:", "back after the rejoin" in after)
    assert f'to={holder} kind="activate"' in after, "triage keeps the floor after the restart" + log
    assert "session ended" not in after, "baton did not end the session while the caller was away" + log
    assert "panicked" not in baton.text(), log
    if "no_handoff" in seen and "participant not found, ignoring text input" in triage.text():
        # livekit-agents' RoomIO (1.x, room_io.py _on_chat_text_stream) drops the caller's text
        # when its room's remote_participants lacks the caller, which the Python rtc SDK's full
        # reconnect after a server restart sometimes leaves so: triage never hears the request.
        pytest.xfail("triage's SDK lost the caller after the server restart; baton's part held: " + str(seen))
    assert 'you said: "Hi, my account is A-1001"' in billing_line, (
        f"billing's first line carries what the caller said before the restart: {billing_line!r}" + log
    )


def degraded(port: int) -> float | None:
    return value(scrape(port), "baton_store_degraded")


async def until_degraded(port: int, want: float, timeout: float) -> float:
    """Polls ``baton_store_degraded`` until it is `want`; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (got := await asyncio.to_thread(degraded, port)) != want:
        if loop.time() - start > timeout:
            raise TimeoutError(f"baton_store_degraded stayed {got}, not {want}, for {timeout} s")
        await asyncio.sleep(0.2)
    return loop.time() - start


def redis_cli(redis: RedisServer, *args: str) -> str:
    return subprocess.run(
        ["/usr/bin/redis-cli", "-p", str(redis.port), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.timeout(180)
def test_redis_down_and_back_mid_call_baton_coordinates_from_memory_and_catches_up(
    server: LiveKitServer, redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    baton = baton_worker(
        server, "--config", str(CONFIG), "--http", f"127.0.0.1:{port}", env={"BATON_STORE_URL": redis.url}
    )
    triage, billing = desk(server)
    baton.wait_for(r"worker registered", 30)
    room = f"redis-down-{uuid.uuid4().hex[:6]}"
    seen: dict[str, object] = {}

    async def call() -> tuple[str, str]:
        caller = demo.Caller()
        try:
            holder = await greeted(caller, server.url, room, account=False)
            seen["before"] = await asyncio.to_thread(degraded, port)
            loop = asyncio.get_running_loop()
            t_kill = loop.time()
            redis.kill()
            n = len(caller.transcript)
            await caller.say(FIRST)  # a turn, and its checkpoint, while Redis is down
            await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
            seen["to_degraded_s"] = await until_degraded(port, 1, 15)
            await asyncio.sleep(max(0.0, 8.0 - (loop.time() - t_kill)))  # an 8 s outage
            seen["during"] = await asyncio.to_thread(degraded, port)
            redis.start()
            seen["to_caught_up_s"] = await until_degraded(port, 0, 15)
            seen["record"] = redis_cli(redis, "GET", f"baton:{{{room}}}:record")
            seen["ckpt"] = redis_cli(redis, "HKEYS", f"baton:{{{room}}}:ckpt")
            line = await handoff_to_billing(caller, len(caller.transcript))
            return holder, line
        finally:
            await caller.room.disconnect()

    try:
        holder, billing_line = run(call(), timeout=160)
    finally:
        stop_and_keep_logs(tmp_path, (triage, billing), {"baton": baton})
    text = baton.text()
    log = f"\nseen: {seen}\nbaton:\n{text[-6000:]}"
    assert seen["before"] == 0 and seen["during"] == 1, log
    assert "state store unavailable: rooms keep coordinating from memory" in text, log
    assert "state store back: pending writes caught up" in text, log
    assert holder in str(seen["record"]), "the room's record (floor: triage) is in Redis again" + log
    assert "triage" in str(seen["ckpt"]).split(), "triage's checkpoint is in Redis again" + log
    assert 'you said: "Hi, my account is A-1001"' in billing_line, (
        f"billing's first line carries what the caller said while Redis was down: {billing_line!r}" + log
    )
    assert "panicked" not in text, log


@pytest.mark.timeout(180)
def test_a_second_dispatch_of_baton_into_a_coordinated_room_leaves_the_call_undisturbed(server: LiveKitServer) -> None:
    baton = baton_worker(server, "--config", str(CONFIG))
    triage, billing = desk(server)
    baton.wait_for(r"worker registered", 30)
    room = f"twice-{uuid.uuid4().hex[:6]}"

    async def call() -> str:
        caller = demo.Caller()
        try:
            await greeted(caller, server.url, room, account=False)
            lk = api.LiveKitAPI(server.url, API_KEY, API_SECRET)
            try:
                await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="baton", room=room))
            finally:
                await lk.aclose()
            await asyncio.to_thread(baton.wait_for, r"not joining: the room has a live baton", 30)
            return await handoff_to_billing(caller, len(caller.transcript))
        finally:
            await caller.room.disconnect()

    try:
        billing_line = run(call(), timeout=160)
    finally:
        stop_all(triage, billing)
        baton.stop()
    log = "\nbaton:\n" + baton.text()[-5000:]
    assert "DuplicateIdentity" not in baton.text() and "removed from the room" not in baton.text(), log
    assert "A-1001" in billing_line, f"the handoff after the second dispatch works: {billing_line!r}" + log
    assert len(re.findall(rf"joined the room.*{room}|room={room}.*joined the room", baton.text())) <= 1, log
