//! Handoff flows in virtual time: the happy paths and every way they can go wrong.

mod support;

use std::time::Duration;

use baton_floor::{
    ActivateCause, AgentMessage, Alert, BatonMessage, Command, DeactivateReason, Event, FailReason,
    FillerCommand, Outcome, Phase, RefuseReason, ReleasePolicy, ToolCallStatus,
};
use support::*;

#[test]
fn clean_cold_handoff_runs_every_phase_in_order() {
    let (mut r, out) = cold_request(Some(tid(1)));
    // Accepted (as a reply), source told to finish its sentence, target dispatched with the
    // handoff named in the metadata.
    let accepted = out.iter().find_map(|c| match c {
        Command::Send { to, re, message: BatonMessage::HandoffAccepted { handoff, target } }
            if to == TRIAGE =>
        {
            Some((re.clone(), handoff.clone(), target.clone()))
        }
        _ => None,
    });
    assert_eq!(accepted, Some((Some("m-2".into()), "h-1".into(), "billing".into())));
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::Deactivate {
        handoff: Some("h-1".into()),
        reason: DeactivateReason::Handoff
    }));
    let meta = out.iter().find_map(|c| match c {
        Command::CreateDispatch { metadata, .. } => Some(metadata.clone()),
        _ => None,
    });
    let meta: serde_json::Value = serde_json::from_str(&meta.unwrap()).unwrap();
    assert_eq!(meta["baton"]["handoff"], "h-1");
    assert!(!filler_started(&out), "source is still finishing its sentence");
    assert_eq!(r.arb.floor_holder(), None);

    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 12_000 });
    r.advance(ms(300));
    let out = r.quiet(TRIAGE);
    assert!(filler_started(&out), "filler starts the moment the source is quiet");
    assert!(muted(&out, TRIAGE), "the source is muted server-side as enforcement");
    assert!(r.arb.filler_on());

    r.advance(ms(1200));
    let out = billing_arrives(&mut r, "AD_1");
    assert!(muted(&out, BILLING), "a target is muted until it is activated");
    assert!(messages_to(&out, BILLING).contains(&&refund_prepare()));
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));

    r.advance(ms(200));
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    assert!(r.arb.filler_on(), "filler stays on until the target is activated");
    r.advance(ms(300));
    let out = r.ready(BILLING, "h-1");
    let activate = position(&out, |c| {
        matches!(c, Command::Send { to, message: BatonMessage::Activate { cause: ActivateCause::Handoff, .. }, .. } if to == BILLING)
    })
    .expect("target activated");
    let unmute =
        position(&out, |c| matches!(c, Command::UnmuteTrack { identity, .. } if identity == BILLING))
            .expect("target unmuted");
    assert!(activate < unmute, "{out:#?}");
    assert!(
        messages_to(&out, TRIAGE)
            .contains(&&BatonMessage::Release { handoff: "h-1".into(), mode: ReleasePolicy::Leave })
    );
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    assert!(!filler_stopped(&out), "the filler holds until the caller can hear billing: {out:#?}");
    assert!(r.arb.filler_on());
    assert!(r.arb.handoff().is_none());

    r.advance(ms(150));
    let out = r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    assert!(
        out.contains(&Command::Filler(FillerCommand::FadeOut(Duration::from_secs(1)))),
        "heard: the filler fades under billing's first words over filler_tail: {out:#?}"
    );
    assert!(!r.arb.filler_on());
    let t = finished(&out).expect("timeline closes when the target is heard");
    assert_eq!(t.outcome, Some(Outcome::Completed));
    assert_eq!(
        t.phase_list(),
        vec![
            Phase::Requested,
            Phase::TargetDispatched,
            Phase::BundleReceived,
            Phase::SourceQuiet,
            Phase::FillerOn,
            Phase::TargetJoined,
            Phase::BundleDelivered,
            Phase::TargetReady,
            Phase::TargetActivated,
            Phase::FillerOff,
            Phase::TargetAudible,
            Phase::Completed,
        ]
    );
    assert_eq!(t.ms(Phase::SourceQuiet), Some(300));
    assert_eq!(t.ms(Phase::TargetJoined), Some(1500));
    assert_eq!(t.ms(Phase::TargetActivated), Some(2000));
    assert_eq!(t.ms(Phase::FillerOff), Some(2150), "filler_off is when the filler really stops");
    assert_eq!(t.ms(Phase::TargetAudible), Some(2150));
    assert_eq!(t.bundle_bytes, Some(12_000));
    assert!(!t.warm);
    let line: serde_json::Value = serde_json::from_str(&t.to_json_line()).unwrap();
    assert_eq!(line["outcome"], "completed");
    assert_eq!(line["phases"][0]["phase"], "requested");

    // The released source did not leave: it is removed after the grace period.
    let out = r.advance(Duration::from_secs(5));
    assert!(out.contains(&Command::RemoveParticipant { identity: TRIAGE.into() }));
}

