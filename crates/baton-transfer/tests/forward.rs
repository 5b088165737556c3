//! Cut-through relay in virtual time: A sends to R, and R forwards to B while the bytes are
//! still arriving (`Endpoint::forward`), over two lossy, duplicating, reordering links with
//! reconnects on the R–B side. B must end with A's exact bytes or a clear failure, never
//! with anything else, and R's own copy must be whole too.

use std::time::{Duration, Instant};

use baton_transfer::{Endpoint, EndpointConfig, ErrorCode, Event, Frame, Output, SenderConfig, TransferId};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};

const A: &str = "agent-a";
const R: &str = "baton";
const B: &str = "agent-b";
const UP: TransferId = TransferId::new(0xa1);
const DOWN: TransferId = TransferId::new(0xb2);

#[derive(Debug, Clone)]
struct Link {
    loss: f64,
    dup: f64,
    delay_ms: u64,
    jitter_ms: u64,
}

struct Packet {
    at: Instant,
    seq: u64,
    from: &'static str,
    to: &'static str,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Seen {
    /// Events of each endpoint, in order.
    a: Vec<Event>,
    r: Vec<Event>,
    b: Vec<Event>,
    /// When R started forwarding: chunks it held then (None: it forwarded from its copy after
    /// the whole bundle had arrived, as the relay does for a stored bundle).
    forwarded_at_chunk: Option<Option<usize>>,
}

