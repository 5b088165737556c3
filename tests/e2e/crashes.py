"""A call with the support desk's triage whose job process is killed mid-call (issue 13): the
flow `tests/e2e/test_recovery.py` asserts on and `bench/recovery.py` measures.

The triage worker runs its jobs in their own processes (``DESK_JOB_EXECUTOR=process``) and with
``DESK_REPORT_CHECKPOINTS=1``: it prints every checkpoint baton acknowledged (item ids and
digests of their canonical JSON) and, as a replacement, the items it recovered, so a comparison
is made on what each process really held. The caller is the demo's (``demo/run.py`` ``Caller``:
types on ``lk.chat``, records every subscribed track's level per 10 ms frame).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import API_KEY, API_SECRET, ROOT, LiveKitServer, Process, dispatch_token
from livekit import api
from peers import audible_grid, longest_run


def _demo() -> Any:
    if "demo_run" in sys.modules:
        return sys.modules["demo_run"]
    spec = importlib.util.spec_from_file_location("demo_run", ROOT / "demo" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["demo_run"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


demo = _demo()

FIRST = "Hi, my account is A-1001."
SECOND = "My internet keeps dropping every evening."
AUDIBLE = -55.0
"""dBFS of a 10 ms frame the caller counts as heard."""


def last_match(proc: Process, pattern: str) -> re.Match[str] | None:
    rx = re.compile(pattern)
    found = None
    for line in proc.text().splitlines():
        m = rx.search(line)
        if m is not None:
            found = m
    return found


def first_audible(levels: list[tuple[float, float]], after: float, before: float = float("inf")) -> float | None:
    return next((t for t, level in levels if after < t < before and level > AUDIBLE), None)


@dataclass
class Crash:
    """What the caller and the agents saw around one kill. Times are on the caller's loop clock
    (levels on the playout clock of ``demo.Caller``'s recorder)."""

    t_kill: float
    old_identity: str
    old_pid: int
    acked_items: list[list[str]]
    """The last checkpoint triage's adapter saw acknowledged: [item id, digest] per item."""
    played: dict[str, list[tuple[float, float]]]
    baton: str | None
    greeting: Any | None
    """The replacement's first transcript line that says the call was cut off, if any."""
    replacement: str | None
    """The identity of the triage that spoke after the kill, if any."""
    transcript: list[Any] = field(default_factory=list)
    """Everything the caller said and read (``demo.Line``), in order."""

    def kill_to_filler(self) -> float | None:
        t = first_audible(self.played.get(self.baton or "", []), self.t_kill)
        return None if t is None else t - self.t_kill

    def kill_to_replacement(self) -> float | None:
        t = first_audible(self.played.get(self.replacement or "", []), self.t_kill)
        return None if t is None else t - self.t_kill

    def longest_silence(self, until: float) -> float:
        """The longest stretch between the kill and ``until`` in which the caller heard nothing
        at all (no track above the threshold), in seconds."""
        grid = audible_grid(self.played, self.t_kill, until)
        return longest_run(grid, lambda audible: not audible)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def caller_saw(
    caller: Any, t_kill: float, old_identity: str, old_pid: int, greeting: Any | None, acked: list[list[str]]
) -> Crash:
    """The :class:`Crash` as ``caller`` (a ``demo.Caller`` still in the room) saw it; ``greeting``:
    the replacement's first line of interest, if any."""
    baton = next((p.identity for p in caller.room.remote_participants.values() if p.attributes.get("baton.role")), None)
    return Crash(
        t_kill=t_kill,
        old_identity=old_identity,
        old_pid=old_pid,
        acked_items=acked,
        played=caller.recorder.played(),
        baton=baton,
        greeting=greeting,
        replacement=None if greeting is None else greeting.who,
        transcript=list(caller.transcript),
    )


def job_pid(worker: Process, room: str, identity: str) -> int:
    """The pid of the job process serving ``identity`` in ``room``: from the desk's own
    ``joined`` line, else the worker's only job process (the desk runs no idle processes; with
    the ``forkserver`` start method, livekit-agents' default, jobs are the fork server's
    children)."""
    joined = last_match(worker, rf"joined room={re.escape(room)} identity={re.escape(identity)} pid=(\d+)")
    if joined is not None:
        return int(joined.group(1))
    jobs = []
    for child in _children(worker.proc.pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"forkserver" in cmdline:
            jobs += _children(child)
        elif b"resource_tracker" not in cmdline:
            jobs.append(child)
    assert len(jobs) == 1, f"worker {worker.proc.pid} has job processes {jobs}, expected one"
    return jobs[0]


async def wait_output(proc: Process, pattern: str, start: int, timeout: float) -> tuple[int, re.Match[str]]:
    """The first line of ``proc``'s output from index ``start`` matching ``pattern``: its index
    and match. Polls without blocking the caller's event loop."""
    rx = re.compile(pattern)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for i, (_, line) in enumerate(list(proc.lines[start:]), start):
            if (m := rx.search(line)) is not None:
                return i, m
        if loop.time() > deadline:
            raise TimeoutError(f"no line /{pattern}/ within {timeout}s:\n{proc.text()[-3000:]}")
        await asyncio.sleep(0.02)


async def converse_then_kill(
    server: LiveKitServer,
    room: str,
    triage: Process,
    *,
    with_baton: bool = True,
    agent_name: str = "triage",
    mid_sentence: bool = False,
    standby: bool = False,
    second: str = SECOND,
    tool: str | None = None,
    kill_worker: bool = False,
    then_say: str | None = None,
    then_expect: str = ".",
    wait: float = 60.0,
) -> Crash:
    """A caller says two things to triage (the second is ``second``), then triage's job process
    gets SIGKILL: 2 s after its second reply played out (checkpointed), or ``mid_sentence`` 0.4 s
    into that reply, or with ``tool`` while that tool runs (once the desk printed
    ``<tool> started`` and baton acknowledged a checkpoint whose journal holds it as started).
    ``kill_worker``: the whole triage worker gets SIGKILL too, so nothing can take the call. With ``standby`` a second
    triage is dispatched into the room first (it waits, muted, as a standby). Waits up to
    ``wait`` s for another triage to say the call was cut off; then the caller says
    ``then_say`` (if given) and waits up to 20 s for that triage to say something matching
    ``then_expect``.
    ``with_baton=False`` is the reference: the caller's token dispatches ``agent_name`` itself
    (a worker that needs no baton), and nothing replaces it."""
    caller = demo.Caller()
    loop = asyncio.get_running_loop()
    agents = ["baton"] if with_baton else [agent_name]
    await caller.room.connect(server.url, dispatch_token(demo.CALLER, room, agents))
    try:
        await caller.wait_line(agent_name, r"support desk", timeout=60)
        if standby:
            lk = api.LiveKitAPI(server.url, API_KEY, API_SECRET)
            try:
                await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="triage", room=room))
            finally:
                await lk.aclose()
            while sum(1 for line in triage.text().splitlines() if f"joined room={room}" in line) < 2:
                await asyncio.sleep(0.1)
        n = len(caller.transcript)
        await caller.say(FIRST)
        await caller.wait_line(agent_name, r"What is the problem", timeout=30, after=n)
        n = len(caller.transcript)
        old_identity = caller.agent_identity(agent_name)
        assert old_identity is not None
        t_said = loop.time()
        mark = len(triage.lines)
        await caller.say(second)
        if tool is not None:
            at, _ = await wait_output(triage, rf"^triage: {tool} started pid=", mark, 30)
            await wait_output(triage, rf'^triage: checkpoint journal seq=\d+ calls=.*\["{tool}", "started"\]', at, 5)
        elif mid_sentence:
            while first_audible(caller.recorder.played().get(old_identity, []), t_said + 0.05) is None:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.4)
        else:
            await caller.wait_line(agent_name, r"What is the problem", timeout=30, after=n)
            await asyncio.sleep(2.0)  # the reply is committed and checkpointed after it played out
        pid = job_pid(triage, room, old_identity)
        acked = last_match(triage, r"triage: checkpoint acked seq=(\d+) items=(.*)$")
        if with_baton:
            assert acked is not None, "no checkpoint was acknowledged:\n" + triage.text()[-3000:]
        t_kill = loop.time()
        if kill_worker:  # first, so it neither removes its dead job's participant nor takes a dispatch
            os.kill(triage.proc.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)

        deadline = t_kill + wait
        greeting = None
        while greeting is None and loop.time() < deadline:
            for line in caller.transcript[n:]:
                if line.who not in (old_identity, demo.CALLER) and re.search(r"cut off", line.text, re.I):
                    greeting = line
            await asyncio.sleep(0.1)
        if then_say is not None and greeting is not None:
            m, until = len(caller.transcript), loop.time() + 20
            await caller.say(then_say)
            while loop.time() < until and not any(
                x.who == greeting.who and re.search(then_expect, x.text) for x in caller.transcript[m:]
            ):
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        acked_items = json.loads(acked.group(2)) if acked is not None else []
        return caller_saw(caller, t_kill, old_identity, pid, greeting, acked_items)
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


