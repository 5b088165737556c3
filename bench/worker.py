"""`./scripts/bench worker`: `baton worker` dispatched into rooms, side by side with a livekit-agents
worker, and how many idle rooms one `baton worker` holds.

Measured in one run against one local livekit-server (configs/livekit.yaml, free ports):

1. Dispatch -> joined latency, N rooms per side, sequential and interleaved (baton, python,
   baton, ...), both workers registered the whole time. For each room a watcher participant (the
   Python SDK) joins first, then AgentDispatchService CreateDispatch names the agent; the clock
   starts just before that call. Marks, all seen by the watcher:
     baton:  visible (participant of kind AGENT in the room), usable (first `pong` on
             `baton.control`; pings are sent every 20 ms from the moment baton is visible);
     python: visible (kind AGENT), usable (its `lk.agent.state` attribute says `listening`: the
             AgentSession is started), first reply (a `lk.chat` text sent at `listening`
             answered by the first `lk.transcription` stream).
   The python side is the real triage worker (tests/e2e/agents/triage_worker.py, thread executor).
2. Concurrent idle rooms on one fresh `baton worker`: rooms are created in batches with
   RoomService CreateRoom(agents=[RoomAgentDispatch("baton")]) until --rooms; then baton's RSS
   (/proc, minus the RSS of the same worker before any room), its CPU (utime+stime) and the
   server's over --idle-seconds, ListParticipants for every room, and a ping to a sample of rooms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import rss_kib, summary  # puts tests/e2e on sys.path

# isort: split
import harness
from harness import API_KEY, API_SECRET, ROOT, Baton, LiveKitServer, Process, baton_worker, redis_server, token
from livekit import api, rtc
from peers import Peer

CLK_TCK = os.sysconf("SC_CLK_TCK")
AGENT_KIND = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

# baton with no [[agents]]: it never dispatches a starting agent, so the python worker only ever
# gets the rooms this benchmark dispatches to it (and 200 baton rooms do not pull in 200 triages).
BENCH_CONFIG = '[worker]\nagent_name = "baton"\n'


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ctx_switches(pid: int) -> int:
    """Context switches of all threads of a process: each is roughly one wake-up from sleep."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


# ---------------------------------------------------------------------------------------------
# 1. dispatch -> joined


@dataclass
class Watcher:
    """A Python SDK participant that timestamps what it sees of the dispatched agent."""

    room: rtc.Room
    agent_visible: asyncio.Event = field(default_factory=asyncio.Event)
    agent_listening: asyncio.Event = field(default_factory=asyncio.Event)
    reply: asyncio.Event = field(default_factory=asyncio.Event)
    pong: asyncio.Event = field(default_factory=asyncio.Event)
    marks: dict[str, float] = field(default_factory=dict)
    agent_identity: str = ""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def mark(self, name: str, ev: asyncio.Event) -> None:
        if name not in self.marks:
            self.marks[name] = time.monotonic()
        ev.set()

    def see(self, p: rtc.RemoteParticipant) -> None:
        if p.kind == AGENT_KIND:
            self.agent_identity = p.identity
            self.mark("visible", self.agent_visible)
            if p.attributes.get("lk.agent.state") == "listening":
                self.mark("listening", self.agent_listening)

    @classmethod
    async def join(cls, srv: LiveKitServer, room_name: str) -> Watcher:
        room = rtc.Room()
        w = cls(room)
        room.on("participant_connected", w.see)
        room.on("participant_attributes_changed", lambda _changed, p: w.see(p))

        def on_data(pkt: rtc.DataPacket) -> None:
            if pkt.topic == "baton.control" and json.loads(pkt.data).get("type") == "pong":
                w.mark("pong", w.pong)

        room.on("data_received", on_data)

        def on_stream(_reader: rtc.TextStreamReader, _who: str) -> None:
            w.mark("reply", w.reply)

        room.register_text_stream_handler("lk.transcription", on_stream)
        await room.connect(srv.url, token("watcher", room_name))
        return w


