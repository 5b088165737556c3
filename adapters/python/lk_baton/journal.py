"""The tool-call journal: every tool call an agent session started, in one place (issue 12).

livekit-agents commits a batch's function calls and outputs to the agent's context only once
every tool of the batch has returned, so a handoff made by one tool of a batch (or a barge-in
while a tool runs) sees a context without the calls still running, and without siblings that
already finished. The journal records each call when its tool starts and when it ends,
independent of that commit, and is what bundles and checkpoints are built from: a call is in
the next agent's context exactly once, finished (call + output) or in flight (call + idempotency
key + ``rerun`` class).

Plain Python: no ``livekit`` import, time passed in, so it is tested and benchmarked on its own.
The livekit-agents glue (the :func:`lk_baton.agents.journaled` decorator, the session hooks) is
in :mod:`lk_baton.agents`.

* :class:`ToolCall`: one call (``call_id``, ``name``, ``arguments``, ``idempotency_key``,
  ``rerun``, ``state`` ``started`` / ``finished`` / ``cancelled``, the output once finished,
  and ``released`` once the agent's own model was given an output before the result).
* :class:`ToolJournal`: the calls of one session, plus the calls it inherited in flight from the
  previous agent (:meth:`ToolJournal.inherit`), which guard against a second run with the same
  arguments (:meth:`ToolJournal.inherited_match`).
* :func:`canonical_arguments`: the form two calls' arguments are compared in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from . import bundle as bd

__all__ = [
    "CallState",
    "Release",
    "Rerun",
    "ToolCall",
    "ToolJournal",
    "canonical_arguments",
    "in_flight_output",
    "released_output",
]

Rerun = Literal["never", "if_idempotent", "safe"]
"""What the next agent may do with a call whose outcome it does not know (docs/bundle.md):
``never`` (the side effect may have happened: check first), ``if_idempotent`` (retry with the
same idempotency key only), ``safe`` (read-only: retry freely)."""
CallState = Literal["started", "finished", "cancelled"]
Release = Literal["handoff", "barge_in"]
"""Why a running call's output was given to the model of the agent that started it before the
tool returned: that agent handed the call over (``handoff``), or the caller cut in
(``barge_in``)."""


def canonical_arguments(arguments: str) -> str:
    """``arguments`` (a function call's JSON string) with sorted keys and no spaces, so two calls
    with the same arguments compare equal whatever order the model wrote them in. Text that is
    not JSON is returned unchanged."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return arguments


def new_idempotency_key() -> str:
    """A fresh idempotency key: 128 random bits as 32 lowercase hex characters."""
    return os.urandom(16).hex()


@dataclass
class ToolCall:
    """One tool call as the journal knows it.

    ``started_at`` / ``finished_at``: epoch seconds. ``output`` / ``is_error``: the
    ``function_call_output`` the framework gives the model (set when ``state`` is ``finished``,
    or the reason when ``cancelled``). ``exact``: the output came from the tool's own return
    (a :func:`~lk_baton.agents.journaled` tool) rather than from the framework's end-of-call
    event, which carries ``str(result)``. ``handoff``: the handoff whose bundle carried this
    call in flight (its late result is owed to the next agent). ``agent``: the id of the agent
    that started it.
    """

    call_id: str
    name: str
    arguments: str
    started_at: float
    idempotency_key: str
    rerun: Rerun = "never"
    state: CallState = "started"
    output: str | None = None
    is_error: bool = False
    finished_at: float | None = None
    exact: bool = False
    agent: str | None = None
    handoff: str | None = None
    from_agent: str | None = None
    """For an inherited call: the agent that started it."""
    released: Release | None = None
    """Set when the model of the agent that started this call was given an output for it before
    the tool returned (:func:`released_output`), so that model is not left waiting on an open
    call. The tool itself was not stopped: ``state`` stays ``started`` until it returns, and its
    result then follows as a separate output (or, handed over, goes to the next agent)."""

    @property
    def running(self) -> bool:
        return self.state == "started"

    def in_flight(self, note: str | None = None) -> bd.ToolCallInFlight:
        """This call as a bundle's ``tool_calls_in_flight`` entry."""
        entry: bd.ToolCallInFlight = {
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "started_at": self.started_at,
            "idempotency_key": self.idempotency_key,
            "rerun": self.rerun,
        }
        if note:
            entry["note"] = note
        return entry


def in_flight_output(entry: bd.ToolCallInFlight, from_agent: str, *, recovery: bool = False) -> str:
    """The output the receiving model sees for a call that was in flight at the handoff (or,
    with ``recovery``, when ``from_agent``'s process died): it was started, its outcome is
    unknown, how to check, and (for ``rerun: never``) not to run it again with the same
    arguments unchecked."""
    rule = {
        "never": "Do not call it again with the same arguments before checking whether it took "
        "effect (with the caller or another tool).",
        "if_idempotent": "Retry only with the same idempotency key, so its backend can "
        "recognise a duplicate.",
        "safe": "It is read-only: you may run it again.",
    }[entry["rerun"]]
    when = (
        f"In flight when the call was cut off: {from_agent} started {entry['name']} and stopped "
        "before it finished (its process ended)"
        if recovery
        else f"In flight at the handoff: {from_agent} started {entry['name']} and handed the call "
        "over before it finished"
    )
    text = (
        f"{when}; outcome unknown. Check before retrying (idempotency key "
        f"{entry['idempotency_key']}). {rule} If its result arrives, it follows as a separate "
        "output."
    )
    note = entry.get("note")
    return f"{text} Note from {from_agent}: {note}" if note else text


def released_output(call: ToolCall, cause: Release, target: str | None = None) -> str:
    """The output the model of the agent that started ``call`` sees when the call is closed
    before its tool returned: cancelled by the handoff to ``target`` or by the caller's
    barge-in. It says the tool was not stopped, where its result goes, and not to run it again
    with the same arguments."""
    if cause == "handoff":
        to = target or "the next agent"
        return (
            f"Cancelled by handoff: {call.name} was still running when you handed the call to "
            f"{to}, so its result goes to {to} (idempotency key {call.idempotency_key}); if it "
            "reaches you too, it follows as a separate output. The tool itself was not stopped. "
            f"Do not call {call.name} again with the same arguments without checking whether "
            "it took effect."
        )
    return (
        f"Cancelled by barge-in: the caller cut in while {call.name} was running, so this turn "
        "stopped waiting for it. The tool itself was not stopped: its result follows as a "
        f"separate output when it arrives. Do not call {call.name} again with the same "
        "arguments meanwhile."
    )


Listener = Callable[[ToolCall], None]


class ToolJournal:
    """The tool calls of one agent session, by ``call_id`` in start order.

    Mutators (:meth:`started`, :meth:`finished`, :meth:`cancelled`) take the time as epoch
    seconds and are idempotent: a second ``started`` for a known call only fills in what the
    first did not know (the ``rerun`` class of a :func:`~lk_baton.agents.journaled` tool), and
    the first end of a call wins (an exact output from the tool wins over the framework's
    event, which comes after it). ``listener(call)`` hears every call that ends.

    :meth:`release` records that a running call was closed in the model's view before its tool
    returned (the first release wins).

    Getters: :meth:`get`, :meth:`running`, :meth:`calls`. The receiving side:
    :meth:`inherit` records calls a bundle carried in flight; :meth:`inherited_match` finds one
    with the same name and arguments; :meth:`resolve_inherited` records its late result.
    """

    def __init__(
        self,
        *,
        key_factory: Callable[[], str] = new_idempotency_key,
        listener: Listener | None = None,
    ) -> None:
        self._calls: dict[str, ToolCall] = {}
        self._inherited: dict[str, ToolCall] = {}
        self._key_factory = key_factory
        self.listeners: list[Listener] = [listener] if listener is not None else []

    # -- getters --

    def get(self, call_id: str) -> ToolCall | None:
        return self._calls.get(call_id)

    def calls(self) -> list[ToolCall]:
        """Every call, in start order."""
        return list(self._calls.values())

    def running(self) -> list[ToolCall]:
        return [c for c in self._calls.values() if c.state == "started"]

    # -- mutators --

    def started(
        self,
        call_id: str,
        name: str,
        arguments: str,
        *,
        now: float,
        rerun: Rerun | None = None,
        agent: str | None = None,
    ) -> ToolCall:
        """Record that a call's tool started; returns its entry (the same one on a repeat)."""
        call = self._calls.get(call_id)
        if call is None:
            call = ToolCall(
                call_id=call_id,
                name=name,
                arguments=arguments,
                started_at=now,
                idempotency_key=self._key_factory(),
                agent=agent,
            )
            self._calls[call_id] = call
        if rerun is not None:
            call.rerun = rerun
        if agent is not None and call.agent is None:
            call.agent = agent
        return call

    def finished(
        self,
        call_id: str,
        output: str,
        *,
        is_error: bool = False,
        now: float,
        exact: bool = True,
    ) -> ToolCall | None:
        """Record a call's output; returns the entry if this ended it, None if it had ended
        already or is unknown."""
        call = _end(self._calls.get(call_id), "finished", output, is_error, now)
        if call is not None:
            call.exact = exact
            self._ended(call)
        return call

    def cancelled(self, call_id: str, reason: str, *, now: float) -> ToolCall | None:
        """Record that a call's tool was cancelled before it returned (``reason`` becomes the
        output the model sees). Returns the entry if this ended it."""
        call = _end(self._calls.get(call_id), "cancelled", reason, True, now)
        if call is not None:
            self._ended(call)
        return call

    def release(self, call_id: str, cause: Release) -> ToolCall | None:
        """Record that running call ``call_id`` was closed in its agent's context by ``cause``
        (its tool keeps running). Returns the entry if this released it, None if the call is
        unknown, has ended, or was released already."""
        call = self._calls.get(call_id)
        if call is None or call.state != "started" or call.released is not None:
            return None
        call.released = cause
        return call

    def handed_over(self, call_ids: Iterable[str], handoff: str) -> None:
        """Mark calls a bundle of ``handoff`` carried in flight: their results are owed to the
        next agent."""
        for cid in call_ids:
            call = self._calls.get(cid)
            if call is not None:
                call.handoff = handoff

    def _ended(self, call: ToolCall) -> None:
        for listener in list(self.listeners):
            listener(call)

    # -- inherited calls (receiving side) --

    def inherit(self, entries: Iterable[bd.ToolCallInFlight], from_agent: str) -> None:
        """Record the calls a bundle from ``from_agent`` carried in flight."""
        for e in entries:
            self._inherited[e["call_id"]] = ToolCall(
                call_id=e["call_id"],
                name=e["name"],
                arguments=e["arguments"],
                started_at=e["started_at"],
                idempotency_key=e["idempotency_key"],
                rerun=e["rerun"],
                from_agent=from_agent,
            )

    def inherited(self) -> list[ToolCall]:
        return list(self._inherited.values())

    def inherited_match(self, name: str, arguments: str) -> ToolCall | None:
        """The inherited call of tool ``name`` with the same arguments whose outcome is still
        unknown, if any (what a second run would duplicate)."""
        if not self._inherited:
            return None
        want = canonical_arguments(arguments)
        for call in self._inherited.values():
            if (
                call.state == "started"
                and call.name == name
                and canonical_arguments(call.arguments) == want
            ):
                return call
        return None

    def resolve_inherited(
        self, call_id: str, output: str, *, is_error: bool, now: float
    ) -> ToolCall | None:
        """Record the late result of an inherited call; returns it if this is the first."""
        return _end(self._inherited.get(call_id), "finished", output, is_error, now)


def _end(
    call: ToolCall | None, state: CallState, output: str, is_error: bool, now: float
) -> ToolCall | None:
    """End ``call`` if it is still running (the first end wins); returns it if this ended it."""
    if call is None or call.state != "started":
        return None
    call.state = state
    call.output = output
    call.is_error = is_error
    call.finished_at = now
    return call
