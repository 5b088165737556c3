//! A handoff source that plays a filler of its own (`filler` in its request): baton tells it
//! `filler_stop` exactly when baton's own filler stops, with the same fade, and never otherwise.

mod support;

use std::time::Duration;

use baton_floor::{BatonMessage, Command, Event, FillerCommand};
use support::*;

/// Triage, holding the floor, asks for billing having finished its sentence, with or without a
/// filler of its own.
fn quiet_request(filler: bool) -> (Room, Vec<Command>) {
    let mut r = Room::with_triage_active(policy_without_alternates());
    let out = r.ctl(TRIAGE, handoff_request("billing", "caller wants a refund", true, filler));
    (r, out)
}

fn filler_stops(cmds: &[Command], to: &str) -> Vec<BatonMessage> {
    messages_to(cmds, to)
        .into_iter()
        .filter(|m| matches!(m, BatonMessage::FillerStop { .. }))
        .cloned()
        .collect()
}

/// Billing joins, is ready and is heard: the handoff completes.
fn billing_takes_over(r: &mut Room) -> Vec<Command> {
    let mut out = billing_arrives(r, "AD_1");
    out.extend(r.advance(ms(300)));
    out.extend(r.ready(BILLING, "h-1"));
    out.extend(r.advance(ms(100)));
    out.extend(r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true }));
    out
}

#[test]
fn the_source_filler_fades_with_batons_own_once_the_target_is_heard() {
    let (mut r, out) = quiet_request(true);
    assert!(filler_started(&out), "baton plays its own filler all the same");
    assert!(filler_stops(&out, TRIAGE).is_empty(), "the source's filler covers the handoff: {out:#?}");
    let out = billing_takes_over(&mut r);
    let fade = out.iter().position(|c| matches!(c, Command::Filler(FillerCommand::FadeOut(_))));
    assert!(fade.is_some(), "baton's filler fades under billing's first words: {out:#?}");
    assert_eq!(
        filler_stops(&out, TRIAGE),
        vec![BatonMessage::FillerStop { handoff: "h-1".into(), fade_ms: 1000 }],
        "the same moment, the same fade (filler_tail)"
    );
    assert!(filler_stops(&r.advance(Duration::from_secs(30)), TRIAGE).is_empty(), "told once");
}

#[test]
fn a_source_without_a_filler_of_its_own_is_never_told_to_stop_one() {
    let (mut r, _) = quiet_request(false);
    billing_takes_over(&mut r);
    r.advance(Duration::from_secs(30));
    assert!(
        !r.log.iter().any(|c| matches!(c, Command::Send { message: BatonMessage::FillerStop { .. }, .. }))
    );
}

/// A failed handoff gives the floor back to the source: its filler, like baton's, holds until
/// the source is heard again.
#[test]
fn a_failed_handoff_stops_the_source_filler_when_the_source_is_heard_again() {
    let (mut r, _) = quiet_request(true);
    let ticket = ticket_for(&r.log, "billing");
    let out = r.ev(Event::DispatchFailed { ticket, error: "twirp 503".into() });
    assert!(sent(&out, TRIAGE, "activate"), "{out:#?}");
    assert!(filler_stops(&out, TRIAGE).is_empty(), "not before triage speaks again");
    let out = r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: true });
    assert_eq!(filler_stops(&out, TRIAGE).len(), 1, "{out:#?}");
}

/// A source that left cannot be told anything; baton's own filler carries on.
#[test]
fn a_source_that_left_is_not_sent_filler_stop() {
    let (mut r, _) = quiet_request(true);
    r.leave(TRIAGE);
    let out = billing_takes_over(&mut r);
    assert!(out.iter().any(|c| matches!(c, Command::Filler(FillerCommand::FadeOut(_)))));
    assert!(filler_stops(&r.log, TRIAGE).is_empty());
}

/// The caller hangs up: everything stops at once, the source's filler too.
#[test]
fn the_caller_leaving_stops_the_source_filler_at_once() {
    let (mut r, _) = quiet_request(true);
    let out = r.leave(CALLER);
    assert_eq!(
        filler_stops(&out, TRIAGE),
        vec![BatonMessage::FillerStop { handoff: "h-1".into(), fade_ms: 0 }]
    );
}

/// After a failed handoff the source, heard again, asks again while its filler still plays:
/// the filler is the new handoff's now, and no stop for the old one may end it.
#[test]
fn a_new_request_from_the_same_source_takes_its_filler_over() {
    let (mut r, _) = quiet_request(true);
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchFailed { ticket, error: "twirp 503".into() });
    let out = r.ctl(TRIAGE, handoff_request("billing", "again", true, true));
    assert!(sent(&out, TRIAGE, "handoff_accepted"), "{out:#?}");
    assert!(filler_stops(&r.log, TRIAGE).is_empty(), "h-1's stop would end h-2's filler: {:#?}", r.log);
    let ticket = ticket_for(&out, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_2".into() });
    let mut billing = agent(BILLING, "billing", false);
    billing.dispatch_id = Some("AD_2".into());
    r.join(billing);
    r.hello(BILLING, "billing");
    r.advance(ms(300));
    r.ready(BILLING, "h-2");
    let out = r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    assert_eq!(
        filler_stops(&out, TRIAGE),
        vec![BatonMessage::FillerStop { handoff: "h-2".into(), fade_ms: 1000 }]
    );
}

/// A request with `filler` but not `quiet` (the source still talking) that fails before the
/// source goes quiet: baton's filler never started, so nothing holds; the source is told to stop
/// whatever it may have started as the floor goes back to it.
#[test]
fn a_handoff_that_ends_before_batons_filler_started_stops_the_source_filler() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.ctl(TRIAGE, handoff_request("billing", "r", false, true));
    let ticket = ticket_for(&r.log, "billing");
    let out = r.ev(Event::DispatchFailed { ticket, error: "twirp 503".into() });
    assert!(!r.arb.filler_on());
    assert_eq!(
        filler_stops(&out, TRIAGE),
        vec![BatonMessage::FillerStop { handoff: "h-1".into(), fade_ms: 250 }]
    );
}
