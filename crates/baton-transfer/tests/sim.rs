//! Property tests in virtual time: two endpoints over a simulated lossy link.
//!
//! The link loses, duplicates, delays (and so reorders) and optionally corrupts packets, and
//! suffers reconnects: everything in flight is dropped, the link stays down for a while,
//! then both sides are told (`participant_reconnected`) and must resume. The clock is an arbitrary
//! base `Instant` plus offsets; nothing sleeps.

use std::time::{Duration, Instant};

use baton_transfer::{
    Endpoint, EndpointConfig, ErrorCode, Event, Frame, Output, ReceiverConfig, ReceiversConfig, SenderConfig,
    TransferId,
};
use dice::Rng;
use proptest::prelude::*;
use proptest::test_runner::TestRng;

/// Deterministic per-case randomness for link decisions.
#[allow(deprecated)]
mod dice {
    pub use proptest::prelude::RngCore;
    pub trait Rng {
        fn unit(&mut self) -> f64;
        fn below(&mut self, n: u64) -> u64;
    }
    impl<T: RngCore> Rng for T {
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next_u64() % n }
        }
    }
}

#[derive(Debug, Clone)]
struct LinkParams {
    loss: f64,
    dup: f64,
    corrupt: f64,
    base_delay_ms: u64,
    jitter_ms: u64,
    /// (start offset ms, down duration ms)
    outages: Vec<(u64, u64)>,
}

struct Packet {
    at: Instant,
    seq: u64,
    to_b: bool,
    bytes: Vec<u8>,
}

struct Outcome {
    sender: Vec<(Duration, Event)>,
    receiver: Vec<(Duration, Event)>,
    steps: usize,
    /// An OPEN was corrupted in flight. Its meta string is outside the SHA-256 (see
    /// `docs/protocol.md`, "Integrity"), so a flipped bit there can reach the receiver.
    open_corrupted: bool,
}

const A: &str = "agent-a";
const B: &str = "agent-b";

