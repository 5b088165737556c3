//! The knobs of the floor arbiter, with defaults that suit a phone call.
//!
//! The root crate fills a [`Policy`] from `configs/baton.toml`; this crate never reads files.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use thiserror::Error;

/// What happens to the source agent once the target has the floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleasePolicy {
    /// The source is told to leave; if it is still in the room after
    /// [`Policy::release_grace`], baton removes it server-side.
    #[default]
    Leave,
    /// The source stays in the room, deactivated and muted, ready for a warm handoff back.
    Standby,
}

/// From when an agent's standbys are kept in the room ([`Standby::from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StandbyFrom {
    /// From the start of the call (baton joining the room) to its end.
    #[default]
    Start,
    /// From a `hint` naming the agent until [`Policy::hint_timeout`] passes without a handoff
    /// to it.
    Hint,
}

/// How many idle instances of one agent baton keeps in the room as muted standbys, so a handoff
/// to it is a switch instead of a cold start (docs/protocol.md, "Standbys and hints").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standby {
    /// Idle instances kept (at most [`MAX_STANDBY`]). None is kept while an agent of this name
    /// holds the floor (a handoff to the same agent is refused).
    pub count: u32,
    /// From when they are kept.
    pub from: StandbyFrom,
}

/// The most standbys of one agent a policy may ask for: each is a job, a participant and a
/// running session for the whole call.
pub const MAX_STANDBY: u32 = 4;

/// How often and how patiently an agent is dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Total number of dispatches tried (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for every further attempt.
    pub backoff_initial: Duration,
    /// Upper bound for the doubled wait.
    pub backoff_max: Duration,
}

impl Retry {
    /// The wait before attempt number `next_attempt` (2 for the first retry).
    ///
    /// Deterministic on purpose: the arbiter has no randomness; a shell that wants jitter adds it
    /// to the dispatch call, not to the arbiter's clock.
    pub fn backoff(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(16);
        self.backoff_initial.saturating_mul(1u32 << doublings).min(self.backoff_max)
    }
}

/// The longest agent name a policy may hold, in bytes. Names travel in baton's control messages
/// (`prepare.source`, `handoff_accepted.target`, ...); this keeps every message baton builds
/// from names and ids alone far below the 15 000-byte packet limit. LiveKit agent names are
/// short identifiers (`triage`, `billing-v2`).
pub const MAX_AGENT_NAME: usize = 128;

