"""lk_baton.checkpoint: the checkpoint tracker (base / delta, one in flight), the merge baton
applies, and the recovery bundle built from a merged state (docs/bundle.md, "Checkpoints",
"Recovery bundles"; issue 13)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from lk_baton import bundle as bd
from lk_baton.checkpoint import (
    BASE_EVERY,
    CheckpointError,
    CheckpointTracker,
    MergedState,
    canonical,
    journal_entry,
    merge_checkpoints,
    recovery_bundle,
)
from lk_baton.journal import ToolJournal

T0 = 1796049000.0


def msg(i: int, role: str = "user", text: str | None = None) -> dict[str, Any]:
    return {
        "id": f"item_{i}",
        "type": "message",
        "role": role,
        "content": [text or f"words {i}"],
        "interrupted": False,
        "extra": {},
        "created_at": T0 + i,
    }


def tracker(**kw: Any) -> CheckpointTracker:
    return CheckpointTracker("triage", item_id=lambda d: d["id"], item_dict=lambda d: dict(d), **kw)


def build(t: CheckpointTracker, items: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    args: dict[str, Any] = {"user_state": {}, "agent_state": {}, "journal": [], "now": T0}
    args.update(kw)
    raw = t.build(items, **args)
    if raw is None:
        return None
    assert raw == canonical(json.loads(raw)), "sent in canonical form"
    doc: dict[str, Any] = json.loads(raw)
    return doc


def test_first_is_a_base_then_deltas_carry_only_what_changed() -> None:
    t = tracker()
    items = [msg(0), msg(1, "assistant")]
    first = build(t, items, user_state={"account": "A-1"})
    assert first is not None
    assert first["base"] is True and first["seq"] == 0 and first["agent"] == "triage"
    assert first["schema"] == "baton.checkpoint/1"
    assert first["items"] == items and first["user_state"] == {"account": "A-1"}
    assert first["agent_state"] == {} and first["journal"] == []

    items.append(msg(2))
    assert build(t, items, user_state={"account": "A-1"}) is None, "one in flight at most"
    assert t.pending
    t.acked()
    assert t.acked_seq == 0
    delta = build(t, items, user_state={"account": "A-1"})
    assert delta is not None
    assert (delta["base"], delta["seq"], delta["items"]) == (False, 1, [msg(2)])
    assert "user_state" not in delta and "agent_state" not in delta
    t.acked()

    assert build(t, items, user_state={"account": "A-1"}) is None, "nothing changed"
    changed = build(t, items, user_state={"account": "A-1", "verified": True})
    assert changed is not None and changed["items"] == []
    assert changed["user_state"] == {"account": "A-1", "verified": True}


def test_a_failure_or_need_base_makes_the_next_one_a_base() -> None:
    t = tracker()
    items = [msg(0)]
    build(t, items)
    t.failed()
    items.append(msg(1))
    again = build(t, items)
    assert again is not None and again["base"] and again["items"] == items and again["seq"] == 1
    t.acked()
    t.need_base()  # activated, or reconnected
    assert (b := build(t, items)) is not None and b["base"] and b["seq"] == 2


def test_every_32nd_checkpoint_is_a_base() -> None:
    t = tracker()
    items: list[dict[str, Any]] = []
    bases = []
    for i in range(2 * BASE_EVERY + 1):
        items.append(msg(i))
        doc = build(t, items)
        assert doc is not None
        t.acked()
        if doc["base"]:
            bases.append(doc["seq"])
    assert bases == [0, BASE_EVERY, 2 * BASE_EVERY]


def test_removed_or_reordered_items_force_a_base() -> None:
    t = tracker()
    items = [msg(0), msg(1), msg(2)]
    build(t, items)
    t.acked()
    del items[1]
    doc = build(t, items)
    assert (
        doc is not None
        and doc["base"]
        and [i["id"] for i in doc["items"]]
        == [
            "item_0",
            "item_2",
        ]
    )
    t.acked()
    items.insert(1, msg(5))  # a new item before one already sent (a late function call)
    doc = build(t, items)
    assert doc is not None and doc["base"]


def test_a_recent_item_changed_in_place_is_sent_again() -> None:
    t = tracker()
    items = [msg(0), msg(1, "assistant")]
    build(t, items)
    t.acked()
    items[1]["interrupted"] = True  # the framework marks the reply interrupted after the fact
    doc = build(t, items)
    assert doc is not None and not doc["base"]
    assert doc["items"] == [items[1]] and doc["items"][0]["interrupted"] is True


def test_journal_entries_are_sent_when_they_change() -> None:
    j = ToolJournal(key_factory=lambda: "k-1")
    t = tracker()
    j.started("c1", "issue_refund", '{"order":"1234"}', now=T0, rerun="never")
    doc = build(t, [msg(0)], journal=[journal_entry(c) for c in j.calls()])
    assert doc is not None
    assert doc["journal"] == [
        {
            "call_id": "c1",
            "name": "issue_refund",
            "arguments": '{"order":"1234"}',
            "started_at": T0,
            "idempotency_key": "k-1",
            "rerun": "never",
            "status": "started",
            "note": None,
            "output": None,
        }
    ]
    t.acked()
    assert t.sent_journal() == doc["journal"]
    assert build(t, [msg(0)], journal=[journal_entry(c) for c in j.calls()]) is None
    j.finished("c1", "refunded", now=T0 + 2)
    doc = build(t, [msg(0)], journal=[journal_entry(c) for c in j.calls()])
    assert doc is not None and doc["items"] == []
    (e,) = doc["journal"]
    assert e["status"] == "finished"
    assert [x["status"] for x in t.sent_journal()] == ["finished"]
    assert e["output"] == {
        "id": "c1_journal_output",
        "type": "function_call_output",
        "call_id": "c1",
        "name": "issue_refund",
        "output": "refunded",
        "is_error": False,
        "created_at": T0 + 2,
    }


def test_a_chain_of_checkpoints_merges_into_the_agents_state() -> None:
    """Random edits (append, in-place change of the newest items, removals, state changes,
    lost acknowledgements): after every acknowledged checkpoint the merged state equals the
    agent's state item for item."""
    rng = random.Random(13)
    t = tracker()
    items: list[dict[str, Any]] = []
    user: dict[str, Any] = {}
    merged: MergedState | None = None
    n = 0
    for _ in range(400):
        r = rng.random()
        if r < 0.6 or not items:
            items.append(msg(n, rng.choice(["user", "assistant"])))
            n += 1
        elif r < 0.7:
            items[-1] = {**items[-1], "content": [f"edited {n}"]}
        elif r < 0.75:
            del items[rng.randrange(len(items))]
        else:
            user[f"k{rng.randrange(5)}"] = rng.randrange(100)
        raw = t.build(items, user_state=user, agent_state={}, journal=[], now=T0)
        if raw is None:
            continue
        if rng.random() < 0.1:
            t.failed()  # refused or lost: baton did not apply it
            continue
        merged = merge_checkpoints(merged, raw, sender="agent-triage", sender_agent="triage")
        t.acked()
        assert merged.items == items
        assert [json.loads(text) for _, text in t.sent_items()] == items
        assert merged.user_state == user
    assert merged is not None and merged.seq == t.seq - 1


