//! OpenTelemetry traces: one span per finished handoff, its phases as span events and as
//! child spans, exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! The span is built when the handoff ends, from its timeline, with explicit timestamps: the
//! room task does no tracing work while a handoff runs. Its ids are chosen when the handoff
//! starts ([`TraceParent`]), so the control messages of the handoff can carry them to the
//! agents (`traceparent`, docs/protocol.md section 2) and the adapters' spans land under it. The standard `OTEL_*` variables of the
//! OpenTelemetry SDK apply (`OTEL_SERVICE_NAME`, default `baton`; `OTEL_RESOURCE_ATTRIBUTES`;
//! `OTEL_EXPORTER_OTLP_HEADERS`...). Export runs on the SDK's batch processor thread.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, SystemTime};

use baton_floor::{Kind, Outcome, Phase, Timeline};

use super::event::{outcome_name, phase_name};
use opentelemetry::trace::{
    Span as _, SpanId, SpanKind, Status, TraceContextExt as _, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};

/// The root span's name for a handoff; its children are named after the phase they end in.
pub const HANDOFF_SPAN: &str = "baton.handoff";
/// The root span's name for a recovery (timeline `kind: recovery`).
pub const RECOVERY_SPAN: &str = "baton.recovery";

/// The ids of one handoff's root span, chosen when the handoff starts: what baton sends the
/// agents as `traceparent` and what the exported span carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (W3C: 16 bytes, not all zero).
    pub trace_id: u128,
    /// The root span's id (W3C: 8 bytes, not all zero).
    pub span_id: u64,
}

impl TraceParent {
    /// Fresh random ids (never zero, which W3C Trace Context reserves as invalid).
    pub fn random() -> TraceParent {
        TraceParent { trace_id: rand::random::<u128>().max(1), span_id: rand::random::<u64>().max(1) }
    }
}

/// The `traceparent` value (W3C Trace Context, version 00, sampled):
/// `00-<trace id>-<span id>-01`, lowercase hex.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-01", self.trace_id, self.span_id)
    }
}

thread_local! {
    /// Ids for the next root span this thread starts: [`Traces::handoff`] sets them just before
    /// and the SDK takes each once through [`PresetIds`].
    static PRESET_TRACE: Cell<Option<u128>> = const { Cell::new(None) };
    static PRESET_SPAN: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The SDK picks span and trace ids through its id generator and ignores the span builder's;
/// this one hands out the preset ids once, and random ones otherwise.
#[derive(Debug, Default)]
struct PresetIds(RandomIdGenerator);

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        PRESET_TRACE.with(Cell::take).map_or_else(|| self.0.new_trace_id(), TraceId::from)
    }

    fn new_span_id(&self) -> SpanId {
        PRESET_SPAN.with(Cell::take).map_or_else(|| self.0.new_span_id(), SpanId::from)
    }
}

/// The OTLP trace pipeline.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

impl Traces {
    /// The pipeline, if the environment names an OTLP endpoint.
    pub fn from_env() -> Result<Option<Traces>, String> {
        if !env_set("OTEL_EXPORTER_OTLP_ENDPOINT") && !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("could not set up the OTLP trace exporter: {e}"))?;
        let resource = if env_set("OTEL_SERVICE_NAME") {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("baton").build()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .with_id_generator(PresetIds::default())
            .build();
        let tracer = provider.tracer("baton");
        Ok(Some(Traces { provider, tracer }))
    }

