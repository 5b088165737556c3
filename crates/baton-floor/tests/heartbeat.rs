//! Heartbeats (docs/protocol.md, "Checkpoints, heartbeats and recovery"): the period an agent
//! announces in `hello`, the `heartbeat` messages that follow, and who may send them. Crash
//! suspicion on a heartbeat gap (issue 13) builds on what these tests pin.

mod support;

use std::time::Duration;

use baton_floor::{AgentMessage, Command};
use support::*;

fn hello_with_heartbeat(r: &mut Room, ms: u32) -> Vec<Command> {
    r.ctl(TRIAGE, AgentMessage::Hello { agent_name: "triage".into(), role: None, heartbeat_ms: Some(ms) })
}

#[test]
fn heartbeats_are_recorded_and_never_answered() {
    let mut r = Room::with_triage_active(policy());
    assert_eq!(r.arb.heartbeat(TRIAGE), None, "an adapter that announced none is not watched");
    // A heartbeat before any announcement is ignored, silently.
    assert!(r.ctl(TRIAGE, AgentMessage::Heartbeat { seq: 0 }).is_empty());
    assert_eq!(r.arb.heartbeat(TRIAGE), None);
    hello_with_heartbeat(&mut r, 250);
    assert_eq!(r.arb.heartbeat(TRIAGE), Some((Duration::from_millis(250), r.now)));
    for seq in 1..=4 {
        r.now += Duration::from_millis(250);
        let out = r.ctl(TRIAGE, AgentMessage::Heartbeat { seq });
        assert!(out.is_empty(), "a heartbeat gets no answer and changes nothing: {out:?}");
    }
    assert_eq!(r.arb.heartbeat(TRIAGE), Some((Duration::from_millis(250), r.now)));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

#[test]
fn an_announced_period_is_clamped() {
    let mut r = Room::with_triage_active(policy());
    hello_with_heartbeat(&mut r, 0);
    assert_eq!(r.arb.heartbeat(TRIAGE).map(|(every, _)| every), Some(Duration::from_millis(50)));
    hello_with_heartbeat(&mut r, u32::MAX);
    assert_eq!(r.arb.heartbeat(TRIAGE).map(|(every, _)| every), Some(Duration::from_secs(10)));
}

#[test]
fn a_heartbeat_from_the_caller_is_a_security_event_without_reply() {
    let mut r = Room::with_triage_active(policy());
    let out = r.ctl(CALLER, AgentMessage::Heartbeat { seq: 1 });
    assert!(
        out.iter().any(|c| matches!(c, Command::Security(s) if s.message_type == "heartbeat")),
        "{out:?}"
    );
    assert!(!out.iter().any(|c| matches!(c, Command::Send { .. })), "{out:?}");
    assert_eq!(r.arb.heartbeat(CALLER), None);
}