/// The floor arbiter's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Agent names (the server-stamped `lk.agent.name` attribute) allowed to send control
    /// messages and to hold the floor. Everyone else is ignored and reported as a security event.
    pub agents: BTreeSet<String>,
    /// The agent dispatched when the room starts, unless already present or dispatched by the token.
    pub starting_agent: Option<String>,
    /// Agents to try, in order, when the requested target cannot take the call.
    pub alternates: BTreeMap<String, Vec<String>>,
    /// How long the source may keep talking after `deactivate` (finishing its sentence) before
    /// baton mutes its track server-side.
    pub source_quiet_timeout: Duration,
    /// How long a source whose request said `speaking` (it asked at the start of the sentence
    /// said with its transfer tool, so the target is prepared while it speaks) may take to
    /// finish that sentence and go quiet before baton mutes its track server-side.
    pub sentence_timeout: Duration,
    /// How long the source must be silent (per speaking updates) to count as quiet when it does
    /// not send `quiet` itself. Keeps dead air short for adapters that never say `quiet`.
    pub silence_grace: Duration,
    /// How long baton waits for a bundle announced as "will follow".
    pub bundle_timeout: Duration,
    /// How long a dispatched agent has to join the room, per attempt.
    pub join_timeout: Duration,
    /// How long a target that joined has to send `ready`. While the bundle's delivery to it
    /// makes progress the deadline moves on (see [`stall_timeout`](Policy::stall_timeout)).
    pub ready_timeout: Duration,
    /// While a bundle moves (the source uploading it to baton, or baton delivering it to the
    /// target), [`Event::TransferProgress`](crate::Event::TransferProgress) reports progress.
    /// Once it has, the upload's deadline (`bundle_timeout`) becomes "no progress for this
    /// long", and so does the delivery's (failing the target with `delivery_failed`), while the
    /// target's `ready_timeout` is pushed back at least this far past the latest progress: a
    /// slow but steady transfer completes, a stalled one fails this soon after it stopped. 3 s:
    /// a transfer sender's first retransmission timeout is 1 s and the next 2 s
    /// (docs/protocol.md 4.5), and a busy agent can take a second to acknowledge a window; a
    /// transfer silent for longer than both is not coming back soon.
    pub stall_timeout: Duration,
    /// However steadily a bundle moves, the longest one leg may take (the upload from the
    /// request, the delivery from the target's join) before its deadline fires anyway. 30 s is
    /// past `max_filler` (20 s), so once the caller hears filler the filler limit decides; this
    /// bounds what the filler limit does not (a source still talking).
    pub max_transfer_time: Duration,
    /// A handoff's source or target that leaves the room keeps its role this long: if a
    /// participant with the same identity (or, for a dispatched target, one from the same
    /// dispatch) joins again within it, the handoff goes on; after it, the handoff goes on as
    /// if the grace were zero (`target_left`, or without the source). LiveKit reports a
    /// participant that publishes a track as gone at once when its connection drops, and an
    /// SDK's rejoin takes a signalling round trip and an ICE connection (issue 11 item 6: 150
    /// ms); 3 s covers that with margin and costs the caller at most 3 s more filler when the
    /// agent is really gone. `max_filler` still bounds the caller's wait. Zero: no grace.
    pub rejoin_grace: Duration,
    /// The longest the caller may hear filler in one handoff before baton falls back.
    pub max_filler: Duration,
    /// Fade-out of the filler when it stops without the new floor holder heard: the
    /// [`filler_hold`](Policy::filler_hold) ran out, the holder left, or a failed handoff left
    /// nobody to hand back to.
    pub filler_fade: Duration,
    /// After the floor changes hands (the target is activated, or the source gets it back), the
    /// filler plays on until the caller can hear the new holder, whose `lk.agent.state` turning
    /// `speaking` arrives as [`Event::SpeakingChanged`](crate::Event::SpeakingChanged); this is
    /// the longest it waits. A subscription to a just-joined agent's track or a remote unmute
    /// takes longer than any fixed fade. Zero fades out at once.
    pub filler_hold: Duration,
    /// Fade-out of the filler once the new holder is heard, under its first words. The agent
    /// reports itself speaking when it starts playing; a caller still subscribing to a
    /// just-joined agent's track hears it later (hundreds of ms on a busy host), and soft noise
    /// under speech is far better than a hole before it.
    pub filler_tail: Duration,
    /// After the source is quiet (it said so, or fell silent), how long the filler alone plays
    /// before the target is switched in: the source's last words are still in the caller's
    /// jitter buffer, and switching at once let them overlap the target's first by up to 40 ms
    /// in the handoff benchmark. Zero switches at once. A forced mute waits longer (300 ms).
    pub quiet_settle: Duration,
    /// How long after `activate` baton waits to see the target speak before closing the
    /// timeline without a `target_audible` mark.
    pub audible_timeout: Duration,
    /// Dispatch retries for the starting agent.
    pub start_dispatch: Retry,
    /// Dispatch retries for a handoff target. One attempt by default: the caller is on filler,
    /// so an alternate or a handback is better than waiting again.
    pub handoff_dispatch: Retry,
    /// What happens to the source after a completed handoff.
    pub release: ReleasePolicy,
    /// How long a released source may linger before it is removed (policy `leave`).
    pub release_grace: Duration,
    /// Crash suspicion: the floor holder's adapter announced heartbeats (`hello.heartbeat_ms`)
    /// and none has arrived for this long. baton starts the filler and mutes the holder at
    /// once, and asks the server for the holder's job status. With the adapter's 250 ms period
    /// this is three heartbeats lost in a row; a caller hears filler at most this long after
    /// the agent's last sign of life.
    pub crash_suspect_after: Duration,
    /// A suspected agent silent this long in all (counted from its last heartbeat) is crashed
    /// even when no other signal says so (a hung event loop, a network cut). A heartbeat
    /// before then clears the suspicion: a blip, no replacement. A handoff target that stops
    /// sending heartbeats this long is crashed too.
    pub crash_confirm_after: Duration,
    /// How many replacements of a crashed agent (of the same agent name) are tried before its
    /// `alternates`; a crashed handoff target is replaced at most this often too.
    pub recovery_attempts: u32,
    /// How long one replacement may take from its dispatch to `ready` before the next is tried.
    pub recovery_timeout: Duration,
    /// Ask a replacement to say one short sentence that shows it still knows the conversation
    /// (`prepare.greeting`).
    pub recovery_greeting: bool,
    /// Standbys per agent name (absent: none, except while a hint for it is open).
    pub standby: BTreeMap<String, Standby>,
    /// How long after the floor holder's `hint` naming an agent baton keeps an instance of it in
    /// the room (dispatched if none is idle) for the handoff the hint announced; without a
    /// handoff to it by then, the instance baton dispatched is removed. 20 s: a caller's
    /// answer and the model's next turn, with margin.
    pub hint_timeout: Duration,
    /// A floor holder's hints closer together than this are refused (`rate_limited`): each may
    /// cost a dispatch.
    pub hint_interval: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            agents: BTreeSet::new(),
            starting_agent: None,
            alternates: BTreeMap::new(),
            source_quiet_timeout: Duration::from_secs(4),
            sentence_timeout: Duration::from_secs(20),
            silence_grace: Duration::from_millis(400),
            bundle_timeout: Duration::from_secs(5),
            join_timeout: Duration::from_secs(8),
            ready_timeout: Duration::from_secs(8),
            rejoin_grace: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(3),
            max_transfer_time: Duration::from_secs(30),
            max_filler: Duration::from_secs(20),
            filler_fade: Duration::from_millis(250),
            filler_hold: Duration::from_millis(1200),
            filler_tail: Duration::from_secs(1),
            quiet_settle: Duration::from_millis(60),
            audible_timeout: Duration::from_secs(3),
            start_dispatch: Retry {
                attempts: 3,
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(8),
            },
            handoff_dispatch: Retry {
                attempts: 1,
                backoff_initial: Duration::from_millis(500),
                backoff_max: Duration::from_secs(2),
            },
            release: ReleasePolicy::Leave,
            release_grace: Duration::from_secs(5),
            crash_suspect_after: Duration::from_millis(800),
            crash_confirm_after: Duration::from_secs(3),
            recovery_attempts: 2,
            recovery_timeout: Duration::from_secs(15),
            recovery_greeting: true,
            standby: BTreeMap::new(),
            hint_timeout: Duration::from_secs(20),
            hint_interval: Duration::from_secs(1),
        }
    }
}

