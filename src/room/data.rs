//! LiveKit data packets on baton's side: encoding what we send, decoding and filtering what we
//! receive, and the bookkeeping that lets reliable packets survive a resume.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use prost::Message;

use crate::protocol::MAX_PACKET_PAYLOAD;

/// A user packet received from another participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The sender as stamped by the server: the only identity we trust.
    pub from: String,
    pub from_sid: String,
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("payload of {0} bytes exceeds the {MAX_PACKET_PAYLOAD}-byte packet limit")]
    TooLarge(usize),
    #[error("undecodable data packet: {0}")]
    Decode(String),
}

/// What a received data-channel message turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    User(Incoming),
    /// A replay of a reliable packet we already handled (after a resume).
    Duplicate,
    /// The server's active-speaker update (sent on the data channel): participant sid and
    /// whether it is speaking now.
    Speakers(Vec<(String, bool)>),
    /// Not a user packet (RPC, streams, transcriptions...): not ours to handle.
    Other,
}

/// How long sent reliable packets are kept for replay after a resume. The server keeps its own
/// copies for 2 s; ours only need to cover the time the resume takes.
const RETRY_KEEP: Duration = Duration::from_secs(30);
/// Upper bound on the replay buffer, so a long outage cannot grow it without limit.
const RETRY_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Reliable-packet sequencing and the replay buffer for one session.
#[derive(Debug, Default)]
pub struct Reliable {
    next_seq: u32,
    sent: VecDeque<(u32, Instant, Vec<u8>)>,
    sent_bytes: usize,
    /// Last sequence seen per sender sid, to drop server replays we already handled.
    last_seen: HashMap<String, u32>,
}

impl Reliable {
    pub fn new() -> Self {
        Self { next_seq: 1, ..Default::default() }
    }