#[test]
fn released_source_that_leaves_is_not_removed_and_standby_policy_keeps_it() {
    let (mut r, _) = cold_request(None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.ready(BILLING, "h-1");
    r.leave(TRIAGE);
    let out = r.advance(Duration::from_secs(10));
    assert!(!out.iter().any(|c| matches!(c, Command::RemoveParticipant { .. })));

    let mut p = policy();
    p.release = ReleasePolicy::Standby;
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = r.ready(BILLING, "h-1");
    assert!(
        messages_to(&out, TRIAGE)
            .contains(&&BatonMessage::Release { handoff: "h-1".into(), mode: ReleasePolicy::Standby })
    );
    let out = r.advance(Duration::from_secs(10));
    assert!(!out.iter().any(|c| matches!(c, Command::RemoveParticipant { .. })));
    // No audible mark without speech: the timeline closes at audible_timeout.
    let t = finished(&out).expect("closed by audible_timeout");
    assert!(!t.has(Phase::TargetAudible));
    assert_eq!(t.outcome, Some(Outcome::Completed));
}

#[test]
fn warm_handoff_uses_the_standby_agent_without_dispatch() {
    let mut r = Room::with_triage_active(policy());
    // Billing waits in the room, muted; its hello gets a standby deactivate.
    r.join(agent(BILLING, "billing", true));
    let out = r.hello(BILLING, "billing");
    assert!(
        messages_to(&out, BILLING)
            .contains(&&BatonMessage::Deactivate { handoff: None, reason: DeactivateReason::Standby })
    );

    let out = r.request(TRIAGE, "billing", None);
    assert!(!dispatched(&out, "billing"), "warm target: no dispatch");
    assert!(sent(&out, BILLING, "prepare"), "prepared while the source finishes");
    let h = r.arb.handoff().unwrap();
    assert_eq!(h.target_identity.as_deref(), Some(BILLING));

    // Ready before the source is quiet: baton waits, never two voices.
    r.advance(ms(100));
    let out = r.ready(BILLING, "h-1");
    assert!(!sent(&out, BILLING, "activate"));
    assert!(!unmuted(&out, BILLING));
    r.advance(ms(100));
    let out = r.quiet(TRIAGE);
    assert!(filler_started(&out));
    assert!(sent(&out, BILLING, "activate"));
    assert!(unmuted(&out, BILLING), "standby track was muted: unmute on activation");
    assert!(!filler_stopped(&out), "held until billing is heard");
    // Billing never reports speaking: the hold ends at filler_hold, the timeline at
    // audible_timeout.
    let out = r.advance(Duration::from_secs(3));
    assert!(out.contains(&Command::Filler(FillerCommand::FadeOut(ms(250)))));
    let t = finished(&out).unwrap();
    assert_eq!(t.ms(Phase::FillerOff), Some(200 + 1200));
    assert!(t.warm);
    assert_eq!(t.ms(Phase::TargetJoined), Some(0));
    // Its adapter restarts and says hello again: the same activate, cause and handoff id, not
    // a start activation that would make it greet the caller a second time.
    let out = r.hello(BILLING, "billing");
    let again =
        BatonMessage::Activate { handoff: Some("h-1".into()), cause: ActivateCause::Handoff, reason: None };
    assert_eq!(messages_to(&out, BILLING), vec![&again]);
}

#[test]
fn target_never_joins_hands_back_to_source_with_reason() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", None);
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_1".into() });
    r.advance(ms(500));
    r.quiet(TRIAGE);
    // Filler covers the wait; at join_timeout (8 s after the request) baton gives up.
    let out = r.advance(ms(7_499));
    assert!(out.is_empty(), "{out:#?}");
    assert!(r.arb.filler_on());
    let out = r.advance(ms(1));
    assert!(
        out.contains(&Command::DeleteDispatch { dispatch_id: "AD_1".into(), agent_name: "billing".into() })
    );
    assert!(out.iter().any(
        |c| matches!(c, Command::Alert(Alert::AgentNoShow { agent_name, .. }) if agent_name == "billing")
    ));
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::HandoffFailed {
        handoff: "h-1".into(),
        target: "billing".into(),
        reason: FailReason::TargetNoShow
    }));
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::Activate {
        handoff: Some("h-1".into()),
        cause: ActivateCause::Handback,
        reason: Some(FailReason::TargetNoShow)
    }));
    assert!(unmuted(&out, TRIAGE));
    assert!(!filler_stopped(&out), "the filler holds until triage is heard again");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    assert!(finished(&out).is_none(), "the timeline waits for the filler to stop");
    r.advance(ms(300));
    let out = r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: true });
    assert!(filler_stopped(&out));
    let t = finished(&out).unwrap();
    assert_eq!(t.ms(Phase::FillerOff), Some(8_300));
    assert_eq!(t.outcome, Some(Outcome::HandedBack));
    assert_eq!(t.failure, Some(FailReason::TargetNoShow));
    // The source can ask again afterwards.
    let out = r.request(TRIAGE, "billing", None);
    assert!(sent(&out, TRIAGE, "handoff_accepted"));
}

