//! Recovery in virtual time (docs/protocol.md, "Checkpoints, heartbeats and recovery"): a floor
//! holder whose heartbeats stop is suspected (filler, mute, a job check), confirmed crashed by
//! the first certain signal, removed and replaced from its last checkpoint; a blip clears; a
//! handoff target that crashes while being prepared is replaced with the same bundle.

mod support;

use baton_floor::{
    ActivateCause, AgentMessage, Alert, BatonMessage, Command, Event, Kind, Outcome, Phase, Policy,
};
use support::*;

const TRIAGE2: &str = "agent-triage-2";
const TRIAGE3: &str = "agent-triage-3";

fn heartbeat_hello(r: &mut Room, who: &str, name: &str) -> Vec<Command> {
    r.ctl(who, AgentMessage::Hello { agent_name: name.into(), role: None, heartbeat_ms: Some(250) })
}

/// Triage holds the floor and sends heartbeats every 250 ms for one second.
fn triage_beating(policy: Policy) -> Room {
    let mut r = Room::with_triage_active(policy);
    heartbeat_hello(&mut r, TRIAGE, "triage");
    for seq in 1..=4 {
        r.advance(ms(250));
        r.ctl(TRIAGE, AgentMessage::Heartbeat { seq });
    }
    r
}

fn beat(r: &mut Room, who: &str, every: u64, times: u64) -> Vec<Command> {
    let mut out = Vec::new();
    for seq in 0..times {
        out.extend(r.advance(ms(every)));
        out.extend(r.ctl(who, AgentMessage::Heartbeat { seq }));
    }
    out
}

fn check_job(cmds: &[Command], who: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::CheckJob { identity } if identity == who))
}

fn removed(cmds: &[Command], who: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::RemoveParticipant { identity } if identity == who))
}

fn crashed(cmds: &[Command]) -> Option<(String, String, String)> {
    cmds.iter().find_map(|c| match c {
        Command::AgentCrashed { identity, agent, recovery, .. } => {
            Some((identity.clone(), agent.clone(), recovery.clone()))
        }
        _ => None,
    })
}

fn prepare_of<'a>(cmds: &'a [Command], to: &str) -> Option<&'a BatonMessage> {
    messages_to(cmds, to).into_iter().find(|m| m.type_name() == "prepare")
}

/// A dispatched triage replacement joins under `identity` and says hello with heartbeats.
fn replacement_arrives(r: &mut Room, identity: &str, dispatch_id: &str) -> Vec<Command> {
    let ticket = ticket_for(&r.log, "triage");
    let mut out = r.ev(Event::DispatchCreated { ticket, dispatch_id: dispatch_id.into() });
    let mut p = agent(identity, "triage", false);
    p.dispatch_id = Some(dispatch_id.into());
    out.extend(r.join(p));
    out.extend(heartbeat_hello(r, identity, "triage"));
    out
}

