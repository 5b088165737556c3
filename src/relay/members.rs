//! Who may send bundles to baton and who may receive them: the relay's view of the room.
//!
//! The rules (`docs/protocol.md`, section 4.10), all on facts the server stamps (identity,
//! participant kind, the agent-name attribute of the token it accepted), never on the packet:
//!
//! - a **sender** is authorized when it is an agent participant whose agent name is one of
//!   baton's configured agents (any agent participant when none is configured);
//! - a bundle goes only to an **agent participant**: a caller's client never receives one;
//! - a packet from an identity the room has **not announced** yet is dropped unanswered. Data
//!   can overtake the join announcement; the coordinator holds such packets for a while first,
//!   and the sender's retransmission timer resends an OPEN that was dropped.

use std::collections::{BTreeSet, HashMap};

use livekit_protocol::participant_info::Kind;

use crate::room::{Change, Member, Roster};

/// How the relay treats the sender of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not in the room as far as baton knows.
    Unknown,
    /// A configured agent: may send bundles to baton.
    Authorized,
    /// In the room, but not a configured agent.
    Unauthorized,
}

/// The room's participants as context transfer sees them.
#[derive(Debug, Default)]
pub struct Members {
    /// Identity -> `Some(agent name)` for agent participants (empty when unnamed), `None` for
    /// everyone else.
    present: HashMap<String, Option<String>>,
    /// Agent names allowed to send bundles; empty allows every agent participant.
    allowed: BTreeSet<String>,
}

impl Members {
    /// Nobody present yet; senders are judged against `allowed_agents`.
    pub fn new(allowed_agents: BTreeSet<String>) -> Self {
        Members { present: HashMap::new(), allowed: allowed_agents }
    }

    /// Applies one roster change. Returns the identity when it (re)joined (a join, or an update
    /// with a new sid), so its transfers can resume.
    pub fn apply<'c>(&mut self, change: &'c Change) -> Option<&'c str> {
        match change {
            Change::Joined(m) => {
                self.present.insert(m.identity.clone(), agent_name(m));
                Some(&m.identity)
            }
            Change::Updated { before, after } => {
                self.present.insert(after.identity.clone(), agent_name(after));
                // The server may report a participant that reconnected under the same identity
                // as an update with a new session id (sid) instead of a join: a rejoin all the
                // same, whose transfers resume.
                (before.sid != after.sid).then_some(after.identity.as_str())
            }
            Change::Left(m) => {
                self.present.remove(&m.identity);
                None
            }
        }
    }

    /// Replaces everything with the room as `roster` has it (after baton's own (re)connection).
    pub fn reset(&mut self, roster: &Roster) {
        self.present = roster.members().map(|m| (m.identity.clone(), agent_name(m))).collect();
    }

    /// How a packet from `identity` is treated.
    pub fn standing(&self, identity: &str) -> Standing {
        match self.present.get(identity) {
            None => Standing::Unknown,
            Some(Some(name)) if self.allowed.is_empty() || self.allowed.contains(name) => {
                Standing::Authorized
            }
            Some(_) => Standing::Unauthorized,
        }
    }

    /// The `lk.agent.name` of `identity` when it is in the room as an agent participant with a
    /// name (the server stamps it from the token it accepted), else `None`.
    pub fn agent_name(&self, identity: &str) -> Option<&str> {
        self.present.get(identity).and_then(Option::as_deref).filter(|n| !n.is_empty())
    }

    /// Whether `identity` is in the room as an agent participant (may receive bundles).
    pub fn is_agent(&self, identity: &str) -> bool {
        self.present.get(identity).is_some_and(Option::is_some)
    }
}

/// `Some(agent name)` for an agent participant (empty when it has none), else `None`.
fn agent_name(m: &Member) -> Option<String> {
    (m.kind == Kind::Agent).then(|| m.agent_name().unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::roster::announced as info;
    use livekit_protocol as proto;

    #[test]
    fn only_configured_agents_send_and_only_agents_receive() {
        let (roster, _) = Roster::new(
            "PA_baton",
            &[
                info("caller", Kind::Standard, None),
                info("agent-1", Kind::Agent, Some("triage")),
                info("agent-2", Kind::Agent, Some("stranger")),
                // The attribute alone does not make an agent: the kind is the server's.
                info("forger", Kind::Standard, Some("triage")),
            ],
        );
        let mut m = Members::new(BTreeSet::from(["triage".to_string()]));
        m.reset(&roster);
        assert_eq!(m.standing("agent-1"), Standing::Authorized);
        assert_eq!(m.standing("agent-2"), Standing::Unauthorized);
        assert_eq!(m.standing("forger"), Standing::Unauthorized);
        assert_eq!(m.standing("caller"), Standing::Unauthorized);
        assert_eq!(m.standing("nobody"), Standing::Unknown);
        assert!(m.is_agent("agent-2"));
        assert!(!m.is_agent("caller") && !m.is_agent("forger") && !m.is_agent("nobody"));
        assert_eq!(m.agent_name("agent-1"), Some("triage"));
        assert_eq!(m.agent_name("agent-2"), Some("stranger"));
        assert_eq!(
            (m.agent_name("forger"), m.agent_name("caller"), m.agent_name("nobody")),
            (None, None, None)
        );

        // With no configured agents, every agent participant may send.
        let mut open = Members::default();
        open.reset(&roster);
        assert_eq!(open.standing("agent-2"), Standing::Authorized);
        assert_eq!(open.standing("forger"), Standing::Unauthorized);
    }

    #[test]
    fn joins_are_reported_and_leaves_forgotten() {
        let (mut roster, _) = Roster::new("PA_baton", &[]);
        let mut m = Members::default();
        let joined = roster.apply(&[info("agent-1", Kind::Agent, Some("triage"))]);
        let resumed: Vec<_> = joined.iter().filter_map(|c| m.apply(c).map(str::to_owned)).collect();
        assert_eq!(resumed, ["agent-1"]);
        assert_eq!(m.standing("agent-1"), Standing::Authorized);
        let mut gone = info("agent-1", Kind::Agent, Some("triage"));
        gone.state = proto::participant_info::State::Disconnected as i32;
        gone.version = 2;
        for c in roster.apply(&[gone]) {
            assert_eq!(m.apply(&c), None);
        }
        assert_eq!(m.standing("agent-1"), Standing::Unknown);
    }

    #[test]
    fn an_update_with_a_new_sid_is_a_rejoin_and_other_updates_are_not() {
        let (mut roster, _) = Roster::new("PA_baton", &[]);
        let mut m = Members::default();
        for c in roster.apply(&[info("agent-1", Kind::Agent, Some("triage"))]) {
            assert_eq!(m.apply(&c), Some("agent-1"));
        }
        let mut renamed = info("agent-1", Kind::Agent, Some("triage"));
        renamed.name = "Triage".into();
        renamed.version = 2;
        let changes = roster.apply(&[renamed.clone()]);
        assert!(matches!(&changes[..], [Change::Updated { .. }]), "{changes:?}");
        assert_eq!(m.apply(&changes[0]), None, "a change of name is not a rejoin");
        let rejoined = proto::ParticipantInfo { sid: "PA_agent-1_again".into(), version: 1, ..renamed };
        let changes = roster.apply(&[rejoined]);
        assert!(matches!(&changes[..], [Change::Updated { .. }]), "{changes:?}");
        assert_eq!(m.apply(&changes[0]), Some("agent-1"));
        assert_eq!(m.standing("agent-1"), Standing::Authorized);
    }
}
