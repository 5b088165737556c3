//! Deadlines that know the bundle is moving (issue 11 item 7), in virtual time: a transfer that
//! keeps making progress outlives `bundle_timeout` / `ready_timeout`, one that stops fails
//! `stall_timeout` after its last progress, and none outlives `max_transfer_time`.

mod support;

use std::time::Duration;

use baton_floor::{Command, Event, FailReason, Outcome, Phase};
use support::*;

const MIB5: u64 = 5 * 1024 * 1024;

fn progress(r: &mut Room, peer: &str, bytes: u64) -> Vec<Command> {
    r.ev(Event::TransferProgress { peer: peer.into(), transfer_id: tid(1), bytes })
}

/// Reports progress from `peer` every 250 ms for `secs` seconds, evenly up to `total` bytes, and
/// returns everything the arbiter did meanwhile.
fn steady(r: &mut Room, peer: &str, secs: u64, total: u64) -> Vec<Command> {
    let steps = secs * 4;
    let mut out = Vec::new();
    for i in 1..=steps {
        out.extend(r.advance(ms(250)));
        out.extend(progress(r, peer, total * i / steps));
    }
    out
}

fn handed_back(cmds: &[Command]) -> bool {
    sent(cmds, TRIAGE, "handoff_failed")
}

/// Leg 1: a 5 MiB bundle reaches baton over 12 s, well past `bundle_timeout` (5 s): it keeps
/// moving, so the handoff waits for it and completes.
#[test]
fn a_slow_but_steady_upload_outlives_the_bundle_timeout() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = steady(&mut r, TRIAGE, 12, MIB5);
    assert!(!handed_back(&out), "{out:#?}");
    let out = r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: MIB5 });
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));
    r.advance(ms(300));
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"), "{out:#?}");
}

/// The same upload stops after 2 s: the handoff fails `stall_timeout` (3 s) after the last
/// progress, sooner than `bundle_timeout` alone would have.
#[test]
fn a_stalled_upload_fails_stall_timeout_after_its_last_progress() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.quiet(TRIAGE);
    steady(&mut r, TRIAGE, 1, MIB5 / 12);
    let out = r.advance(ms(2_999));
    assert!(!handed_back(&out), "{out:#?}");
    let out = r.advance(ms(1));
    assert!(handed_back(&out), "failed at 1 s + stall_timeout: {out:#?}");
    assert_eq!(r.ms(), 4_000);
    r.advance(Duration::from_secs(2));
    let t = r.log.iter().find_map(|c| match c {
        Command::HandoffFinished(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(t.and_then(|t| t.failure), Some(FailReason::BundleTimeout));
}

/// When does triage get the call back, in ms since the request, if within `until`?
fn handback_at(r: &mut Room, until: u64) -> Option<u64> {
    while r.ms() < until {
        if handed_back(&r.advance(ms(50))) {
            return Some(r.ms());
        }
    }
    None
}

/// A report that is not larger than the last one is no progress: the stall deadline of the
/// first report (at 0 ms) holds.
#[test]
fn a_repeated_report_is_not_progress() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.quiet(TRIAGE);
    progress(&mut r, TRIAGE, 1000);
    let mut at = None;
    for _ in 0..20 {
        if handed_back(&r.advance(ms(250))) {
            at = Some(r.ms());
            break;
        }
        progress(&mut r, TRIAGE, 1000);
    }
    assert_eq!(at, Some(3_000), "stall_timeout after the only real progress");
}

/// Progress of another transfer of the source, or from someone else, moves nothing: the
/// upload's deadline stays `bundle_timeout` (5 s) after the request.
#[test]
fn progress_of_another_transfer_moves_no_deadline() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.quiet(TRIAGE);
    for i in 1..=19 {
        r.advance(ms(250));
        r.ev(Event::TransferProgress { peer: TRIAGE.into(), transfer_id: tid(0xff), bytes: i * 1000 });
        progress(&mut r, BILLING, i * 1000);
    }
    assert_eq!(handback_at(&mut r, 10_000), Some(5_000));
}

/// However steady, an upload gets at most `max_transfer_time` (30 s) from the request.
#[test]
fn no_upload_outlives_max_transfer_time() {
    let mut p = policy();
    p.max_filler = Duration::from_secs(60);
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", Some(tid(1)));
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = steady(&mut r, TRIAGE, 29, MIB5);
    assert!(!handed_back(&out));
    let mut at = None;
    for _ in 0..8 {
        if handed_back(&r.advance(ms(250))) {
            at = Some(r.ms());
            break;
        }
        let more = MIB5 + r.ms();
        progress(&mut r, TRIAGE, more);
    }
    assert_eq!(at, Some(30_000), "max_transfer_time from the request");
}

/// Leg 2: baton delivers 5 MiB to billing over 12 s, past `ready_timeout` (8 s from its join):
/// billing is not failed while the delivery moves, and gets the floor when it says ready.
#[test]
fn a_slow_but_steady_delivery_outlives_the_ready_timeout() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: MIB5 });
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));
    let out = steady(&mut r, BILLING, 12, MIB5);
    assert!(!handed_back(&out) && !sent(&out, BILLING, "handoff_cancelled"), "{out:#?}");
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    // Loading 5 MiB takes the target a moment; it has at least stall_timeout for it.
    r.advance(ms(2_500));
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"), "{out:#?}");
    let out = r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    let t = finished(&out).expect("completed");
    assert_eq!(t.outcome, Some(Outcome::Completed));
    assert!(t.has(Phase::BundleDelivered));
}

/// A delivery that stops moving fails `stall_timeout` after its last progress with
/// `delivery_failed`, and is cancelled; the next agent is tried.
#[test]
fn a_stalled_delivery_fails_fast() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: MIB5 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    steady(&mut r, BILLING, 1, MIB5 / 12);
    let out = r.advance(ms(2_999));
    assert!(!sent(&out, BILLING, "handoff_cancelled"), "{out:#?}");
    let out = r.advance(ms(1));
    assert!(sent(&out, BILLING, "handoff_cancelled"), "{out:#?}");
    assert!(out.contains(&Command::CancelTransfer { transfer_id: tid(1), to: BILLING.into() }));
    assert!(dispatched(&out, "support"), "the alternate: {out:#?}");
    let failed = r.log.iter().find_map(|c| match c {
        Command::Timeline(ev) if ev.mark.phase == Phase::TargetFailed => ev.mark.detail.clone(),
        _ => None,
    });
    assert_eq!(failed.as_deref(), Some(FailReason::DeliveryFailed.as_str()));
}