#[test]
fn warm_target_is_switched_in_only_after_the_quiet_settle() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.request(TRIAGE, "billing", None);
    r.ready(BILLING, "h-1");
    let out = r.quiet(TRIAGE);
    assert!(filler_started(&out), "the filler covers the settle");
    // Ready during the settle: activated now, so its reply starts while the source's last
    // words are still reaching the caller, but heard only once they have.
    assert!(sent(&out, BILLING, "activate"));
    assert!(!unmuted(&out, BILLING), "the source's last words are still reaching the caller");
    assert_eq!(r.arb.floor_holder(), None);
    let out = r.advance(ms(59));
    assert!(!unmuted(&out, BILLING));
    let out = r.advance(ms(1));
    assert!(unmuted(&out, BILLING));
    assert!(!sent(&out, BILLING, "activate"), "activated once");
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let t = r.advance(Duration::from_secs(5));
    let t = finished(&t).unwrap();
    let activated: Vec<_> = t.phases.iter().filter(|m| m.phase == Phase::TargetActivated).collect();
    assert_eq!(activated.len(), 1, "{:?}", t.phases);
    assert_eq!(activated[0].ms, t.phases.iter().find(|m| m.phase == Phase::SourceQuiet).unwrap().ms);
}

/// A target activated before the settle's end whose handoff then fails is told to stop
/// (`deactivate`) before it hears `handoff_cancelled`, and it was never unmuted.
#[test]
fn a_target_activated_during_the_settle_is_deactivated_when_the_handoff_fails() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.request(TRIAGE, "billing", None);
    r.ready(BILLING, "h-1");
    let out = r.quiet(TRIAGE);
    assert!(sent(&out, BILLING, "activate"));
    // The caller hangs up within the settle.
    let out = r.leave("caller");
    let to_billing: Vec<_> = messages_to(&out, BILLING);
    let deactivate = to_billing.iter().position(|m| matches!(m, BatonMessage::Deactivate { .. }));
    let cancelled = to_billing.iter().position(|m| matches!(m, BatonMessage::HandoffCancelled { .. }));
    assert!(deactivate.is_some() && cancelled.is_some() && deactivate < cancelled, "{to_billing:?}");
    assert!(!r.log.iter().any(|c| matches!(c, Command::UnmuteTrack { identity, .. } if identity == BILLING)));
}

/// A request that says how long its source has been quiet (`quiet_ms`, the time it spent
/// building its bundle) shortens the settle by as much: the source's last words left it then.
#[test]
fn the_settle_counts_from_when_the_source_went_quiet() {
    let mut r = standby_billing_with_a_60_ms_settle();
    let quiet_request = |quiet_ms| AgentMessage::Handoff {
        target: "billing".into(),
        reason: "refund".into(),
        transfer: None,
        bundle_follows: false,
        quiet: true,
        quiet_ms,
        filler: false,
        speaking: false,
    };
    r.ctl(TRIAGE, quiet_request(Some(40)));
    let out = r.ready(BILLING, "h-1");
    assert!(!unmuted(&out, BILLING), "20 ms of the settle are left");
    let out = r.advance(ms(19));
    assert!(!unmuted(&out, BILLING));
    let out = r.advance(ms(1));
    assert!(unmuted(&out, BILLING), "60 ms after the source went quiet");

    // Quiet for longer than the settle: the switch is at once.
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, quiet_request(Some(500)));
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate") && unmuted(&out, BILLING));
}

#[test]
fn source_that_says_it_is_already_quiet_gets_the_filler_with_the_acceptance() {
    let mut r = Room::with_triage_active(policy());
    let out = r.ctl(TRIAGE, handoff_request("billing", "caller wants a refund", true, false));
    assert!(sent(&out, TRIAGE, "handoff_accepted"));
    assert!(sent(&out, TRIAGE, "deactivate"), "still told, so a restarted adapter stays silent");
    assert!(filler_started(&out), "no deactivate -> quiet round trip before the filler");
    assert!(muted(&out, TRIAGE), "and still enforced server-side");
    let t = r.arb.handoff().unwrap();
    assert_eq!(t.target_identity, None);
}

#[test]
fn target_never_ready_hands_back() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = r.advance(ms(7_999));
    assert!(out.is_empty());
    let out = r.advance(ms(1));
    assert!(messages_to(&out, BILLING).contains(&&BatonMessage::HandoffCancelled {
        handoff: "h-1".into(),
        reason: FailReason::TargetNotReady
    }));
    assert!(sent(&out, TRIAGE, "handoff_failed"));
    assert!(sent(&out, TRIAGE, "activate"));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    // A late ready from the abandoned target changes nothing.
    let out = r.ready(BILLING, "h-1");
    assert!(!sent(&out, BILLING, "activate"));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    // A restarted source adapter hears again that the floor came back to it, and why.
    let out = r.hello(TRIAGE, "triage");
    assert!(messages_to(&out, TRIAGE).iter().any(|m| matches!(
        m,
        BatonMessage::Activate {
            cause: ActivateCause::Handback,
            reason: Some(FailReason::TargetNotReady),
            ..
        }
    )));
}