#[allow(clippy::too_many_arguments)]
fn run(
    payload: &[u8],
    meta: &str,
    scfg: SenderConfig,
    rcfg: ReceiverConfig,
    link: &LinkParams,
    seed: [u8; 32],
) -> Outcome {
    let t0 = Instant::now();
    let mut rng = TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed);
    let mut a = Endpoint::new(EndpointConfig { sender: scfg, receivers: ReceiversConfig::default() });
    let mut b = Endpoint::new(EndpointConfig {
        sender: SenderConfig::default(),
        receivers: ReceiversConfig { transfer: rcfg, ..Default::default() },
    });
    let mut flight: Vec<Packet> = Vec::new();
    let mut seq = 0u64;
    let mut down_until: Option<Instant> = None;
    let mut outages: Vec<(Instant, Instant)> = link
        .outages
        .iter()
        .map(|&(s, d)| {
            let s = t0 + Duration::from_millis(s);
            (s, s + Duration::from_millis(d))
        })
        .collect();
    outages.sort();
    let mut out = Outcome { sender: vec![], receiver: vec![], steps: 0, open_corrupted: false };
    a.send(B, TransferId::new(0xfeed), payload, meta, t0).expect("send accepted");
    let mut now = t0;
    loop {
        out.steps += 1;
        assert!(out.steps < 500_000, "simulation does not terminate");
        // Drain both endpoints into the link.
        for (ep, to_b) in [(&mut a, true), (&mut b, false)] {
            while let Some(o) = ep.poll_output() {
                match o {
                    Output::Transmit { to, payload } => {
                        assert_eq!(to, if to_b { B } else { A }, "addressed to the other end only");
                        assert!(payload.len() <= 15_000, "frame fits one packet");
                        if down_until.is_some() || rng.unit() < link.loss {
                            continue;
                        }
                        let copies = if rng.unit() < link.dup { 2 } else { 1 };
                        for _ in 0..copies {
                            let mut bytes = payload.clone();
                            if rng.unit() < link.corrupt && !bytes.is_empty() {
                                let i = rng.below(bytes.len() as u64) as usize;
                                bytes[i] ^= 1 << rng.below(8);
                                out.open_corrupted |=
                                    matches!(Frame::decode(&payload), Ok(Frame::Open { .. }));
                            }
                            let delay = link.base_delay_ms + rng.below(link.jitter_ms + 1);
                            seq += 1;
                            flight.push(Packet { at: now + Duration::from_millis(delay), seq, to_b, bytes });
                        }
                    }
                    Output::Event(e) => {
                        if to_b {
                            out.sender.push((now - t0, e));
                        } else {
                            out.receiver.push((now - t0, e));
                        }
                    }
                }
            }
        }
        let sender_done =
            out.sender.iter().any(|(_, e)| matches!(e, Event::Sent { .. } | Event::SendFailed { .. }));
        if sender_done && a.poll_timeout().is_none() && b.poll_timeout().is_none() {
            break;
        }
        // Next instant: a packet arrival, a timer, or an outage edge.
        let next_pkt = flight.iter().map(|p| (p.at, p.seq)).min();
        let mut next = [
            next_pkt.map(|p| p.0),
            a.poll_timeout(),
            b.poll_timeout(),
            down_until,
            outages.first().map(|o| o.0),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(t) = next.take() else { break };
        now = now.max(t);
        if let Some((s, e)) = outages.first().copied()
            && s <= now
        {
            // The connection breaks: whatever is in flight is gone. Overlapping outages merge.
            outages.remove(0);
            flight.clear();
            down_until = Some(down_until.map_or(e, |d| d.max(e)));
            continue;
        }
        if let Some(d) = down_until
            && d <= now
        {
            down_until = None;
            a.participant_reconnected(B, now);
            b.participant_reconnected(A, now);
            continue;
        }
        if let Some((at, s)) = next_pkt
            && at <= now
        {
            let i = flight.iter().position(|p| p.seq == s).expect("present");
            let p = flight.swap_remove(i);
            if p.to_b {
                b.handle_packet(A, &p.bytes, now);
            } else {
                a.handle_packet(B, &p.bytes, now);
            }
            continue;
        }
        a.handle_timeout(now);
        b.handle_timeout(now);
    }
    out
}

fn link_strategy(corrupt: bool) -> impl Strategy<Value = LinkParams> {
    (
        0.0..0.3f64,
        0.0..0.2f64,
        1u64..40,
        0u64..80,
        proptest::collection::vec((0u64..1_500, 0u64..3_000), 0..3),
        if corrupt { 0.0..0.05f64 } else { 0.0..f64::MIN_POSITIVE },
    )
        .prop_map(|(loss, dup, base_delay_ms, jitter_ms, outages, corrupt)| LinkParams {
            loss,
            dup,
            corrupt,
            base_delay_ms,
            jitter_ms,
            outages,
        })
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40_000),
        // Compressible payloads exercise the deflate path.
        (0usize..60_000, any::<u8>())
            .prop_map(|(n, b)| (0..n).map(|i| b.wrapping_add((i / 97) as u8)).collect()),
    ]
}

fn configs() -> impl Strategy<Value = (SenderConfig, ReceiverConfig)> {
    (256u32..4096, 1u32..48, any::<bool>(), 1u32..16).prop_map(|(cs, w, z, every)| {
        (
            SenderConfig { chunk_size: cs, window: w, compress: z, ..Default::default() },
            ReceiverConfig { window: w + 8, ack_every: every, ..Default::default() },
        )
    })
}

