//! The event stream's events: what happened in a room, typed, and their one JSON line each.
//!
//! The schema is versioned ([`SCHEMA_VERSION`]) and documented in `docs/events.md`; stdout,
//! the webhook and the call timeline page all carry the same line. The coordinator turns the
//! floor arbiter's commands into events with [`Event::from_command`]; the room wrapper adds
//! `room_joined` / `room_left`.

use std::time::{SystemTime, UNIX_EPOCH};

use baton_floor::{
    ActivateCause, Alert, BatonMessage, Command, Outcome, Phase, RefuseReason, SecurityEvent, Timeline,
    TimelineEvent,
};
use serde::Serialize;

use super::trace::TraceParent;

/// The event schema version, the `v` of every line. Adding a field or an event keeps it;
/// renaming or removing one, or changing a meaning, bumps it (`docs/events.md`).
pub const SCHEMA_VERSION: u32 = 1;

/// One thing that happened in a room.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// baton is in the room (its first connection; resumes and rejoins are not repeated).
    RoomJoined,
    /// baton left the room or lost it for good.
    RoomLeft,
    /// An agent was given the floor (`activate` sent to it).
    FloorGranted(FloorGranted),
    /// A handoff reached a phase (one timeline mark).
    HandoffPhase(TimelineEvent),
    /// A handoff ended; its whole timeline. The fields are those of the timeline line baton
    /// printed before the event stream had a schema. The trace ids are those the handoff's
    /// control messages carried (`traceparent`), when baton exports traces; not in the line.
    HandoffFinished(Box<Timeline>, Option<TraceParent>),
    /// A handoff request was refused; nothing changed.
    HandoffRefused(HandoffRefused),
    /// A control message or bundle from someone not allowed to send it was ignored.
    SecurityRejected(SecurityEvent),
    /// Something an operator should see (an agent that never came, a vacant floor...).
    Alert(Alert),
    /// The caller left and the session is over.
    SessionEnded,
}

/// `floor_granted`: who holds the floor from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FloorGranted {
    /// The agent participant's identity.
    pub identity: String,
    /// Why it got the floor.
    pub cause: ActivateCause,
    /// The handoff that gave it the floor, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// `handoff_refused`: an agent's handoff request that baton refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandoffRefused {
    /// The requesting agent's identity.
    pub from: String,
    /// Why (the `reason` of the `handoff_refused` control message).
    pub reason: RefuseReason,
}

/// An event with no fields of its own.
#[derive(Serialize)]
struct Empty {}

/// What every line carries besides the event's own fields.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Unique per event in this baton process: receivers deduplicate retried webhooks by it.
    pub id: &'a str,
    /// The LiveKit room name.
    pub room: &'a str,
    /// When baton emitted the event.
    pub time: SystemTime,
}

/// The line as serialised: the event's fields first (so a finished handoff's line still
/// starts with `{"handoff":`, as readers of the earlier timeline line expect), then the envelope.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    data: &'a T,
    event: &'static str,
    v: u32,
    id: &'a str,
    room: &'a str,
    time_unix_ms: u64,
}

impl Event {
    /// The event for one arbiter command, if the command is something the stream reports.
    pub fn from_command(cmd: &Command) -> Option<Event> {
        Some(match cmd {
            Command::Timeline(ev) => Event::HandoffPhase(ev.clone()),
            Command::HandoffFinished(timeline) => Event::HandoffFinished(timeline.clone(), None),
            Command::Security(ev) => Event::SecurityRejected(ev.clone()),
            Command::Alert(alert) => Event::Alert(alert.clone()),
            Command::SessionEnded => Event::SessionEnded,
            Command::Send { to, message: BatonMessage::Activate { handoff, cause, .. }, .. } => {
                Event::FloorGranted(FloorGranted {
                    identity: to.clone(),
                    cause: *cause,
                    handoff: handoff.clone(),
                })
            }
            Command::Send { to, message: BatonMessage::HandoffRefused { reason }, .. } => {
                Event::HandoffRefused(HandoffRefused { from: to.clone(), reason: *reason })
            }
            _ => return None,
        })
    }