#[test]
fn target_leaving_mid_handoff_cancels_transfer_and_hands_back_after_the_rejoin_grace() {
    // No replacement of the same name either (recovery.rs has the replacement).
    let mut p = policy_without_alternates();
    p.recovery_attempts = 0;
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 100 });
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(out.iter().any(|c| matches!(c, Command::DeliverBundle { .. })));
    let out = r.leave(BILLING);
    assert!(!out.iter().any(|c| matches!(c, Command::CancelTransfer { .. })), "awaited: {out:#?}");
    assert_eq!(r.arb.floor_holder(), None);
    let out = r.advance(ms(2999));
    assert!(!out.iter().any(|c| matches!(c, Command::CancelTransfer { .. })), "{out:#?}");
    let out = r.advance(ms(1));
    assert!(out.contains(&Command::CancelTransfer { transfer_id: tid(1), to: BILLING.into() }));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    assert!(r.arb.filler_on(), "held until triage is heard, at most filler_hold");
    let out = r.advance(ms(1200));
    assert!(out.contains(&Command::Filler(FillerCommand::FadeOut(ms(250)))));
    let t = finished(&out).unwrap();
    assert_eq!(t.failure, Some(FailReason::TargetLeft));
    assert!(!r.arb.filler_on());
}

#[test]
fn alternate_is_tried_when_target_does_not_show_and_completes() {
    let mut r = Room::with_triage_active(policy());
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    let out = r.advance(Duration::from_secs(8));
    assert!(dispatched(&out, "support"), "alternate dispatched: {out:#?}");
    assert!(!sent(&out, TRIAGE, "handoff_failed"), "no handback while an alternate is tried");
    assert!(r.arb.filler_on(), "caller keeps hearing filler");
    let ticket = ticket_for(&out, "support");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_2".into() });
    r.join(agent(SUPPORT, "support", false));
    let out = r.hello(SUPPORT, "support");
    assert!(sent(&out, SUPPORT, "prepare"));
    let out = r.ready(SUPPORT, "h-1");
    assert!(sent(&out, SUPPORT, "activate"));
    assert_eq!(r.arb.floor_holder(), Some(SUPPORT));
    let out = r.advance(Duration::from_secs(3));
    let t = finished(&out).unwrap();
    assert_eq!(t.requested_target, "billing");
    assert_eq!(t.target, "support");
    assert!(t.has(Phase::AlternateTried));
    assert_eq!(t.outcome, Some(Outcome::Completed));
}

#[test]
fn dispatch_api_failure_moves_on_immediately() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", None);
    let ticket = ticket_for(&r.log, "billing");
    let out = r.ev(Event::DispatchFailed { ticket, error: "twirp 503".into() });
    assert!(out.iter().any(|c| matches!(c, Command::Alert(Alert::DispatchFailed { .. }))));
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::HandoffFailed {
        handoff: "h-1".into(),
        target: "billing".into(),
        reason: FailReason::DispatchFailed
    }));
    // It failed before the source went quiet: no filler was ever needed.
    assert!(!r.log.iter().any(|c| matches!(c, Command::Filler(FillerCommand::On))));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

#[test]
fn source_leaving_mid_handoff_completes_from_the_held_bundle() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    let out = r.leave(TRIAGE);
    assert!(filler_started(&out), "a source that leaves is quiet: filler now");
    assert!(!muted(&out, TRIAGE), "nothing to mute on a participant that left");
    let out = billing_arrives(&mut r, "AD_1");
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }));
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"));
    assert!(!sent(&out, TRIAGE, "release"), "the source is gone");
    let out = r.advance(Duration::from_secs(3));
    let t = finished(&out).unwrap();
    assert_eq!(t.outcome, Some(Outcome::Completed));
    assert!(t.has(Phase::SourceLeft));
}

#[test]
fn source_leaving_before_its_bundle_arrives_completes_without_it() {
    let mut r = Room::with_triage_active(policy());
    r.ctl(
        TRIAGE,
        baton_floor::AgentMessage::Handoff {
            target: "billing".into(),
            reason: "r".into(),
            transfer: None,
            bundle_follows: true,
            quiet: false,
            quiet_ms: None,
            filler: false,
            speaking: false,
        },
    );
    let out = billing_arrives(&mut r, "AD_1");
    assert!(
        messages_to(&out, BILLING)
            .iter()
            .any(|m| matches!(m, BatonMessage::Prepare { bundle: true, transfer: None, .. }))
    );
    let out = r.leave(TRIAGE);
    assert!(!sent(&out, BILLING, "bundle_unavailable"), "the source may rejoin and upload: {out:#?}");
    let out = r.advance(Duration::from_secs(3));
    assert!(messages_to(&out, BILLING).contains(&&BatonMessage::BundleUnavailable { handoff: "h-1".into() }));
    let out = r.ready(BILLING, "h-1");
    assert!(sent(&out, BILLING, "activate"), "completes from what baton holds (nothing)");
}