fn check_common(o: &Outcome, payload: &[u8], meta: &str, deadline: Duration) {
    let received: Vec<_> = o
        .receiver
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Received { payload: p, meta: m, from, id } => Some((p, m, from, id)),
            _ => None,
        })
        .collect();
    assert!(received.len() <= 1, "received more than once");
    if let Some((p, m, from, id)) = received.first() {
        assert!(p.as_slice() == payload, "received payload differs");
        if !o.open_corrupted {
            assert_eq!(m.as_str(), meta);
        }
        assert_eq!(from.as_str(), A);
        assert_eq!(**id, TransferId::new(0xfeed));
    }
    let finals: Vec<_> =
        o.sender.iter().filter(|(_, e)| matches!(e, Event::Sent { .. } | Event::SendFailed { .. })).collect();
    assert_eq!(finals.len(), 1, "sender reports exactly one outcome");
    let (t, e) = finals[0];
    assert!(*t <= deadline, "outcome after the deadline: {t:?}");
    if matches!(e, Event::Sent { .. }) {
        assert_eq!(received.len(), 1, "confirmed but not received");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// Loss, duplication, reordering and reconnects never lose or corrupt the payload; below
    /// 15 % loss a transfer of up to 8 windows completes; otherwise it completes or reports
    /// `timed_out`.
    #[test]
    fn lossy_link_with_reconnects_completes_byte_exact(
        payload in payload_strategy(),
        (scfg, rcfg) in configs(),
        link in link_strategy(false),
        seed in any::<[u8; 32]>(),
    ) {
        let meta = "{\"content_type\":\"application/json\",\"purpose\":\"handoff\"}";
        let deadline = scfg.deadline;
        let (scfg_chunk, scfg_window) = (scfg.chunk_size as usize, scfg.window as usize);
        let o = run(&payload, meta, scfg, rcfg, &link, seed);
        check_common(&o, &payload, meta, deadline);
        let sent = o.sender.iter().any(|(_, e)| matches!(e, Event::Sent { .. }));
        // A chunk lost at the head of the window stalls the sender for a whole RTO (>= 1 s,
        // doubling while probes are lost too), so the time a lossy transfer needs grows with
        // the number of windows it spans: 235 windows (256-byte chunks, window 1, 60 kB) at
        // 14.9 % loss take more than the 60 s deadline (CI, 2026-12-01). Up to 8 windows, 1,017
        // measured cases below 15 % loss all finished within 27 s. With the defaults (14 KiB
        // chunks, window 32) a 3 MiB bundle is 7 windows.
        let windows = payload.len().div_ceil(scfg_chunk).max(1).div_ceil(scfg_window);
        if link.loss < 0.15 && windows <= 8 {
            // Each retransmission round fails with probability 1 - (1 - loss)^2 (chunk or its
            // confirmation lost); below 15 % loss, ~9 rounds in 60 s make failure < 1e-5.
            prop_assert!(sent, "did not complete: {:?} link {:?}", o.sender.last().map(|x| &x.1), link);
        } else if !sent {
            // At up to 30 % loss, or over many windows, an unlucky run (about 0.2 %, measured) may exhaust the
            // deadline; then it must say so.
            let timed_out = o.sender.iter().any(|(_, e)| matches!(e,
                Event::SendFailed { error, .. } if error.code == ErrorCode::TimedOut));
            prop_assert!(timed_out, "failed without timed_out: {:?}", o.sender.last());
        }
    }

    /// With corruption as well, a payload is never received wrong and the sender always gets
    /// one clear outcome within its deadline.
    #[test]
    fn corruption_never_yields_wrong_bytes(
        payload in payload_strategy(),
        (scfg, rcfg) in configs(),
        link in link_strategy(true),
        seed in any::<[u8; 32]>(),
    ) {
        let deadline = scfg.deadline;
        let o = run(&payload, "{}", scfg, rcfg, &link, seed);
        check_common(&o, &payload, "{}", deadline);
        for (_, e) in &o.sender {
            // A code reported by the other end came in an ERROR frame, which the link may have
            // corrupted too (a flipped bit makes any number); only local verdicts are checked.
            if let Event::SendFailed { error, .. } = e && !error.remote {
                prop_assert!(matches!(error.code,
                    ErrorCode::TimedOut | ErrorCode::HashMismatch | ErrorCode::ProtocolViolation
                    | ErrorCode::DecompressionFailed | ErrorCode::BadFrame | ErrorCode::TooLarge
                    // A corrupted OPEN can declare a size over the receiver's buffer budget.
                    | ErrorCode::BufferFull
                    | ErrorCode::ConflictingOpen | ErrorCode::UnknownTransfer),
                    "unexpected code {}", error.code);
            }
        }
    }
}

