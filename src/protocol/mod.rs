//! Baton's own wire messages, carried in LiveKit user data packets (see `docs/protocol.md`).

pub mod control;

/// Topic of JSON control messages (`docs/protocol.md`, section 2).
pub const TOPIC_CONTROL: &str = "baton.control";
/// Topic of the diagnostic echo: when enabled, baton sends the payload back to its sender.
pub const TOPIC_ECHO: &str = "baton.echo";
/// Largest payload baton sends or accepts in one data packet. LiveKit documents 15 KiB for
/// reliable packets; staying at 15 000 bytes leaves room for the packet's own framing.
pub const MAX_PACKET_PAYLOAD: usize = 15_000;
