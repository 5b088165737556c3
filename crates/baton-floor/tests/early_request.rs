//! A source that asks for its handoff at the start of the sentence it says with its transfer
//! tool (`speaking` in its request), so the target is prepared while it speaks, and sends what
//! its context gained meanwhile (`tail`) before its `quiet`.

mod support;

use std::time::Duration;

use baton_floor::{AgentMessage, BatonMessage, Command, Event};
use serde_json::json;
use support::*;

/// A `handoff` said at the start of the sentence, naming transfer 1.
fn speaking_request(target: &str) -> AgentMessage {
    AgentMessage::Handoff {
        target: target.into(),
        reason: "caller wants a refund".into(),
        transfer: Some(tid(1)),
        bundle_follows: false,
        quiet: false,
        quiet_ms: None,
        filler: true,
        speaking: true,
    }
}

fn tail(handoff: &str, text: &str) -> AgentMessage {
    AgentMessage::Tail {
        handoff: handoff.into(),
        items: vec![json!({"id": "item_9", "type": "message", "role": "assistant", "content": [text]})],
        user_state: None,
    }
}

/// Triage's bundle reaches baton, and the standby billing, which says ready.
fn billing_ready(r: &mut Room) {
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 4096 });
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    r.ready(BILLING, "h-1");
}

fn speaking(r: &mut Room, who: &str, on: bool) -> Vec<Command> {
    r.ev(Event::SpeakingChanged { identity: who.into(), speaking: on })
}

fn index_of(cmds: &[Command], to: &str, ty: &str) -> Option<usize> {
    position(
        cmds,
        |c| matches!(c, Command::Send { to: t, message, .. } if t == to && message.type_name() == ty),
    )
}

#[test]
fn the_standby_is_prepared_during_the_sentence_and_switched_in_at_the_sources_quiet() {
    let mut r = standby_billing_with_a_60_ms_settle();
    let out = r.ctl(TRIAGE, speaking_request("billing"));
    assert!(sent(&out, TRIAGE, "handoff_accepted") && sent(&out, TRIAGE, "deactivate"));
    assert!(sent(&out, BILLING, "prepare"), "prepared while triage speaks: {out:#?}");
    assert!(!filler_started(&out) && !muted(&out, TRIAGE), "the sentence is still to be heard");
    speaking(&mut r, TRIAGE, true);
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 4096 });
    r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid(1) });
    let out = r.ready(BILLING, "h-1");
    assert!(!sent(&out, BILLING, "activate"), "ready long before the sentence ends: it waits");
    // A sentence longer than source_quiet_timeout (4 s) is not cut off.
    let out = r.advance(Duration::from_secs(5));
    assert!(!muted(&out, TRIAGE) && !filler_started(&out), "{out:#?}");

    let out = r.ctl(TRIAGE, tail("h-1", "Let me transfer you to billing."));
    let forwarded = messages_to(&out, BILLING);
    assert_eq!(forwarded.len(), 1, "{out:#?}");
    assert!(
        matches!(forwarded[0], BatonMessage::Tail { handoff, source, items, .. }
            if handoff == "h-1" && source == "triage" && items[0]["content"][0] == "Let me transfer you to billing."),
        "{forwarded:#?}"
    );
    speaking(&mut r, TRIAGE, false);
    let out = r.quiet(TRIAGE);
    assert!(filler_started(&out) && muted(&out, TRIAGE));
    assert!(sent(&out, BILLING, "activate"), "activated at once: its reply starts during the settle");
    assert!(!unmuted(&out, BILLING), "heard only once triage's last words have reached the caller");
    let out = r.advance(ms(60));
    assert!(unmuted(&out, BILLING));
    let h = r.arb.handoff().map(|h| h.id.clone());
    assert_eq!(h, None, "switched: {:?}", r.arb.floor_holder());
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
}