struct Net {
    now: Instant,
    eps: [(&'static str, Endpoint); 3],
    flight: Vec<Packet>,
    seq: u64,
    rng: TestRng,
    /// Packets from A that reached R.
    up_received: usize,
    /// Corrupt one byte of the n-th DATA frame from A (deterministic upstream corruption).
    corrupt_data: Option<usize>,
    data_seen: usize,
}

fn unit(rng: &mut TestRng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl Net {
    fn new(cfg: EndpointConfig, seed: [u8; 32]) -> Net {
        Net {
            now: Instant::now(),
            eps: [A, R, B].map(|n| (n, Endpoint::new(cfg.clone()))),
            flight: Vec::new(),
            seq: 0,
            rng: TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
            up_received: 0,
            corrupt_data: None,
            data_seen: 0,
        }
    }

    fn ep(&mut self, name: &str) -> &mut Endpoint {
        &mut self.eps.iter_mut().find(|(n, _)| *n == name).expect("known endpoint").1
    }

    /// Moves every endpoint's output onto the links (or into `seen`).
    fn drain(&mut self, up: &Link, down: &Link, down_broken: bool, seen: &mut Seen) {
        for i in 0..3 {
            let from = self.eps[i].0;
            while let Some(o) = self.eps[i].1.poll_output() {
                match o {
                    Output::Transmit { to, mut payload } => {
                        let to: &'static str =
                            [A, R, B].into_iter().find(|n| *n == to).expect("addressed to a participant");
                        let downside = from == B || to == B;
                        assert!(from == R || to == R, "A and B never talk directly");
                        let link = if downside { down } else { up };
                        if (downside && down_broken) || unit(&mut self.rng) < link.loss {
                            continue;
                        }
                        if from == A && matches!(Frame::decode(&payload), Ok(Frame::Data { .. })) {
                            self.data_seen += 1;
                            if self.corrupt_data == Some(self.data_seen) {
                                let last = payload.len() - 1;
                                payload[last] ^= 0x40;
                            }
                        }
                        let copies = if unit(&mut self.rng) < link.dup { 2 } else { 1 };
                        for _ in 0..copies {
                            let delay = link.delay_ms + self.rng.next_u64() % (link.jitter_ms + 1);
                            self.seq += 1;
                            self.flight.push(Packet {
                                at: self.now + Duration::from_millis(delay),
                                seq: self.seq,
                                from,
                                to,
                                bytes: payload.clone(),
                            });
                        }
                    }
                    Output::Event(e) => match from {
                        A => seen.a.push(e),
                        R => seen.r.push(e),
                        _ => seen.b.push(e),
                    },
                }
            }
        }
    }
}

struct Case {
    payload: Vec<u8>,
    sender: SenderConfig,
    up: Link,
    down: Link,
    /// R starts forwarding after this many packets from A reached it (0: at the OPEN).
    forward_after: usize,
    /// (start ms, duration ms) of an outage of the R–B link.
    outage: Option<(u64, u64)>,
    corrupt_data: Option<usize>,
}

fn run(case: &Case, seed: [u8; 32]) -> Seen {
    let cfg = EndpointConfig { sender: case.sender.clone(), ..Default::default() };
    let mut net = Net::new(cfg, seed);
    net.corrupt_data = case.corrupt_data;
    let t0 = net.now;
    let mut seen = Seen::default();
    let now = net.now;
    net.ep(A).send(R, UP, &case.payload, "{\"to\":\"agent-b\"}", now).expect("send accepted");
    let outage = case.outage.map(|(s, d)| (t0 + Duration::from_millis(s), t0 + Duration::from_millis(s + d)));
    let mut broken = false;
    let mut repaired = false;
    for step in 0.. {
        assert!(step < 400_000, "simulation does not terminate");
        let a_done = seen.a.iter().any(|e| matches!(e, Event::Sent { .. } | Event::SendFailed { .. }));
        if seen.forwarded_at_chunk.is_none() && (net.up_received > case.forward_after || a_done) {
            let now = net.now;
            let held = net.ep(R).receivers().receiver(A, UP).map(|r| r.held_chunks().count());
            match held {
                Some(n) => {
                    net.ep(R).forward(B, DOWN, A, UP, now).expect("forward accepted");
                    seen.forwarded_at_chunk = Some(Some(n));
                }
                None => {
                    let stored = seen.r.iter().find_map(|e| match e {
                        Event::Received { payload, .. } => Some(payload.clone()),
                        _ => None,
                    });
                    if let Some(p) = stored {
                        net.ep(R).send(B, DOWN, &p, "{}", now).expect("send accepted");
                        seen.forwarded_at_chunk = Some(None);
                    }
                }
            }
        }
        net.drain(&case.up, &case.down, broken, &mut seen);
        let a_done = seen.a.iter().any(|e| matches!(e, Event::Sent { .. } | Event::SendFailed { .. }));
        let r_done = seen.r.iter().any(|e| matches!(e, Event::Sent { .. } | Event::SendFailed { .. }));
        let idle = net.eps.iter().all(|(_, e)| e.poll_timeout().is_none());
        if a_done && r_done && idle {
            break;
        }
        let next_pkt = net.flight.iter().map(|p| (p.at, p.seq)).min();
        let edges =
            [outage.filter(|_| !broken && !repaired).map(|o| o.0), outage.filter(|_| broken).map(|o| o.1)];
        let timers = net.eps.iter().filter_map(|(_, e)| e.poll_timeout()).min();
        let Some(t) = [next_pkt.map(|p| p.0), timers].into_iter().chain(edges).flatten().min() else {
            if a_done && seen.forwarded_at_chunk.is_none() {
                continue; // R forwards from its copy at the top of the loop
            }
            break;
        };
        net.now = net.now.max(t);
        let now = net.now;
        if let Some((s, e)) = outage {
            if !broken && !repaired && s <= now {
                broken = true;
                net.flight.retain(|p| p.from != B && p.to != B);
                continue;
            }
            if broken && e <= now {
                broken = false;
                repaired = true;
                net.ep(R).participant_reconnected(B, now);
                net.ep(B).participant_reconnected(R, now);
                continue;
            }
        }
        if let Some((at, s)) = next_pkt
            && at <= now
        {
            let i = net.flight.iter().position(|p| p.seq == s).expect("present");
            let p = net.flight.swap_remove(i);
            if p.from == A {
                net.up_received += 1;
            }
            let (from, to, bytes) = (p.from, p.to, p.bytes);
            net.ep(to).handle_packet(from, &bytes, now);
            continue;
        }
        for (_, e) in net.eps.iter_mut() {
            e.handle_timeout(now);
        }
    }
    seen
}

fn received(events: &[Event]) -> Vec<&Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Received { payload, .. } => Some(payload),
            _ => None,
        })
        .collect()
}

