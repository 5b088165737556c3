//! baton's logic in a room: what it does with the messages and changes the room task reports.
//! No IO here; replies go into the [`Outbox`].

use crate::protocol::{self, control};
use std::time::Instant;

use crate::room::{Incoming, Outbox, RoomHandler};

/// The per-room coordinator.
#[derive(Debug, Default)]
pub struct Coordinator {
    /// Echo `baton.echo` packets back to their sender (a diagnostic for adapters and tests).
    pub echo: bool,
}

impl RoomHandler for Coordinator {
    fn on_data(&mut self, msg: &Incoming, _now: Instant, out: &mut Outbox) {
        match msg.topic.as_str() {
            protocol::TOPIC_CONTROL => match control::react(&msg.payload) {
                control::Reaction::Reply(reply) => out.send(protocol::TOPIC_CONTROL, reply, &msg.from),
                control::Reaction::Ignore(why) => {
                    tracing::warn!(from = %msg.from, bytes = msg.payload.len(), "{why}")
                }
            },
            protocol::TOPIC_ECHO if self.echo => {
                out.send(protocol::TOPIC_ECHO, msg.payload.clone(), &msg.from);
            }
            topic => tracing::debug!(from = %msg.from, %topic, bytes = msg.payload.len(), "ignored data packet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(topic: &str, payload: &[u8]) -> Incoming {
        Incoming { from: "alice".into(), from_sid: "PA_a".into(), topic: topic.into(), payload: payload.to_vec() }
    }

    #[test]
    fn ping_is_answered_to_the_sender_only() {
        let mut c = Coordinator::default();
        let mut out = Outbox::default();
        c.on_data(&incoming("baton.control", br#"{"v":1,"type":"ping","id":"x"}"#), Instant::now(), &mut out);
        assert_eq!(out.data.len(), 1);
        let (topic, payload, to) = &out.data[0];
        assert_eq!(topic, "baton.control");
        assert_eq!(to, &vec!["alice".to_string()]);
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
        assert_eq!(v["re"], "x");
    }

    #[test]
    fn echo_only_when_enabled() {
        let mut out = Outbox::default();
        Coordinator { echo: false }.on_data(&incoming("baton.echo", b"abc"), Instant::now(), &mut out);
        assert!(out.data.is_empty());
        Coordinator { echo: true }.on_data(&incoming("baton.echo", b"abc"), Instant::now(), &mut out);
        assert_eq!(out.data[0].1, b"abc");
    }

    #[test]
    fn garbage_and_other_topics_send_nothing() {
        let mut c = Coordinator { echo: true };
        let mut out = Outbox::default();
        c.on_data(&incoming("baton.control", b"\x00garbage"), Instant::now(), &mut out);
        c.on_data(&incoming("lk.chat", b"hi"), Instant::now(), &mut out);
        assert!(out.data.is_empty());
    }
}