#[test]
fn source_gone_and_target_failing_leaves_floor_vacant_with_filler_stopped() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", None);
    r.leave(TRIAGE);
    let out = r.advance(Duration::from_secs(8));
    assert!(filler_stopped(&out));
    assert!(out.iter().any(|c| matches!(c, Command::Alert(Alert::FloorVacant { .. }))));
    let t = finished(&out).unwrap();
    assert_eq!(t.outcome, Some(Outcome::Failed));
    assert_eq!(r.arb.floor_holder(), None);
    assert!(!r.arb.filler_on());
}

#[test]
fn caller_leaving_cancels_everything() {
    let (mut r, _) = cold_request(Some(tid(1)));
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    r.quiet(TRIAGE);
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_1".into() });
    let out = r.leave(CALLER);
    assert!(
        out.contains(&Command::DeleteDispatch { dispatch_id: "AD_1".into(), agent_name: "billing".into() })
    );
    assert!(out.contains(&Command::Filler(FillerCommand::FadeOut(Duration::ZERO))));
    assert_eq!(out.last(), Some(&Command::SessionEnded));
    let t = finished(&out).unwrap();
    assert_eq!(t.failure, Some(FailReason::CallerLeft));
    assert!(r.arb.is_ended());
    assert_eq!(r.arb.poll_timeout(), None);
    // Everything afterwards is ignored.
    let mut p = agent(BILLING, "billing", false);
    p.dispatch_id = Some("AD_1".into());
    assert!(r.join(p).is_empty());
    assert!(r.advance(Duration::from_secs(60)).is_empty());
}

#[test]
fn caller_leaving_during_delivery_cancels_the_transfer() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    billing_arrives(&mut r, "AD_1");
    let out = r.leave(CALLER);
    assert!(out.contains(&Command::CancelTransfer { transfer_id: tid(1), to: BILLING.into() }));
    assert!(sent(&out, BILLING, "handoff_cancelled"));
}

#[test]
fn second_request_is_refused_while_one_runs() {
    let (mut r, _) = cold_request(None);
    let out = r.request(TRIAGE, "support", None);
    assert_eq!(
        messages_to(&out, TRIAGE),
        vec![&BatonMessage::HandoffRefused { reason: RefuseReason::HandoffInProgress }]
    );
    assert!(!dispatched(&out, "support"));
    assert_eq!(r.arb.handoff().unwrap().target_name, "billing");
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let mut r = Room::with_triage_active(policy());
    let out = r.request(TRIAGE, "sales", None);
    assert!(
        messages_to(&out, TRIAGE)
            .contains(&&BatonMessage::HandoffRefused { reason: RefuseReason::UnknownTarget })
    );
    let out = r.request(TRIAGE, "triage", None);
    assert!(
        messages_to(&out, TRIAGE)
            .contains(&&BatonMessage::HandoffRefused { reason: RefuseReason::SameAgent })
    );
    // A configured agent that does not hold the floor may not hand it on.
    r.join(agent(BILLING, "billing", true));
    let out = r.request(BILLING, "support", None);
    assert!(
        messages_to(&out, BILLING)
            .contains(&&BatonMessage::HandoffRefused { reason: RefuseReason::NotFloorHolder })
    );
    assert!(r.arb.handoff().is_none());
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

#[test]
fn source_ignoring_deactivate_is_muted_at_source_quiet_timeout() {
    let (mut r, _) = cold_request(None);
    r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: true });
    let out = r.advance(ms(3_999));
    assert!(!muted(&out, TRIAGE));
    assert!(!filler_started(&out));
    let out = r.advance(ms(1));
    assert!(muted(&out, TRIAGE), "server-side mute enforces deactivate");
    assert!(filler_started(&out));
    // The agent tries to unmute itself: baton mutes it again.
    let out = r.ev(Event::ParticipantUpdated(agent(TRIAGE, "triage", false)));
    assert!(muted(&out, TRIAGE));
    billing_arrives(&mut r, "AD_1");
    let at_ready = r.ready(BILLING, "h-1");
    // What was already on its way from the muted source still plays at the caller for a few
    // frames: the target's reply may start, but its track stays muted under the filler.
    assert!(sent(&at_ready, BILLING, "activate"), "activated at once, to start its reply");
    assert!(!unmuted(&at_ready, BILLING), "target unmuted the instant a force-muted source went quiet");
    let t = finished(&r.advance(Duration::from_millis(3_300))).unwrap();
    assert_eq!(
        t.phases.iter().find(|m| m.phase == Phase::SourceQuiet).unwrap().detail.as_deref(),
        Some("forced")
    );
}

#[test]
fn silence_counts_as_quiet_after_the_grace_and_speech_resets_it() {
    // Triage is not speaking when it asks: quiet after silence_grace, no quiet message needed.
    let (mut r, _) = cold_request(None);
    let out = r.advance(ms(399));
    assert!(!filler_started(&out));
    let out = r.advance(ms(1));
    assert!(filler_started(&out));

    // Speaking when it asks: the grace starts when speech stops.
    let mut r = Room::with_triage_active(policy());
    r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: true });
    r.request(TRIAGE, "billing", None);
    assert!(r.advance(ms(1000)).iter().all(|c| !matches!(c, Command::Filler(FillerCommand::On))));
    r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: false });
    r.advance(ms(200));
    r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: true });
    assert!(r.advance(ms(300)).iter().all(|c| !matches!(c, Command::Filler(FillerCommand::On))));
    r.ev(Event::SpeakingChanged { identity: TRIAGE.into(), speaking: false });
    let out = r.advance(ms(400));
    assert!(filler_started(&out));
    assert_eq!(r.ms(), 1900);
}

