//! Prometheus metrics, counted from the event stream and served at `/metrics`.
//!
//! Names follow the Prometheus conventions (<https://prometheus.io/docs/practices/naming/>):
//! prefix `baton_`, base units in the name (`_seconds`, `_bytes`), counters ending in `_total`.
//! The `prometheus-client` crate writes the OpenMetrics text format (which appends `_total`
//! to counters and the unit to names registered with one). Every metric is listed in
//! `docs/events.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};

use super::event::{Event, outcome_name, phase_name};
use baton_floor::{Alert, Kind, Outcome, Phase, SecurityReason, Timeline};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffLabels {
    source: String,
    target: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecoveryLabels {
    agent: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    alert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    sink: String,
    reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Handoff phases last from tens of milliseconds (a warm switch) to tens of seconds (a cold
/// dispatch that times out): 25 ms to 51.2 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.025, 2.0, 12))
}

/// Bundles: 1 KiB to 256 MiB, by fours.
fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1024.0, 4.0, 10))
}

/// Registers `metric` as `name` (prefixed `baton_`, with `unit` appended if any) and returns it:
/// the registry holds a clone that shares the same atomics, so each metric is made, named and
/// described in one place.
fn registered<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

/// Why events left the stream unsent; each is a label value of `baton_events_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The webhook queue was full.
    QueueFull,
    /// The receiver refused the event with a 4xx status that retrying cannot change.
    Rejected,
    /// Retries went on for longer than the webhook's give-up age.
    Expired,
    /// baton exited with the event still queued.
    Shutdown,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Rejected => "rejected",
            Dropped::Expired => "expired",
            Dropped::Shutdown => "shutdown",
        }
    }
}

/// Something the metrics count that is not an event of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stat {
    /// A checkpoint was merged into the room's state: its payload size, and what the room's
    /// merged checkpoints take after it (bytes).
    CheckpointApplied { bytes: u64, state_bytes: u64 },
    /// A checkpoint was refused or its transfer failed.
    CheckpointRejected,
    /// baton delivered a bundle: chunk bytes sent, and of those the bytes sent again.
    BundleDelivered { bytes_sent: u64, bytes_resent: u64 },
    /// A context-transfer frame was refused (undecodable, unknown transfer, over a limit,
    /// unauthorized sender).
    TransferFrameRejected,
    /// A control message was dropped before the floor arbiter saw it, by the decoder's reason
    /// (`too_large`, `malformed`, `unsupported_version`, `unknown_type`, `invalid`).
    ControlUndecodable(&'static str),
}

/// Bucket bounds of `baton_handoff_caller_gap_seconds` (s): fine around the 60 ms a caller
/// starts to notice, coarse beyond.
const GAP_BUCKETS: [f64; 9] = [0.0, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0, 2.0];

/// The longest silence (ms) baton saw between a completed handoff's source and its target, from
/// the timeline's marks: the source quiet before the filler came on, the filler gone before the
/// target was heard, or, with no filler, quiet to heard. `None` when a mark it needs is missing
/// (no `source_quiet` or `target_audible`: a failed handoff or one never heard). The marks come
/// from speaking signals (the agent's `lk.agent.state`, the SFU's active speakers), so this is
/// a lower bound on what the caller hears: the network and the caller's jitter buffer add to it.
pub fn caller_gap_ms(t: &Timeline) -> Option<u64> {
    if t.outcome != Some(Outcome::Completed) {
        return None;
    }
    let quiet = t.ms(Phase::SourceQuiet)?;
    let heard = t.ms(Phase::TargetAudible)?;
    Some(match (t.ms(Phase::FillerOn), t.ms(Phase::FillerOff)) {
        (Some(on), Some(off)) => on.saturating_sub(quiet).max(heard.saturating_sub(off)),
        (Some(on), None) => on.saturating_sub(quiet),
        _ => heard.saturating_sub(quiet),
    })
}

