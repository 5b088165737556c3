"""`./scripts/bench failover`: baton itself killed mid-call (issue 14).

1. kill -> back: one local livekit-server, the support desk's triage worker, and `baton worker`
   (configs/baton.toml, an embedded room-state store in a temporary directory). Per kill, a fresh
   room: a caller joins (its token dispatches baton), triage greets it, then `baton worker` gets
   SIGKILL and is started again at once on the same store. Measured from the kill:
     - back in the room: the new baton's `joined: data channel open`;
     - coordinating: its `floor restored from the state store` (the floor went back to triage).
   Both include starting the process, registering, the worker's look at its store (1 s after it
   starts) and the dispatch it issues for the room.
2. checkpoint write latency: `examples/store_bench.rs`, a 20 kB checkpoint written through the
   store task until durable, to the embedded store and to a `redis-server` this script starts.

    .venv/bin/python bench/failover.py [--kills 10] [--writes 200] [--bytes 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from common import loadavg_summary, redis_server, summary  # noqa: E402
from crashes import demo  # noqa: E402
from harness import ROOT, Baton, LiveKitServer, baton_worker, dispatch_token, run  # noqa: E402

RESULTS = HERE / "results" / "failover.json"
CONFIG = ROOT / "configs" / "baton.toml"


def loadavg() -> tuple[float, float, float]:
    a, b, c = Path("/proc/loadavg").read_text().split()[:3]
    return float(a), float(b), float(c)


def one_kill(server: LiveKitServer, store: str, baton: Baton) -> tuple[Baton, dict[str, Any]]:
    """One call, one SIGKILL of `baton`; returns the restarted worker and the timings (ms)."""
    room = f"failover-{uuid.uuid4().hex[:6]}"
    env = {"BATON_STORE_PATH": store}
    result: dict[str, Any] = {"room": room}
    new: Baton | None = None

    async def call() -> None:
        nonlocal new
        caller = demo.Caller()
        await caller.room.connect(server.url, dispatch_token(demo.CALLER, room, ["baton"]))
        try:
            await caller.wait_line("triage", r"support desk", timeout=60)
            await asyncio.sleep(1.0)
            t_kill = time.monotonic()
            os.kill(baton.proc.pid, signal.SIGKILL)
            baton.proc.wait()
            new = baton_worker(server, "--config", str(CONFIG), env=env)
            at, _ = await asyncio.to_thread(new.wait_for, r"joined: data channel open", 60)
            result["back_ms"] = (at - t_kill) * 1000
            at, _ = await asyncio.to_thread(new.wait_for, r"floor restored from the state store", 30)
            result["coordinating_ms"] = (at - t_kill) * 1000
        finally:
            await caller.room.disconnect()

    try:
        run(call(), timeout=120)
    except Exception as e:
        result["error"] = repr(e)
    assert new is not None or "error" in result
    return (new or baton_worker(server, "--config", str(CONFIG), env=env)), result


def store_latency(writes: int, size: int) -> list[dict[str, Any]]:
    with redis_server() as url:
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
                url,
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
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--bytes", type=int, default=20000)
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args()
    loads = [loadavg()]
    latency = store_latency(args.writes, args.bytes)
    for row in latency:
        print(
            f"checkpoint write {row['store']:>8}: p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f} ms "
            f"({row['writes']} writes of {row['bytes']} B)"
        )
    server = LiveKitServer()
    server.start()
    store = tempfile.mkdtemp(prefix="baton-state-")
    triage = demo.agent_worker(server, "triage.py")
    baton = baton_worker(server, "--config", str(CONFIG), env={"BATON_STORE_PATH": store})
    kills: list[dict[str, Any]] = []
    try:
        triage.wait_for(r"^triage: registered", 60)
        baton.wait_for(r"worker registered", 30)
        for n in range(args.kills):
            baton, r = one_kill(server, store, baton)
            loads.append(loadavg())
            kills.append(r)
            print(f"kill {n + 1}: {r}", flush=True)
            baton.wait_for(r"worker registered", 30)
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        server.stop()
    ok = [k for k in kills if "error" not in k]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
