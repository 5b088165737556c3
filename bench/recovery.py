"""`./scripts/bench recovery`: the support desk's triage job process killed with SIGKILL mid-call,
as the caller hears it: through baton (replaced from its last checkpoint) against the same kill
without baton.

One local livekit-server, `baton worker` (configs/baton.toml) and the support desk's triage
worker (examples/support-desk/triage.py, jobs in their own processes, checkpoint reports on), a
fresh room per kill. Three kinds, interleaved so drift in the machine's load hits all alike:

  - dispatched: baton replaces the dead triage by dispatching a new one (a cold start);
  - standby: a second triage was dispatched into the room before the kill and waits there,
    muted; baton gives it the call;
  - reference (no baton): the same agents in one livekit-agents worker (bench/handoff_agents.py
    `--worker monolith`, the caller's token dispatches it), the same kill; nothing replaces it,
    so the caller hears silence until it gives up (`--reference-wait`, 20 s).

The caller (demo/run.py `Caller`) says two things; 0.4 s into triage's second reply
(`--after-reply` kills 2 s after it instead) the job process gets SIGKILL. Per kill:

  - silence heard: the longest stretch, from the kill to the replacement's first sound (the
    reference: to the end of its wait), in which the caller heard nothing at all;
  - kill -> filler: from the kill to baton's first audible frame;
  - kill -> replacement audible: from the kill to the first audible frame of the triage that
    took over (the one that says the call was cut off);
  - context equal: the replacement's chat context holds the last checkpoint triage saw
    acknowledged, item for item (ids, order, canonical JSON digests).

Levels are on the caller's playout clock (tests/e2e/peers.py `played_at`), threshold -55 dBFS.

    .venv/bin/python bench/recovery.py [--kills 20] [--reference 3] [--idle-processes 0] [--json PATH]

With `--idle-processes 0` (the default, the desk's) a dispatched replacement starts a new Python
process (imports included); livekit-agents' own default keeps warm processes ready, which
`--idle-processes 1` measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import loadavg_summary, print_table, summary  # noqa: E402
from crashes import Crash, context_equal, converse_then_kill, demo, recovered_items  # noqa: E402
from harness import ROOT, LiveKitServer, Process, baton_worker, run  # noqa: E402

RESULTS = HERE / "results" / "recovery.json"
CONFIG = ROOT / "configs" / "baton.toml"
MONOLITH = "desk-monolith"


def ms(x: float | None) -> float | None:
    return None if x is None else 1000 * x


def one(server: LiveKitServer, worker: Process, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    room = f"bench-recovery-{kind}-{uuid.uuid4().hex[:6]}"
    reference = kind == "reference"
    crash: Crash = run(  # type: ignore[assignment]
        converse_then_kill(
            server,
            room,
            worker,
            with_baton=not reference,
            agent_name=MONOLITH if reference else "triage",
            mid_sentence=not args.after_reply,
            standby=kind == "standby",
            wait=args.reference_wait if reference else 30.0,
        ),
        timeout=150,
    )
    row: dict[str, Any] = {"kind": kind, "room": room}
    if reference:
        voice = [
            t
            for who, series in crash.played.items()
            if who != crash.old_identity
            for t, level in series
            if t > crash.t_kill and level > -55.0
        ]
        row["silence_ms"] = ms(crash.longest_silence(crash.t_kill + args.reference_wait))
        row["replaced"] = bool(voice)
        return row
    to_voice = crash.kill_to_replacement()
    row["silence_ms"] = ms(crash.longest_silence(crash.t_kill + (to_voice if to_voice is not None else 30.0)))
    row["kill_to_filler_ms"] = ms(crash.kill_to_filler())
    row["kill_to_audible_ms"] = ms(to_voice)
    row["replaced"] = crash.greeting is not None
    row["context_equal"] = context_equal(recovered_items(worker), crash.acked_items)
    row["acked_items"] = len(crash.acked_items)
    return row


def bench(args: argparse.Namespace) -> dict[str, Any]:
    env_before = dict(os.environ)
    os.environ["DESK_JOB_EXECUTOR"] = "process"
    os.environ["DESK_REPORT_CHECKPOINTS"] = "1"
    os.environ["DESK_IDLE_PROCESSES"] = str(args.idle_processes)
    server = LiveKitServer()
    server.start()
    rows: list[dict[str, Any]] = []
    loads: list[tuple[float, float, float]] = []
    baton = triage = mono = None
    try:
        baton = baton_worker(server, "--config", str(CONFIG))
        triage = demo.agent_worker(server, "triage.py")
        mono = demo.agent_process(server, [str(HERE / "handoff_agents.py"), "--worker", "monolith"])
        baton.wait_for(r"worker registered", 30)
        triage.wait_for(r"^triage: registered", 60)
        mono.wait_for(r"registered", 60)
        plan = []
        for i in range(args.kills):
            plan += ["dispatched", "standby"]
            if i < args.reference:
                plan.append("reference")
        for i, kind in enumerate(plan):
            worker = mono if kind == "reference" else triage
            loads.append(tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3]))  # type: ignore[arg-type]
            try:
                row = one(server, worker, kind, args)
            except Exception as e:  # one broken kill is a result, not the end of the run
                traceback.print_exc()
                row = {"kind": kind, "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print(f"[{i + 1}/{len(plan)}] {json.dumps(row)}", file=sys.stderr, flush=True)
    finally:
        for name, p in (("triage", triage), ("monolith", mono)):
            if p is not None:
                demo._stop_group(name, p.proc)
        if baton is not None:
            baton.stop()
        server.stop()
        os.environ.clear()
        os.environ.update(env_before)
    kinds = ["dispatched", "standby", "reference"]
    out: dict[str, Any] = {"kinds": {}, "rows": rows, "load": loadavg_summary(loads)}
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        ok = [r for r in mine if "error" not in r]
        k: dict[str, Any] = {"kills": len(mine), "errors": len(mine) - len(ok)}
        for key in ("silence_ms", "kill_to_filler_ms", "kill_to_audible_ms"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            k[key] = summary(vals) if vals else None
        k["replaced"] = sum(1 for r in ok if r.get("replaced"))
        k["context_equal"] = sum(1 for r in ok if r.get("context_equal"))
        out["kinds"][kind] = k
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="./scripts/bench recovery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kills", type=int, default=20, help="kills of each baton kind (default 20)")
    ap.add_argument(
        "--reference",
        type=int,
        default=3,
        help="kills without baton (default 3; each waits the whole --reference-wait)",
    )
    ap.add_argument(
        "--reference-wait", type=float, default=20.0, help="seconds the reference caller waits for a voice (default 20)"
    )
    ap.add_argument(
        "--after-reply", action="store_true", help="kill 2 s after triage's second reply instead of 0.4 s into it"
    )
    ap.add_argument(
        "--idle-processes",
        type=int,
        default=0,
        help="warm job processes the agent workers keep (livekit-agents' num_idle_processes; default 0)",
    )
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"write results here (default {RESULTS})")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report = bench(args)
    report["date"] = started
    report["command"] = "./scripts/bench recovery " + " ".join(argv if argv is not None else sys.argv[1:])
    kinds = ["dispatched", "standby", "reference"]
    table = {kind: report["kinds"][kind] for kind in kinds}
    print_table(
        table,
        kinds,
        [
            ("longest silence heard", "silence_ms"),
            ("kill -> filler", "kill_to_filler_ms"),
            ("kill -> replacement audible", "kill_to_audible_ms"),
        ],
    )
    for kind in kinds:
        k = table[kind]
        print(
            f"{kind}: {k['kills']} kills, {k['errors']} errors, replaced {k['replaced']}, "
            f"context equal {k['context_equal']}"
        )
    print(f"load: {report['load']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
