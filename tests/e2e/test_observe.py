"""baton's observability against the real thing: a LiveKit server, baton, protocol-speaking tone
agents, and the tools a team would point at baton. `/metrics` is parsed by the Python
Prometheus client's parser; a webhook receiver verifies every signature and goes down for a
while; headless Chromium renders the call timeline page; Jaeger receives the traces over OTLP.

Each test runs one call: the caller joins, triage gets the floor and billing stands by; the
caller forges a handoff (a security rejection); triage asks for a handoff to an agent nobody
configured (refused); then triage hands the call to billing with a 64 KiB bundle. Billing takes
0.8 s to get ready, so the caller hears filler.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import (
    API_KEY,
    API_SECRET,
    ROOT,
    Baton,
    LiveKitServer,
    baton_worker,
    config_file,
    free_port,
    joined_baton,
    run,
    wait_until,
)
from livekit import api
from peers import Peer
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from test_handoff import CONFIG, agent
from tone_agent import ToneAgent

BUNDLE = os.urandom(64 * 1024)
JAEGER = ROOT / ".tools" / "bin" / "jaeger"
SHOTS = Path(os.environ.get("BATON_SCREENSHOTS", tempfile.gettempdir()))


@dataclass
class Call:
    """What one scenario left behind, for the assertions."""

    caller: Peer
    triage: ToneAgent
    billing: ToneAgent
    timeline: dict[str, Any] = field(default_factory=dict)

    async def leave(self) -> None:
        for x in (self.triage, self.billing):
            await x.close()
        await self.caller.close()


async def call_with_handoffs(
    server: LiveKitServer,
    room: str,
    baton: Baton,
    *,
    before_forgery: Callable[[], object] | None = None,
    after_handoff: Callable[[], object] | None = None,
    leave: bool = True,
) -> Call:
    """The scenario of this module's docstring. `before_forgery` and `after_handoff` run (in a
    thread) at those points; with `leave`, everyone leaves at the end."""
    caller = await Peer.join(server, room, "caller")
    a = await agent(server, room, "triage", 440)
    b = await agent(server, room, "billing", 880, ready_delay=0.8)
    await wait_until(lambda: a.speaking, 10, "triage never got the floor")
    await wait_until(lambda: b.got("deactivate"), 10, "billing not on standby")
    await caller.wait_participant("baton")
    if before_forgery:
        await asyncio.to_thread(before_forgery)
    forged = {"v": 1, "type": "handoff", "id": "evil-1", "target": "billing", "reason": "forged"}
    await caller.send("baton.control", json.dumps(forged).encode(), ["baton"])
    await caller.send("baton.control", b'{"v":1,"type":', ["baton"])
    # The server may tell baton about a caller that publishes nothing after its packet arrives;
    # baton holds such a packet up to 2 s and then judges it from an unknown participant.
    await asyncio.to_thread(baton.wait_for, r'"event":"security_rejected"', 5)
    await a.handoff("nobody", reason="no such agent")
    await wait_until(lambda: a.got("handoff_refused"), 5, "the handoff to an unknown agent was not refused")
    start = len(baton.lines)
    await a.handoff("billing", reason="caller wants a refund", bundle=BUNDLE)
    await wait_until(lambda: b.speaking, 15, "billing never got the floor")
    line = (await asyncio.to_thread(baton.wait_for, r'^\{"handoff".*"event":"handoff_finished"', 10, start))[1]
    call = Call(caller, a, b, json.loads(line))
    if after_handoff:
        await asyncio.to_thread(after_handoff)
    if leave:
        await call.leave()
    return call


def events_on_stdout(baton: Baton) -> list[dict[str, Any]]:
    """baton's event lines (stdout; the harness merges stderr, whose log lines are not JSON)."""
    out = []
    for _, line in list(baton.lines):
        if line.startswith("{") and '"event":' in line:
            out.append(json.loads(line))
    return out


