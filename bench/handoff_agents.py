"""`./scripts/bench handoff --agents`: the support desk's real livekit-agents agents handing a call
over through baton, against the same agents in one worker handing over in-process.

One local livekit-server and a fresh room per handoff. Six kinds, interleaved so drift in the
machine's load hits all alike:

  - cold: `baton worker` (configs/baton.toml) and the workers of examples/support-desk:
    `triage.py` and `billing.py`, each its own process, as in the demo. baton dispatches triage
    when the caller's room is created; triage's `transfer_to_billing` tool calls
    `BatonLink.handoff("billing", ..., early=False, hint=False)`: the request after triage's
    sentence; baton dispatches billing then (cold: a new job in the billing worker), relays the
    context and activates billing, which speaks first.
  - tool-hinted: the same with the adapter's defaults: the request is made when the tool is
    called (`speaking`, the sentence follows as the `tail`), so billing is dispatched and
    prepared while triage's sentence said with the tool call plays out (about 4 s here).
  - hinted: the same, and triage hints billing (`BatonLink.hint`) as soon as the caller's words
    are about a bill (`triage.hint_billing_on_words`, the rule `DESK_HINT=1` turns on): baton
    dispatches billing as a muted standby while triage looks the account up and talks.
  - standby: a second baton worker (agent name `baton-standby`) whose configuration keeps one
    billing standby from the call's start (`standby = 1`); the request at the tool call
    prepares it during triage's sentence, and the handoff is a switch at its end.
  - late-standby: the same standby, with the request after triage's sentence (`early=False`,
    the adapter's order before 2026-12-01): the standby is prepared after the last word.
  - monolith (the reference, no baton): one livekit-agents worker whose job runs one
    `AgentSession` with the same `TriageAgent` and `BillingAgent` (same scripted models, same
    espeak-ng voices). Its `transfer_to_billing` waits for the sentence before the tool call to
    be played out, as `BatonLink.handoff` does, seeds a `BillingAgent` with triage's context in
    process (`lk_baton.seed_agent`, no bundle, no network) and calls
    `session.update_agent(billing)`; billing's `on_enter` speaks first. The best case a
    monolith gets: no dispatch, no second process, no second participant.

The caller is the demo's (demo/run.py `Caller`: a real SDK participant that types on `lk.chat`
and records every subscribed track's level per 10 ms frame, on the playout clock `played_at`).
It waits for triage's greeting, types the demo's problem, and waits for billing's first
sentence, which must carry what only triage heard (name, account, plan, problem).

The agent workers are started by this file (`--worker triage|billing|monolith`), which imports
the example's modules unchanged and only adds time stamps on stdout (CLOCK_MONOTONIC, the clock
of the caller's event loop): `tool_call` when `transfer_to_billing` starts, `request` when the
sentence said with it has been played out (baton: the adapter then sends its `tail` and `quiet`,
or, asked after the sentence, builds the bundle and sends `handoff`; monolith: right before
seeding billing and `update_agent`), `speaking` when a session's first audio frame of a reply
is played out. `request` is so the same moment in every kind: the source's last word.

Where the time goes: baton's timeline (`phases`: dispatch, billing joined, bundle delivered,
ready, activated, audible at baton; ms from baton's receipt of the request, which is at the tool
call when the request is made then) and billing's own stamps, ms from `request` (negative:
before triage's last word): `job_start` (its job's entrypoint runs), `connected` (joined the
room), `attached` (baton answered its hello), `ready` (it sent ready), `activated`, `speaking`
(its first audio frame played out).

Standby cost per call: the billing worker's CPU seconds during each call (its jobs run as
threads of that one process, and calls run one at a time), its RSS after the call, and the
seconds billing spent in the room before the request (participant time a cold handoff does not
pay).

Per handoff:
  - request -> billing audible: from `request` to billing's first 10 ms frame above -55 dBFS
    at the caller, on the playout clock (baton: billing's own track; monolith: the one agent
    track, the first audible frame after triage's tail has been silent for 50 ms);
  - tool call -> billing audible: the same from `tool_call` (adds the rest of triage's last
    sentence, the same in both kinds);
  - request -> billing speaking: the agent side of the above (billing's `speaking` stamp);
  - longest silence heard from triage's last sound to billing's first (baton: filler covers it).

    .venv/bin/python bench/handoff.py --agents [--handoffs 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import statistics
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DESK = ROOT / "examples" / "support-desk"
for p in (ROOT / "tests" / "e2e", ROOT / "demo", DESK, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import billing  # noqa: E402  (examples/support-desk, unchanged)
import desk  # noqa: E402
import triage  # noqa: E402
from livekit.agents import Agent, AgentSession, JobContext, RunContext, function_tool  # noqa: E402
from livekit.agents.voice.room_io import RoomOptions  # noqa: E402
from lk_baton import ReceivedContext, seed_agent  # noqa: E402
from lk_baton.agents import wait_not_speaking  # noqa: E402

KINDS = ("cold", "tool-hinted", "hinted", "standby", "late-standby", "monolith")
BATON_STANDBY = "baton-standby"
"""The agent name of the baton worker that keeps a billing standby."""
MONOLITH = "desk-monolith"
"""The agent name the reference worker registers as."""
THRESHOLD = -55.0
STEP = 0.01
TAIL_GAP = 5
"""Silent 10 ms slots that end triage's tail on the monolith's one track."""
RESULTS = HERE / "results" / "handoff-agents.json"
STAMP_RE = re.compile(r"^bench: (?P<what>\w+) room=(?P<room>\S+) mono=(?P<t>[0-9.]+)$")


def stamp(what: str, room: str) -> None:
    """One time stamp on stdout, read by the benchmark process (same CLOCK_MONOTONIC)."""
    print(f"bench: {what} room={room} mono={time.monotonic():.6f}", flush=True)


# ---------------------------------------------------------------------------------------------
# The agent workers (run as `python bench/handoff_agents.py --worker ...`)


def _stamp_speaking(session: Any, room: str) -> None:
    def changed(ev: Any) -> None:
        if ev.new_state == "speaking":
            stamp("speaking", room)

    session.on("agent_state_changed", changed)


ROOM_OF: dict[int, str] = {}
"""A floor client's room name (its link's), for stamps made where only the client is at hand."""


_STAMPED: set[str] = set()
"""The agents whose adapter this process has wrapped with stamps (once per process)."""


def _install_stamps(name: str) -> None:
    """Wrap the adapter's methods with the stamps, once per process: in the worker (thread
    executor: its jobs share it) and again in each job process (DESK_JOB_EXECUTOR=process)."""
    if name in _STAMPED:
        return
    _STAMPED.add(name)
    from lk_baton import agents as lk

    attach = lk.BatonLink.attach.__func__  # type: ignore[attr-defined]

    async def attach_stamped(cls: type[lk.BatonLink], ctx: Any, session: Any, **kw: Any) -> lk.BatonLink:
        link: lk.BatonLink = await attach(cls, ctx, session, **kw)
        ROOM_OF[id(link.floor)] = link.room.name
        stamp("attached", link.room.name)
        _stamp_speaking(session, link.room.name)
        if name == "triage" and link.room.name.startswith("ba-h-"):
            triage.hint_billing_on_words(link, session)
        return link

    ready = lk.BatonLink.ready

    async def ready_stamped(self: lk.BatonLink, handoff_id: str | None = None) -> None:
        stamp("ready", self.room.name)
        await ready(self, handoff_id)

    handoff = lk.BatonLink.handoff

    async def handoff_stamped(self: lk.BatonLink, target: str, **kw: Any) -> lk.HandoffTicket:
        stamp("tool_call", self.room.name)
        # cold: the request after the sentence and no hint at the tool call, so billing is
        # dispatched then; late-standby: the request after the sentence too (the standby is
        # prepared after it); every other kind keeps the adapter's default (the request at
        # the tool call).
        if self.room.name.startswith(("ba-c-", "ba-l-")):
            kw["early"] = False
        if self.room.name.startswith("ba-c-"):
            kw["hint"] = False
        return await handoff(self, target, **kw)

    apply_tails = lk.BatonLink._apply_tails

    async def apply_tails_stamped(self: lk.BatonLink) -> None:
        had = bool(self._tails)
        await apply_tails(self)
        if had:
            stamp("tail_applied", self.room.name)

    lk.BatonLink._apply_tails = apply_tails_stamped  # type: ignore[method-assign]

    wait = lk.BatonLink._wait_not_speaking

    async def wait_stamped(self: lk.BatonLink, timeout: float) -> None:
        await wait(self, timeout)
        stamp("request", self.room.name)

    on_floor_event = lk.BatonLink._on_floor_event

    def on_floor_event_stamped(self: lk.BatonLink, kind: Any, msg: dict[str, Any]) -> None:
        if kind == "activated":
            stamp("activated", self.room.name)
        on_floor_event(self, kind, msg)

    from lk_baton import floor as lk_floor

    request_handoff = lk_floor.FloorClient.request_handoff

    def request_stamped(self: Any, *a: Any, **kw: Any) -> Any:
        out = request_handoff(self, *a, **kw)
        stamp("handoff_sent", ROOM_OF.get(id(self), "?"))
        return out

    lk.BatonLink._on_floor_event = on_floor_event_stamped  # type: ignore[method-assign]
    lk_floor.FloorClient.request_handoff = request_stamped  # type: ignore[method-assign]
    lk.BatonLink.attach = classmethod(attach_stamped)  # type: ignore[method-assign, assignment]
    lk.BatonLink.handoff = handoff_stamped  # type: ignore[method-assign]
    lk.BatonLink._wait_not_speaking = wait_stamped  # type: ignore[method-assign]
    lk.BatonLink.ready = ready_stamped  # type: ignore[method-assign]


async def _entrypoint_stamped(name: str, ctx: JobContext) -> None:
    _install_stamps(name)
    room = ctx.job.room.name
    stamp("job_start", room)
    connect = ctx.connect

    async def connect_stamped(*a: Any, **kw: Any) -> Any:
        r = await connect(*a, **kw)
        stamp("connected", room)
        return r

    ctx.connect = connect_stamped  # type: ignore[method-assign]
    await (triage.entrypoint if name == "triage" else billing.entrypoint)(ctx)


# Module-level, so the process executor can pickle them.
async def triage_entrypoint_stamped(ctx: JobContext) -> None:
    await _entrypoint_stamped("triage", ctx)


async def billing_entrypoint_stamped(ctx: JobContext) -> None:
    await _entrypoint_stamped("billing", ctx)


def run_baton_agent(name: str) -> None:
    """examples/support-desk/{triage,billing}.py unchanged, with time stamps added around the
    adapter: `tool_call` (BatonLink.handoff entered), `request` (the sentence played out, the
    handoff proper starts), `speaking`."""
    _install_stamps(name)
    if name == "triage":
        desk.run_worker(triage.AGENT_NAME, triage_entrypoint_stamped)
    else:
        desk.run_worker(billing.AGENT_NAME, billing_entrypoint_stamped)


class MonolithBilling(billing.BillingAgent):
    """billing.py's agent with its own model and voice (in billing.py they are its session's;
    here the session's are triage's). ``BillingAgent.__init__`` only sets the instructions."""

    def __init__(self, reason: str) -> None:
        Agent.__init__(
            self,
            instructions=billing.billing_instructions(reason),
            llm=desk.make_llm(billing.billing_script),
            tts=desk.make_tts("en-gb"),
        )

    async def on_enter(self) -> None:
        self.session.generate_reply()  # speak first, as baton's activate makes billing.py do


class MonolithTriage(triage.TriageAgent):
    """triage.py's agent whose transfer is an in-process ``update_agent``, no baton."""

    def __init__(self, room: str) -> None:
        super().__init__(None)
        self.room = room

    async def on_enter(self) -> None:
        self.session.generate_reply()  # greet, as baton's activate makes triage.py do

    @function_tool
    async def transfer_to_billing(self, ctx: RunContext[desk.Caller], reason: str) -> None:
        """Transfer the caller to the billing team. `reason`: one line on the problem."""
        stamp("tool_call", self.room)
        ctx.userdata.problem = reason
        # the same waits as BatonLink.handoff: the sentence before the call, then `speaking`
        with contextlib.suppress(RuntimeError):
            await ctx.wait_for_playout()
        await wait_not_speaking(self.session, 10.0)
        stamp("request", self.room)
        received = ReceivedContext(
            chat_ctx=self.chat_ctx.copy(),
            user_state=ctx.userdata,
            reason=reason,
            from_agent=triage.AGENT_NAME,
        )
        self.session.update_agent(await seed_agent(MonolithBilling(reason), received))


