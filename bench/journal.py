"""The tool-call journal's cost per tool call on the agent's event loop (issue 12; goal: under
0.2 ms). ``./scripts/bench journal [--calls 20000] [--json out.json]``.

Both sides run the same trivial async tool on the same event loop, in batches of 100 calls:

* reference: the tool awaited as the framework awaits it, and the framework's two
  ``tool_execution_updated`` events (``tool_call_started``, ``tool_call_ended``) emitted on an
  ``AgentSession`` nobody journals;
* journaled: the same tool under ``@journaled("never")`` (idempotency key, journal entry, exact
  output through ``make_function_call_output``, the ``current_tool_call`` context variable, the
  tool run as its own task while the wrapper watches the turn for a barge-in), its events
  emitted on a session whose journal listens to them (``journal_for``).

The overhead per call is (journaled batch - reference batch) / 100, batches interleaved so both
see the same machine load. The ``RunContext`` is a stand-in with the three attributes the
wrapper reads (``session``, a real ``AgentSession``; ``function_call``, a real
``llm.FunctionCall``; ``speech_handle``, a real ``SpeechHandle``, never interrupted): a real one
needs a running activity, and the framework's own cost is the same on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters" / "python"))

from livekit.agents import AgentSession, llm
from livekit.agents.voice import SpeechHandle
from livekit.agents.voice.events import (
    ToolCallEnded,
    ToolCallStarted,
    ToolExecutionUpdatedEvent,
)
from lk_baton.agents import journal_for, journaled

BATCH = 100


async def tool(date: str) -> str:
    return f"booked {date}"


class StandInRunContext:
    def __init__(
        self, session: AgentSession[Any], call: llm.FunctionCall, speech: SpeechHandle
    ) -> None:
        self.session = session
        self.function_call = call
        self.speech_handle = speech


async def batch(session: AgentSession[Any], journal: bool, n0: int) -> float:
    fn = journaled("never")(tool) if journal else tool
    speech = SpeechHandle.create()  # one turn's tool calls (the framework makes it per turn)
    t0 = time.perf_counter()
    for i in range(BATCH):
        call = llm.FunctionCall(call_id=f"c{n0 + i}", name="tool", arguments='{"date":"mon"}')
        session.emit(
            "tool_execution_updated",
            ToolExecutionUpdatedEvent(update=ToolCallStarted(function_call=call)),
        )
        if journal:
            out = await fn(date="mon", lk_baton_run_ctx=StandInRunContext(session, call, speech))
        else:
            out = await fn(date="mon")
        session.emit(
            "tool_execution_updated",
            ToolExecutionUpdatedEvent(
                update=ToolCallEnded(id=call.call_id, call_id=call.call_id, message=out, status="done")
            ),
        )
    return time.perf_counter() - t0


async def main(calls: int) -> dict[str, Any]:
    plain: AgentSession[None] = AgentSession()
    journaled_session: AgentSession[None] = AgentSession()
    j = journal_for(journaled_session)
    over: list[float] = []
    ref: list[float] = []
    for k in range(max(1, calls // BATCH)):
        a = await batch(plain, False, k * BATCH)
        b = await batch(journaled_session, True, k * BATCH)
        ref.append(a / BATCH)
        over.append((b - a) / BATCH)
    assert len(j.calls()) == len(over) * BATCH and all(c.state == "finished" for c in j.calls())
    over.sort()
    return {
        "calls": len(over) * BATCH,
        "reference_us_per_call_p50": statistics.median(ref) * 1e6,
        "overhead_us_per_call_p50": statistics.median(over) * 1e6,
        "overhead_us_per_call_p90": over[int(0.9 * (len(over) - 1))] * 1e6,
        "overhead_us_per_call_max": over[-1] * 1e6,
        "goal_us": 200,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = asyncio.run(main(args.calls))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
