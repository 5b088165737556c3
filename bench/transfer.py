"""`./scripts/bench transfer`: a context bundle through baton vs. a LiveKit byte stream.

Measured in one run against one livekit-server, the same random bytes each way:
  - baton: agent A `send_bundle` to baton (leg 1, acknowledged), baton delivers to agent B
    (leg 2, acknowledged): time from A's call until B holds the verified bundle (B sends its
    COMPLETE right then), and until A's own send returns (baton stored it);
  - SDK byte stream: A `send_bytes(..., destination_identities=[B])` (chunked, no acks, no
    integrity check): time until B's `register_byte_stream_handler` reader has every byte.
Sizes 100 KiB, 1 MiB, 10 MiB, alternating the two paths, `--runs` times each.

A and B are separate processes, as two agents are in production (B is `bench/transfer_peer.py`,
a fresh one per run, timing on the system-wide monotonic clock). `--one-process` puts both in
the benchmark's process, the layout of the earlier runs: then their CPU work is serialised on
one event loop, which favours the path whose two ends take turns. `--rust-agents` makes A and B
of the baton path `examples/xfer_peer.rs` processes (baton's own room stack and transfer engine,
no libwebrtc), to show the protocol without the Python SDK's costs; the byte stream reference
stays the Python SDK's (separate processes), the only SDK byte stream at hand.

With `--loss PCT` (root only) the server runs in one network namespace and the agents and baton
in another, joined by a veth pair (10.203.0.1 <-> 10.203.0.2, nothing else); `PCT` percent of
the packets entering each namespace are dropped at random. The kernel's netem qdisc is the
natural tool but this machine's kernel is built without it (CONFIG_NET_SCH_NETEM is not set),
so the drop is an nftables rule (`numgen random mod 1000 < PCT*10 drop`) on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import summary
from harness import API_KEY, API_SECRET, TOOLS, Baton, LiveKitServer, baton_join, token
from livekit import rtc
from lk_baton.transfer import receive_bundle, send_bundle, transport_for
from transfer_peer import TOPIC, byte_stream

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"100KiB": 100 * 1024, "1MiB": 1024 * 1024, "10MiB": 10 * 1024 * 1024}
NS_SRV, NS_CLI = "bxfer-srv", "bxfer-cli"
LOG = ROOT / "out" / "bench-transfer-baton.log"
PEER = Path(__file__).with_name("transfer_peer.py")
RUST_PEER = ROOT / "target" / "release" / "examples" / "xfer_peer"
IP_SRV, IP_CLI = "10.203.0.1", "10.203.0.2"


@dataclass
class Remote:
    """A server started elsewhere (another namespace); only its URL matters here."""

    url: str


async def wait_join(room: rtc.Room, identity: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while identity not in room.remote_participants:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{identity} never joined")
        await asyncio.sleep(0.02)


class Pair:
    """Fresh agents A and B for one run: a path that broke in one run cannot poison the next.

    B is an `rtc.Room` here (`separate=False`) or a `transfer_peer.py` process for `path`."""

    def __init__(self, url: str, baton: Baton, room_name: str, tag: str, path: str, separate: bool) -> None:
        self.url, self.baton, self.room_name = url, baton, room_name
        self.ida, self.idb = f"agent-a-{tag}", f"agent-b-{tag}"
        self.a, self.b = rtc.Room(), rtc.Room()
        self.path, self.separate = path, separate
        self.peer: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Pair:
        transport_for(self.a)
        await self.a.connect(self.url, token(self.ida, self.room_name, kind="agent"))
        if self.separate:
            self.peer = await asyncio.create_subprocess_exec(
                sys.executable, str(PEER), "--url", self.url, "--path", self.path,
                "--token", token(self.idb, self.room_name, kind="agent"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            if await self.line(30) != "ready":
                raise RuntimeError("B's process did not get ready")
        else:
            transport_for(self.b)
            await self.b.connect(self.url, token(self.idb, self.room_name, kind="agent"))
        await wait_join(self.a, "baton")
        await wait_join(self.a, self.idb)
        loop = asyncio.get_running_loop()
        for who in (self.ida, self.idb):
            await loop.run_in_executor(None, lambda w=who: self.baton.wait_for(rf"participant joined.*{w}\b", 15))
        return self

    async def line(self, timeout: float) -> str:
        assert self.peer is not None and self.peer.stdout is not None
        return (await asyncio.wait_for(self.peer.stdout.readline(), timeout)).decode().strip()

    async def peer_result(self, payload: bytes, deadline: float) -> float:
        """Waits for B's process to hold the payload; returns when it did (monotonic, s)."""
        out = json.loads(await self.line(deadline + 5))
        if "error" in out:
            raise RuntimeError(f"B: {out['error']}")
        if out["sha256"] != hashlib.sha256(payload).hexdigest():
            raise RuntimeError(f"payload differs ({out['bytes']} of {len(payload)} bytes)")
        return float(out["done"])

    async def __aexit__(self, *_: object) -> None:
        await self.a.disconnect()
        if self.peer is not None:
            if self.peer.returncode is None:
                self.peer.kill()
            await self.peer.wait()
        else:
            await self.b.disconnect()