/// A receiver that vanishes makes the sender fail with `timed_out` exactly at its deadline.
#[test]
fn dead_receiver_times_out_at_deadline() {
    let link =
        LinkParams { loss: 1.0, dup: 0.0, corrupt: 0.0, base_delay_ms: 1, jitter_ms: 0, outages: vec![] };
    let scfg = SenderConfig { deadline: Duration::from_secs(20), ..Default::default() };
    let o = run(&[1u8; 50_000], "", scfg, ReceiverConfig::default(), &link, [7; 32]);
    let (t, e) = o.sender.last().expect("an outcome");
    match e {
        Event::SendFailed { error, .. } => assert_eq!(error.code, ErrorCode::TimedOut),
        other => panic!("{other:?}"),
    }
    assert_eq!(*t, Duration::from_secs(20));
    assert!(o.receiver.is_empty());
}

/// Resume does not restart: after an outage mid-transfer, chunks the receiver already held
/// are not sent again.
#[test]
fn resume_continues_from_acknowledged() {
    let payload: Vec<u8> = (0..200 * 1024u32).map(|i| (i * 7) as u8).collect();
    let t0 = Instant::now();
    let cfg = EndpointConfig {
        sender: SenderConfig { chunk_size: 1024, window: 16, ..Default::default() },
        ..Default::default()
    };
    let mut a = Endpoint::new(cfg.clone());
    let mut b = Endpoint::new(cfg);
    a.send(B, TransferId::new(1), &payload, "", t0).unwrap();
    let mut data_frames = 0usize;
    let mut now = t0;
    let mut received = None;
    let mut sent = false;
    // Exchange in lock step until about half has been acknowledged, then cut the link.
    let mut phase = 0;
    let mut lost = 0;
    while !sent {
        now += Duration::from_millis(5);
        let mut to_b = vec![];
        while let Some(o) = a.poll_output() {
            match o {
                Output::Transmit { payload, .. } => to_b.push(payload),
                Output::Event(Event::Sent { .. }) => sent = true,
                Output::Event(e) => panic!("{e:?}"),
            }
        }
        let mut to_a = vec![];
        while let Some(o) = b.poll_output() {
            match o {
                Output::Transmit { payload, .. } => to_a.push(payload),
                Output::Event(Event::Received { payload, .. }) => received = Some(payload),
                Output::Event(e) => panic!("{e:?}"),
            }
        }
        let lost_now = to_b.iter().filter(|p| p[2] == 2).count();
        if phase == 0 && b.receivers().active() == 1 && data_frames >= 100 && lost_now > 0 {
            // Outage: this round's packets in both directions are lost.
            phase = 1;
            lost = lost_now;
            a.participant_reconnected(B, now);
            b.participant_reconnected(A, now);
            continue;
        }
        for p in to_b {
            if p[2] == 2 {
                data_frames += 1;
            }
            b.handle_packet(A, &p, now);
        }
        for p in to_a {
            a.handle_packet(B, &p, now);
        }
        a.handle_timeout(now);
        b.handle_timeout(now);
        assert!(now - t0 < Duration::from_secs(30));
    }
    assert_eq!(received.as_deref(), Some(payload.as_slice()));
    assert!(lost > 0, "the outage must have dropped DATA");
    // DATA frames that arrived: 200 chunks, the lost ones resent once, little else (a restart
    // would be 300 or more).
    assert!(
        (200..=208).contains(&data_frames),
        "{data_frames} DATA frames arrived for 200 chunks ({lost} lost)"
    );
    // And the outage cost no retransmission timeout (1 s): the resume path did the work.
    assert!(now - t0 < Duration::from_secs(1), "took {:?}", now - t0);
}
