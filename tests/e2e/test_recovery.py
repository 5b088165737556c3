"""Recovery end to end (issue 13): a real LiveKit server, ``baton worker`` with the repository's
configuration, the support desk's triage worker (livekit-agents, its jobs in their own processes)
and a caller typing to it. Mid-conversation the triage job's process is killed with SIGKILL; the
caller must hear baton's filler, then a replacement triage that refers to what the caller said
before the crash, and whose chat context holds the last checkpoint item for item. The flow is
``crashes.converse_then_kill`` (shared with ``bench/recovery.py``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from crashes import SECOND, context_equal, converse_then_kill, demo, last_match, recovered_items
from harness import ROOT, LiveKitServer, Process, baton_worker, run

CONFIG = ROOT / "configs" / "baton.toml"


def desk_triage(server: LiveKitServer, monkeypatch: pytest.MonkeyPatch) -> Process:
    monkeypatch.setenv("DESK_JOB_EXECUTOR", "process")
    monkeypatch.setenv("DESK_REPORT_CHECKPOINTS", "1")
    return demo.agent_worker(server, "triage.py")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("standby", [False, True], ids=["dispatched", "standby"])
def test_sigkill_of_the_triage_job_mid_call_is_replaced_from_its_checkpoint(
    server: LiveKitServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, standby: bool
) -> None:
    baton = baton_worker(server, "--config", str(CONFIG))
    triage = desk_triage(server, monkeypatch)
    room = f"recovery-{uuid.uuid4().hex[:6]}"
    try:
        baton.wait_for(r"worker registered", 30)
        triage.wait_for(r"^triage: registered", 60)
        crash = run(converse_then_kill(server, room, triage, standby=standby), timeout=150)
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
