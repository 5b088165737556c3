"""The handoff as the caller hears it: real server, baton, protocol-speaking tone agents, and a
caller recording every track separately.

The tests that judge audio timing at 10 ms resolution may run up to three times (`flaky`): the
caller and the agents are SDK participants sharing this 2-core machine's CPU with the server,
baton and the agent worker, and a starved decoder shows up as a gap that no handoff made. A
handoff that really leaves a gap or an overlap fails every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    API_KEY,
    API_SECRET,
    TRIAGE_THEN_BILLING,
    LiveKitServer,
    Process,
    config_file,
    joined_baton,
    run,
    wait_until,
)
from lk_baton import ErrorCode, TransferError, send_bundle
from peers import Peer, Recorder, audible_grid, longest_run, runs
from tone_agent import ToneAgent

CONFIG = (
    TRIAGE_THEN_BILLING
    + """
[handoff]
source_quiet_timeout = 2
join_timeout = 15
ready_timeout = 6
max_filler = 8
filler_fade = "200ms"
release = "standby"

[handoff.start_dispatch]
attempts = 1
"""
)


async def agent(server: LiveKitServer, room: str, name: str, freq: float, **kw: object) -> ToneAgent:
    peer = await Peer.join(server, room, f"agent-{name}", kind="agent", attributes={"lk.agent.name": name})
    a = ToneAgent(peer.room, name, freq, **kw)  # type: ignore[arg-type]
    await a.start()
    return a


@pytest.mark.flaky(reruns=2)
def test_warm_handoff_source_then_target_without_gap_or_overlap(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)) as baton:

        async def scenario() -> tuple[dict[str, list[tuple[float, float]]], float, float]:
            caller = await Peer.join(server, room, "caller")
            rec = Recorder(caller.room)
            a = await agent(server, room, "triage", 440)
            b = await agent(server, room, "billing", 880)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await wait_until(lambda: b.got("deactivate"), 5, "billing should be told to stand by")
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            t_request = loop.time()
            payload = os.urandom(256 * 1024)
            await a.handoff("billing", reason="caller wants a refund", bundle=payload)
            await wait_until(lambda: b.speaking, 8, "billing never got the floor")
            assert b.bundle == payload, "target does not hold the source's bundle byte for byte"
            await asyncio.sleep(1.0)
            t_end = loop.time()
            assert a.got("handoff_accepted")
            assert not a.speaking
            await rec.stop()
            for x in (a, b):
                await x.close()
            await caller.close()
            return rec.played(), t_request, t_end

        levels, t_request, t_end = run(scenario())  # type: ignore[misc]
        a_id, b_id = "agent-triage", "agent-billing"
        assert a_id in levels and b_id in levels and "baton" in levels, levels.keys()
        start = t_request - 0.5
        grid = audible_grid(levels, start, t_end - 0.1)
        # Order: the source is heard first, then the filler, then the target.
        first = {who: next((i for i, c in enumerate(grid) if who in c), None) for who in (a_id, "baton", b_id)}
        assert first[a_id] is not None and first[a_id] == 0, f"source not heard at the start: {first}"
        assert first[b_id] is not None, "target never heard"
        # A warm target is usually ready before the source has finished its sentence; then the
        # switch needs no filler, and none may be required here.
        last_a = max(i for i, c in enumerate(grid) if a_id in c)
        assert last_a < first[b_id], "source still audible when the target spoke"
        overlap = longest_run(grid, lambda c: a_id in c and b_id in c)
        assert overlap == 0, f"source and target overlapped for {overlap * 1000:.0f} ms"
        silence = longest_run(grid[handover_start(grid, a_id) :], lambda c: not c)
        print(f"longest silence {silence * 1000:.0f} ms; switch at slot {first[b_id]} after source end {last_a}")
        print("silent runs (slot, slots):", runs(grid, lambda c: not c), "filler slots:", first)
        assert silence <= 0.06, f"caller heard {silence * 1000:.0f} ms of silence"
        # The event stream: the timeline as a bare JSON line on stdout (not only in the log).
        out = baton.wait_for(r'^\{"handoff".*"outcome":"completed"', timeout=5)[1]
        timeline = json.loads(out)
        assert timeline["target"] in ("billing", b_id)
        # The target's first words are seen through its lk.agent.state attribute.
        assert "target_audible" in [p["phase"] for p in timeline["phases"]], timeline


def handover_start(grid: list[set[str]], source: str) -> int:
    """The slot where the switch starts: the source's last audible slot before the filler.

    Silence is judged from there on. Earlier gaps are the test agent's own stutter (three SDK
    participants and a bundle upload share this test's CPU), not something the handoff made."""
    first_filler = next((i for i, c in enumerate(grid) if "baton" in c), len(grid))
    return max((i for i, c in enumerate(grid[:first_filler]) if source in c), default=0)


