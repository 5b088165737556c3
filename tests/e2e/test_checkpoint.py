"""Checkpoints against a real LiveKit server (issue 13; docs/protocol.md, "Checkpoints, heartbeats
and recovery"): baton with agents configured, a caller, triage holding the floor and billing on
standby (protocol-speaking tone agents, real SDK participants). Their checkpoints are built by the
adapter's own :class:`lk_baton.checkpoint.CheckpointTracker` and sent with ``send_bundle``, the
transport ``BatonLink`` uses; the test reports each outcome to the tracker as ``BatonLink`` does
(``acked`` on COMPLETE, ``failed`` on any error), so a refusal is followed by a base.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest
from harness import LiveKitServer, config_file, free_port, joined_baton, run
from lk_baton import ErrorCode, TransferError, send_bundle
from lk_baton import checkpoint as cp
from test_handoff import CONFIG, caller_triage_and_standby_billing
from test_observe import scrape, value

APPLIED = re.compile(r"checkpoint applied.*agent=(\w+) seq=(\d+)")


def message(n: int) -> dict[str, Any]:
    return {
        "id": f"item_{n}",
        "type": "message",
        "role": "user" if n % 2 else "assistant",
        "content": [f"turn {n}"],
        "interrupted": False,
        "extra": {},
        "created_at": 1796049000.0 + n,
    }


def tracker(agent: str) -> cp.CheckpointTracker:
    return cp.CheckpointTracker(agent, item_id=lambda d: str(d["id"]), item_dict=dict)


def build(t: cp.CheckpointTracker, items: list[dict[str, Any]]) -> tuple[bytes, dict[str, Any]]:
    payload = t.build(items, user_state={"account": "A-1001"}, agent_state={}, journal=[], now=time.time())
    assert payload is not None, "something changed, so there is a checkpoint to send"
    return payload, json.loads(payload)


def test_checkpoints_are_acknowledged_and_an_out_of_sequence_one_is_refused_then_a_base_follows(
    server: LiveKitServer,
) -> None:
    room = f"c-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with joined_baton(server, room, "--config", config_file(CONFIG), "--http", f"127.0.0.1:{port}") as baton:

        async def scenario() -> None:
            caller, a, b = await caller_triage_and_standby_billing(server, room)
            # billing is on standby: baton refuses its bundles (test_handoff), not its checkpoints.
            t = tracker("billing")
            items = [message(0), message(1)]
            for n in (2, 3):
                payload, doc = build(t, items)
                await send_bundle(b.room, b.baton, payload, cp.META, deadline=10)  # COMPLETE: applied
                t.acked()
                items.append(message(n))
            assert t.acked_seq == 1 and t.bases == 1

            # A checkpoint lost on the way (seq 2 never sent): baton refuses seq 3.
            t.seq += 1
            payload, doc = build(t, items)
            assert (doc["seq"], doc["base"]) == (3, False)
            with pytest.raises(TransferError) as refused:
                await send_bundle(b.room, b.baton, payload, cp.META, deadline=10)
            err = refused.value
            assert err.code == ErrorCode.CHECKPOINT_REJECTED and err.remote, err
            assert err.reason.startswith("out_of_sequence: expected seq 2, got 3"), err.reason
            t.failed()

            # The next one is a base, and it is applied.
            items.append(message(5))
            payload, doc = build(t, items)
            assert (doc["seq"], doc["base"], len(doc["items"])) == (4, True, 5)
            await send_bundle(b.room, b.baton, payload, cp.META, deadline=10)
            t.acked()

            # The floor holder checkpoints too; a payload naming another agent is refused.
            ta = tracker("triage")
            payload, _ = build(ta, [message(0)])
            await send_bundle(a.room, a.baton, payload, cp.META, deadline=10)
            ta.acked()
            wrong = tracker("billing")
            payload, _ = build(wrong, [message(0)])
            with pytest.raises(TransferError) as impostor:
                await send_bundle(a.room, a.baton, payload, cp.META, deadline=10)
            assert impostor.value.code == ErrorCode.CHECKPOINT_REJECTED, impostor.value
            assert impostor.value.reason.startswith("wrong_agent"), impostor.value.reason
            for x in (a, b):
                await x.close()
            await caller.close()

        run(scenario())
        metrics = scrape(port)
        applied = [ln for _, ln in baton.lines if "checkpoint applied" in ln]
        by_agent = [(m.group(1), m.group(2)) for ln in applied if (m := APPLIED.search(ln))]
        assert by_agent == [("billing", "0"), ("billing", "1"), ("billing", "4"), ("triage", "0")], baton.text()
        refused_lines = [ln for _, ln in baton.lines if "checkpoint not applied" in ln]
        assert len(refused_lines) == 2, baton.text()
        assert "out_of_sequence" in refused_lines[0] and "wrong_agent" in refused_lines[1], refused_lines
        # Nothing of it went into the bundle store.
        assert "bundle received and stored" not in baton.text(), baton.text()
        # The metrics count the same: four applied (their payload sizes observed), two refused.
        assert value(metrics, "baton_checkpoints_total", outcome="applied") == 4, metrics
        assert value(metrics, "baton_checkpoints_total", outcome="rejected") == 2
        assert value(metrics, "baton_checkpoint_bytes_count") == 4
        assert (value(metrics, "baton_checkpoint_bytes_sum") or 0) > 4 * 100
        assert value(metrics, "baton_checkpoint_state_bytes_count") == 4
