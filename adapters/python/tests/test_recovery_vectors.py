"""The recovery bundle baton builds from the shared checkpoint vector
(``tests/vectors/checkpoint/bundle.json``, made by ``tests/checkpoint_vectors.rs``) is a valid
``baton.bundle/1`` by ``lk_baton.bundle``: the summary recomputed here over Python's canonical
encoding equals baton's, and baton's bytes are that canonical encoding."""

from __future__ import annotations

import json
from pathlib import Path

from lk_baton import bundle as bd

VECTORS = Path(__file__).resolve().parents[3] / "tests" / "vectors" / "checkpoint"


def test_rust_recovery_bundle_is_valid_and_canonical_in_python() -> None:
    raw = (VECTORS / "bundle.json").read_bytes()
    doc = bd.decode_bundle(raw)
    assert bd.encode_bundle(doc) == raw
    assert doc["summary"]["counts"]["tool_calls_in_flight"] == 1
    cases = json.loads((VECTORS / "cases.json").read_text())
    sent = [i["id"] for step in cases["chain"] for i in step["payload"]["items"]]
    got = [i["id"] for i in doc["chat"]["items"]]
    assert got[: len(sent)] == list(dict.fromkeys(sent))