async def monolith_entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session: AgentSession[desk.Caller] = AgentSession(
        llm=desk.make_llm(triage.triage_script), tts=desk.make_tts("en-us"), userdata=desk.Caller()
    )
    _stamp_speaking(session, ctx.room.name)
    await session.start(agent=MonolithTriage(ctx.room.name), room=ctx.room, room_options=RoomOptions(audio_input=False))
    # which process serves which room: bench/recovery.py kills this job's process
    desk.say(MONOLITH, f"joined room={ctx.room.name} identity={ctx.room.local_participant.identity} pid={os.getpid()}")


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Workers:
    baton: Any
    baton_standby: Any
    triage: Any
    billing: Any
    monolith: Any


def standby_config(path: Path) -> Path:
    """configs/baton.toml with one billing standby from the call's start."""
    from run import CONFIG

    text, n = re.subn(r'(\nname = "billing"\nrole = "billing"\n)', r"\1standby = 1\n", CONFIG.read_text())
    if n != 1:
        raise SystemExit("configs/baton.toml's billing entry changed: update bench/handoff_agents.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_worker(server: Any, kind: str) -> Any:
    """This file as a worker process (`--worker kind`), environment as demo/run.py's agents."""
    from run import agent_process

    return agent_process(server, [str(Path(__file__).resolve()), "--worker", kind])


def stamps(proc: Any, room: str, start: int) -> dict[str, list[float]]:
    """Every `bench:` stamp a worker printed for `room` (from log line `start` on)."""
    out: dict[str, list[float]] = {}
    for _, line in proc.lines[start:]:
        m = STAMP_RE.match(line)
        if m and m["room"] == room:
            out.setdefault(m["what"], []).append(float(m["t"]))
    return out


async def one_call(server: Any, room: str, kind: str) -> Any:
    """The demo's caller through one call: triage's greeting, the problem, billing's first
    sentence, then 1 s more of recording."""
    from harness import dispatch_token
    from run import CALLER, PROBLEM, Caller, CallResult

    first, second = ("triage", "billing") if kind != "monolith" else (MONOLITH, MONOLITH)
    caller = Caller()
    loop = asyncio.get_running_loop()
    dispatch = {
        "cold": "baton",
        "tool-hinted": "baton",
        "hinted": "baton",
        "standby": BATON_STANDBY,
        "late-standby": BATON_STANDBY,
        "monolith": MONOLITH,
    }[kind]
    await caller.room.connect(server.url, dispatch_token(CALLER, room, [dispatch]))
    t_start = loop.time()
    try:
        await caller.wait_line(first, r"support desk", timeout=45)
        await asyncio.sleep(0.3)
        n = len(caller.transcript)
        await caller.say(PROBLEM)
        await caller.wait_line(second, r"this is billing", timeout=45, after=n)
        await asyncio.sleep(1.0)
        ids = {a: caller.agent_identity(a) or "" for a in (first, second)}
        # per identity, each track placed on the playout clock on its own (peers.Recorder)
        return CallResult(caller.recorder.played(), list(caller.transcript), t_start, loop.time(), ids)
    finally:
        await caller.recorder.stop()
        await caller.room.disconnect()


def analyse(res: Any, kind: str, st: dict[str, list[float]]) -> dict[str, Any]:
    from peers import audible_grid, is_filler, longest_run, runs
    from run import FACTS

    r: dict[str, Any] = {}
    if not st.get("request") or not st.get("tool_call"):
        r["error"] = f"missing stamps: {sorted(st)}"
        return r
    t_tool, t_req = st["tool_call"][0], st["request"][0]
    first, second = ("triage", "billing") if kind != "monolith" else (MONOLITH, MONOLITH)
    src, tgt = res.identities.get(first, ""), res.identities.get(second, "")
    levels = res.levels  # already on the playout clock (one_call)
    grid = audible_grid(levels, res.t_start, res.t_end, threshold=THRESHOLD, step=STEP)

    def slot(t: float) -> int:
        return max(0, int((t - res.t_start) / STEP))

    # billing's first sound. baton: the first audible frame of billing's own track after the
    # request. monolith (one track): the first audible frame after triage's tail, i.e. after the
    # first run of TAIL_GAP silent slots from the request on (triage's last frames still reach
    # the caller just after the request; billing is heard 100 ms or more after it in these runs)
    speaking = [t for t in st.get("speaking", []) if t >= t_req]
    t_speaking = speaking[0] if speaking else None
    from_slot = slot(t_req)
    if kind == "monolith":
        quiet = 0
        while from_slot < len(grid) and quiet < TAIL_GAP:
            quiet = quiet + 1 if tgt not in grid[from_slot] else 0
            from_slot += 1
    b_first = next((i for i in range(from_slot, len(grid)) if tgt and tgt in grid[i]), None)
    if b_first is None:
        r["error"] = "billing never heard"
        return r
    t_heard = res.t_start + b_first * STEP
    r["request_to_audible_ms"] = (t_heard - t_req) * 1000
    r["tool_call_to_audible_ms"] = (t_heard - t_tool) * 1000
    r["tool_call_to_request_ms"] = (t_req - t_tool) * 1000
    if t_speaking is not None:
        r["request_to_speaking_ms"] = (t_speaking - t_req) * 1000
        r["speaking_to_audible_ms"] = (t_heard - t_speaking) * 1000
    # triage's last sound before billing's first
    last_src = max((i for i in range(b_first) if src in grid[i]), default=None)
    if last_src is not None:
        r["source_last_ms"] = (res.t_start + (last_src + 1) * STEP - t_req) * 1000
        window = grid[last_src + 1 : b_first]
        r["silence_ms"] = longest_run(window, lambda c: not c) * 1000
        # where: every silent stretch of 20 ms or more, [ms from the request, length in ms]
        r["silences"] = [
            [round(r["source_last_ms"] + i * STEP * 1000), n * STEP * 1000]
            for i, n in runs(window, lambda c: not c, min_len=2)
        ]
        r["filler_ms"] = sum(1 for c in window if any(is_filler(w) for w in c)) * STEP * 1000
    # the levels the numbers come from, around the request and around billing's first sound
    # (ms from the request, dBFS per 10 ms frame on the playout clock), to check them by eye
    names = {v: k for k, v in res.identities.items()} if kind != "monolith" else {}
    near = [(t_req - 0.3, t_req + 0.5), (t_heard - 0.5, t_heard + 0.3)]
    r["levels_near"] = {
        names.get(who, who): [
            [round((t - t_req) * 1000), round(lv, 1) if lv > -200 else None]
            for t, lv in series
            if any(a <= t <= b for a, b in near)
        ]
        for who, series in levels.items()
    }
    said = [x.text for x in res.transcript if x.who == tgt and "this is billing" in x.text.lower()]
    r["billing_first"] = said[0] if said else ""
    r["facts_ok"] = bool(said) and all(f.lower() in said[0].lower() for f in FACTS)
    return r


def baton_timeline(baton: Any, start: int) -> dict[str, Any] | None:
    for _, line in baton.lines[start:]:
        if line.startswith('{"handoff":') and '"outcome":' in line:
            return json.loads(line)  # type: ignore[no-any-return]
    return None


async def one_handoff(server: Any, w: Workers, kind: str) -> dict[str, Any]:
    room = f"ba-{kind[0]}-{uuid.uuid4().hex[:8]}"
    agent_procs = (w.triage, w.billing) if kind != "monolith" else (w.monolith,)
    starts = [len(p.lines) for p in agent_procs]
    baton = w.baton_standby if kind in ("standby", "late-standby") else w.baton
    n_baton = len(baton.lines)
    billing_pid = w.billing.proc.pid
    cpu0 = cpu_seconds(billing_pid)
    res = await one_call(server, room, kind)
    billing_cpu = cpu_seconds(billing_pid) - cpu0
    st: dict[str, list[float]] = {}
    for p, n in zip(agent_procs, starts, strict=True):
        for k, v in stamps(p, room, n).items():
            st.setdefault(k, []).extend(v)
    if kind != "monolith":
        # triage's own stamps are not billing's: keep billing's only
        own = stamps(w.billing, room, starts[1])
        for k in ("speaking", "job_start", "connected", "attached", "ready", "activated", "tail_applied"):
            st[k] = own.get(k, [])
    r = analyse(res, kind, st)
    r["room"] = room
    if kind != "monolith":
        t_req = st["request"][0] if st.get("request") else None
        if t_req is not None:
            # billing's own stamps, ms from the request (negative: before it, as a standby's)
            r["billing_ms"] = {
                k: round((st[k][0] - t_req) * 1000) for k in ("job_start", "connected", "attached") if st.get(k)
            }
            # ready may come before the end of the sentence (a request made at the tool call)
            t_tool = st["tool_call"][0] if st.get("tool_call") else t_req
            for k in ("ready", "activated", "tail_applied"):
                late = [t for t in st.get(k, []) if t >= t_tool - 0.001]
                if late:
                    r["billing_ms"][k] = round((late[0] - t_req) * 1000)
            # triage's: the handoff request handed to the floor client (bundle built)
            if st.get("handoff_sent"):
                r["billing_ms"]["handoff_sent"] = round((st["handoff_sent"][0] - t_req) * 1000)
            if st.get("connected"):
                r["billing_in_room_before_request_s"] = max(0.0, t_req - st["connected"][0])
        r["billing_cpu_s"] = billing_cpu
        r["billing_rss_mb"] = rss_mb(billing_pid)
        for _ in range(100):  # baton prints the timeline when the handoff is completed
            tl = baton_timeline(baton, n_baton)
            if tl is not None:
                break
            await asyncio.sleep(0.1)
        r["outcome"] = tl.get("outcome") if tl else "no timeline"
        if tl:
            r["phases_ms"] = {p["phase"]: p["ms"] for p in reversed(tl["phases"])}
            r["warm"] = tl.get("warm")
    else:
        r["outcome"] = "completed" if "request_to_audible_ms" in r else "failed"
    return r


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def summarise(rs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    from common import summary

    vals = [float(r[key]) for r in rs if r.get(key) is not None]
    return summary(vals) if vals else None


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from harness import BATON_BIN, LiveKitServer, baton_worker
    from run import CONFIG, Procs, wait_all

    binary = {  # the binary the baton worker runs (others may rebuild it during the run)
        "path": str(BATON_BIN),
        "mtime": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(BATON_BIN.stat().st_mtime)),
        "sha256": hashlib.sha256(BATON_BIN.read_bytes()).hexdigest()[:16],
    }
    procs = Procs()
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    loads = [loadavg()]
    t_run = time.monotonic()
    try:
        procs.server = LiveKitServer()
        procs.server.start()
        standby_cfg = standby_config(args.logs / "baton-standby.toml")
        w = Workers(
            baton=baton_worker(procs.server, "--config", str(CONFIG)),
            baton_standby=baton_worker(procs.server, "--config", str(standby_cfg), "--agent-name", BATON_STANDBY),
            triage=start_worker(procs.server, "triage"),
            billing=start_worker(procs.server, "billing"),
            monolith=start_worker(procs.server, "monolith"),
        )
        procs.children += [("baton", w.baton), ("baton-standby", w.baton_standby)]
        procs.children += [("triage", w.triage), ("billing", w.billing)]
        procs.children.append(("monolith", w.monolith))
        wait_all(
            [
                ("baton worker", w.baton, r"worker registered"),
                ("baton-standby worker", w.baton_standby, r"worker registered"),
                ("triage worker", w.triage, r"^triage: registered"),
                ("billing worker", w.billing, r"^billing: registered"),
                ("monolith worker", w.monolith, rf"^{MONOLITH}: registered"),
            ],
            timeout=60,
        )
        kinds = [k for k in KINDS if k in args.kinds]
        order = [k for _ in range(args.handoffs) for k in kinds]

        async def run_all() -> None:
            for i, kind in enumerate(order):
                t0 = time.monotonic()
                try:
                    r = await asyncio.wait_for(one_handoff(procs.server, w, kind), 120)
                except Exception as e:  # one failed handoff is a result, not the end
                    r = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc(limit=2)
                r["kind"], r["load1"] = kind, loadavg()[0]
                results[kind].append(r)
                loads.append(loadavg())
                print(
                    f"{i + 1:3d} {kind:<8} request->audible {_f(r.get('request_to_audible_ms'))} ms"
                    f"  tool->audible {_f(r.get('tool_call_to_audible_ms'))} ms"
                    f"  silence {_f(r.get('silence_ms'), 5, 0)} ms  facts {r.get('facts_ok')}"
                    f"  {r.get('outcome') or ''} {r.get('error') or ''}"
                    f" ({time.monotonic() - t0:.1f} s, load {r['load1']})",
                    flush=True,
                )
                await asyncio.sleep(0.5)

        asyncio.run(run_all())
    finally:
        named = list(procs.children)
        procs.stop_all()
        args.logs.mkdir(parents=True, exist_ok=True)
        for name, p in named:
            (args.logs / f"{name}.log").write_text(p.text() + "\n")
        if procs.server is not None:
            with contextlib.suppress(OSError):
                (args.logs / "livekit-server.log").write_text(procs.server.log_path.read_text(errors="replace"))
                procs.server.log_path.unlink()
        print(f"worker logs in {args.logs}", file=sys.stderr)
    from common import loadavg_summary, summary

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"./scripts/bench handoff --agents --handoffs {args.handoffs}"
        + ("" if args.json == RESULTS else f" --json {args.json}")
        + ("" if set(args.kinds) == set(KINDS) else f" --kinds {','.join(args.kinds)}"),
        "args": {"handoffs": args.handoffs, "kinds": list(args.kinds)},
        "baton_binary": binary,
        "run_seconds": time.monotonic() - t_run,
        "loadavg": loadavg_summary(loads),
        "summary": {},
        "runs": results,
    }
    for kind, rs in results.items():
        if not rs:
            continue
        ok = [r for r in rs if r.get("outcome") == "completed" and "request_to_audible_ms" in r and "error" not in r]
        report["summary"][kind] = {
            "n": len(rs),
            "ok": len(ok),
            "facts_ok": sum(1 for r in ok if r.get("facts_ok")),
            "failed": [r.get("error") or r.get("outcome") for r in rs if r not in ok],
            "request_to_audible_ms": summarise(ok, "request_to_audible_ms"),
            "tool_call_to_audible_ms": summarise(ok, "tool_call_to_audible_ms"),
            "request_to_speaking_ms": summarise(ok, "request_to_speaking_ms"),
            "speaking_to_audible_ms": summarise(ok, "speaking_to_audible_ms"),
            "tool_call_to_request_ms": summarise(ok, "tool_call_to_request_ms"),
            "silence_ms": summarise(ok, "silence_ms"),
            "warm": sum(1 for r in ok if r.get("warm")),
        }
        if kind != "monolith":
            k = report["summary"][kind]
            k["billing_cpu_s"] = summarise(ok, "billing_cpu_s")
            k["billing_rss_mb"] = summarise(ok, "billing_rss_mb")
            k["billing_in_room_before_request_s"] = summarise(ok, "billing_in_room_before_request_s")
            phases: dict[str, list[float]] = {}
            for r in ok:
                for p, ms in (r.get("phases_ms") or {}).items():
                    phases.setdefault(f"baton:{p}", []).append(ms)
                for p, ms in (r.get("billing_ms") or {}).items():
                    phases.setdefault(f"billing:{p}", []).append(ms)
                for key in ("request_to_speaking_ms", "request_to_audible_ms"):
                    if r.get(key) is not None:
                        phases.setdefault(key, []).append(r[key])
            k["phases_ms"] = {p: summary(v) for p, v in sorted(phases.items(), key=lambda kv: statistics.median(kv[1]))}
    s = report["summary"]
    ratio: dict[str, float] = {}
    for kind in ("cold", "tool-hinted", "hinted", "standby", "late-standby"):
        for key in ("request_to_audible_ms", "tool_call_to_audible_ms"):
            b, m = s.get(kind, {}).get(key), s.get("monolith", {}).get(key)
            if b and m:
                ratio[f"{kind}:{key}_p50"] = b["p50"] / m["p50"]
                ratio[f"{kind}:{key}_p95"] = b["p95"] / m["p95"]
    report["ratio_over_monolith"] = ratio
    return report


