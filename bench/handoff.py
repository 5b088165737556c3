"""`./scripts/bench handoff`: what the caller hears during a handoff, with baton and without.

One local livekit-server, a fresh room per handoff (so one bad handoff cannot poison the next),
and the protocol-speaking tone agents of tests/e2e (triage 440 Hz, billing 880 Hz). The caller is
a real SDK participant in its own process (`Recorder`: every subscribed track separately, levels
per 10 ms frame, stamped with CLOCK_MONOTONIC, the same clock as this process's event loop).

Three kinds of handoff, interleaved so drift in the machine's load hits all of them alike:

  - warm:  `baton join --config` per room; billing is already in the room on standby.
  - cold:  same, but billing is dispatched by baton to a tone worker (livekit-agents, as
           tests/e2e/agents/tone_worker.py) registered once for the whole run.
  - naive: the reference, no baton. The same triage agent simply stops its tone at the request,
           and this script dispatches the target at the same moment (AgentDispatchService
           CreateDispatch) to a second worker with the same tone agent, which starts its tone as
           soon as it has joined and published. No filler, no floor control.

Per handoff:
  - request -> target audible: from just before triage sends `handoff` (or, naive, stops its
    tone) to the first 10 ms frame of the target's track above -55 dBFS at the caller;
  - switch: baton's timeline `target_ready` (ms since baton got the request) -> caller-audible;
    also `target_activated` -> audible, and max(ready, source_quiet) -> audible;
  - longest silence heard by the caller from the source's last frame before the filler on
    (`handover_start`, as the tests judge it) to the end of the recording, and the longest
    silence inside the switch only (up to the target's first audible frame);
  - overlap of source and target.

`--observe` measures what observability costs instead: warm handoffs only, alternating between
plain baton (events on stdout, as always) and `observed` baton, which also serves `--http`
(scraped every 250 ms during the handoff: /metrics and the page's /api/calls), POSTs every event
to a webhook and exports traces over OTLP (both to a local sink that answers 200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import loadavg_summary, print_table, summary
from harness import API_KEY, API_SECRET, ROOT, Baton, LiveKitServer, Process, baton_join, free_port, token, wait_until
from livekit import api
from peers import audible_grid, longest_run
from test_handoff import CONFIG, agent, handover_start

E2E = ROOT / "tests" / "e2e"
SOURCE, WARM_TARGET, BATON = "agent-triage", "agent-billing", "baton"
THRESHOLD = -55.0

# The caller, in its own process so that its decoding is not starved by the agents' encoders.
# Commands on stdin: `join <url> <token>`, `stop`; one JSON answer line each on stdout.
CALLER = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, sys.argv[1])
    from livekit import rtc
    from peers import Recorder

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        room, rec = None, None
        while line := await reader.readline():
            cmd = line.decode().split()
            if cmd[0] == "join":
                room = rtc.Room()
                rec = Recorder(room)
                await room.connect(cmd[1], cmd[2])
                print(json.dumps({"joined": True}), flush=True)
            elif cmd[0] == "stop" and room is not None and rec is not None:
                await rec.stop()
                await room.disconnect()
                print(json.dumps({"levels": rec.played()}), flush=True)
                room, rec = None, None
            elif cmd[0] == "stop":
                print(json.dumps({"levels": {}}), flush=True)

    asyncio.run(main())
    """
)


