//! The record of one handoff or recovery: when each phase happened, and how it ended.
//!
//! Times are milliseconds since the request (for a recovery: since the last sign of life of the
//! crashed agent, its last heartbeat), measured on the `Instant`s the shell passed in, so
//! the same numbers come out of a unit test in virtual time and out of a real call.

use std::time::Instant;

use serde::Serialize;

use crate::command::FailReason;

/// A phase of a handoff or a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The source asked for the handoff.
    Requested,
    /// Recovery: the floor holder's heartbeat stopped for `crash_suspect_after` (filler on and
    /// its track muted at once), or it left the room (detail: the signal).
    Suspected,
    /// Recovery: the suspected agent is alive after all (its heartbeat resumed before the crash
    /// was confirmed); it keeps the floor.
    SuspectCleared,
    /// Recovery: the crash is certain (detail: the signal, `job_ended:<status>`, `left`, or
    /// `silence` after `crash_confirm_after`).
    Confirmed,
    /// Recovery: baton asked the server to remove the crashed participant.
    Removed,
    /// The source stopped talking (detail: `quiet`, `silence`, `muted`, `no_audio`, `left`,
    /// or `forced` when baton muted it after `source_quiet_timeout`).
    SourceQuiet,
    /// Filler started.
    FillerOn,
    /// A dispatch was created for the target (detail: agent name).
    TargetDispatched,
    /// The target is in the room (detail: `warm` if it was already there, else `dispatched`).
    TargetJoined,
    /// baton holds the source's complete bundle.
    BundleReceived,
    /// The target acknowledged the bundle.
    BundleDelivered,
    /// The source's bundle will never arrive (it left first).
    BundleLost,
    /// The target sent `ready`.
    TargetReady,
    /// The current target failed (detail: reason); an alternate or a handback follows.
    TargetFailed,
    /// An alternate target is being tried (detail: agent name).
    AlternateTried,
    /// The source left the room.
    SourceLeft,
    /// The target left the room; it keeps its role if it joins again within `rejoin_grace`
    /// (else `target_failed` with `target_left` follows).
    TargetLeft,
    /// The source or the target (detail: which) joined again within `rejoin_grace` and keeps
    /// its role.
    Rejoined,
    /// Filler stopped (faded out).
    FillerOff,
    /// The target was sent `activate` (and unmuted).
    TargetActivated,
    /// The target was heard speaking.
    TargetAudible,
    /// The source got the floor back.
    HandedBack,
    /// The handoff completed.
    Completed,
    /// The handoff failed.
    Failed,
}

/// How a handoff or a recovery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Recovery: the crash was not confirmed; the agent kept the floor.
    Cleared,
    /// The target (for a recovery: the replacement) holds the floor.
    Completed,
    /// The handoff failed and the source holds the floor again.
    HandedBack,
    /// The handoff failed and nobody holds the floor (source gone, or caller left).
    Failed,
}

/// One timestamped phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    /// The phase.
    pub phase: Phase,
    /// Milliseconds since the request.
    pub ms: u64,
    /// Extra detail (agent name, reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A timeline mark as it happens, for a tracing event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEvent {
    /// The handoff id.
    pub handoff: String,
    /// The mark.
    #[serde(flatten)]
    pub mark: Mark,
}

/// What a timeline records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An agent asked to hand the call on.
    #[default]
    Handoff,
    /// An agent crashed (or was suspected to) and baton replaced it from its last checkpoint.
    Recovery,
}

/// The whole record of one handoff or recovery; [`Timeline::to_json_line`] is what benchmarks
/// read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeline {
    /// The handoff id (`h-1`, `h-2`, ... per room), or the recovery id (`r-1`, ...).
    pub handoff: String,
    /// A handoff or a recovery. For a recovery, `source` and `requested_target` are the crashed
    /// agent's name, and `reason` says which signal confirmed the crash.
    pub kind: Kind,
    /// The source agent's name.
    pub source: String,
    /// The target the source asked for.
    pub requested_target: String,
    /// The last target tried (differs from `requested_target` when an alternate was used).
    pub target: String,
    /// The source's reason.
    pub reason: String,
    /// Whether the target was already in the room.
    pub warm: bool,
    /// The bundle size, when baton received one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_bytes: Option<u64>,
    /// How it ended; `None` while running.
    pub outcome: Option<Outcome>,
    /// Why it failed (also set for a handback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailReason>,
    /// The phases, in the order they happened.
    pub phases: Vec<Mark>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Timeline {
    /// A timeline for a handoff requested at `now`.
    pub fn new(handoff: &str, source: &str, target: &str, reason: &str, now: Instant) -> Timeline {
        Timeline {
            handoff: handoff.to_owned(),
            kind: Kind::Handoff,
            source: source.to_owned(),
            requested_target: target.to_owned(),
            target: target.to_owned(),
            reason: reason.to_owned(),
            warm: false,
            bundle_bytes: None,
            outcome: None,
            failure: None,
            phases: Vec::new(),
            started: Some(now),
        }
    }

    /// A timeline for the recovery `id` of a crashed `agent` (an agent name), whose last sign
    /// of life (its last heartbeat) was at `since`: the origin of its times.
    pub fn recovery(id: &str, agent: &str, since: Instant) -> Timeline {
        let mut t = Timeline::new(id, agent, agent, "crash suspected", since);
        t.kind = Kind::Recovery;
        t
    }

    /// Records a phase at `now` and returns the event to log.
    pub fn mark(&mut self, phase: Phase, now: Instant, detail: Option<String>) -> TimelineEvent {
        let ms = self.started.map(|s| now.saturating_duration_since(s).as_millis() as u64).unwrap_or(0);
        let mark = Mark { phase, ms, detail };
        self.phases.push(mark.clone());
        TimelineEvent { handoff: self.handoff.clone(), mark }
    }

    /// When `phase` first happened, in ms since the request.
    pub fn ms(&self, phase: Phase) -> Option<u64> {
        self.phases.iter().find(|m| m.phase == phase).map(|m| m.ms)
    }

    /// Whether `phase` happened.
    pub fn has(&self, phase: Phase) -> bool {
        self.ms(phase).is_some()
    }

    /// The phases in order, without times (handy in tests and logs).
    pub fn phase_list(&self) -> Vec<Phase> {
        self.phases.iter().map(|m| m.phase).collect()
    }

    /// One line of JSON, no trailing newline.
    pub fn to_json_line(&self) -> String {
        // Serialising plain strings, numbers and enums cannot fail; a failure would be a bug here.
        serde_json::to_string(self).expect("timeline serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_line_has_ordered_phases_and_outcome() {
        let t0 = Instant::now();
        let mut t = Timeline::new("h-1", "triage", "billing", "refund", t0);
        t.mark(Phase::Requested, t0, None);
        t.mark(Phase::SourceQuiet, t0 + Duration::from_millis(420), Some("quiet".into()));
        t.mark(Phase::Completed, t0 + Duration::from_millis(1800), None);
        t.outcome = Some(Outcome::Completed);
        t.bundle_bytes = Some(12_000);
        let line = t.to_json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["handoff"], "h-1");
        assert_eq!(v["outcome"], "completed");
        assert_eq!(v["bundle_bytes"], 12_000);
        assert_eq!(v["phases"][1]["phase"], "source_quiet");
        assert_eq!(v["phases"][1]["ms"], 420);
        assert_eq!(v["phases"][1]["detail"], "quiet");
        assert_eq!(v["phases"][2]["ms"], 1800);
        assert!(v.get("failure").is_none());
        assert_eq!(t.ms(Phase::SourceQuiet), Some(420));
    }
}
