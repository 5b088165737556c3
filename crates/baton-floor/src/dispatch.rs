//! Dispatch bookkeeping: which agents baton asked the server for, why, and how patiently.
//!
//! The server drops a dispatch silently when no worker serves that agent name, so the only
//! evidence of failure is an agent that never joins; each dispatch therefore carries a join
//! deadline, and a retry with backoff (deleting the old dispatch first, because creating the
//! same dispatch twice would give two agents).

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use crate::command::{Alert, Command};
use crate::event::{DispatchTicket, Participant};
use crate::policy::Retry;

/// Why an agent was dispatched; one agent is never dispatched twice for the same purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The call's first agent.
    Start,
    /// The target of handoff `id`.
    Handoff(String),
    /// A standby (number `n` of the call, so several of one agent can be in flight at once).
    Standby(u64),
}

/// A dispatch that ran out of attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GaveUp {
    pub agent: String,
    pub purpose: Purpose,
    /// Whether the last attempt failed at the API rather than by a no-show.
    pub api_failed: bool,
}

#[derive(Debug, Clone)]
enum State {
    /// Waiting for the agent to join (and for the API result, if `ticket` is set).
    Waiting { deadline: Instant },
    /// Waiting before the next attempt.
    Backoff { until: Instant },
}

#[derive(Debug, Clone)]
struct Entry {
    agent: String,
    purpose: Purpose,
    metadata: String,
    retry: Retry,
    attempts: u32,
    ticket: Option<DispatchTicket>,
    dispatch_id: Option<String>,
    last_error: Option<String>,
    state: State,
}

/// All dispatches in flight for one room.
#[derive(Debug, Default)]
pub(crate) struct Dispatcher {
    entries: Vec<Entry>,
    next_ticket: u64,
    /// Tickets whose purpose was cancelled before the API answered; delete on success.
    orphans: BTreeMap<DispatchTicket, String>,
    join_timeout: std::time::Duration,
}

impl Dispatcher {
    pub(crate) fn new(join_timeout: std::time::Duration) -> Dispatcher {
        Dispatcher { join_timeout, ..Dispatcher::default() }
    }

    /// Whether a dispatch for `agent` and `purpose` is in flight.
    /// How many standbys of `agent` are in flight.
    pub(crate) fn standbys_in_flight(&self, agent: &str) -> usize {
        self.entries.iter().filter(|e| e.agent == agent && matches!(e.purpose, Purpose::Standby(_))).count()
    }

    pub(crate) fn in_flight(&self, agent: &str, purpose: &Purpose) -> bool {
        self.entries.iter().any(|e| e.agent == agent && &e.purpose == purpose)
    }

    /// Dispatches `agent` unless it is already in flight for this purpose.
    pub(crate) fn request(
        &mut self,
        agent: &str,
        purpose: Purpose,
        retry: Retry,
        metadata: String,
        now: Instant,
        out: &mut VecDeque<Command>,
    ) -> bool {
        if self.in_flight(agent, &purpose) {
            return false;
        }
        let mut entry = Entry {
            agent: agent.to_owned(),
            purpose,
            metadata,
            retry,
            attempts: 0,
            ticket: None,
            dispatch_id: None,
            last_error: None,
            state: State::Waiting { deadline: now },
        };
        self.attempt(&mut entry, now, out);
        self.entries.push(entry);
        true
    }

    /// Waits for an agent the room's token already dispatched; counts as the first attempt, so
    /// baton dispatches it itself only if it does not show up.
    pub(crate) fn expect_token(&mut self, agent: &str, purpose: Purpose, retry: Retry, now: Instant) {
        if self.in_flight(agent, &purpose) {
            return;
        }
        self.entries.push(Entry {
            agent: agent.to_owned(),
            metadata: String::new(),
            purpose,
            retry,
            attempts: 1,
            ticket: None,
            dispatch_id: None,
            last_error: None,
            state: State::Waiting { deadline: now + self.join_timeout },
        });
    }

    fn attempt(&mut self, entry: &mut Entry, now: Instant, out: &mut VecDeque<Command>) {
        let ticket = DispatchTicket(self.next_ticket);
        self.next_ticket += 1;
        entry.attempts += 1;
        entry.ticket = Some(ticket);
        entry.dispatch_id = None;
        entry.state = State::Waiting { deadline: now + self.join_timeout };
        out.push_back(Command::CreateDispatch {
            ticket,
            agent_name: entry.agent.clone(),
            metadata: entry.metadata.clone(),
        });
    }

