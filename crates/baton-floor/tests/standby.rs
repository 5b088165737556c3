//! Standbys and hints in virtual time: agents kept idle in the room (per `standby`, or for an
//! open `hint`) so a handoff to them is a switch, removed when no longer wanted, replaced when
//! they crash, never audible.

mod support;

use std::time::Duration;

use baton_floor::{
    AgentMessage, Alert, BatonMessage, Command, DeactivateReason, Event, FillerCommand, Participant, Phase,
    Policy, Standby, StandbyFrom,
};
use support::*;

fn with_standby(count: u32, from: StandbyFrom) -> Policy {
    let mut p = policy();
    p.standby.insert("billing".into(), Standby { count, from });
    p
}

/// The metadata of every CreateDispatch for `agent` in `cmds`.
fn dispatch_meta(cmds: &[Command], agent: &str) -> Vec<serde_json::Value> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::CreateDispatch { agent_name, metadata, .. } if agent_name == agent => {
                Some(serde_json::from_str(metadata).expect("metadata is JSON"))
            }
            _ => None,
        })
        .collect()
}

fn removed(cmds: &[Command], who: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::RemoveParticipant { identity } if identity == who))
}

fn ignored(cmds: &[Command], why_part: &str) -> bool {
    cmds.iter().any(|c| {
        matches!(c, Command::Alert(Alert::IgnoredMessage { message_type: "hint", why, .. }) if why.contains(why_part))
    })
}

/// A billing from dispatch `dispatch_id` joins (unmuted, as an agent publishing at once does)
/// under `identity` and says hello.
fn standby_arrives(r: &mut Room, identity: &str, dispatch_id: &str) -> Vec<Command> {
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: dispatch_id.into() });
    let mut p: Participant = agent(identity, "billing", false);
    p.dispatch_id = Some(dispatch_id.into());
    let mut out = r.join(p);
    out.extend(r.hello(identity, "billing"));
    out
}

/// Caller and triage in the room, triage activated; whatever the policy dispatches at the start
/// is in `r.log`.
fn triage_active(policy: Policy) -> Room {
    let mut r = Room::new(policy);
    r.ev(Event::RoomJoined {
        participants: vec![caller(), agent(TRIAGE, "triage", false)],
        token_dispatched: vec![],
    });
    let out = r.hello(TRIAGE, "triage");
    assert!(sent(&out, TRIAGE, "activate"));
    r
}

fn hint(r: &mut Room, from: &str, target: &str) -> Vec<Command> {
    r.ctl(from, AgentMessage::Hint { target: target.into() })
}

#[test]
fn a_standby_from_the_start_is_dispatched_kept_muted_and_takes_the_handoff_warm() {
    let mut r = triage_active(with_standby(1, StandbyFrom::Start));
    let meta = dispatch_meta(&r.log, "billing");
    assert_eq!(meta.len(), 1, "one billing standby dispatched when the call starts");
    assert_eq!(meta[0]["baton"]["purpose"], "standby");

    let out = standby_arrives(&mut r, BILLING, "AD_s1");
    assert!(muted(&out, BILLING), "a standby is never audible: {out:#?}");
    assert!(
        messages_to(&out, BILLING)
            .contains(&&BatonMessage::Deactivate { handoff: None, reason: DeactivateReason::Standby })
    );
    assert!(!sent(&out, BILLING, "activate"));
    // Kept, not dispatched again, however long the talk goes on.
    let out = r.advance(Duration::from_secs(60));
    assert!(!dispatched(&out, "billing") && !removed(&out, BILLING), "{out:#?}");

    let out = r.request(TRIAGE, "billing", Some(tid(1)));
    assert!(!dispatched(&out, "billing"), "the standby is the target: no dispatch");
    assert!(sent(&out, BILLING, "prepare"));
    let out = r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 6_000 });
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));
    r.quiet(TRIAGE);
    r.advance(ms(20));
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    r.advance(ms(30));
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"));
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let out = r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    let t = finished(&out).expect("timeline closed");
    assert!(t.warm);
    assert_eq!(t.ms(Phase::TargetJoined), Some(0));
    assert_eq!(t.ms(Phase::TargetActivated), Some(50));
    // billing holds the floor now: no billing standby is kept (a handoff to itself is refused).
    let out = r.advance(Duration::from_secs(30));
    assert!(!dispatched(&out, "billing"), "{out:#?}");
}