    /// Encodes a reliable user packet for `destinations` (never empty: baton does not broadcast)
    /// and remembers it for replay.
    pub fn encode(
        &mut self,
        topic: &str,
        payload: &[u8],
        destinations: &[String],
        now: Instant,
    ) -> Result<Vec<u8>, DataError> {
        if payload.len() > MAX_PACKET_PAYLOAD {
            return Err(DataError::TooLarge(payload.len()));
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let packet = proto::DataPacket {
            destination_identities: destinations.to_vec(),
            sequence: seq,
            value: Some(proto::data_packet::Value::User(proto::UserPacket {
                payload: payload.to_vec(),
                topic: Some(topic.to_string()),
                ..Default::default()
            })),
            ..Default::default()
        };
        let bytes = packet.encode_to_vec();
        self.remember(seq, now, bytes.clone());
        Ok(bytes)
    }

    fn remember(&mut self, seq: u32, now: Instant, bytes: Vec<u8>) {
        self.sent_bytes += bytes.len();
        self.sent.push_back((seq, now, bytes));
        while let Some((_, at, b)) = self.sent.front() {
            let expired = now.duration_since(*at) > RETRY_KEEP;
            if !expired && self.sent_bytes <= RETRY_MAX_BYTES {
                break;
            }
            self.sent_bytes -= b.len();
            self.sent.pop_front();
        }
    }

    /// Packets the server did not get before the connection dropped, in order, given the
    /// `last_message_seq` it reported on resume.
    pub fn replay_after(&self, last_message_seq: u32) -> Vec<Vec<u8>> {
        self.sent.iter().filter(|(s, _, _)| *s > last_message_seq).map(|(_, _, b)| b.clone()).collect()
    }

    /// What we last received from each sender, for `SyncState.datachannel_receive_states`.
    pub fn receive_states(&self) -> Vec<proto::DataChannelReceiveState> {
        self.last_seen
            .iter()
            .map(|(sid, seq)| proto::DataChannelReceiveState { publisher_sid: sid.clone(), last_seq: *seq })
            .collect()
    }

    /// Decodes one message from a data channel.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Received, DataError> {
        let packet = proto::DataPacket::decode(bytes).map_err(|e| DataError::Decode(e.to_string()))?;
        let user = match packet.value {
            Some(proto::data_packet::Value::User(user)) => user,
            // Deprecated in the protocol, but servers have sent speaker updates this way.
            #[allow(deprecated)]
            Some(proto::data_packet::Value::Speaker(update)) => {
                return Ok(Received::Speakers(
                    update.speakers.into_iter().map(|s| (s.sid, s.active)).collect(),
                ));
            }
            _ => return Ok(Received::Other),
        };
        if packet.sequence != 0 && !packet.participant_sid.is_empty() {
            let last = self.last_seen.entry(packet.participant_sid.clone()).or_insert(0);
            if packet.sequence <= *last {
                return Ok(Received::Duplicate);
            }
            *last = packet.sequence;
        }
        Ok(Received::User(Incoming {
            from: packet.participant_identity,
            from_sid: packet.participant_sid,
            topic: user.topic.unwrap_or_default(),
            payload: user.payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_received(bytes: &[u8], from: &str, sid: &str) -> Vec<u8> {
        let mut p = proto::DataPacket::decode(bytes).expect("decode");
        p.participant_identity = from.into();
        p.participant_sid = sid.into();
        p.encode_to_vec()
    }

    #[test]
    fn encode_decode_round_trip_is_byte_exact() {
        let now = Instant::now();
        let mut tx = Reliable::new();
        let payload: Vec<u8> = (0..MAX_PACKET_PAYLOAD).map(|i| (i * 7) as u8).collect();
        let bytes = tx.encode("t", &payload, &["x".into()], now).expect("encode");
        let mut rx = Reliable::new();
        match rx.decode(&as_received(&bytes, "a", "PA_a")).expect("decode") {
            Received::User(m) => {
                assert_eq!(m.payload, payload);
                assert_eq!(m.topic, "t");
                assert_eq!(m.from, "a");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_payload_is_refused() {
        let mut tx = Reliable::new();
        let big = vec![0; MAX_PACKET_PAYLOAD + 1];
        assert_eq!(
            tx.encode("t", &big, &["x".into()], Instant::now()),
            Err(DataError::TooLarge(MAX_PACKET_PAYLOAD + 1))
        );
    }

    #[test]
    fn sequences_increase_and_replay_follows_last_seq() {
        let now = Instant::now();
        let mut tx = Reliable::new();
        for i in 0..5u8 {
            tx.encode("t", &[i], &["x".into()], now).expect("encode");
        }
        let replay = tx.replay_after(3);
        assert_eq!(replay.len(), 2);
        let seqs: Vec<u32> =
            replay.iter().map(|b| proto::DataPacket::decode(&b[..]).expect("decode").sequence).collect();
        assert_eq!(seqs, vec![4, 5]);
    }

    #[test]
    fn replay_buffer_forgets_old_packets() {
        let t0 = Instant::now();
        let mut tx = Reliable::new();
        tx.encode("t", b"old", &["x".into()], t0).expect("encode");
        tx.encode("t", b"new", &["x".into()], t0 + RETRY_KEEP + Duration::from_secs(1)).expect("encode");
        assert_eq!(tx.replay_after(0).len(), 1);
    }

    #[test]
    fn duplicates_from_server_replay_are_dropped() {
        let now = Instant::now();
        let mut tx = Reliable::new();
        let a = as_received(&tx.encode("t", b"1", &[], now).expect("e"), "a", "PA_a");
        let b = as_received(&tx.encode("t", b"2", &[], now).expect("e"), "a", "PA_a");
        let mut rx = Reliable::new();
        assert!(matches!(rx.decode(&a), Ok(Received::User(_))));
        assert!(matches!(rx.decode(&b), Ok(Received::User(_))));
        assert_eq!(rx.decode(&a), Ok(Received::Duplicate));
        assert_eq!(rx.receive_states()[0].last_seq, 2);
    }

    #[test]
    #[allow(deprecated)]
    fn speaker_updates_are_reported() {
        let packet = proto::DataPacket {
            value: Some(proto::data_packet::Value::Speaker(proto::ActiveSpeakerUpdate {
                speakers: vec![proto::SpeakerInfo { sid: "PA_x".into(), level: 0.5, active: true }],
            })),
            ..Default::default()
        };
        let mut rx = Reliable::new();
        assert_eq!(rx.decode(&packet.encode_to_vec()), Ok(Received::Speakers(vec![("PA_x".into(), true)])));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut rx = Reliable::new();
        assert!(matches!(rx.decode(&[0xff, 0xff, 0xff]), Err(DataError::Decode(_))));
        assert_eq!(rx.decode(&[]), Ok(Received::Other));
    }
}