/// baton's metrics. Cheap to update from any thread (atomics); [`Metrics::encode`] renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rooms: Gauge,
    rooms_joined: Counter,
    events: Family<EventLabels, Counter>,
    handoffs: Family<HandoffLabels, Counter>,
    recoveries: Family<RecoveryLabels, Counter>,
    recovery_to_audible: Histogram,
    handoff_duration: HistogramFamily<OutcomeLabels>,
    phase: HistogramFamily<PhaseLabels>,
    request_to_audible: Histogram,
    filler: Histogram,
    caller_gap: Histogram,
    bundle: Histogram,
    refusals: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    webhook_delivered: Counter,
    webhook_failed_attempts: Counter,
    webhook_queue: Gauge,
    store_errors: Counter,
    store_degraded: Gauge,
    checkpoints: Family<OutcomeLabels, Counter>,
    checkpoint_bytes: Histogram,
    checkpoint_state: Histogram,
    delivered_bytes: Counter,
    resent_bytes: Counter,
    transfer_rejected: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("baton");
        Metrics {
            rooms: registered(&mut r, "rooms", "Rooms baton is in now", None, Gauge::default()),
            rooms_joined: registered(&mut r, "rooms_joined", "Rooms baton joined", None, Counter::default()),
            events: registered(
                &mut r,
                "events",
                "Events emitted on the event stream, by event name",
                None,
                Family::default(),
            ),
            handoffs: registered(
                &mut r,
                "handoffs",
                "Finished handoffs by source agent, target agent (the last one tried) and outcome",
                None,
                Family::default(),
            ),
            recoveries: registered(
                &mut r,
                "recoveries",
                "Finished recoveries of crashed agents by agent name and outcome (completed, failed, cleared: the suspected agent was alive)",
                None,
                Family::default(),
            ),
            recovery_to_audible: registered(
                &mut r,
                "recovery_last_heartbeat_to_audible",
                "Crashed agent's last heartbeat to its replacement being heard (completed recoveries that saw it)",
                Some(Unit::Seconds),
                seconds_histogram(),
            ),
            handoff_duration: registered(
                &mut r,
                "handoff_duration",
                "Handoff request to its end (completed, handed back or failed), by outcome",
                Some(Unit::Seconds),
                Family::new_with_constructor(seconds_histogram),
            ),
            phase: registered(
                &mut r,
                "handoff_phase",
                "Handoff request to each phase of the handoff timeline, by phase",
                Some(Unit::Seconds),
                Family::new_with_constructor(seconds_histogram),
            ),
            request_to_audible: registered(
                &mut r,
                "handoff_request_to_audible",
                "Handoff request to the target agent being heard (completed handoffs that saw it)",
                Some(Unit::Seconds),
                seconds_histogram(),
            ),
            filler: registered(
                &mut r,
                "handoff_filler",
                "Filler played per handoff or recovery (filler_on to filler_off)",
                Some(Unit::Seconds),
                seconds_histogram(),
            ),
            caller_gap: registered(
                &mut r,
                "handoff_caller_gap",
                "Longest silence between the source and the target that baton saw in a completed handoff: source quiet to filler on, or filler off to the target heard (from speaking signals; network and jitter-buffer delay are not in it)",
                Some(Unit::Seconds),
                Histogram::new(GAP_BUCKETS.iter().copied()),
            ),
            bundle: registered(
                &mut r,
                "bundle",
                "Size of the context bundles baton received from handoff sources",
                Some(Unit::Bytes),
                bytes_histogram(),
            ),
            refusals: registered(
                &mut r,
                "handoff_refusals",
                "Handoff requests refused, by reason",
                None,
                Family::default(),
            ),
            rejected: registered(
                &mut r,
                "control_messages_rejected",
                "Control messages ignored, by reason (the security reasons, or out_of_state)",
                None,
                Family::default(),
            ),
            alerts: registered(&mut r, "alerts", "Operator alerts, by alert", None, Family::default()),
            dropped: registered(
                &mut r,
                "events_dropped",
                "Events a sink (webhook) never delivered, by sink and reason",
                None,
                Family::default(),
            ),
            webhook_delivered: registered(
                &mut r,
                "webhook_events_delivered",
                "Events the webhook receiver acknowledged (2xx)",
                None,
                Counter::default(),
            ),
            webhook_failed_attempts: registered(
                &mut r,
                "webhook_attempts_failed",
                "Webhook requests that failed and were retried or given up",
                None,
                Counter::default(),
            ),
            webhook_queue: registered(
                &mut r,
                "webhook_queue_events",
                "Events waiting in the webhook queue",
                None,
                Gauge::default(),
            ),
            store_errors: registered(
                &mut r,
                "store_errors",
                "Failed calls to the room-state store (Redis unreachable, disk error, refused write)",
                None,
                Counter::default(),
            ),
            store_degraded: registered(
                &mut r,
                "store_degraded",
                "1 while the room-state store does not take writes (rooms coordinate from memory, writes wait), else 0",
                None,
                Gauge::default(),
            ),
            checkpoints: registered(
                &mut r,
                "checkpoints",
                "Checkpoints from agents, by outcome (applied, rejected)",
                None,
                Family::default(),
            ),
            checkpoint_bytes: registered(
                &mut r,
                "checkpoint",
                "Payload size of the checkpoints baton applied",
                Some(Unit::Bytes),
                bytes_histogram(),
            ),
            checkpoint_state: registered(
                &mut r,
                "checkpoint_state",
                "What a room's merged checkpoints take, sampled after each applied checkpoint",
                Some(Unit::Bytes),
                bytes_histogram(),
            ),
            delivered_bytes: registered(
                &mut r,
                "bundle_delivered",
                "Chunk bytes baton sent delivering bundles to targets, retransmissions included",
                Some(Unit::Bytes),
                Counter::default(),
            ),
            resent_bytes: registered(
                &mut r,
                "transfer_retransmitted",
                "Chunk bytes baton sent again in its deliveries (chunks a RESUME found missing)",
                Some(Unit::Bytes),
                Counter::default(),
            ),
            transfer_rejected: registered(
                &mut r,
                "transfer_frames_rejected",
                "Context-transfer frames refused (undecodable, unknown transfer, over a limit, unauthorized sender)",
                None,
                Counter::default(),
            ),
            registry: r,
        }
    }

    /// Counts one [`Stat`].
    pub fn count(&self, stat: &Stat) {
        match stat {
            Stat::CheckpointApplied { bytes, state_bytes } => {
                self.checkpoints.get_or_create(&OutcomeLabels { outcome: "applied".into() }).inc();
                self.checkpoint_bytes.observe(*bytes as f64);
                self.checkpoint_state.observe(*state_bytes as f64);
            }
            Stat::CheckpointRejected => {
                self.checkpoints.get_or_create(&OutcomeLabels { outcome: "rejected".into() }).inc();
            }
            Stat::BundleDelivered { bytes_sent, bytes_resent } => {
                self.delivered_bytes.inc_by(*bytes_sent);
                self.resent_bytes.inc_by(*bytes_resent);
            }
            Stat::TransferFrameRejected => {
                self.transfer_rejected.inc();
            }
            Stat::ControlUndecodable(reason) => {
                self.rejected.get_or_create(&ReasonLabels { reason: (*reason).to_string() }).inc();
            }
        }
    }

    /// Counts one event.
    pub fn record(&self, event: &Event) {
        self.events.get_or_create(&EventLabels { event: event.name().to_string() }).inc();
        match event {
            Event::RoomJoined => {
                self.rooms.inc();
                self.rooms_joined.inc();
            }
            Event::RoomLeft => {
                self.rooms.dec();
            }
            Event::HandoffFinished(t, _) => self.record_handoff(t),
            Event::HandoffRefused(r) => {
                self.refusals.get_or_create(&ReasonLabels { reason: r.reason.as_str().into() }).inc();
            }
            Event::SecurityRejected(s) => {
                let reason = security_reason(&s.reason).to_string();
                self.rejected.get_or_create(&ReasonLabels { reason }).inc();
            }
            Event::Alert(alert) => {
                let name = match alert {
                    Alert::AgentNoShow { .. } => "agent_no_show",
                    Alert::DispatchFailed { .. } => "dispatch_failed",
                    Alert::FloorVacant { .. } => "floor_vacant",
                    Alert::RecoveryFailed { .. } => "recovery_failed",
                    Alert::IgnoredMessage { .. } => {
                        self.rejected.get_or_create(&ReasonLabels { reason: "out_of_state".into() }).inc();
                        "ignored_message"
                    }
                };
                self.alerts.get_or_create(&AlertLabels { alert: name.into() }).inc();
            }
            Event::FloorGranted(_) | Event::HandoffPhase(_) | Event::SessionEnded => {}
        }
    }

    fn record_recovery(&self, t: &Timeline) {
        let outcome = t.outcome.map_or("unknown", outcome_name).to_string();
        self.recoveries.get_or_create(&RecoveryLabels { agent: t.source.clone(), outcome }).inc();
        if let Some(ms) = t.ms(Phase::TargetAudible).filter(|_| t.outcome == Some(Outcome::Completed)) {
            self.recovery_to_audible.observe(ms as f64 / 1000.0);
        }
        self.record_filler(t);
    }

    fn record_filler(&self, t: &Timeline) {
        if let (Some(on), Some(off)) = (t.ms(Phase::FillerOn), t.ms(Phase::FillerOff)) {
            self.filler.observe(off.saturating_sub(on) as f64 / 1000.0);
        }
    }

    fn record_handoff(&self, t: &Timeline) {
        if t.kind == Kind::Recovery {
            return self.record_recovery(t);
        }
        let outcome = t.outcome.map_or("unknown", outcome_name).to_string();
        let labels =
            HandoffLabels { source: t.source.clone(), target: t.target.clone(), outcome: outcome.clone() };
        self.handoffs.get_or_create(&labels).inc();
        let secs = |ms: u64| ms as f64 / 1000.0;
        if let Some(end) = t.phases.iter().map(|m| m.ms).max() {
            self.handoff_duration.get_or_create(&OutcomeLabels { outcome }).observe(secs(end));
        }
        for mark in &t.phases {
            // The request is the origin (always 0); a phase seen twice (two failed targets)
            // counts each time.
            if mark.phase != Phase::Requested {
                self.phase
                    .get_or_create(&PhaseLabels { phase: phase_name(mark.phase).into() })
                    .observe(secs(mark.ms));
            }
        }
        if t.outcome == Some(Outcome::Completed)
            && let Some(ms) = t.ms(Phase::TargetAudible)
        {
            self.request_to_audible.observe(secs(ms));
        }
        self.record_filler(t);
        if let Some(ms) = caller_gap_ms(t) {
            self.caller_gap.observe(secs(ms));
        }
        if let Some(bytes) = t.bundle_bytes {
            self.bundle.observe(bytes as f64);
        }
    }

    /// An event a sink could not deliver.
    pub fn dropped(&self, sink: &str, why: Dropped) {
        self.dropped.get_or_create(&DropLabels { sink: sink.into(), reason: why.as_str().into() }).inc();
    }

    /// The webhook receiver acknowledged one event.
    pub fn webhook_delivered(&self) {
        self.webhook_delivered.inc();
    }

    /// One webhook request failed (timeout, connection refused, non-2xx).
    pub fn webhook_attempt_failed(&self) {
        self.webhook_failed_attempts.inc();
    }

    /// The webhook queue's length now.
    pub fn webhook_queue(&self, len: usize) {
        self.webhook_queue.set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// A call to the room-state store failed.
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// The room-state store became degraded (true) or caught up (false).
    pub fn store_degraded(&self, degraded: bool) {
        self.store_degraded.set(i64::from(degraded));
    }

    /// Rooms held now.
    pub fn rooms(&self) -> i64 {
        self.rooms.get()
    }

    /// The OpenMetrics text exposition of every metric, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The `kind` of a security reason, as in the event's `reason.kind`.
fn security_reason(reason: &SecurityReason) -> &'static str {
    match reason {
        SecurityReason::UnknownParticipant => "unknown_participant",
        SecurityReason::NotAnAgent => "not_an_agent",
        SecurityReason::UnnamedAgent => "unnamed_agent",
        SecurityReason::AgentNotConfigured { .. } => "agent_not_configured",
        SecurityReason::NameMismatch { .. } => "name_mismatch",
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::observe::event::HandoffRefused;

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_finished_recovery_is_counted_as_a_recovery_not_a_handoff() {
        let m = Metrics::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Timeline::recovery("r-1", "triage", t0);
        t.mark(Phase::Suspected, at(800), Some("heartbeat".into()));
        t.mark(Phase::FillerOn, at(800), None);
        t.mark(Phase::TargetActivated, at(2_900), None);
        t.mark(Phase::FillerOff, at(3_400), Some("heard".into()));
        t.mark(Phase::TargetAudible, at(3_400), None);
        t.outcome = Some(Outcome::Completed);
        m.record(&Event::HandoffFinished(Box::new(t), None));
        let text = m.encode();
        assert_eq!(sample(&text, r#"baton_recoveries_total{agent="triage",outcome="completed"}"#), Some(1.0));
        assert_eq!(sample(&text, "baton_recovery_last_heartbeat_to_audible_seconds_sum"), Some(3.4));
        assert_eq!(sample(&text, "baton_handoff_filler_seconds_sum"), Some(2.6));
        assert!(!text.contains("baton_handoffs_total{"), "{text}");
    }

    #[test]
    fn a_finished_handoff_counts_its_edge_phases_filler_and_bundle() {
        let m = Metrics::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Timeline::new("h-1", "triage", "billing", "refund", t0);
        t.mark(Phase::Requested, t0, None);
        t.mark(Phase::SourceQuiet, at(260), Some("quiet".into()));
        t.mark(Phase::FillerOn, at(300), None);
        t.mark(Phase::FillerOff, at(1_500), None);
        t.mark(Phase::TargetAudible, at(1_450), None);
        t.mark(Phase::Completed, at(1_600), None);
        t.outcome = Some(Outcome::Completed);
        t.bundle_bytes = Some(5_000);
        m.record(&Event::RoomJoined);
        m.record(&Event::HandoffFinished(Box::new(t), None));
        m.record(&Event::HandoffRefused(HandoffRefused {
            from: "agent-a".into(),
            reason: baton_floor::RefuseReason::SameAgent,
        }));
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(sample(&text, "baton_rooms"), Some(1.0));
        assert_eq!(
            sample(&text, r#"baton_handoffs_total{source="triage",target="billing",outcome="completed"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(sample(&text, r#"baton_handoff_phase_seconds_sum{phase="filler_on"}"#), Some(0.3));
        assert_eq!(sample(&text, "baton_handoff_request_to_audible_seconds_sum"), Some(1.45));
        assert_eq!(sample(&text, "baton_handoff_filler_seconds_sum"), Some(1.2));
        // Quiet at 260, filler at 300: 40 ms; the filler outlasts the target's first words.
        assert_eq!(sample(&text, "baton_handoff_caller_gap_seconds_sum"), Some(0.04));
        assert_eq!(sample(&text, r#"baton_handoff_caller_gap_seconds_bucket{le="0.04"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"baton_handoff_caller_gap_seconds_bucket{le="0.02"}"#), Some(0.0));
        assert_eq!(sample(&text, r#"baton_bundle_bytes_bucket{le="16384.0"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"baton_bundle_bytes_bucket{le="4096.0"}"#), Some(0.0));
        assert_eq!(sample(&text, r#"baton_handoff_refusals_total{reason="same_agent"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"baton_events_total{event="handoff_finished"}"#), Some(1.0));
        m.record(&Event::RoomLeft);
        assert_eq!(sample(&m.encode(), "baton_rooms"), Some(0.0));
    }

    fn handoff(marks: &[(Phase, u64)], outcome: Outcome) -> Timeline {
        let t0 = Instant::now();
        let mut t = Timeline::new("h-1", "triage", "billing", "refund", t0);
        for (phase, ms) in marks {
            t.mark(*phase, t0 + Duration::from_millis(*ms), None);
        }
        t.outcome = Some(outcome);
        t
    }

    #[test]
    fn the_caller_gap_is_the_longer_silence_at_either_end_of_the_filler() {
        use Phase::{FillerOff, FillerOn, Requested, SourceQuiet, TargetAudible};
        let done = Outcome::Completed;
        // Filler before the source went quiet, target heard 90 ms after the filler stopped.
        let t = handoff(
            &[(Requested, 0), (FillerOn, 10), (SourceQuiet, 400), (FillerOff, 900), (TargetAudible, 990)],
            done,
        );
        assert_eq!(caller_gap_ms(&t), Some(90));
        // 150 ms of nothing before the filler, none after.
        let t = handoff(&[(SourceQuiet, 100), (FillerOn, 250), (TargetAudible, 800), (FillerOff, 810)], done);
        assert_eq!(caller_gap_ms(&t), Some(150));
        // No filler at all: quiet to heard.
        let t = handoff(&[(SourceQuiet, 100), (TargetAudible, 170)], done);
        assert_eq!(caller_gap_ms(&t), Some(70));
        // Unknown without a quiet source or a heard target, and for a failed handoff.
        assert_eq!(caller_gap_ms(&handoff(&[(FillerOn, 10), (TargetAudible, 500)], done)), None);
        assert_eq!(caller_gap_ms(&handoff(&[(SourceQuiet, 10), (FillerOn, 20)], done)), None);
        let t = handoff(&[(SourceQuiet, 100), (TargetAudible, 170)], Outcome::Failed);
        assert_eq!(caller_gap_ms(&t), None);
    }

    #[test]
    fn stats_count_checkpoints_transfer_bytes_and_undecodable_messages() {
        let m = Metrics::new();
        m.count(&Stat::CheckpointApplied { bytes: 2_000, state_bytes: 9_000 });
        m.count(&Stat::CheckpointApplied { bytes: 500, state_bytes: 9_400 });
        m.count(&Stat::CheckpointRejected);
        m.count(&Stat::BundleDelivered { bytes_sent: 70_000, bytes_resent: 14_000 });
        m.count(&Stat::BundleDelivered { bytes_sent: 1_000, bytes_resent: 0 });
        m.count(&Stat::TransferFrameRejected);
        m.count(&Stat::ControlUndecodable("malformed"));
        m.count(&Stat::ControlUndecodable("malformed"));
        m.count(&Stat::ControlUndecodable("too_large"));
        let text = m.encode();
        assert_eq!(sample(&text, r#"baton_checkpoints_total{outcome="applied"}"#), Some(2.0), "{text}");
        assert_eq!(sample(&text, r#"baton_checkpoints_total{outcome="rejected"}"#), Some(1.0));
        assert_eq!(sample(&text, "baton_checkpoint_bytes_sum"), Some(2_500.0));
        assert_eq!(sample(&text, "baton_checkpoint_bytes_count"), Some(2.0));
        assert_eq!(sample(&text, "baton_checkpoint_state_bytes_sum"), Some(18_400.0));
        assert_eq!(sample(&text, "baton_bundle_delivered_bytes_total"), Some(71_000.0));
        assert_eq!(sample(&text, "baton_transfer_retransmitted_bytes_total"), Some(14_000.0));
        assert_eq!(sample(&text, "baton_transfer_frames_rejected_total"), Some(1.0));
        assert_eq!(sample(&text, r#"baton_control_messages_rejected_total{reason="malformed"}"#), Some(2.0));
        assert_eq!(sample(&text, r#"baton_control_messages_rejected_total{reason="too_large"}"#), Some(1.0));
    }
}