def http_get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`/metrics`, parsed by prometheus_client's OpenMetrics parser: (sample name, labels) -> value."""
    status, content_type, text = http_get(port, "/metrics")
    assert status == 200 and content_type.startswith("application/openmetrics-text"), (status, content_type)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_a_handoff_a_refusal_and_a_forgery(server: LiveKitServer) -> None:
    room = f"o-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with joined_baton(server, room, "--config", config_file(CONFIG), "--http", f"127.0.0.1:{port}") as baton:
        assert http_get(port, "/healthz")[0] == 200
        ready: list[int] = []
        call = run(
            call_with_handoffs(server, room, baton, after_handoff=lambda: ready.append(http_get(port, "/readyz")[0]))
        )
        assert ready == [200], "in a room, /readyz must say ready"
        t = call.timeline
        assert t["outcome"] == "completed", t
        phases = {p["phase"]: p["ms"] for p in t["phases"]}
        m = scrape(port)

    edge = value(m, "baton_handoffs_total", source="triage", target="billing", outcome="completed")
    assert edge == 1, [k for k in m if k[0] == "baton_handoffs_total"]
    assert value(m, "baton_handoff_refusals_total", reason="unknown_target") == 1
    forgery = next(e for e in events_on_stdout(baton) if e["event"] == "security_rejected")
    assert forgery["from"] == "caller" and forgery["message_type"] == "handoff"
    reason = forgery["reason"]["kind"]
    assert reason in ("not_an_agent", "unknown_participant"), forgery
    rejected = {k: v for k, v in m.items() if k[0] == "baton_control_messages_rejected_total"}
    assert value(m, "baton_control_messages_rejected_total", reason=reason) == 1, rejected
    assert value(m, "baton_rooms") == 1
    assert value(m, "baton_rooms_joined_total") == 1
    # Histograms carry the timeline's own numbers (ms -> s).
    assert value(m, "baton_handoff_request_to_audible_seconds_count") == 1
    assert value(m, "baton_handoff_request_to_audible_seconds_sum") == phases["target_audible"] / 1000
    assert value(m, "baton_handoff_phase_seconds_count", phase="target_ready") == 1
    assert value(m, "baton_handoff_phase_seconds_sum", phase="target_ready") == phases["target_ready"] / 1000
    # target_ready came at least 0.8 s after prepare: not in the buckets below 0.8 s.
    assert value(m, "baton_handoff_phase_seconds_bucket", phase="target_ready", le="0.4") == 0
    assert value(m, "baton_handoff_phase_seconds_bucket", phase="target_ready", le="+Inf") == 1
    assert value(m, "baton_handoff_filler_seconds_count") == 1
    filler = (phases["filler_off"] - phases["filler_on"]) / 1000
    assert value(m, "baton_handoff_filler_seconds_sum") == filler and filler > 0.5, filler
    assert value(m, "baton_bundle_bytes_sum") == len(BUNDLE) == t["bundle_bytes"]
    # baton delivered the bundle to billing: its chunks, framing included, in whole.
    delivered = value(m, "baton_bundle_delivered_bytes_total") or 0
    assert len(BUNDLE) <= delivered < 2 * len(BUNDLE), delivered
    resent = value(m, "baton_transfer_retransmitted_bytes_total")
    assert resent is not None and 0 <= resent <= delivered, resent
    assert value(m, "baton_control_messages_rejected_total", reason="malformed") == 1, rejected
    # The caller-heard gap baton saw: quiet -> filler on, or filler off -> billing heard.
    gap = max(phases["filler_on"] - phases["source_quiet"], phases["target_audible"] - phases["filler_off"], 0)
    assert value(m, "baton_handoff_caller_gap_seconds_count") == 1
    assert value(m, "baton_handoff_caller_gap_seconds_sum") == gap / 1000, (gap, phases)
    assert value(m, "baton_bundle_bytes_bucket", le="65536.0") == 1
    assert value(m, "baton_bundle_bytes_bucket", le="16384.0") == 0
    assert value(m, "baton_handoff_duration_seconds_count", outcome="completed") == 1
    assert value(m, "baton_events_total", event="handoff_finished") == 1
    assert value(m, "baton_events_total", event="security_rejected") == 1
    # Nothing dropped (no webhook configured, and no sink failed).
    assert not [k for k in m if k[0] == "baton_events_dropped_total"]