    /// Ends an attempt: deletes its dispatch (so a late agent does not show up next to the
    /// retry), then schedules the next attempt or gives up.
    fn retire(
        &mut self,
        idx: usize,
        api_failed: bool,
        now: Instant,
        out: &mut VecDeque<Command>,
    ) -> Option<GaveUp> {
        let entry = &mut self.entries[idx];
        if let Some(id) = entry.dispatch_id.take() {
            out.push_back(Command::DeleteDispatch { dispatch_id: id, agent_name: entry.agent.clone() });
        } else if let Some(ticket) = entry.ticket
            && !api_failed
        {
            // The API has not answered yet; delete the dispatch if it ever succeeds.
            self.orphans.insert(ticket, entry.agent.clone());
        }
        entry.ticket = None;
        if entry.attempts < entry.retry.attempts {
            entry.state = State::Backoff { until: now + entry.retry.backoff(entry.attempts + 1) };
            return None;
        }
        let entry = self.entries.remove(idx);
        out.push_back(Command::Alert(Alert::AgentNoShow {
            agent_name: entry.agent.clone(),
            attempts: entry.attempts,
            last_error: entry.last_error,
        }));
        Some(GaveUp { agent: entry.agent, purpose: entry.purpose, api_failed })
    }

    /// The API created the dispatch.
    pub(crate) fn created(
        &mut self,
        ticket: DispatchTicket,
        dispatch_id: String,
        out: &mut VecDeque<Command>,
    ) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.ticket == Some(ticket)) {
            e.dispatch_id = Some(dispatch_id);
        } else if let Some(agent_name) = self.orphans.remove(&ticket) {
            out.push_back(Command::DeleteDispatch { dispatch_id, agent_name });
        }
    }

    /// The API refused the dispatch.
    pub(crate) fn failed(
        &mut self,
        ticket: DispatchTicket,
        error: String,
        now: Instant,
        out: &mut VecDeque<Command>,
    ) -> Option<GaveUp> {
        self.orphans.remove(&ticket);
        let idx = self.entries.iter().position(|e| e.ticket == Some(ticket))?;
        let entry = &mut self.entries[idx];
        out.push_back(Command::Alert(Alert::DispatchFailed {
            agent_name: entry.agent.clone(),
            attempt: entry.attempts,
            error: error.clone(),
        }));
        entry.last_error = Some(error);
        self.retire(idx, true, now, out)
    }

    /// An agent joined: returns the purpose it was dispatched for, matched by agent name and,
    /// when both sides know it, by dispatch id.
    pub(crate) fn joined(&mut self, p: &Participant) -> Option<Purpose> {
        let name = p.agent_name.as_deref()?;
        let idx = self.entries.iter().position(|e| {
            e.agent == name
                && match (&p.dispatch_id, &e.dispatch_id) {
                    (Some(theirs), Some(ours)) => theirs == ours,
                    _ => true,
                }
        })?;
        Some(self.entries.remove(idx).purpose)
    }

    /// Stops dispatching for `purpose`, deleting any dispatch the server already has.
    pub(crate) fn cancel(&mut self, purpose: &Purpose, out: &mut VecDeque<Command>) {
        let mut i = 0;
        while i < self.entries.len() {
            if &self.entries[i].purpose == purpose {
                let e = self.entries.remove(i);
                if let Some(id) = e.dispatch_id {
                    out.push_back(Command::DeleteDispatch { dispatch_id: id, agent_name: e.agent });
                } else if let Some(t) = e.ticket {
                    self.orphans.insert(t, e.agent);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Cancels everything (the session is over).
    pub(crate) fn cancel_all(&mut self, out: &mut VecDeque<Command>) {
        let purposes: Vec<Purpose> = self.entries.iter().map(|e| e.purpose.clone()).collect();
        for p in purposes {
            self.cancel(&p, out);
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .map(|e| match e.state {
                State::Waiting { deadline } => deadline,
                State::Backoff { until } => until,
            })
            .min()
    }

    /// Fires every due deadline; returns the dispatches that gave up.
    pub(crate) fn on_timeout(&mut self, now: Instant, out: &mut VecDeque<Command>) -> Vec<GaveUp> {
        let mut gave_up = Vec::new();
        while let Some(idx) = self.entries.iter().position(|e| match e.state {
            State::Waiting { deadline } => deadline <= now,
            State::Backoff { until } => until <= now,
        }) {
            match self.entries[idx].state {
                State::Waiting { .. } => {
                    if let Some(g) = self.retire(idx, false, now, out) {
                        gave_up.push(g);
                    }
                }
                State::Backoff { .. } => {
                    let mut entry = self.entries.remove(idx);
                    self.attempt(&mut entry, now, out);
                    self.entries.push(entry);
                }
            }
        }
        gave_up
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ParticipantKind;
    use std::time::Duration;

    fn retry(attempts: u32) -> Retry {
        Retry { attempts, backoff_initial: Duration::from_secs(1), backoff_max: Duration::from_secs(4) }
    }

    fn agent(name: &str, dispatch: Option<&str>) -> Participant {
        Participant {
            identity: format!("agent-{name}"),
            kind: ParticipantKind::Agent,
            agent_name: Some(name.into()),
            dispatch_id: dispatch.map(Into::into),
            audio: None,
        }
    }

    #[test]
    fn no_show_retries_with_backoff_then_names_the_agent() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(Duration::from_secs(5));
        let mut out = VecDeque::new();
        assert!(d.request("billing", Purpose::Start, retry(2), "{}".into(), t0, &mut out));
        assert!(!d.request("billing", Purpose::Start, retry(2), "{}".into(), t0, &mut out));
        assert!(matches!(out.pop_front(), Some(Command::CreateDispatch { ticket: DispatchTicket(0), .. })));
        assert!(out.is_empty(), "same purpose must not dispatch twice");
        d.created(DispatchTicket(0), "AD_1".into(), &mut out);
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(5);
        assert!(d.on_timeout(t1, &mut out).is_empty());
        assert_eq!(
            out.pop_front(),
            Some(Command::DeleteDispatch { dispatch_id: "AD_1".into(), agent_name: "billing".into() })
        );
        assert_eq!(d.next_deadline(), Some(t1 + Duration::from_secs(1)));
        let t2 = t1 + Duration::from_secs(1);
        assert!(d.on_timeout(t2, &mut out).is_empty());
        assert!(matches!(out.pop_front(), Some(Command::CreateDispatch { ticket: DispatchTicket(1), .. })));
        let g = d.on_timeout(t2 + Duration::from_secs(5), &mut out);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].agent, "billing");
        assert!(out.iter().any(|c| matches!(c, Command::Alert(Alert::AgentNoShow { agent_name, attempts: 2, .. }) if agent_name == "billing")));
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn join_is_matched_by_dispatch_id_when_known() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(Duration::from_secs(5));
        let mut out = VecDeque::new();
        d.request("billing", Purpose::Handoff("h-1".into()), retry(1), "{}".into(), t0, &mut out);
        d.created(DispatchTicket(0), "AD_new".into(), &mut out);
        assert_eq!(d.joined(&agent("billing", Some("AD_old"))), None);
        assert_eq!(d.joined(&agent("support", None)), None);
        assert_eq!(d.joined(&agent("billing", Some("AD_new"))), Some(Purpose::Handoff("h-1".into())));
    }

    #[test]
    fn cancelled_before_api_answer_is_deleted_when_it_lands() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(Duration::from_secs(5));
        let mut out = VecDeque::new();
        d.request("billing", Purpose::Start, retry(1), "{}".into(), t0, &mut out);
        out.clear();
        d.cancel(&Purpose::Start, &mut out);
        assert!(out.is_empty());
        d.created(DispatchTicket(0), "AD_1".into(), &mut out);
        assert_eq!(
            out.pop_front(),
            Some(Command::DeleteDispatch { dispatch_id: "AD_1".into(), agent_name: "billing".into() })
        );
    }

    #[test]
    fn api_failure_gives_up_after_last_attempt() {
        let t0 = Instant::now();
        let mut d = Dispatcher::new(Duration::from_secs(5));
        let mut out = VecDeque::new();
        d.request("billing", Purpose::Start, retry(1), "{}".into(), t0, &mut out);
        let g = d.failed(DispatchTicket(0), "503".into(), t0, &mut out).unwrap();
        assert!(g.api_failed);
        assert!(out.iter().any(
            |c| matches!(c, Command::Alert(Alert::AgentNoShow { last_error: Some(e), .. }) if e == "503")
        ));
    }
}
