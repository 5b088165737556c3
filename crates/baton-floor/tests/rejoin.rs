//! A handoff's source or target that drops and joins again within `rejoin_grace` keeps its role
//! (issue 11 item 6), in virtual time.

mod support;

use std::time::Duration;

use baton_floor::{BatonMessage, Command, DeactivateReason, Event, FailReason, Outcome, Phase};
use support::*;

fn cancels(cmds: &[Command]) -> bool {
    cmds.iter().any(|c| matches!(c, Command::CancelTransfer { .. }))
}

/// The case: billing gets `prepare`, its connection drops, it joins again with the same
/// identity 150 ms later and says `hello` every second. Its hellos are answered with `prepare`,
/// the delivery under way is not cancelled (the relay resumes it), and billing gets the floor.
#[test]
fn a_target_that_rejoins_within_the_grace_is_prepared_again_and_gets_the_floor() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 5_000_000 });
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(messages_to(&out, BILLING).contains(&&refund_prepare()));
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));

    r.advance(ms(400));
    let out = r.leave(BILLING);
    assert!(!cancels(&out), "the delivery waits for the rejoin: {out:#?}");
    assert!(!sent(&out, TRIAGE, "handoff_failed"));
    assert!(r.arb.filler_on(), "the caller keeps hearing filler");

    r.advance(ms(150));
    let mut back = agent(BILLING, "billing", false);
    back.dispatch_id = Some("AD_1".into());
    let out = r.join(back);
    assert!(muted(&out, BILLING), "not the holder: its new track is muted");
    assert!(!sent(&out, BILLING, "prepare"), "nothing before its hello");
    let out = r.hello(BILLING, "billing");
    assert_eq!(messages_to(&out, BILLING), vec![&refund_prepare()], "answered with prepare again");
    assert!(!out.iter().any(|c| matches!(c, Command::DeliverBundle { .. })), "the delivery resumes");
    r.advance(ms(1000));
    let out = r.hello(BILLING, "billing");
    assert_eq!(messages_to(&out, BILLING), vec![&refund_prepare()], "a repeated hello too");

    // The grace has long passed: nothing fails on its account now.
    let out = r.advance(Duration::from_secs(3));
    assert!(!cancels(&out) && !sent(&out, TRIAGE, "handoff_failed"), "{out:#?}");
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"), "{out:#?}");
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let out = r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    let t = finished(&out).expect("closed once billing is heard");
    assert_eq!(t.outcome, Some(Outcome::Completed));
    let rejoined = t.phases.iter().find(|m| m.phase == Phase::Rejoined).expect("rejoined mark");
    assert_eq!(rejoined.detail.as_deref(), Some("target"));
    assert!(t.has(Phase::TargetLeft));
    assert!(!t.has(Phase::TargetFailed));
}

/// A target that sent `ready` and then dropped must say it again after the rejoin: its new
/// connection is switched in only once it is ready again.
#[test]
fn a_rejoined_target_is_activated_only_after_a_new_ready() {
    let (mut r, _) = cold_request(None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.leave(BILLING);
    // `ready` from the old connection, overtaken by the leave: ignored.
    let out = r.ready(BILLING, "h-1");
    assert!(!sent(&out, BILLING, "activate"));
    r.advance(ms(150));
    r.join(agent(BILLING, "billing", false));
    let out = r.hello(BILLING, "billing");
    assert!(sent(&out, BILLING, "prepare"));
    assert!(!sent(&out, BILLING, "activate"), "not ready yet on this connection");
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"));
}

/// The job restarted under a new identity (same dispatch): it is the target, and the bundle is
/// delivered again to the new identity after the old delivery is cancelled.
#[test]
fn a_target_from_the_same_dispatch_under_a_new_identity_gets_the_bundle_again() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 100 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.leave(BILLING);
    r.advance(ms(500));
    let mut other = agent("agent-billing-2", "billing", false);
    other.dispatch_id = Some("AD_9".into());
    r.join(other);
    let out = r.hello("agent-billing-2", "billing");
    assert!(!sent(&out, "agent-billing-2", "prepare"), "another dispatch is not this target");
    let mut again = agent("agent-billing-3", "billing", false);
    again.dispatch_id = Some("AD_1".into());
    let out = r.join(again);
    assert!(out.contains(&Command::CancelTransfer { transfer_id: tid(1), to: BILLING.into() }));
    let out = r.hello("agent-billing-3", "billing");
    assert!(sent(&out, "agent-billing-3", "prepare"));
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: "agent-billing-3".into() }));
    r.ev(Event::BundleDelivered { to: "agent-billing-3".into(), transfer_id: tid(1) });
    let out = r.ready("agent-billing-3", "h-1");
    assert!(sent(&out, "agent-billing-3", "activate"));
}