class Receiver:
    """A webhook receiver that verifies LiveKit-style signatures and can be taken down."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.events: list[dict[str, Any]] = []
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def verify(self, body: bytes, auth: str | None) -> str | None:
        """Why the request is not signed right, or None."""
        if not auth:
            return "no Authorization header"
        try:
            claims = api.TokenVerifier(API_KEY, API_SECRET).verify(auth)
        except Exception as e:
            return f"bad token: {e}"
        if claims.sha256 != base64.b64encode(hashlib.sha256(body).digest()).decode():
            return "body hash does not match the token's sha256 claim"
        return None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                why = receiver.verify(body, self.headers.get("Authorization"))
                with receiver.lock:
                    if why or self.headers.get("Content-Type") != "application/webhook+json":
                        receiver.bad.append(why or f"content type {self.headers.get('Content-Type')}")
                    else:
                        receiver.events.append(json.loads(body))
                self.send_response(401 if why else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)


def test_webhook_delivers_every_event_once_across_a_receiver_outage(server: LiveKitServer) -> None:
    room = f"o-{uuid.uuid4().hex[:8]}"
    receiver = Receiver(free_port())
    receiver.up()
    port = free_port()
    url = f"http://127.0.0.1:{receiver.port}/baton"
    outage: dict[str, float] = {}
    delivered_before_scrape: list[int] = []

    def down() -> None:
        receiver.down()
        outage["down"] = time.monotonic()

    def back_up() -> None:
        time.sleep(1.0)  # the receiver stays down a while after the handoff, too
        receiver.up()
        outage["up"] = time.monotonic()

    def caught_up(baton: Baton) -> None:
        """Waits until the receiver holds every event stdout shows so far."""
        deadline = time.monotonic() + 30
        while {e["id"] for e in events_on_stdout(baton)} - {e["id"] for e in receiver.snapshot()}:
            assert time.monotonic() < deadline, "the receiver never caught up after the outage"
            time.sleep(0.2)

    try:
        with joined_baton(
            server, room, "--config", config_file(CONFIG), "--webhook-url", url, "--http", f"127.0.0.1:{port}"
        ) as baton:

            async def scenario() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                call = await call_with_handoffs(
                    server, room, baton, before_forgery=down, after_handoff=back_up, leave=False
                )
                await asyncio.to_thread(caught_up, baton)
                delivered_before_scrape.append(len(receiver.snapshot()))
                metrics = await asyncio.to_thread(scrape, port)
                await call.leave()
                return metrics

            m = run(scenario(), timeout=90)
            # The caller left: the session ends and baton leaves the room; its exit (the context
            # manager's SIGTERM) waits for the queue.
            baton.wait_for(r'"event":"room_left"', 15)
        sent = events_on_stdout(baton)
    finally:
        receiver.down()
    got = receiver.snapshot()
    assert receiver.bad == [], receiver.bad
    names = [e["event"] for e in sent]
    for needed in (
        "room_joined",
        "floor_granted",
        "security_rejected",
        "handoff_refused",
        "handoff_phase",
        "handoff_finished",
        "session_ended",
        "room_left",
    ):
        assert needed in names, names
    ids = [e["id"] for e in got]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert sorted(ids) == sorted(e["id"] for e in sent), "the receiver did not get exactly what stdout shows"
    assert got == sent, "webhook bodies differ from the stdout lines, or arrived out of order"
    # The outage was real: the events made while it lasted failed first and were retried.
    assert outage["up"] - outage["down"] > 2.0
    assert (value(m, "baton_webhook_attempts_failed_total") or 0) >= 1, "no failed attempt during the outage"
    assert (value(m, "baton_webhook_events_delivered_total") or 0) >= delivered_before_scrape[0] > 10
    assert not [k for k in m if k[0] == "baton_events_dropped_total"], "events dropped"
    assert "webhook event dropped" not in baton.text() and "undelivered" not in baton.text()


def chromium(url: str, *args: str) -> str:
    """Headless Chromium on `url`; returns stdout (the DOM with --dump-dom)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise RuntimeError("chromium missing: run ./scripts/setup")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=4000",
            *args,
            url,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page_state(port: int, shot: Path) -> dict[str, Any]:
    """Loads the page, screenshots it, and reads the rendered DOM."""
    url = f"http://127.0.0.1:{port}/"
    chromium(url, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot at {shot}"
    dom = chromium(url, "--dump-dom")
    assert 'data-loaded="true"' in dom, dom[:2000]
    return {
        "dom": dom,
        "identities": set(re.findall(r'class="seg floor-seg"[^>]*data-identity="([^"]+)"', dom)),
        "handoffs": re.findall(r'<tr class="handoff" data-handoff="([^"]+)" data-outcome="([^"]+)"', dom),
        "kinds": dict(re.findall(r'<tr class="handoff" data-handoff="([^"]+)" data-outcome="[^"]+" data-kind="([^"]*)"', dom)),  # noqa: E501
        "phases": set(re.findall(r'class="phase" data-phase="([^"]+)"', dom)),
        "fillers": len(re.findall(r'class="seg filler-seg"', dom)),
        "markers": set(re.findall(r'class="marker [a-z]+" data-event="([a-z]+)"', dom)),
        "states": re.findall(r'<span class="state (live|ended)"', dom),
    }


def test_timeline_page_shows_the_call_while_it_runs_and_after(server: LiveKitServer) -> None:
    port = free_port()
    worker = baton_worker(server, "--config", config_file(CONFIG), "--http", f"127.0.0.1:{port}")
    room = f"o-{uuid.uuid4().hex[:8]}"
    try:
        worker.wait_for("worker registered", 15)
        assert http_get(port, "/readyz")[0] == 200, "a registered worker is ready"
        pages: dict[str, dict[str, Any]] = {}

        async def scenario() -> Call:
            async with api.LiveKitAPI(server.http_url, API_KEY, API_SECRET) as lk:
                await lk.room.create_room(api.CreateRoomRequest(name=room))
                await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="baton", room=room))
            # The tone agents say hello once, when they start: baton must be in the room by then.
            await asyncio.to_thread(worker.wait_for, rf"joined the room.*room={room}", 20)
            call = await call_with_handoffs(
                server,
                room,
                worker,
                after_handoff=lambda: pages.update(live=page_state(port, SHOTS / f"baton-timeline-{room}-live.png")),
                leave=False,
            )
            # billing, holding the floor, vanishes without a word: baton starts a recovery,
            # which the call's end cuts short (nothing replaces billing here).
            start = len(worker.lines)
            await call.billing.close()
            await asyncio.to_thread(worker.wait_for, r'"phase":"suspected"', 10, start)
            await asyncio.sleep(1.0)
            await call.leave()
            return call

        call = run(scenario(), timeout=120)
        worker.wait_for(rf"job ended.*room={room}", 20)
        pages["after"] = page_state(port, SHOTS / f"baton-timeline-{room}-after.png")
        print("screenshots:", *sorted(SHOTS.glob(f"baton-timeline-{room}-*.png")))
    except BaseException:
        print(worker.text())
        raise
    finally:
        assert worker.stop() == 0, worker.text()

    handoff = call.timeline["handoff"]
    for when, page in pages.items():
        assert f'data-room="{room}"' in page["dom"], when
        assert page["identities"] >= {"agent-triage", "agent-billing"}, (when, page["identities"])
        assert (handoff, "completed") in page["handoffs"], (when, page["handoffs"])
        assert {"requested", "source_quiet", "filler_on", "target_ready", "target_audible"} <= page["phases"], (
            when,
            page["phases"],
        )
        assert page["fillers"] >= 1, when
        assert {"refused", "security"} <= page["markers"], (when, page["markers"])
    # After the call: billing's recovery, started when it vanished, ended with the call.
    after = pages["after"]
    recoveries = [h for h, kind in after["kinds"].items() if kind == "recovery"]
    assert len(recoveries) == 1 and after["kinds"][handoff] == "handoff", after["kinds"]
    assert (recoveries[0], "failed") in after["handoffs"], after["handoffs"]
    assert {"suspected", "confirmed"} <= after["phases"], after["phases"]
    assert pages["live"]["states"][0] == "live"
    assert pages["after"]["states"][0] == "ended"


