"""The adapter's part of a handoff as OpenTelemetry spans, under baton's span of that handoff.

While baton exports traces, its control messages about a handoff or a recovery carry the W3C
``traceparent`` of the handoff's root span (docs/protocol.md section 2). :class:`HandoffSpans`
starts this agent's spans with that span as their parent, through livekit-agents' tracer, so
they reach whatever backend the worker's tracer provider exports to
(``livekit.agents.telemetry.set_tracer_provider``) and line up with baton's in one trace:

* ``baton.agent.prepare``: the target, from ``prepare`` to ``ready`` (loading the context);
* ``baton.agent.quiet``: the source, from ``deactivate`` (handoff) to ``quiet`` (finishing its
  sentence);
* ``baton.agent.activate``: the agent given the floor, from ``activate`` to its first speech.

A message without a valid ``traceparent`` starts nothing; with no tracer provider set the
spans are livekit-agents' no-op ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from livekit.agents.telemetry import tracer
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Part = Literal["prepare", "quiet", "activate"]

SPAN_NAMES: dict[Part, str] = {
    "prepare": "baton.agent.prepare",
    "quiet": "baton.agent.quiet",
    "activate": "baton.agent.activate",
}

MAX_OPEN_SPANS = 8
"""Spans open at once: a handoff has at most three parts here, and a span whose end never
comes (baton left mid-handoff) must not pile up."""

_PROPAGATOR = TraceContextTextMapPropagator()


def parent_context(msg: Mapping[str, Any]) -> Context | None:
    """The context of baton's span named by ``msg["traceparent"]``, or ``None`` when the member
    is absent or not a valid W3C ``traceparent``."""
    value = msg.get("traceparent")
    if not isinstance(value, str):
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


class HandoffSpans:
    """This agent's open spans, one per (handoff id, part)."""

    def __init__(self, agent_name: str) -> None:
        self.agent_name = agent_name
        self._open: dict[tuple[str, Part], Span] = {}

    def start(self, part: Part, msg: Mapping[str, Any]) -> None:
        """Start ``part`` of the handoff ``msg`` is about, if ``msg`` names baton's span."""
        ctx = parent_context(msg)
        handoff = msg.get("handoff")
        if ctx is None or not isinstance(handoff, str) or (handoff, part) in self._open:
            return
        if len(self._open) >= MAX_OPEN_SPANS:
            oldest = next(iter(self._open))
            self._open.pop(oldest).end()
        attributes: dict[str, Any] = {
            "baton.agent.name": self.agent_name,
            "baton.handoff.id": handoff,
        }
        for key in ("source", "cause", "reason"):
            value = msg.get(key)
            if isinstance(value, str) and part != "quiet":
                attributes[f"baton.handoff.{key}"] = value
        self._open[(handoff, part)] = tracer.start_span(
            SPAN_NAMES[part], context=ctx, attributes=attributes
        )

    def event(self, part: Part, handoff: str, name: str, **attributes: Any) -> None:
        """Add an event to an open span (nothing when it is not open)."""
        span = self._open.get((handoff, part))
        if span is not None:
            span.add_event(name, attributes)

    def end(self, part: Part, handoff: str | None = None, *, error: str | None = None) -> None:
        """End ``part`` of ``handoff`` (of every handoff when ``None``); ``error``: it failed."""
        for key in [k for k in self._open if k[1] == part and (handoff is None or k[0] == handoff)]:
            span = self._open.pop(key)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()

    def end_all(self, *, error: str | None = None) -> None:
        for part in SPAN_NAMES:
            self.end(part, error=error)