def test_merge_refuses_what_baton_refuses() -> None:
    t = tracker()
    base = t.build([msg(0)], user_state={}, agent_state={}, journal=[], now=T0)
    assert base is not None
    t.acked()
    delta = t.build([msg(0), msg(1)], user_state={}, agent_state={}, journal=[], now=T0)
    assert delta is not None

    def reason(state: MergedState | None, payload: Any, **kw: Any) -> str:
        with pytest.raises(CheckpointError) as e:
            merge_checkpoints(state, payload, **kw)
        return e.value.reason

    assert reason(None, delta) == "no_base"
    held = merge_checkpoints(None, base, sender="agent-triage")
    assert reason(held, delta, sender="someone-else") == "out_of_sequence"
    assert reason(held, {**json.loads(delta), "seq": 5}) == "out_of_sequence"
    assert reason(held, delta, sender_agent="billing") == "wrong_agent"
    assert reason(held, b"{not json") == "bad_checkpoint"
    assert reason(held, {**json.loads(delta), "schema": "baton.checkpoint/2"}) == "bad_checkpoint"
    assert reason(held, {**json.loads(delta), "items": {}}) == "bad_checkpoint"
    assert reason(held, {**json.loads(delta), "seq": True}) == "bad_checkpoint"
    ok = merge_checkpoints(held, delta, sender="agent-triage")
    assert [i["id"] for i in ok.items] == ["item_0", "item_1"] and held.items == [msg(0)]