    /// Records one finished handoff or recovery, which ended at `finished` (wall clock), as a
    /// root span with the ids of `parent` when the coordinator sent them to the agents (fresh
    /// ones otherwise).
    pub fn handoff(&self, room: &str, t: &Timeline, finished: SystemTime, parent: Option<TraceParent>) {
        let end_ms = t.phases.iter().map(|m| m.ms).max().unwrap_or(0);
        let start = finished.checked_sub(Duration::from_millis(end_ms)).unwrap_or(finished);
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut attributes = vec![
            KeyValue::new("baton.room", room.to_string()),
            KeyValue::new("baton.handoff.id", t.handoff.clone()),
            KeyValue::new("baton.handoff.source", t.source.clone()),
            KeyValue::new("baton.handoff.target", t.target.clone()),
            KeyValue::new("baton.handoff.requested_target", t.requested_target.clone()),
            KeyValue::new("baton.handoff.reason", t.reason.clone()),
            KeyValue::new("baton.handoff.warm", t.warm),
            KeyValue::new("baton.handoff.outcome", t.outcome.map_or("unknown", outcome_name)),
        ];
        if let Some(bytes) = t.bundle_bytes {
            attributes.push(KeyValue::new("baton.bundle.bytes", i64::try_from(bytes).unwrap_or(i64::MAX)));
        }
        let name = if t.kind == Kind::Recovery { RECOVERY_SPAN } else { HANDOFF_SPAN };
        if let Some(p) = parent {
            PRESET_TRACE.with(|c| c.set(Some(p.trace_id)));
            PRESET_SPAN.with(|c| c.set(Some(p.span_id)));
        }
        let mut root = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&self.tracer);
        PRESET_TRACE.with(Cell::take);
        PRESET_SPAN.with(Cell::take);
        for mark in &t.phases {
            let mut fields =
                vec![KeyValue::new("baton.handoff.ms", i64::try_from(mark.ms).unwrap_or(i64::MAX))];
            if let Some(detail) = &mark.detail {
                fields.push(KeyValue::new("baton.handoff.detail", detail.clone()));
            }
            root.add_event_with_timestamp(phase_name(mark.phase), at(mark.ms), fields);
        }
        if t.outcome != Some(Outcome::Completed) {
            let why = t.failure.map(|f| f.as_str()).unwrap_or("handoff did not complete");
            root.set_status(Status::error(why));
        }
        let cx = Context::current_with_span(root);
        // Each phase as the stretch from the previous mark to it: where the time went.
        let mut previous = 0;
        for mark in t.phases.iter().filter(|m| m.phase != Phase::Requested) {
            let mut span = self
                .tracer
                .span_builder(phase_name(mark.phase))
                .with_start_time(at(previous))
                .with_attributes([KeyValue::new("baton.handoff.phase", phase_name(mark.phase))])
                .start_with_context(&self.tracer, &cx);
            if let Some(detail) = &mark.detail {
                span.set_attribute(KeyValue::new("baton.handoff.detail", detail.clone()));
            }
            span.end_with_timestamp(at(mark.ms.max(previous)));
            previous = previous.max(mark.ms);
        }
        if let (Some(on), Some(off)) = (t.ms(Phase::FillerOn), t.ms(Phase::FillerOff)) {
            let mut filler = self
                .tracer
                .span_builder("filler")
                .with_start_time(at(on))
                .start_with_context(&self.tracer, &cx);
            filler.end_with_timestamp(at(off.max(on)));
        }
        cx.span().end_with_timestamp(at(end_ms));
    }

    /// Exports what is buffered and stops the pipeline (blocks up to `limit`).
    pub fn shutdown(&self, limit: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(limit) {
            tracing::warn!(error = %e, "traces not all exported at exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_version_00_sampled() {
        let t = TraceParent {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 0x00f0_67aa_0ba9_02b7,
        };
        assert_eq!(t.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let r = TraceParent::random();
        assert!(r.trace_id != 0 && r.span_id != 0);
        assert_eq!(r.to_string().len(), baton_floor::TRACEPARENT_LEN);
    }

    #[test]
    fn preset_ids_are_handed_out_once_then_random_ones() {
        let ids = PresetIds::default();
        PRESET_TRACE.with(|c| c.set(Some(7)));
        PRESET_SPAN.with(|c| c.set(Some(9)));
        assert_eq!(ids.new_span_id(), SpanId::from(9_u64));
        assert_eq!(ids.new_trace_id(), TraceId::from(7_u128));
        assert_ne!(ids.new_span_id(), SpanId::from(9_u64), "a child span gets a fresh id");
        assert_ne!(ids.new_trace_id(), TraceId::from(7_u128));
    }
}
