"""Recovery end to end (issue 13): a real LiveKit server, ``baton worker`` with the repository's
configuration, the support desk's triage worker (livekit-agents, its jobs in their own processes)
and a caller typing to it. Mid-conversation the triage job's process is killed with SIGKILL; the
caller must hear baton's filler, then a replacement triage that refers to what the caller said
before the crash, and whose chat context holds the last checkpoint item for item.

The triage worker runs with ``DESK_REPORT_CHECKPOINTS=1``: it prints every checkpoint baton
acknowledged (item ids and digests of their canonical JSON) and, as a replacement, the items it
recovered, so the comparison is made on what each process really held.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, LiveKitServer, Process, baton_worker, dispatch_token, run

CONFIG = ROOT / "configs" / "baton.toml"


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location("demo_run", ROOT / "demo" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_run"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


demo = _demo()

FIRST = "Hi, my account is A-1001."
SECOND = "My internet keeps dropping every evening."


def last_match(proc: Process, pattern: str) -> re.Match[str] | None:
    rx = re.compile(pattern)
    found = None
    for line in proc.text().splitlines():
        m = rx.search(line)
        if m is not None:
            found = m
    return found


async def converse_then_kill(server: LiveKitServer, room: str, triage: Process) -> dict[str, Any]:
    caller = demo.Caller()
    loop = asyncio.get_running_loop()
    await caller.room.connect(server.url, dispatch_token(demo.CALLER, room, ["baton"]))
    try:
        await caller.wait_line("triage", r"support desk", timeout=60)
        n = len(caller.transcript)
        await caller.say(FIRST)
        await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
        n = len(caller.transcript)
        await caller.say(SECOND)
        await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
        await asyncio.sleep(2.0)  # the reply is committed and checkpointed after it played out
        old_identity = caller.agent_identity("triage")
        joined = last_match(triage, rf"triage: joined room={room} identity=(\S+) pid=(\d+)")
        assert joined is not None and joined.group(1) == old_identity, triage.text()[-2000:]
        acked = last_match(triage, r"triage: checkpoint acked seq=(\d+) items=(.*)$")
        assert acked is not None, "no checkpoint was acknowledged:\n" + triage.text()[-3000:]
        baton_id = next(
            p.identity for p in caller.room.remote_participants.values() if p.attributes.get("baton.role")
        )
        t_kill = loop.time()
        os.kill(int(joined.group(2)), signal.SIGKILL)

        deadline = t_kill + 60
        greeting = None
        while greeting is None and loop.time() < deadline:
            for line in caller.transcript[n:]:
                if line.who not in (old_identity, demo.CALLER) and re.search(r"cut off", line.text, re.I):
                    greeting = line
            await asyncio.sleep(0.1)
        heard = "\n".join(f"  {x.who}: {x.text}" for x in caller.transcript)
        assert greeting is not None, f"no replacement spoke within 60 s of the kill; heard:\n{heard}"
        await asyncio.sleep(0.5)
        return {
            "t_kill": t_kill,
            "greeting": greeting,
            "old_identity": old_identity,
            "old_pid": int(joined.group(2)),
            "acked_items": json.loads(acked.group(2)),
            "played": caller.recorder.played(),
            "baton": baton_id,
        }
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


@pytest.mark.timeout(180)
@pytest.mark.skipif(
    "crash_suspect_after" not in CONFIG.read_text(),
    reason="baton's crash detection and replacement (issue 13, Rust side) is not in this tree yet",
)
def test_sigkill_of_the_triage_job_mid_call_is_replaced_from_its_checkpoint(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DESK_JOB_EXECUTOR", "process")
    monkeypatch.setenv("DESK_REPORT_CHECKPOINTS", "1")
    baton = baton_worker(server, "--config", str(CONFIG))
    triage = demo.agent_worker(server, "triage.py")
    room = f"recovery-{uuid.uuid4().hex[:6]}"
    try:
        baton.wait_for(r"worker registered", 30)
        triage.wait_for(r"^triage: registered", 60)
        res = run(converse_then_kill(server, room, triage), timeout=150)
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        (tmp_path / "triage.log").write_text(triage.text())
        (tmp_path / "baton.log").write_text(baton.text())
    assert isinstance(res, dict)
    log = f"\ntriage:\n{triage.text()[-4000:]}\nbaton:\n{baton.text()[-4000:]}"

    # The caller heard baton's filler between the kill and the replacement's first words.
    t_kill, greeting = res["t_kill"], res["greeting"]
    filler = [t for t, level in res["played"].get(res["baton"], []) if t_kill < t < greeting.at and level > -55]
    assert filler, "no filler between the kill and the replacement" + log
    to_filler, to_greeting = 1000 * (filler[0] - t_kill), 1000 * (greeting.at - t_kill)
    print(f"kill -> filler {to_filler:.0f} ms, kill -> greeting {to_greeting:.0f} ms")

    # The replacement refers to what the caller said before the crash.
    assert SECOND.rstrip(".") in greeting.text and "Ada" in greeting.text, greeting.text

    # Its context holds the last acknowledged checkpoint item for item (ids, order, content).
    recovered = last_match(triage, rf"triage: joined room={room} identity=(\S+) pid=(\d+)")
    assert recovered is not None and int(recovered.group(2)) != res["old_pid"], log
    got = last_match(triage, r"triage: recovered items=(.*)$")
    assert got is not None, "the replacement got no recovery bundle" + log
    items = json.loads(got.group(1))
    ids = {i for i, _ in res["acked_items"]}
    assert [it for it in items if it[0] in ids] == res["acked_items"], log
    said = [i for i, _ in res["acked_items"]]
    assert len(said) >= 6, res["acked_items"]  # instructions, greeting, two turns and the lookup