    /// The event's name: the `event` field of its line.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RoomJoined => "room_joined",
            Event::RoomLeft => "room_left",
            Event::FloorGranted(_) => "floor_granted",
            Event::HandoffPhase(_) => "handoff_phase",
            Event::HandoffFinished(..) => "handoff_finished",
            Event::HandoffRefused(_) => "handoff_refused",
            Event::SecurityRejected(_) => "security_rejected",
            Event::Alert(_) => "alert",
            Event::SessionEnded => "session_ended",
        }
    }

    /// One line of JSON (no newline): the event's fields, then `event`, `v`, `id`, `room` and
    /// `time_unix_ms` (milliseconds since the Unix epoch).
    pub fn to_json_line(&self, envelope: Envelope<'_>) -> String {
        match self {
            Event::RoomJoined | Event::RoomLeft | Event::SessionEnded => self.line(&Empty {}, envelope),
            Event::FloorGranted(data) => self.line(data, envelope),
            Event::HandoffPhase(data) => self.line(data, envelope),
            Event::HandoffFinished(data, _) => self.line(data.as_ref(), envelope),
            Event::HandoffRefused(data) => self.line(data, envelope),
            Event::SecurityRejected(data) => self.line(data, envelope),
            Event::Alert(data) => self.line(data, envelope),
        }
    }

    fn line<T: Serialize>(&self, data: &T, envelope: Envelope<'_>) -> String {
        let time_unix_ms =
            envelope.time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
        let line = Line {
            data,
            event: self.name(),
            v: SCHEMA_VERSION,
            id: envelope.id,
            room: envelope.room,
            time_unix_ms,
        };
        // Every event type is plain strings, numbers and enums with string keys; a failure here
        // would be a bug in this module, and a line saying so beats a panic in the room task.
        serde_json::to_string(&line).unwrap_or_else(|e| {
            format!(
                r#"{{"event":"{}","v":{SCHEMA_VERSION},"error":"not serialisable: {}"}}"#,
                self.name(),
                e.to_string().replace(['"', '\\'], "'")
            )
        })
    }
}

/// The outcome's wire name (as in the timeline's JSON).
pub fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Cleared => "cleared",
        Outcome::Completed => "completed",
        Outcome::HandedBack => "handed_back",
        Outcome::Failed => "failed",
    }
}