async def run_baton(p: Pair, payload: bytes, deadline: float) -> tuple[float, float]:
    """A -> baton -> B, acknowledged on both legs: (stored, delivered) in ms."""
    loop = asyncio.get_running_loop()  # its clock is time.monotonic(), as in B's process
    if p.separate:
        t0 = loop.time()
        await send_bundle(p.a, "baton", payload, {"to": p.idb}, deadline=deadline)
        t_stored = loop.time()
        t_done = await p.peer_result(payload, deadline)
        return (t_stored - t0) * 1000, (t_done - t0) * 1000
    got = asyncio.ensure_future(receive_bundle(p.b, from_identity="baton", timeout=deadline))
    t0 = loop.time()
    try:
        await send_bundle(p.a, "baton", payload, {"to": p.idb}, deadline=deadline)
        t_stored = loop.time()
        data, _ = await got
    except BaseException:
        got.cancel()
        raise
    t_done = loop.time()
    if data != payload:
        raise RuntimeError("payload differs")
    return (t_stored - t0) * 1000, (t_done - t0) * 1000


async def run_stream(p: Pair, payload: bytes, deadline: float) -> float:
    """SDK byte stream A -> B, no acknowledgement: ms until B's reader has every byte."""
    loop = asyncio.get_running_loop()
    done = None if p.separate else byte_stream(p.b)
    t0 = loop.time()
    await p.a.local_participant.send_bytes(payload, topic=TOPIC, destination_identities=[p.idb], compress=False)
    if done is None:
        return (await p.peer_result(payload, deadline) - t0) * 1000
    t_done, data = await asyncio.wait_for(done, deadline)
    if data != payload:
        raise RuntimeError(f"payload differs ({len(data)} of {len(payload)} bytes)")
    return (t_done - t0) * 1000


async def measure(
    url: str, baton: Baton, room_name: str, sizes: list[str], runs: int, deadline: float, layout: str
) -> dict[str, Any]:
    # A caller stays in the room throughout, as in a real call: the server closes a room that
    # only agents ever joined once its empty_timeout (60 s here) has passed.
    caller = rtc.Room()
    await caller.connect(url, token("caller", room_name))
    try:
        return await measure_sizes(url, baton, room_name, sizes, runs, deadline, layout)
    finally:
        await caller.disconnect()