class Caller:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CALLER, str(E2E)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _cmd(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError("caller process died")
        return json.loads(out)  # type: ignore[no-any-return]

    async def join(self, srv: LiveKitServer, room: str) -> None:
        await asyncio.wait_for(asyncio.to_thread(self._cmd, f"join {srv.url} {token('caller', room)}", 15), 20)

    async def stop(self) -> dict[str, list[tuple[float, float]]]:
        out = await asyncio.wait_for(asyncio.to_thread(self._cmd, "stop", 15), 20)
        return {k: [(t, lv) for t, lv in v] for k, v in out["levels"].items()}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def analyse(levels: dict[str, list[tuple[float, float]]], t_req: float, t_end: float) -> dict[str, Any]:
    targets = [k for k in levels if k not in (SOURCE, BATON)]
    target = targets[0] if targets else None
    start = t_req - 0.5
    grid = audible_grid(levels, start, t_end - 0.1, threshold=THRESHOLD)
    out: dict[str, Any] = {"target_identity": target, "tracks": sorted(levels)}
    audible_at = None
    if target is not None:
        audible_at = next((t for t, lv in levels[target] if t >= t_req and lv > THRESHOLD), None)
    out["audible_ms"] = None if audible_at is None else (audible_at - t_req) * 1000
    h = handover_start(grid, SOURCE)
    out["silence_ms"] = longest_run(grid[h:], lambda c: not c) * 1000
    first_target = next((i for i, c in enumerate(grid) if target in c), None) if target else None
    out["switch_silence_ms"] = (
        longest_run(grid[h : first_target + 1], lambda c: not c) * 1000 if first_target is not None else None
    )
    out["overlap_ms"] = longest_run(grid, lambda c: SOURCE in c and target in c) * 1000 if target else 0.0
    out["filler_heard"] = any(BATON in c for c in grid)
    last_source = max((i for i, c in enumerate(grid) if SOURCE in c), default=None)
    out["source_last_ms"] = None if last_source is None else (start + (last_source + 1) * 0.01 - t_req) * 1000
    return out


def timeline_of(baton: Baton, start: int) -> dict[str, Any]:
    line = baton.wait_for(r'"outcome":', timeout=20, start=start)[1]
    return json.loads(line[line.index("{") :])  # type: ignore[no-any-return]


class Sink:
    """Answers 200 to everything: the webhook receiver and OTLP endpoint of `observed` baton."""

    def __init__(self) -> None:
        self.requests = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.requests += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def observed_baton(srv: LiveKitServer, room: str, cfg: str, sink: Sink) -> tuple[Baton, int]:
    port = free_port()
    env = {
        "LIVEKIT_URL": srv.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
    }
    args = ["join", "--room", room, "--config", cfg, "--http", f"127.0.0.1:{port}", "--webhook-url", f"{sink.url}/hook"]
    return Baton(args, env=env), port


async def scrape_until(port: int, stop: asyncio.Event) -> int:
    """GETs /metrics and /api/calls every 250 ms until `stop`; returns how many answered."""

    def get(path: str) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            r.read()

    n = 0
    while not stop.is_set():
        for path in ("/metrics", "/api/calls"):
            await asyncio.to_thread(get, path)
            n += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass
    return n


async def baton_handoff(
    srv: LiveKitServer, caller: Caller, cfg: str, warm: bool, tail: float, bundle: bytes, sink: Sink | None = None
) -> dict[str, Any]:
    room = f"bh-{'w' if warm else 'c'}-{uuid.uuid4().hex[:8]}"
    if sink is None:
        baton, port = baton_join(srv, room, "--config", cfg), None
    else:
        baton, port = observed_baton(srv, room, cfg, sink)
    agents = []
    stop_scraping = asyncio.Event()
    scraper = None
    try:
        await asyncio.to_thread(baton.wait_for, "joined: data channel open", 15)
        await caller.join(srv, room)
        a = await agent(srv, room, "triage", 440, sentence_tail=tail)
        agents.append(a)
        if warm:
            b = await agent(srv, room, "billing", 880, sentence_tail=tail)
            agents.append(b)
        await wait_until(lambda: a.speaking, 5, "triage never got the floor")
        if warm:
            await wait_until(lambda: b.got("deactivate"), 5, "billing not on standby")
        await asyncio.sleep(1.0)
        if port is not None:
            scraper = asyncio.ensure_future(scrape_until(port, stop_scraping))
        loop = asyncio.get_running_loop()
        n0 = len(baton.lines)
        t_req = loop.time()
        await a.handoff("billing", reason="bench", bundle=bundle)
        tl = await asyncio.to_thread(timeline_of, baton, n0)
        await asyncio.sleep(0.6)
        t_end = loop.time()
        levels = await caller.stop()
        r = analyse(levels, t_req, t_end)
        if scraper is not None:
            stop_scraping.set()
            r["scrapes"] = await scraper
        r["timeline"] = tl
        r["outcome"] = tl.get("outcome")
        ph = {m["phase"]: m["ms"] for m in reversed(tl["phases"])}  # first occurrence wins
        r["phases_ms"] = ph
        if r["audible_ms"] is not None:
            if "target_ready" in ph:
                r["ready_to_audible_ms"] = r["audible_ms"] - ph["target_ready"]
                can_switch = max(ph["target_ready"], ph.get("source_quiet", 0))
                r["switchable_to_audible_ms"] = r["audible_ms"] - can_switch
            if "target_activated" in ph:
                r["activated_to_audible_ms"] = r["audible_ms"] - ph["target_activated"]
        if warm and tl.get("warm") is not True:
            r["error"] = "timeline says not warm"
        return r
    finally:
        stop_scraping.set()
        for x in agents:
            await x.close()
        rc = baton.stop()
        if rc != 0:
            print(f"baton exited {rc} in {room}", file=sys.stderr)


async def naive_handoff(srv: LiveKitServer, caller: Caller, lk: api.LiveKitAPI) -> dict[str, Any]:
    room = f"bn-{uuid.uuid4().hex[:8]}"
    agents = []
    try:
        await caller.join(srv, room)
        a = await agent(srv, room, "triage", 440)
        agents.append(a)
        a.speaking = True
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        t_req = loop.time()
        a.speaking = False
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="naive-billing", room=room))

        def joined() -> bool:
            ps = a.room.remote_participants.values()
            return any(p.attributes.get("lk.agent_name") == "naive-billing" for p in ps)

        await wait_until(joined, 10, "naive target never joined")
        await asyncio.sleep(1.2)
        t_end = loop.time()
        levels = await caller.stop()
        r = analyse(levels, t_req, t_end)
        r["outcome"] = "completed" if r["audible_ms"] is not None else "target_not_heard"
        return r
    finally:
        for x in agents:
            await x.close()