#[test]
fn a_holder_whose_heartbeat_stops_is_replaced_from_its_checkpoint() {
    let mut r = triage_beating(policy());
    let last = r.now;
    // 799 ms of silence: nothing yet.
    let out = r.advance(ms(799));
    assert!(!filler_started(&out), "{out:?}");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    // 800 ms: suspected. The filler starts at once, triage is muted, its job is checked; no
    // replacement before the crash is certain.
    let out = r.advance(ms(1));
    assert!(filler_started(&out), "{out:?}");
    let filler_at = position(&out, |c| matches!(c, Command::Filler(baton_floor::FillerCommand::On)));
    let mute_at = position(&out, |c| matches!(c, Command::MuteTrack { identity, .. } if identity == TRIAGE));
    assert!(filler_at < mute_at, "filler before the mute's server round trip: {out:?}");
    assert!(check_job(&out, TRIAGE), "{out:?}");
    assert!(!dispatched(&out, "triage") && crashed(&out).is_none(), "{out:?}");
    let status = r.arb.handoff().expect("a recovery is under way");
    assert_eq!((status.kind, status.confirmed, status.source.as_str()), (Kind::Recovery, false, TRIAGE));
    assert_eq!(r.arb.floor_holder(), None);

    // The server says the job failed: confirmed, removed, replaced.
    r.advance(ms(20));
    let out = r.ev(Event::JobEnded { identity: TRIAGE.into(), status: "JS_FAILED".into() });
    let (identity, name, recovery) = crashed(&out).expect("declared crashed");
    assert_eq!((identity.as_str(), name.as_str(), recovery.as_str()), (TRIAGE, "triage", "r-1"));
    assert!(removed(&out, TRIAGE), "{out:?}");
    assert!(dispatched(&out, "triage"), "{out:?}");
    let meta = out.iter().find_map(|c| match c {
        Command::CreateDispatch { metadata, .. } => Some(metadata.clone()),
        _ => None,
    });
    let meta: serde_json::Value = serde_json::from_str(&meta.expect("dispatch")).expect("json");
    assert_eq!(meta["baton"]["purpose"], "recovery");
    assert_eq!(meta["baton"]["handoff"], "r-1");
    // baton built the bundle from the checkpoint.
    r.ev(Event::RecoveryBundle { recovery: "r-1".into(), bundle: Some((tid(77), 4_096)) });

    // A heartbeat from the dead one (a frozen process waking) changes nothing now.
    let out = r.ctl(TRIAGE, AgentMessage::Heartbeat { seq: 99 });
    assert!(!unmuted(&out, TRIAGE) && r.arb.handoff().is_some(), "{out:?}");

    r.advance(ms(1500));
    let out = replacement_arrives(&mut r, TRIAGE2, "AD_2");
    match prepare_of(&out, TRIAGE2) {
        Some(BatonMessage::Prepare { handoff, source, reason, transfer, bundle, cause, greeting }) => {
            assert_eq!((handoff.as_str(), source.as_str()), ("r-1", "triage"));
            assert_eq!(reason, "recovery after job_ended:JS_FAILED");
            assert_eq!((*transfer, *bundle), (Some(tid(77)), true));
            assert_eq!((*cause, *greeting), (Some(ActivateCause::Recovery), Some(true)));
        }
        other => panic!("no prepare for the replacement: {other:?} in {out:?}"),
    }
    assert!(out.iter().any(
        |c| matches!(c, Command::DeliverBundle { transfer_id, to } if *transfer_id == tid(77) && to == TRIAGE2)
    ));
    r.ev(Event::BundleDelivered { to: TRIAGE2.into(), transfer_id: tid(77) });
    let out = r.ready(TRIAGE2, "r-1");
    assert!(messages_to(&out, TRIAGE2).iter().any(|m| matches!(
        m,
        BatonMessage::Activate { cause: ActivateCause::Recovery, handoff: Some(h), .. } if h == "r-1"
    )));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE2));
    assert!(!filler_stopped(&out), "the filler holds until the replacement is heard");
    r.advance(ms(200));
    let out = r.ev(Event::SpeakingChanged { identity: TRIAGE2.into(), speaking: true });
    assert!(filler_stopped(&out));
    let t = finished(&r.log).expect("the recovery's timeline");
    assert_eq!((t.kind, t.outcome, t.handoff.as_str()), (Kind::Recovery, Some(Outcome::Completed), "r-1"));
    assert_eq!(t.source, "triage");
    assert_eq!(t.target, "triage");
    assert_eq!(t.bundle_bytes, Some(4_096));
    // Times count from the last heartbeat: suspected at the suspicion threshold.
    assert_eq!(t.ms(Phase::Suspected), Some(800));
    assert!(t.ms(Phase::Suspected) <= t.ms(Phase::FillerOn));
    let order = [
        Phase::Suspected,
        Phase::FillerOn,
        Phase::Confirmed,
        Phase::Removed,
        Phase::TargetDispatched,
        Phase::BundleReceived,
        Phase::TargetJoined,
        Phase::BundleDelivered,
        Phase::TargetReady,
        Phase::TargetActivated,
        Phase::FillerOff,
        Phase::TargetAudible,
        Phase::Completed,
    ];
    let phases = t.phase_list();
    let mut at = 0;
    for p in order {
        let i = phases[at..].iter().position(|q| *q == p).unwrap_or_else(|| panic!("{p:?} in {phases:?}"));
        at += i + 1;
    }
    let _ = last;
}