impl Policy {
    /// Defaults with the given agent set; the first agent is the starting agent.
    pub fn with_agents<I, S>(agents: I) -> Policy
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = agents.into_iter().map(Into::into).collect();
        Policy {
            starting_agent: names.first().cloned(),
            agents: names.into_iter().collect(),
            ..Policy::default()
        }
    }

    /// Checks that the policy is usable; every error names the field to fix.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(name) = self.agents.iter().find(|n| n.len() > MAX_AGENT_NAME) {
            return Err(PolicyError::NameTooLong { name: name.clone() });
        }
        if let Some(start) = &self.starting_agent
            && !self.agents.contains(start)
        {
            return Err(PolicyError::UnknownAgent { field: "starting_agent", name: start.clone() });
        }
        for (target, alts) in &self.alternates {
            if !self.agents.contains(target) {
                return Err(PolicyError::UnknownAgent { field: "alternates", name: target.clone() });
            }
            for alt in alts {
                if !self.agents.contains(alt) {
                    return Err(PolicyError::UnknownAgent { field: "alternates", name: alt.clone() });
                }
            }
        }
        for (name, s) in &self.standby {
            if !self.agents.contains(name) {
                return Err(PolicyError::UnknownAgent { field: "standby", name: name.clone() });
            }
            if s.count > MAX_STANDBY {
                return Err(PolicyError::TooManyStandbys { name: name.clone(), count: s.count });
            }
        }
        let positive = [
            ("source_quiet_timeout", self.source_quiet_timeout),
            ("sentence_timeout", self.sentence_timeout),
            ("bundle_timeout", self.bundle_timeout),
            ("join_timeout", self.join_timeout),
            ("ready_timeout", self.ready_timeout),
            ("stall_timeout", self.stall_timeout),
            ("max_transfer_time", self.max_transfer_time),
            ("max_filler", self.max_filler),
            ("audible_timeout", self.audible_timeout),
            ("release_grace", self.release_grace),
            ("crash_suspect_after", self.crash_suspect_after),
            ("crash_confirm_after", self.crash_confirm_after),
            ("recovery_timeout", self.recovery_timeout),
            ("hint_timeout", self.hint_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(PolicyError::ZeroDuration { field });
            }
        }
        for (field, retry) in [
            ("start_dispatch.attempts", self.start_dispatch),
            ("handoff_dispatch.attempts", self.handoff_dispatch),
        ] {
            if retry.attempts == 0 {
                return Err(PolicyError::ZeroAttempts { field });
            }
        }
        Ok(())
    }
}

