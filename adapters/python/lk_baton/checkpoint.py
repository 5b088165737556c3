"""Checkpoints: an agent's state streamed to baton while the call runs (issue 13).

docs/protocol.md section 3 ("Checkpoints, heartbeats and recovery") says when and how a
checkpoint travels; docs/bundle.md ("Checkpoints", "Recovery bundles") specifies the payload,
``baton.checkpoint/1``, the merge, and the bundle baton builds for a replacement after a crash.

Plain Python: no ``livekit`` import, no clock read (time is passed in), no IO. The livekit-agents
glue (when to checkpoint, sending it with the transfer) is :class:`lk_baton.agents.BatonLink`.

* :class:`CheckpointTracker`: given the agent's chat items, user state, agent state and
  tool-call journal at a turn boundary, the next checkpoint's payload (a base or a delta), at
  most one in flight, a base whenever the protocol asks for one.
* :func:`journal_entry`: a :class:`~lk_baton.journal.ToolCall` as a checkpoint journal entry.
* :func:`merge_checkpoints`: a chain of checkpoints merged the way baton merges them.
* :func:`recovery_bundle`: the ``baton.bundle/1`` baton builds from a merged state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import bundle as bd
from .journal import ToolCall

__all__ = [
    "BASE_EVERY",
    "META",
    "SCHEMA",
    "CheckpointError",
    "CheckpointTracker",
    "MergedState",
    "canonical",
    "journal_entry",
    "merge_checkpoints",
    "recovery_bundle",
]

SCHEMA = "baton.checkpoint/1"
META: dict[str, str] = {
    "content_type": "application/vnd.baton.checkpoint+json",
    "purpose": "checkpoint",
}
"""The transfer meta of a checkpoint (docs/protocol.md): exactly these two members."""
RECOVERY_META: dict[str, str] = {
    "content_type": "application/vnd.baton.bundle+json",
    "purpose": "recovery",
}
"""The transfer meta of a recovery bundle baton delivers to a replacement."""
BASE_EVERY = 32
"""Every 32nd checkpoint is a base (bounds baton's work on a long chain, not its memory)."""
RECHECK_LAST = 2
"""The last chat items are serialised again at every checkpoint even when they are the same
objects as last time: the framework may still change its newest items in place (an assistant
message marked ``interrupted``). Older items are compared by identity only."""


_ITEMS = f"\x00items-{os.urandom(8).hex()}"
"""A placeholder no JSON value of the agent's can equal (a NUL and 64 random bits)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be applied. ``reason`` is baton's refusal reason
    (docs/protocol.md, code 14 ``checkpoint_rejected``): ``out_of_sequence``, ``no_base``,
    ``wrong_agent``, ``bad_checkpoint``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def canonical(value: Any) -> bytes:
    """Canonical JSON (docs/bundle.md): sorted keys, no whitespace, UTF-8, non-ASCII as is."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


_ITEMS_JSON = json.dumps(_ITEMS).encode()


def _text(value: Any) -> str:
    return canonical(value).decode()


def journal_entry(call: ToolCall, output_item: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``call`` as a checkpoint journal entry (docs/bundle.md, "Checkpoints"): the fields of a
    ``tool_calls_in_flight`` entry plus ``status`` and ``output``, the ``function_call_output``
    item of an ended call (``output_item`` when the agent's context holds it, else one built
    from the journal with the id ``<call_id>_journal_output``), ``None`` while it runs."""
    out: dict[str, Any] | None = None
    if not call.running:
        if output_item is not None:
            out = dict(output_item)
        else:
            out = {
                "id": f"{call.call_id}_journal_output",
                "type": "function_call_output",
                "call_id": call.call_id,
                "name": call.name,
                "output": call.output or "",
                "is_error": call.is_error,
                "created_at": max(call.finished_at or call.started_at, call.started_at),
            }
    return {
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments,
        "started_at": call.started_at,
        "idempotency_key": call.idempotency_key,
        "rerun": call.rerun,
        "status": call.state,
        "note": None,
        "output": out,
    }


@dataclass
class _Sent:
    seq: int
    base: bool


class CheckpointTracker:
    """What the next checkpoint of one agent carries (docs/protocol.md, "Checkpoints").

    Call :meth:`build` at every turn boundary with the agent's state; it returns the payload
    to send (canonical JSON bytes), or ``None`` when a checkpoint is already in flight (the
    changes go into the next one: :attr:`pending` says one is owed) or nothing changed. Report
    the outcome of each sent payload with :meth:`acked` (baton's COMPLETE) or :meth:`failed`
    (a refusal, ``checkpoint_rejected``, or any other transfer failure).

    The next checkpoint is a base: the first one, after :meth:`need_base` (the adapter calls it
    on activation and after a reconnect), after any failure, every :data:`BASE_EVERY`, and
    whenever a delta cannot say what changed (an item was removed, or a new item sits before
    one already sent: baton appends new items, so the order would differ).

    ``item_id(item)`` and ``item_dict(item)`` read a chat item (a livekit-agents ``ChatItem``,
    or a dict in tests); items are compared by identity with what was sent last, except the
    last :data:`RECHECK_LAST`, which are serialised and compared every time.
    """

    def __init__(
        self,
        agent: str,
        *,
        item_id: Callable[[Any], str],
        item_dict: Callable[[Any], dict[str, Any]],
        base_every: int = BASE_EVERY,
    ) -> None:
        self.agent = agent
        self.base_every = base_every
        self._item_id = item_id
        self._item_dict = item_dict
        self.seq = 0
        """The ``seq`` of the next checkpoint."""
        self.in_flight: _Sent | None = None
        self.pending = False
        """A build was refused while one was in flight: build again once it is answered."""
        self.acked_seq: int | None = None
        """The ``seq`` of the last checkpoint baton acknowledged."""
        self.sent = 0
        self.bases = 0
        self._need_base = True
        self._since_base = 0
        self._items: dict[str, tuple[Any, str]] = {}
        self._objs: list[Any] = []
        self._ids: list[str] = []
        self._user_state: str | None = None
        self._agent_state: str | None = None
        self._journal: dict[str, str] = {}

    def need_base(self) -> None:
        """Make the next checkpoint a base (after an activation or a reconnect)."""
        self._need_base = True

    def build(
        self,
        items: Sequence[Any],
        *,
        user_state: Mapping[str, Any],
        agent_state: Mapping[str, Any],
        journal: Iterable[Mapping[str, Any]],
        now: float,
    ) -> bytes | None:
        """The next checkpoint's payload, or ``None`` (one in flight, or no change)."""
        if self.in_flight is not None:
            self.pending = True
            return None
        self.pending = False
        base = self._need_base or self._since_base + 1 >= self.base_every
        changed: list[str] = []  # canonical JSON of each item to send
        cache = self._items
        prev = self._objs
        # Fast path: the items sent before (all but the last RECHECK_LAST) are the same objects
        # in the same places. A list comparison checks identity first, in C: no per-item Python.
        start = max(0, len(prev) - RECHECK_LAST)
        if not (len(items) >= start and list(items[:start]) == prev[:start]):
            start = 0
        ids = self._ids[:start]
        old_tail = self._ids[start:]
        n = len(items)
        new_seen = False
        for i in range(start, n):
            item = items[i]
            iid = self._item_id(item)
            ids.append(iid)
            held = cache.get(iid)
            if held is None:
                new_seen = True
            elif new_seen:
                base = True  # an old item after a new one: a delta would reorder them
            if held is not None and held[0] is item and i < n - RECHECK_LAST:
                continue
            d = self._item_dict(item)
            text = _text(d)
            if held is None or held[1] != text:
                changed.append(text)
            cache[iid] = (item, text)
        gone = set(old_tail).difference(ids[start:]) if start else cache.keys() - set(ids)
        if gone:
            base = True  # an item was removed: only a base can say so
            for g in gone:
                cache.pop(g, None)
        if base:
            changed = [cache[iid][1] for iid in ids]
        self._objs = list(items)
        self._ids = ids

        us, ag = _text(dict(user_state)), _text(dict(agent_state))
        entries = []
        jseen: dict[str, str] = {}
        for e in journal:
            t = _text(dict(e))
            jseen[str(e["call_id"])] = t
            if base or self._journal.get(str(e["call_id"])) != t:
                entries.append(dict(e))
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "agent": self.agent,
            "seq": self.seq,
            "base": base,
            "created_at": now,
            "items": _ITEMS,
            "journal": entries,
        }
        if base or us != self._user_state:
            doc["user_state"] = dict(user_state)
        if base or ag != self._agent_state:
            doc["agent_state"] = dict(agent_state)
        if not base and not changed and not entries and len(doc) == 7:
            return None  # nothing to say
        self._user_state, self._agent_state = us, ag
        self._journal = jseen if base else {**self._journal, **jseen}
        self.in_flight = _Sent(self.seq, base)
        self.seq += 1
        self.sent += 1
        if base:
            self.bases += 1
            self._since_base = 0
            self._need_base = False
        else:
            self._since_base += 1
        # The items are canonical JSON already: splice them in rather than encode them again
        # (a base of 800 items took 10 ms to encode whole).
        head = canonical(doc)
        at = head.index(_ITEMS_JSON)
        return b"".join(
            (head[:at], b"[", ",".join(changed).encode(), b"]", head[at + len(_ITEMS_JSON) :])
        )

    def sent_items(self) -> list[tuple[str, str]]:
        """``(id, canonical JSON)`` of every chat item in the state the last checkpoint built
        carried (after a base or a delta alike), in context order: what baton holds once it is
        acknowledged."""
        return [(iid, self._items[iid][1]) for iid in self._ids]

    def sent_journal(self) -> list[dict[str, Any]]:
        """Every journal entry (:func:`journal_entry`) in the state the last checkpoint built
        carried, in the order first sent: what baton holds once it is acknowledged."""
        return [json.loads(text) for text in self._journal.values()]

    def acked(self) -> None:
        """baton acknowledged the checkpoint in flight (its transfer COMPLETE)."""
        if self.in_flight is not None:
            self.acked_seq = self.in_flight.seq
        self.in_flight = None

    def failed(self) -> None:
        """The checkpoint in flight was refused or its transfer failed: baton may or may not
        hold it, so the next one is a base."""
        self.in_flight = None
        self._need_base = True


# ---------------------------------------------------------------------------------------------
# Merging (what baton does; used to check baton's recovery bundles)


@dataclass
class MergedState:
    """One agent name's merged checkpoints (docs/bundle.md, "Checkpoints", merge)."""

    agent: str
    seq: int
    owner: str | None
    items: list[dict[str, Any]] = field(default_factory=list)
    user_state: dict[str, Any] = field(default_factory=dict)
    agent_state: dict[str, Any] = field(default_factory=dict)
    journal: list[dict[str, Any]] = field(default_factory=list)


def _check(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA:
        raise CheckpointError("bad_checkpoint", f"not a {SCHEMA} object")
    types: dict[str, type | tuple[type, ...]] = {
        "agent": str,
        "seq": int,
        "base": bool,
        "items": list,
        "journal": list,
        "created_at": (int, float),
    }
    for k, t in types.items():
        v = doc.get(k)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise CheckpointError("bad_checkpoint", f"{k} missing or of the wrong type")
    for k in ("user_state", "agent_state"):
        if k in doc and not isinstance(doc[k], Mapping):
            raise CheckpointError("bad_checkpoint", f"{k} is not an object")
    if doc["base"] and not ("user_state" in doc and "agent_state" in doc):
        raise CheckpointError("bad_checkpoint", "a base carries user_state and agent_state")
    if not all(isinstance(i, Mapping) and isinstance(i.get("id"), str) for i in doc["items"]):
        raise CheckpointError("bad_checkpoint", "an item without a string id")
    if not all(
        isinstance(e, Mapping) and isinstance(e.get("call_id"), str) for e in doc["journal"]
    ):
        raise CheckpointError("bad_checkpoint", "a journal entry without a string call_id")
    return dict(doc)


def _upsert(held: list[dict[str, Any]], new: Iterable[Mapping[str, Any]], key: str) -> None:
    at = {x[key]: i for i, x in enumerate(held)}
    for x in new:
        i = at.get(x[key])
        if i is None:
            at[x[key]] = len(held)
            held.append(dict(x))
        else:
            held[i] = dict(x)


def merge_checkpoints(
    state: MergedState | None,
    payload: bytes | Mapping[str, Any],
    *,
    sender: str | None = None,
    sender_agent: str | None = None,
) -> MergedState:
    """Apply one checkpoint to ``state`` (None: nothing held yet) the way baton does, and
    return the new state (``state`` is not changed). ``sender`` is the sending identity and
    ``sender_agent`` its ``lk.agent.name`` (checked when given). Raises
    :class:`CheckpointError` with baton's refusal reason."""
    try:
        doc = _check(json.loads(payload) if isinstance(payload, bytes | bytearray) else payload)
    except (ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError("bad_checkpoint", f"not JSON ({e})") from None
    if sender_agent is not None and doc["agent"] != sender_agent:
        raise CheckpointError("wrong_agent", f"{doc['agent']!r} sent by {sender_agent!r}")
    if doc["base"]:
        merged = MergedState(doc["agent"], doc["seq"], sender)
        _upsert(merged.items, doc["items"], "id")
        _upsert(merged.journal, doc["journal"], "call_id")
        merged.user_state = dict(doc["user_state"])
        merged.agent_state = dict(doc["agent_state"])
        return merged
    if state is None:
        raise CheckpointError("no_base", "a delta while no base is held")
    if doc["agent"] != state.agent:
        raise CheckpointError("wrong_agent", f"{doc['agent']!r} onto {state.agent!r}")
    if doc["seq"] != state.seq + 1 or (sender is not None and sender != state.owner):
        raise CheckpointError("out_of_sequence", f"seq {doc['seq']} after {state.seq}")
    merged = MergedState(
        state.agent,
        doc["seq"],
        state.owner,
        [dict(i) for i in state.items],
        dict(doc.get("user_state", state.user_state)),
        dict(doc.get("agent_state", state.agent_state)),
        [dict(e) for e in state.journal],
    )
    _upsert(merged.items, doc["items"], "id")
    _upsert(merged.journal, doc["journal"], "call_id")
    return merged


_IN_FLIGHT_FIELDS = ("call_id", "name", "arguments", "started_at", "idempotency_key", "rerun")


def recovery_bundle(
    state: MergedState, *, reason: str, recovery_id: str | None, now: float
) -> bd.Bundle:
    """The ``baton.bundle/1`` baton builds for a replacement from ``state`` (docs/bundle.md,
    "Recovery bundles"): ``cause`` ``recovery``, ``reason`` (baton's is ``recovery after
    <signal>``), the merged items, a ``started`` journal entry as a call in flight, and the
    output item of an ended entry appended when the chat lacks it. Validated; raises
    :class:`lk_baton.bundle.BundleError` if the state cannot make one."""
    items = [dict(i) for i in state.items]
    answered = {i.get("call_id") for i in items if i.get("type") == "function_call_output"}
    flight: list[bd.ToolCallInFlight] = []
    for e in state.journal:
        if e.get("status") == "started":
            entry: dict[str, Any] = {k: e[k] for k in _IN_FLIGHT_FIELDS if k in e}
            if isinstance(e.get("note"), str):
                entry["note"] = e["note"]
            flight.append(entry)  # type: ignore[arg-type]
        elif isinstance(e.get("output"), Mapping) and e["call_id"] not in answered:
            items.append(dict(e["output"]))
            answered.add(e["call_id"])
    b = bd.build_bundle(
        from_agent=state.agent,
        to_agent=state.agent,
        reason=reason,
        chat={"items": items},
        tool_calls_in_flight=flight,
        user_state=state.user_state,
        agent_state=state.agent_state,  # type: ignore[arg-type]
        handoff_id=recovery_id,
        created_at=now,
        cause="recovery",
    )
    return b
