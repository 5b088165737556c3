"""The shared control-message vectors (tests/vectors/control/cases.json, format in the README
there) against the adapter's own codec; baton's Rust test reads the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lk_baton import MAX_MESSAGE_SIZE, ControlDecodeError, decode_control, encode_control

CASES = Path(__file__).resolve().parents[3] / "tests" / "vectors" / "control" / "cases.json"


def _cases() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(CASES.read_text(encoding="utf-8"))
    return doc


def _payload(case: dict[str, Any]) -> bytes:
    data = case["text"].encode("utf-8") if "text" in case else bytes.fromhex(case["hex"])
    pad = case.get("pad_to")
    return data + b" " * (pad - len(data)) if pad is not None else data


DECODE = _cases()["decode"]
ENCODE = _cases()["encode"]


def test_the_file_has_its_cases() -> None:
    assert len(DECODE) >= 30 and len(ENCODE) >= 10
    names = [c["name"] for c in DECODE] + [f"{c['by']}:{c['name']}" for c in ENCODE]
    assert len(names) == len(set(names)), "case names must be unique"
    sizes = {c["name"]: len(_payload(c)) for c in DECODE if "pad_to" in c}
    assert sizes == {
        "at_the_size_limit": MAX_MESSAGE_SIZE,
        "over_the_size_limit": MAX_MESSAGE_SIZE + 1,
    }


@pytest.mark.parametrize("case", DECODE, ids=[c["name"] for c in DECODE])
def test_decode(case: dict[str, Any]) -> None:
    data = _payload(case)
    if case["envelope"] == "ok":
        # The adapter checks the envelope; what baton refuses inside a sound one (an unknown
        # type, bad members) is for the adapter's caller to ignore.
        assert decode_control(data) == json.loads(data)
    else:
        with pytest.raises(ControlDecodeError) as err:
            decode_control(data)
        assert err.value.name == case["envelope"]


@pytest.mark.parametrize("case", ENCODE, ids=[f"{c['by']}:{c['name']}" for c in ENCODE])
def test_encode(case: dict[str, Any]) -> None:
    message = dict(case["message"])
    envelope: dict[str, Any] = {"v": 1, "type": message.pop("type"), "id": case["id"]}
    if case["re"] is not None:
        envelope["re"] = case["re"]
    if case.get("traceparent") is not None:
        envelope["traceparent"] = case["traceparent"]
    envelope |= message
    text = case["text"].encode("utf-8")
    if case["by"] == "agent":
        assert encode_control(envelope) == text
    else:
        # The adapter reads what baton writes.
        assert decode_control(text) == envelope