#[test]
fn a_standby_that_never_came_is_not_dispatched_again_while_a_handoff_runs() {
    let mut r = triage_active(with_standby(1, StandbyFrom::Start));
    r.ev(Event::DispatchFailed { ticket: ticket_for(&r.log, "billing"), error: "no worker".into() });
    // Dispatched again at once (a bounded number of times); it never comes either.
    assert_eq!(dispatch_meta(&r.log, "billing").len(), 2);
    r.advance(Duration::from_secs(9));
    assert_eq!(dispatch_meta(&r.log, "billing").len(), 3);
    r.advance(Duration::from_secs(9));
    assert_eq!(dispatch_meta(&r.log, "billing").len(), 3, "dispatches used up");
    // A handoff to billing goes cold.
    let out = r.request(TRIAGE, "billing", None);
    assert_eq!(dispatch_meta(&out, "billing").len(), 1);
    assert_eq!(dispatch_meta(&out, "billing")[0]["baton"]["purpose"], "handoff");
    let out = r.advance(Duration::from_secs(1));
    assert!(!dispatched(&out, "billing"), "the switch does not share the host with a standby's start");
}

#[test]
fn a_hint_brings_the_target_in_and_it_is_removed_when_no_handoff_comes() {
    let mut r = Room::with_triage_active(policy());
    let before = r.log.len();
    let out = hint(&mut r, TRIAGE, "billing");
    let meta = dispatch_meta(&out, "billing");
    assert_eq!(meta.len(), 1, "{out:#?}");
    assert_eq!(meta[0]["baton"]["purpose"], "standby");
    assert!(messages_to(&out, TRIAGE).is_empty(), "a hint is never answered");
    assert!(
        out.contains(&Command::Filler(FillerCommand::Arm)),
        "the filler track is armed (streams silence) while the hint is open"
    );
    assert!(!out.contains(&Command::Filler(FillerCommand::On)), "armed, not playing");

    r.advance(ms(1500));
    let out = standby_arrives(&mut r, BILLING, "AD_h1");
    assert!(muted(&out, BILLING));
    assert!(!sent(&out, BILLING, "activate") && !sent(&out, BILLING, "prepare"));
    // Another hint 1 s after the first extends it, without a second dispatch.
    r.advance(ms(500));
    let out = hint(&mut r, TRIAGE, "billing");
    assert!(!dispatched(&out, "billing"));
    // hint_timeout (20 s) past the second hint: removed.
    let out = r.advance(ms(19_900));
    assert!(!removed(&out, BILLING));
    let out = r.advance(ms(200));
    assert!(removed(&out, BILLING), "{out:#?}");
    assert!(out.contains(&Command::Filler(FillerCommand::Off)), "the hint is over: disarmed");
    assert!(!dispatched(&out, "billing"));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    // Never audible at any point.
    assert!(
        !r.log[before..]
            .iter()
            .any(|c| matches!(c, Command::UnmuteTrack { identity, .. } if identity == BILLING))
    );
    r.leave(BILLING);
    let out = r.advance(Duration::from_secs(10));
    assert!(!dispatched(&out, "billing"), "the hint is over: nothing replaces it");
}

#[test]
fn a_handoff_within_the_hint_takes_the_hinted_target_warm_and_keeps_it() {
    let mut r = Room::with_triage_active(policy());
    hint(&mut r, TRIAGE, "billing");
    r.advance(ms(1500));
    standby_arrives(&mut r, BILLING, "AD_h1");
    r.advance(ms(3000));
    let out = r.request(TRIAGE, "billing", None);
    assert!(!dispatched(&out, "billing"));
    assert_eq!(r.arb.handoff().and_then(|h| h.target_identity).as_deref(), Some(BILLING));
    r.quiet(TRIAGE);
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"));
    // The hint's timeout passes with billing holding the floor: nobody is removed.
    let out = r.advance(Duration::from_secs(30));
    assert!(!removed(&out, BILLING), "{out:#?}");
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
}

#[test]
fn hints_are_refused_unless_from_the_holder_for_another_configured_agent_and_not_too_often() {
    let mut r = Room::with_triage_active(policy());
    r.join(agent(SUPPORT, "support", true));
    r.hello(SUPPORT, "support");
    let out = hint(&mut r, SUPPORT, "billing");
    assert!(ignored(&out, "not the floor holder") && !dispatched(&out, "billing"));
    let out = hint(&mut r, TRIAGE, "ghost");
    assert!(ignored(&out, "not a configured agent"));
    let out = hint(&mut r, TRIAGE, "triage");
    assert!(ignored(&out, "own agent name"));
    let out = hint(&mut r, TRIAGE, "billing");
    assert!(dispatched(&out, "billing"));
    r.advance(ms(500));
    let out = hint(&mut r, TRIAGE, "support");
    assert!(ignored(&out, "rate limited"), "{out:#?}");
    r.advance(ms(500));
    let out = hint(&mut r, TRIAGE, "support");
    assert!(!ignored(&out, "rate limited"));
    // A participant that is not a configured agent: a security event, not a hint.
    let out = r.ctl(CALLER, AgentMessage::Hint { target: "billing".into() });
    assert!(out.iter().any(|c| matches!(c, Command::Security(_))), "{out:#?}");
    // During a handoff.
    r.request(TRIAGE, "billing", None);
    let out = hint(&mut r, TRIAGE, "support");
    assert!(ignored(&out, "handoff"));
}

