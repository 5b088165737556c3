"""What checkpointing costs an agent's turn on its event loop (issue 13; goal: under 1 ms per
turn, not counting the network). ``./scripts/bench checkpoint [--turns 400] [--json out.json]``.

A real ``AgentSession`` runs a real ``Agent`` headless (no room, no model); a ``BatonLink`` is
built on it without a room. For each conversation length (items already in the agent's chat
context), every turn appends a user message and an assistant reply to the agent's context (not
timed), then times what the adapter does on the event loop at that turn boundary:
``BatonLink.checkpoint_payload()`` (read the agent's context, serialise the new items, the user
state, the journal, compare with what was sent, build the canonical JSON payload) and the
acknowledgement. Every 32nd checkpoint is a base (the whole state), so the tail shows its cost.
Sending the payload (the transfer's framing and SHA-256, the data packets) is not included.
Both the wall time and the thread's CPU time are reported: on a loaded machine the wall time's
tail is mostly the process being preempted.

The session's user state is a dataclass of 40 fields, and the journal holds 4 finished calls.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import summary
from livekit.agents import Agent, AgentSession, llm
from lk_baton.agents import BatonLink

UserState = dataclasses.make_dataclass(
    "UserState", [(f"field_{i}", str, dataclasses.field(default=f"value {i}")) for i in range(40)]
)


class NullRoom:
    name = "bench"


def turn_items(n: int) -> list[llm.ChatItem]:
    now = time.time() + n  # strictly later than every earlier turn
    return [
        llm.ChatMessage(
            role="user",
            content=[f"this is what the caller said in turn {n}, about order {n}"],
            created_at=now,
        ),
        llm.ChatMessage(
            role="assistant",
            content=[f"and this is the agent's answer in turn {n}, a sentence or two long. " * 2],
            created_at=now + 0.001,
        ),
    ]


async def run(sizes: list[int], turns: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in sizes:
        session: AgentSession[Any] = AgentSession(userdata=UserState())
        agent = Agent(instructions="bench")
        await session.start(agent)
        link = BatonLink(NullRoom(), session, agent_name="triage", heartbeat_ms=None)  # type: ignore[arg-type]
        for i in range(4):
            link.journal.started(f"c{i}", "lookup", '{"q":1}', now=time.time(), agent=agent.id)
            link.journal.finished(f"c{i}", "found it", now=time.time())
        # Appended the way the framework commits a turn (AgentActivity inserts into the agent's
        # own context); update_chat_ctx would diff and re-insert, reordering equal timestamps.
        for n in range(size // 2):
            for it in turn_items(n):
                agent._chat_ctx.insert(it)
        t = link.checkpoints
        assert t is not None
        first = link.checkpoint_payload()
        assert first is not None
        t.acked()
        times: list[float] = []
        cpu: list[float] = []
        sizes_b: list[int] = []
        bases = 0
        for n in range(turns):
            for it in turn_items(size + n):
                agent._chat_ctx.insert(it)
            c0, t0 = time.thread_time(), time.perf_counter()
            payload = link.checkpoint_payload()
            t.acked()
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
            assert payload is not None
            sizes_b.append(len(payload))
            bases += json.loads(payload)["base"]
        out[str(size)] = {
            "ms": summary(times),
            "cpu_ms": summary(cpu),
            "payload_bytes_delta_median": sorted(sizes_b)[len(sizes_b) // 2],
            "payload_bytes_max": max(sizes_b),
            "bases": bases,
            "items_at_end": len(agent.chat_ctx.items),
        }
        await session.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=400)
    ap.add_argument("--sizes", default="10,100,400", help="items in the context before the run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    res = asyncio.run(run(sizes, args.turns))
    print(f"checkpoint cost per turn on the event loop ({args.turns} turns per row), load {os.getloadavg()[0]:.1f}")
    print("wall: elapsed on the event loop; cpu: the thread's CPU time (without preemption)")
    print(
        f"{'items before':>12} {'wall p50':>9} {'wall p95':>9} {'cpu p50':>8} {'cpu p95':>8} "
        f"{'cpu max':>8} {'delta B':>8} {'base B':>8} {'bases':>6}"
    )
    for size, r in res.items():
        ms, c = r["ms"], r["cpu_ms"]
        print(
            f"{size:>12} {ms['p50']:9.3f} {ms['p95']:9.3f} {c['p50']:8.3f} {c['p95']:8.3f} "
            f"{c['max']:8.3f} {r['payload_bytes_delta_median']:8d} {r['payload_bytes_max']:8d} "
            f"{r['bases']:6d}"
        )
    if args.json:
        args.json.write_text(json.dumps({"turns": args.turns, "results": res}, indent=2))


if __name__ == "__main__":
    main()
