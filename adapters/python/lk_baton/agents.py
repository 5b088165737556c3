"""livekit-agents integration: one call at job start links an ``AgentSession`` to baton.

Built on :mod:`lk_baton.floor` (the SDK-free control protocol: codec, :class:`FloorClient`
state machine, who may speak to an agent) and :mod:`lk_baton.transfer` (the chunked transfer).
This module adds what needs livekit-agents:

* Context helpers that need no room: :func:`build_handoff_bundle` (bundle from an agent's own
  chat context and the session's user state), :func:`read_bundle` (bundle to a ready
  ``llm.ChatContext`` + user state) and :func:`seed_agent` (give a specialist the source's
  history, keeping tool calls for tools it does not have).
* :class:`SessionEffects`: the floor's effects on an ``AgentSession``.
* :class:`BatonLink`: glue for a ``livekit.rtc.Room`` + ``AgentSession``: finds baton, says
  ``hello``, obeys ``activate``/``deactivate``, sends ``quiet``, takes control messages and
  transfers from baton's participant only, and offers :meth:`BatonLink.handoff` (with the
  source filler of :mod:`lk_baton.filler`), :meth:`BatonLink.receive_context` and
  :meth:`BatonLink.ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import time
import typing
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from livekit.agents import llm
from livekit.agents.voice.events import RunContext

from . import bundle as bd
from . import checkpoint as cp
from .filler import FILLER_HOLD_S, FILLER_STOP_FADE_MS, SourceFiller
from .floor import (
    CONTROL_TOPIC,
    HEARTBEAT_MS,
    HELLO_RETRY,
    BatonError,
    ControlDecodeError,
    CoordinatorMissing,
    FloorClient,
    FloorEventKind,
    HandoffCancelled,
    HandoffRefused,
    HeartbeatSender,
    RefusalLog,
    decode_control,
    encode_control,
    filler_fade_ms,
    hello_schedule,
    is_coordinator,
)
from .job_watch import remove_crashed_jobs
from .journal import Release, Rerun, ToolCall, ToolJournal, in_flight_output, released_output
from .spans import HandoffSpans
from .transfer import new_transfer_id, receive_bundle, send_bundle, transport_for

if TYPE_CHECKING:
    from livekit import rtc
    from livekit.agents import Agent, AgentSession, JobContext
    from livekit.agents.voice.events import (
        AgentStateChangedEvent,
        CloseEvent,
        ConversationItemAddedEvent,
        FunctionToolsExecutedEvent,
        ToolExecutionUpdatedEvent,
    )
    from livekit.agents.voice.room_io import RoomOptions, TextInputEvent
    from livekit.rtc.room import EventTypes

__all__: list[str] = [
    "RECOVERY_GREETING",
    "ActivateHook",
    "BatonLink",
    "EventHook",
    "HandoffTicket",
    "ReceivedContext",
    "SessionEffects",
    "VerifyHook",
    "build_handoff_bundle",
    "chat_item_dict",
    "chat_items_equal",
    "context_tail",
    "current_tool_call",
    "default_on_activate",
    "default_on_prepare",
    "default_on_tool_result",
    "journal_for",
    "journaled",
    "pair_in_flight",
    "read_bundle",
    "release_call",
    "remove_crashed_jobs",
    "restore_output_names",
    "seed_agent",
    "state_from_dict",
    "state_to_dict",
    "wait_not_speaking",
]

log = logging.getLogger("lk_baton.agents")

T = TypeVar("T")
A = TypeVar("A", bound="Agent")

# ---------------------------------------------------------------------------------------------
# User state


def state_to_dict(
    state: Any, serializer: Callable[[Any], Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The session's user state as a JSON object.

    ``serializer`` wins when given. Otherwise: ``None`` gives ``{}``; a dataclass instance goes
    through ``dataclasses.asdict``; a pydantic model through ``model_dump(mode="json")``; a
    mapping is copied. The result must survive ``json.dumps``, else ``TypeError`` says to pass a
    serializer.
    """
    if serializer is not None:
        out: Any = serializer(state)
    elif state is None:
        out = {}
    elif dataclasses.is_dataclass(state) and not isinstance(state, type):
        out = dataclasses.asdict(state)
    elif hasattr(state, "model_dump"):
        out = state.model_dump(mode="json")
    elif isinstance(state, Mapping):
        out = dict(state)
    else:
        raise TypeError(
            f"cannot serialise user state of type {type(state).__name__}: pass "
            "user_state_serializer=... (a function returning a JSON object)"
        )
    if not isinstance(out, Mapping):
        raise TypeError("user state must serialise to a JSON object (a dict)")
    try:
        return dict(json.loads(json.dumps(dict(out))))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"user state is not JSON-serialisable ({e}); pass user_state_serializer=..."
        ) from None


def state_from_dict(data: Mapping[str, Any], cls: type[T]) -> T:
    """Rebuild a dataclass or pydantic model from :func:`state_to_dict` output (nested
    dataclasses are rebuilt by their annotated field types when those are dataclasses)."""
    if hasattr(cls, "model_validate"):
        return cls.model_validate(dict(data))  # type: ignore[attr-defined, no-any-return]
    if dataclasses.is_dataclass(cls):
        return _dataclass_from_dict(cls, data)  # type: ignore[no-any-return]
    raise TypeError(
        f"{cls.__name__} is neither a dataclass nor a pydantic model: pass a deserializer"
    )


def _dataclass_from_dict(cls: Any, data: Mapping[str, Any]) -> Any:
    import typing

    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        v = data[f.name]
        ft = hints.get(f.name)
        if isinstance(ft, type) and dataclasses.is_dataclass(ft) and isinstance(v, Mapping):
            v = _dataclass_from_dict(ft, v)
        kwargs[f.name] = v
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# The tool-call journal in livekit-agents (lk_baton.journal holds the journal itself)

_JOURNALS: weakref.WeakKeyDictionary[Any, ToolJournal] = weakref.WeakKeyDictionary()
_CURRENT_CALL: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar(
    "lk_baton_tool_call", default=None
)
_RUNNING: weakref.WeakKeyDictionary[Any, dict[str, RunContext[Any]]] = weakref.WeakKeyDictionary()
"""Per session, the ``RunContext`` of each :func:`journaled` call whose tool is running (what
:func:`release_call` closes a call through)."""
_MAY_REPLY: weakref.WeakKeyDictionary[Any, Callable[[], bool]] = weakref.WeakKeyDictionary()
"""Per linked session, whether its model may answer a tool result now (it holds the floor)."""
_CTX_PARAM = "lk_baton_run_ctx"
"""The keyword-only ``RunContext`` parameter :func:`journaled` adds to a tool's signature (the
framework injects it, and leaves it out of the schema the model sees, as for any ``RunContext``
parameter)."""

VerifyHook = Callable[[ToolCall, RunContext[Any]], Awaitable[str | None] | str | None]
"""``verify(inherited, run_ctx)``: asked before a tool runs again with the same arguments as a
call the previous agent handed over in flight (outcome unknown). Return a string when the call
took effect (it becomes this call's output and the tool does not run), or ``None`` when it did
not (the tool runs, with the inherited call's idempotency key)."""


def journal_for(session: AgentSession[Any]) -> ToolJournal:
    """The tool-call journal of ``session``, created on first use. It hears every tool call
    the session's agents start and end through the framework's ``tool_execution_updated``
    event (``str(result)`` as the output), and the exact output, ``rerun`` class and
    idempotency key of tools wrapped with :func:`journaled`."""
    j = _JOURNALS.get(session)
    if j is None:
        j = ToolJournal()
        _JOURNALS[session] = j
        journal = j

        def on_tool_event(ev: ToolExecutionUpdatedEvent) -> None:
            _on_tool_event(journal, session, ev)

        # The SDK's emitter calls inspect.signature on every listener for every event; a
        # signature set on the function is returned at once instead of being rebuilt.
        on_tool_event.__signature__ = inspect.signature(on_tool_event)  # type: ignore[attr-defined]
        session.on("tool_execution_updated", on_tool_event)
    return j


def _on_tool_event(
    j: ToolJournal, session: AgentSession[Any], ev: ToolExecutionUpdatedEvent
) -> None:
    u = ev.update
    now = time.time()
    if u.type == "tool_call_started":
        c = u.function_call
        j.started(c.call_id, c.name, c.arguments, now=now, agent=_agent_id(session))
    elif u.type == "tool_call_ended":
        if u.status == "cancelled":
            j.cancelled(u.call_id, "the tool call was cancelled before it finished", now=now)
        else:
            j.finished(
                u.call_id, u.message or "", is_error=u.status == "error", now=now, exact=False
            )


def _agent_id(session: AgentSession[Any]) -> str | None:
    try:
        return session.current_agent.id
    except RuntimeError:
        return None


def current_tool_call() -> ToolCall | None:
    """Inside a :func:`journaled` tool: its journal entry, whose ``idempotency_key`` the tool
    passes to its backend (a retry by the next agent reuses it). ``None`` elsewhere."""
    return _CURRENT_CALL.get()


F = TypeVar("F", bound=Callable[..., Any])


def journaled(
    rerun: Rerun | None = None, *, read_only: bool = False, verify: VerifyHook | None = None
) -> Callable[[F], F]:
    """Declare a tool's ``rerun`` class and journal its calls exactly. Put it under (or over)
    ``@function_tool``::

        @function_tool
        @journaled("never", verify=booking_exists)
        async def create_reservation(self, date: str) -> str:
            key = current_tool_call().idempotency_key   # pass it to the booking backend

    ``rerun`` defaults to ``"safe"`` for ``read_only=True`` tools and ``"never"`` otherwise.
    Each call is recorded in :func:`journal_for` its session when the tool starts and with its
    exact output when it returns. Before the tool runs, a call with the same name and arguments
    as one the previous agent handed over in flight (outcome unknown) is checked: ``safe``
    runs; ``if_idempotent`` runs with the inherited idempotency key; ``never`` asks ``verify``
    (see :data:`VerifyHook`) or, without one, does not run and tells the model to check first.
    """
    cls: Rerun = rerun or ("safe" if read_only else "never")

    def deco(f: F) -> F:
        if isinstance(f, llm.FunctionTool | llm.RawFunctionTool):
            inner = f._func  # wrap the function inside an existing @function_tool
            return type(f)(deco(inner), f.info)  # type: ignore[arg-type]
        wrapped: F = _journal_wrapper(f, cls, verify)
        return wrapped

    return deco


