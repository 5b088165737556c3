//! A virtual-time room for driving the arbiter in tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

pub use baton_floor::TransferId;
use baton_floor::{
    AgentMessage, Arbiter, AudioTrack, BatonMessage, Command, DispatchTicket, Event, FillerCommand,
    Participant, ParticipantKind, Policy, Timeline,
};

/// The transfer id `n`.
/// A `handoff` for `target` with no bundle: `quiet` (the source finished its sentence) and
/// `filler` (it plays a filler of its own) as given.
pub fn handoff_request(target: &str, reason: &str, quiet: bool, filler: bool) -> AgentMessage {
    AgentMessage::Handoff {
        target: target.into(),
        reason: reason.into(),
        transfer: None,
        bundle_follows: false,
        quiet,
        quiet_ms: None,
        filler,
        speaking: false,
    }
}

pub fn tid(n: u128) -> TransferId {
    TransferId::new(n)
}

pub const TRIAGE: &str = "agent-triage";
pub const BILLING: &str = "agent-billing";
pub const SUPPORT: &str = "agent-support";
pub const CALLER: &str = "caller";

/// The test policy: three agents, billing's alternate is support. No quiet settle, so a
/// switch happens at the instant its conditions hold; the settle has its own test.
pub fn policy() -> Policy {
    let mut p = Policy::with_agents(["triage", "billing", "support"]);
    p.alternates.insert("billing".into(), vec!["support".into()]);
    p.quiet_settle = std::time::Duration::ZERO;
    p
}

/// [`policy`] without billing's alternate, so a failing target ends in a handback.
pub fn policy_without_alternates() -> Policy {
    let mut p = policy();
    p.alternates.clear();
    p
}

/// The `prepare` billing gets for triage's [`Room::request`] of handoff `h-1` carrying transfer 1.
pub fn refund_prepare() -> BatonMessage {
    BatonMessage::Prepare {
        handoff: "h-1".into(),
        source: "triage".into(),
        reason: "caller wants a refund".into(),
        transfer: Some(tid(1)),
        bundle: true,
        cause: None,
        greeting: None,
    }
}

pub fn agent(identity: &str, name: &str, muted: bool) -> Participant {
    Participant {
        identity: identity.into(),
        kind: ParticipantKind::Agent,
        agent_name: Some(name.into()),
        dispatch_id: None,
        audio: Some(AudioTrack { sid: format!("TR_{name}"), muted }),
    }
}

pub fn caller() -> Participant {
    Participant {
        identity: CALLER.into(),
        kind: ParticipantKind::Sip,
        agent_name: None,
        dispatch_id: None,
        audio: Some(AudioTrack { sid: "TR_caller".into(), muted: false }),
    }
}

pub struct Room {
    pub arb: Arbiter,
    pub t0: Instant,
    pub now: Instant,
    /// Every command ever emitted, in order.
    pub log: Vec<Command>,
    next_msg: u32,
}

impl Room {
    pub fn new(policy: Policy) -> Room {
        let t0 = Instant::now();
        Room {
            arb: Arbiter::new(policy, t0).expect("valid policy"),
            t0,
            now: t0,
            log: Vec::new(),
            next_msg: 0,
        }
    }

    /// A room where the caller and triage are present and triage is activated.
    pub fn with_triage_active(policy: Policy) -> Room {
        let mut r = Room::new(policy);
        let out = r.ev(Event::RoomJoined {
            participants: vec![caller(), agent(TRIAGE, "triage", false)],
            token_dispatched: vec![],
        });
        assert!(
            !out.iter().any(|c| matches!(c, Command::CreateDispatch { .. })),
            "starting agent is present: no dispatch"
        );
        let out = r.hello(TRIAGE, "triage");
        assert!(sent(&out, TRIAGE, "activate"));
        assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
        r
    }

    fn drain(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        while let Some(c) = self.arb.poll_command() {
            out.push(c);
        }
        self.log.extend(out.iter().cloned());
        out
    }

    pub fn ev(&mut self, e: Event) -> Vec<Command> {
        self.arb.handle(e, self.now);
        self.drain()
    }

    pub fn ctl(&mut self, from: &str, message: AgentMessage) -> Vec<Command> {
        self.next_msg += 1;
        let id = format!("m-{}", self.next_msg);
        self.ev(Event::Control { from: from.into(), id, message })
    }

    pub fn hello(&mut self, from: &str, name: &str) -> Vec<Command> {
        self.ctl(from, AgentMessage::Hello { agent_name: name.into(), role: None, heartbeat_ms: None })
    }

