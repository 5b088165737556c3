"""Agent B of `bench/transfer.py` in its own process, as a receiving agent is in production.

Joins the room as an agent, prints `ready`, then waits for one payload, either a bundle from
baton (`--path baton`) or an SDK byte stream on topic `bench.bytes` (`--path stream`), and
prints one JSON line: `{"done": <time.monotonic() when the last byte was held>, "bytes": n,
"sha256": hex}`. CLOCK_MONOTONIC is system-wide, so the sender's process can subtract its own
start time. Exits after that line or after `--deadline` seconds with an `{"error": ...}` line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

from livekit import rtc
from lk_baton.transfer import receive_bundle, transport_for

TOPIC = "bench.bytes"


def byte_stream(room: rtc.Room, topic: str = TOPIC) -> asyncio.Future[tuple[float, bytes]]:
    """The first byte stream `room` receives on `topic`: (loop time when its last byte was
    read, its bytes). The loop's clock is time.monotonic()."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[tuple[float, bytes]] = loop.create_future()
    readers: set[asyncio.Task[None]] = set()

    async def read(reader: rtc.ByteStreamReader) -> None:
        parts = [chunk async for chunk in reader]
        if not got.done():
            got.set_result((loop.time(), b"".join(parts)))

    def on_stream(reader: rtc.ByteStreamReader, _identity: str) -> None:
        task = asyncio.ensure_future(read(reader))
        readers.add(task)
        task.add_done_callback(readers.discard)

    room.register_byte_stream_handler(topic, on_stream)
    return got


async def receive(url: str, tok: str, path: str, deadline: float) -> dict[str, object]:
    room = rtc.Room()
    if path == "baton":
        transport_for(room)
    else:
        got = byte_stream(room)
    await room.connect(url, tok)
    try:
        print("ready", flush=True)
        if path == "baton":
            data, _meta = await receive_bundle(room, from_identity="baton", timeout=deadline)
            done = time.monotonic()
        else:
            done, data = await asyncio.wait_for(got, deadline)
        return {"done": done, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    finally:
        await room.disconnect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--path", choices=["baton", "stream"], required=True)
    ap.add_argument("--deadline", type=float, default=60.0)
    args = ap.parse_args()
    try:
        out = asyncio.run(receive(args.url, args.token, args.path, args.deadline))
    except Exception as e:  # reported to the benchmark, which counts the run as failed
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