/// The phase's wire name (as in the timeline's JSON).
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Requested => "requested",
        Phase::Suspected => "suspected",
        Phase::SuspectCleared => "suspect_cleared",
        Phase::Confirmed => "confirmed",
        Phase::Removed => "removed",
        Phase::SourceQuiet => "source_quiet",
        Phase::FillerOn => "filler_on",
        Phase::TargetDispatched => "target_dispatched",
        Phase::TargetJoined => "target_joined",
        Phase::BundleReceived => "bundle_received",
        Phase::BundleDelivered => "bundle_delivered",
        Phase::BundleLost => "bundle_lost",
        Phase::TargetReady => "target_ready",
        Phase::TargetFailed => "target_failed",
        Phase::AlternateTried => "alternate_tried",
        Phase::SourceLeft => "source_left",
        Phase::TargetLeft => "target_left",
        Phase::Rejoined => "rejoined",
        Phase::FillerOff => "filler_off",
        Phase::TargetActivated => "target_activated",
        Phase::TargetAudible => "target_audible",
        Phase::HandedBack => "handed_back",
        Phase::Completed => "completed",
        Phase::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use baton_floor::SecurityReason;
    use serde_json::Value;

    use super::*;

    fn envelope() -> Envelope<'static> {
        Envelope { id: "e-1", room: "r", time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123) }
    }

    fn parse(line: &str) -> Value {
        assert!(!line.contains('\n'));
        serde_json::from_str(line).expect("valid JSON")
    }

    #[test]
    fn finished_handoff_line_keeps_the_timeline_fields_and_prefix() {
        let t0 = Instant::now();
        let mut t = Timeline::new("h-1", "triage", "billing", "refund", t0);
        t.mark(Phase::Requested, t0, None);
        t.mark(Phase::Completed, t0 + Duration::from_millis(900), None);
        t.outcome = Some(Outcome::Completed);
        let line = Event::HandoffFinished(Box::new(t.clone()), None).to_json_line(envelope());
        assert!(line.starts_with(r#"{"handoff":"h-1","#), "{line}");
        let v = parse(&line);
        let old: Value = serde_json::from_str(&t.to_json_line()).expect("json");
        for (key, value) in old.as_object().expect("object") {
            assert_eq!(&v[key], value, "field {key}");
        }
        assert_eq!(v["event"], "handoff_finished");
        assert_eq!(v["v"], SCHEMA_VERSION);
        assert_eq!(v["room"], "r");
        assert_eq!(v["id"], "e-1");
        assert_eq!(v["time_unix_ms"], 1_700_000_000_123u64);
    }

    #[test]
    fn commands_become_events_and_others_do_not() {
        let activate = Command::Send {
            to: "agent-b".into(),
            re: None,
            message: BatonMessage::Activate {
                handoff: Some("h-2".into()),
                cause: ActivateCause::Handoff,
                reason: None,
            },
        };
        let v = parse(&Event::from_command(&activate).expect("event").to_json_line(envelope()));
        assert_eq!(v["event"], "floor_granted");
        assert_eq!(v["identity"], "agent-b");
        assert_eq!(v["cause"], "handoff");
        assert_eq!(v["handoff"], "h-2");

        let refused = Command::Send {
            to: "agent-a".into(),
            re: Some("x".into()),
            message: BatonMessage::HandoffRefused { reason: RefuseReason::UnknownTarget },
        };
        let v = parse(&Event::from_command(&refused).expect("event").to_json_line(envelope()));
        assert_eq!((v["event"].as_str(), v["from"].as_str()), (Some("handoff_refused"), Some("agent-a")));
        assert_eq!(v["reason"], "unknown_target");

        let security = Command::Security(SecurityEvent {
            from: "caller".into(),
            kind: None,
            message_type: "handoff",
            reason: SecurityReason::NotAnAgent,
        });
        let v = parse(&Event::from_command(&security).expect("event").to_json_line(envelope()));
        assert_eq!(v["event"], "security_rejected");
        assert_eq!(v["reason"]["kind"], "not_an_agent");
        assert_eq!(v["message_type"], "handoff");

        let alert = Command::Alert(Alert::FloorVacant { identity: "agent-a".into() });
        let v = parse(&Event::from_command(&alert).expect("event").to_json_line(envelope()));
        assert_eq!((v["event"].as_str(), v["alert"].as_str()), (Some("alert"), Some("floor_vacant")));

        assert_eq!(Event::from_command(&Command::Filler(baton_floor::FillerCommand::On)), None);
        let deactivate = Command::Send {
            to: "a".into(),
            re: None,
            message: BatonMessage::Deactivate {
                handoff: None,
                reason: baton_floor::DeactivateReason::Standby,
            },
        };
        assert_eq!(Event::from_command(&deactivate), None);
    }

    #[test]
    fn phase_and_outcome_names_match_the_timeline_json() {
        for p in
            [Phase::Requested, Phase::SourceQuiet, Phase::TargetAudible, Phase::Failed, Phase::BundleLost]
        {
            assert_eq!(serde_json::to_value(p).expect("json"), phase_name(p));
        }
        for o in [Outcome::Cleared, Outcome::Completed, Outcome::HandedBack, Outcome::Failed] {
            assert_eq!(serde_json::to_value(o).expect("json"), outcome_name(o));
        }
    }

    #[test]
    fn events_without_fields_are_just_the_envelope() {
        let v = parse(&Event::RoomJoined.to_json_line(envelope()));
        let keys: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 5, "{v}");
        assert_eq!(v["event"], "room_joined");
    }
}