async def dispatch_once(srv: LiveKitServer, lk: api.LiveKitAPI, agent: str, timeout: float) -> dict[str, Any]:
    """One room: watcher in, CreateDispatch(agent), marks in ms since just before the call."""
    room_name = f"lat-{agent}-{uuid.uuid4().hex[:8]}"
    w = await Watcher.join(srv, room_name)
    try:
        t0 = time.monotonic()
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=agent, room=room_name))
        api_done = time.monotonic()
        try:
            await asyncio.wait_for(w.agent_visible.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{agent} not in {room_name} {timeout}s after CreateDispatch") from None
        if agent == "baton":

            async def pinger() -> None:
                while not w.pong.is_set():
                    body = json.dumps({"v": 1, "type": "ping", "id": uuid.uuid4().hex[:12]}).encode()
                    await w.room.local_participant.publish_data(
                        body, reliable=True, destination_identities=[w.agent_identity], topic="baton.control"
                    )
                    await asyncio.sleep(0.02)

            task = asyncio.ensure_future(pinger())
            try:
                await asyncio.wait_for(w.pong.wait(), timeout)
            finally:
                task.cancel()
            usable = w.marks["pong"]
        else:
            await asyncio.wait_for(w.agent_listening.wait(), timeout)
            usable = w.marks["listening"]
            await w.room.local_participant.send_text("hello", topic="lk.chat")
            await asyncio.wait_for(w.reply.wait(), timeout)
        out: dict[str, Any] = {
            "room": room_name,
            "api_ms": (api_done - t0) * 1000,
            "visible_ms": (w.marks["visible"] - t0) * 1000,
            "usable_ms": (usable - t0) * 1000,
            "t0": t0,
        }
        if "reply" in w.marks:
            out["reply_ms"] = (w.marks["reply"] - t0) * 1000
        return out
    finally:
        await w.room.disconnect()
        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))


def log_time(proc: Baton, pattern: str, start: int = 0) -> float | None:
    try:
        at, _ = proc.wait_for(pattern, timeout=2, start=start)
        return at
    except TimeoutError:
        return None


async def latency(srv: LiveKitServer, baton: Baton, triage: Process, n: int, warmup: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"baton": [], "python": []}
    async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
        for i in range(warmup + n):
            for agent in ("baton", "triage"):
                mark = len(baton.lines)
                r = await dispatch_once(srv, lk, agent, timeout=20)
                if agent == "baton":
                    # Where baton's share went: dispatch -> job assigned (server + worker protocol),
                    # assigned -> joined with data channel open (baton's own join).
                    assigned = log_time(baton, rf"job assigned.*room={r['room']}", mark)
                    joined = log_time(baton, rf"joined the room.*room={r['room']} ", mark)
                    if assigned and joined:
                        r["assigned_ms"] = (assigned - r["t0"]) * 1000
                        r["joined_log_ms"] = (joined - r["t0"]) * 1000
                else:
                    joined = log_time(triage, rf"triage: joined room={r['room']}")
                    if joined:
                        r["session_started_ms"] = (joined - r["t0"]) * 1000
                if i >= warmup:
                    rows["baton" if agent == "baton" else "python"].append(r)
            await asyncio.sleep(0.3)

    def col(side: str, key: str) -> dict[str, float] | None:
        vals = [r[key] for r in rows[side] if key in r]
        return summary(vals) if vals else None

    for r in rows["baton"]:
        if "assigned_ms" in r:
            r["own_join_ms"] = r["joined_log_ms"] - r["assigned_ms"]
    res: dict[str, Any] = {"n": n, "warmup_discarded": warmup, "rooms": rows}
    for side in ("baton", "python"):
        keys = ["api_ms", "visible_ms", "usable_ms"]
        keys += (
            ["assigned_ms", "joined_log_ms", "own_join_ms"] if side == "baton" else ["session_started_ms", "reply_ms"]
        )
        res[side] = {k: col(side, k) for k in keys}
    for k in ("visible_ms", "usable_ms"):
        res[f"ratio_{k}_p50"] = res["baton"][k]["p50"] / res["python"][k]["p50"]
    return res


# ---------------------------------------------------------------------------------------------
# 2. concurrent rooms


async def create_rooms(lk: api.LiveKitAPI, names: list[str]) -> None:
    await asyncio.gather(
        *(
            lk.room.create_room(
                api.CreateRoomRequest(
                    name=r,
                    # Only baton (an agent) will be in these rooms; keep them open for the run.
                    empty_timeout=1800,
                    departure_timeout=60,
                    agents=[api.RoomAgentDispatch(agent_name="baton")],
                )
            )
            for r in names
        )
    )


