//! Entry points for the fuzz targets in `fuzz/` and for `tests/no_panic.rs`, which runs the same
//! functions over the committed corpus on the stable toolchain. Hostile input must produce an
//! error or nothing, never a panic.
//!
//! `coordinator_packets` input: packets separated by 0xff. A packet's first byte picks the
//! sender (two configured agents and the caller), what it does (a control message, a transfer
//! frame, an unrelated topic, or leaving/reconnecting) and how much time passes; the rest is the
//! payload.

use std::time::{Duration, Instant};

use livekit_protocol as proto;

use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::protocol::control;
use crate::room::data::Reliable;
use crate::room::{Incoming, Outbox, RoomHandler, Roster};

/// The `baton.control` decoder (envelope and typed message).
pub fn control_envelope(data: &[u8]) {
    let _ = control::decode(data);
}

/// LiveKit data packets as baton receives them; twice, so the duplicate checks run too.
pub fn data_packet(data: &[u8]) {
    let mut r = Reliable::new();
    let _ = r.decode(data);
    let _ = r.decode(data);
}

fn info(identity: &str, agent: Option<&str>, version: u32) -> proto::ParticipantInfo {
    use proto::participant_info::Kind;
    let kind = if agent.is_some() { Kind::Agent } else { Kind::Standard };
    proto::ParticipantInfo { version, ..crate::room::roster::announced(identity, kind, agent) }
}

/// Drives a [`Coordinator`] with `data` (packets separated by 0xff; see the module docs).
/// Returns how many packets baton sent, so a test can tell the input reached its logic.
pub fn coordinator_packets(data: &[u8]) -> usize {
    let t0 = Instant::now();
    let policy = baton_floor::Policy::with_agents(["triage", "billing"]);
    let cfg = CoordinatorConfig { room: "fuzz".into(), policy, api: None, echo: true, trace_context: true };
    let Ok(mut c) = Coordinator::new(cfg, t0) else { return 0 };
    let mut sent = 0;
    let people = [("agent-1", Some("triage")), ("agent-2", Some("billing")), ("caller", None)];
    let infos: Vec<_> = people.iter().map(|(id, a)| info(id, *a, 1)).collect();
    let (mut roster, changes) = Roster::new("PA_baton", &infos);
    let mut out = Outbox::default();
    for ch in &changes {
        c.on_change(ch, &roster, t0, &mut out);
    }
    c.on_connected(&roster, t0, &mut out);
    let mut now = t0;
    let mut version = 1;
    for pkt in data.split(|&b| b == 0xff) {
        let Some((&head, payload)) = pkt.split_first() else { continue };
        now += Duration::from_millis(u64::from(head >> 4) * 40);
        let (from, agent) = people[usize::from(head & 0x3) % 3];
        match (head >> 2) & 0x3 {
            3 => {
                // The sender leaves, or comes back with a bumped version (a reconnect).
                version += 1;
                let mut i = info(from, agent, version);
                if head & 0x80 != 0 {
                    i.state = proto::participant_info::State::Disconnected as i32;
                }
                for ch in roster.apply(&[i]) {
                    c.on_change(&ch, &roster, now, &mut out);
                }
            }
            topic => {
                let topic = ["baton.control", "baton.xfer", "lk.chat"][usize::from(topic)];
                let msg = Incoming {
                    from: from.into(),
                    from_sid: format!("PA_{from}"),
                    topic: topic.into(),
                    payload: payload.to_vec(),
                };
                c.on_data(&msg, now, &mut out);
            }
        }
        if c.poll_timeout().is_some_and(|t| t <= now) {
            c.on_timeout(now, &mut out);
        }
        let done = std::mem::take(&mut out);
        sent += done.data.len() + done.bulk.len();
    }
    sent
}

/// Checkpoint payloads into one room's [`Checkpoints`](crate::recovery::checkpoint::Checkpoints),
/// separated by 0xff. A payload's first byte picks the sender (two `triage` identities, one
/// `billing`, the caller) and, when its high bit is set, declares that sender stale first; the
/// rest is the payload. Every merged state then builds its recovery bundle, which must be JSON.
/// Returns how many checkpoints were applied, so a test can tell the input reached the merge.
pub fn checkpoint(data: &[u8]) -> usize {
    use crate::recovery::checkpoint::{Checkpoints, Limits};
    let mut room = Checkpoints::new(Limits { max_checkpoint_size: 64 << 10, max_state_bytes: 256 << 10 });
    let senders = [
        ("agent-1", Some("triage")),
        ("agent-2", Some("triage")),
        ("agent-3", Some("billing")),
        ("caller", None),
    ];
    let mut applied = 0;
    for packet in data.split(|&b| b == 0xff) {
        let Some((&first, payload)) = packet.split_first() else { continue };
        let (identity, agent) = senders[usize::from(first & 3)];
        if first & 0x80 != 0 {
            room.declare_stale(identity);
        }
        if room.apply(identity, agent, payload).is_ok() {
            applied += 1;
        }
    }
    for agent in ["triage", "billing"] {
        if let Some(m) = room.get(agent) {
            let bundle = m.recovery_bundle("recovery after fuzz", None, 1.5);
            assert!(
                serde_json::from_slice::<serde_json::Value>(&bundle).is_ok(),
                "recovery bundle is not JSON"
            );
        }
    }
    applied
}
