//! Every control message the arbiter builds fits one data packet (issue 11 item 2): a request
//! whose `prepare` could not be forwarded is refused at once with a precise reason, a forwarded
//! `tool_result` is cut to fit, and no accepted request leads to an unsendable message.

mod support;

use baton_floor::{
    AgentMessage, BatonMessage, Command, Event, MAX_CONTROL_MESSAGE, Policy, RefuseReason, ToolCallStatus,
    TransferId,
};
use proptest::prelude::*;
use serde_json::{Map, Value};
use support::*;

/// The envelope as the shell encodes it (`src/protocol/control.rs`, `message`): compact JSON,
/// non-ASCII as UTF-8, with the longest id baton mints (`b-` and a u64).
fn encoded(message: &BatonMessage, re: Option<&str>) -> Vec<u8> {
    let mut envelope = Map::new();
    envelope.insert("v".into(), Value::from(1));
    envelope.insert("type".into(), Value::from(message.type_name()));
    envelope.insert("id".into(), Value::from(format!("b-{}", u64::MAX)));
    if let Some(re) = re {
        envelope.insert("re".into(), Value::from(re));
    }
    let Ok(Value::Object(members)) = serde_json::to_value(message) else { panic!("an object") };
    envelope.extend(members.into_iter().filter(|(k, _)| k != "type"));
    serde_json::to_vec(&Value::Object(envelope)).expect("encodes")
}

fn refusal(cmds: &[Command]) -> Option<RefuseReason> {
    cmds.iter().find_map(|c| match c {
        Command::Send { message: BatonMessage::HandoffRefused { reason }, .. } => Some(*reason),
        _ => None,
    })
}

fn handoff(reason: &str, transfer: Option<TransferId>, bundle_follows: bool) -> AgentMessage {
    AgentMessage::Handoff {
        target: "billing".into(),
        reason: reason.into(),
        transfer,
        bundle_follows,
        quiet: false,
        quiet_ms: None,
        filler: false,
        speaking: false,
    }
}

/// The issue's input: a `handoff` of 14 990 bytes whose reason is 14 926 ASCII bytes. baton used
/// to accept it, build a 15 023-byte `prepare` that was never sent, and leave the caller on
/// filler for 6 s. Now it is refused at once, and nothing changes.
#[test]
fn a_handoff_whose_prepare_would_not_fit_is_refused_at_once() {
    let mut r = Room::with_triage_active(policy());
    let reason = "x".repeat(14_926);
    let request = format!(r#"{{"v":1,"type":"handoff","id":"a","target":"billing","reason":"{reason}"}}"#);
    assert_eq!(request.len(), 14_990);
    let message: AgentMessage = serde_json::from_str(&request).expect("a valid handoff");
    let out = r.ev(Event::Control { from: TRIAGE.into(), id: "a".into(), message });
    assert_eq!(refusal(&out), Some(RefuseReason::ReasonTooLong), "{out:#?}");
    assert_eq!(r.arb.floor_holder(), Some(TRIAGE), "the requester keeps the floor");
    assert!(r.arb.handoff().is_none());
    assert!(!out.iter().any(|c| matches!(c, Command::Filler(_) | Command::CreateDispatch { .. })));
    assert_eq!(messages_to(&out, TRIAGE).len(), 1, "only the refusal: {out:#?}");
}

/// Where the line is: with a transfer id and short agent names, a reason of 14 000 bytes (as
/// encoded JSON) is always forwarded; past the line the refusal names the reason. A transfer id
/// cannot be oversized: anything but 32 hex digits does not parse as a `handoff`.
#[test]
fn the_refusal_names_the_field_to_fix() {
    let transfer = "0c56c9f4e69c014218b81a2db375878c".parse::<TransferId>().ok();
    let mut r = Room::with_triage_active(policy());
    let out = r.ctl(TRIAGE, handoff(&"é".repeat(7_000), transfer, false));
    assert_eq!(refusal(&out), None, "14 000 bytes of reason fit: {out:#?}");

    let mut r = Room::with_triage_active(policy());
    // Escaped control characters count as sent: 6 bytes each.
    let out = r.ctl(TRIAGE, handoff(&"\u{1}".repeat(2_500), transfer, false));
    assert_eq!(refusal(&out), Some(RefuseReason::ReasonTooLong));

    let long_id = format!(
        r#"{{"v":1,"type":"handoff","id":"a","target":"billing","reason":"r","transfer":"{}"}}"#,
        "f".repeat(15_000)
    );
    assert!(serde_json::from_str::<AgentMessage>(&long_id).is_err());
}

/// A late tool result that would not fit once baton adds `source` and its own id is cut at a
/// character boundary and marked `truncated`, not dropped.
#[test]
fn a_forwarded_tool_result_is_cut_to_fit() {
    let mut r = Room::with_triage_active(policy());
    r.join(agent(BILLING, "billing", true));
    r.hello(BILLING, "billing");
    r.ctl(TRIAGE, handoff("refund", None, false));
    let output = "€".repeat(4_990);
    let out = r.ctl(
        TRIAGE,
        AgentMessage::ToolResult {
            handoff: "h-1".into(),
            call_id: "call_1".into(),
            name: "create_reservation".into(),
            status: ToolCallStatus::Finished,
            is_error: false,
            output: output.clone(),
            truncated: false,
        },
    );
    let forwarded =
        messages_to(&out, BILLING).into_iter().find(|m| m.type_name() == "tool_result").expect("forwarded");
    let BatonMessage::ToolResult { output: sent, truncated, .. } = forwarded else { unreachable!() };
    assert!(*truncated && output.starts_with(sent.as_str()) && sent.len() < output.len());
    assert!(encoded(forwarded, None).len() <= MAX_CONTROL_MESSAGE);
    assert!(forwarded.envelope_len(None) > MAX_CONTROL_MESSAGE - 4, "cut no more than needed");
}

/// Free text as an agent may send it: runs of ASCII, two-, three- and four-byte characters,
/// characters JSON escapes (quotes, backslashes, control characters).
fn text(max_base: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("a"),
        Just("λ"),
        Just("語"),
        Just("🙂"),
        Just("\""),
        Just("\\"),
        Just("\u{1}"),
        Just("\n"),
    ];
    (0..=max_base, prop::collection::vec(piece, 0..400))
        .prop_map(|(base, tail)| "a".repeat(base) + &tail.concat())
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,127}"
}