#[test]
fn source_muting_itself_or_having_no_audio_is_quiet() {
    let (mut r, _) = cold_request(None);
    let out = r.ev(Event::ParticipantUpdated(agent(TRIAGE, "triage", true)));
    assert!(filler_started(&out));
    assert!(!muted(&out, TRIAGE), "already muted by itself");

    let mut r = Room::new(policy());
    let mut p = agent(TRIAGE, "triage", false);
    p.audio = None;
    r.ev(Event::RoomJoined { participants: vec![caller(), p], token_dispatched: vec![] });
    r.hello(TRIAGE, "triage");
    let out = r.request(TRIAGE, "billing", None);
    assert!(filler_started(&out), "no audio from the source: filler immediately");
}

#[test]
fn filler_limit_forces_a_handback() {
    let mut p = policy_without_alternates();
    p.max_filler = Duration::from_secs(6);
    let mut r = Room::with_triage_active(p);
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    r.advance(Duration::from_secs(4));
    billing_arrives(&mut r, "AD_1");
    // ready_timeout (8 s) would fire at 12 s; the filler limit (6 s) comes first.
    let out = r.advance(Duration::from_secs(2));
    assert!(messages_to(&out, TRIAGE).contains(&&BatonMessage::HandoffFailed {
        handoff: "h-1".into(),
        target: "billing".into(),
        reason: FailReason::FillerLimit
    }));
    assert!(sent(&out, BILLING, "handoff_cancelled"));
    assert_eq!(r.ms(), 6000);
    // Handed back: held for triage to be heard, at most filler_hold.
    assert!(r.arb.filler_on());
    r.advance(ms(1200));
    assert!(!r.arb.filler_on());
}

#[test]
fn bundle_that_never_arrives_hands_back() {
    let (mut r, _) = cold_request(Some(tid(9)));
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = r.ready(BILLING, "h-1");
    assert!(!sent(&out, BILLING, "activate"), "ready but no context yet");
    let out = r.advance(Duration::from_secs(5));
    assert!(
        messages_to(&out, TRIAGE)
            .iter()
            .any(|m| matches!(m, BatonMessage::HandoffFailed { reason: FailReason::BundleTimeout, .. }))
    );
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
}

#[test]
fn bundle_sent_before_the_request_is_used() {
    let mut r = Room::with_triage_active(policy());
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(0), bytes: 7 });
    r.request(TRIAGE, "billing", Some(tid(0)));
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(0), to: BILLING.into() }));
}

#[test]
fn delivery_failure_moves_to_the_alternate() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out =
        r.ev(Event::TransferFailed { peer: BILLING.into(), transfer_id: tid(1), reason: "no ack".into() });
    assert!(sent(&out, BILLING, "handoff_cancelled"));
    assert!(dispatched(&out, "support"));
    r.join(agent(SUPPORT, "support", true));
    let out = r.hello(SUPPORT, "support");
    assert!(out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: SUPPORT.into() }));
}

#[test]
fn late_dispatch_result_after_handback_is_deleted() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.request(TRIAGE, "billing", None);
    r.quiet(TRIAGE);
    let ticket = ticket_for(&r.log, "billing");
    r.advance(Duration::from_secs(8));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE));
    let out = r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_late".into() });
    assert_eq!(
        out,
        vec![Command::DeleteDispatch { dispatch_id: "AD_late".into(), agent_name: "billing".into() }]
    );
}

#[test]
fn stale_agent_from_another_dispatch_is_not_taken_as_target() {
    let (mut r, _) = cold_request(None);
    let ticket = ticket_for(&r.log, "billing");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_new".into() });
    let mut stale = agent("agent-billing-old", "billing", true);
    stale.dispatch_id = Some("AD_old".into());
    r.join(stale);
    assert_eq!(r.arb.handoff().unwrap().target_identity, None);
    let mut fresh = agent(BILLING, "billing", true);
    fresh.dispatch_id = Some("AD_new".into());
    r.join(fresh);
    assert_eq!(r.arb.handoff().unwrap().target_identity.as_deref(), Some(BILLING));
}

