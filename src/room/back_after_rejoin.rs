//! Waiting for the callers and agents missing after a rejoin (issue 14: the server restarts).
//!
//! When livekit-server restarts, every participant has to join its new incarnation of the room,
//! and baton may get there first. The rooms it finds then lacks the caller, and a caller who
//! left means the session is over. So after a rejoin, a caller (a standard or SIP participant)
//! missing from the new room is not reported as gone at once: it is awaited for
//! [`CALLERS_BACK_WAIT`], and reported as gone only if it has not joined again by then. Agents
//! missing after a rejoin are awaited too, for [`AGENTS_BACK_WAIT`]: reported at once, the floor
//! holder would count as crashed and be replaced although its job is alive and about to join
//! again (an e2e run saw triage back 0.4 s after baton, replaced already). Pure bookkeeping,
//! driven by the room task with the current time.

use std::time::{Duration, Instant};

use super::roster::{Change, Member};

/// How long callers missing after a rejoin are awaited before they count as gone. The server's
/// own rejoin takes about 2 s (docs/BENCHMARKS.md); a caller's SDK retries for longer.
pub const CALLERS_BACK_WAIT: Duration = Duration::from_secs(20);

/// How long agents missing after a rejoin are awaited: an agent's job reconnects on its own,
/// like the caller, usually within a second or two of baton; one that does not is replaced
/// (a recovery) this much later than a crash seen in a running room.
pub const AGENTS_BACK_WAIT: Duration = Duration::from_secs(5);

/// The participants awaited after a rejoin, each with the moment it counts as gone.
#[derive(Debug, Default)]
pub struct BackAfterRejoin {
    awaited: Vec<(Member, Instant)>,
}

impl BackAfterRejoin {
    /// After a rejoin: the members known before that are not in the new room (`missing`) are
    /// awaited, callers until `now` + [`CALLERS_BACK_WAIT`], everyone else (agents) until `now`
    /// + [`AGENTS_BACK_WAIT`]. Nothing is gone yet: [`due`](Self::due) reports who stayed away.
    pub fn after_rejoin(&mut self, missing: Vec<Member>, now: Instant) {
        for m in missing {
            let (who, wait) = if super::roster::is_caller(m.kind) {
                ("caller", CALLERS_BACK_WAIT)
            } else {
                ("participant", AGENTS_BACK_WAIT)
            };
            tracing::info!(identity = %m.identity, wait_s = wait.as_secs(), "{who} not in the room after the rejoin; waiting for it");
            self.awaited.retain(|(a, _)| a.identity != m.identity);
            self.awaited.push((m, now + wait));
        }
    }

    /// Notes the room's changes: an awaited participant that joined again is no longer awaited.
    pub fn seen(&mut self, changes: &[Change]) {
        for c in changes {
            if let Change::Joined(m) = c
                && let Some(i) = self.awaited.iter().position(|(a, _)| a.identity == m.identity)
            {
                self.awaited.swap_remove(i);
                tracing::info!(identity = %m.identity, "back after the rejoin");
            }
        }
    }

    /// The awaited participants whose wait ended by `now`, as `Left`.
    pub fn due(&mut self, now: Instant) -> Vec<Change> {
        let (gone, kept): (Vec<_>, Vec<_>) = self.awaited.drain(..).partition(|(_, at)| *at <= now);
        self.awaited = kept;
        gone.into_iter()
            .map(|(m, _)| {
                tracing::info!(identity = %m.identity, "did not come back after the rejoin");
                Change::Left(m)
            })
            .collect()
    }

    /// When the next awaited participant counts as gone.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.awaited.iter().map(|(_, at)| *at).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol::participant_info::{Kind, State};

    fn member(identity: &str, kind: Kind) -> Member {
        Member {
            sid: format!("PA_{identity}"),
            identity: identity.into(),
            name: identity.into(),
            kind,
            state: State::Active,
            attributes: Default::default(),
            tracks: Vec::new(),
            version: 1,
        }
    }

    fn left(changes: &[Change]) -> Vec<&str> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Left(m) => Some(m.identity.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_caller_missing_after_a_rejoin_is_awaited_and_gone_only_after_the_wait() {
        let t0 = Instant::now();
        let mut w = BackAfterRejoin::default();
        w.after_rejoin(vec![member("caller", Kind::Standard), member("agent-1", Kind::Agent)], t0);
        assert_eq!(w.next_deadline(), Some(t0 + AGENTS_BACK_WAIT));
        assert!(w.due(t0 + AGENTS_BACK_WAIT - Duration::from_millis(1)).is_empty(), "nobody gone at once");
        assert_eq!(left(&w.due(t0 + AGENTS_BACK_WAIT)), ["agent-1"], "the agent's shorter wait");
        assert_eq!(w.next_deadline(), Some(t0 + CALLERS_BACK_WAIT));
        assert!(w.due(t0 + CALLERS_BACK_WAIT - Duration::from_millis(1)).is_empty());
        assert_eq!(left(&w.due(t0 + CALLERS_BACK_WAIT)), ["caller"]);
        assert_eq!(w.next_deadline(), None);
        assert!(w.due(t0 + CALLERS_BACK_WAIT * 2).is_empty(), "reported once");
    }

    #[test]
    fn a_caller_that_joins_again_in_time_is_never_reported_gone() {
        let t0 = Instant::now();
        let mut w = BackAfterRejoin::default();
        w.after_rejoin(
            vec![
                member("caller", Kind::Standard),
                member("phone", Kind::Sip),
                member("agent-1", Kind::Agent),
            ],
            t0,
        );
        w.seen(&[
            Change::Joined(member("caller", Kind::Standard)),
            Change::Joined(member("agent-1", Kind::Agent)),
            Change::Joined(member("agent-2", Kind::Agent)),
        ]);
        assert_eq!(left(&w.due(t0 + CALLERS_BACK_WAIT)), ["phone"], "only the SIP caller stayed away");
        assert!(w.due(t0 + CALLERS_BACK_WAIT * 2).is_empty());
    }
}