    pub fn request(&mut self, from: &str, target: &str, transfer: Option<TransferId>) -> Vec<Command> {
        self.ctl(
            from,
            AgentMessage::Handoff {
                target: target.into(),
                reason: "caller wants a refund".into(),
                transfer,
                bundle_follows: false,
                quiet: false,
                quiet_ms: None,
                filler: false,
                speaking: false,
            },
        )
    }

    pub fn ready(&mut self, from: &str, handoff: &str) -> Vec<Command> {
        self.ctl(from, AgentMessage::Ready { handoff: handoff.into() })
    }

    pub fn quiet(&mut self, from: &str) -> Vec<Command> {
        self.ctl(from, AgentMessage::Quiet { handoff: None, quiet_ms: None })
    }

    pub fn join(&mut self, p: Participant) -> Vec<Command> {
        self.ev(Event::ParticipantJoined(p))
    }

    pub fn leave(&mut self, identity: &str) -> Vec<Command> {
        self.ev(Event::ParticipantLeft { identity: identity.into() })
    }

    /// Moves virtual time forward by `d`, firing every deadline on the way at its own instant.
    pub fn advance(&mut self, d: Duration) -> Vec<Command> {
        let end = self.now + d;
        let mut out = Vec::new();
        while let Some(at) = self.arb.poll_timeout() {
            if at > end {
                break;
            }
            self.now = self.now.max(at);
            self.arb.handle_timeout(self.now);
            out.extend(self.drain());
        }
        self.now = end;
        out
    }

    pub fn ms(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }
}

/// The ticket of the CreateDispatch for `agent` in `cmds`.
pub fn ticket_for(cmds: &[Command], agent: &str) -> DispatchTicket {
    cmds.iter()
        .find_map(|c| match c {
            Command::CreateDispatch { ticket, agent_name, .. } if agent_name == agent => Some(*ticket),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no CreateDispatch for {agent} in {cmds:#?}"))
}

pub fn messages_to<'a>(cmds: &'a [Command], to: &str) -> Vec<&'a BatonMessage> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send { to: dest, message, .. } if dest == to => Some(message),
            _ => None,
        })
        .collect()
}

pub fn sent(cmds: &[Command], to: &str, ty: &str) -> bool {
    messages_to(cmds, to).iter().any(|m| m.type_name() == ty)
}

pub fn position(cmds: &[Command], pred: impl Fn(&Command) -> bool) -> Option<usize> {
    cmds.iter().position(pred)
}

pub fn muted(cmds: &[Command], who: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::MuteTrack { identity, .. } if identity == who))
}

pub fn unmuted(cmds: &[Command], who: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::UnmuteTrack { identity, .. } if identity == who))
}

pub fn filler_started(cmds: &[Command]) -> bool {
    cmds.iter().any(|c| matches!(c, Command::Filler(FillerCommand::On)))
}

pub fn filler_stopped(cmds: &[Command]) -> bool {
    cmds.iter().any(|c| matches!(c, Command::Filler(FillerCommand::FadeOut(_))))
}

pub fn finished(cmds: &[Command]) -> Option<Timeline> {
    cmds.iter().find_map(|c| match c {
        Command::HandoffFinished(t) => Some((**t).clone()),
        _ => None,
    })
}

pub fn dispatched(cmds: &[Command], agent: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::CreateDispatch { agent_name, .. } if agent_name == agent))
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Triage holds the floor, a billing standby said hello, and `quiet_settle` is 60 ms.
pub fn standby_billing_with_a_60_ms_settle() -> Room {
    let mut p = policy();
    p.quiet_settle = ms(60);
    let mut r = Room::with_triage_active(p);
    r.join(agent(BILLING, "billing", true));
    r.hello(BILLING, "billing");
    r
}

/// Triage active, billing requested cold; returns the room right after the request.
pub fn cold_request(transfer: Option<TransferId>) -> (Room, Vec<Command>) {
    let mut r = Room::with_triage_active(policy());
    let out = r.request(TRIAGE, "billing", transfer);
    (r, out)
}

/// Brings a dispatched billing into the room and lets it say hello.
pub fn billing_arrives(r: &mut Room, dispatch_id: &str) -> Vec<Command> {
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: dispatch_id.into() });
    let mut p = agent(BILLING, "billing", false);
    p.dispatch_id = Some(dispatch_id.into());
    let mut out = r.join(p);
    out.extend(r.hello(BILLING, "billing"));
    out
}