/// Why a [`Policy`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// A name used in the policy is not in [`Policy::agents`].
    #[error(
        "{field} names agent `{name}`, which is not in the configured agent set; add it to `agents` or fix the name"
    )]
    UnknownAgent {
        /// The policy field that holds the name.
        field: &'static str,
        /// The unknown agent name.
        name: String,
    },
    /// An agent name longer than [`MAX_AGENT_NAME`] bytes.
    #[error("agent name `{name}` is longer than {MAX_AGENT_NAME} bytes; use a short identifier")]
    NameTooLong {
        /// The name.
        name: String,
    },
    /// A timeout of zero would fire before anything could happen.
    #[error("{field} must be greater than zero")]
    ZeroDuration {
        /// The offending field.
        field: &'static str,
    },
    /// More standbys of one agent than [`MAX_STANDBY`].
    #[error("standby = {count} for agent `{name}`: at most {MAX_STANDBY}")]
    TooManyStandbys {
        /// The agent name.
        name: String,
        /// The count asked for.
        count: u32,
    },
    /// A dispatch needs at least one attempt.
    #[error("{field} must be at least 1")]
    ZeroAttempts {
        /// The offending field.
        field: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let r = Retry {
            attempts: 5,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3),
        };
        assert_eq!(r.backoff(2), Duration::from_secs(1));
        assert_eq!(r.backoff(3), Duration::from_secs(2));
        assert_eq!(r.backoff(4), Duration::from_secs(3));
        assert_eq!(r.backoff(40), Duration::from_secs(3));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut p = Policy::with_agents(["triage", "billing"]);
        assert_eq!(p.validate(), Ok(()));
        p.alternates.insert("billing".into(), vec!["ghost".into()]);
        assert_eq!(
            p.validate(),
            Err(PolicyError::UnknownAgent { field: "alternates", name: "ghost".into() })
        );
        let mut p = Policy::with_agents(["triage"]);
        p.ready_timeout = Duration::ZERO;
        assert_eq!(p.validate(), Err(PolicyError::ZeroDuration { field: "ready_timeout" }));
        let mut p = Policy::with_agents(["triage"]);
        p.starting_agent = Some("nobody".into());
        assert!(p.validate().is_err());
        let long = "a".repeat(MAX_AGENT_NAME + 1);
        let p = Policy::with_agents(["triage".to_string(), long.clone()]);
        assert_eq!(p.validate(), Err(PolicyError::NameTooLong { name: long }));
        let mut p = Policy::with_agents(["triage"]);
        p.standby.insert("billing".into(), Standby { count: 1, from: StandbyFrom::Start });
        assert_eq!(p.validate(), Err(PolicyError::UnknownAgent { field: "standby", name: "billing".into() }));
        let mut p = Policy::with_agents(["triage", "billing"]);
        p.standby.insert("billing".into(), Standby { count: MAX_STANDBY + 1, from: StandbyFrom::Hint });
        assert!(matches!(p.validate(), Err(PolicyError::TooManyStandbys { .. })));
        let mut p = Policy::with_agents(["triage"]);
        p.handoff_dispatch.attempts = 0;
        assert!(matches!(p.validate(), Err(PolicyError::ZeroAttempts { .. })));
    }
}
