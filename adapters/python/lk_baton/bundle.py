"""The context bundle (docs/bundle.md, docs/bundle.schema.json): build, validate, encode.

No livekit-agents import: pass ``chat_ctx.to_dict(exclude_timestamp=False)`` as ``chat``.
The validator is hand-written (no jsonschema dependency at runtime) and mirrors the JSON Schema;
the tests check both agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from typing import Any, Literal, NotRequired, TypedDict

SCHEMA = "baton.bundle/1"
CHAT_ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "agent_handoff",
    "agent_config_update",
)
RERUN = ("never", "if_idempotent", "safe")


class ToolCallInFlight(TypedDict):
    call_id: str
    name: str
    arguments: str
    started_at: float
    idempotency_key: str
    rerun: Literal["never", "if_idempotent", "safe"]
    note: NotRequired[str]


class Attempt(TypedDict):
    action: str
    outcome: NotRequired[str]
    at: NotRequired[float]


class AgentState(TypedDict, total=False):
    attempts: list[Attempt]
    outcome: str
    data: dict[str, Any]


class Summary(TypedDict):
    size: int
    sha256: str
    counts: dict[str, int]


class Bundle(TypedDict):
    schema: str
    handoff_id: NotRequired[str]
    cause: NotRequired[Literal["handoff", "recovery"]]
    from_agent: str
    to_agent: str
    reason: str
    created_at: float
    chat: dict[str, Any]
    tool_calls_in_flight: list[ToolCallInFlight]
    user_state: dict[str, Any]
    agent_state: AgentState
    summary: Summary


class BundleError(ValueError):
    """The document is not a valid bundle; ``problems`` lists every violation found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid context bundle: " + "; ".join(problems))
        self.problems = problems


def canonical(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): what ``summary`` is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _summary(body: dict[str, Any]) -> Summary:
    raw = canonical(body)
    items = body.get("chat", {}).get("items", [])
    counts = Counter(i.get("type", "?") for i in items if isinstance(i, dict))
    c: dict[str, int] = {t: counts.get(t, 0) for t in CHAT_ITEM_TYPES}
    c["items"] = len(items)
    c["tool_calls_in_flight"] = len(body.get("tool_calls_in_flight", []))
    return {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "counts": c}


def build_bundle(
    *,
    from_agent: str,
    to_agent: str,
    reason: str,
    chat: dict[str, Any],
    tool_calls_in_flight: list[ToolCallInFlight] | None = None,
    user_state: dict[str, Any] | None = None,
    agent_state: AgentState | None = None,
    handoff_id: str | None = None,
    created_at: float | None = None,
    cause: Literal["handoff", "recovery"] | None = None,
) -> Bundle:
    """Assemble, summarise and validate a bundle. Raises :class:`BundleError` if invalid.
    ``cause``: ``recovery`` for the bundle of a crashed agent's replacement (docs/bundle.md);
    absent means a handoff."""
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "from_agent": from_agent,
        "to_agent": to_agent,
        "reason": reason,
        "created_at": time.time() if created_at is None else created_at,
        "chat": chat,
        "tool_calls_in_flight": list(tool_calls_in_flight or []),
        "user_state": dict(user_state or {}),
        "agent_state": dict(agent_state or {}),
    }
    if handoff_id is not None:
        body["handoff_id"] = handoff_id
    if cause is not None:
        body["cause"] = cause
    body["summary"] = _summary(body)
    bundle: Bundle = body  # type: ignore[assignment]
    validate_bundle(bundle)
    return bundle


