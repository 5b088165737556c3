"""Recovery end to end (issue 13): a real LiveKit server, ``baton worker`` with the repository's
configuration, the support desk's workers (livekit-agents, their jobs in their own processes)
and a caller typing to them; real processes get SIGKILL.

* Mid-conversation the triage job's process is killed: the caller must hear baton's filler, then
  a replacement triage that refers to what the caller said before the crash, and whose chat
  context holds the last checkpoint item for item.
* Killed while its ``rerun = never`` tool (``book_technician``) runs: the replacement knows the
  call as unfinished (outcome unknown, its idempotency key) and does not run it again.
* billing, a handoff's target, killed while it holds the bundle and before it is ready: another
  billing gets the same bundle and speaks with what only triage heard.
* triage's job and its whole worker killed: nothing can take the call; the filler covers the
  attempts, then fades; baton alerts ``recovery_failed`` and lives on.

The flows are ``crashes.converse_then_kill`` (shared with ``bench/recovery.py``) and
``crashes.handoff_then_kill_target``.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from crashes import (
    AUDIBLE,
    SECOND,
    context_equal,
    converse_then_kill,
    demo,
    first_audible,
    handoff_then_kill_target,
    last_match,
    recovered_items,
)
from harness import ROOT, Baton, LiveKitServer, Process, baton_worker, free_port, run
from test_observe import scrape, value

CONFIG = ROOT / "configs" / "baton.toml"


def desk_triage(server: LiveKitServer, monkeypatch: pytest.MonkeyPatch) -> Process:
    monkeypatch.setenv("DESK_JOB_EXECUTOR", "process")
    monkeypatch.setenv("DESK_REPORT_CHECKPOINTS", "1")
    return demo.agent_worker(server, "triage.py")


def baton_and_triage(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, config: Path = CONFIG, *args: str
) -> tuple[Baton, Process]:
    """``baton worker --config config [args]`` and the desk's triage worker, both registered."""
    baton = baton_worker(server, "--config", str(config), *args)
    triage = desk_triage(server, monkeypatch)
    try:
        baton.wait_for(r"worker registered", 30)
        triage.wait_for(r"^triage: registered", 60)
    except BaseException:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        raise
    return baton, triage


@pytest.mark.timeout(180)
@pytest.mark.parametrize("standby", [False, True], ids=["dispatched", "standby"])
def test_sigkill_of_the_triage_job_mid_call_is_replaced_from_its_checkpoint(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, standby: bool
) -> None:
    port = free_port()
    baton, triage = baton_and_triage(server, monkeypatch, CONFIG, "--http", f"127.0.0.1:{port}")
    room = f"recovery-{uuid.uuid4().hex[:6]}"
    try:
        crash = run(converse_then_kill(server, room, triage, standby=standby), timeout=150)
        baton.wait_for(r'"kind":"recovery".*"outcome":"completed"|"outcome":"completed".*"kind":"recovery"', 15)
        metrics = scrape(port)
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        (tmp_path / "triage.log").write_text(triage.text())
        (tmp_path / "baton.log").write_text(baton.text())
    log = f"\ntriage:\n{triage.text()[-4000:]}\nbaton:\n{baton.text()[-4000:]}"
    assert crash.greeting is not None, "no replacement said the call was cut off" + log

    # The caller heard baton's filler between the kill and the replacement's first words.
    to_filler, to_voice = crash.kill_to_filler(), crash.kill_to_replacement()
    assert to_filler is not None and to_filler < crash.greeting.at - crash.t_kill, log
    print(f"kill -> filler {1000 * to_filler:.0f} ms, kill -> replacement audible {to_voice} s")

    # The replacement refers to what the caller said before the crash.
    assert SECOND.rstrip(".") in crash.greeting.text and "Ada" in crash.greeting.text, crash.greeting.text

    # Its context holds the last acknowledged checkpoint item for item (ids, order, content).
    recovered = last_match(triage, rf"triage: joined room={room} identity=(\S+) pid=(\d+)")
    assert recovered is not None and int(recovered.group(2)) != crash.old_pid, log
    assert len(crash.acked_items) >= 6, crash.acked_items  # instructions, greeting, two turns, the lookup
    assert context_equal(recovered_items(triage), crash.acked_items), log

    # baton saw the crash through the job status (or the heartbeat's silence), removed the dead
    # participant and recorded the recovery's timeline.
    assert "agent crashed; replacing it from its last checkpoint" in baton.text(), log
    assert '"kind":"recovery"' in baton.text() and '"outcome":"completed"' in baton.text(), log
    # /metrics counts it as a recovery (not a handoff), with the checkpoints it was made from.
    assert value(metrics, "baton_recoveries_total", agent="triage", outcome="completed") == 1, metrics
    assert value(metrics, "baton_recovery_last_heartbeat_to_audible_seconds_count") == 1
    assert not [k for k in metrics if k[0] == "baton_handoffs_total"]
    assert (value(metrics, "baton_checkpoints_total", outcome="applied") or 0) >= 2
    assert (value(metrics, "baton_bundle_delivered_bytes_total") or 0) > 0


