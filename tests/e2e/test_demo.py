"""`demo/run.py --quick` end to end: a real LiveKit server, `baton worker`, the support-desk
agents (livekit-agents, espeak-ng, scripted models) in their own processes, and a caller.

Runs demo/run.py directly rather than `./scripts/demo`: ./scripts/test has already run
./scripts/setup, and setup would rebuild baton from whatever the working tree holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import ROOT

REQUIRED_PHASES = (
    "requested",
    "source_quiet",
    "filler_on",
    # target_dispatched is not required: billing may be in the room already (a standby).
    # triage's adapter asks when the transfer tool is called, so billing is dispatched, joins
    # and is prepared while triage's sentence plays out.
    "target_joined",
    "bundle_received",
    "target_ready",
    "target_activated",
    "filler_off",
    "completed",
)
# Facts billing never heard itself: the caller's name and plan came from triage's lookup, the
# problem from what the caller typed to triage.
FACTS = ("Ada", "A-1001", "Pro", "charged twice for March")

# The handoff benchmark's limit (docs/BENCHMARKS.md section 4: "longest silence heard <= 60 ms in
# every handoff"), from triage's last sound to billing's first.
SILENCE_LIMIT_MS = 60
BUNDLE_LIMIT = 64 * 1024
REQUEST_TO_AUDIO_LIMIT_MS = 12_000


def run_demo(out: Path, timeout: float = 150) -> tuple[dict[str, Any], str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "demo" / "run.py"), "--quick", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo stops everything it started on Ctrl-C
        text, _ = proc.communicate(timeout=30)
        raise AssertionError(f"demo did not finish in {timeout}s:\n{text.decode(errors='replace')}") from None
    output = text.decode(errors="replace")
    assert proc.returncode == 0, output
    return json.loads((out / "report.json").read_text()), output


def test_demo_hands_the_call_to_billing_with_context_and_no_dead_air(tmp_path: Path) -> None:
    """The whole desk, checked against limits.

    Handoff completed with every phase; billing's first sentence carries what only triage heard;
    never two agents at once; filler covered the handoff; the bundle is small; billing is
    heard within 12 s of the request.

    Silence: the stretch with nothing audible (-55 dBFS per 10 ms frame) between triage's last
    sound and billing's first, on the caller's playout clock (demo/run.py ``played_at``), may not
    exceed the handoff benchmark's limit, 60 ms. Triage's own filler (its ``baton-filler``
    track, started just before its voice ends) must be what the caller hears first: baton's
    filler comes a network hop later, and on its own left 40-80 ms of silence there
    (docs/BENCHMARKS.md 4.2).
    """
    report, output = run_demo(tmp_path)
    print(output)
    tl = report["timeline"]
    assert tl["outcome"] == "completed", tl
    assert tl["source"] == "triage" and tl["target"] == "billing", tl
    phases = [p["phase"] for p in tl["phases"]]
    for phase in REQUIRED_PHASES:
        assert phase in phases, (phase, phases)
    # The request at the tool call (the adapter's default) had billing dispatched, joined and
    # ready while triage's sentence played: the switch waited for nothing but triage's quiet.
    at = {p["phase"]: p["ms"] for p in tl["phases"]}
    assert at["target_ready"] <= at["source_quiet"] <= at["target_activated"], at

    first = report["billing_first"]
    for fact in FACTS:
        assert fact.lower() in first.lower(), f"billing's first sentence lacks {fact!r}: {first!r}"
    said = [x for x in report["transcript"] if x["who"] == "billing"]
    assert said and said[0]["text"] == first

    assert report["overlap_ms"] == 0, "triage and billing were heard at the same time"
    assert report["filler_heard_ms"] > 0, "nothing covered the handoff"
    where = f"heard (ms from the request) {report['heard_ms']}, phases {report['phases_ms']}"
    assert report["silence_handoff_ms"] <= SILENCE_LIMIT_MS, (
        f"the caller heard {report['silence_handoff_ms']} ms of silence in the handoff; {where}"
    )
    heard = report["heard_ms"]
    assert heard["source_filler_first"] is not None, f"triage's own filler was not heard; {where}"
    assert heard["source_filler_first"] == heard["filler_first"], f"baton's filler came first; {where}"
    assert 0 < report["bundle_bytes"] <= BUNDLE_LIMIT
    assert report["request_to_billing_audio_ms"] is not None
    assert report["request_to_billing_audio_ms"] <= REQUEST_TO_AUDIO_LIMIT_MS
    plot = Path(report["plot"])
    assert plot.exists() and plot.stat().st_size > 10_000
    for log in ("baton.log", "triage.log", "billing.log"):
        assert (tmp_path / log).exists()