#[derive(Debug, Clone)]
enum Bundle {
    None,
    Follows,
    Id(TransferId),
}

fn bundle() -> impl Strategy<Value = Bundle> {
    prop_oneof![
        Just(Bundle::None),
        Just(Bundle::Follows),
        any::<u128>().prop_map(|n| Bundle::Id(TransferId::new(n))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the sizes of a request's fields, the agent names and the request id: either the
    /// request is refused at once (and only when its `reason` is over 14 000 encoded bytes), or
    /// every message the handoff then produces fits one data
    /// packet: acceptance, `prepare` (again after the target rejoins), tool results, activation,
    /// release.
    #[test]
    fn no_accepted_request_produces_an_unsendable_message(
        source in name(),
        target in name(),
        msg_id in "[a-zA-Z0-9-]{1,64}",
        reason in text(15_000),
        bundle in bundle(),
        output in text(15_000),
    ) {
        prop_assume!(source != target);
        let mut policy = Policy::with_agents([source.clone(), target.clone()]);
        policy.quiet_settle = std::time::Duration::ZERO;
        let mut r = Room::new(policy);
        r.ev(Event::RoomJoined {
            participants: vec![caller(), agent(TRIAGE, &source, false), agent(BILLING, &target, true)],
            token_dispatched: vec![],
        });
        r.hello(TRIAGE, &source);
        r.hello(BILLING, &target);
        let (transfer, follows) = match &bundle {
            Bundle::None => (None, false),
            Bundle::Follows => (None, true),
            Bundle::Id(id) => (Some(*id), false),
        };
        let request = AgentMessage::Handoff {
            target: target.clone(),
            reason: reason.clone(),
            transfer,
            bundle_follows: follows,
            quiet: false, quiet_ms: None, filler: false, speaking: false,
        };
        let out = r.ev(Event::Control { from: TRIAGE.into(), id: msg_id, message: request });
        let reason_bytes = serde_json::to_string(&reason).unwrap().len() - 2;
        match refusal(&out) {
            Some(RefuseReason::ReasonTooLong) => prop_assert!(reason_bytes > 14_000, "{reason_bytes}"),
            Some(other) => prop_assert!(false, "refused for {other:?}"),
            None => {
                let tid = transfer.unwrap_or(TransferId::new(0x0c56_c9f4_e69c_0142_18b8_1a2d_b375_878c));
                if transfer.is_some() || follows {
                    r.ev(Event::BundleReceived { from: TRIAGE.into(), transfer_id: tid, bytes: 10 });
                }
                r.ctl(TRIAGE, AgentMessage::ToolResult {
                    handoff: "h-1".into(),
                    call_id: "call_1".into(),
                    name: "lookup".into(),
                    status: ToolCallStatus::Finished,
                    is_error: false,
                    output: output.clone(),
                    truncated: false,
                });
                // The target drops and rejoins: prepared again, now with the bundle's id.
                r.leave(BILLING);
                r.join(agent(BILLING, &target, true));
                r.hello(BILLING, &target);
                r.quiet(TRIAGE);
                r.ev(Event::BundleDelivered { to: BILLING.into(), transfer_id: tid });
                r.ready(BILLING, "h-1");
                prop_assert_eq!(r.arb.floor_holder(), Some(BILLING));
                prop_assert!(messages_to(&r.log, BILLING).iter().any(|m| m.type_name() == "prepare"));
            }
        }
        for c in &r.log {
            if let Command::Send { message, re, .. } = c {
                let bytes = encoded(message, re.as_deref()).len();
                prop_assert!(bytes <= MAX_CONTROL_MESSAGE, "{} of {} bytes", message.type_name(), bytes);
                prop_assert!(bytes <= message.envelope_len(re.as_deref()), "the arbiter's bound holds");
            }
        }
    }
}