#[test]
fn a_blip_clears_the_suspicion_and_the_holder_keeps_the_floor() {
    let mut r = triage_beating(policy());
    let out = r.advance(ms(900));
    assert!(filler_started(&out) && muted(&out, TRIAGE));
    // The heartbeat resumes before the confirmation (and the job is running, so no answer).
    let out = r.ctl(TRIAGE, AgentMessage::Heartbeat { seq: 5 });
    assert!(unmuted(&out, TRIAGE), "{out:?}");
    assert!(filler_stopped(&out), "{out:?}");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    assert!(r.arb.handoff().is_none());
    let t = finished(&out).expect("a timeline for the suspicion");
    assert_eq!((t.kind, t.outcome), (Kind::Recovery, Some(Outcome::Cleared)));
    assert!(t.has(Phase::SuspectCleared) && !t.has(Phase::Confirmed), "{:?}", t.phase_list());
    // No replacement, nobody removed, and the activation was not repeated (the agent never
    // lost the floor as far as it knows).
    assert!(!dispatched(&r.log, "triage") && !removed(&r.log, TRIAGE));
    assert!(!sent(&out, TRIAGE, "activate"));
    // Healthy again: heartbeats keep it, and a later gap is suspected again.
    let out = beat(&mut r, TRIAGE, 250, 8);
    assert!(!filler_started(&out), "{out:?}");
    let out = r.advance(ms(800));
    assert!(filler_started(&out) && check_job(&out, TRIAGE), "{out:?}");
    assert_eq!(r.arb.handoff().map(|h| h.id), Some("r-2".into()));
}

#[test]
fn silence_to_the_confirmation_limit_is_a_crash_even_without_a_job_status() {
    let mut r = triage_beating(policy());
    r.advance(ms(800));
    // The job check found it running (or found no job): no event. 3 s after the last heartbeat
    // the crash is confirmed anyway (a hung event loop, a network cut).
    let out = r.advance(ms(2199));
    assert!(crashed(&out).is_none(), "{out:?}");
    let out = r.advance(ms(1));
    assert!(crashed(&out).is_some() && removed(&out, TRIAGE) && dispatched(&out, "triage"), "{out:?}");
    let t = r.arb.handoff().expect("recovery");
    assert!(t.confirmed);
}

#[test]
fn a_holder_that_leaves_without_release_is_replaced_at_once() {
    // No heartbeats announced: the participant leaving is the signal.
    let mut r = Room::with_triage_active(policy());
    let out = r.leave(TRIAGE);
    assert!(filler_started(&out), "{out:?}");
    assert!(crashed(&out).is_some() && dispatched(&out, "triage"), "{out:?}");
    assert!(!removed(&out, TRIAGE), "it is gone already: {out:?}");
    assert!(!out.iter().any(|c| matches!(c, Command::Alert(Alert::FloorVacant { .. }))), "{out:?}");
}