def _journal_wrapper(f: Callable[..., Any], cls: Rerun, verify: VerifyHook | None) -> Any:
    sig = inspect.signature(f)
    try:
        hints = typing.get_type_hints(f, include_extras=True)
    except Exception:  # unresolvable annotations: the framework will say so itself
        hints = dict(getattr(f, "__annotations__", {}))

    @functools.wraps(f)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        run_ctx: RunContext[Any] | None = kwargs.pop(_CTX_PARAM, None)
        if run_ctx is None:  # called directly, not by the framework
            return await f(*args, **kwargs)
        j = journal_for(run_ctx.session)
        fc = run_ctx.function_call
        call = j.started(
            fc.call_id,
            fc.name,
            fc.arguments,
            now=time.time(),
            rerun=cls,
            agent=_agent_id(run_ctx.session),
        )
        if cls != "safe" and (prior := j.inherited_match(fc.name, fc.arguments)) is not None:
            if cls == "if_idempotent":
                call.idempotency_key = prior.idempotency_key
            else:
                known = await _check_rerun(prior, run_ctx, verify)
                if known is not None:
                    j.finished(fc.call_id, known, now=time.time())
                    return known
                call.idempotency_key = prior.idempotency_key
        session = run_ctx.session
        running = _RUNNING.setdefault(session, {})
        running[fc.call_id] = run_ctx
        # The caller cutting in interrupts the turn this call belongs to: then close the call for
        # the model at once (the tool runs on). livekit-agents 1.8 offers no public callback for
        # an interruption, only awaitables, and awaiting one needs a task per call (3 times the
        # journal's cost, ./scripts/bench journal); its interrupt future is read instead.
        interrupted = getattr(run_ctx.speech_handle, "_interrupt_fut", None)

        def barge_in(_: Any) -> None:
            if call.running:
                _spawn_release(release_call(session, fc.call_id, "barge_in"))

        if isinstance(interrupted, asyncio.Future):
            interrupted.add_done_callback(barge_in)
        token = _CURRENT_CALL.set(call)
        try:
            val = await f(*args, **kwargs)
        except asyncio.CancelledError:
            j.cancelled(
                fc.call_id, "the tool call was cancelled before it finished", now=time.time()
            )
            raise
        except BaseException as e:
            text, err = _model_output(fc, None, e)
            j.finished(fc.call_id, text, is_error=err, now=time.time())
            raise
        finally:
            _CURRENT_CALL.reset(token)
            running.pop(fc.call_id, None)
            if isinstance(interrupted, asyncio.Future):
                interrupted.remove_done_callback(barge_in)
        text, err = _model_output(fc, val, None)
        j.finished(fc.call_id, text, is_error=err, now=time.time())
        if call.released is not None and not _MAY_REPLY.get(session, _always)():
            # a released call's result comes back as a deferred reply: none from an agent that
            # no longer holds the floor (it still lands in its context, as <call_id>_final)
            if isinstance(val, llm.ToolResult):
                return dataclasses.replace(val, reply_required=False)
            return llm.ToolResult(val, reply_required=False)
        return val

    params = list(sig.parameters.values())
    extra = inspect.Parameter(
        _CTX_PARAM, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunContext
    )
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    params.insert(at, extra)
    annotations = {**hints, _CTX_PARAM: RunContext}
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = annotations
    wrapper.__lk_baton_rerun__ = cls  # type: ignore[attr-defined]
    return wrapper


def _always() -> bool:
    return True


_RELEASING: set[asyncio.Task[bool]] = set()


def _spawn_release(coro: Coroutine[Any, Any, bool]) -> None:
    task = asyncio.ensure_future(coro)
    _RELEASING.add(task)  # a strong reference until it is done (asyncio keeps only weak ones)
    task.add_done_callback(_RELEASING.discard)


async def release_call(
    session: AgentSession[Any], call_id: str, cause: Release, *, target: str | None = None
) -> bool:
    """Close running call ``call_id`` in the view of ``session``'s model now, with the output of
    :func:`lk_baton.journal.released_output` (cancelled by the handoff to ``target``, or by a
    barge-in), without stopping its tool; the journal records it (``ToolCall.released``).

    This is the framework's own release of a running tool (its first ``RunContext.update``,
    silent): the batch the call is in completes with that output, so the agent's context (and a
    realtime model's conversation) never holds the call open, and the tool's return follows as
    a ``<call_id>_final`` pair. Returns False (nothing done) when the call is not running,
    was released already, already released itself with ``ctx.update``, or its ``RunContext``
    is unknown (a tool neither :func:`journaled` nor run by livekit-agents' tool executor).
    """
    j = journal_for(session)
    call = j.get(call_id)
    run_ctx = _RUNNING.get(session, {}).get(call_id) or _framework_run_ctx(session, call_id)
    if call is None or run_ctx is None or not call.running or call.released is not None:
        return False
    if getattr(run_ctx, "_updates", None):
        return False  # the tool's own ctx.update() closed the call already
    j.release(call_id, cause)
    await run_ctx.update(released_output(call, cause, target), template=_as_is, silent=True)
    return True


def _as_is(args: Mapping[str, Any]) -> str:
    return str(args["message"])


def _framework_run_ctx(session: AgentSession[Any], call_id: str) -> RunContext[Any] | None:
    """The ``RunContext`` of a running tool that is not :func:`journaled`, from livekit-agents'
    tool executor (1.8: ``voice.tool_executor._RunningTasks``, a private registry: None when
    it is not there)."""
    try:
        from livekit.agents.voice.tool_executor import _RunningTasks
    except ImportError:
        return None
    task = _RunningTasks.get(session, {}).get(call_id)
    ctx = getattr(task, "ctx", None)
    return ctx if isinstance(ctx, RunContext) else None


def _model_output(fc: llm.FunctionCall, val: Any, exc: BaseException | None) -> tuple[str, bool]:
    """``(output, is_error)`` of the ``function_call_output`` the framework makes of a tool's
    return value or exception (``llm.utils.make_function_call_output``), with a fast path for
    the common ``str`` and ``None`` (the same text: ``str(v)``, ``""``)."""
    if exc is None and (val is None or type(val) is str):
        return ("" if val is None else val), False
    out = llm.utils.make_function_call_output(fnc_call=fc, output=val, exception=exc)
    return out.fnc_call_out.output, out.fnc_call_out.is_error


async def _check_rerun(
    prior: ToolCall, run_ctx: RunContext[Any], verify: VerifyHook | None
) -> str | None:
    """None: run the tool again (the app's check found no effect). A string: the output to give
    instead of running it."""
    if verify is not None:
        r = verify(prior, run_ctx)
        return await r if inspect.isawaitable(r) else r
    return (
        f"Not run: {prior.from_agent or 'the previous agent'} already started {prior.name} with "
        "these arguments before the call came to you "
        f"(idempotency key {prior.idempotency_key}) and its outcome is still unknown. Check "
        "whether it took effect before running it again; its result may still arrive."
    )


# ---------------------------------------------------------------------------------------------
# Building and reading bundles


def _attempts(tried: Iterable[str | Mapping[str, Any]] | None) -> list[bd.Attempt]:
    out: list[bd.Attempt] = []
    for t in tried or ():
        if isinstance(t, str):
            out.append({"action": t})
        else:
            a: bd.Attempt = {"action": str(t["action"])}
            if "outcome" in t:
                a["outcome"] = str(t["outcome"])
            if "at" in t:
                a["at"] = float(t["at"])
            out.append(a)
    return out


def build_handoff_bundle(
    chat_ctx: llm.ChatContext,
    *,
    from_agent: str,
    to_agent: str,
    reason: str,
    user_state: Mapping[str, Any] | None = None,
    tried: Iterable[str | Mapping[str, Any]] | None = None,
    outcome: str | None = None,
    data: Mapping[str, Any] | None = None,
    current_call: llm.FunctionCall | None = None,
    tool_calls_in_flight: Sequence[bd.ToolCallInFlight] | None = None,
    handoff_id: str | None = None,
    journal: ToolJournal | None = None,
    agent_id: str | None = None,
) -> bd.Bundle:
    """A validated bundle from an agent's own chat context (``agent.chat_ctx``, not
    ``session.history``), serialised with timestamps.

    ``current_call`` is the ``transfer_to_...`` function call being executed (``RunContext.
    function_call``): it has no output yet (and is not in the context yet, except on the
    realtime path), so it is added if missing, with an output saying the call was handed to
    ``to_agent``, and the target sees a complete pair (never this call in flight).

    ``journal`` (the session's :func:`journal_for`; ``agent_id`` limits it to one agent's calls)
    is the truth about tool calls: every call it holds is in the bundle exactly once, whether or
    not the framework has committed it to the context yet (it does so only when the whole batch
    has returned). A finished call is a ``function_call`` and its ``function_call_output``; a
    running one is its ``function_call`` (no output: the receiver pairs it, see
    :func:`read_bundle`) and a ``tool_calls_in_flight`` entry with its idempotency key and
    ``rerun`` class; a cancelled one is the call and an error output saying so.

    ``tool_calls_in_flight``: calls the app knows are still running. Function calls in the
    context that have no output and that the journal does not know are added too (``rerun:
    never``, the call id as idempotency key), since their side effects may have happened.
    """
    ctx = chat_ctx.copy()
    if current_call is not None:
        # livekit-agents' realtime path records a call in the context when its tool starts (the
        # pipeline path only when the batch ends): the transfer call may be there, unanswered
        cid = current_call.call_id
        call = next((i for i in ctx.items if i.type == "function_call" and i.call_id == cid), None)
        if call is None:
            call = current_call.model_copy()
            ctx.insert(call)
        if not any(i.type == "function_call_output" and i.call_id == cid for i in ctx.items):
            ctx.insert(
                llm.FunctionCallOutput(
                    call_id=cid,
                    name=call.name,
                    output=f"handed the call to {to_agent}: {reason}",
                    is_error=False,
                    created_at=max(time.time(), call.created_at),
                )
            )
    flight: list[bd.ToolCallInFlight] = list(tool_calls_in_flight or [])
    known = {c["call_id"] for c in flight}
    if journal is not None:
        skip = {current_call.call_id} if current_call is not None else set()
        for jc in journal.calls():
            if jc.call_id in skip or (agent_id is not None and jc.agent not in (None, agent_id)):
                continue
            _journal_into(ctx, jc, flight, known)
    restore_output_names(ctx)
    chat = ctx.to_dict(exclude_timestamp=False)
    answered = {i.call_id for i in ctx.items if i.type == "function_call_output"}
    for i in ctx.items:
        if i.type == "function_call" and i.call_id not in answered and i.call_id not in known:
            flight.append(
                {
                    "call_id": i.call_id,
                    "name": i.name,
                    "arguments": i.arguments,
                    "started_at": i.created_at,
                    "idempotency_key": i.call_id,
                    "rerun": "never",
                    "note": "started before the handoff; its result is unknown",
                }
            )
            known.add(i.call_id)
    agent_state: bd.AgentState = {}
    attempts = _attempts(tried)
    if attempts:
        agent_state["attempts"] = attempts
    if outcome is not None:
        agent_state["outcome"] = outcome
    if data:
        agent_state["data"] = dict(data)
    return bd.build_bundle(
        from_agent=from_agent,
        to_agent=to_agent,
        reason=reason,
        chat=chat,
        tool_calls_in_flight=flight,
        user_state=dict(user_state or {}),
        agent_state=agent_state,
        handoff_id=handoff_id,
    )