def count_joined(worker: Baton) -> int:
    with worker._cond:
        return sum(1 for _, line in worker.lines if "joined the room" in line)


async def wait_joined(worker: Baton, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (got := count_joined(worker)) < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return got


def sample_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU used by each pid over `seconds`, as % of one core; plus the whole machine (2 cores = 200%)."""
    before = {k: cpu_s(p) for k, p in pids.items()}
    switches = {k: ctx_switches(p) for k, p in pids.items()}
    mb0, mt0 = machine_busy_s()
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    out = {k: (cpu_s(p) - before[k]) / dt * 100 for k, p in pids.items()}
    out |= {f"{k}_wakeups_per_s": (ctx_switches(p) - switches[k]) / dt for k, p in pids.items()}
    mb1, mt1 = machine_busy_s()
    ncpu = os.cpu_count() or 1
    out["machine"] = (mb1 - mb0) / (mt1 - mt0) * 100 * ncpu
    return out


class Scraper:
    """Scrapes baton's `/metrics` once a second, as Prometheus would, for as long as it runs:
    the scrapes' cost is part of what the capacity run measures."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.ms: list[float] = []
        self.failed = 0
        self.last = ""
        self.task: asyncio.Task[None] | None = None

    def fetch(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as r:
            return r.read().decode()

    async def loop(self) -> None:
        while True:
            t = time.perf_counter()
            try:
                self.last = await asyncio.to_thread(self.fetch)
                self.ms.append((time.perf_counter() - t) * 1000)
            except OSError:
                self.failed += 1
            await asyncio.sleep(1.0)

    def gauge(self, name: str) -> float | None:
        for line in self.last.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


def redis_used_memory(url: str) -> int:
    port = str(urllib.parse.urlsplit(url).port)
    out = subprocess.run(["redis-cli", "-p", port, "info", "memory"], capture_output=True, text=True).stdout
    return next(int(x.split(":")[1]) for x in out.splitlines() if x.startswith("used_memory:"))


async def capacity(
    srv: LiveKitServer,
    config: Path,
    rooms: int,
    batch: int,
    idle_seconds: float,
    perf: Path | None,
    *,
    http: bool = False,
    store_url: str | None = None,
) -> dict[str, Any]:
    assert srv.proc is not None
    extra: list[str] = []
    scraper: Scraper | None = None
    if http:
        port = harness.free_port()
        extra += ["--http", f"127.0.0.1:{port}"]
        scraper = Scraper(port)
    if store_url:
        extra += ["--store-url", store_url]
    worker = baton_worker(
        srv, "--config", str(config), "--max-rooms", str(rooms + 20), *extra, env={"BATON_LOG": "info"}
    )
    res: dict[str, Any] = {"target_rooms": rooms, "batch": batch, "http": http, "store": store_url or "embedded"}
    names: list[str] = []
    if store_url:
        res["redis_used_memory_before"] = redis_used_memory(store_url)
    try:
        worker.wait_for(r"worker registered", 15)
        pid, spid = worker.proc.pid, srv.proc.pid
        await asyncio.sleep(3)
        idle_rss = rss_kib(pid)
        res["idle_rss_kib"] = idle_rss
        res["server_rss_kib_before"] = rss_kib(spid)
        res["cpu_empty_worker_pct"] = sample_cpu({"baton": pid, "server": spid}, 10)
        if scraper:
            scraper.task = asyncio.create_task(scraper.loop())
        steps: list[dict[str, float]] = []
        cpu0 = cpu_s(pid)
        t_ramp = time.monotonic()
        async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
            while len(names) < rooms:
                new = [
                    f"cap-{len(names) + i:04d}-{uuid.uuid4().hex[:6]}" for i in range(min(batch, rooms - len(names)))
                ]
                tb = time.monotonic()
                await create_rooms(lk, new)
                names += new
                got = await wait_joined(worker, len(names), timeout=60)
                if got < len(names):
                    res["ramp_stalled_at"] = got
                    res["ramp_stall_assigned"] = worker.text().count("job assigned")
                    print(f"  ramp stalled: {got}/{len(names)} rooms joined after 60 s", flush=True)
                    break
                steps.append(
                    {
                        "rooms": len(names),
                        "batch_s": time.monotonic() - tb,
                        "rss_kib": rss_kib(pid),
                        "server_rss_kib": rss_kib(spid),
                    }
                )
                if len(names) % 50 == 0 or len(names) == rooms:
                    s = steps[-1]
                    print(
                        f"  {len(names):4d} rooms: baton RSS {s['rss_kib'] / 1024:6.1f} MiB, "
                        f"server RSS {s['server_rss_kib'] / 1024:6.1f} MiB, last batch {s['batch_s']:.2f} s",
                        flush=True,
                    )
            held = count_joined(worker)
            res["ramp_s"] = time.monotonic() - t_ramp
            res["join_cpu_ms_per_room"] = (cpu_s(pid) - cpu0) * 1000 / max(held, 1)
            res["steps"] = steps
            res["rooms_joined"] = held
            await asyncio.sleep(5)  # settle: ICE, DTLS, the last status updates
            rss = rss_kib(pid)
            res["rss_kib"] = rss
            res["rss_per_room_kib"] = (rss - idle_rss) / max(held, 1)
            res["server_rss_kib"] = rss_kib(spid)
            res["server_rss_per_room_kib"] = (res["server_rss_kib"] - res["server_rss_kib_before"]) / max(held, 1)
            lines_before = len(worker.lines)
            # In a thread: the scraper keeps scraping on this loop meanwhile.
            res["cpu_idle_rooms_pct"] = await asyncio.to_thread(
                sample_cpu, {"baton": pid, "server": spid}, idle_seconds
            )
            res["idle_seconds"] = idle_seconds
            res["log_lines_while_idle"] = len(worker.lines) - lines_before
            if store_url:
                used = redis_used_memory(store_url)
                res["redis_used_memory"] = used
                res["redis_bytes_per_room"] = (used - res["redis_used_memory_before"]) / max(held, 1)
            if scraper:
                res["scrapes"] = summary(scraper.ms) if scraper.ms else None
                res["scrapes_failed"] = scraper.failed
                res["metrics_rooms"] = scraper.gauge("baton_rooms")
                res["metrics_store_degraded"] = scraper.gauge("baton_store_degraded")
                res["metrics_store_errors"] = scraper.gauge("baton_store_errors_total")
            if perf:
                top = subprocess.run(
                    [
                        "perf",
                        "record",
                        "-F",
                        "499",
                        "-g",
                        "-o",
                        str(perf) + ".data",
                        "-p",
                        str(pid),
                        "--",
                        "sleep",
                        "10",
                    ],
                    capture_output=True,
                    text=True,
                )
                if top.returncode == 0:
                    rep = subprocess.run(
                        [
                            "perf",
                            "report",
                            "--stdio",
                            "--no-children",
                            "-i",
                            str(perf) + ".data",
                            "--percent-limit",
                            "2",
                        ],
                        capture_output=True,
                        text=True,
                    )
                    perf.write_text(rep.stdout)
                    res["perf_report"] = str(perf)
                else:
                    res["perf_error"] = top.stderr.strip()[-300:]
            # Every room really has a baton: ListParticipants for each.
            with_baton: list[str] = []
            for chunk in range(0, len(names), 25):
                part = names[chunk : chunk + 25]
                lists = await asyncio.gather(
                    *(lk.room.list_participants(api.ListParticipantsRequest(room=r)) for r in part)
                )
                for r, lst in zip(part, lists, strict=True):
                    if any(
                        p.kind == api.ParticipantInfo.Kind.AGENT and p.attributes.get("baton.role") == "coordinator"
                        for p in lst.participants
                    ):
                        with_baton.append(r)
            res["rooms_listed_with_baton"] = len(with_baton)
            res["rooms_created"] = len(names)
            # And a sample answers a ping through the server.
            sample = random.Random(7).sample(with_baton, min(5, len(with_baton)))
            rtts = []
            for r in sample:
                peer = await Peer.join(srv, r, "prober")
                try:
                    await peer.wait_participant("baton", timeout=5)
                    for _ in range(20):
                        try:
                            _, rtt = await peer.ping("baton", timeout=0.5)
                            rtts.append(rtt * 1000)
                            break
                        except TimeoutError:
                            continue
                except TimeoutError:
                    pass
                finally:
                    await peer.close()
            res["sample_ping_ok"] = f"{len(rtts)}/{len(sample)}"
            res["sample_ping_ms"] = rtts
            for chunk in range(0, len(names), 25):
                await asyncio.gather(
                    *(lk.room.delete_room(api.DeleteRoomRequest(room=r)) for r in names[chunk : chunk + 25])
                )
        deadline = time.monotonic() + 60
        while worker.text().count("job ended") < res["rooms_joined"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        text = worker.text()
        res["job_failed_lines"] = text.count("job failed")
        res["rss_after_rooms_freed_kib"] = rss_kib(pid)
    finally:
        if scraper and scraper.task:
            scraper.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper.task
        res["worker_exit"] = worker.stop(timeout=20)
        log = Path(tempfile.mkstemp(prefix="bench-worker-baton-", suffix=".log")[1])
        log.write_text(worker.text())
        res["worker_log"] = str(log)
        res["server_log"] = str(srv.log_path)
    return res


# ---------------------------------------------------------------------------------------------


def fmt(s: dict[str, float] | None) -> str:
    return "—" if s is None else f"p50 {s['p50']:7.1f}  p95 {s['p95']:7.1f}  max {s['max']:7.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dispatches", type=int, default=20, help="rooms dispatched per side (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="rooms per side dispatched first and not counted")
    ap.add_argument("--rooms", type=int, default=200, help="concurrent rooms for one baton worker")
    ap.add_argument("--batch", type=int, default=10, help="rooms created at once while ramping")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="CPU sampling window with all rooms idle")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--perf", type=Path, help="also `perf record` the loaded worker 10 s; report written here")
    ap.add_argument("--http", action="store_true", help="capacity: baton worker --http, /metrics scraped every second")
    ap.add_argument(
        "--store",
        choices=["embedded", "redis", "memory"],
        default="embedded",
        help="capacity: the room-state store (redis: a redis-server this script starts)",
    )
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()

    cfg_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    # The release target is shared: snapshot the binary so a rebuild mid-run cannot swap it.
    snapshot = cfg_dir / "baton"
    shutil.copy2(harness.BATON_BIN, snapshot)
    harness.BATON_BIN = snapshot
    config = cfg_dir / "baton.toml"
    config.write_text(BENCH_CONFIG)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "baton_binary_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(harness.BATON_BIN.stat().st_mtime)),
    }
    srv = LiveKitServer()
    srv.start()
    triage: Process | None = None
    try:
        if not args.skip_latency:
            baton = baton_worker(srv, "--config", str(config))
            # Its load is jobs held / DESK_MAX_JOBS (the desk's run_worker), as baton's is rooms held
            # / --max-rooms: about 0 for both here, where each holds one room at a time.
            triage = Process(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "e2e" / "agents" / "triage_worker.py")],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env={
                        **os.environ,
                        "LIVEKIT_URL": srv.url,
                        "LIVEKIT_API_KEY": API_KEY,
                        "LIVEKIT_API_SECRET": API_SECRET,
                    },
                    start_new_session=True,
                )
            )
            try:
                baton.wait_for(r"worker registered", 15)
                triage.wait_for(r"triage: registered", 60)
                time.sleep(1)
                results["worker_idle_rss_mib"] = {
                    "baton": rss_kib(baton.proc.pid) / 1024,
                    "python": rss_kib(triage.proc.pid) / 1024,
                }
                print(
                    f"dispatch -> joined, {args.dispatches} rooms per side (+{args.warmup} warm-up), sequential",
                    flush=True,
                )
                try:
                    results["latency"] = asyncio.run(latency(srv, baton, triage, args.dispatches, args.warmup))
                except TimeoutError:
                    print("baton worker log (tail):\n" + "\n".join(baton.text().splitlines()[-15:]), file=sys.stderr)
                    print("triage worker log (tail):\n" + "\n".join(triage.text().splitlines()[-30:]), file=sys.stderr)
                    print("server log (tail):\n" + srv.log_tail(15), file=sys.stderr)
                    raise
            finally:
                baton.stop()
        if not args.skip_capacity:
            print(f"concurrent rooms on one baton worker, up to {args.rooms}", flush=True)
            if args.store == "memory":
                config.write_text(BENCH_CONFIG + '[store]\nkind = "memory"\n')
            with redis_server() if args.store == "redis" else contextlib.nullcontext() as redis:
                results["capacity"] = asyncio.run(
                    capacity(
                        srv,
                        config,
                        args.rooms,
                        args.batch,
                        args.idle_seconds,
                        args.perf,
                        http=args.http,
                        store_url=redis.url if redis else None,
                    )
                )
    finally:
        if triage is not None:
            triage.stop()
        srv.stop()

    print()
    if "latency" in results:
        lat = results["latency"]
        print(f"dispatch -> joined (ms since CreateDispatch), n={lat['n']} rooms per side")
        rows = [
            ("baton", "visible (kind AGENT)", "visible_ms"),
            ("baton", "usable (first pong)", "usable_ms"),
            ("baton", "  job assigned (log)", "assigned_ms"),
            ("baton", "  joined, DC open (log)", "joined_log_ms"),
            ("baton", "  assigned -> joined", "own_join_ms"),
            ("python", "visible (kind AGENT)", "visible_ms"),
            ("python", "usable (state listening)", "usable_ms"),
            ("python", "  session started (log)", "session_started_ms"),
            ("python", "  first reply to lk.chat", "reply_ms"),
        ]
        for side, label, key in rows:
            print(f"  {side:<7}{label:<26}{fmt(lat[side][key])}")
        print(
            f"  ratio baton/python p50: visible {lat['ratio_visible_ms_p50']:.2f}, "
            f"usable {lat['ratio_usable_ms_p50']:.2f}"
        )
        m = results["worker_idle_rss_mib"]
        print(f"  idle worker RSS: baton {m['baton']:.1f} MiB, python {m['python']:.1f} MiB")
    if "capacity" in results:
        c = results["capacity"]
        cpu = c["cpu_idle_rooms_pct"]
        print(
            f"concurrent rooms: {c['rooms_joined']} joined (target {c['target_rooms']}), "
            f"{c['rooms_listed_with_baton']}/{c['rooms_created']} listed with a baton, "
            f"ping sample {c['sample_ping_ok']}, ramp {c['ramp_s']:.1f} s"
        )
        print(
            f"  baton RSS: idle {c['idle_rss_kib'] / 1024:.1f} MiB, with rooms {c['rss_kib'] / 1024:.1f} MiB, "
            f"per room {c['rss_per_room_kib'] / 1024:.2f} MiB"
        )
        print(
            f"  server RSS: before {c['server_rss_kib_before'] / 1024:.1f} MiB, with rooms "
            f"{c['server_rss_kib'] / 1024:.1f} MiB, per room {c['server_rss_per_room_kib'] / 1024:.2f} MiB"
        )
        print(
            f"  CPU over {c['idle_seconds']:.0f} s, rooms idle (% of one core): baton {cpu['baton']:.1f}%, "
            f"server {cpu['server']:.1f}%, whole machine {cpu['machine']:.0f}% of {100 * (os.cpu_count() or 1)}%"
        )
        print(
            f"  wake-ups/s (context switches, all threads): baton {cpu['baton_wakeups_per_s']:.0f}, "
            f"server {cpu['server_wakeups_per_s']:.0f}"
        )
        e = c["cpu_empty_worker_pct"]
        print(f"  CPU with no room: baton {e['baton']:.2f}%, server {e['server']:.1f}%")
        print(f"  join CPU per room (baton): {c['join_cpu_ms_per_room']:.1f} ms; job failures: {c['job_failed_lines']}")
        print(f"  store: {c['store']}", end="")
        if "redis_bytes_per_room" in c:
            print(f", Redis used_memory per room {c['redis_bytes_per_room'] / 1024:.1f} KiB", end="")
        print()
        if c.get("http"):
            sc = c.get("scrapes") or {}
            print(
                f"  /metrics scraped every 1 s: {sc.get('n', 0)} scrapes, p50 {sc.get('p50', float('nan')):.1f} ms, "
                f"p95 {sc.get('p95', float('nan')):.1f} ms, {c['scrapes_failed']} failed; baton_rooms "
                f"{c['metrics_rooms']}, store degraded {c['metrics_store_degraded']}, "
                f"store errors {c['metrics_store_errors']}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
