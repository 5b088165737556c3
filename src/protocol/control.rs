//! The codec of `baton.control` messages (docs/protocol.md, section 2): [`decode`] turns a data
//! packet's payload into a typed message in one serde pass over its `type` tag, [`encode`]
//! writes one through the same tag. Nothing else in baton parses or builds control JSON.
//!
//! Decoding is strict about the envelope (every input is hostile until checked) and lenient
//! about members it does not know, so later minor additions stay compatible. The shared golden
//! vectors in `tests/vectors/control/` pin both directions for this codec and the Python
//! adapter's.

use std::sync::atomic::{AtomicU64, Ordering};

use baton_floor::{AgentMessage, MAX_MESSAGE_ID};
pub use baton_floor::{Envelope, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::MAX_PACKET_PAYLOAD;

/// What baton accepts on `baton.control`: `ping` from anyone, or an agent's message for the
/// floor arbiter (tagged by its own `type`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Inbound {
    /// A liveness probe, answered with [`Reply::Pong`] to its sender.
    Ping,
    /// A message for the floor arbiter.
    #[serde(untagged)]
    Agent(AgentMessage),
}

/// What baton answers by itself, without the floor arbiter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The answer to `ping`.
    Pong,
    /// A refusal; `code` is stable (`unsupported_version`), `message` is for people.
    Error { code: String, message: String },
}

impl Reply {
    /// The `error` answering a message of protocol version `v`.
    pub fn unsupported_version(v: u64) -> Reply {
        Reply::Error {
            code: "unsupported_version".into(),
            message: format!("baton speaks protocol version {PROTOCOL_VERSION}, not {v}"),
        }
    }
}

/// Why a payload was not accepted as a message baton acts on. The first two mean the payload is
/// not a control envelope at all; the others name the envelope's `id`, so a reply can cite it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("too large: {0} bytes (limit {MAX_PACKET_PAYLOAD})")]
    TooLarge(usize),
    #[error("malformed: {0}")]
    Malformed(String),
    /// A sound envelope of a version baton does not speak (answered with `error`).
    #[error("unsupported version {version}")]
    UnsupportedVersion { id: String, version: u64 },
    #[error("unknown type `{kind}`")]
    UnknownType { id: String, kind: String },
    /// A known type whose members do not fit it (a missing or ill-typed member).
    #[error("invalid `{kind}`: {reason}")]
    Invalid { id: String, kind: String, reason: String },
}

impl DecodeError {
    /// The stable name of the failure, as the shared vectors and the adapter's decoder say it.
    pub fn name(&self) -> &'static str {
        match self {
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::Invalid { .. } => "invalid",
        }
    }
}

/// Decodes a payload received on `baton.control`: a payload over [`MAX_PACKET_PAYLOAD`] is
/// refused unread; the rest is parsed once into a JSON value, whose `type` must be a string, and
/// read from it into the typed [`Envelope`]. Only a payload that fails is looked at again, to say precisely why (and to answer an unknown version even when its
/// members are not this version's).
pub fn decode(payload: &[u8]) -> Result<Envelope<Inbound>, DecodeError> {
    if payload.len() > MAX_PACKET_PAYLOAD {
        return Err(DecodeError::TooLarge(payload.len()));
    }
    let value: Value = serde_json::from_slice(payload).map_err(|_| explain(payload))?;
    // serde takes an internally tagged enum's tag by its variant index too (`"type": 4` would
    // decode as the fifth message), so the tag must be seen to be a string first.
    if !matches!(value.get("type"), Some(Value::String(_))) {
        return Err(explain(payload));
    }
    let envelope = Envelope::<Inbound>::deserialize(&value).map_err(|_| explain(payload))?;
    if envelope.id.is_empty() || envelope.id.len() > MAX_MESSAGE_ID {
        return Err(DecodeError::Malformed(format!("`id` must be 1 to {MAX_MESSAGE_ID} characters")));
    }
    if envelope.v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { id: envelope.id, version: envelope.v });
    }
    Ok(envelope)
}

/// Why `payload` did not decode: the envelope's own checks first, then the message's.
fn explain(payload: &[u8]) -> DecodeError {
    let malformed = |why: &str| DecodeError::Malformed(why.to_string());
    let value: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(e) => return DecodeError::Malformed(format!("not JSON: {e}")),
    };
    let Value::Object(body) = value else {
        return malformed("not a JSON object");
    };
    let Some(version) = body.get("v").and_then(Value::as_u64) else {
        return malformed("`v` missing or not an unsigned integer");
    };
    let kind = match string_member(&body, "type") {
        Ok(Some(kind)) if !kind.is_empty() && kind.len() <= MAX_MESSAGE_ID => kind,
        Ok(Some(_)) => return malformed("`type` must be 1 to 64 characters"),
        Ok(None) => return malformed("`type` missing"),
        Err(e) => return e,
    };
    let id = match string_member(&body, "id") {
        Ok(Some(id)) if !id.is_empty() && id.len() <= MAX_MESSAGE_ID => id,
        Ok(Some(_)) => return malformed("`id` must be 1 to 64 characters"),
        Ok(None) => return malformed("`id` missing"),
        Err(e) => return e,
    };
    if let Err(e) = string_member(&body, "re") {
        return e;
    }
    if version != PROTOCOL_VERSION {
        return DecodeError::UnsupportedVersion { id, version };
    }
    // The envelope is sound, so the message is what failed. `ping` has no members to fail on;
    // the agent messages say why themselves.
    match serde_json::from_value::<AgentMessage>(Value::Object(body)) {
        Err(e) if is_unknown_variant(&e) => DecodeError::UnknownType { id, kind },
        Err(e) => DecodeError::Invalid { id, kind, reason: e.to_string() },
        Ok(_) => DecodeError::Invalid { id, kind, reason: "does not decode".into() },
    }
}