def _journal_into(
    ctx: llm.ChatContext,
    jc: ToolCall,
    flight: list[bd.ToolCallInFlight],
    known: set[str],
) -> None:
    """Make ``ctx`` hold journal call ``jc`` exactly once: its ``function_call`` item, and its
    output if it ended (a running call's own outputs, such as the framework's progress
    placeholder, are dropped: the in-flight entry speaks for it)."""
    calls = [i for i in ctx.items if i.type == "function_call" and i.call_id == jc.call_id]
    outs = [i for i in ctx.items if i.type == "function_call_output" and i.call_id == jc.call_id]
    if not calls:
        ctx.insert(
            llm.FunctionCall(
                call_id=jc.call_id, name=jc.name, arguments=jc.arguments, created_at=jc.started_at
            )
        )
    if jc.running:
        for o in outs:
            ctx.remove(o)
        if jc.call_id not in known:
            flight.append(jc.in_flight())
            known.add(jc.call_id)
    elif not outs:
        ctx.insert(
            llm.FunctionCallOutput(
                call_id=jc.call_id,
                name=jc.name,
                output=jc.output or "",
                is_error=jc.is_error,
                created_at=max(jc.finished_at or jc.started_at, jc.started_at),
            )
        )


def restore_output_names(ctx: llm.ChatContext) -> int:
    """Give every ``function_call_output`` without a name the name of the ``function_call``
    with its ``call_id`` (realtime plugins write outputs without one, and Google's request
    format needs ``function_response.name``). Returns how many were restored.

    A restored output is a copy put in the item's place: ``ctx.copy()`` shares its items with
    the context it copies, which keeps them as they were."""
    names = {i.call_id: i.name for i in ctx.items if i.type == "function_call"}
    n = 0
    items = ctx.items
    for k, i in enumerate(items):
        if i.type == "function_call_output" and not i.name and names.get(i.call_id):
            items[k] = i.model_copy(update={"name": names[i.call_id]})
            n += 1
    return n


@dataclass
class ReceivedContext:
    """What a target gets from a handoff (see :meth:`BatonLink.receive_context`)."""

    chat_ctx: llm.ChatContext
    """The source's chat context, items in order with their original ids and ``created_at``."""
    user_state: Any
    """A dict, or what ``user_state_type`` / the deserializer made of it."""
    reason: str
    from_agent: str
    handoff_id: str | None = None
    tool_calls_in_flight: list[bd.ToolCallInFlight] = field(default_factory=list)
    agent_state: bd.AgentState = field(default_factory=lambda: bd.AgentState())
    bundle: bd.Bundle | None = None
    """The whole validated bundle, or None when none came (``bundle_unavailable``, no bundle)."""
    cause: str = "handoff"
    """``recovery`` when this agent replaces a crashed one (the bundle is its last checkpoint,
    docs/bundle.md "Recovery bundles"), else ``handoff``."""


def read_bundle(
    bundle: bd.Bundle,
    *,
    user_state_type: type[Any] | None = None,
    user_state_deserializer: Callable[[dict[str, Any]], Any] | None = None,
) -> ReceivedContext:
    """Turn a validated bundle into a :class:`ReceivedContext`.

    The chat is made safe to continue from: every call in ``tool_calls_in_flight`` gets an
    explicit output the model sees (:func:`lk_baton.journal.in_flight_output`: in flight at the
    handoff, outcome unknown, check before retrying, with its idempotency key), stamped at the
    bundle's ``created_at`` (livekit-agents drops a ``function_call`` without an output when it
    builds the model's request, so the model would never learn the call was started); its
    ``function_call`` is added from the entry if the chat lacks it. Outputs without a name get
    the name of their call (:func:`restore_output_names`).
    """
    chat = llm.ChatContext.from_dict(bundle["chat"])
    recovery = bundle.get("cause") == "recovery"
    pair_in_flight(
        chat,
        bundle["tool_calls_in_flight"],
        bundle["from_agent"],
        bundle["created_at"],
        recovery=recovery,
    )
    restore_output_names(chat)
    raw = dict(bundle["user_state"])
    state: Any = raw
    if user_state_deserializer is not None:
        state = user_state_deserializer(raw)
    elif user_state_type is not None:
        state = state_from_dict(raw, user_state_type)
    return ReceivedContext(
        chat_ctx=chat,
        user_state=state,
        reason=bundle["reason"],
        from_agent=bundle["from_agent"],
        handoff_id=bundle.get("handoff_id"),
        tool_calls_in_flight=list(bundle["tool_calls_in_flight"]),
        agent_state=bundle["agent_state"],
        bundle=bundle,
        cause="recovery" if recovery else "handoff",
    )


def pair_in_flight(
    chat: llm.ChatContext,
    in_flight: Iterable[bd.ToolCallInFlight],
    from_agent: str,
    at: float,
    *,
    recovery: bool = False,
) -> None:
    """Pair each in-flight call with the output of :func:`lk_baton.journal.in_flight_output`
    (see :func:`read_bundle`); a call that already has an output is left as it is.
    ``recovery``: the calls were in flight when ``from_agent`` crashed, not at a handoff."""
    for e in in_flight:
        cid = e["call_id"]
        call = next((i for i in chat.items if i.type == "function_call" and i.call_id == cid), None)
        if call is None:
            call = llm.FunctionCall(
                call_id=cid, name=e["name"], arguments=e["arguments"], created_at=e["started_at"]
            )
            chat.insert(call)
        if any(i.type == "function_call_output" and i.call_id == cid for i in chat.items):
            continue
        chat.insert(
            llm.FunctionCallOutput(
                call_id=cid,
                name=e["name"],
                output=in_flight_output(e, from_agent, recovery=recovery),
                is_error=False,
                created_at=max(at, call.created_at),
            )
        )


async def seed_agent(
    agent: A,
    received: ReceivedContext,
    *,
    handoff_item: bool | None = None,
    keep_foreign_tool_calls: bool = True,
) -> A:
    """Give ``agent`` the source's history, before (or after) the session starts it.

    ``Agent(chat_ctx=...)`` drops every function call and output whose tool the new agent does
    not have (``chat_ctx.copy(tools=...)`` in ``Agent.__init__``); the specialist would then not
    know a lookup already ran, and could run it again. This goes through the supported
    ``Agent.update_chat_ctx(..., exclude_invalid_function_calls=False)`` instead, so the source's
    calls and results stay, with their ids, order and ``created_at``. Items the agent already
    had (e.g. from its constructor) are merged by time. With ``handoff_item`` (default: for a
    handoff, not for a recovery, whose context goes on as the crashed agent left it), an
    ``AgentHandoff(old_agent_id=<source agent name>, new_agent_id=agent.id)`` stamped now records
    the switch.

    Caveat (livekit-agents 1.8.9): ``agent.update_tools()`` on a running agent re-filters the
    context by its tools and drops the foreign calls again.
    """
    ctx = received.chat_ctx.copy()
    have = {i.id for i in ctx.items}
    for item in agent.chat_ctx.items:
        if item.id not in have:
            ctx.insert(item)
    if handoff_item is None:
        handoff_item = received.cause != "recovery"
    if handoff_item:
        last = max((i.created_at for i in ctx.items), default=0.0)
        ctx.insert(
            llm.AgentHandoff(
                old_agent_id=received.from_agent,
                new_agent_id=agent.id,
                created_at=max(time.time(), last),
            )
        )
    await agent.update_chat_ctx(ctx, exclude_invalid_function_calls=not keep_foreign_tool_calls)
    return agent


def _chat_item_id(item: llm.ChatItem) -> str:
    return item.id


def chat_item_dict(item: llm.ChatItem) -> dict[str, Any]:
    """One chat item exactly as ``ChatContext.to_dict(exclude_timestamp=False)`` has it."""
    d: dict[str, Any] = llm.ChatContext([item]).to_dict(exclude_timestamp=False)["items"][0]
    return d


