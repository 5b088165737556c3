"""`./scripts/bench join`: baton joining a room, side by side with the Python LiveKit SDK.

Measured in one run against one local livekit-server:
  - process start -> joined with the data channel open (baton: its "joined" log line;
    SDK: a Python process that connects and then gets a reliable packet through the room);
  - ping -> pong round trip over N pings (baton answering, vs. an SDK participant answering);
  - idle RSS after joining, and baton's stripped binary size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from common import rss_kib, summary
from harness import BATON_BIN, LiveKitServer, baton_join, token
from peers import Peer

SDK_JOINER = textwrap.dedent(
    """
    import asyncio, json, sys, time, os
    t_start = float(sys.argv[4])
    from livekit import rtc
    async def main():
        room = rtc.Room()
        got = asyncio.Event()
        def on_data(pkt):
            if pkt.topic == "baton.control" and pkt.participant is not None:
                body = json.loads(pkt.data)
                if body.get("type") == "ping":
                    asyncio.ensure_future(room.local_participant.publish_data(
                        json.dumps({"v": 1, "type": "pong", "id": "e", "re": body["id"]}).encode(),
                        reliable=True, destination_identities=[pkt.participant.identity], topic="baton.control"))
        room.on("data_received", on_data)
        await room.connect(sys.argv[1], sys.argv[2])
        # "Joined with the data channel open": a reliable packet to ourselves via the room is
        # not possible, so wait until the publisher's data channel has carried one packet.
        await room.local_participant.publish_data(
            b"x", reliable=True, destination_identities=[sys.argv[3]], topic="probe"
        )
        print(json.dumps({"joined_s": time.time() - t_start}), flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
    """
)


async def ping_series(peer: Peer, to: str, n: int) -> list[float]:
    rtts = []
    for _ in range(n):
        _, rtt = await peer.ping(to)
        rtts.append(rtt * 1000)
    return rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--joins", type=int, default=10, help="process starts per side")
    ap.add_argument("--pings", type=int, default=1000)
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args()

    srv = LiveKitServer()
    srv.start()
    results: dict[str, object] = {}
    try:
        baton_join_ms, sdk_join_ms = [], []
        for i in range(args.joins):
            room = f"bj-{uuid.uuid4().hex[:6]}"
            b = baton_join(srv, room)
            at, _ = b.wait_for("joined: data channel open", timeout=15)
            baton_join_ms.append((at - b.started) * 1000)
            b.stop()

            t0 = time.time()
            p = subprocess.Popen(
                [sys.executable, "-c", SDK_JOINER, srv.url, token(f"sdk-{i}", room), "nobody", str(t0)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert p.stdout is not None
            line = p.stdout.readline()
            sdk_join_ms.append(json.loads(line)["joined_s"] * 1000)
            p.kill()
            p.wait()
        results["join_ms"] = {"baton": summary(baton_join_ms), "python_sdk": summary(sdk_join_ms)}

        room = f"bp-{uuid.uuid4().hex[:6]}"
        b = baton_join(srv, room)
        b.wait_for("joined: data channel open", timeout=15)
        ref = subprocess.Popen(
            [sys.executable, "-c", SDK_JOINER, srv.url, token("echo", room), "nobody", str(time.time())],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert ref.stdout is not None
        ref.stdout.readline()

        async def pings() -> tuple[list[float], list[float]]:
            client = await Peer.join(srv, room, "client")
            await client.wait_participant("baton")
            await client.wait_participant("echo")
            for to in ("baton", "echo"):
                # Warm-up; the first pings may arrive before the SDK peer has heard of the client
                # (it then drops them), so retry until one comes back.
                for _ in range(20):
                    try:
                        await client.ping(to, timeout=0.5)
                        break
                    except TimeoutError:
                        continue
                await ping_series(client, to, 50)
            # Interleave in blocks so drift in machine load hits both sides alike.
            bt, rf = [], []
            for _ in range(10):
                bt += await ping_series(client, "baton", args.pings // 10)
                rf += await ping_series(client, "echo", args.pings // 10)
            await client.close()
            return bt, rf

        bt, rf = asyncio.run(pings())
        results["ping_rtt_ms"] = {"baton": summary(bt), "python_sdk": summary(rf)}
        time.sleep(2)
        results["idle_rss_mib"] = {
            "baton": rss_kib(b.proc.pid) / 1024,
            "python_sdk": rss_kib(ref.pid) / 1024,
        }
        ref.kill()
        ref.wait()
        b.stop()
    finally:
        srv.stop()
    results["binary_bytes"] = os.path.getsize(BATON_BIN)
    stripped = subprocess.run(["file", str(BATON_BIN)], capture_output=True, text=True).stdout
    results["binary_stripped"] = "not stripped" not in stripped

    j, r, m = results["join_ms"], results["ping_rtt_ms"], results["idle_rss_mib"]
    print(f"join (process start -> data channel open), n={args.joins}")
    for side in ("baton", "python_sdk"):
        s = j[side]  # type: ignore[index]
        print(f"  {side:<11} p50 {s['p50']:7.1f} ms  p95 {s['p95']:7.1f} ms  max {s['max']:7.1f} ms")
    print(f"  ratio baton/sdk (p50): {j['baton']['p50'] / j['python_sdk']['p50']:.2f}")  # type: ignore[index]
    print(f"ping -> pong round trip, n={args.pings} per side")
    for side in ("baton", "python_sdk"):
        s = r[side]  # type: ignore[index]
        print(f"  {side:<11} p50 {s['p50']:6.2f} ms  p95 {s['p95']:6.2f} ms  p99 {s['p99']:6.2f} ms")
    print(f"  ratio baton/sdk (p50): {r['baton']['p50'] / r['python_sdk']['p50']:.2f}")  # type: ignore[index]
    print(f"idle RSS: baton {m['baton']:.1f} MiB, python sdk {m['python_sdk']:.1f} MiB")  # type: ignore[index]
    stripped_note = "stripped" if results["binary_stripped"] else "NOT stripped"
    print(f"binary: {results['binary_bytes'] / 1e6:.2f} MB ({stripped_note})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