def dumps(report: dict[str, Any]) -> str:
    """JSON with every [ms, level] pair (and other pairs of numbers) on one line."""
    text = json.dumps(report, indent=1, default=str)
    return re.sub(r"\[\s+(-?[0-9.e+-]+|null),\s+(-?[0-9.e+-]+|null)\s+\]", r"[\1, \2]", text)


def _f(v: float | None, width: int = 7, digits: int = 1) -> str:
    return f"{v:{width}.{digits}f}" if v is not None else " " * (width - 1) + "-"


def print_report(report: dict[str, Any]) -> None:
    from common import print_table

    s, la = report["summary"], report["loadavg"]
    kinds = [k for k in KINDS if k in s]
    print(
        f"\nhandoffs: {', '.join(str(s[k]['n']) + ' ' + k for k in kinds)}; {report['run_seconds'] / 60:.1f} min; "
        f"load avg start {la['start'][0]} mean {la['mean1']:.2f} max {la['max1']}"
    )
    rows = [
        ("request -> billing audible", "request_to_audible_ms"),
        ("tool call -> billing audible", "tool_call_to_audible_ms"),
        ("request -> billing speaking", "request_to_speaking_ms"),
        ("billing speaking -> audible", "speaking_to_audible_ms"),
        ("tool call -> request", "tool_call_to_request_ms"),
        ("longest silence heard", "silence_ms"),
    ]
    print_table(s, kinds, rows)
    for kind in kinds:
        k = s[kind]
        print(
            f"{kind}: ok {k['ok']}/{k['n']} (warm {k['warm']}), billing's first sentence with the facts "
            f"{k['facts_ok']}, failed: {k['failed']}"
        )
    for kind in kinds:
        if "phases_ms" not in s[kind]:
            continue
        print(
            f"\n{kind}: where the time goes, ms from the request (p50 / p95); billing CPU per call "
            f"{_q(s[kind]['billing_cpu_s'], 's')}, billing worker RSS {_q(s[kind]['billing_rss_mb'], 'MB')}, "
            f"billing in the room before the request {_q(s[kind]['billing_in_room_before_request_s'], 's')}"
        )
        for p, v in s[kind]["phases_ms"].items():
            print(f"  {p:<34} {v['p50']:8.0f} {v['p95']:8.0f}")
    for key, v in report["ratio_over_monolith"].items():
        print(f"ratio over monolith {key}: {v:.2f}")


def _q(d: dict[str, float] | None, unit: str) -> str:
    return f"{d['p50']:.2f} / {d['p95']:.2f} {unit}" if d else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="bench/handoff.py --agents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--handoffs", type=int, default=20, help="handoffs of each kind")
    ap.add_argument(
        "--kinds",
        type=lambda v: [k for k in v.split(",") if k],
        default=list(KINDS),
        help=f"comma-separated subset of {','.join(KINDS)} (default all)",
    )
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"write results here (default {RESULTS})")
    ap.add_argument(
        "--logs", type=Path, default=ROOT / "out" / "bench-handoff-agents", help="worker logs (default %(default)s)"
    )
    ap.add_argument("--worker", choices=("triage", "billing", "monolith"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "monolith":
        desk.run_worker(MONOLITH, monolith_entrypoint)
        return
    if args.worker:
        run_baton_agent(args.worker)
        return
    from run import Stopping, signals_raise

    try:
        with signals_raise():
            report = bench(args)
    except (KeyboardInterrupt, Stopping) as e:
        print(f"\ninterrupted ({type(e).__name__} {e}); every process stopped", file=sys.stderr)
        sys.exit(130)
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(dumps(report))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