async def handoff_then_kill_target(server: LiveKitServer, room: str, billing: Process, wait: float = 45.0) -> Crash:
    """The demo's call: the caller tells triage the problem (``demo.PROBLEM``), triage hands off
    to billing, and billing's job process gets SIGKILL once billing printed ``prepared`` (it has
    the bundle, and waits ``DESK_BILLING_READY_DELAY`` s before it says ready). Waits up to
    ``wait`` s for a billing of another identity to speak (``Crash.greeting``: its first line)."""
    caller = demo.Caller()
    loop = asyncio.get_running_loop()
    await caller.room.connect(server.url, dispatch_token(demo.CALLER, room, ["baton"]))
    try:
        await caller.wait_line("triage", r"support desk", timeout=60)
        n = len(caller.transcript)
        await caller.say(demo.PROBLEM)
        _, prepared = await wait_output(
            billing, rf"^billing: prepared room={re.escape(room)} identity=(\S+) pid=(\d+)", 0, 45
        )
        old_identity, pid = prepared.group(1), int(prepared.group(2))
        t_kill = loop.time()
        os.kill(pid, signal.SIGKILL)
        first = None
        while first is None and loop.time() < t_kill + wait:
            triage_id = caller.agent_identity("triage")
            first = next(
                (x for x in caller.transcript[n:] if x.who not in (old_identity, triage_id, demo.CALLER)), None
            )
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        return caller_saw(caller, t_kill, old_identity, pid, first, [])
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


def recovered_items(triage: Process) -> list[list[str]] | None:
    """The items the latest replacement in ``triage``'s worker reported it recovered, or None."""
    got = None
    for line in triage.text().splitlines():
        m = re.search(r"triage: recovered items=(.*)$", line)
        if m is not None:
            got = json.loads(m.group(1))
    return got


def context_equal(recovered: list[list[str]] | None, acked: list[list[str]]) -> bool:
    """The replacement holds the last acknowledged checkpoint item for item (ids, order, content;
    it may hold more, such as its own greeting)."""
    if recovered is None:
        return False
    ids = {i for i, _ in acked}
    return [it for it in recovered if it[0] in ids] == acked