#[test]
fn a_standby_of_the_same_name_takes_over_without_a_dispatch() {
    let mut r = triage_beating(policy());
    r.join(agent(TRIAGE2, "triage", true));
    heartbeat_hello(&mut r, TRIAGE2, "triage");
    // The standby keeps beating; the holder stops.
    let mut out = Vec::new();
    for seq in 0..4 {
        out.extend(r.advance(ms(250)));
        out.extend(r.ctl(TRIAGE2, AgentMessage::Heartbeat { seq }));
    }
    assert!(filler_started(&out));
    let out = r.ev(Event::JobEnded { identity: TRIAGE.into(), status: "JS_FAILED".into() });
    assert!(!dispatched(&out, "triage"), "{out:?}");
    assert!(prepare_of(&out, TRIAGE2).is_some(), "{out:?}");
    r.ev(Event::RecoveryBundle { recovery: "r-1".into(), bundle: Some((tid(5), 10)) });
    r.ev(Event::BundleDelivered { to: TRIAGE2.into(), transfer_id: tid(5) });
    let out = r.ready(TRIAGE2, "r-1");
    assert!(sent(&out, TRIAGE2, "activate") && unmuted(&out, TRIAGE2), "{out:?}");
}

#[test]
fn without_a_checkpoint_the_replacement_is_told_there_is_no_bundle() {
    let mut r = triage_beating(policy());
    r.advance(ms(800));
    r.ev(Event::JobEnded { identity: TRIAGE.into(), status: "JS_FAILED".into() });
    r.ev(Event::RecoveryBundle { recovery: "r-1".into(), bundle: None });
    let out = replacement_arrives(&mut r, TRIAGE2, "AD_2");
    assert!(
        matches!(prepare_of(&out, TRIAGE2), Some(BatonMessage::Prepare { bundle: false, .. })),
        "{out:?}"
    );
    let out = r.ready(TRIAGE2, "r-1");
    assert!(sent(&out, TRIAGE2, "activate"), "{out:?}");
}

#[test]
fn when_no_replacement_comes_the_filler_fades_and_a_late_agent_still_gets_the_call() {
    let mut p = policy();
    p.join_timeout = ms(2000);
    let mut r = triage_beating(p);
    r.advance(ms(800));
    r.ev(Event::JobEnded { identity: TRIAGE.into(), status: "JS_FAILED".into() });
    r.ev(Event::RecoveryBundle { recovery: "r-1".into(), bundle: Some((tid(9), 100)) });
    r.leave(TRIAGE);
    // Two attempts (recovery_attempts = 2), each never joining.
    let out = r.advance(ms(2000));
    assert_eq!(out.iter().filter(|c| matches!(c, Command::CreateDispatch { .. })).count(), 1, "{out:?}");
    let out = r.advance(ms(2000));
    let failed = out.iter().find_map(|c| match c {
        Command::Alert(Alert::RecoveryFailed { agent, .. }) => Some(agent.clone()),
        _ => None,
    });
    assert_eq!(failed.as_deref(), Some("triage"), "{out:?}");
    assert!(!filler_stopped(&out), "the filler plays on to its hold limit first: {out:?}");
    let out = r.advance(ms(1200));
    assert!(filler_stopped(&out), "{out:?}");
    let t = finished(&r.log).expect("timeline");
    assert_eq!((t.kind, t.outcome), (Kind::Recovery, Some(Outcome::Failed)));
    // A triage that joins later (a worker back, LiveKit Cloud's restart) gets the call and the
    // last checkpoint.
    r.advance(ms(5000));
    let mut out = r.join(agent(TRIAGE3, "triage", true));
    out.extend(heartbeat_hello(&mut r, TRIAGE3, "triage"));
    assert!(crashed(&out).is_some(), "{out:?}");
    r.ev(Event::RecoveryBundle { recovery: "r-2".into(), bundle: Some((tid(10), 100)) });
    let out = r.log.clone();
    assert!(prepare_of(&out, TRIAGE3).is_some(), "{out:?}");
    r.ev(Event::BundleDelivered { to: TRIAGE3.into(), transfer_id: tid(10) });
    let out = r.ready(TRIAGE3, "r-2");
    assert!(sent(&out, TRIAGE3, "activate"), "{out:?}");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE3));
}

