//! The JSON envelope of `baton.control` messages: `{"v":1,"type":...,"id":...,"re":...}`.
//!
//! Parsing is strict about the envelope (every input is hostile until checked) and lenient about
//! members it does not know, so later minor additions stay compatible.

use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

use super::MAX_PACKET_PAYLOAD;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u64 = 1;
const MAX_ID_LEN: usize = 64;

/// A control message whose envelope has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub version: u64,
    pub kind: String,
    pub id: String,
    pub re: Option<String>,
    /// Every member of the object, envelope included, for the type-specific handlers.
    pub body: Map<String, Value>,
}

/// Why a payload was not accepted as a control message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("too large: {0} bytes (limit {MAX_PACKET_PAYLOAD})")]
    TooLarge(usize),
    #[error("malformed: {0}")]
    Malformed(String),
}

impl Envelope {
    /// Checks a payload received on `baton.control`. The version is *not* checked here: an
    /// unknown version is a well-formed message that deserves an `error` reply, not silence.
    pub fn parse(payload: &[u8]) -> Result<Self, ControlError> {
        if payload.len() > MAX_PACKET_PAYLOAD {
            return Err(ControlError::TooLarge(payload.len()));
        }
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| ControlError::Malformed(format!("not JSON: {e}")))?;
        let Value::Object(body) = value else {
            return Err(ControlError::Malformed("not a JSON object".into()));
        };
        let version = body
            .get("v")
            .and_then(Value::as_u64)
            .ok_or_else(|| ControlError::Malformed("`v` missing or not an unsigned integer".into()))?;
        let kind =
            string_member(&body, "type")?.ok_or_else(|| ControlError::Malformed("`type` missing".into()))?;
        if kind.is_empty() || kind.len() > MAX_ID_LEN {
            return Err(ControlError::Malformed("`type` must be 1 to 64 characters".into()));
        }
        let id = string_member(&body, "id")?.ok_or_else(|| ControlError::Malformed("`id` missing".into()))?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(ControlError::Malformed("`id` must be 1 to 64 characters".into()));
        }
        let re = string_member(&body, "re")?;
        Ok(Self { version, kind, id, re, body })
    }
}

fn string_member(body: &Map<String, Value>, key: &str) -> Result<Option<String>, ControlError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ControlError::Malformed(format!("`{key}` is not a string"))),
    }
}

/// Mints message ids for what baton sends: unique within the process, which is stronger than the
/// per-room uniqueness the protocol asks for.
pub fn next_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    format!("b-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Builds an outgoing message: the envelope plus the given type-specific members.
pub fn message(kind: &str, re: Option<&str>, members: Map<String, Value>) -> Vec<u8> {
    let mut obj = Map::new();
    obj.insert("v".into(), Value::from(PROTOCOL_VERSION));
    obj.insert("type".into(), Value::from(kind));
    obj.insert("id".into(), Value::from(next_id()));
    if let Some(re) = re {
        obj.insert("re".into(), Value::from(re));
    }
    obj.extend(members);
    // Serialising a map of JSON values cannot fail.
    serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
}

pub fn pong(ping_id: &str) -> Vec<u8> {
    message("pong", Some(ping_id), Map::new())
}

pub fn error(re: &str, code: &str, text: &str) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("code".into(), Value::from(code));
    m.insert("message".into(), Value::from(text));
    message("error", Some(re), m)
}

/// What baton does with one control payload, decided without any IO so it can be tested alone.
#[derive(Debug, PartialEq)]
pub enum Reaction {
    /// Send this payload back to the sender on `baton.control`.
    Reply(Vec<u8>),
    /// Nothing to send; the reason is logged by the caller.
    Ignore(String),
}

/// The control messages baton answers by itself. Later message types plug in here.
pub fn react(payload: &[u8]) -> Reaction {
    let env = match Envelope::parse(payload) {
        Ok(env) => env,
        Err(e) => return Reaction::Ignore(format!("rejected control message: {e}")),
    };
    if env.version != PROTOCOL_VERSION {
        return Reaction::Reply(error(
            &env.id,
            "unsupported_version",
            &format!("baton speaks protocol version {PROTOCOL_VERSION}, not {}", env.version),
        ));
    }
    match env.kind.as_str() {
        "ping" => Reaction::Reply(pong(&env.id)),
        other => Reaction::Ignore(format!("ignored control message: unknown type `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_json(r: Reaction) -> Value {
        match r {
            Reaction::Reply(bytes) => serde_json::from_slice(&bytes).expect("reply is JSON"),
            Reaction::Ignore(why) => panic!("expected a reply, got ignore: {why}"),
        }
    }

    #[test]
    fn ping_gets_pong_naming_it() {
        let v = reply_json(react(br#"{"v":1,"type":"ping","id":"p-1"}"#));
        assert_eq!(v["type"], "pong");
        assert_eq!(v["re"], "p-1");
        assert_eq!(v["v"], 1);
        assert!(v["id"].as_str().is_some_and(|s| s.starts_with("b-")));
    }

    #[test]
    fn unknown_members_are_tolerated() {
        let v = reply_json(react(br#"{"v":1,"type":"ping","id":"p-2","extra":{"x":[1]}}"#));
        assert_eq!(v["re"], "p-2");
    }

    #[test]
    fn unknown_version_gets_error_reply() {
        let v = reply_json(react(br#"{"v":2,"type":"ping","id":"p-3"}"#));
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unsupported_version");
        assert_eq!(v["re"], "p-3");
    }

    #[test]
    fn malformed_inputs_are_ignored_with_reason() {
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
            match react(input) {
                Reaction::Ignore(why) => assert!(why.contains(want), "{why:?} lacks {want:?}"),
                Reaction::Reply(r) => panic!("{input:?} got a reply {r:?}"),
            }
        }
        let long_id = format!(r#"{{"v":1,"type":"ping","id":"{}"}}"#, "x".repeat(65));
        assert!(matches!(react(long_id.as_bytes()), Reaction::Ignore(_)));
    }

    #[test]
    fn oversized_payload_is_rejected_unread() {
        let big = vec![b' '; MAX_PACKET_PAYLOAD + 1];
        assert_eq!(Envelope::parse(&big), Err(ControlError::TooLarge(MAX_PACKET_PAYLOAD + 1)));
    }

    #[test]
    fn unknown_type_is_ignored() {
        match react(br#"{"v":1,"type":"dance","id":"d"}"#) {
            Reaction::Ignore(why) => assert!(why.contains("unknown type `dance`")),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn ids_are_unique() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
    }
}