def _epoch(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _str(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, str) and len(v) >= lo and (hi is None or len(v) <= hi)


def problems(doc: Any, *, check_summary: bool = True) -> list[str]:
    """Every way ``doc`` violates the schema (empty list: valid)."""
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["bundle is not a JSON object"]
    if doc.get("schema") != SCHEMA:
        p.append(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
        return p
    for k, lo, hi in (("from_agent", 1, 128), ("to_agent", 1, 128), ("reason", 0, 4096)):
        if not _str(doc.get(k), lo, hi):
            p.append(f"{k} must be a string of {lo}..{hi} characters")
    if "handoff_id" in doc and not _str(doc["handoff_id"], 1, 64):
        p.append("handoff_id must be a string of 1..64 characters")
    if "cause" in doc and doc["cause"] not in ("handoff", "recovery"):
        p.append("cause must be 'handoff' or 'recovery'")
    if not _epoch(doc.get("created_at")):
        p.append("created_at must be epoch seconds (a non-negative number)")
    chat = doc.get("chat")
    if not isinstance(chat, dict) or not isinstance(chat.get("items"), list):
        p.append("chat must be an object with an items array (ChatContext.to_dict output)")
    else:
        for n, it in enumerate(chat["items"]):
            where = f"chat.items[{n}]"
            if not isinstance(it, dict):
                p.append(f"{where} is not an object")
                continue
            t = it.get("type")
            if t not in CHAT_ITEM_TYPES:
                p.append(f"{where}.type {t!r} is not one of {', '.join(CHAT_ITEM_TYPES)}")
            if not isinstance(it.get("id"), str):
                p.append(f"{where}.id must be a string")
            if not _epoch(it.get("created_at")):
                p.append(
                    f"{where}.created_at missing: serialise with "
                    "ChatContext.to_dict(exclude_timestamp=False)"
                )
            if t == "message":
                if it.get("role") not in ("developer", "system", "user", "assistant"):
                    p.append(f"{where}.role must be developer, system, user or assistant")
                if not isinstance(it.get("content"), list):
                    p.append(f"{where}.content must be an array")
            elif t == "function_call":
                for k in ("call_id", "name", "arguments"):
                    if not isinstance(it.get(k), str):
                        p.append(f"{where}.{k} must be a string")
            elif t == "function_call_output":
                for k in ("call_id", "output"):
                    if not isinstance(it.get(k), str):
                        p.append(f"{where}.{k} must be a string")
                if "is_error" in it and not isinstance(it["is_error"], bool):
                    p.append(f"{where}.is_error must be a boolean")
            elif t == "agent_handoff" and not isinstance(it.get("new_agent_id"), str):
                p.append(f"{where}.new_agent_id must be a string")
    calls = doc.get("tool_calls_in_flight")
    if not isinstance(calls, list):
        p.append("tool_calls_in_flight must be an array")
    else:
        for n, c in enumerate(calls):
            where = f"tool_calls_in_flight[{n}]"
            if not isinstance(c, dict):
                p.append(f"{where} is not an object")
                continue
            for k in ("call_id", "name", "idempotency_key"):
                if not _str(c.get(k), 1):
                    p.append(f"{where}.{k} must be a non-empty string")
            if not isinstance(c.get("arguments"), str):
                p.append(f"{where}.arguments must be a JSON string")
            if not _epoch(c.get("started_at")):
                p.append(f"{where}.started_at must be epoch seconds")
            if c.get("rerun") not in RERUN:
                p.append(f"{where}.rerun must be one of {', '.join(RERUN)}")
            if "note" in c and not isinstance(c["note"], str):
                p.append(f"{where}.note must be a string")
    if not isinstance(doc.get("user_state"), dict):
        p.append("user_state must be an object")
    st = doc.get("agent_state")
    if not isinstance(st, dict):
        p.append("agent_state must be an object")
    else:
        if "attempts" in st:
            at = st["attempts"]
            if not isinstance(at, list) or not all(
                isinstance(a, dict)
                and isinstance(a.get("action"), str)
                and isinstance(a.get("outcome", ""), str)
                and ("at" not in a or _epoch(a["at"]))
                for a in at
            ):
                p.append("agent_state.attempts must be a list of {action, outcome?, at?}")
        if "outcome" in st and not isinstance(st["outcome"], str):
            p.append("agent_state.outcome must be a string")
        if "data" in st and not isinstance(st["data"], dict):
            p.append("agent_state.data must be an object")
    s = doc.get("summary")
    if not (
        isinstance(s, dict)
        and isinstance(s.get("size"), int)
        and _str(s.get("sha256"), 64, 64)
        and isinstance(s.get("counts"), dict)
    ):
        p.append("summary must be {size, sha256, counts}")
    elif check_summary and not p:
        body = {k: v for k, v in doc.items() if k != "summary"}
        want = _summary(body)
        if (s["size"], s["sha256"]) != (want["size"], want["sha256"]):
            p.append("summary.size/sha256 do not match the bundle: it was changed after building")
        elif s["counts"] != want["counts"]:
            p.append("summary.counts do not match the chat items")
    return p


def validate_bundle(doc: Any, *, check_summary: bool = True) -> Bundle:
    """Return ``doc`` typed as a :class:`Bundle`, or raise :class:`BundleError`."""
    found = problems(doc, check_summary=check_summary)
    if found:
        raise BundleError(found)
    return doc  # type: ignore[no-any-return]


def encode_bundle(bundle: Bundle) -> bytes:
    """Bytes to hand to ``send_bundle`` (canonical JSON)."""
    return canonical(bundle)


def decode_bundle(data: bytes) -> Bundle:
    """Parse and validate received bytes."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError([f"not JSON: {e}"]) from None
    return validate_bundle(doc)


META = {"content_type": "application/vnd.baton.bundle+json", "purpose": "handoff"}
"""Transfer metadata to send with an encoded bundle."""