def keep_logs(tmp_path: Path, **procs: Baton) -> str:
    """Write each process's output to ``tmp_path/<name>.log``; their tails, for assertion messages."""
    tails = []
    for name, proc in procs.items():
        (tmp_path / f"{name}.log").write_text(proc.text())
        tails.append(f"\n{name}:\n{proc.text()[-4000:]}")
    return "".join(tails)


TECHNICIAN = "Please send a technician."


@pytest.mark.timeout(180)
def test_sigkill_while_a_rerun_never_tool_runs_leaves_it_unfinished_and_not_run_again(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DESK_TECHNICIAN_SECONDS", "30")  # the booking outlives the kill
    baton, triage = baton_and_triage(server, monkeypatch)
    room = f"recovery-tool-{uuid.uuid4().hex[:6]}"
    try:
        flow = converse_then_kill(
            server,
            room,
            triage,
            second=TECHNICIAN,
            tool="book_technician",
            then_say=TECHNICIAN,
            then_expect="confirm|tomorrow",
        )
        crash = run(flow, timeout=150)
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        log = keep_logs(tmp_path, triage=triage, baton=baton)
    assert crash.greeting is not None, "no replacement said the call was cut off" + log
    to_filler, to_voice = crash.kill_to_filler(), crash.kill_to_replacement()
    assert to_filler is not None and to_filler < crash.greeting.at - crash.t_kill, log
    print(f"kill -> filler {1000 * to_filler:.0f} ms, kill -> replacement audible {to_voice} s")

    # The booking started once, in the killed process; the replacement did not start it again,
    # not even when the caller asked again.
    started = re.findall(r"^triage: book_technician started pid=(\d+) key=(\w+)$", triage.text(), re.M)
    assert [int(pid) for pid, _ in started] == [crash.old_pid], started
    key = started[0][1]
    joined = last_match(triage, rf"triage: joined room={room} identity=(\S+) pid=(\d+)")
    assert joined is not None and int(joined.group(2)) != crash.old_pid, log

    # The replacement's context holds the call as unfinished: the in-flight output (outcome
    # unknown, cut off, check before retrying) with the booking's idempotency key.
    outputs = last_match(triage, r"triage: recovered outputs=(.*)$")
    assert outputs is not None, log
    booking = [out for name, out in json.loads(outputs.group(1)) if name == "book_technician"]
    assert len(booking) == 1, booking
    assert "outcome unknown" in booking[0] and "cut off" in booking[0] and key in booking[0], booking[0]

    # Asked again, the replacement's model was told not to run it (the adapter's guard) and said so.
    after = [x.text for x in crash.transcript if x.who == crash.replacement and x is not crash.greeting]
    assert any("not book a second" in text for text in after), after


@pytest.mark.timeout(180)
def test_sigkill_of_billing_receiving_the_bundle_hands_the_same_bundle_to_another_billing(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DESK_BILLING_READY_DELAY", "2")  # billing holds the bundle 2 s before ready
    # A cold handoff asked after triage's sentence, no hint at the tool call: billing is
    # dispatched for the handoff and receives the bundle through the entrypoint that
    # READY_DELAY holds up.
    monkeypatch.setenv("DESK_TOOL_HINT", "0")
    monkeypatch.setenv("DESK_EARLY_REQUEST", "0")
    baton, triage = baton_and_triage(server, monkeypatch)
    billing = demo.agent_worker(server, "billing.py")
    room = f"recovery-target-{uuid.uuid4().hex[:6]}"
    try:
        billing.wait_for(r"^billing: registered", 60)
        crash = run(handoff_then_kill_target(server, room, billing), timeout=150)
    finally:
        demo._stop_group("triage", triage.proc)
        demo._stop_group("billing", billing.proc)
        baton.stop()
        log = keep_logs(tmp_path, triage=triage, billing=billing, baton=baton)
    assert crash.greeting is not None, "no other billing spoke after the kill" + log

    # The replacement speaks with what only triage heard: the bundle reached it.
    for fact in demo.FACTS:
        assert fact.lower() in crash.greeting.text.lower(), (fact, crash.greeting.text)
    assert first_audible(crash.played.get(crash.old_identity, []), 0) is None, "the killed billing was heard"

    # The filler went on from the kill until the replacement was heard: no dead air.
    to_voice = crash.kill_to_replacement()
    assert to_voice is not None, log
    t_voice = crash.t_kill + to_voice
    filler = first_audible(crash.played.get(crash.baton or "", []), crash.t_kill, t_voice)
    silence = crash.longest_silence(t_voice)
    assert filler is not None and silence < 0.5, f"{silence:.2f} s of silence between the kill and billing" + log
    print(f"kill -> filler {1000 * (filler - crash.t_kill):.0f} ms, kill -> replacement audible {to_voice:.2f} s")

    # baton saw the target crash and took a second billing for the same handoff.
    # (The handoff's timeline, not a recovery's: a heartbeat late on a busy machine may open and
    # clear one before the handoff.)
    timeline = json.loads(baton.wait_for(r'^\{"handoff":"[^"]*","kind":"handoff".*"outcome":', 1)[1])
    assert timeline["outcome"] == "completed", timeline
    phases = [(p["phase"], p.get("detail", "")) for p in timeline["phases"]]
    # The target was lost whichever way baton saw it first: its worker removed the dead job's
    # participant (a leave, then rejoin_grace = 3 s), its heartbeats stopped (crash_confirm_after
    # = 3 s: "crashed: heartbeat"; the two race), or the server said its job ended ("crashed:
    # job_ended:..."). Then another billing (not the alternate, not a handback) got the same bundle.
    left = [detail for ph, detail in phases if ph == "target_left"]
    assert len(left) == 1 and (left[0] == "" or left[0].startswith("crashed: ")), str(phases)
    assert ("alternate_tried", "billing") in phases, str(phases)
    assert [ph for ph, _ in phases].count("target_joined") == 2, str(phases)
    prepared = re.findall(r"^billing: prepared room=\S+ identity=(\S+) pid=(\d+)$", billing.text(), re.M)
    assert len(prepared) == 2 and prepared[0][1] != prepared[1][1], prepared


@pytest.mark.timeout(180)
def test_nothing_can_take_the_call_the_filler_covers_then_fades_and_baton_alerts(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = CONFIG.read_text()
    config = re.sub(r"(?m)^recovery_timeout = .*$", "recovery_timeout = 2", config)
    (tmp_path / "baton.toml").write_text(config)
    baton, triage = baton_and_triage(server, monkeypatch, tmp_path / "baton.toml")
    room = f"recovery-none-{uuid.uuid4().hex[:6]}"
    wait = 15.0
    try:
        crash = run(converse_then_kill(server, room, triage, kill_worker=True, wait=wait), timeout=150)
        baton.wait_for(rf"room={room}.*session over; leaving|session over; leaving.*room={room}", 15)
        alive = baton.proc.poll() is None
    finally:
        demo._stop_group("triage", triage.proc)
        baton.stop()
        log = keep_logs(tmp_path, triage=triage, baton=baton)
    assert crash.greeting is None, f"someone took the call: {crash.greeting}"
    assert alive and "panicked" not in baton.text(), log

    # baton gave up: the alert and a failed recovery timeline.
    t_failed, _ = baton.wait_for(r'"alert":"recovery_failed"', 1)
    timeline = json.loads(baton.wait_for(r'^\{"handoff":.*"kind":"recovery".*"outcome":"failed"', 1)[1])
    assert timeline["source"] == "triage", timeline
    phases = [(p["phase"], p.get("detail")) for p in timeline["phases"]]
    assert ("target_dispatched", "triage") in phases and ("target_joined", "warm") not in phases, str(phases)

    # The caller heard the filler from the kill until baton gave up, then it faded.
    filler = crash.played.get(crash.baton or "", [])
    to_filler = crash.kill_to_filler()
    assert to_filler is not None, "no filler after the kill" + log
    heard = [t for t, level in filler if level > AUDIBLE]
    last = heard[-1] if heard else None
    assert last is not None and last > t_failed - 0.3, (last, t_failed)
    assert last < crash.t_kill + wait - 2.0, (
        f"the filler never faded (last heard {last - crash.t_kill:.1f} s after the kill)"
    )
    heard_to, failed_at = last - crash.t_kill, t_failed - crash.t_kill
    print(f"kill -> filler {1000 * to_filler:.0f} ms, filler heard to {heard_to:.1f} s, failed at {failed_at:.1f} s")
