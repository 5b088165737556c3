"""The adapter's handoff spans hang under the span baton names in ``traceparent``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from livekit.agents.telemetry import set_tracer_provider
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from lk_baton.spans import MAX_OPEN_SPANS, HandoffSpans

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        set_tracer_provider(trace.NoOpTracerProvider())


def test_prepare_to_ready_is_a_child_of_batons_span(exported: InMemorySpanExporter) -> None:
    spans = HandoffSpans("billing")
    prepare = {"type": "prepare", "handoff": "h-1", "source": "triage", "reason": "refund"}
    spans.start("prepare", {**prepare, "traceparent": TRACEPARENT})
    spans.event("prepare", "h-1", "bundle_received", bytes=10)
    spans.end("prepare", "h-1")
    (span,) = exported.get_finished_spans()
    assert span.name == "baton.agent.prepare"
    assert span.parent is not None and span.parent.is_remote
    assert (f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}") == (TRACE, PARENT)
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.attributes is not None
    assert span.attributes["baton.handoff.source"] == "triage"
    assert span.attributes["baton.agent.name"] == "billing"
    assert [e.name for e in span.events] == ["bundle_received"]


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        7,
        "",
        "garbage",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-{PARENT}",
    ],
)
def test_no_valid_traceparent_starts_nothing(
    exported: InMemorySpanExporter, traceparent: object
) -> None:
    spans = HandoffSpans("billing")
    msg = {"type": "prepare", "handoff": "h-1"}
    if traceparent is not None:
        msg["traceparent"] = traceparent  # type: ignore[assignment]
    spans.start("prepare", msg)
    spans.end_all()
    assert exported.get_finished_spans() == ()


def test_an_unfinished_part_fails_and_open_spans_are_bounded(
    exported: InMemorySpanExporter,
) -> None:
    spans = HandoffSpans("triage")
    for n in range(MAX_OPEN_SPANS + 3):
        spans.start("quiet", {"handoff": f"h-{n}", "traceparent": TRACEPARENT})
    assert len(exported.get_finished_spans()) == 3, "the oldest were ended to make room"
    spans.end_all(error="adapter closed")
    done = exported.get_finished_spans()
    assert len(done) == MAX_OPEN_SPANS + 3
    assert sum(s.status.status_code == StatusCode.ERROR for s in done) == MAX_OPEN_SPANS
