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
    # No target_dispatched: triage's adapter hints billing when the transfer tool is called, so
    # billing is dispatched (as a standby) while triage's sentence plays out.
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
# every handoff"), over the same window: from the source's last sound to the target's first.
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

    Silence: the longest stretch with nothing audible (-55 dBFS per 10 ms frame) between triage's
    last sound and billing's first, on the caller's playout clock (demo/run.py ``played_at``),
    against the handoff benchmark's limit, 60 ms. Only baton's filler can be heard in that
    window, so pauses inside either agent's own speech (espeak-ng's pauses between sentences,
    the caller's turn) are not in it; they are in the report's ``silence_call_ms``, which is not
    checked. The window starts at triage's last sound, a few ms before the adapter sends
    ``handoff`` (it waits for the sentence to be played out), so the time until baton's filler
    is heard counts too, as in the benchmark (``handover_start``).

    Measured on the shared 2-core development machine (server, baton, two livekit-agents workers
    with espeak-ng and the caller on it), 2026-11-21. With baton binaries built before 02:35 UTC:
    20, 20, 20 ms at load 1.2-3.5 and 40, 40, 0 ms at load 4-4.7. With the binary built at 02:56,
    after the filler rework (a3a2d48, 60 ms fade-in): 100, 30, 20 ms at load 1.3-2.5, one failure in
    three runs; ./scripts/bench handoff --agents (the same agents and window) had 4 of 20 handoffs
    over 60 ms (70-80 ms) at load 2-4.6. It is dead air at the switch, not a measuring artefact:
    triage's sound ends when the adapter sends ``handoff``, baton starts the filler only at
    ``quiet`` (a deactivate -> quiet round trip later, 7-66 ms) and the caller typically hears it
    15-20 ms after that. In the 100 ms run (quiet at 44 ms) the filler's first two 10 ms frames at
    the caller were also at -56 dBFS, under the threshold (the fade-in starts 6-10 dB under -45
    dBFS); in another run it dropped below the threshold for 40 ms about 1 s into the handoff
    (levels decaying like packet-loss concealment while the billing job started). The previous
    version of this docstring reports 80-130 ms at load 7-10 (not rerun). The limit stays 60 ms; the
    report prints the measured value every run.
    """
    report, output = run_demo(tmp_path)
    print(output)
    tl = report["timeline"]
    assert tl["outcome"] == "completed", tl
    assert tl["source"] == "triage" and tl["target"] == "billing", tl
    phases = [p["phase"] for p in tl["phases"]]
    for phase in REQUIRED_PHASES:
        assert phase in phases, (phase, phases)
    # The hint at the tool call brought billing in before the request: it was a standby in the
    # room (warm), or on its way there (the handoff waited for it instead of dispatching).
    on_its_way = any(
        p["phase"] == "target_dispatched" and "standby on its way" in str(p.get("detail")) for p in tl["phases"]
    )
    assert tl.get("warm") is True or on_its_way, tl

    first = report["billing_first"]
    for fact in FACTS:
        assert fact.lower() in first.lower(), f"billing's first sentence lacks {fact!r}: {first!r}"
    said = [x for x in report["transcript"] if x["who"] == "billing"]
    assert said and said[0]["text"] == first

    assert report["overlap_ms"] == 0, "triage and billing were heard at the same time"
    assert report["filler_heard_ms"] > 0, "nothing covered the handoff"
    assert report["silence_handoff_ms"] <= SILENCE_LIMIT_MS, (
        f"the caller heard {report['silence_handoff_ms']} ms of silence during the handoff"
    )
    assert 0 < report["bundle_bytes"] <= BUNDLE_LIMIT
    assert report["request_to_billing_audio_ms"] is not None
    assert report["request_to_billing_audio_ms"] <= REQUEST_TO_AUDIO_LIMIT_MS
    plot = Path(report["plot"])
    assert plot.exists() and plot.stat().st_size > 10_000
    for log in ("baton.log", "triage.log", "billing.log"):
        assert (tmp_path / log).exists()