async def measure_sizes(
    url: str, baton: Baton, room_name: str, sizes: list[str], runs: int, deadline: float, layout: str
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in sizes:
        size = SIZES[name]
        baton_ms: list[float] = []
        stored_ms: list[float] = []
        stream_ms: list[float] = []
        failures: list[str] = []
        for i in range(runs):
            payload = os.urandom(size)  # fresh bytes every run; the two paths alternate
            try:
                if layout == "rust":
                    stored, delivered = await run_baton_rust(url, room_name, f"{name}-{i}-x", size, deadline)
                else:
                    async with Pair(url, baton, room_name, f"{name}-{i}-x", "baton", layout == "separate") as p:
                        stored, delivered = await run_baton(p, payload, deadline)
                stored_ms.append(stored)
                baton_ms.append(delivered)
            except Exception as e:  # a failed run is reported, not hidden
                failures.append(f"baton run {i}: {type(e).__name__}: {e}")
            try:
                async with Pair(url, baton, room_name, f"{name}-{i}-s", "stream", layout != "one-process") as p:
                    stream_ms.append(await run_stream(p, payload, deadline))
            except Exception as e:
                failures.append(f"stream run {i}: {type(e).__name__}: {e}")
        r: dict[str, Any] = {"bytes": size, "failures": failures}
        if baton_ms:
            r["baton_delivered_ms"] = summary(baton_ms)
            r["baton_stored_ms"] = summary(stored_ms)
            r["baton_MBps_p50"] = size / 1e6 / (r["baton_delivered_ms"]["p50"] / 1000)
        if stream_ms:
            r["bytestream_ms"] = summary(stream_ms)
            r["bytestream_MBps_p50"] = size / 1e6 / (r["bytestream_ms"]["p50"] / 1000)
        if baton_ms and stream_ms:
            # > 1: baton is slower. Throughput ratio (baton / byte stream) is the inverse.
            r["ratio_p50"] = r["baton_delivered_ms"]["p50"] / r["bytestream_ms"]["p50"]
            r["throughput_ratio_p50"] = 1 / r["ratio_p50"]
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    return results


def run_measurement(url: str, sizes: list[str], runs: int, deadline: float, layout: str) -> dict[str, Any]:
    room = f"bench-xfer-{uuid.uuid4().hex[:6]}"
    baton = baton_join(Remote(url), room)  # type: ignore[arg-type]
    try:
        baton.wait_for("joined: data channel open", timeout=20)
        return asyncio.run(measure(url, baton, room, sizes, runs, deadline, layout))
    finally:
        baton.stop()
        # baton's own account of the run, for the failures the JSON reports.
        LOG.parent.mkdir(parents=True, exist_ok=True)
        LOG.write_text(baton.text())


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def teardown_netns() -> None:
    for ns in (NS_SRV, NS_CLI):
        sh("ip", "netns", "del", ns, check=False)


def setup_netns(loss_pct: float) -> None:
    """Two namespaces joined by a veth pair; random drop of `loss_pct` % of packets entering each."""
    if os.geteuid() != 0:
        raise SystemExit("--loss needs root (network namespaces)")
    if shutil.which("nft") is None:
        raise SystemExit("--loss needs nftables (apt-get install nftables): netem is not in this kernel")
    teardown_netns()
    for ns in (NS_SRV, NS_CLI):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "bxf0", "netns", NS_SRV, "type", "veth", "peer", "name", "bxf1", "netns", NS_CLI)
    sh("ip", "-n", NS_SRV, "addr", "add", f"{IP_SRV}/24", "dev", "bxf0")
    sh("ip", "-n", NS_CLI, "addr", "add", f"{IP_CLI}/24", "dev", "bxf1")
    sh("ip", "-n", NS_SRV, "link", "set", "bxf0", "up")
    sh("ip", "-n", NS_CLI, "link", "set", "bxf1", "up")
    per_mille = round(loss_pct * 10)
    for ns, dev in ((NS_SRV, "bxf0"), (NS_CLI, "bxf1")):
        rules = (
            "table inet bxloss {\n"
            "  chain in { type filter hook input priority 0; policy accept;\n"
            f'    iifname "{dev}" numgen random mod 1000 < {per_mille} counter drop\n'
            "  }\n}\n"
        )
        p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, capture_output=True)
        if p.returncode != 0:
            raise SystemExit(f"nft failed in {ns}: {p.stderr.strip()}")


def netns_server_config(text: str) -> str:
    """configs/livekit.yaml for the server namespace: the veth address instead of loopback.

    The shared config pins loopback (node_ip, bind address), which wins over flags. It also
    turns on the loopback ICE candidate; that has to go here. The server then opens its UDP mux
    on 127.0.0.1 as well as on the veth, and node_ip rewrites every host candidate to
    10.203.0.1:PORT, so the two are duplicates and the agent keeps whichever it gathers first:
    the sockets come out of a Go map, a fresh coin flip each server start. When the loopback
    one wins, the client's STUN to 10.203.0.1 arrives on the veth socket, whose mux has no
    connection for that ufrag and drops it silently, and the server's own checks from
    127.0.0.1 to 10.203.0.2 fail (sendto: EINVAL), so ICE never completes. (On the host the
    same duplicate recovers through a peer-reflexive candidate; here it cannot.)
    """
    swaps = {
        "node_ip: 127.0.0.1": f"node_ip: {IP_SRV}",
        "- 127.0.0.1": f"- {IP_SRV}",
        "enable_loopback_candidate: true": "enable_loopback_candidate: false",
    }
    for old, new in swaps.items():
        if old not in text:
            raise SystemExit(f"configs/livekit.yaml changed: no {old!r} to override for the netns server")
        text = text.replace(old, new)
    return text


def drop_counters() -> dict[str, str]:
    out = {}
    for ns in (NS_SRV, NS_CLI):
        p = sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "bxloss", check=False)
        out[ns] = " ".join(line.strip() for line in p.stdout.splitlines() if "counter" in line)
    return out