#[test]
fn silence_before_the_sentence_starts_is_not_its_end() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, speaking_request("billing"));
    billing_ready(&mut r);
    // The tool is called before the sentence's first audio: triage shows silent (thinking).
    let out = r.advance(Duration::from_secs(2));
    assert!(!filler_started(&out) && !muted(&out, TRIAGE), "silence_grace (400 ms) must not run: {out:#?}");
    let out = speaking(&mut r, TRIAGE, false);
    assert!(out.is_empty(), "still not started: {out:#?}");
    let out = r.advance(Duration::from_secs(1));
    assert!(!filler_started(&out));
    // Once heard, the ordinary rule: silent for silence_grace counts as quiet.
    speaking(&mut r, TRIAGE, true);
    r.advance(Duration::from_secs(3));
    speaking(&mut r, TRIAGE, false);
    let out = r.advance(ms(399));
    assert!(!filler_started(&out));
    let out = r.advance(ms(1));
    assert!(filler_started(&out) && muted(&out, TRIAGE), "{out:#?}");
    assert!(r.arb.handoff().is_some_and(|h| h.source_quiet));
    assert_eq!(r.ms(), 6400);
}

#[test]
fn a_speaking_source_that_never_goes_quiet_is_muted_at_sentence_timeout() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, speaking_request("billing"));
    billing_ready(&mut r);
    speaking(&mut r, TRIAGE, true);
    let out = r.advance(ms(19_999));
    assert!(!muted(&out, TRIAGE) && !filler_started(&out));
    let out = r.advance(ms(1));
    assert!(muted(&out, TRIAGE) && filler_started(&out), "forced at sentence_timeout (20 s): {out:#?}");
}

#[test]
fn a_request_that_says_both_quiet_and_speaking_is_quiet() {
    let mut r = standby_billing_with_a_60_ms_settle();
    let mut request = speaking_request("billing");
    if let AgentMessage::Handoff { quiet, .. } = &mut request {
        *quiet = true;
    }
    let out = r.ctl(TRIAGE, request);
    assert!(filler_started(&out) && muted(&out, TRIAGE), "{out:#?}");
}

/// A cold target: the tail that comes before it joined is held, and sent right after its
/// `prepare`; a target that fails takes it with it, and the alternate is sent it again.
#[test]
fn every_target_gets_the_tail_after_its_prepare_and_before_its_activate() {
    let mut r = Room::with_triage_active(policy());
    r.ctl(TRIAGE, speaking_request("billing"));
    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid(1), bytes: 10 });
    let out = r.ctl(TRIAGE, tail("h-1", "One moment."));
    assert!(messages_to(&out, BILLING).is_empty(), "nobody to send it to yet");
    r.quiet(TRIAGE);
    let out = billing_arrives(&mut r, "AD_1");
    let prepare = index_of(&out, BILLING, "prepare").expect("prepared");
    let held = index_of(&out, BILLING, "tail").expect("the held tail");
    assert!(prepare < held, "{out:#?}");

    // Billing never says ready: its alternate, support, is prepared and gets the tail too.
    let out = r.advance(Duration::from_secs(9));
    assert!(dispatched(&out, "support"), "{out:#?}");
    let ticket = ticket_for(&out, "support");
    r.ev(Event::DispatchCreated { ticket, dispatch_id: "AD_2".into() });
    let mut p = agent(SUPPORT, "support", false);
    p.dispatch_id = Some("AD_2".into());
    r.join(p);
    let out = r.hello(SUPPORT, "support");
    let prepare = index_of(&out, SUPPORT, "prepare").expect("prepared");
    let held = index_of(&out, SUPPORT, "tail").expect("the tail again");
    assert!(prepare < held);
    r.ev(Event::BundleDelivered { to: SUPPORT.into(), transfer_id: tid(1) });
    let out = r.ready(SUPPORT, "h-1");
    assert!(sent(&out, SUPPORT, "activate"));
    assert!(!sent(&out, SUPPORT, "tail"), "sent once per target");
}

#[test]
fn a_tail_after_the_switch_goes_to_the_new_holder() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, speaking_request("billing"));
    billing_ready(&mut r);
    r.quiet(TRIAGE);
    r.advance(ms(60));
    assert_eq!(r.arb.floor_holder(), Some(BILLING));
    let out = r.ctl(TRIAGE, tail("h-1", "late"));
    assert!(sent(&out, BILLING, "tail"), "{out:#?}");
}

