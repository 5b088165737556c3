"""``./scripts/demo --crash``: the support desk call, and triage's job process killed mid-sentence.

The same setup as the handoff demo (``demo/run.py``: a local LiveKit server, ``baton worker``,
the support desk's triage worker, a caller typing to it), except that triage runs each job in
its own process (``DESK_JOB_EXECUTOR=process``, livekit-agents' default). Once the caller has
given their account and started on their problem, the demo sends SIGKILL to triage's job
process as soon as triage starts its answer. What a caller then hears is the point: baton's
filler, then a replacement triage that says it was cut off and repeats what the caller said
(issue 13). Prints and writes (``report.json``, ``crash.png``) the times at the caller from the
kill, the longest silence, baton's recovery timeline and the transcript.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import Baton, LiveKitServer
from peers import audible_grid, longest_run
from run import (
    CALLER,
    CONFIG,
    Caller,
    CallResult,
    Procs,
    agent_worker,
    baton_worker,
    dispatch_token,
    plot_levels,
    stop_and_keep_logs,
    wait_all,
    write_levels,
)

FIRST = "Hi, my account is A-1001."
SECOND = "My internet keeps dropping every evening."
CUT_OFF = re.compile(r"cut off", re.I)


@dataclass
class CrashReport:
    room: str
    killed_pid: int
    old_identity: str
    new_identity: str | None
    recovery: dict[str, Any] | None
    """baton's recovery timeline (its JSON line), when it wrote one."""
    heard_ms: dict[str, float | None]
    """At the caller, ms from the kill: triage's last sound, the filler's first, the
    replacement's first sound and its first words (transcription)."""
    silence_after_kill_ms: float
    """Longest stretch with nothing audible between the kill and the replacement's first sound
    (or the end of the recording)."""
    greeting: str
    refers_to_what_was_said: bool
    transcript: list[dict[str, Any]]
    plot: str | None


def triage_pid(triage: Baton, room: str) -> tuple[str, int] | None:
    found = None
    for line in triage.text().splitlines():
        m = re.search(rf"triage: joined room={room} identity=(\S+) pid=(\d+)", line)
        if m is not None:
            found = (m.group(1), int(m.group(2)))
    return found


async def call(server: LiveKitServer, room: str, triage: Baton) -> tuple[CallResult, float, int, str]:
    caller = Caller()
    loop = asyncio.get_running_loop()
    await caller.room.connect(server.url, dispatch_token(CALLER, room, ["baton"]))
    t_start = loop.time()
    try:
        await caller.wait_line("triage", r"support desk", timeout=45)
        n = len(caller.transcript)
        await caller.say(FIRST)
        print(f"[demo] caller: {FIRST}", file=sys.stderr)
        await caller.wait_line("triage", r"What is the problem", timeout=30, after=n)
        await asyncio.sleep(1.0)
        n = len(caller.transcript)
        await caller.say(SECOND)
        print(f"[demo] caller: {SECOND}", file=sys.stderr)
        # kill as soon as triage starts answering: mid-sentence
        await caller.wait_line("triage", r".", timeout=30, after=n)
        who = triage_pid(triage, room)
        if who is None:
            raise RuntimeError("triage never said which process runs the job:\n" + triage.text()[-2000:])
        old_identity, pid = who
        t_kill = loop.time()
        os.kill(pid, signal.SIGKILL)
        print(f"[demo] SIGKILL to triage's job process {pid} ({old_identity})", file=sys.stderr)
        greeting = ""
        deadline = t_kill + 45
        while not greeting and loop.time() < deadline:
            for line in caller.transcript[n:]:
                if line.who not in (old_identity, CALLER) and CUT_OFF.search(line.text):
                    greeting = line.text
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        t_end = loop.time()
        rec = caller.recorder
        ids = {"triage": old_identity}
        return (
            CallResult(rec.arrived(), list(caller.transcript), t_start, t_end, ids, rec.played()),
            t_kill,
            pid,
            greeting,
        )
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


def recovery_timeline(baton: Baton) -> dict[str, Any] | None:
    for line in baton.text().splitlines():
        if line.startswith("{") and '"recovery"' in line and '"phases"' in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                return doc
    return None


