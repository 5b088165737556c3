//! OpenTelemetry traces: one span per finished handoff, its phases as span events and as
//! child spans, exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! The span is built when the handoff ends, from its timeline, with explicit timestamps: the
//! room task does no tracing work while a handoff runs. The standard `OTEL_*` variables of the
//! OpenTelemetry SDK apply (`OTEL_SERVICE_NAME`, default `baton`; `OTEL_RESOURCE_ATTRIBUTES`;
//! `OTEL_EXPORTER_OTLP_HEADERS`...). Export runs on the SDK's batch processor thread.

use std::time::{Duration, SystemTime};

use baton_floor::{Outcome, Phase, Timeline};

use super::event::{outcome_name, phase_name};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// The root span's name; its children are named after the phase they end in.
pub const HANDOFF_SPAN: &str = "baton.handoff";

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
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let tracer = provider.tracer("baton");
        Ok(Some(Traces { provider, tracer }))
    }

    /// Records one finished handoff, which ended at `finished` (wall clock).
    pub fn handoff(&self, room: &str, t: &Timeline, finished: SystemTime) {
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
        let mut root = self
            .tracer
            .span_builder(HANDOFF_SPAN)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .start(&self.tracer);
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