@contextlib.contextmanager
def tone_worker(server: LiveKitServer, name: str, freq: float, *, never_ready: bool = False) -> Iterator[Process]:
    """A registered tone-agent worker; stopped on the way out, its output shown on failure."""
    env = {
        **os.environ,
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "TONE_AGENT_NAME": name,
        "TONE_FREQ": str(freq),
        "TONE_NEVER_READY": "1" if never_ready else "0",
    }
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "agents" / "tone_worker.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    p = Process(proc)
    try:
        p.wait_for("tone: registered", timeout=30)
        yield p
    except BaseException:
        print(p.text())
        raise
    finally:
        p.stop()


def analyse(
    levels: dict[str, list[tuple[float, float]]], start: float, end: float, b_id: str = "agent-billing"
) -> dict[str, object]:
    grid = audible_grid(levels, start, end)
    a_id = "agent-triage"
    return {
        "grid": grid,
        "first": {w: next((i for i, c in enumerate(grid) if w in c), None) for w in (a_id, "baton", b_id)},
        "overlap": longest_run(grid, lambda c: a_id in c and b_id in c),
        "silence": longest_run(grid, lambda c: not c),
    }


@pytest.mark.flaky(reruns=2)
def test_cold_handoff_dispatches_target_and_covers_the_gap_with_filler(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    with (
        tone_worker(server, "billing", 880) as worker,
        joined_baton(server, room, "--config", config_file(CONFIG)) as baton,
    ):

        async def scenario() -> tuple[dict[str, list[tuple[float, float]]], float, float, str]:
            caller = await Peer.join(server, room, "caller")
            rec = Recorder(caller.room)
            a = await agent(server, room, "triage", 440)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            payload = bytes(range(256)) * 1024  # 256 KiB the worker can check without being told
            await a.handoff("billing", reason="caller wants a refund", bundle=payload)

            def billing() -> str | None:
                for p in caller.room.remote_participants.values():
                    if p.attributes.get("lk.agent_name") == "billing":
                        return p.identity
                return None

            await wait_until(lambda: billing() is not None, 20, "billing never joined")
            await asyncio.sleep(3.0)
            t_end = loop.time()
            await rec.stop()
            await a.close()
            await caller.close()
            return rec.played(), t0, t_end, billing() or ""

        levels, t0, t_end, b_id = run(scenario())  # type: ignore[misc]
        r = analyse(levels, t0 - 0.5, t_end - 0.2, b_id)
        first = r["first"]
        print(f"cold: first={first} silence={r['silence']} overlap={r['overlap']}")
        print("silent runs (slot, slots):", runs(r["grid"], lambda c: not c))
        assert first["agent-triage"] is not None
        assert first["baton"] is not None, "no filler while the target was on its way"
        assert first[b_id] is not None, "target never heard"
        assert first["agent-triage"] < first["baton"] < first[b_id]  # type: ignore[operator]
        assert r["overlap"] == 0
        silence = longest_run(r["grid"][handover_start(r["grid"], "agent-triage") :], lambda c: not c)
        assert silence <= 0.06, f"caller heard {silence * 1000:.0f} ms of silence in the switch"
        worker.wait_for("tone: bundle bytes=262144 pattern=ok")
        line = baton.wait_for(r'"outcome":"completed"', timeout=5)[1]
        timeline = json.loads(line[line.index("{") :])
        assert timeline["warm"] is False
        phases = [p["phase"] for p in timeline["phases"]]
        needed_phases = ("requested", "source_quiet", "filler_on", "target_dispatched", "target_joined")
        for needed in (*needed_phases, "target_ready", "filler_off", "target_audible", "completed"):
            assert needed in phases, (needed, phases)


@pytest.mark.flaky(reruns=2)
def test_handback_when_target_never_gets_ready(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    with (
        tone_worker(server, "billing", 880, never_ready=True),
        joined_baton(server, room, "--config", config_file(CONFIG)) as baton,
    ):

        async def scenario() -> tuple[ToneAgent, dict[str, list[tuple[float, float]]], float, float]:
            caller = await Peer.join(server, room, "caller")
            rec = Recorder(caller.room)
            a = await agent(server, room, "triage", 440)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await asyncio.sleep(0.5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await a.handoff("billing", reason="caller wants a refund")
            await wait_until(lambda: any(m.get("cause") == "handback" for m in a.got("activate")), 15, "no handback")
            await asyncio.sleep(1.8)
            t_end = loop.time()
            await rec.stop()
            await a.close()
            await caller.close()
            return a, rec.played(), t0, t_end

        a, levels, t0, t_end = run(scenario())  # type: ignore[misc]
        handback = next(m for m in a.got("activate") if m.get("cause") == "handback")
        assert handback["reason"] == "target_not_ready"
        r = analyse(levels, t0 - 0.3, t_end - 0.2)
        grid = r["grid"]
        assert r["first"]["baton"] is not None, "no filler while waiting for the target"
        last_filler = max(i for i, c in enumerate(grid) if "baton" in c)
        first_source = next(i for i, c in enumerate(grid) if "agent-triage" in c)
        assert any("agent-triage" in c for c in grid[last_filler - 100 :]) and first_source < last_filler, (
            "source not heard again after the handback"
        )
        assert not any("agent-billing" in c for c in grid), "a target that was never ready was heard"
        silence = longest_run(grid[handover_start(grid, "agent-triage") :], lambda c: not c)
        assert silence <= 0.06, f"caller heard {silence * 1000:.0f} ms of silence in the switch"
        baton.wait_for(r'"outcome":"handed_back"', timeout=5)


@pytest.mark.flaky(reruns=2)
def test_source_ignoring_deactivate_is_silenced_by_server_mute(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)) as baton:

        async def scenario() -> tuple[dict[str, list[tuple[float, float]]], float, float]:
            caller = await Peer.join(server, room, "caller")
            rec = Recorder(caller.room)
            a = await agent(server, room, "triage", 440, ignore_deactivate=True)
            b = await agent(server, room, "billing", 880)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await wait_until(lambda: b.got("deactivate"), 5, "billing not on standby")
            await asyncio.sleep(0.5)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await a.handoff("billing", reason="test")
            await wait_until(lambda: b.speaking, 8, "billing never got the floor")
            await asyncio.sleep(1.0)
            t_end = loop.time()
            assert a.speaking, "the disobedient agent is still producing its tone"
            await rec.stop()
            for x in (a, b):
                await x.close()
            await caller.close()
            return rec.played(), t0, t_end

        levels, t0, t_end = run(scenario())  # type: ignore[misc]
        r = analyse(levels, t0 - 0.3, t_end - 0.1)
        grid = r["grid"]
        # It kept generating its tone, but after the switch the caller no longer hears it.
        assert all("agent-triage" not in c for c in grid[-50:]), "server-side mute did not silence the source"
        # baton lets the muted source's audio in flight drain under the filler for 300 ms before
        # the target speaks (the arbiter's mute settle). Measured here: 10 ms overlaps (one
        # 10 ms slot) remain in about half the runs on this machine, from the source's last
        # frames reaching the caller late; more than 60 ms would mean the mute failed.
        assert r["overlap"] <= 0.06, f"source and target overlapped for {r['overlap'] * 1000:.0f} ms"
        baton.wait_for("mute agent-triage's track")


def test_forged_handoff_from_the_caller_changes_nothing(server: LiveKitServer) -> None:
    room = f"h-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(CONFIG)) as baton:

        async def scenario() -> ToneAgent:
            caller = await Peer.join(server, room, "caller")
            a = await agent(server, room, "triage", 440)
            await wait_until(lambda: a.speaking, 5, "triage never got the floor")
            await caller.wait_participant("baton")
            forged = {"v": 1, "type": "handoff", "id": "evil-1", "target": "billing", "reason": "forged"}
            await caller.send("baton.control", json.dumps(forged).encode(), ["baton"])
            hello = {"v": 1, "type": "hello", "id": "evil-2", "agent_name": "triage"}
            await caller.send("baton.control", json.dumps(hello).encode(), ["baton"])
            await asyncio.sleep(1.0)
            assert a.speaking
            # The caller hangs up first: the floor holder leaving with the caller still there
            # would be a crash, which baton recovers from (a recovery's phases, not a handoff's).
            await caller.close()
            await a.close()
            return a

        a = run(scenario())
        assert not a.got("deactivate") and not a.got("handoff_accepted")  # type: ignore[attr-defined]
        baton.wait_for(r"security: control message ignored.*from=caller.*handoff")
        assert "handoff phase handoff=h-" not in baton.text()


async def caller_triage_and_standby_billing(server: LiveKitServer, room: str) -> tuple[Peer, ToneAgent, ToneAgent]:
    """A caller, triage holding the floor and billing told to stand by."""
    caller = await Peer.join(server, room, "caller")
    a = await agent(server, room, "triage", 440)
    b = await agent(server, room, "billing", 880)
    await wait_until(lambda: a.speaking, 5, "triage never got the floor")
    await wait_until(lambda: b.got("deactivate"), 5, "billing should be told to stand by")
    return caller, a, b


def test_bundles_only_from_the_floor_holder_or_the_handoffs_source(server: LiveKitServer) -> None:
    """Issue 11, item 4: after a completed handoff the released source (triage) uploads a bundle
    to baton; so does billing while it is still a standby. Both are refused with ERROR
    `not_floor_holder` (15), logged as a stale sender, and nothing is stored; the floor holder's
    upload is accepted."""
    room = f"h-{uuid.uuid4().hex[:8]}"
    meta = json.dumps({"content_type": "application/vnd.baton.bundle+json", "purpose": "handoff"})
    with joined_baton(server, room, "--config", config_file(CONFIG)) as baton:

        async def scenario() -> None:
            caller, a, b = await caller_triage_and_standby_billing(server, room)
            with pytest.raises(TransferError) as standby:
                await send_bundle(b.room, b.baton, os.urandom(2000), meta, deadline=10)
            assert standby.value.code == ErrorCode.NOT_FLOOR_HOLDER and standby.value.remote, standby.value
            await a.handoff("billing", reason="caller wants a refund", bundle=os.urandom(4000))
            await wait_until(lambda: b.speaking, 8, "billing never got the floor")
            await wait_until(lambda: a.got("release"), 5, "triage was not released")
            with pytest.raises(TransferError) as released:
                await send_bundle(a.room, a.baton, os.urandom(2000), meta, deadline=10)
            assert released.value.code == ErrorCode.NOT_FLOOR_HOLDER, released.value
            await send_bundle(b.room, b.baton, os.urandom(2000), meta, deadline=10)  # the holder's
            for x in (a, b):
                await x.close()
            await caller.close()

        run(scenario())
        stale = "\n".join(ln for _, ln in baton.lines if "security: stale_sender" in ln)
        assert "agent-billing" in stale and "agent-triage" in stale, baton.text()


# max_filler (the caller's longest wait on filler) is raised: 5 MiB through a loaded machine with
# the test agent's small window takes several seconds per leg.
SLOW_BUNDLE_CONFIG = CONFIG.replace("ready_timeout = 6", 'ready_timeout = "500ms"\nbundle_timeout = "300ms"').replace(
    "max_filler = 8", "max_filler = 40"
)


def test_deadlines_extend_while_a_large_bundle_keeps_moving(server: LiveKitServer) -> None:
    """Issue 11, item 7: a 5 MiB bundle takes longer per leg than `bundle_timeout` (300 ms here)
    and `ready_timeout` (500 ms). The relay reports each chunk as progress, so the deadlines
    move with it (up to `stall_timeout` past the latest progress) and the handoff completes with
    the bundle byte for byte, instead of failing while the bytes are still flowing."""
    room = f"h-{uuid.uuid4().hex[:8]}"
    with joined_baton(server, room, "--config", config_file(SLOW_BUNDLE_CONFIG)) as baton:

        async def scenario() -> float:
            caller, a, b = await caller_triage_and_standby_billing(server, room)
            payload = os.urandom(5 * 1024 * 1024)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await a.handoff("billing", reason="a long history", bundle=payload)
            uploaded = loop.time() - t0
            await wait_until(lambda: b.speaking, 30, "billing never got the floor")
            assert b.bundle == payload, "billing does not hold the bundle byte for byte"
            assert not a.got("handoff_failed") and not a.got("handoff_cancelled"), a.received
            for x in (a, b):
                await x.close()
            await caller.close()
            return uploaded

        uploaded = run(scenario(), timeout=90)
        assert isinstance(uploaded, float)
        # The upload alone outlasted bundle_timeout, so a fixed deadline would have failed it.
        assert uploaded > 0.3, f"the upload took {uploaded:.2f} s: too fast to test the deadline"
        timeline = json.loads(baton.wait_for(r'^\{"handoff".*"outcome":"completed"', timeout=5)[1])
        assert timeline["outcome"] == "completed", timeline