/// The billing dispatched (in `out`) to replace a crashed target joins, gets the handoff's
/// same bundle `bundle`, and takes the call.
fn replacement_billing_takes_the_call(r: &mut Room, out: &[Command], bundle: TransferId) {
    let billing2 = "agent-billing-2";
    let ticket = ticket_for(out, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_b2".into() });
    r.join(agent(billing2, "billing", false));
    let out = heartbeat_hello(r, billing2, "billing");
    assert!(
        out.iter().any(|c| matches!(c, Command::DeliverBundle { transfer_id, to } if *transfer_id == bundle && to == billing2)),
        "{out:?}"
    );
    r.ev(Event::BundleDelivered { to: billing2.into(), transfer_id: bundle });
    let out = r.ready(billing2, "h-1");
    assert!(sent(&out, billing2, "activate"), "{out:?}");
}

#[test]
fn a_handoff_target_that_crashes_while_prepared_is_replaced_with_the_same_bundle() {
    let (mut r, _) = cold_request(Some(tid(3)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(3), bytes: 2_000 });
    r.quiet(TRIAGE);
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_b".into() });
    r.join(agent(BILLING, "billing", false));
    let out = heartbeat_hello(&mut r, BILLING, "billing");
    assert!(out.iter().any(|c| matches!(c, Command::DeliverBundle { to, .. } if to == BILLING)));
    // Billing's process dies mid-delivery: no heartbeat for crash_confirm_after.
    let out = r.advance(ms(3000));
    assert!(removed(&out, BILLING), "{out:?}");
    assert!(out.iter().any(|c| matches!(c, Command::CancelTransfer { to, .. } if to == BILLING)), "{out:?}");
    assert!(dispatched(&out, "billing"), "another billing, not the alternate yet: {out:?}");
    assert!(!dispatched(&out, "support"), "{out:?}");
    replacement_billing_takes_the_call(&mut r, &out, tid(3));
    // The crashed one is never given a role, whatever it says.
    let out = heartbeat_hello(&mut r, BILLING, "billing");
    assert!(!sent(&out, BILLING, "prepare") && !sent(&out, BILLING, "activate"), "{out:?}");
}

#[test]
fn a_handoff_target_that_leaves_and_does_not_come_back_is_replaced_with_the_same_bundle() {
    // Its worker removed the dead job's participant (lk_baton.remove_crashed_jobs): a leave,
    // which the rejoin grace waits out as it would a dropped connection.
    let (mut r, _) = cold_request(Some(tid(4)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(4), bytes: 900 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_b");
    r.leave(BILLING);
    let out = r.advance(ms(2_999));
    assert!(!dispatched(&out, "billing"), "{out:?}");
    let out = r.advance(ms(1));
    assert!(dispatched(&out, "billing") && !dispatched(&out, "support"), "{out:?}");
    replacement_billing_takes_the_call(&mut r, &out, tid(4));
}

#[test]
fn a_standby_that_fails_as_replacement_is_not_chosen_again() {
    let mut p = policy();
    p.ready_timeout = ms(2_000);
    let mut r = triage_beating(p);
    r.join(agent(TRIAGE2, "triage", true));
    heartbeat_hello(&mut r, TRIAGE2, "triage");
    r.advance(ms(100));
    r.leave(TRIAGE);
    r.ev(Event::RecoveryBundle { recovery: "r-1".into(), bundle: Some((tid(6), 10)) });
    assert_eq!(r.arb.handoff().and_then(|h| h.target_identity), Some(TRIAGE2.into()));
    // The standby keeps beating but never says ready: after ready_timeout a new triage is
    // dispatched rather than the same standby prepared again.
    let mut out = Vec::new();
    for seq in 0..9 {
        out.extend(r.advance(ms(250)));
        out.extend(r.ctl(TRIAGE2, AgentMessage::Heartbeat { seq }));
    }
    assert!(dispatched(&out, "triage"), "{out:?}");
    assert_ne!(r.arb.handoff().and_then(|h| h.target_identity), Some(TRIAGE2.into()));
}
