//! Room start, dispatch of the starting agent, enforcement outside handoffs, and authorisation.

mod support;

use std::time::Duration;

use baton_floor::{
    ActivateCause, AgentMessage, Alert, BatonMessage, Command, Event, FillerCommand, Participant,
    ParticipantKind, SecurityReason,
};
use support::*;

#[test]
fn starting_agent_is_dispatched_and_activated_on_hello() {
    let mut r = Room::new(policy());
    let out = r.ev(Event::RoomJoined { participants: vec![caller()], token_dispatched: vec![] });
    let ticket = ticket_for(&out, "triage");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_1".into() });
    let mut p = agent(TRIAGE, "triage", true);
    p.dispatch_id = Some("AD_1".into());
    let out = r.join(p);
    assert!(!sent(&out, TRIAGE, "activate"), "not before its adapter is listening");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    let out = r.hello(TRIAGE, "triage");
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::Activate {
        handoff: None,
        cause: ActivateCause::Start,
        reason: None
    }));
    assert!(unmuted(&out, TRIAGE), "joined muted: unmuted on activation");
    // Joined in time: no retry later.
    assert!(r.advance(Duration::from_secs(60)).is_empty());
}

#[test]
fn starting_agent_already_dispatched_by_token_is_awaited_then_dispatched_once() {
    let mut r = Room::new(policy());
    let out =
        r.ev(Event::RoomJoined { participants: vec![caller()], token_dispatched: vec!["triage".into()] });
    assert!(!dispatched(&out, "triage"));
    let out = r.advance(Duration::from_millis(7_999));
    assert!(out.is_empty());
    // The token's dispatch never produced an agent: baton dispatches it itself, after backoff.
    let out = r.advance(Duration::from_secs(1) + Duration::from_millis(1));
    assert_eq!(out.iter().filter(|c| matches!(c, Command::CreateDispatch { .. })).count(), 1);
}

