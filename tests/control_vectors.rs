//! The shared control-message vectors (`tests/vectors/control/cases.json`, format in the README
//! there) against baton's codec, `lk_baton::protocol::control`. The Python adapter's test reads
//! the same file.

use std::path::PathBuf;

use baton_floor::{BatonMessage, Envelope};
use lk_baton::protocol::control::{self, DecodeError, Inbound, Reply};
use serde_json::{Value, json};

fn cases() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/control/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("cases.json is JSON")
}

fn payload(case: &Value) -> Vec<u8> {
    let mut bytes = match (case["text"].as_str(), case["hex"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(hex)) => {
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
        }
        _ => panic!("case without text or hex: {case}"),
    };
    if let Some(pad) = case["pad_to"].as_u64() {
        bytes.resize(pad as usize, b' ');
    }
    bytes
}

/// A decoded message as the vectors write it: the `type` tag and every member.
fn as_json(message: &Inbound) -> Value {
    match message {
        Inbound::Ping => json!({"type": "ping"}),
        Inbound::Agent(m) => serde_json::to_value(m).expect("serialises"),
    }
}

#[test]
fn decode_cases() {
    let cases = cases();
    let list = cases["decode"].as_array().expect("decode cases");
    assert!(list.len() >= 30, "the file lost cases: {}", list.len());
    for case in list {
        let name = case["name"].as_str().expect("name");
        let got = control::decode(&payload(case));
        let want_envelope = case["envelope"].as_str().expect("envelope");
        match (&got, want_envelope, case["baton"].get("error").and_then(Value::as_str)) {
            (Ok(env), "ok", None) => {
                let want = &case["baton"];
                assert_eq!(env.id, want["id"].as_str().expect("id"), "{name}");
                assert_eq!(env.re.as_deref(), want["re"].as_str(), "{name}");
                assert_eq!(as_json(&env.message), want["message"], "{name}");
            }
            (Err(e), "ok", Some(error)) => assert_eq!(e.name(), error, "{name}: {e}"),
            (Err(e), envelope, None) => assert_eq!(e.name(), envelope, "{name}: {e}"),
            (got, _, _) => panic!("{name}: got {got:?}, want {case}"),
        }
        if let Err(DecodeError::UnsupportedVersion { id, .. }) = &got {
            assert!(!id.is_empty(), "{name}: the error reply needs the id");
        }
    }
}

#[test]
fn encode_cases() {
    let cases = cases();
    let list = cases["encode"].as_array().expect("encode cases");
    let mut by_baton = 0;
    for case in list {
        let name = case["name"].as_str().expect("name");
        let text = case["text"].as_str().expect("text");
        let id = case["id"].as_str().expect("id").to_string();
        let re = case["re"].as_str().map(str::to_string);
        let traceparent = case["traceparent"].as_str().map(str::to_string);
        match case["by"].as_str() {
            Some("baton") => {
                by_baton += 1;
                let message = case["message"].clone();
                let bytes = match serde_json::from_value::<BatonMessage>(message.clone()) {
                    Ok(m) => Envelope { v: 1, id, re, traceparent, message: m }.encode(),
                    Err(_) => {
                        let reply: Reply = serde_json::from_value(message).expect("a baton message or reply");
                        Envelope { v: 1, id, re, traceparent, message: reply }.encode()
                    }
                };
                assert_eq!(String::from_utf8(bytes.expect("encodes")).expect("UTF-8"), text, "{name}");
            }
            Some("agent") => {
                // baton reads what the adapter writes, into the typed message.
                let env = control::decode(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!((env.id, env.re), (id, re), "{name}");
                let got = as_json(&env.message);
                let want = case["message"].as_object().expect("message");
                for (member, value) in want {
                    assert_eq!(&got[member], value, "{name}: member {member}");
                }
            }
            other => panic!("{name}: by {other:?}"),
        }
    }
    assert!(by_baton >= 10, "{by_baton}");
}

#[test]
fn encode_mints_fresh_ids_through_the_same_envelope() {
    let a = control::encode(&Reply::Pong, Some("p-1"), None).expect("encodes");
    let b = control::encode(&Reply::Pong, Some("p-1"), None).expect("encodes");
    assert_ne!(a, b, "each message gets its own id");
    let env: Envelope<Value> = serde_json::from_slice(&a).expect("an envelope");
    assert_eq!(env.message["type"], "pong");
    assert_eq!(env.re.as_deref(), Some("p-1"));
}
