"""Context bundle: builder, validator, and agreement with docs/bundle.schema.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from lk_baton.bundle import (
    BundleError,
    build_bundle,
    decode_bundle,
    encode_bundle,
    problems,
)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "docs" / "bundle.schema.json"

CHAT = {
    "items": [
        {
            "id": "item_sys",
            "type": "message",
            "role": "system",
            "content": ["You are the triage agent."],
            "interrupted": False,
            "extra": {},
            "metrics": {},
            "created_at": 1795215800.0,
        },
        {
            "id": "item_u1",
            "type": "message",
            "role": "user",
            "content": ["I need to change my booking"],
            "interrupted": False,
            "extra": {},
            "metrics": {},
            "created_at": 1795215801.2498,
        },
        {
            "id": "item_fc1",
            "type": "function_call",
            "call_id": "call_1",
            "arguments": '{"booking":"B42"}',
            "name": "cancel_booking",
            "extra": {},
            "created_at": 1795215802.0,
        },
        {
            "id": "item_h1",
            "type": "agent_handoff",
            "old_agent_id": "triage_agent",
            "new_agent_id": "booking_agent",
            "created_at": 1795215803.0,
        },
    ]
}


def sample(**over: Any) -> Any:
    args: dict[str, Any] = dict(
        from_agent="triage",
        to_agent="booking",
        reason="caller wants to change a booking",
        chat=CHAT,
        tool_calls_in_flight=[
            {
                "call_id": "call_1",
                "name": "cancel_booking",
                "arguments": '{"booking":"B42"}',
                "started_at": 1795215802.0,
                "idempotency_key": "cancel-B42-7f3",
                "rerun": "never",
                "note": "may already be cancelled; check before retrying",
            }
        ],
        user_state={"verified": True, "account": "A-1001", "workflow": {"step": 3}},
        agent_state={
            "attempts": [{"action": "looked up booking", "outcome": "found B42"}],
            "outcome": "needs booking specialist",
        },
        handoff_id="h-17",
        created_at=1795215804.5,
    )
    args.update(over)
    return build_bundle(**args)


def test_build_summarises_and_round_trips() -> None:
    b = sample()
    assert b["schema"] == "baton.bundle/1"
    assert b["summary"]["counts"] == {
        "message": 2,
        "function_call": 1,
        "function_call_output": 0,
        "agent_handoff": 1,
        "agent_config_update": 0,
        "items": 4,
        "tool_calls_in_flight": 1,
    }
    raw = encode_bundle(b)
    assert decode_bundle(raw) == b


def test_tampering_is_detected_by_summary() -> None:
    b = sample()
    b2 = copy.deepcopy(b)
    b2["user_state"]["account"] = "A-9999"
    with pytest.raises(BundleError) as e:
        decode_bundle(json.dumps(b2).encode())
    assert "changed after building" in str(e.value)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.update(schema="baton.bundle/2"), "schema must be"),
        (lambda b: b["chat"]["items"][1].pop("created_at"), "exclude_timestamp=False"),
        (lambda b: b["chat"]["items"][0].update(role="robot"), "role"),
        (lambda b: b["tool_calls_in_flight"][0].update(rerun="maybe"), "rerun"),
        (lambda b: b["tool_calls_in_flight"][0].pop("idempotency_key"), "idempotency_key"),
        (lambda b: b.update(user_state=[]), "user_state"),
        (lambda b: b.update(from_agent=""), "from_agent"),
    ],
)
def test_invalid_documents_are_explained(mutate: Any, needle: str) -> None:
    b = copy.deepcopy(sample())
    mutate(b)
    found = problems(b, check_summary=False)
    assert any(needle in p for p in found), found


def test_not_json_is_a_bundle_error() -> None:
    with pytest.raises(BundleError):
        decode_bundle(b"\xff not json")


def test_json_schema_agrees_with_validator() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    good = sample()
    assert list(v.iter_errors(good)) == []
    for mutate in (
        lambda b: b.update(schema="baton.bundle/2"),
        lambda b: b["chat"]["items"][1].pop("created_at"),
        lambda b: b["chat"]["items"][0].update(role="robot"),
        lambda b: b["tool_calls_in_flight"][0].update(rerun="maybe"),
        lambda b: b.update(user_state=[]),
        lambda b: b["summary"].update(sha256="xyz"),
    ):
        bad = copy.deepcopy(good)
        mutate(bad)
        assert list(v.iter_errors(bad)), "schema accepts what the validator rejects"
        assert problems(bad, check_summary=False), "validator accepts what the schema rejects"


def test_real_livekit_agents_chat_context_validates() -> None:
    llm = pytest.importorskip("livekit.agents.llm")
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content="You are triage.")
    ctx.add_message(role="user", content="My card was charged twice")
    ctx.insert(llm.FunctionCall(call_id="c1", name="lookup_charge", arguments="{}"))
    ctx.insert(
        llm.FunctionCallOutput(
            call_id="c1", name="lookup_charge", output="2 charges", is_error=False
        )
    )
    ctx.insert(llm.AgentHandoff(old_agent_id="triage", new_agent_id="billing"))
    chat = ctx.to_dict(exclude_timestamp=False)
    b = build_bundle(from_agent="triage", to_agent="billing", reason="billing question", chat=chat)
    assert b["summary"]["counts"]["function_call_output"] == 1
    # And the pitfall the validator exists for:
    with pytest.raises(BundleError) as e:
        build_bundle(from_agent="triage", to_agent="billing", reason="x", chat=ctx.to_dict())
    assert "exclude_timestamp=False" in str(e.value)