def test_recovery_bundle_has_every_call_exactly_once() -> None:
    j = ToolJournal(key_factory=lambda: "key-1")
    call_items = [
        msg(0),
        {
            "id": "fc_1",
            "type": "function_call",
            "call_id": "c1",
            "name": "lookup",
            "arguments": "{}",
            "extra": {},
            "created_at": T0 + 1,
        },
        {
            "id": "fco_1",
            "type": "function_call_output",
            "call_id": "c1",
            "name": "lookup",
            "output": "found",
            "is_error": False,
            "created_at": T0 + 2,
        },
    ]
    j.started("c1", "lookup", "{}", now=T0 + 1, rerun="safe")
    j.finished("c1", "found", now=T0 + 2)
    j.started("c2", "save_note", '{"text":"x"}', now=T0 + 3)
    j.finished("c2", "saved", now=T0 + 4)  # finished, not yet committed to the chat
    j.started("c3", "issue_refund", '{"order":"1234"}', now=T0 + 5, rerun="never")
    t = tracker()
    raw = t.build(
        call_items,
        user_state={"account": "A-1"},
        agent_state={"outcome": "x"},
        journal=[journal_entry(c) for c in j.calls()],
        now=T0 + 6,
    )
    assert raw is not None
    state = merge_checkpoints(None, raw)
    b = recovery_bundle(state, reason="recovery after job_failed", recovery_id="r-1", now=T0 + 7)
    assert bd.validate_bundle(json.loads(bd.encode_bundle(b))) == b
    assert b["cause"] == "recovery" and b["reason"] == "recovery after job_failed"
    assert (b["from_agent"], b["to_agent"], b["handoff_id"]) == ("triage", "triage", "r-1")
    outs = [i["call_id"] for i in b["chat"]["items"] if i["type"] == "function_call_output"]
    assert sorted(outs) == ["c1", "c2"], "a finished result is there exactly once"
    assert [
        (e["call_id"], e["idempotency_key"], e["rerun"]) for e in b["tool_calls_in_flight"]
    ] == [("c3", "key-1", "never")]
    assert b["user_state"] == {"account": "A-1"} and b["agent_state"] == {"outcome": "x"}


VECTORS = Path(__file__).resolve().parents[3] / "tests" / "vectors" / "checkpoint"


@pytest.mark.skipif(
    not (VECTORS / "cases.json").exists(), reason="baton's checkpoint vectors are not in this tree"
)
def test_python_merge_builds_batons_recovery_bundle_byte_for_byte() -> None:
    """The chain of tests/vectors/checkpoint/cases.json (written by baton's merge,
    tests/checkpoint_vectors.rs) merged here gives the recovery bundle baton built from it,
    byte for byte (bundle.json)."""
    cases = json.loads((VECTORS / "cases.json").read_text())
    state: MergedState | None = None
    for step in cases["chain"]:
        state = merge_checkpoints(
            state, step["payload"], sender=step["identity"], sender_agent=step["agent_name"]
        )
    assert state is not None
    b = recovery_bundle(
        state, reason=cases["reason"], recovery_id=cases["handoff_id"], now=cases["created_at"]
    )
    assert bd.encode_bundle(b) == (VECTORS / "bundle.json").read_bytes()