fn link() -> impl Strategy<Value = Link> {
    (0.0..0.1f64, 0.0..0.1f64, 1u64..20, 0u64..20).prop_map(|(loss, dup, delay_ms, jitter_ms)| Link {
        loss,
        dup,
        delay_ms,
        jitter_ms,
    })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..30_000),
        // Compressible: the forwarded OPEN keeps the source's deflate flag and wire bytes.
        (0usize..50_000, any::<u8>())
            .prop_map(|(n, b)| (0..n).map(|i| b.wrapping_add((i / 97) as u8)).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever the loss, duplication, reordering, the moment R starts forwarding and an
    /// outage of the downstream link, B ends with A's exact bytes (or, rarely, a timeout),
    /// received once, and R's own copy is whole.
    #[test]
    fn forwarding_while_arriving_is_byte_exact(
        payload in payload(),
        (chunk_size, window, compress) in (256u32..2048, 1u32..24, any::<bool>()),
        up in link(),
        down in link(),
        forward_after in 0usize..12,
        outage in proptest::option::of((0u64..400, 1u64..1500)),
        seed in any::<[u8; 32]>(),
    ) {
        let sender = SenderConfig { chunk_size, window, compress, ..Default::default() };
        let case = Case { payload: payload.clone(), sender, up, down, forward_after, outage, corrupt_data: None };
        let seen = run(&case, seed);
        let at_r = received(&seen.r);
        prop_assert_eq!(at_r.len(), 1, "R holds the bundle once: {:?}", seen.r.last());
        prop_assert!(at_r[0] == &payload, "R's copy differs");
        prop_assert!(seen.a.iter().any(|e| matches!(e, Event::Sent { .. })), "A confirmed");
        let at_b = received(&seen.b);
        prop_assert!(at_b.len() <= 1, "B received twice");
        let r_sent = seen.r.iter().any(|e| matches!(e, Event::Sent { to, id, .. } if to == B && *id == DOWN));
        if r_sent {
            prop_assert_eq!(at_b.len(), 1, "R confirmed but B has nothing");
        }
        if let Some(p) = at_b.first() {
            prop_assert!(*p == &payload, "B's bytes differ");
        } else {
            let timed_out = seen.r.iter().any(|e| matches!(e,
                Event::SendFailed { error, .. } if error.code == ErrorCode::TimedOut));
            prop_assert!(timed_out, "B got nothing and R did not time out: {:?}", seen.r);
        }
    }
}

fn clean() -> Link {
    Link { loss: 0.0, dup: 0.0, delay_ms: 5, jitter_ms: 0 }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// Forwarding from the OPEN on: B gets the bundle at about the time R does, not a whole
/// second leg later.
#[test]
fn forwarding_overlaps_the_two_legs() {
    let sender = SenderConfig { chunk_size: 1024, window: 8, ..Default::default() };
    let case = Case {
        payload: pattern(64 * 1024),
        sender,
        up: clean(),
        down: clean(),
        forward_after: 0,
        outage: None,
        corrupt_data: None,
    };
    let seen = run(&case, [3; 32]);
    assert_eq!(seen.forwarded_at_chunk, Some(Some(0)), "forwarded from the OPEN");
    assert_eq!(received(&seen.b), vec![&case.payload]);
    assert!(seen.r.iter().any(|e| matches!(e, Event::Sent { to, .. } if to == B)));
}

/// A chunk corrupted on the way to R: R's copy fails its SHA-256 check and the transfer it
/// forwards is cancelled; B never receives the wrong bytes.
#[test]
fn upstream_corruption_cancels_the_forward() {
    let sender = SenderConfig { chunk_size: 1024, window: 4, ..Default::default() };
    let case = Case {
        payload: pattern(20 * 1024),
        sender,
        up: clean(),
        down: clean(),
        forward_after: 0,
        outage: None,
        corrupt_data: Some(7),
    };
    let seen = run(&case, [5; 32]);
    assert!(received(&seen.r).is_empty());
    assert!(
        seen.r.iter().any(
            |e| matches!(e, Event::ReceiveFailed { error, .. } if error.code == ErrorCode::HashMismatch)
        ),
        "{:?}",
        seen.r
    );
    assert!(received(&seen.b).is_empty(), "B must not receive corrupted bytes");
    let failed = seen.r.iter().find_map(|e| match e {
        Event::SendFailed { to, error, .. } if to == B => Some(error.clone()),
        _ => None,
    });
    let failed = failed.expect("the forward failed");
    assert!(failed.code == ErrorCode::Cancelled || failed.code == ErrorCode::HashMismatch, "{failed:?}");
    assert!(seen.b.iter().any(|e| matches!(e, Event::ReceiveFailed { .. })), "B was told: {:?}", seen.b);
}

/// Forwarding a transfer R is not receiving is refused with `unknown_transfer`.
#[test]
fn forwarding_an_unknown_transfer_is_refused() {
    let mut r = Endpoint::new(EndpointConfig::default());
    let err = r.forward(B, DOWN, A, UP, Instant::now()).expect_err("nothing to forward");
    assert_eq!(err.code, ErrorCode::UnknownTransfer);
    assert!(r.poll_output().is_none());
}