@contextlib.contextmanager
def jaeger() -> Iterator[tuple[int, int]]:
    """Jaeger (v2, in-memory) with an OTLP/HTTP receiver; yields (otlp port, query port)."""
    if not JAEGER.exists():
        raise RuntimeError(f"{JAEGER} missing: run ./scripts/setup")
    otlp, query, health = free_port(), free_port(), free_port()
    config = f"""
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{free_port()}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 1000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config)
    log = tempfile.NamedTemporaryFile(prefix="jaeger-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(JAEGER), "--config", f.name], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/status", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise TimeoutError(f"jaeger not healthy: {Path(log.name).read_text()[-3000:]}")
        yield otlp, query
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(f.name)


def jaeger_traces(query: int, service: str, wanted: set[str], timeout: float = 20) -> list[dict[str, Any]]:
    """The traces Jaeger's query API holds for `service`, read until there is one trace with a
    span of every name in `wanted` (export is batched) or `timeout` passes; the last read."""
    url = f"http://127.0.0.1:{query}/api/traces?service={service}&limit=20"
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=5) as r:
            traces: list[dict[str, Any]] = json.load(r).get("data") or []
        if len(traces) == 1 and wanted <= {s["operationName"] for s in traces[0]["spans"]}:
            return traces
        if time.monotonic() >= deadline:
            return traces
        time.sleep(0.5)


def children_of(spans: list[dict[str, Any]], parent: str) -> list[dict[str, Any]]:
    """The spans whose parent (a CHILD_OF reference) is the span `parent`."""
    return [s for s in spans if any(r["refType"] == "CHILD_OF" and r["spanID"] == parent for r in s["references"])]


def test_handoff_trace_reaches_jaeger_with_a_span_per_phase(server: LiveKitServer) -> None:
    room = f"o-{uuid.uuid4().hex[:8]}"
    with jaeger() as (otlp, query):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}", "OTEL_SERVICE_NAME": f"baton-{room}"}
        baton = Baton(
            ["join", "--room", room, "--config", config_file(CONFIG)],
            env={"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET, **env},
        )
        try:
            baton.wait_for("joined: data channel open", 15)
            call = run(call_with_handoffs(server, room, baton))
        finally:
            assert baton.stop() == 0, baton.text()  # exit exports what the batch holds
        traces = jaeger_traces(query, f"baton-{room}", {"baton.handoff"})
    assert len(traces) == 1, f"one handoff, one trace: {traces}"
    spans = traces[0]["spans"]
    root = [s for s in spans if s["operationName"] == "baton.handoff"]
    assert len(root) == 1, [s["operationName"] for s in spans]
    root_id = root[0]["spanID"]
    tags = {t["key"]: t["value"] for t in root[0]["tags"]}
    t = call.timeline
    assert tags["baton.handoff.id"] == t["handoff"]
    assert (tags["baton.handoff.source"], tags["baton.handoff.target"]) == ("triage", "billing")
    assert tags["baton.handoff.outcome"] == "completed"
    assert tags["baton.room"] == room
    # Every phase is an event on the root span and a child span of it, as long as the timeline says.
    logged = [f["value"] for log in root[0]["logs"] for f in log["fields"] if f["key"] == "event"]
    assert logged == [p["phase"] for p in t["phases"]], logged
    children = {s["operationName"]: s for s in children_of(spans, root_id)}
    expected = {p["phase"] for p in t["phases"]} - {"requested"}
    assert expected | {"filler"} == set(children), sorted(children)
    phases = {p["phase"]: p["ms"] for p in t["phases"]}
    filler_us = children["filler"]["duration"]
    assert abs(filler_us - (phases["filler_off"] - phases["filler_on"]) * 1000) <= 1000, filler_us
    assert abs(root[0]["duration"] - max(phases.values()) * 1000) <= 1000


def test_the_agents_spans_land_under_batons_handoff_span(server: LiveKitServer) -> None:
    """Two real livekit-agents sessions linked by the Python adapter (test_tool_calls' triage and
    a warm billing) export their spans through livekit-agents' tracer; baton sends each
    handoff's `traceparent`, so one trace in Jaeger holds baton's handoff and the agents' parts."""
    import test_tool_calls as tc
    from livekit.agents.telemetry import set_tracer_provider
    from opentelemetry import trace as otel_trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    room = f"o-{uuid.uuid4().hex[:8]}"
    with jaeger() as (otlp, query):
        provider = TracerProvider(resource=Resource.create({"service.name": f"agents-{room}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{otlp}/v1/traces")))
        set_tracer_provider(provider)
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}", "OTEL_SERVICE_NAME": f"baton-{room}"}
        baton = Baton(
            ["join", "--room", room, "--config", config_file(tc.CONFIG)],
            env={"LIVEKIT_URL": server.url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET, **env},
        )
        try:
            baton.wait_for("joined: data channel open", 15)

            async def main() -> None:
                a, b, *_ = await tc.scenario(server, room, ["transfer_to_billing"])
                await tc.close(a, b)

            run(main(), timeout=90)
        finally:
            set_tracer_provider(otel_trace.NoOpTracerProvider())
            provider.force_flush(10_000)
            provider.shutdown()
            assert baton.stop() == 0, baton.text()
        traces = jaeger_traces(query, f"baton-{room}", {"baton.handoff", "baton.agent.prepare", "baton.agent.quiet"})
    assert len(traces) == 1, f"one handoff, one trace: {traces}"
    spans, processes = traces[0]["spans"], traces[0]["processes"]
    root = [s for s in spans if s["operationName"] == "baton.handoff"]
    assert len(root) == 1, [s["operationName"] for s in spans]
    service = {s["spanID"]: processes[s["processID"]]["serviceName"] for s in spans}
    assert service[root[0]["spanID"]] == f"baton-{room}"

    def under_root(name: str) -> list[dict[str, Any]]:
        return [s for s in children_of(spans, root[0]["spanID"]) if s["operationName"] == name]

    prepare, quiet = under_root("baton.agent.prepare"), under_root("baton.agent.quiet")
    assert len(prepare) == 1 and len(quiet) == 1, sorted(s["operationName"] for s in spans)
    assert service[prepare[0]["spanID"]] == service[quiet[0]["spanID"]] == f"agents-{room}"
    tags = {t["key"]: t["value"] for t in prepare[0]["tags"]}
    assert (tags["baton.agent.name"], tags["baton.handoff.source"]) == ("billing", "triage")
    assert {t["key"]: t["value"] for t in quiet[0]["tags"]}["baton.agent.name"] == "triage"
    # billing's activate span too: it ends at its first speech or, in these audio-less sessions,
    # when the adapter closes
    assert len(under_root("baton.agent.activate")) == 1
    # the agents' parts lie within baton's handoff (1 ms of clock rounding)
    start, end = root[0]["startTime"], root[0]["startTime"] + root[0]["duration"]
    for s in prepare + quiet:
        assert start - 1000 <= s["startTime"] <= end + 1000, (s["operationName"], s["startTime"] - start)