def start_worker(srv: LiveKitServer, name: str, mode: str) -> Process:
    """tests/e2e/agents/tone_worker.py (its load is its job count, so this busy machine still gets
    dispatches), and for `naive` playing its tone as soon as it has published."""
    env = {
        **os.environ,
        "LIVEKIT_URL": srv.url,
        "LIVEKIT_API_KEY": API_KEY,
        "LIVEKIT_API_SECRET": API_SECRET,
        "TONE_AGENT_NAME": name,
        "TONE_FREQ": "880",
        "TONE_SPEAK_AT_JOIN": "1" if mode == "naive" else "0",
    }
    proc = subprocess.Popen(
        [sys.executable, str(E2E / "agents" / "tone_worker.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    p = Process(proc)
    p.wait_for("tone: registered", timeout=30)
    return p


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def schedule(warm: int, cold: int, naive: int, observed: int = 0) -> list[str]:
    left = {"warm": warm, "observed": observed, "cold": cold, "naive": naive}
    order: list[str] = []
    while any(left.values()):
        for k in ("warm", "observed", "cold", "naive"):
            if left[k]:
                order.append(k)
                left[k] -= 1
    return order


def stats(rs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    vals = [float(r[key]) for r in rs if r.get(key) is not None]
    return summary(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handoffs", type=int, default=50, help="baton handoffs in all, half warm, half cold")
    ap.add_argument("--naive", type=int, help="naive reference handoffs (default: handoffs / 2)")
    ap.add_argument("--sentence-tail", type=float, default=0.0, help="s the source keeps talking after deactivate")
    ap.add_argument("--bundle-kib", type=int, default=4, help="bundle the source hands over (0: none)")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--observe", action="store_true", help="warm handoffs with and without --http, webhook, OTLP")
    args = ap.parse_args()
    n_warm = args.handoffs // 2
    n_cold = args.handoffs - n_warm
    n_naive = args.handoffs // 2 if args.naive is None else args.naive
    n_observed = 0
    kinds = ["warm", "cold", "naive"]
    if args.observe:
        n_observed, n_cold, n_naive = args.handoffs - n_warm, 0, 0
        kinds = ["warm", "observed"]
    bundle = bytes(range(256)) * (args.bundle_kib * 4)

    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(CONFIG)
    cfg.close()
    srv = LiveKitServer()
    srv.start()
    caller = Caller()
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    loads: list[list[float]] = [loadavg()]
    t_run = time.monotonic()
    cold_worker = naive_worker = None
    sink = Sink() if args.observe else None
    try:
        if n_cold:
            cold_worker = start_worker(srv, "billing", "protocol")
        if n_naive:
            naive_worker = start_worker(srv, "naive-billing", "naive")

        async def all_handoffs() -> None:
            async with api.LiveKitAPI(srv.http_url, API_KEY, API_SECRET) as lk:
                for i, kind in enumerate(schedule(n_warm, n_cold, n_naive, n_observed)):
                    t0 = time.monotonic()
                    try:
                        if kind == "naive":
                            coro = naive_handoff(srv, caller, lk)
                        else:
                            warm = kind in ("warm", "observed")
                            observer = sink if kind == "observed" else None
                            coro = baton_handoff(srv, caller, cfg.name, warm, args.sentence_tail, bundle, observer)
                        r = await asyncio.wait_for(coro, 60)
                    except Exception as e:  # one failed handoff is a result, not the end
                        r = {"error": f"{type(e).__name__}: {e}"}
                        traceback.print_exc(limit=2)
                        try:
                            await caller.stop()
                        except Exception:
                            pass
                    r["kind"], r["load1"] = kind, loadavg()[0]
                    results[kind].append(r)
                    loads.append(loadavg())
                    sil = r.get("silence_ms")
                    print(
                        f"{i + 1:3d} {kind:<5} audible {r.get('audible_ms') or float('nan'):7.1f} ms"
                        f"  ready->audible {r.get('ready_to_audible_ms') or float('nan'):7.1f} ms"
                        f"  silence {sil if sil is not None else float('nan'):5.0f} ms"
                        f"  {r.get('outcome') or r.get('error')}  ({time.monotonic() - t0:.1f} s, load {r['load1']})",
                        flush=True,
                    )

        asyncio.run(all_handoffs())
    finally:
        caller.close()
        if sink is not None:
            sink.close()
        for w in (cold_worker, naive_worker):
            if w is not None:
                w.stop()
        srv.stop()
        os.unlink(cfg.name)

    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "run_seconds": time.monotonic() - t_run,
        "loadavg": loadavg_summary(loads),
        "summary": {},
        "runs": results,
    }
    for kind, rs in results.items():
        ok = [r for r in rs if r.get("outcome") == "completed" and r.get("audible_ms") is not None and "error" not in r]
        sil = [float(r["silence_ms"]) for r in ok]
        for r in ok:
            r["baton_completed_ms"] = r.get("phases_ms", {}).get("completed")
        report["summary"][kind] = {
            "baton_completed_ms": stats(ok, "baton_completed_ms"),
            "n": len(rs),
            "ok": len(ok),
            "failed": [r.get("error") or r.get("outcome") for r in rs if r not in ok],
            "request_to_audible_ms": stats(ok, "audible_ms"),
            "ready_to_audible_ms": stats(ok, "ready_to_audible_ms"),
            "switchable_to_audible_ms": stats(ok, "switchable_to_audible_ms"),
            "activated_to_audible_ms": stats(ok, "activated_to_audible_ms"),
            "silence_ms": stats(ok, "silence_ms"),
            "switch_silence_ms": stats(ok, "switch_silence_ms"),
            "silence_over_60ms": sum(1 for s in sil if s > 60),
            "overlap_max_ms": max((float(r["overlap_ms"]) for r in ok), default=None),
            "filler_heard": sum(1 for r in ok if r.get("filler_heard")),
        }

    s = report["summary"]

    la = report["loadavg"]
    if args.observe:
        report["sink_requests"] = sink.requests if sink else 0
        print_observe_report(report, n_warm, n_observed)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))
        return
    print(
        f"\nhandoffs: {args.handoffs} baton ({n_warm} warm, {n_cold} cold) + {n_naive} naive; "
        f"{report['run_seconds'] / 60:.1f} min; load avg start {la['start'][0]} mean {la['mean1']:.2f} "
        f"max {la['max1']}"
    )
    rows = [
        ("request -> target audible (ms)", "request_to_audible_ms"),
        ("target ready -> audible (ms)", "ready_to_audible_ms"),
        ("max(ready, quiet) -> audible (ms)", "switchable_to_audible_ms"),
        ("target activated -> audible (ms)", "activated_to_audible_ms"),
        ("longest silence (ms)", "silence_ms"),
        ("longest silence in switch (ms)", "switch_silence_ms"),
    ]
    print_table(s, ["warm", "cold", "naive"], rows)
    for kind in ("warm", "cold", "naive"):
        k = s[kind]
        print(
            f"{kind}: ok {k['ok']}/{k['n']}, silence > 60 ms in {k['silence_over_60ms']}, "
            f"max overlap {k['overlap_max_ms']} ms, filler heard in {k['filler_heard']}, failed: {k['failed']}"
        )
    nv = s["naive"]["request_to_audible_ms"]
    for kind in ("warm", "cold"):
        d = s[kind]["request_to_audible_ms"]
        if d and nv:
            print(f"ratio {kind}/naive request->audible p50 {d['p50'] / nv['p50']:.2f}, p95 {d['p95'] / nv['p95']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))


def print_observe_report(report: dict[str, Any], n_warm: int, n_observed: int) -> None:
    s, la = report["summary"], report["loadavg"]
    print(
        f"\nhandoffs: {n_warm} warm plain + {n_observed} warm observed; {report['run_seconds'] / 60:.1f} min; "
        f"load avg start {la['start'][0]} mean {la['mean1']:.2f} max {la['max1']}; "
        f"sink got {report['sink_requests']} requests"
    )
    rows = [
        ("request -> target audible (ms)", "request_to_audible_ms"),
        ("baton request -> completed (ms)", "baton_completed_ms"),
        ("target ready -> audible (ms)", "ready_to_audible_ms"),
        ("longest silence (ms)", "silence_ms"),
    ]
    print_table(s, ["warm", "observed"], rows)
    for kind in ("warm", "observed"):
        k = s[kind]
        print(f"{kind}: ok {k['ok']}/{k['n']}, failed: {k['failed']}")
    scrapes = [r.get("scrapes", 0) for r in report["runs"]["observed"]]
    print(f"observed: {sum(scrapes)} HTTP GETs answered during the handoffs")
    for key in ("request_to_audible_ms", "baton_completed_ms"):
        a, b = s["warm"][key], s["observed"][key]
        if a and b:
            print(f"ratio observed/plain {key}: p50 {b['p50'] / a['p50']:.2f}, p95 {b['p95'] / a['p95']:.2f}")


if __name__ == "__main__":
    if "--agents" in sys.argv[1:]:  # the support desk's livekit-agents agents: bench/handoff_agents.py
        from handoff_agents import main as agents_main

        agents_main([a for a in sys.argv[1:] if a != "--agents"])
    else:
        main()