#[test]
fn ready_from_someone_else_or_for_another_handoff_is_ignored() {
    let (mut r, _) = cold_request(None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    let out = r.ready(BILLING, "h-7");
    assert!(out.iter().any(|c| matches!(c, Command::Alert(Alert::IgnoredMessage { .. }))));
    assert!(!r.arb.handoff().unwrap().target_ready);
    r.join(agent(SUPPORT, "support", true));
    let out = r.ready(SUPPORT, "h-1");
    assert!(!sent(&out, SUPPORT, "activate"));
    assert!(r.arb.handoff().is_some());
}

#[test]
fn a_new_handoff_during_the_filler_hold_closes_the_last_one_and_keeps_the_track_armed() {
    let (mut r, _) = cold_request(None);
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.ready(BILLING, "h-1");
    assert!(r.arb.filler_on(), "held: billing not heard yet");
    r.advance(ms(500));
    // Billing asks to hand on before it was ever heard: the hold ends, h-1's timeline closes with
    // the filler's real stop, and the track stays armed for h-2.
    let out = r.request(BILLING, "triage", None);
    assert!(out.contains(&Command::Filler(FillerCommand::FadeOut(ms(250)))));
    assert!(!out.contains(&Command::Filler(FillerCommand::Off)), "h-2 needs the track: {out:#?}");
    let t = finished(&out).expect("h-1 closed");
    assert_eq!(t.handoff, "h-1");
    let off = t.phases.iter().find(|m| m.phase == Phase::FillerOff).expect("filler_off");
    assert_eq!((off.ms, off.detail.as_deref()), (500, Some("next_handoff")));
    assert!(sent(&out, BILLING, "handoff_accepted"));
    // The new source goes quiet: the filler starts again, on the armed track.
    let out = r.quiet(BILLING);
    assert!(filler_started(&out));
    assert!(!out.contains(&Command::Filler(FillerCommand::Arm)), "still armed: {out:#?}");
}

#[test]
fn a_target_already_speaking_when_activated_is_heard_at_once() {
    let mut r = Room::with_triage_active(policy());
    r.join(agent(BILLING, "billing", true));
    r.hello(BILLING, "billing");
    r.request(TRIAGE, "billing", None);
    r.ready(BILLING, "h-1");
    // Its state says speaking while it is still muted (it greets into a muted track).
    r.ev(Event::SpeakingChanged { identity: BILLING.into(), speaking: true });
    let out = r.quiet(TRIAGE);
    assert!(sent(&out, BILLING, "activate"));
    assert!(out.contains(&Command::Filler(FillerCommand::FadeOut(Duration::from_secs(1)))));
    let t = finished(&out).expect("heard at activation: the timeline closes");
    assert!(t.has(Phase::TargetAudible));
    assert_eq!(out.last(), Some(&Command::Filler(FillerCommand::Off)), "no handoff left: track muted");
}

/// Issue 12, item 5: a source that lost its connection right after sending `handoff` resends
/// it with the same id when it is back. It must get the same `handoff_accepted`, not
/// `handoff_refused: handoff_in_progress` for its own handoff, and nothing else may happen.
#[test]
fn a_repeated_handoff_request_gets_the_same_acceptance_and_changes_nothing() {
    let (mut r, out) = cold_request(Some(tid(1)));
    let accepted = |cmds: &[Command]| {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Send { to, re, message: BatonMessage::HandoffAccepted { handoff, target } }
                    if to == TRIAGE =>
                {
                    Some((re.clone(), handoff.clone(), target.clone()))
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let first = accepted(&out);
    assert_eq!(first, vec![(Some("m-2".into()), "h-1".into(), "billing".into())]);

    r.advance(ms(700));
    let repeat = AgentMessage::Handoff {
        target: "billing".into(),
        reason: "caller wants a refund".into(),
        transfer: Some(tid(1)),
        bundle_follows: false,
        quiet: false,
        quiet_ms: None,
        filler: false,
        speaking: false,
    };
    let again = r.ev(Event::Control { from: TRIAGE.into(), id: "m-2".into(), message: repeat.clone() });
    assert_eq!(accepted(&again), first, "the same answer");
    assert_eq!(again.len(), 1, "and nothing else: {again:?}");

    // A new request (another id) while the handoff is under way is still refused.
    let other = r.request(TRIAGE, "billing", None);
    assert!(
        messages_to(&other, TRIAGE)
            .contains(&&BatonMessage::HandoffRefused { reason: RefuseReason::HandoffInProgress })
    );

    // The handoff goes on as one: billing is dispatched once and takes the floor.
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 1000 });
    r.quiet(TRIAGE);
    billing_arrives(&mut r, "AD_1");
    r.ev(Event::BundleDelivered { transfer_id: tid(1), to: BILLING.into() });
    r.ready(BILLING, "h-1");
    r.advance(ms(200));
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let dispatches = r.log.iter().filter(|c| matches!(c, Command::CreateDispatch { .. })).count();
    assert_eq!(dispatches, 1);

    // Resent after the handoff completed, it still gets its answer, and the floor stays put.
    let late = r.ev(Event::Control { from: TRIAGE.into(), id: "m-2".into(), message: repeat });
    assert_eq!(accepted(&late), first);
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
}

fn tool_result(call_id: &str, output: &str) -> AgentMessage {
    AgentMessage::ToolResult {
        handoff: "h-1".into(),
        call_id: call_id.into(),
        name: "create_reservation".into(),
        status: ToolCallStatus::Finished,
        is_error: false,
        output: output.into(),
        truncated: false,
    }
}

fn forwarded(cmds: &[Command]) -> Vec<(String, String, String)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send { to, message: BatonMessage::ToolResult { call_id, source, .. }, .. } => {
                Some((to.clone(), call_id.clone(), source.clone()))
            }
            _ => None,
        })
        .collect()
}