#[test]
fn a_standby_that_leaves_is_replaced_a_bounded_number_of_times() {
    let mut r = triage_active(with_standby(1, StandbyFrom::Start));
    for n in 0..3 {
        let id = format!("billing-{n}");
        standby_arrives(&mut r, &id, &format!("AD_{n}"));
        r.advance(ms(2000));
        let out = r.leave(&id);
        if n < 2 {
            assert!(dispatched(&out, "billing"), "crash {n}: replaced at once: {out:#?}");
        } else {
            assert!(!dispatched(&out, "billing"), "the third crash: dispatches used up");
        }
    }
    // The handoff goes cold, and completes.
    let out = r.request(TRIAGE, "billing", Some(tid(1)));
    assert_eq!(dispatch_meta(&out, "billing")[0]["baton"]["purpose"], "handoff");
    assert_eq!(r.arb.floor_holder(), None);
}

#[test]
fn a_standby_whose_heartbeats_stop_is_removed_replaced_and_never_chosen() {
    let mut r = triage_active(with_standby(1, StandbyFrom::Start));
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_1".into() });
    let mut p = agent(BILLING, "billing", true);
    p.dispatch_id = Some("AD_1".into());
    r.join(p);
    r.ctl(BILLING, AgentMessage::Hello { agent_name: "billing".into(), role: None, heartbeat_ms: Some(250) });
    for seq in 0..4 {
        r.advance(ms(250));
        r.ctl(BILLING, AgentMessage::Heartbeat { seq });
    }
    // Frozen: crash_confirm_after (3 s) after its last heartbeat it is removed and replaced.
    let out = r.advance(ms(2900));
    assert!(!removed(&out, BILLING));
    let out = r.advance(ms(200));
    assert!(removed(&out, BILLING), "{out:#?}");
    assert!(dispatched(&out, "billing"));
    // Still listed (the removal takes a moment): a handoff now does not pick it.
    let out = r.request(TRIAGE, "billing", None);
    assert!(!sent(&out, BILLING, "prepare"), "{out:#?}");
}

#[test]
fn hinted_standbys_of_a_hint_policy_come_only_with_the_hint() {
    let mut r = triage_active(with_standby(2, StandbyFrom::Hint));
    assert!(!dispatched(&r.log, "billing"), "standby_from = hint: nothing at the start");
    let out = hint(&mut r, TRIAGE, "billing");
    assert_eq!(dispatch_meta(&out, "billing").len(), 2, "the hint brings the configured count");
    standby_arrives(&mut r, "billing-a", "AD_a");
    standby_arrives(&mut r, "billing-b", "AD_b");
    let out = r.advance(Duration::from_secs(21));
    assert!(removed(&out, "billing-a") && removed(&out, "billing-b"), "{out:#?}");
}

#[test]
fn a_handoff_before_the_hinted_target_joined_waits_for_it_instead_of_dispatching_another() {
    let mut r = Room::with_triage_active(policy());
    hint(&mut r, TRIAGE, "billing");
    r.advance(ms(800));
    let out = r.request(TRIAGE, "billing", None);
    assert!(!dispatched(&out, "billing"), "the hint's billing is on its way: {out:#?}");
    r.advance(ms(700));
    let out = standby_arrives(&mut r, BILLING, "AD_h1");
    assert!(sent(&out, BILLING, "prepare"), "{out:#?}");
    assert_eq!(r.arb.handoff().and_then(|h| h.target_identity).as_deref(), Some(BILLING));
}

#[test]
fn a_handoff_waiting_for_a_hinted_target_that_never_comes_dispatches_one() {
    let mut r = Room::with_triage_active(policy());
    hint(&mut r, TRIAGE, "billing");
    r.request(TRIAGE, "billing", None);
    // The standby dispatch gives up at join_timeout (8 s): the handoff dispatches its own.
    let out = r.advance(Duration::from_secs(8));
    let meta = dispatch_meta(&out, "billing");
    assert_eq!(meta.len(), 1, "{out:#?}");
    assert_eq!(meta[0]["baton"]["purpose"], "handoff");
}