/// The target does not come back: after `rejoin_grace` the delivery is cancelled and the next
/// agent is tried (here support, billing's alternate), as a leave did at once before.
#[test]
fn a_target_that_does_not_come_back_fails_when_the_grace_runs_out() {
    // No replacement of the same name (recovery.rs has that case): the alternate comes next.
    let mut p = policy();
    p.recovery_attempts = 0;
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 100 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.leave(BILLING);
    let out = r.advance(ms(2_999));
    assert!(!cancels(&out) && !dispatched(&out, "support"), "{out:#?}");
    let out = r.advance(ms(1));
    assert!(out.contains(&Command::CancelTransfer { transfer_id: tid(1), to: BILLING.into() }));
    assert!(dispatched(&out, "support"), "{out:#?}");
    // Too late: billing is no longer the target, and gets only a standby answer.
    r.join(agent(BILLING, "billing", false));
    let out = r.hello(BILLING, "billing");
    assert_eq!(
        messages_to(&out, BILLING),
        vec![&BatonMessage::Deactivate { handoff: None, reason: DeactivateReason::Standby }]
    );
    let t = r.arb.handoff().expect("still under way with the alternate");
    assert_eq!(t.target_name, "support");
    let failed = r.log.iter().find_map(|c| match c {
        Command::Timeline(ev) if ev.mark.phase == Phase::TargetFailed => ev.mark.detail.clone(),
        _ => None,
    });
    assert_eq!(failed.as_deref(), Some(FailReason::TargetLeft.as_str()));
}

/// The source drops while its bundle is still uploading and rejoins: the bundle is not given up
/// (the upload resumes), its hello is answered with `deactivate` (handoff), and a failure later
/// hands the call back to it.
#[test]
fn a_source_that_rejoins_within_the_grace_keeps_its_part() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", Some(tid(1)));
    let out = r.leave(TRIAGE);
    assert!(filler_started(&out), "a source that left is quiet");
    r.advance(ms(150));
    let out = r.join(agent(TRIAGE, "triage", false));
    assert!(muted(&out, TRIAGE), "quiet already: its new track is muted");
    let out = r.hello(TRIAGE, "triage");
    assert_eq!(
        messages_to(&out, TRIAGE),
        vec![&BatonMessage::Deactivate { handoff: Some("h-1".into()), reason: DeactivateReason::Handoff }]
    );
    // Past the grace: the bundle was not declared lost, and it arrives.
    let out = r.advance(Duration::from_secs(3));
    assert!(
        !r.log.iter().any(|c| matches!(c, Command::Timeline(ev) if ev.mark.phase == Phase::BundleLost)),
        "{out:#?}"
    );
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 100 });
    // Billing never comes: the call goes back to the source, which is here again.
    let out = r.advance(Duration::from_secs(6));
    assert!(sent(&out, TRIAGE, "handoff_failed"), "{out:#?}");
    assert!(sent(&out, TRIAGE, "activate"));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

/// A source that does not come back: its unfinished bundle is given up when the grace ends, and
/// the target takes over without it.
#[test]
fn a_source_that_does_not_come_back_loses_its_unfinished_bundle_when_the_grace_ends() {
    let (mut r, _) = cold_request(Some(tid(1)));
    billing_arrives(&mut r, "AD_1");
    r.leave(TRIAGE);
    let out = r.advance(ms(2_999));
    assert!(!sent(&out, BILLING, "bundle_unavailable"));
    let out = r.advance(ms(1));
    assert!(sent(&out, BILLING, "bundle_unavailable"), "{out:#?}");
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"));
}

/// With no grace, a leave fails the target at once, as before.
#[test]
fn zero_grace_fails_at_once() {
    let mut p = policy_without_alternates();
    p.rejoin_grace = Duration::ZERO;
    p.recovery_attempts = 0;
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = r.leave(BILLING);
    assert!(sent(&out, TRIAGE, "handoff_failed"), "{out:#?}");
}