def build(
    room: str, res: CallResult, t_kill: float, pid: int, greeting: str, baton: Baton, plot: str | None
) -> CrashReport:
    step = 0.01
    grid = audible_grid(res.played, res.t_start, res.t_end, step=step)
    old = res.identities["triage"]
    lines = sorted(res.transcript, key=lambda x: x.at)
    new = next((x.who for x in lines if x.at > t_kill and x.who not in (old, CALLER) and CUT_OFF.search(x.text)), None)
    kill_slot = int((t_kill - res.t_start) / step)

    def first(pred: Any, start: int) -> int | None:
        return next((i for i in range(max(0, start), len(grid)) if pred(grid[i])), None)

    def ms(slot: int | None) -> float | None:
        return None if slot is None else round((slot * step + res.t_start - t_kill) * 1000)

    last_old = max((i for i, c in enumerate(grid) if old in c), default=None)
    new_first = first(lambda c: new in c, kill_slot) if new else None
    others = set(res.played) - {old, new, CALLER}  # baton's filler track
    filler_first = first(lambda c: bool(c & others), kill_slot)
    end = new_first if new_first is not None else len(grid)
    silence = longest_run(grid[kill_slot:end], lambda c: not c)
    words = next((x.at for x in lines if x.who == new), None)
    return CrashReport(
        room=room,
        killed_pid=pid,
        old_identity=old,
        new_identity=new,
        recovery=recovery_timeline(baton),
        heard_ms={
            "triage_last": ms(last_old),
            "filler_first": ms(filler_first),
            "replacement_first_sound": ms(new_first),
            "replacement_first_words": None if words is None else round((words - t_kill) * 1000),
        },
        silence_after_kill_ms=round(silence * 1000, 1),
        greeting=greeting,
        refers_to_what_was_said=SECOND.rstrip(".") in greeting,
        transcript=[
            {
                "ms_from_kill": round((x.at - t_kill) * 1000),
                "who": "caller" if x.who == CALLER else ("triage" if x.who == old else f"triage (replacement {x.who})"),
                "text": x.text,
            }
            for x in lines
        ],
        plot=plot,
    )


def print_report(r: CrashReport) -> None:
    print()
    print(f"=== baton demo --crash: room {r.room}")
    print(f"SIGKILL to triage's job process {r.killed_pid} ({r.old_identity}) while it was answering")
    h = r.heard_ms
    print(
        f"at the caller (ms from the kill): triage's last sound {h['triage_last']}, filler from "
        f"{h['filler_first']}, the replacement's first sound {h['replacement_first_sound']} "
        f"(its first words transcribed at {h['replacement_first_words']})"
    )
    print(f"longest silence between the kill and the replacement: {r.silence_after_kill_ms:.0f} ms")
    if r.recovery:
        print(f"baton's recovery timeline: outcome={r.recovery.get('outcome')}")
        for p in r.recovery.get("phases", []):
            detail = f"  ({p['detail']})" if p.get("detail") else ""
            print(f"  {p.get('ms'):>6}  {p.get('phase')}{detail}")
    else:
        print("baton wrote no recovery timeline")
    print(f"the replacement said: {r.greeting or '(nothing)'}")
    print(f"it refers to what the caller said before the crash: {'yes' if r.refers_to_what_was_said else 'NO'}")
    print("transcript (ms from the kill):")
    for x in r.transcript:
        print(f"  {x['ms_from_kill']:>7}  {x['who']}: {x['text']}")
    if r.plot:
        print(f"plot: {r.plot}")


def run_crash(out: Path) -> CrashReport:
    out.mkdir(parents=True, exist_ok=True)
    os.environ["DESK_JOB_EXECUTOR"] = "process"
    procs = Procs()
    room = f"crash-{uuid.uuid4().hex[:6]}"
    try:
        procs.server = LiveKitServer()
        procs.server.start()
        baton = baton_worker(procs.server, "--config", str(CONFIG))
        procs.children.append(("baton", baton))
        triage = agent_worker(procs.server, "triage.py")
        procs.children.append(("triage", triage))
        wait_all([("baton worker", baton, r"worker registered"), ("triage worker", triage, r"^triage: registered")], 60)
        res, t_kill, pid, greeting = asyncio.run(asyncio.wait_for(call(procs.server, room, triage), 150))
        timeline = recovery_timeline(baton) or {"phases": []}
        plot = plot_levels(res, timeline, t_kill, out / "crash.png")
        report = build(room, res, t_kill, pid, greeting, baton, plot)
        (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
        write_levels(out / "levels.json", res, t_kill=t_kill)
        return report
    finally:
        stop_and_keep_logs(procs, out, show=True)