/// Whether serde refused the `type` tag itself (its wording for an unknown enum variant, the
/// one structural fact a `serde_json::Error` does not expose; the vectors' `unknown_type` case
/// pins it).
fn is_unknown_variant(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("unknown variant")
}

fn string_member(body: &Map<String, Value>, key: &str) -> Result<Option<String>, DecodeError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::Malformed(format!("`{key}` is not a string"))),
    }
}

/// Mints message ids for what baton sends: unique within the process, which is stronger than the
/// per-room uniqueness the protocol asks for.
pub fn next_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    format!("b-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Encodes one message baton sends (a [`BatonMessage`](baton_floor::BatonMessage) or a
/// [`Reply`]) under a fresh id, answering `re` if given, with the `traceparent` of the handoff
/// it belongs to if given. `None` only for a message that does not serialise to a JSON object,
/// which none of baton's does; the caller then sends nothing.
pub fn encode<M: Serialize>(message: &M, re: Option<&str>, traceparent: Option<String>) -> Option<Vec<u8>> {
    let envelope =
        Envelope { v: PROTOCOL_VERSION, id: next_id(), re: re.map(str::to_owned), traceparent, message };
    match envelope.encode() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::error!(error = %e, "control message not encodable; not sent");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[test]
    fn ping_decodes_and_its_pong_names_it() {
        let ping = decode(br#"{"v":1,"type":"ping","id":"p-1"}"#).expect("ping");
        assert_eq!(ping.message, Inbound::Ping);
        let v = json(&encode(&Reply::Pong, Some(&ping.id), None).expect("encodes"));
        assert_eq!(v["type"], "pong");
        assert_eq!(v["re"], "p-1");
        assert_eq!(v["v"], 1);
        assert!(v["id"].as_str().is_some_and(|s| s.starts_with("b-")));
    }

    #[test]
    fn unknown_members_are_tolerated() {
        let env = decode(br#"{"v":1,"type":"ping","id":"p-2","extra":{"x":[1]}}"#).expect("ping");
        assert_eq!((env.id.as_str(), env.message), ("p-2", Inbound::Ping));
    }

    #[test]
    fn agent_messages_decode_in_one_pass() {
        let env = decode(br#"{"v":1,"type":"ready","id":"b-2","re":"x","handoff":"h-1"}"#).expect("ready");
        assert_eq!(env.re.as_deref(), Some("x"));
        assert_eq!(env.message, Inbound::Agent(AgentMessage::Ready { handoff: "h-1".into() }));
    }

    #[test]
    fn unknown_version_is_refused_naming_the_id_and_answered_with_error() {
        // Even when its members are not this version's.
        for input in [&br#"{"v":2,"type":"ping","id":"p-3"}"#[..], br#"{"v":2,"type":"ready","id":"p-3"}"#] {
            let err = decode(input).expect_err("version 2");
            assert_eq!(err, DecodeError::UnsupportedVersion { id: "p-3".into(), version: 2 });
        }
        let v = json(&encode(&Reply::unsupported_version(2), Some("p-3"), None).expect("encodes"));
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unsupported_version");
        assert_eq!(v["re"], "p-3");
    }

    #[test]
    fn malformed_inputs_are_refused_with_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"type":"ping","id":"a"}"#, "`v`"),
            (br#"{"v":-1,"type":"ping","id":"a"}"#, "`v`"),
            (br#"{"v":1,"id":"a"}"#, "`type` missing"),
            (br#"{"v":1,"type":5,"id":"a"}"#, "`type` is not a string"),
            (br#"{"v":1,"type":"ping"}"#, "`id` missing"),
            (br#"{"v":1,"type":"ping","id":""}"#, "`id` must be"),
            (br#"{"v":1,"type":"ping","id":"a","re":7}"#, "`re` is not a string"),
            (b"\xff\xfe", "not JSON"),
        ];
        for (input, want) in cases {
            match decode(input) {
                Err(e @ DecodeError::Malformed(_)) => {
                    assert!(e.to_string().contains(want), "{e} lacks {want:?}")
                }
                other => panic!("{input:?}: {other:?}"),
            }
        }
        let long_id = format!(r#"{{"v":1,"type":"ping","id":"{}"}}"#, "x".repeat(65));
        assert!(matches!(decode(long_id.as_bytes()), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn oversized_payload_is_rejected_unread() {
        let big = vec![b' '; MAX_PACKET_PAYLOAD + 1];
        assert_eq!(decode(&big), Err(DecodeError::TooLarge(MAX_PACKET_PAYLOAD + 1)));
    }

    #[test]
    fn unknown_type_and_bad_members_are_told_apart() {
        let err = decode(br#"{"v":1,"type":"dance","id":"d"}"#).expect_err("unknown");
        assert_eq!(err.to_string(), "unknown type `dance`");
        let err = decode(br#"{"v":1,"type":"handoff","id":"h","target":5}"#).expect_err("bad target");
        assert!(matches!(&err, DecodeError::Invalid { kind, .. } if kind == "handoff"), "{err:?}");
        assert!(err.to_string().contains("invalid type: integer `5`"), "{err}");
    }

    #[test]
    fn ids_are_unique() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
    }
}