fn ignored(cmds: &[Command], why: &str) -> bool {
    cmds.iter().any(|c| matches!(c, Command::Alert(Alert::IgnoredMessage { why: w, .. }) if *w == why))
}

/// Issue 12: a tool call the source's bundle carried in flight ends after the handoff. Its
/// result reaches the agent that continues the call exactly once: held for a target not yet
/// prepared and sent right after `prepare`, to the new holder once the handoff completed, and
/// never twice, never from anyone but that handoff's source.
#[test]
fn a_late_tool_result_is_forwarded_once_to_the_agent_that_continues_the_call() {
    let (mut r, _) = cold_request(Some(tid(1)));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 1000 });
    r.quiet(TRIAGE);

    // Billing is not in the room yet: the result waits for it.
    let out = r.ctl(TRIAGE, tool_result("call_1", r#"{"reservation":"R-1"}"#));
    assert!(forwarded(&out).is_empty(), "{out:#?}");
    let out = r.ctl(TRIAGE, tool_result("call_1", r#"{"reservation":"R-1"}"#));
    assert!(ignored(&out, "already forwarded"), "a repeat is dropped: {out:#?}");

    r.advance(ms(800));
    let out = billing_arrives(&mut r, "AD_1");
    let prepare =
        position(&out, |c| matches!(c, Command::Send { message: BatonMessage::Prepare { .. }, .. }));
    let result =
        position(&out, |c| matches!(c, Command::Send { message: BatonMessage::ToolResult { .. }, .. }));
    assert!(prepare.is_some() && result > prepare, "after prepare: {out:#?}");
    assert_eq!(forwarded(&out), vec![(BILLING.into(), "call_1".into(), "triage".into())]);
    let full = out.iter().find_map(|c| match c {
        Command::Send { message: m @ BatonMessage::ToolResult { .. }, .. } => Some(m.clone()),
        _ => None,
    });
    assert_eq!(
        full,
        Some(BatonMessage::ToolResult {
            handoff: "h-1".into(),
            source: "triage".into(),
            call_id: "call_1".into(),
            name: "create_reservation".into(),
            status: ToolCallStatus::Finished,
            is_error: false,
            output: r#"{"reservation":"R-1"}"#.into(),
            truncated: false,
        })
    );

    // Prepared: straight through.
    let out = r.ctl(TRIAGE, tool_result("call_2", "saved"));
    assert_eq!(forwarded(&out), vec![(BILLING.into(), "call_2".into(), "triage".into())]);

    // Completed: to the holder.
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    r.ready(BILLING, "h-1");
    r.advance(ms(100));
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let out = r.ctl(TRIAGE, tool_result("call_3", "done"));
    assert_eq!(forwarded(&out), vec![(BILLING.into(), "call_3".into(), "triage".into())]);

    // Only the source of that handoff may send one.
    let out = r.ctl(BILLING, tool_result("call_4", "forged"));
    assert!(forwarded(&out).is_empty() && ignored(&out, "not the source of that handoff"), "{out:#?}");
    let mut other = tool_result("call_5", "x");
    if let AgentMessage::ToolResult { handoff, .. } = &mut other {
        *handoff = "h-9".into();
    }
    let out = r.ctl(TRIAGE, other);
    assert!(forwarded(&out).is_empty() && ignored(&out, "not the source of that handoff"));
}

/// A source that got the call back (handback) delivers its own results: baton forwards none.
#[test]
fn a_tool_result_from_a_source_that_holds_the_floor_again_is_not_forwarded() {
    let (mut r, _) = cold_request(None);
    r.quiet(TRIAGE);
    let out = r.advance(Duration::from_secs(30));
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE), "billing never came: handed back {out:#?}");
    let out = r.ctl(TRIAGE, tool_result("call_1", "R-1"));
    assert!(forwarded(&out).is_empty() && ignored(&out, "the source holds the floor again"), "{out:#?}");
}

/// The Python adapter uploads its bundle right behind its request, naming it (`transfer`): the
/// bundle may be complete before the request is read. It is claimed at once; and a sender of
/// stray transfers cannot make baton keep more than 16 unclaimed ones.
#[test]
fn a_bundle_that_overtook_its_request_is_claimed_and_stray_ones_are_bounded() {
    let mut r = Room::with_triage_active(policy());
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    let out = r.request(TRIAGE, "billing", Some(tid(1)));
    assert!(sent(&out, TRIAGE, "handoff_accepted"));
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(
        out.contains(&Command::DeliverBundle { transfer_id: tid(1), to: BILLING.into() }),
        "the bundle baton already held goes to the target at once"
    );

    let mut r = Room::with_triage_active(policy());
    for i in 100..117 {
        r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(i), bytes: 10 });
    }
    r.request(TRIAGE, "billing", Some(tid(100)));
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    assert!(
        !out.iter().any(|c| matches!(c, Command::DeliverBundle { .. })),
        "the 17th stray bundle pushed out the first: the request waits for its upload"
    );
}