#[test]
fn a_tail_from_anyone_but_the_source_or_after_a_handback_is_dropped() {
    let mut r = Room::with_triage_active(policy_without_alternates());
    r.ctl(TRIAGE, speaking_request("billing"));
    billing_arrives(&mut r, "AD_1");
    r.join(agent(SUPPORT, "support", true));
    r.hello(SUPPORT, "support");
    let out = r.ctl(SUPPORT, tail("h-1", "forged"));
    assert!(!sent(&out, BILLING, "tail"), "{out:#?}");
    let out = r.ctl(TRIAGE, tail("h-7", "another handoff"));
    assert!(!sent(&out, BILLING, "tail"));

    // Billing never says ready: the handoff fails and triage holds the floor again.
    r.quiet(TRIAGE);
    let out = r.advance(Duration::from_secs(9));
    assert!(sent(&out, TRIAGE, "activate"), "{out:#?}");
    let out = r.ctl(TRIAGE, tail("h-1", "its own context"));
    assert!(messages_to(&out, BILLING).is_empty() && messages_to(&out, SUPPORT).is_empty(), "{out:#?}");
}

#[test]
fn a_tail_too_large_to_forward_is_dropped_whole() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, speaking_request("billing"));
    let big = "x".repeat(14_990);
    let out = r.ctl(TRIAGE, tail("h-1", &big));
    assert!(!sent(&out, BILLING, "tail"), "never a packet over 15 000 bytes");
    let out = r.ctl(TRIAGE, tail("h-1", "fits"));
    assert!(sent(&out, BILLING, "tail"));
}

/// A request asked at the tool call can reach a baton before the source's hello does (a baton
/// that took the room over from the store, a hello dropped at join): the holder of record gets
/// the floor back first, and its request is accepted, not refused as `not_floor_holder`.
#[test]
fn a_request_that_overtakes_the_holders_hello_is_accepted_after_its_activate() {
    let mut r = Room::new(policy());
    r.ev(Event::RoomJoined {
        participants: vec![caller(), agent(TRIAGE, "triage", false)],
        token_dispatched: vec![],
    });
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE), "the holder of record, not activated yet");
    r.join(agent(BILLING, "billing", true));
    r.hello(BILLING, "billing");
    let out = r.ctl(TRIAGE, speaking_request("billing"));
    let activate = index_of(&out, TRIAGE, "activate").expect("the floor first");
    let accepted = index_of(&out, TRIAGE, "handoff_accepted").expect("then the request");
    assert!(activate < accepted, "{out:#?}");
    assert!(!sent(&out, TRIAGE, "handoff_refused"));
}

/// A source that floods tails is not held without bound: the first 64 are kept and forwarded,
/// the rest dropped.
#[test]
fn a_flood_of_tails_is_capped_per_handoff() {
    let mut r = standby_billing_with_a_60_ms_settle();
    r.ctl(TRIAGE, speaking_request("billing"));
    let mut forwarded = 0;
    for n in 0..100 {
        let out = r.ctl(TRIAGE, tail("h-1", &format!("part {n}")));
        forwarded += messages_to(&out, BILLING).len();
    }
    assert_eq!(forwarded, baton_floor::MAX_TAILS_PER_HANDOFF);
}

/// The source's voice left `quiet_ms` before its `quiet` (it learns its sentence is over only
/// when its framework says so): the settle counts from then, so the target ready during the
/// sentence is activated and unmuted at once when that is longer than `quiet_settle`.
#[test]
fn the_settle_counts_from_the_silence_the_quiet_reports() {
    for (quiet_ms, unmuted_after) in [(Some(90), 0), (Some(20), 40), (None, 60)] {
        let mut r = standby_billing_with_a_60_ms_settle();
        r.ctl(TRIAGE, speaking_request("billing"));
        billing_ready(&mut r);
        let out = r.ctl(TRIAGE, AgentMessage::Quiet { handoff: Some("h-1".into()), quiet_ms });
        assert!(sent(&out, BILLING, "activate"));
        if unmuted_after == 0 {
            assert!(unmuted(&out, BILLING), "{quiet_ms:?}: {out:#?}");
            continue;
        }
        assert!(!unmuted(&out, BILLING), "{quiet_ms:?}");
        assert!(!unmuted(&r.advance(ms(unmuted_after - 1)), BILLING), "{quiet_ms:?}");
        assert!(unmuted(&r.advance(ms(1)), BILLING), "{quiet_ms:?}");
    }
}
