//! The envelope every `baton.control` message travels in (docs/protocol.md, section 2).
//!
//! One struct for both directions: the message enum's own `type` tag and members sit beside `v`,
//! `id` and `re`, and serde writes and reads them in one pass, so no code strips or re-adds a
//! member by hand.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks (the envelope's `v`).
pub const PROTOCOL_VERSION: u64 = 1;

/// The length of a version-00 `traceparent` value (W3C Trace Context, section 3.2:
/// `00-` + 32 hex digits + `-` + 16 hex digits + `-` + 2 hex digits).
pub const TRACEPARENT_LEN: usize = 55;

/// One control message as it travels, e.g. `{"v":1,"id":"b-7","re":"a-3","type":"activate",...}`.
///
/// `M` is a message enum tagged by `type` ([`BatonMessage`](crate::BatonMessage) out,
/// [`AgentMessage`](crate::AgentMessage) in, or the shell's own); its members are flattened
/// into the envelope object. Members nobody knows are ignored when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// The protocol version ([`PROTOCOL_VERSION`]).
    pub v: u64,
    /// The sender's message id, 1 to [`MAX_MESSAGE_ID`](crate::MAX_MESSAGE_ID) bytes.
    pub id: String,
    /// The `id` of the message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<String>,
    /// The W3C Trace Context `traceparent` of the handoff or recovery this message belongs to
    /// (`00-<32 hex trace id>-<16 hex span id>-01`, [`TRACEPARENT_LEN`] bytes), so an adapter
    /// can put its own spans under baton's. baton sets it only while it exports traces; it
    /// ignores the member on what it receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The message, with its `type`.
    #[serde(flatten)]
    pub message: M,
}

impl<M: Serialize> Envelope<M> {
    /// The envelope as one data packet's payload: compact JSON, non-ASCII characters as plain
    /// UTF-8. Fails only for a message that does not serialise to a JSON object, which none of
    /// this crate's message types does.
    pub fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}
