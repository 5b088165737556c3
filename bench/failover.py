"""`./scripts/bench failover`: baton itself killed mid-call (issue 14).

1. kill -> back: one local livekit-server, the support desk's triage worker, and `baton worker`
   (configs/baton.toml). Per kill, a fresh room: a caller joins (its token dispatches baton),
   triage greets it, then the worker whose baton holds the room gets SIGKILL. Measured from the
   kill:
     - back in the room: the new baton's `joined: data channel open`;
     - coordinating: its `floor restored from the state store` (the floor went back to triage).
   `--store embedded` (default): one worker, an embedded store in a temporary directory; the
   killed worker is started again at once on the same store (process start, registration, its
   first look at the store 1 s after it starts, and the dispatch it issues are included).
   `--store redis --workers 2`: the workers share a `redis-server` this script starts; the
   survivor takes the room over once the killed baton's lease lapses (lease TTL 3 s, the
   survivor looks at the store every lease TTL). A replacement worker is started after each
   kill.
2. rooms recovered per second (`--rooms N`, only this): N rooms, each with a caller and no
   agents, coordinated by one worker on an embedded store; the worker gets SIGKILL and is started
   again at once; timed from the kill until its baton is back in every room.
3. checkpoint write latency: `examples/store_bench.rs`, a 20 kB checkpoint written through the
   store task until durable, to the embedded store and to a `redis-server` this script starts.

    .venv/bin/python bench/failover.py [--kills 10] [--store embedded|redis] [--workers N]
                                       [--writes 200] [--bytes 20000] [--json PATH]
    .venv/bin/python bench/failover.py --rooms 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import loadavg_summary, summary  # noqa: E402
from crashes import demo  # noqa: E402
from harness import ROOT, Baton, LiveKitServer, baton_worker, dispatch_token, holder_of, redis_server, run  # noqa: E402

RESULTS = HERE / "results" / "failover.json"
CONFIG = ROOT / "configs" / "baton.toml"


def loadavg() -> tuple[float, float, float]:
    a, b, c = Path("/proc/loadavg").read_text().split()[:3]
    return float(a), float(b), float(c)


def one_kill(
    server: LiveKitServer, workers: list[Baton], env: dict[str, str], shared: bool, n_workers: int
) -> dict[str, Any]:
    """One call, one SIGKILL of the worker whose baton holds the room. Embedded store (`shared`
    false): that worker is started again at once on the same store and the new one is watched.
    Redis (`shared`): the other workers are watched, and a replacement is started once the room
    is coordinated again, so every kill finds as many workers. `workers` is updated in place;
    returns the timings (ms from the kill)."""
    room = f"failover-{uuid.uuid4().hex[:6]}"
    result: dict[str, Any] = {"room": room}

    async def first(watch: list[Baton], pattern: str, starts: dict[int, int], timeout: float) -> float:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in watch:
                for at, line in w.lines[starts.get(id(w), 0) :]:
                    if rx.search(line) and room in line:
                        return at
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {pattern!r} for {room}")

    async def call() -> None:
        caller = demo.Caller()
        await caller.room.connect(server.url, dispatch_token(demo.CALLER, room, ["baton"]))
        try:
            await caller.wait_line("triage", r"support desk", timeout=60)
            holder = await holder_of(room, workers, 10)
            await asyncio.sleep(1.0)
            others = [w for w in workers if w is not holder]
            starts = {id(w): len(w.lines) for w in others}
            t_kill = time.monotonic()
            os.kill(holder.proc.pid, signal.SIGKILL)
            holder.proc.wait()
            workers.remove(holder)
            if not shared:
                workers.append(baton_worker(server, "--config", str(CONFIG), env=env))
            watch = workers if not shared else others
            result["back_ms"] = (await first(watch, r"joined: data channel open", starts, 60) - t_kill) * 1000
            at = await first(watch, r"floor restored from the state store", starts, 30)
            result["coordinating_ms"] = (at - t_kill) * 1000
        finally:
            await caller.room.disconnect()

    try:
        run(call(), timeout=120)
    except Exception as e:
        result["error"] = repr(e)
    while len(workers) < n_workers:
        workers.append(baton_worker(server, "--config", str(CONFIG), env=env))
    return result


def rooms_recovery(n: int) -> dict[str, Any]:
    """Rooms recovered by one restarted worker: `n` rooms, each with a caller (a LiveKit SDK
    participant whose token dispatches baton; no agents), coordinated by one `baton worker` on an
    embedded store; it gets SIGKILL once baton is in every room and is started again at once on
    the same store. Times (s from the kill) at which the new worker's baton is back in each room
    (`joined: data channel open`)."""
    server = LiveKitServer()
    server.start()
    env = {"BATON_STORE_PATH": tempfile.mkdtemp(prefix="baton-state-")}
    first = baton_worker(server, "--config", str(CONFIG), env=env)
    second: Baton | None = None
    rooms = [f"many-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
    result: dict[str, Any] = {"rooms": n}

    def joined(worker: Baton, start: int = 0) -> dict[str, float]:
        at: dict[str, float] = {}
        for t, line in worker.lines[start:]:
            if "joined: data channel open" in line and (m := re.search(r"room=(\S+)", line)):
                at.setdefault(m.group(1), t)
        return at

    async def scenario() -> None:
        nonlocal second
        from livekit import rtc

        callers = [rtc.Room() for _ in rooms]
        try:
            for room, caller in zip(rooms, callers, strict=True):
                await caller.connect(server.url, dispatch_token("caller", room, ["baton"]))
            deadline = time.monotonic() + 120
            while len(set(rooms) & set(joined(first))) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"baton joined {len(set(rooms) & set(joined(first)))} of {n} rooms")
                await asyncio.sleep(0.2)
            await asyncio.sleep(3.0)  # every room's state written, leases renewed
            t_kill = time.monotonic()
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait()
            second = baton_worker(server, "--config", str(CONFIG), env=env)
            deadline = time.monotonic() + 180
            while len(back := {r: t for r, t in joined(second).items() if r in rooms}) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"baton back in {len(back)} of {n} rooms")
                await asyncio.sleep(0.1)
            times = sorted(t - t_kill for t in back.values())
            looked = second.wait_for(r"dispatching baton into it", 1)[0] - t_kill
            result.update(
                kill_to_first_s=times[0],
                kill_to_all_s=times[-1],
                first_look_s=looked,
                rooms_per_s=n / (times[-1] - looked) if times[-1] > looked else None,
                back_s=summary(times),
            )
        finally:
            for caller in callers:
                await caller.disconnect()

    try:
        run(scenario(), timeout=400)
    except Exception as e:
        result["error"] = repr(e)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        server.stop()
    return result


def store_latency(writes: int, size: int) -> list[dict[str, Any]]:
    with redis_server() as redis:
        out = subprocess.run(
            [
                "cargo",
                "run",
                "-q",
                "--release",
                "--example",
                "store_bench",
                "--",
                "--writes",
                str(writes),
                "--bytes",
                str(size),
                "--redis-url",
                redis.url,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--store", choices=("embedded", "redis"), default="embedded")
    p.add_argument("--workers", type=int, default=None, help="baton workers (default 1 embedded, 2 redis)")
    p.add_argument("--writes", type=int, default=200, help="checkpoint writes timed per store (0: skip)")
    p.add_argument("--bytes", type=int, default=20000)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rooms", type=int, default=0, help="only measure rooms recovered per second, with N rooms")
    args = p.parse_args()
    if args.rooms > 0:
        loads = [loadavg()]
        r = rooms_recovery(args.rooms)
        loads.append(loadavg())
        r = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **r, "load": loadavg_summary(loads)}
        print(json.dumps(r, indent=2))
        out = args.json or RESULTS.with_name(f"failover-rooms-{args.rooms}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2))
        return
    shared = args.store == "redis"
    n_workers = args.workers or (2 if shared else 1)
    if shared and n_workers < 2:
        p.error("--store redis needs --workers 2 or more (a survivor takes the room over)")
    if not shared and n_workers != 1:
        p.error("the embedded store has one worker per directory: --workers 1")
    out = args.json or (RESULTS.with_name("failover-redis.json") if shared else RESULTS)
    loads = [loadavg()]
    latency = store_latency(args.writes, args.bytes) if args.writes > 0 else []
    for row in latency:
        print(
            f"checkpoint write {row['store']:>8}: p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f} ms "
            f"({row['writes']} writes of {row['bytes']} B)"
        )
    server = LiveKitServer()
    server.start()
    stack = contextlib.ExitStack()
    if shared:
        env = {"BATON_STORE_URL": stack.enter_context(redis_server()).url}
    else:
        env = {"BATON_STORE_PATH": tempfile.mkdtemp(prefix="baton-state-")}
    triage = demo.agent_worker(server, "triage.py")
    workers = [baton_worker(server, "--config", str(CONFIG), env=env) for _ in range(n_workers)]
    kills: list[dict[str, Any]] = []
    try:
        triage.wait_for(r"^triage: registered", 60)
        for n in range(args.kills):
            for w in workers:
                w.wait_for(r"worker registered", 30)
            r = one_kill(server, workers, env, shared, n_workers)
            loads.append(loadavg())
            kills.append(r)
            print(f"kill {n + 1}: {r}", flush=True)
    finally:
        demo._stop_group("triage", triage.proc)
        for w in workers:
            w.stop()
        server.stop()
        stack.close()
    ok = [k for k in kills if "error" not in k]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "store": args.store,
        "workers": n_workers,
        "kills": len(kills),
        "failed": len(kills) - len(ok),
        "back_ms": summary([k["back_ms"] for k in ok]) if ok else None,
        "coordinating_ms": summary([k["coordinating_ms"] for k in ok]) if ok else None,
        "checkpoint_write": latency,
        "load": loadavg_summary(loads),
        "runs": kills,
    }
    for key in ("back_ms", "coordinating_ms"):
        s = report[key]
        if s:
            stats = f"p50 {s['p50']:.0f} ms, p95 {s['p95']:.0f} ms, max {s['max']:.0f} ms (n={s['n']})"
            print(f"kill -> {key[:-3]:>12}: {stats}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
