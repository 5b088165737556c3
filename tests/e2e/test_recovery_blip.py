"""A blip is not a crash (issue 13 item 4): the support desk's triage job process is frozen
(SIGSTOP) for longer than ``crash_suspect_after`` but shorter than ``crash_confirm_after``, then
resumed (SIGCONT). baton must suspect it (filler, mute), see its heartbeats come back, and give it
the floor back: no replacement, no removal, and the same triage answers the caller's next words.
A real LiveKit server, ``baton worker`` with the repository's configuration, the desk's triage
worker (livekit-agents, jobs in their own processes) and a caller typing to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
from crashes import FIRST, SECOND, demo, first_audible, job_pid
from harness import ROOT, LiveKitServer, baton_worker, run

CONFIG = ROOT / "configs" / "baton.toml"
FROZEN = 1.8
"""Seconds the job process is stopped: past crash_suspect_after (0.8 s), short of
crash_confirm_after (3 s from the last heartbeat)."""


@pytest.mark.timeout(150)
def test_a_frozen_agent_that_comes_back_in_time_keeps_the_floor(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DESK_JOB_EXECUTOR", "process")
    baton = baton_worker(server, "--config", str(CONFIG))
    triage = demo.agent_worker(server, "triage.py")
    room = f"blip-{uuid.uuid4().hex[:6]}"

    async def call() -> dict[str, object]:
        caller = demo.Caller()
        loop = asyncio.get_running_loop()
        await caller.room.connect(server.url, demo.dispatch_token(demo.CALLER, room, ["baton"]))
        try:
            await caller.wait_line("triage", r"support desk", timeout=60)
            n = len(caller.transcript)
            await caller.say(FIRST)
            await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
            await asyncio.sleep(1.0)
            identity = caller.agent_identity("triage")
            assert identity is not None
            pid = job_pid(triage, room, identity)
            t_stop = loop.time()
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(FROZEN)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(1.5)
            n = len(caller.transcript)
            await caller.say(SECOND)
            reply = await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
            return {
                # baton's log of the call, before the teardown stops triage's worker (its job
                # leaving with the caller still there would be a crash, rightly)
                "log": baton.text(),
                "identity": identity,
                "reply_by": reply.who,
                "filler_after_stop": first_audible(caller.recorder.played().get("baton", []), t_stop),
                "t_stop": t_stop,
            }
        finally:
            await caller.recorder.stop()
            await caller.room.disconnect()

    try:
        baton.wait_for(r"worker registered", 30)
        triage.wait_for(r"^triage: registered", 60)
        res = run(call(), timeout=120)
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        (tmp_path / "triage.log").write_text(triage.text())
        (tmp_path / "baton.log").write_text(baton.text())
    assert isinstance(res, dict)
    text = str(res["log"])
    log = f"\nbaton:\n{text[-5000:]}"
    # The same triage answered after the freeze: nobody replaced it.
    assert res["reply_by"] == res["identity"], log
    assert "phase=Suspected" in text and "phase=SuspectCleared" in text, log
    assert '"outcome":"cleared"' in text, log
    assert "agent crashed" not in text and "phase=Confirmed" not in text, log
    assert "dispatching agent agent=triage" not in text.split("phase=Suspected", 1)[1], log
    # The caller heard the filler while triage was frozen.
    assert res["filler_after_stop"] is not None, log