async def run_baton_rust(url: str, room_name: str, tag: str, size: int, deadline: float) -> tuple[float, float]:
    """A -> baton -> B with both agents `xfer_peer` processes: (stored, delivered) in ms."""
    env = {**os.environ, "LIVEKIT_URL": url, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    common = [str(RUST_PEER), "--room", room_name]
    idb = f"agent-b-{tag}"
    procs: list[asyncio.subprocess.Process] = []

    async def start(*args: str) -> asyncio.subprocess.Process:
        p = await asyncio.create_subprocess_exec(
            *common, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        procs.append(p)
        return p

    async def line(p: asyncio.subprocess.Process) -> Any:
        assert p.stdout is not None
        out = json.loads(await asyncio.wait_for(p.stdout.readline(), deadline + 5) or b'{"error": "exited"}')
        if isinstance(out, dict) and "error" in out:
            raise RuntimeError(out["error"])
        return out

    try:
        b = await start("--identity", idb, "--receive")
        if await line(b) != "ready":
            raise RuntimeError("B did not get ready")
        a = await start("--identity", f"agent-a-{tag}", "--send", str(size), "--to", idb)
        await line(a)  # ready
        sent, got = await line(a), await line(b)
        if sent["sha256"] != got["sha256"] or got["bytes"] != size:
            raise RuntimeError("payload differs")
        return (sent["stored"] - sent["t0"]) * 1000, (got["done"] - sent["t0"]) * 1000
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
            await p.wait()


def layout_of(args: argparse.Namespace) -> str:
    return "rust" if args.rust_agents else "one-process" if args.one_process else "separate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="runs per size and path")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {', '.join(SIZES)}")
    ap.add_argument("--loss", type=float, default=0.0, help="percent random packet loss (netns + nftables)")
    ap.add_argument("--deadline", type=float, default=60.0, help="give up on one run after this many seconds")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--one-process", action="store_true", help="agents A and B in this process (earlier runs' layout)")
    ap.add_argument("--rust-agents", action="store_true", help="baton path: A and B are examples/xfer_peer.rs")
    ap.add_argument("--server-url", help=argparse.SUPPRESS)  # internal: inside the client namespace
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown size {', '.join(unknown)}; choose from {', '.join(SIZES)}")

    if args.server_url:  # the re-executed child, inside NS_CLI
        results = run_measurement(args.server_url, sizes, args.runs, args.deadline, layout_of(args))
        print(json.dumps({"results": results}), flush=True)
        return

    if args.rust_agents:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "xfer_peer"], cwd=ROOT, check=True)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "benchmark": "transfer",
        "date": started,
        "command": " ".join(["./scripts/bench", "transfer", *sys.argv[1:]]),
        "runs": args.runs,
        "sizes": sizes,
        "loss_pct": args.loss,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, kernel {platform.release()}",
        "livekit_sdk": getattr(rtc, "__version__", "?"),
        "agents": {
            "one-process": "A and B in one process",
            "separate": "A and B in separate processes",
            "rust": "baton path: A and B are Rust processes (examples/xfer_peer.rs); byte stream: Python SDK, "
            "separate processes",
        }[layout_of(args)],
    }
    if args.loss <= 0:
        srv = LiveKitServer()
        srv.start()
        try:
            results = run_measurement(srv.url, sizes, args.runs, args.deadline, layout_of(args))
        finally:
            srv.stop()
        meta["path"] = "loopback (127.0.0.1)"
    else:
        setup_netns(args.loss)
        port, udp, tcp = 17880, 17882, 17881
        log = open(os.devnull, "wb")
        cfg = Path(tempfile.mkstemp(prefix="livekit-netns-", suffix=".yaml")[1])
        cfg.write_text(netns_server_config((ROOT / "configs" / "livekit.yaml").read_text()))
        server = subprocess.Popen(
            [
                "ip", "netns", "exec", NS_SRV, str(TOOLS / "livekit-server"),
                "--config", str(cfg),
                "--port", str(port), "--udp-port", str(udp), "--rtc.tcp_port", str(tcp),
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            time.sleep(2.0)
            child = subprocess.run(
                [
                    "ip", "netns", "exec", NS_CLI, sys.executable, __file__,
                    "--server-url", f"ws://{IP_SRV}:{port}", "--runs", str(args.runs), "--sizes", ",".join(sizes),
                    "--deadline", str(args.deadline), *(["--one-process"] if args.one_process else []),
                    *(["--rust-agents"] if args.rust_agents else []),
                ],
                capture_output=True, text=True,
            )  # fmt: skip
            lines = [ln for ln in child.stdout.splitlines() if ln.startswith('{"results"')]
            if child.returncode != 0 or not lines:
                raise SystemExit(f"measurement failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
            results = json.loads(lines[-1])["results"]
            meta["dropped"] = drop_counters()
        finally:
            server.terminate()
            server.wait(timeout=10)
            teardown_netns()
            cfg.unlink(missing_ok=True)
        meta["path"] = f"veth between two network namespaces, {args.loss}% random drop each way (nftables)"
    out = {**meta, "results": results}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