def chat_items_equal(
    a: llm.ChatContext, b: llm.ChatContext, *, skip_types: Sequence[str] = ()
) -> bool:
    """``a.is_equivalent(b)`` plus equal ``created_at`` on every item (types in ``skip_types``
    are ignored on both sides, e.g. ``("agent_handoff",)``)."""
    ia = [i for i in a.items if i.type not in skip_types]
    ib = [i for i in b.items if i.type not in skip_types]
    return llm.ChatContext(ia).is_equivalent(llm.ChatContext(ib)) and all(
        x.created_at == y.created_at for x, y in zip(ia, ib, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# AgentSession effects


class SessionEffects:
    """:class:`FloorEffects` on an ``AgentSession``: audio input/output via
    ``session.input/output.set_audio_enabled``, transcription output too (so a silenced agent
    publishes no text either), and a gate for the room's text input (see
    :meth:`BatonLink.room_options`). Works before and after ``session.start``."""

    def __init__(self, session: AgentSession[Any], *, transcription: bool = True) -> None:
        self.session = session
        self.transcription = transcription
        self.hearing = False
        self.voiced = False
        """Whether the agent's output is on (what it says can be heard)."""

    def set_input(self, enabled: bool) -> None:
        self.hearing = enabled
        if enabled and self.session.input.audio is None:
            self.session.input._audio_enabled = True  # no stream yet: avoid the SDK's warning
            return
        self.session.input.set_audio_enabled(enabled)

    def set_output(self, enabled: bool) -> None:
        self.voiced = enabled
        out = self.session.output
        if enabled and out.audio is None:
            out._audio_enabled = True  # no sink yet (text-only or not started): no warning
        else:
            out.set_audio_enabled(enabled)
        if self.transcription:
            if enabled and out.transcription is None:
                out._transcription_enabled = True
            else:
                out.set_transcription_enabled(enabled)

    def speaking(self) -> bool:
        return self.session.agent_state == "speaking"


# ---------------------------------------------------------------------------------------------
# The room glue


@dataclass
class HandoffTicket:
    """What :meth:`BatonLink.handoff` returns once baton accepted."""

    handoff_id: str
    target: str
    bundle: bd.Bundle
    bundle_bytes: int
    upload: asyncio.Task[int] | None
    """The bundle's upload to baton (resolves to the transfer id); already running."""
    tail: list[dict[str, Any]] = field(default_factory=list)
    """The chat items sent as the ``tail`` (the request was made at the start of the sentence:
    the sentence and what else the context gained meanwhile), in order; empty otherwise."""


ActivateHook = Callable[["BatonLink", dict[str, Any]], Awaitable[None] | None]
EventHook = Callable[["BatonLink", dict[str, Any]], Awaitable[None] | None]


ACTIVATION_CHECKPOINT_WAIT_S = 1.0
"""After ``activate``, the first checkpoint (a base one) waits for the agent's first words, at
most this long: built at once, it ran on the event loop ahead of the reply the activation asks
for, so the caller waited for it."""

FILLER_LEAD_S = 0.04
"""How much of the sentence's audio may still be queued for sending when the source's own filler
starts: the filler begins this much before the voice ends (quiet noise under the last syllable
is not heard), instead of after the playout has been noticed, which took 80-90 ms here (the
queue's timer, the speech handle, the state change) and left that much silence at the caller."""


def voice_queue(session: AgentSession[Any]) -> Callable[[], float] | None:
    """How many seconds of the agent's voice are queued for sending, read from the
    ``rtc.AudioSource`` at the end of the session's audio output chain (RoomIO's participant
    output, found by walking ``next_in_chain``); None when the chain ends elsewhere (a custom
    output, a console session): the filler then starts after the playout."""
    out: Any = getattr(getattr(session, "output", None), "audio", None)
    for _ in range(16):  # a chain is a few wrappers deep; never loop on a cycle
        if out is None:
            return None
        source = getattr(out, "_audio_source", None)
        queued = getattr(source, "queued_duration", None)
        if isinstance(queued, int | float):
            return lambda: float(source.queued_duration)  # type: ignore[union-attr]
        out = getattr(out, "next_in_chain", None)
    return None


async def start_before_the_end(filler: SourceFiller, queued: Callable[[], float]) -> bool:
    """Start ``filler`` once the sentence being played has at most :data:`FILLER_LEAD_S` of
    audio left to send. The queue must first be seen holding more than that (the sentence's
    audio may not have reached it when the tool runs; a sentence already over leaves the start
    to the caller). Polls every 5 ms; cancelled when the playout is over. Returns whether it
    started the filler."""
    seen = False
    while True:
        left = queued()
        if left > FILLER_LEAD_S:
            seen = True
        elif seen:
            return filler.start()
        await asyncio.sleep(0.005)


class VoiceDrain:
    """When the agent's voice last went out: watches ``queued`` (:func:`voice_queue`) every
    5 ms from creation, and keeps the ``time.monotonic()`` at which the queue, seen holding
    audio, last ran empty (a refill forgets it). The framework reports the end of a sentence
    80-90 ms after that (see :data:`FILLER_LEAD_S`); ``quiet_ms`` lets baton count its settle
    from the real end."""

    def __init__(self, queued: Callable[[], float]) -> None:
        self._queued = queued
        self.drained_at: float | None = None
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        seen = False
        while True:
            if self._queued() > 0:
                seen, self.drained_at = True, None
            elif seen and self.drained_at is None:
                self.drained_at = time.monotonic()
            await asyncio.sleep(0.005)

    def stop(self) -> float | None:
        """Stop watching; the drain time, or None if the voice was never seen or still
        queued."""
        self._task.cancel()
        return self.drained_at


def _started(early: asyncio.Task[bool] | None) -> bool:
    """Whether :func:`start_before_the_end` ran to the filler's start."""
    if early is None or not early.done() or early.cancelled() or early.exception() is not None:
        return False
    return early.result()


def _refused(fut: asyncio.Future[dict[str, Any]]) -> bool:
    """The request's answer is in and is a refusal."""
    return fut.done() and not fut.cancelled() and fut.result().get("type") == "handoff_refused"


@dataclass
class _Asked:
    """A ``handoff`` request sent, and its bundle on its way (see :meth:`BatonLink._request`)."""

    msg: dict[str, Any]
    fut: asyncio.Future[dict[str, Any]]
    bundle: bd.Bundle
    size: int
    upload: asyncio.Task[int]


def _tail_key(item: Mapping[str, Any]) -> tuple[str, Any]:
    kind = item.get("type")
    if kind in ("function_call", "function_call_output"):
        return (str(kind), item.get("call_id"))
    return ("id", item.get("id"))


def context_tail(
    draft: bd.Bundle,
    chat_ctx: llm.ChatContext,
    user_state: Mapping[str, Any],
    *,
    journal: ToolJournal | None = None,
    owed: Iterable[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """What an agent's context (``chat_ctx``, ``user_state`` as the bundle holds it) gained
    since ``draft``, the bundle it sent with a request made at the start of its sentence: the
    chat items that are new or changed, in context order, as bundle items, and the user state
    when it changed (else None): a ``tail``'s content (docs/protocol.md). Only those items are
    serialised: building the whole bundle again took 20-45 ms of the event loop, between the
    agent's last word and its ``quiet``.

    A ``function_call`` or ``function_call_output`` counts by its ``call_id``, not its item id
    (the bundle builder makes the output of the transfer call afresh). The output of a call in
    ``owed`` (default: every call the draft carried in flight) is left out: it reaches the
    target as a ``tool_result``. A call the draft carried in flight that is not owed (it ended
    before the accept) has its output added from ``journal`` when the context lacks it (the
    framework commits a batch's outputs only when the whole batch has returned)."""
    before = {_tail_key(i): i for i in draft["chat"]["items"]}
    flight = [c["call_id"] for c in draft["tool_calls_in_flight"]]
    skip = set(flight) if owed is None else set(owed)
    ended = llm.ChatContext()
    for cid in flight if journal is not None else []:
        jc = journal.get(cid) if journal is not None else None
        answered = any(
            i.type == "function_call_output" and i.call_id == cid for i in chat_ctx.items
        )
        if jc is not None and cid not in skip and not jc.running and not answered:
            _journal_into(ended, jc, [], set())
    items: list[dict[str, Any]] = []
    for item in [*chat_ctx.items, *ended.items]:
        if item.type == "function_call" or item.type == "function_call_output":
            if (item.type, item.call_id) in before or (
                item.type == "function_call_output" and item.call_id in skip
            ):
                continue
            items.append(chat_item_dict(item))
            continue
        old = before.get(("id", item.id))
        if old is None:
            items.append(chat_item_dict(item))
        elif item.type == "message":
            now = chat_item_dict(item)  # a message may have changed: cut by a barge-in
            if (now.get("content"), now.get("interrupted")) != (
                old.get("content"),
                old.get("interrupted"),
            ):
                items.append(now)
    state = dict(user_state)
    return items, (state if state != draft["user_state"] else None)


RECOVERY_GREETING = (
    "The call was cut off for a moment and you are taking it over from where it stopped: your "
    "context holds the conversation so far. Say one short sentence that shows you know what the "
    "caller was talking about (never ask them to repeat it), then carry on."
)
"""The instructions of the reply :func:`default_on_activate` asks for when a replacement is
activated after a crash with ``greeting`` in its ``prepare`` (docs/protocol.md, "Checkpoints,
heartbeats and recovery")."""


async def default_on_activate(link: BatonLink, msg: dict[str, Any]) -> None:
    """Speak first when given the floor: the agent's next reply from its (seeded) context.
    On a handback, tell the caller the transfer did not happen. After a recovery, one short
    sentence that shows the conversation is known (:data:`RECOVERY_GREETING`) when baton's
    ``prepare`` asked for a greeting, else nothing (the caller speaks next)."""
    if msg.get("cause") == "recovery":
        if (link.last_prepare or {}).get("greeting") is True:
            link.session.generate_reply(instructions=RECOVERY_GREETING)
        return
    if msg.get("cause") == "handback":
        target = link.last_failed_target or "the other department"
        link.session.generate_reply(
            instructions=(
                f"The transfer to {target} did not work ({msg.get('reason', 'unknown')}). "
                "Tell the caller briefly and keep helping them yourself."
            )
        )
    else:
        link.session.generate_reply()


def _userdata_dataclass(session: AgentSession[Any]) -> type[Any] | None:
    """The class of ``session``'s userdata when it is a dataclass instance (a received user
    state is rebuilt as it), else None (no userdata, or a mapping, pydantic model, ...)."""
    userdata = session._userdata
    if dataclasses.is_dataclass(userdata) and not isinstance(userdata, type):
        return type(userdata)
    return None


async def default_on_prepare(link: BatonLink, msg: dict[str, Any]) -> None:
    """A standby whose session already runs is chosen as a target (a warm handoff, or the
    replacement of a crashed agent of its name): receive the bundle, give the running agent its
    context (:func:`seed_agent`), take its user state into the session's ``userdata`` (rebuilt
    as the userdata's own dataclass when it is one), and send ``ready``. A ``prepare`` that
    comes before the session runs is left to the entrypoint, which calls
    :meth:`BatonLink.receive_context` and :meth:`BatonLink.ready` itself."""
    if not link._session_running.is_set():
        return
    state_type = _userdata_dataclass(link.session)
    received = await link.receive_context(timeout=10, user_state_type=state_type)
    await seed_agent(link.session.current_agent, received)
    state = received.user_state
    if state is not None and (state_type is None or isinstance(state, state_type)):
        link.session.userdata = state
    await link.ready(received.handoff_id)
    log.info(
        "prepared while on standby: %s from %s, %d items",
        received.cause,
        received.from_agent,
        len(received.chat_ctx.items),
    )


async def default_on_tool_result(link: BatonLink, msg: dict[str, Any]) -> None:
    """After a late tool result was appended to the context: when this agent holds the floor,
    let the model tell the caller (the result may answer what the caller is waiting for)."""
    if link.floor.active:
        link.session.generate_reply(
            instructions=(
                f"The result of {msg.get('name')}, which was still running when the call was "
                "handed to you, has arrived (see the latest tool output). Tell the caller what "
                "it means, briefly, without repeating what you already said."
            )
        )


class BatonLink:
    """Links an ``AgentSession`` in a LiveKit room to baton. Create with :meth:`attach`."""

    def __init__(
        self,
        room: rtc.Room,
        session: AgentSession[Any],
        *,
        agent_name: str,
        role: str | None = None,
        job_ctx: JobContext | None = None,
        on_activate: ActivateHook | None = default_on_activate,
        on_release: EventHook | None = None,
        on_prepare: EventHook | None = default_on_prepare,
        on_tool_result: EventHook | None = default_on_tool_result,
        user_state_serializer: Callable[[Any], Mapping[str, Any]] | None = None,
        transcription: bool = True,
        heartbeat_ms: int | None = HEARTBEAT_MS,
        checkpoints: bool = True,
        source_filler: bool = True,
        early_request: bool = True,
    ) -> None:
        self.room = room
        self.session = session
        self.agent_name = agent_name
        self.job_ctx = job_ctx
        self.baton_identity: str | None = None
        self.effects = SessionEffects(session, transcription=transcription)
        self.floor = FloorClient(
            agent_name,
            self,
            self.effects,
            role=role,
            listener=self._on_floor_event,
            heartbeat_ms=heartbeat_ms,
        )
        self.spans = HandoffSpans(agent_name)
        """This agent's spans of each handoff, under baton's (see :mod:`lk_baton.spans`)."""
        self.heartbeat = HeartbeatSender(heartbeat_ms) if heartbeat_ms else None
        """The heartbeat to baton (None: not sent, and ``hello`` does not announce it)."""
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.on_activate = on_activate
        self.on_release = on_release
        self.on_prepare = on_prepare
        self.user_state_serializer = user_state_serializer
        self.last_failed_target: str | None = None
        self.last_prepare: dict[str, Any] | None = None
        """The last ``prepare`` baton sent (kept after the activation it leads to)."""
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        """Every floor event with its ``time.time()``, for logs and reports."""
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()
        self._answer_timeout = 5.0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._bundle_unavailable: set[str] = set()
        self._cancelled: dict[str, str] = {}
        self._session_running = asyncio.Event()
        if session.agent_state != "initializing":
            self._session_running.set()
        self.refusals = RefusalLog("control messages and transfers from participants not baton's")
        """Security log of what this agent refused (rate-limited; ``total`` counts them all)."""
        self.journal = journal_for(session)
        """The session's tool-call journal (:func:`journal_for`)."""
        self.on_tool_result = on_tool_result
        self.late_results: list[dict[str, Any]] = []
        """Every late ``tool_result`` applied to this agent's context, in arrival order."""
        self._late_seen: set[str] = set()
        self.agent_state: dict[str, Any] = {}
        """What this agent tried and how it ended (``attempts``, ``outcome``, ``data``, as in a
        bundle's ``agent_state``), carried in its checkpoints; the app may set it."""
        self.checkpoints = (
            cp.CheckpointTracker(agent_name, item_id=_chat_item_id, item_dict=chat_item_dict)
            if checkpoints
            else None
        )
        """The checkpoint stream to baton (docs/protocol.md, "Checkpoints"): sent at every turn
        boundary and around every tool call while this agent holds the floor. None: off."""
        self._checkpoint_scheduled = False
        self._checkpoint_hold = False
        self._checkpoint_after_words = False
        self.on_checkpoint_acked: Callable[[BatonLink], None] | None = None
        """Called after baton acknowledged a checkpoint (``self.checkpoints.acked_seq``)."""
        self.filler = SourceFiller(room, speaking=self.effects.speaking) if source_filler else None
        """This agent's own filler on its ``baton-filler`` track (:mod:`lk_baton.filler`),
        played from the end of a handoff's sentence until baton's ``filler_stop``. None: off
        (``source_filler=False``). Nothing is published before the first handoff."""
        self.early_request = early_request
        """:meth:`handoff` asks at the start of the sentence said with the transfer tool, not
        at its end (``early_request=False``: the older order); see :meth:`handoff`."""
        self._tails: list[dict[str, Any]] = []
        self._handing_over: str | None = None
        """The handoff asked at a tool call whose running calls were handed over at its accept,
        until :meth:`handoff` returns."""
        """``tail`` messages of the handoff this agent is the target of, until applied."""
        self._filler_owned = False
        """A handoff() call drives the filler (one at a time)."""
        self._filler_handoff: str | None = None
        """The handoff the filler last started for: its id once accepted, "" until then, None
        before any; a ``filler_stop`` naming another is ignored."""

    # -- construction --

    @classmethod
    async def attach(
        cls,
        ctx_or_room: JobContext | rtc.Room,
        session: AgentSession[Any],
        *,
        agent_name: str | None = None,
        baton_identity: str | None = None,
        role: str | None = None,
        find_timeout: float = 5.0,
        answer_timeout: float = 5.0,
        **options: Any,
    ) -> BatonLink:
        """Silence ``session``, find baton, say ``hello`` (again every second until answered,
        see :func:`lk_baton.floor.hello_schedule`) and wait (up to ``answer_timeout``) for
        baton's answer: ``activate`` (we hold the floor), ``prepare`` (we are a handoff target:
        call :meth:`receive_context`) or ``deactivate`` (standby).

        Call once per job, after ``ctx.connect()`` and preferably before ``session.start``
        (then nothing is heard before baton says so). ``agent_name`` defaults to the job's
        dispatch name; it must equal the participant's ``lk.agent.name`` attribute.

        baton is the participant of kind agent whose attribute ``baton.role`` is
        ``coordinator`` (:func:`lk_baton.floor.is_coordinator`); ``baton_identity`` narrows
        that to one identity. From then on the room's control messages and transfers
        (``baton.xfer``) are taken from that participant only; anyone else's are refused
        without being stored (a transfer OPEN is answered ``not_authorized``) and counted in
        :attr:`refusals`. Raises :class:`CoordinatorMissing` (code ``coordinator_missing``,
        also logged as an error) when no such participant is in the room after
        ``find_timeout`` seconds (5 by default: baton joins a room it is dispatched to within
        about a second), :class:`MessageTooLarge` when ``agent_name`` or
        ``role`` cannot fit a ``hello``. Further keyword ``options`` go to the
        constructor (``on_activate``, ``on_release``, ``on_prepare``, ``user_state_serializer``,
        ``transcription``, ``heartbeat_ms``: milliseconds between heartbeats, sent from the
        first ``hello`` on, or None for none; ``checkpoints``; ``source_filler``: False for
        no filler track of this agent's own, see :meth:`handoff`).
        """
        room, job_ctx = _room_and_job(ctx_or_room)
        if agent_name is None:
            if job_ctx is None or not job_ctx.job.agent_name:
                raise ValueError(
                    "agent_name is required when not attaching with a named JobContext"
                )
            agent_name = job_ctx.job.agent_name
        link = cls(room, session, agent_name=agent_name, role=role, job_ctx=job_ctx, **options)
        # capture bundles from now on (a bundle may arrive right after prepare), from baton only
        transport_for(room).accept_from = link._accepts_transfer_from
        link._answer_timeout = answer_timeout
        link._listen()
        link.baton_identity = await link._find_baton(baton_identity, find_timeout)
        if link.heartbeat is not None:
            # its own task: a hung event loop stops it, and baton then replaces this agent
            link._heartbeat_task = asyncio.ensure_future(link.heartbeat.run(link._send_lossy))
        await link._greet(answer_timeout)
        return link

    async def _greet(self, answer_timeout: float, every: float = HELLO_RETRY) -> None:
        """Say ``hello`` at the times of :func:`lk_baton.floor.hello_schedule` until baton
        answers (any answer ends it); returns at the answer or right after the last ``hello``
        at ``answer_timeout``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for at in hello_schedule(answer_timeout, every):
            left = start + at - loop.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered.wait(), left)
            if self._answered.is_set():
                return
            self.floor.hello()

    def _listen(self) -> None:
        self.room.on("data_received", self._on_data)
        self.room.on("reconnected", self._on_reconnected)
        self.room.on("participant_connected", self._on_participant_connected)
        self.session.on("agent_state_changed", self._on_agent_state)
        self.session.on("function_tools_executed", self._on_tools_executed)
        self.session.on("conversation_item_added", self._on_item_added)
        self.session.on("tool_execution_updated", self._on_tool_update)
        self.session.on("close", self._on_session_close)
        self.journal.listeners.append(self._on_call_ended)
        link = weakref.ref(self)
        _MAY_REPLY[self.session] = lambda: (it := link()) is None or it.floor.active
        self._writer = asyncio.ensure_future(self._write_loop())

    async def aclose(self) -> None:
        self._closed = True
        self.spans.end_all(error="adapter closed")
        room_events: list[tuple[EventTypes, Callable[..., None]]] = [
            ("data_received", self._on_data),
            ("reconnected", self._on_reconnected),
            ("participant_connected", self._on_participant_connected),
        ]
        for ev, cb in room_events:
            with contextlib.suppress(Exception):
                self.room.off(ev, cb)
        with contextlib.suppress(Exception):
            self.session.off("agent_state_changed", self._on_agent_state)
            self.session.off("function_tools_executed", self._on_tools_executed)
            self.session.off("conversation_item_added", self._on_item_added)
            self.session.off("tool_execution_updated", self._on_tool_update)
            self.session.off("close", self._on_session_close)
        with contextlib.suppress(ValueError):
            self.journal.listeners.remove(self._on_call_ended)
        _MAY_REPLY.pop(self.session, None)
        for t in [self._writer, self._heartbeat_task, *self._tasks]:
            if t is not None:
                t.cancel()
        if self.filler is not None:
            # its own tasks are cancelled; the track is unpublished if the room is still there
            await self.filler.aclose()

    async def _find_baton(self, identity: str | None, timeout: float) -> str:
        def look() -> str | None:
            for p in self.room.remote_participants.values():
                if is_coordinator(p) and identity in (None, p.identity):
                    return p.identity
            return None

        found = asyncio.Event()

        def poke(*_: Any) -> None:
            found.set()

        self.room.on("participant_connected", poke)
        self.room.on("participant_attributes_changed", poke)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while (who := look()) is None:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    missing = CoordinatorMissing(self.room.name, timeout, identity)
                    log.error("%s", missing)
                    raise missing
                found.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(found.wait(), left)
            return who
        finally:
            self.room.off("participant_connected", poke)
            self.room.off("participant_attributes_changed", poke)

    # -- sending (ControlSender) --

    def send(self, msg: dict[str, Any]) -> None:
        self._outbox.put_nowait(msg)

    async def _write_loop(self) -> None:
        while True:
            msg = await self._outbox.get()
            dest = self.baton_identity
            if dest is None:
                log.warning("dropping %s: baton not found yet", msg.get("type"))
                continue
            try:
                # FloorClient checked the size when it built msg: this does not raise.
                payload = encode_control(msg)
                await self.room.local_participant.publish_data(
                    payload, reliable=True, destination_identities=[dest], topic=CONTROL_TOPIC
                )
            except Exception:
                log.warning("could not send %s to baton", msg.get("type"), exc_info=True)

    async def _send_lossy(self, payload: bytes) -> None:
        """Publish a heartbeat: lossy (a late one is worthless), to baton only."""
        dest = self.baton_identity
        if dest is not None:
            await self.room.local_participant.publish_data(
                payload, reliable=False, destination_identities=[dest], topic=CONTROL_TOPIC
            )

    # -- room and session callbacks --

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic != CONTROL_TOPIC:
            return
        p = packet.participant
        if p is None or p.identity != self.baton_identity or not is_coordinator(p):
            who = p.identity if p is not None else "?"
            self.refusals.refused(time.monotonic(), who, f"{CONTROL_TOPIC} packet")
            return
        try:
            msg = decode_control(packet.data)
        except ControlDecodeError as e:
            log.warning("rejected control message from baton: %s", e)
            return
        if msg.get("type") in ("activate", "deactivate", "prepare"):
            # an answer to hello, also when FloorClient ignores it as a repeat
            self._answered.set()
        self.floor.handle(msg)

    def _accepts_transfer_from(self, participant: rtc.RemoteParticipant | None) -> bool:
        """The room transport's gate: transfers from baton's participant only."""
        if is_coordinator(participant):
            return True
        who = participant.identity if participant is not None else "?"
        self.refusals.refused(time.monotonic(), who, "baton.xfer frame")
        return False

    def _on_reconnected(self, *_: Any) -> None:
        if self.checkpoints is not None:
            self.checkpoints.need_base()  # what baton holds of ours is unknown now
        self.floor.hello()
        self.floor.resend_requests()  # an answer lost in the reconnect: baton answers it again

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.baton_identity:
            if self.checkpoints is not None:
                self.checkpoints.need_base()  # a restarted baton holds nothing of ours
            # baton came back (restarted, or another worker's baton took the room over): it
            # needs our hello before it talks to us, and the first hello can overtake the news
            # of our participant at the new baton and be dropped, so say it again on
            # hello_schedule until baton answers, as attach does.
            self._answered.clear()
            self._spawn(self._greet_then_resend(self._answer_timeout))

    async def _greet_then_resend(self, answer_timeout: float) -> None:
        """:meth:`_greet` a baton that came back, then send our unanswered ``handoff`` requests
        again: sent before its answer to our ``hello``, a request reached a baton that had not
        given us the floor back yet, and was refused (``not_floor_holder``)."""
        await self._greet(answer_timeout)
        self.floor.resend_requests()

    def _on_agent_state(self, ev: AgentStateChangedEvent) -> None:
        if ev.new_state != "initializing":
            self._session_running.set()
        if ev.new_state == "speaking":
            self.spans.end("activate")  # the first speech after the activation
            self._activation_checkpoint()
        self.floor.speaking_changed(ev.new_state == "speaking")

    def _on_session_close(self, ev: CloseEvent) -> None:
        # the session (and with it the job's audio) is over: no filler may outlive it
        if self.filler is not None:
            self._spawn(self.filler.aclose())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("baton hook failed", exc_info=e)

    def _on_floor_event(self, kind: FloorEventKind, msg: dict[str, Any]) -> None:
        self.events.append((time.time(), kind, msg))
        self._trace_floor_event(kind, msg)
        if kind in ("activated", "deactivated", "prepare"):
            self._answered.set()
        if kind == "activated" and self.filler is not None:
            # the floor is ours again (a handback): the filler covers until we are heard
            self.filler.hold_until_speaking(FILLER_HOLD_S)
        elif kind == "release" and self.filler is not None:
            # the target has the floor: baton's filler_stop comes once it is heard, and baton
            # gives up waiting after its filler_hold (1.2 s); a baton that died meanwhile
            # sends none, and our filler must not run on under the target's voice
            self.filler.hold_until_speaking(FILLER_HOLD_S)
        elif kind == "deactivated" and self.filler is not None and msg.get("reason") != "handoff":
            # told to stand by (a baton that came back after a crash gave the floor to our
            # target; we rejoined after the switch): no filler_stop will come for our filler
            self.filler.stop(FILLER_STOP_FADE_MS, why="deactivated")
        elif kind == "filler_stop" and self.filler is not None:
            hid = msg.get("handoff")
            if self._filler_handoff is not None and hid != self._filler_handoff:
                # a late stop for an earlier handoff must not end this one's filler
                playing_for = repr(self._filler_handoff) if self._filler_handoff else "a request"
                log.info("filler_stop for %r ignored: the filler plays for %s", hid, playing_for)
            else:
                self.filler.stop(filler_fade_ms(msg), why="filler_stop")
        if kind == "bundle_unavailable":
            self._bundle_unavailable.add(str(msg.get("handoff")))
        elif kind == "handoff_cancelled":
            self._cancelled[str(msg.get("handoff"))] = str(msg.get("reason", ""))
            self._tails = [t for t in self._tails if t.get("handoff") != msg.get("handoff")]
        elif kind == "prepare":
            self.last_prepare = msg
        elif kind == "handoff_failed":
            self.last_failed_target = str(msg.get("target") or "") or None
        elif kind == "tool_result":
            self._spawn(self._apply_tool_result(msg))
        elif kind == "tail":
            self._tails.append(msg)
            if self.floor.active:  # a late one: the activation has applied the others
                self._spawn(self._apply_tails())
        elif kind == "activated" and self.checkpoints is not None:
            self._checkpoint_hold = False
            self.checkpoints.need_base()
            # Not now: built on the event loop, the base checkpoint would run before the first
            # reply the activation asks for, and the caller would wait for it.
            self._checkpoint_after_words = True
            asyncio.get_running_loop().call_later(
                ACTIVATION_CHECKPOINT_WAIT_S, self._activation_checkpoint
            )
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        hook: EventHook | None = {
            "activated": self.on_activate,
            "release": self.on_release if self.on_release is not None else _default_on_release,
            "prepare": self.on_prepare,
        }.get(kind)
        if hook is not None or kind == "activated":
            self._spawn(self._run_hook(hook, msg, after_start=kind == "activated"))

    def _trace_floor_event(self, kind: FloorEventKind, msg: dict[str, Any]) -> None:
        handoff = msg.get("handoff") if isinstance(msg.get("handoff"), str) else None
        if kind == "prepare":
            self.spans.start("prepare", msg)
        elif kind == "deactivated":
            self.spans.end("activate", error="deactivated before speaking")
            if msg.get("reason") == "handoff":
                self.spans.start("quiet", msg)
        elif kind == "quiet" and handoff is not None:
            self.spans.end("quiet", handoff)
        elif kind == "activated":
            self.spans.end("prepare", handoff)
            self.spans.start("activate", msg)
        elif kind in ("handoff_cancelled", "release") and handoff is not None:
            self.spans.end("prepare", handoff, error=str(msg.get("reason") or kind))
            self.spans.end("quiet", handoff)

    async def _run_hook(
        self, hook: EventHook | None, msg: dict[str, Any], *, after_start: bool
    ) -> None:
        if after_start:
            await self._session_running.wait()
            # the source's tail (its last sentence) belongs in the context the reply is made from
            await self._apply_tails()
        if hook is None:
            return
        r = hook(self, msg)
        if r is not None:
            await r

    # -- tool calls across the handoff --

    def _on_tools_executed(self, ev: FunctionToolsExecutedEvent) -> None:
        self.checkpoint_soon()  # the batch's calls and outputs are in the context now
        # A batch that ends after this agent lost the floor (a slow tool next to the transfer)
        # would make its model reply to nobody, and commit that reply as if it was heard.
        if not self.floor.active and ev.has_tool_reply:
            log.info(
                "tool reply cancelled: %s ended after the floor was lost",
                ", ".join(c.name for c in ev.function_calls),
            )
            ev.cancel_tool_reply()

    def _on_item_added(self, ev: ConversationItemAddedEvent) -> None:
        item = ev.item
        if item.type == "message" and item.role == "assistant" and not self.effects.voiced:
            item.interrupted = True  # its output was off: the caller heard none of it
        self.checkpoint_soon()  # a user turn committed, or an agent turn finished/interrupted

    # -- checkpoints (docs/protocol.md, "Checkpoints, heartbeats and recovery") --

    def _on_tool_update(self, ev: ToolExecutionUpdatedEvent) -> None:
        if ev.update.type in ("tool_call_started", "tool_call_ended"):
            self.checkpoint_soon()

    def _activation_checkpoint(self) -> None:
        """The base checkpoint an activation asks for, once: at the first words after it, or
        :data:`ACTIVATION_CHECKPOINT_WAIT_S` after it."""
        if self._checkpoint_after_words:
            self._checkpoint_after_words = False
            self.checkpoint_soon()

    def checkpoint_soon(self) -> None:
        """Checkpoint once the current callback is over (several triggers of one moment, e.g. a
        tool's end and its batch's commit, make one checkpoint)."""
        if self.checkpoints is None or self._checkpoint_scheduled or self._closed:
            return
        self._checkpoint_scheduled = True
        asyncio.get_running_loop().call_soon(self._checkpoint_now)

    def _checkpoint_now(self) -> None:
        self._checkpoint_scheduled = False
        t = self.checkpoints
        dest = self.baton_identity
        if t is None or dest is None or self._closed or not self.floor.active:
            return
        if self._checkpoint_hold:
            return  # a handoff is being asked for: its bundle must be the next transfer
        payload = self.checkpoint_payload()
        if payload is None:
            return
        task = asyncio.ensure_future(send_bundle(self.room, dest, payload, cp.META))
        self._tasks.add(task)
        task.add_done_callback(self._checkpoint_done)

    def checkpoint_payload(self, now: float | None = None) -> bytes | None:
        """The next checkpoint from the session's current agent (its chat context, the
        session's user state, :attr:`agent_state`, its journal calls), or None when one is in
        flight or nothing changed. What a turn costs on the event loop (``bench checkpoint``)."""
        t = self.checkpoints
        if t is None:
            return None
        try:
            agent = self.session.current_agent
        except RuntimeError:
            return None
        try:
            user = self.session.userdata
        except ValueError:
            user = None
        try:
            state = state_to_dict(user, self.user_state_serializer)
        except TypeError as e:
            log.warning("checkpoint without user state: %s", e)
            state = {}
        calls = [
            c for c in self.journal.calls() if c.agent in (None, agent.id) and c.handoff is None
        ]
        journal = [cp.journal_entry(c) for c in calls]
        items = agent.chat_ctx.items
        if running := {c.call_id for c in calls if c.running}:
            # as in a bundle, a running call's own outputs (the "cancelled by barge-in" one, a
            # progress placeholder) stay out: its journal entry speaks for it until it ends
            items = [
                i for i in items if not (i.type == "function_call_output" and i.call_id in running)
            ]
        return t.build(
            items,
            user_state=state,
            agent_state=self.agent_state,
            journal=journal,
            now=time.time() if now is None else now,
        )

    def _resume_checkpoints(self) -> None:
        self._checkpoint_hold = False
        self.checkpoint_soon()

    def _checkpoint_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        t = self.checkpoints
        if t is None:
            return
        if task.cancelled() or task.exception() is not None:
            err = None if task.cancelled() else task.exception()
            log.info("checkpoint %s not applied by baton: %s", t.in_flight, err or "cancelled")
            t.failed()
        else:
            t.acked()
            if self.on_checkpoint_acked is not None:
                self.on_checkpoint_acked(self)
        if t.pending:
            self.checkpoint_soon()

    def _on_call_ended(self, call: ToolCall) -> None:
        """A call carried in flight by our bundle ended: its result is owed to the agent that
        holds the floor now, through baton (once: the journal ends a call once)."""
        if call.handoff is None or (self.floor.active and call.handoff != self._handing_over):
            # not handed over, or the floor came back to us: the framework delivers it. (A
            # handoff asked at the tool call hands its calls over at the accept, while this
            # agent may hold the floor for a moment more, until its deactivate.)
            return
        try:
            self.floor.tool_result(
                call.handoff,
                call.call_id,
                call.name,
                call.output or "",
                is_error=call.is_error,
                status="cancelled" if call.state == "cancelled" else "finished",
            )
        except (ValueError, TypeError) as e:
            log.warning("could not send the late result of %s: %s", call.name, e)

    async def _apply_tails(self) -> None:
        """Put the ``tail`` messages received so far into this agent's context: each item
        replaces the one with its id, or is inserted by its ``created_at`` (a source's last
        sentence goes before the handoff item :func:`seed_agent` stamped at the preparation);
        the last ``user_state`` sent replaces the session's ``userdata`` (rebuilt as its
        dataclass when it is one). Tails of another handoff than the one this agent was last
        prepared for, and items that are not valid chat items, are dropped and logged."""
        tails, self._tails = self._tails, []
        hid = (self.last_prepare or {}).get("handoff")
        items: list[Any] = []
        state: dict[str, Any] | None = None
        for t in tails:
            if t.get("handoff") != hid:
                log.info("ignored tail of handoff %r: prepared for %r", t.get("handoff"), hid)
                continue
            got = t.get("items")
            items += got if isinstance(got, list) else []
            if isinstance(t.get("user_state"), dict):
                state = t["user_state"]
        if not items and state is None:
            return
        received: list[llm.ChatItem] = []
        for raw in items:
            try:
                received += llm.ChatContext.from_dict({"items": [raw]}).items
            except Exception as e:  # pydantic's ValidationError, or a wrong shape
                log.warning("tail of %s: dropped an item that is not a valid chat item: %s", hid, e)
        agent = self.session.current_agent
        ctx = agent.chat_ctx.copy()
        for item in received:
            at = ctx.index_by_id(item.id)
            if at is not None:
                ctx.items[at] = item
            else:
                ctx.insert(item)
        if received:
            await agent.update_chat_ctx(ctx, exclude_invalid_function_calls=False)
        if state is not None:
            cls = _userdata_dataclass(self.session)
            self.session.userdata = state if cls is None else state_from_dict(state, cls)
        log.info(
            "tail of %s applied: %d items%s",
            hid,
            len(received),
            " and the user state" if state is not None else "",
        )

    async def _apply_tool_result(self, msg: dict[str, Any]) -> None:
        """Append a late result (``tool_result`` forwarded by baton) to this agent's context
        once, as the framework appends a deferred tool result: a ``function_call`` and its
        output under the call id plus ``_final``."""
        cid, name, output = msg.get("call_id"), msg.get("name"), msg.get("output")
        if not (isinstance(cid, str) and cid and isinstance(name, str) and isinstance(output, str)):
            log.warning("ignored malformed tool_result %s", msg.get("id"))
            return
        if cid in self._late_seen:
            log.info("ignored repeated tool_result for %s", cid)
            return
        self._late_seen.add(cid)
        is_error = msg.get("is_error") is True
        cancelled = msg.get("status") == "cancelled"
        inherited = self.journal.resolve_inherited(cid, output, is_error=is_error, now=time.time())
        source = str(msg.get("source") or (inherited.from_agent if inherited else "") or "")
        if cancelled:
            output = f"{name} was cancelled at {source or 'the previous agent'}: {output}"
        elif msg.get("truncated") is True:
            output += " [result truncated]"
        await self._session_running.wait()
        agent = self.session.current_agent
        ctx = agent.chat_ctx.copy()
        final = f"{cid}_final"
        if any(getattr(i, "call_id", None) == final for i in ctx.items):
            return
        now = time.time()
        args = inherited.arguments if inherited is not None else "{}"
        ctx.insert(llm.FunctionCall(call_id=final, name=name, arguments=args, created_at=now))
        ctx.insert(
            llm.FunctionCallOutput(
                call_id=final,
                name=name,
                output=output,
                is_error=is_error or cancelled,
                created_at=now,
            )
        )
        await agent.update_chat_ctx(ctx, exclude_invalid_function_calls=False)
        self.late_results.append(msg)
        hook = self.on_tool_result
        if hook is not None:
            r = hook(self, msg)
            if r is not None:
                await r

    # -- text input gate --

    def room_options(self, base: RoomOptions | None = None, **kwargs: Any) -> RoomOptions:
        """``RoomOptions`` whose text input (topic ``lk.chat``) only reaches the agent while it
        holds the floor: every agent in the room receives the caller's chat text, and only the
        active one may answer. ``kwargs`` are passed to ``RoomOptions``; ``base`` is copied."""
        from livekit.agents.voice.room_io import RoomOptions, TextInputOptions

        opts = dataclasses.replace(base, **kwargs) if base is not None else RoomOptions(**kwargs)
        given = opts.get_text_input_options()
        if given is None:
            return opts
        inner = given.text_input_cb

        async def gated(session: AgentSession[Any], ev: TextInputEvent) -> None:
            if not self.floor.active:
                log.info("ignored caller text while not holding the floor: %r", ev.text[:80])
                return
            r = inner(session, ev)
            if r is not None:
                await r

        opts.text_input = TextInputOptions(text_input_cb=gated)
        return opts

    # -- handoff (source side) --

    async def handoff(
        self,
        target: str,
        *,
        reason: str,
        run_ctx: RunContext[Any] | None = None,
        agent: Agent | None = None,
        tried: Iterable[str | Mapping[str, Any]] | None = None,
        outcome: str | None = None,
        data: Mapping[str, Any] | None = None,
        user_state: Any = dataclasses.MISSING,
        tool_calls_in_flight: Sequence[bd.ToolCallInFlight] | None = None,
        timeout: float = 5.0,
        compress: bool = False,
        hint: bool = True,
        filler: bool = True,
        early: bool | None = None,
    ) -> HandoffTicket:
        """Hand the call to ``target``. Call from a ``function_tool`` (pass its ``RunContext``)
        and return ``None`` from the tool so the LLM does not speak again.

        With ``early`` (default: the link's ``early_request``, True), when called with a
        ``run_ctx`` while this agent holds the floor, it asks at once, before the sentence
        said with the tool call has played out: it builds the bundle now, sends ``handoff``
        with ``speaking`` naming the bundle's ``transfer`` id and starts the upload right
        behind it, so baton prepares ``target`` (a standby's ``prepare``, bundle and
        ``ready``, or a dispatch) while the sentence plays. When the sentence has played out
        it sends what the context gained since the bundle (:func:`context_tail`: the
        sentence as heard, the caller's words meanwhile, a changed user state) as ``tail``,
        then ``quiet``; baton switches to a ready target as it reads that ``quiet``. Otherwise
        (``early=False``, or no ``run_ctx``) the older order: with ``hint`` (the default) it
        tells baton the handoff is coming (:meth:`hint`), lets the sentence finish, then
        builds the bundle and sends ``handoff`` (with ``quiet`` when the agent is no longer
        speaking) and the upload.

        With ``filler`` (the default; nothing happens when the link was made with
        ``source_filler=False``) this agent plays its own filler (:mod:`lk_baton.filler`): at
        once it publishes its ``baton-filler`` track (first handoff only, in the background:
        nothing waits for it) and streams silence on it; when at most 40 ms of the sentence's
        audio are left to send (:func:`start_before_the_end`; or once it has played out) it
        starts comfort noise there, if the track is published by then, and the request says
        ``filler: true``. The caller so hears an open line from the end of the sentence, not
        the gap until baton's filler (a network hop later) arrives, nor silence if baton
        dies. A refused or timed-out request, or any error or cancellation before the accept,
        fades it out over 250 ms (a refusal that comes while the sentence plays: no filler at
        its end); after an accept it plays on when this returns, until baton's
        ``filler_stop`` for this handoff, an ``activate`` (then until this agent speaks, at
        most 1.2 s), a ``release`` (at most 1.2 s more), a ``deactivate`` other than the
        handoff's, or 20 s. One call at a time drives the filler: a second call made while one
        runs plays none.

        The sentence is waited for with ``run_ctx.wait_for_playout()`` (safe inside the tool),
        then while the agent is speaking. The bundle holds the agent's own chat context plus
        the call being executed, the session's ``userdata`` (or ``user_state``) through the
        serializer, ``tried``/``outcome``/``data``, and the tool calls in flight (baton holds a
        bundle that arrives before the request naming it, and a refused handoff's upload is
        cancelled). On ``handoff_accepted`` it closes the calls the bundle carries in flight
        in this agent's own context (cancelled by handoff, :func:`release_call`: their tools
        keep running, their results go to ``target``) and returns. Raises
        :class:`HandoffRefused`, and :class:`~lk_baton.floor.MessageTooLarge` (nothing sent)
        when ``target`` or ``reason`` cannot fit a control message.
        """

        def now() -> tuple[Agent, dict[str, Any]]:
            """The agent whose context is handed over, and the user state as a bundle holds it."""
            the_agent = agent if agent is not None else self.session.current_agent
            state = user_state
            if state is dataclasses.MISSING:
                try:
                    state = self.session.userdata
                except ValueError:
                    state = None
            return the_agent, state_to_dict(state, self.user_state_serializer)

        def bundle_now() -> bd.Bundle:
            the_agent, state = now()
            return build_handoff_bundle(
                the_agent.chat_ctx,
                from_agent=self.agent_name,
                to_agent=target,
                reason=reason,
                user_state=state,
                tried=list(tried or []),
                outcome=outcome,
                data=data,
                current_call=run_ctx.function_call if run_ctx is not None else None,
                tool_calls_in_flight=tool_calls_in_flight,
                journal=self.journal,
                agent_id=the_agent.id,
            )

        def tail_now(hid: str, draft: bd.Bundle, owed: set[str]) -> list[dict[str, Any]]:
            """Send what the context gained since ``draft`` as ``tail``; the items sent."""
            try:
                the_agent, state = now()
                items, changed = context_tail(
                    draft, the_agent.chat_ctx, state, journal=self.journal, owed=owed
                )
            except Exception:
                log.warning(
                    "handoff %s: no tail: the context could not be read", hid, exc_info=True
                )
                return []
            sent = self.floor.tail(hid, items, changed)
            log.info(
                "handoff %s: tail of %d items%s in %d messages",
                hid,
                len(items),
                " and the user state" if changed is not None else "",
                len(sent),
            )
            return items

        # Fail before anything is sent: a request that cannot fit one packet, a bundle that
        # cannot be built (user state the serializer refuses). This draft is also the bundle
        # sent if building it again after the sentence fails, and with `early`, the bundle.
        self.floor.check_handoff(target, reason)
        draft = bundle_now()
        early = (self.early_request if early is None else early) and run_ctx is not None
        early = early and self.floor.active
        if hint and self.floor.active and not early:
            self.hint(target)
        # One handoff() at a time drives the filler: a transfer tool called twice at once must
        # not start it twice, and the refusal of the second must not stop the first one's.
        fill = self.filler if filler and not self._filler_owned and not self._closed else None
        if fill is not None:
            self._filler_owned = True
            fill.arm()  # publication and pre-roll run meanwhile; nothing below waits for them
        filling = False
        ahead: asyncio.Task[bool] | None = None
        voice = voice_queue(self.session) if run_ctx is not None else None
        queued = voice if fill is not None else None
        drain = VoiceDrain(voice) if early and voice is not None else None
        asked: _Asked | None = None
        tail: list[dict[str, Any]] = []
        owed: set[str] = set()  # asked early: the calls handed over at the accept
        try:
            if early:
                # The target is prepared while the sentence plays; the sentence and whatever
                # else the context gains meanwhile follow as the `tail`, before our `quiet`.
                self.floor.hold_quiet()
                asked = self._request(
                    target,
                    reason,
                    lambda: draft,
                    draft,
                    speaking=True,
                    filler=fill is not None,
                    compress=compress,
                )
                if fill is not None:
                    self._filler_handoff = ""  # this request's, whose id baton has not given yet
                asked.fut.add_done_callback(lambda f: self._hand_over_running(f, draft, owed))
            if fill is not None and queued is not None:
                ahead = asyncio.ensure_future(start_before_the_end(fill, queued))
                if asked is not None:
                    # refused while the sentence plays: no filler at its end
                    asked.fut.add_done_callback(lambda f: _refused(f) and ahead.cancel())
            try:
                t0, t1, t_quiet = await self._sentence_played_out(target, run_ctx)
            finally:
                if ahead is not None:
                    ahead.cancel()
            refused = asked is not None and _refused(asked.fut)
            # The sentence has played out: our own filler plays by now (started just before
            # the voice's end) or starts now (baton's is a request and a network hop away).
            if _started(ahead):
                filling = True
            elif fill is not None and not refused:
                filling = fill.start()
            if asked is None:
                if filling:
                    self._filler_handoff = ""
                asked = self._request(
                    target,
                    reason,
                    bundle_now,
                    draft,
                    filler=filling,
                    compress=compress,
                    quiet=self.session.agent_state != "speaking",
                    quiet_ms=round((time.monotonic() - t_quiet) * 1000),
                )
            self._log_request(target, asked, (t0, t1, t_quiet), filling)
            answer = await self._answer(asked, target, timeout)
            if early:
                # The tail, then quiet (release_quiet below, or the deactivate if it is still
                # on its way). After a handback meanwhile baton drops the tail, logged.
                tail = tail_now(str(answer.get("handoff") or ""), draft, owed)
        except BaseException:
            # refused, timed out, failed or cancelled before baton accepted: baton owes this
            # filler no filler_stop, so it ends here (or its pre-roll does)
            if fill is not None and (filling or _started(ahead) or fill.mode == "armed"):
                fill.stop(FILLER_STOP_FADE_MS, why="not_accepted")
            raise
        finally:
            if early:
                self.floor.release_quiet(drain.stop() if drain is not None else None)
                self._handing_over = None
            if fill is not None:
                self._filler_owned = False
        bundle = asked.bundle
        hid = str(answer.get("handoff") or "")
        if fill is not None and self._filler_handoff == "":
            self._filler_handoff = hid
        # Asked early, only the calls still running at the accept are handed over (the others
        # ended during the sentence: their outputs went in the tail).
        flight = [c["call_id"] for c in bundle["tool_calls_in_flight"]]
        flight = [c for c in flight if c in owed] if early else flight
        if hid:
            # from here on, a result of these calls is owed to the target (_on_call_ended)
            self.journal.handed_over(flight, hid)
        for cid in flight:
            # and this agent's model must not be left with them open (a realtime model would
            # wait on them after a handback): closed as cancelled by the handoff
            await release_call(self.session, cid, "handoff", target=target)
        return HandoffTicket(
            hid, str(answer.get("target") or target), bundle, asked.size, asked.upload, tail
        )

    def _hand_over_running(
        self, answer: asyncio.Future[dict[str, Any]], draft: bd.Bundle, owed: set[str]
    ) -> None:
        """At the accept of a request made at the tool call: the calls ``draft`` carried in
        flight that are still running are owed to the target from now on (their results go as
        ``tool_result``, :meth:`_on_call_ended`) and are added to ``owed``; one that ended
        during the sentence before this is in the source's context, so in the tail."""
        if answer.cancelled() or answer.result().get("type") != "handoff_accepted":
            return
        hid = str(answer.result().get("handoff") or "")
        for c in draft["tool_calls_in_flight"]:
            call = self.journal.get(c["call_id"])
            if call is None or call.state == "started":
                owed.add(c["call_id"])
        self._handing_over = hid
        self.journal.handed_over(owed, hid)

    async def _sentence_played_out(
        self, target: str, run_ctx: RunContext[Any] | None
    ) -> tuple[float, float, float]:
        """Wait for the sentence said with the tool call, then while the agent is speaking;
        returns ``time.monotonic()`` at the start, when the playout ended, and when quiet."""
        t0 = time.monotonic()
        if run_ctx is not None:
            try:
                await run_ctx.wait_for_playout()
            except RuntimeError as e:  # no generation to wait for
                log.info("handoff to %s: nothing to wait for (%s)", target, e)
        t1 = time.monotonic()
        await self._wait_not_speaking(timeout=10.0)
        return t0, t1, time.monotonic()

    def _request(
        self,
        target: str,
        reason: str,
        bundle_now: Callable[[], bd.Bundle],
        draft: bd.Bundle,
        *,
        filler: bool,
        compress: bool,
        quiet: bool = False,
        quiet_ms: int | None = None,
        speaking: bool = False,
    ) -> _Asked:
        """Send ``handoff`` naming a fresh transfer id, then build the bundle (``bundle_now``,
        or ``draft`` if that fails) and start its upload right behind the request, without
        waiting for the answer (baton holds a bundle that arrives first, and a refused
        handoff's upload is cancelled)."""
        # No checkpoint may start until the bundle is out (one in flight is left to finish: the
        # bundle is named by its transfer id, so baton cannot take one for the other).
        self._checkpoint_hold = True
        dest = self.baton_identity
        assert dest is not None
        tid = new_transfer_id()
        # The request goes before the bundle is built: the filler and the settle before the
        # switch start on it.
        msg, fut = self.floor.request_handoff(
            target,
            reason,
            transfer=f"{tid:032x}",
            quiet=quiet,
            quiet_ms=quiet_ms,
            filler=filler,
            speaking=speaking,
        )
        try:
            bundle = bundle_now()
        except Exception:
            log.warning(
                "handoff to %s: the bundle could not be built again; "
                "sending the one built at the tool call",
                target,
                exc_info=True,
            )
            bundle = draft
        payload = bd.encode_bundle(bundle)
        upload = asyncio.ensure_future(
            send_bundle(self.room, dest, payload, bd.META, compress=compress, transfer_id=tid)
        )
        self._tasks.add(upload)
        upload.add_done_callback(self._upload_done)
        return _Asked(msg, fut, bundle, len(payload), upload)

    def _log_request(
        self, target: str, asked: _Asked, times: tuple[float, float, float], filling: bool
    ) -> None:
        t0, t1, t_quiet = times
        log.info(
            "handoff to %s: sentence played out after %.0f ms, then %.0f ms until not speaking; "
            "bundle %d bytes, sent %s; own filler %s",
            target,
            (t1 - t0) * 1000,
            (t_quiet - t1) * 1000,
            asked.size,
            "at the tool call" if asked.msg.get("speaking") else "after the sentence",
            "on" if filling else "off",
        )

    async def _answer(self, asked: _Asked, target: str, timeout: float) -> dict[str, Any]:
        """baton's ``handoff_accepted`` for ``asked``; raises :class:`HandoffRefused` on a
        refusal or after ``timeout`` seconds (then the upload is cancelled)."""
        try:
            answer = await asyncio.wait_for(asyncio.shield(asked.fut), timeout)
        except TimeoutError:
            self.floor.forget_request(asked.msg["id"])
            asked.upload.cancel()
            self._resume_checkpoints()
            raise HandoffRefused("timeout", target) from None
        if answer["type"] == "handoff_refused":
            asked.upload.cancel()
            self._resume_checkpoints()
            raise HandoffRefused(str(answer.get("reason", "unknown")), target)
        return answer

    def _upload_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("bundle upload to baton failed: %s", task.exception())

    async def _wait_not_speaking(self, timeout: float) -> None:
        await wait_not_speaking(self.session, timeout)

    def _next_event(self) -> asyncio.Future[None]:
        """A future resolved at the next floor event."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    # -- target side --

    @property
    def preparing(self) -> bool:
        """True when baton told us (``prepare``) that we are the target of a handoff."""
        return self.floor.prepare is not None

    async def wait_prepare(self, timeout: float | None = None) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while self.floor.prepare is None:
                await self._next_event()
            return self.floor.prepare

        return await asyncio.wait_for(wait(), timeout)

    async def receive_context(
        self,
        timeout: float | None = 10.0,
        *,
        user_state_type: type[Any] | None = None,
        user_state_deserializer: Callable[[dict[str, Any]], Any] | None = None,
    ) -> ReceivedContext:
        """Wait for ``prepare`` and the bundle baton forwards; return a :class:`ReceivedContext`
        (the chat as a ready ``llm.ChatContext``, the user state as a dict or rebuilt with
        ``user_state_type``/``user_state_deserializer``, the reason, the source).

        Without a bundle (none announced, or ``bundle_unavailable``) the context is empty and
        ``bundle`` is None, with the reason and source from ``prepare``. Raises
        :class:`HandoffCancelled` if baton cancels, ``TimeoutError`` after ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        prep = await self.wait_prepare(left())
        hid = str(prep.get("handoff"))
        source = str(prep.get("source") or "")
        reason = str(prep.get("reason") or "")

        def empty() -> ReceivedContext:
            return ReceivedContext(
                chat_ctx=llm.ChatContext.empty(),
                user_state={}
                if user_state_type is None and user_state_deserializer is None
                else None,
                reason=reason,
                from_agent=source,
                handoff_id=hid,
            )

        if not prep.get("bundle"):
            return empty()
        assert self.baton_identity is not None
        recv = asyncio.ensure_future(receive_bundle(self.room, self.baton_identity, timeout=left()))
        try:
            while not recv.done():
                if hid in self._cancelled:
                    raise HandoffCancelled(hid, self._cancelled[hid])
                if hid in self._bundle_unavailable:
                    return empty()
                changed = self._next_event()
                either: set[asyncio.Future[Any]] = {recv, changed}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            payload, _meta = recv.result()
        finally:
            if not recv.done():
                recv.cancel()
        bundle = bd.decode_bundle(payload)
        received = read_bundle(
            bundle,
            user_state_type=user_state_type,
            user_state_deserializer=user_state_deserializer,
        )
        # The id is prepare's: a source that uploads its bundle with its request cannot know it.
        received = dataclasses.replace(received, handoff_id=hid)
        self.journal.inherit(received.tool_calls_in_flight, received.from_agent)
        self.spans.event(
            "prepare",
            hid,
            "bundle_received",
            bytes=len(payload),
            items=len(received.chat_ctx.items),
        )
        return received

    def hint(self, target: str) -> None:
        """Tell baton a handoff to ``target`` (an agent name) is likely soon: baton dispatches
        it now as a muted standby, so the handoff, if it comes within baton's ``hint_timeout``,
        is a switch instead of a cold start; without one, baton removes it. Call it when the
        model first considers a transfer (e.g. from the transfer tool's first mention, or a rule
        on the caller's words). Cheap and never answered; a hint baton refuses (not the floor
        holder, unknown target, too soon after the last one) is only logged by baton."""
        self.floor.hint(target)

    async def ready(self, handoff_id: str | None = None) -> None:
        """Tell baton we are ready to take the floor (send after ``session.start``)."""
        hid = handoff_id
        if hid is None:
            if self.floor.prepare is None:
                raise BatonError("ready() without a handoff: baton has not sent prepare")
            hid = str(self.floor.prepare.get("handoff"))
        self.floor.ready(hid)
        self.spans.end("prepare", hid)

    async def wait_active(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until baton activates this agent; returns the ``activate``."""

        async def wait() -> dict[str, Any]:
            while not self.floor.active:
                await self._next_event()
            assert self.floor.last_activate is not None
            return self.floor.last_activate

        return await asyncio.wait_for(wait(), timeout)


async def _default_on_release(link: BatonLink, msg: dict[str, Any]) -> None:
    if msg.get("mode") != "leave":
        return  # standby: stay, muted, for a warm handoff back
    if link.job_ctx is not None:
        link.job_ctx.shutdown(reason="baton release")
    else:
        await link.room.disconnect()


def _room_and_job(ctx_or_room: Any) -> tuple[rtc.Room, JobContext | None]:
    from livekit.agents import JobContext

    if isinstance(ctx_or_room, JobContext):
        return ctx_or_room.room, ctx_or_room
    return ctx_or_room, None


async def wait_not_speaking(session: AgentSession[Any], timeout: float) -> None:
    """Returns once the session's agent is not `speaking` (at once if it is not), or after
    `timeout` seconds: the end of the sentence a handoff lets finish."""
    if session.agent_state != "speaking":
        return
    done = asyncio.Event()

    def changed(ev: AgentStateChangedEvent) -> None:
        if ev.new_state != "speaking":
            done.set()

    session.on("agent_state_changed", changed)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
    finally:
        session.off("agent_state_changed", changed)