#[test]
fn starting_agent_no_show_is_retried_with_backoff_then_named_in_an_alert() {
    let mut r = Room::new(policy());
    r.ev(Event::RoomJoined { participants: vec![caller()], token_dispatched: vec![] });
    // attempts 3, join 8 s, backoff 1 s then 2 s: dispatches at 0, 9, 19; gives up at 27.
    let mut times = vec![0];
    let mut gave_up_at = None;
    for _ in 0..30_000 {
        let out = r.advance(Duration::from_millis(1));
        if dispatched(&out, "triage") {
            times.push(r.ms());
        }
        if out.iter().any(|c| matches!(c, Command::Alert(Alert::AgentNoShow { agent_name, attempts: 3, .. }) if agent_name == "triage")) {
            gave_up_at = Some(r.ms());
        }
    }
    assert_eq!(times, vec![0, 9_000, 19_000]);
    assert_eq!(gave_up_at, Some(27_000));
    assert_eq!(r.arb.poll_timeout(), None);
    // If it shows up late after all, it still gets the floor.
    r.join(agent(TRIAGE, "triage", false));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

#[test]
fn starting_agent_no_show_falls_back_to_its_alternate() {
    let mut p = policy();
    p.alternates.insert("triage".into(), vec!["billing".into()]);
    p.start_dispatch.attempts = 1;
    let mut r = Room::new(p);
    let out = r.ev(Event::RoomJoined { participants: vec![caller()], token_dispatched: vec![] });
    assert!(dispatched(&out, "triage"));
    // triage's one attempt times out (join_timeout 8 s): billing is dispatched for the start.
    let out = r.advance(Duration::from_millis(8_001));
    assert!(out.iter().any(
        |c| matches!(c, Command::Alert(Alert::AgentNoShow { agent_name, .. }) if agent_name == "triage")
    ));
    let ticket = ticket_for(&out, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_2".into() });
    let mut b = agent(BILLING, "billing", true);
    b.dispatch_id = Some("AD_2".into());
    r.join(b);
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let out = r.hello(BILLING, "billing");
    assert!(sent(&out, BILLING, "activate"));
    // The chain ends with the last alternate: no more dispatches after billing's no-show either.
    let mut r = Room::new({
        let mut p = policy();
        p.alternates.insert("triage".into(), vec!["billing".into()]);
        p.start_dispatch.attempts = 1;
        p
    });
    r.ev(Event::RoomJoined { participants: vec![caller()], token_dispatched: vec![] });
    let out = r.advance(Duration::from_secs(60));
    let n = out.iter().filter(|c| matches!(c, Command::CreateDispatch { .. })).count();
    assert_eq!(n, 1, "billing once after triage, then nothing");
    assert_eq!(r.arb.floor_holder(), None);
}

#[test]
fn a_second_live_agent_is_muted_while_another_holds_the_floor() {
    let mut r = Room::with_triage_active(policy());
    let out = r.join(agent(BILLING, "billing", false));
    assert!(muted(&out, BILLING));
    assert!(!muted(&out, TRIAGE));
    // An agent outside the configured set is none of baton's business.
    let mut other = agent("agent-x", "sales", false);
    other.identity = "agent-x".into();
    let out = r.join(other);
    assert!(!muted(&out, "agent-x"));
}

#[test]
fn repeated_hello_from_the_holder_resends_activate() {
    let mut r = Room::with_triage_active(policy());
    let out = r.hello(TRIAGE, "triage");
    assert!(sent(&out, TRIAGE, "activate"));
}

fn forged(r: &mut Room, from: &str) -> Vec<Command> {
    r.ctl(
        from,
        AgentMessage::Handoff {
            target: "billing".into(),
            reason: "forged".into(),
            transfer: None,
            bundle_follows: false,
            quiet: false,
            quiet_ms: None,
            filler: false,
            speaking: false,
        },
    )
}

fn security_reason(out: &[Command]) -> Option<SecurityReason> {
    out.iter().find_map(|c| match c {
        Command::Security(s) => Some(s.reason.clone()),
        _ => None,
    })
}

#[test]
fn control_from_anyone_but_a_configured_agent_is_a_security_event_and_changes_nothing() {
    let mut r = Room::with_triage_active(policy());
    // The caller's client can send data packets too.
    let out = forged(&mut r, CALLER);
    assert_eq!(out.len(), 1, "{out:#?}");
    assert_eq!(security_reason(&out), Some(SecurityReason::NotAnAgent));
    // An agent outside the configured set.
    r.join(Participant {
        identity: "agent-x".into(),
        kind: ParticipantKind::Agent,
        agent_name: Some("sales".into()),
        dispatch_id: None,
        audio: None,
    });
    let out = forged(&mut r, "agent-x");
    assert_eq!(
        security_reason(&out),
        Some(SecurityReason::AgentNotConfigured { agent_name: "sales".into() })
    );
    // An agent without the server-stamped name attribute.
    r.join(Participant {
        identity: "agent-anon".into(),
        kind: ParticipantKind::Agent,
        agent_name: None,
        dispatch_id: None,
        audio: None,
    });
    assert_eq!(security_reason(&forged(&mut r, "agent-anon")), Some(SecurityReason::UnnamedAgent));
    // Someone not in the room at all.
    assert_eq!(security_reason(&forged(&mut r, "ghost")), Some(SecurityReason::UnknownParticipant));
    // A caller pretending, in the payload, to be triage.
    let out =
        r.ctl(CALLER, AgentMessage::Hello { agent_name: "triage".into(), role: None, heartbeat_ms: None });
    assert_eq!(security_reason(&out), Some(SecurityReason::NotAnAgent));
    // A configured agent claiming another's name.
    r.join(agent(BILLING, "billing", true));
    let out = r.hello(BILLING, "triage");
    assert_eq!(
        security_reason(&out),
        Some(SecurityReason::NameMismatch { claimed: "triage".into(), actual: "billing".into() })
    );
    // A bundle from the caller is not accepted either.
    let out = r.ev(Event::BundleReceived { from: CALLER.into(), transfer_id: tid(0x78), bytes: 1 });
    assert_eq!(security_reason(&out), Some(SecurityReason::NotAnAgent));

    assert!(r.arb.handoff().is_none());
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    assert!(
        !r.log
            .iter()
            .any(|c| matches!(c, Command::CreateDispatch { .. } | Command::Filler(FillerCommand::On)))
    );
    assert!(
        !r.log.iter().any(|c| matches!(c, Command::Send { to, .. } if to == CALLER)),
        "never answer the caller"
    );
}

#[test]
fn forged_ready_cannot_complete_a_handoff() {
    let mut r = Room::with_triage_active(policy());
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    let out = r.ctl(CALLER, AgentMessage::Ready { handoff: "h-1".into() });
    assert!(security_reason(&out).is_some());
    assert!(r.arb.filler_on());
    assert!(r.arb.handoff().is_some());
}
