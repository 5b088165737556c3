//! The relay in virtual time: source and target endpoints wired back to back with it through an
//! in-memory "server".

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use baton_transfer::frame::MAX_CHUNK_SIZE;
use baton_transfer::{
    Endpoint, EndpointConfig, ErrorCode, Event, Frame, Output, ReceiversConfig, SenderConfig, TransferError,
    TransferId,
};
use livekit_protocol as proto;

use sha2::Digest as _;

use super::*;
use crate::room::{Change, Member, Roster};

fn t(n: u128) -> TransferId {
    TransferId::new(n)
}

/// A source endpoint, the relay and target endpoints, wired back to back through an
/// in-memory "server" in virtual time. Every packet is addressed to one identity.
struct Net {
    now: Instant,
    relay: Relay,
    endpoints: BTreeMap<String, Endpoint>,
    wire: VecDeque<(String, String, Vec<u8>)>,
    /// Identities whose packets (both ways) are lost, as if disconnected.
    offline: Vec<String>,
    events: Vec<(String, Event)>,
    relay_events: Vec<RelayEvent>,
}

/// A room member: an agent participant named after its identity, or a standard one.
fn member(identity: &str, agent: bool) -> Member {
    let kind =
        if agent { proto::participant_info::Kind::Agent } else { proto::participant_info::Kind::Standard };
    Member {
        sid: format!("PA_{identity}"),
        identity: identity.into(),
        name: String::new(),
        kind,
        state: proto::participant_info::State::Active,
        attributes: agent.then(|| ("lk.agent.name".to_string(), identity.to_string())).into_iter().collect(),
        tracks: Vec::new(),
        version: 1,
    }
}

impl Net {
    /// `present` are in the room, each with its own endpoint; those in `agents` are agent
    /// participants, the others are not.
    fn new(cfg: RelayConfig, present: &[&str], agents: &[&str]) -> Net {
        let now = Instant::now();
        let mut relay = Relay::new(cfg);
        let mut roster = Roster::default();
        for p in present {
            let kind = if agents.contains(p) {
                proto::participant_info::Kind::Agent
            } else {
                proto::participant_info::Kind::Standard
            };
            let info = crate::room::roster::announced(p, kind, Some(p));
            roster.apply(&[info]);
        }
        relay.handle_connected(&roster, now);
        Net {
            now,
            relay,
            endpoints: present
                .iter()
                .map(|p| (p.to_string(), Endpoint::new(EndpointConfig::default())))
                .collect(),
            wire: VecDeque::new(),
            offline: Vec::new(),
            events: Vec::new(),
            relay_events: Vec::new(),
        }
    }

    fn endpoint(&mut self, id: &str) -> &mut Endpoint {
        self.endpoints.get_mut(id).expect("an endpoint")
    }

    fn collect(&mut self) {
        for (name, ep) in self.endpoints.iter_mut() {
            while let Some(o) = ep.poll_output() {
                match o {
                    Output::Transmit { to, payload } => self.wire.push_back((name.clone(), to, payload)),
                    Output::Event(e) => self.events.push((name.clone(), e)),
                }
            }
        }
        while let Some(Transmit { to, payload }) = self.relay.poll_transmit() {
            self.wire.push_back(("baton".into(), to, payload));
        }
        self.relay_events.extend(std::iter::from_fn(|| self.relay.poll_event()));
    }

    /// Delivers packets and fires timers until nothing is left to do or `limit` passes.
    fn run(&mut self, limit: Duration) {
        let end = self.now + limit;
        loop {
            self.collect();
            if let Some((from, to, bytes)) = self.wire.pop_front() {
                if self.offline.contains(&from) || self.offline.contains(&to) {
                    continue;
                }
                if to == "baton" {
                    self.relay.handle_packet(&from, &bytes, self.now);
                } else {
                    let now = self.now;
                    self.endpoint(&to).handle_packet(&from, &bytes, now);
                }
                continue;
            }
            let next = self
                .endpoints
                .values()
                .filter_map(Endpoint::poll_timeout)
                .chain(self.relay.poll_timeout())
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    let now = self.now;
                    for ep in self.endpoints.values_mut() {
                        if ep.poll_timeout().is_some_and(|t| t <= now) {
                            ep.handle_timeout(now);
                        }
                    }
                    if self.relay.poll_timeout().is_some_and(|t| t <= now) {
                        self.relay.handle_timeout(now);
                    }
                }
                _ => return,
            }
        }
    }

    fn stored(&self, id: TransferId) -> Option<BundleInfo> {
        self.relay.store().info(id).expect("the memory store never fails")
    }

    fn usage(&self) -> StoreUsage {
        self.relay.store().usage().expect("the memory store never fails")
    }

    /// What the relay has queued, taken out.
    fn drain(&mut self) -> (Vec<Transmit>, Vec<RelayEvent>) {
        (
            std::iter::from_fn(|| self.relay.poll_transmit()).collect(),
            std::iter::from_fn(|| self.relay.poll_event()).collect(),
        )
    }

    fn send(&mut self, from: &str, id: TransferId, payload: &[u8], meta: &str) {
        let now = self.now;
        self.endpoint(from).send("baton", id, payload, meta, now).expect("send");
    }

    fn delivered_to(&self, who: &str) -> Vec<(TransferId, Vec<u8>, String)> {
        self.events
            .iter()
            .filter(|(n, _)| n == who)
            .filter_map(|(_, e)| match e {
                Event::Received { id, payload, meta, .. } => Some((*id, payload.clone(), meta.clone())),
                _ => None,
            })
            .collect()
    }

    fn send_outcome(&self, who: &str, tid: TransferId) -> Option<Result<(), TransferError>> {
        self.events.iter().filter(|(n, _)| n == who).find_map(|(_, e)| match e {
            Event::Sent { id, .. } if *id == tid => Some(Ok(())),
            Event::SendFailed { id, error, .. } if *id == tid => Some(Err(error.clone())),
            _ => None,
        })
    }
}

fn bundle(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn received(events: &[RelayEvent]) -> Vec<(String, TransferId, u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::BundleReceived { from, transfer_id, size, meta } => {
                Some((from.clone(), *transfer_id, *size, meta.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn source_to_relay_to_target_byte_exact() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let payload = bundle(5 * 1024 * 1024 + 17, 1);
    let meta = r#"{"to":"b","purpose":"handoff"}"#;
    net.send("a", t(7), &payload, meta);
    net.run(Duration::from_secs(5));
    // Leg 1 is acknowledged once the bundle is stored, before any delivery exists.
    assert_eq!(net.send_outcome("a", t(7)), Some(Ok(())));
    assert_eq!(received(&net.relay_events), vec![("a".into(), t(7), payload.len() as u64, meta.into())]);
    let info = net.stored(t(7)).expect("stored");
    assert_eq!(info.from, "a");
    assert_eq!(info.sha256, <[u8; 32]>::from(sha2::Sha256::digest(&payload)));
    assert_eq!(net.usage().bytes, payload.len() as u64);
    assert!(net.delivered_to("b").is_empty());

    let did = net.relay.deliver(t(7), "b", net.now).expect("deliver");
    assert_ne!(did, t(7), "each delivery gets a fresh id");
    assert_eq!(
        net.relay.deliver(t(7), "b", net.now),
        Err(RelayError::AlreadyDelivering { transfer_id: t(7), to: "b".into() })
    );
    net.run(Duration::from_secs(5));
    let got = net.delivered_to("b");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, did);
    assert!(got[0].1 == payload, "payload differs");
    assert_eq!(got[0].2, meta, "meta is forwarded unchanged");
    let delivered: Vec<_> = net
        .relay_events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::Delivered { to, transfer_id, delivery_id, bytes_sent, .. } => {
                Some((to.clone(), *transfer_id, *delivery_id, *bytes_sent))
            }
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![("b".into(), t(7), did, payload.len() as u64)]);
    assert_eq!(net.relay.delivering(), 0);
    // The bundle stays stored (for a fallback) until removed.
    assert!(net.stored(t(7)).is_some());
    assert_eq!(net.relay.remove(t(7)).map(|i| i.map(|i| i.size)), Ok(Some(payload.len() as u64)));
    assert_eq!(net.usage().bytes, 0);
    assert_eq!(net.relay.deliver(t(7), "b", net.now), Err(RelayError::UnknownBundle(t(7))));
}

#[test]
fn unauthorized_sender_is_refused_and_nothing_is_buffered() {
    let mut net = Net::new(RelayConfig::default(), &["caller", "a"], &["a"]);
    let payload = bundle(200_000, 2);
    net.send("caller", t(9), &payload, r#"{"to":"a"}"#);
    net.run(Duration::from_secs(90));
    let err = net.send_outcome("caller", t(9)).expect("outcome").expect_err("refused");
    assert_eq!(err.code, ErrorCode::NotAuthorized);
    assert!(err.remote);
    assert!(err.reason.contains("not an agent"), "{}", err.reason);
    assert!(received(&net.relay_events).is_empty());
    assert!(net.usage().bundles == 0);
    assert_eq!(net.relay.receiving(), 0);
    assert!(net.delivered_to("a").is_empty());
    let rejected = net
        .relay_events
        .iter()
        .filter(|e| matches!(e, RelayEvent::Rejected { from, error, .. } if from == "caller" && error.code == ErrorCode::NotAuthorized))
        .count();
    assert!(rejected >= 1);
    // DATA frames from the unauthorized sender get no answer and are not buffered either.
    let data = Frame::Data { id: t(9), index: 0, bytes: vec![1; 300] }.encode().unwrap();
    net.relay.handle_packet("caller", &data, net.now);
    let (tx, ev) = net.drain();
    assert!(tx.is_empty());
    assert!(matches!(&ev[..], [RelayEvent::Rejected { transfer_id: Some(id), .. }] if *id == t(9)));
    assert_eq!(net.relay.receiving(), 0);
}

#[test]
fn only_the_listed_uploaders_may_open_a_bundle() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    net.relay.set_uploaders(Some(BTreeSet::from(["a".to_string()])));
    // `b` is an authorized agent, but neither holds the floor nor is a handoff's source.
    net.send("b", t(4), &bundle(50_000, 6), "");
    net.run(Duration::from_secs(10));
    let err = net.send_outcome("b", t(4)).expect("outcome").expect_err("refused");
    assert_eq!(err.code, ErrorCode::NotFloorHolder);
    assert!(err.remote && err.reason.contains("does not hold the floor"), "{}", err.reason);
    assert_eq!(net.usage().bundles, 0, "nothing of b's is stored");
    assert_eq!(net.relay.receiving(), 0);
    net.send("a", t(5), &bundle(50_000, 7), "");
    net.run(Duration::from_secs(10));
    assert_eq!(net.send_outcome("a", t(5)), Some(Ok(())));
    assert_eq!(net.usage().bundles, 1);
    // Lifting the limit (a bare relay) lets `b` upload again.
    net.relay.set_uploaders(None);
    net.send("b", t(6), &bundle(50_000, 8), "");
    net.run(Duration::from_secs(10));
    assert_eq!(net.send_outcome("b", t(6)), Some(Ok(())));
}

#[test]
fn store_cap_refuses_before_buffering_and_frees_on_remove() {
    let cfg = RelayConfig { store_bytes: 100_000, ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
    net.send("a", t(1), &bundle(70_000, 3), "");
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("a", t(1)), Some(Ok(())));
    net.send("a", t(2), &bundle(40_000, 4), "");
    net.run(Duration::from_secs(5));
    let err = net.send_outcome("a", t(2)).expect("outcome").expect_err("full");
    assert_eq!(err.code, ErrorCode::BufferFull);
    assert!(err.reason.contains("bundle store"), "{}", err.reason);
    assert_eq!(net.usage().bundles, 1);
    // Two concurrent transfers that fit one at a time: the second is refused at OPEN,
    // because the first's bytes are reserved while it arrives.
    assert_eq!(net.relay.remove(t(1)).map(|i| i.map(|i| i.size)), Ok(Some(70_000)));
    net.send("a", t(3), &bundle(60_000, 5), "");
    net.send("a", t(4), &bundle(60_000, 6), "");
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("a", t(3)), Some(Ok(())));
    assert_eq!(net.send_outcome("a", t(4)).expect("outcome").expect_err("full").code, ErrorCode::BufferFull);
    assert_eq!(net.usage().bytes, 60_000);
}

#[test]
fn oversized_bundle_refused_with_too_large() {
    let mut cfg = RelayConfig::default();
    cfg.endpoint.receivers.transfer.max_bundle_size = 50_000;
    let mut net = Net::new(cfg, &["a"], &["a"]);
    net.send("a", t(5), &bundle(50_001, 7), "");
    net.run(Duration::from_secs(5));
    let err = net.send_outcome("a", t(5)).expect("outcome").expect_err("too large");
    assert_eq!(err.code, ErrorCode::TooLarge);
    assert!(net.usage().bundles == 0);
    // Only the OPEN (and perhaps the first window) reached baton; nothing was buffered.
    assert_eq!(net.relay.receiving(), 0);
}

/// Moves packets one at a time until `done` holds (no timers: a clean link).
fn step_until(net: &mut Net, done: impl Fn(&Net) -> bool) {
    for _ in 0..100_000 {
        net.collect();
        if done(net) {
            return;
        }
        let Some((from, to, bytes)) = net.wire.pop_front() else {
            panic!("link idle before the condition held")
        };
        let now = net.now;
        if to == "baton" {
            net.relay.handle_packet(&from, &bytes, now);
        } else {
            net.endpoint(&to).handle_packet(&from, &bytes, now);
        }
    }
    panic!("condition never held");
}

#[test]
fn a_bundle_still_arriving_is_forwarded_as_it_arrives() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let payload = bundle(600 * 1024 + 5, 4);
    net.send("a", t(7), &payload, r#"{"to":"b"}"#);
    step_until(&mut net, |n| {
        n.relay_events
            .iter()
            .any(|e| matches!(e, RelayEvent::Receiving { transfer_id, .. } if *transfer_id == t(7)))
    });
    assert!(net.stored(t(7)).is_none(), "not stored yet");
    let did = net.relay.deliver(t(7), "b", net.now).expect("forwarding starts before the bundle is whole");
    // b gets chunks while a is still sending: b holds part of the bundle before baton has all of it.
    step_until(&mut net, |n| {
        n.endpoints["b"].receivers().receiver("baton", did).is_some_and(|r| r.held_chunks().count() > 2)
    });
    assert!(net.stored(t(7)).is_none(), "b is receiving while leg 1 is still arriving");
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("a", t(7)), Some(Ok(())));
    assert_eq!(net.delivered_to("b"), vec![(did, payload.clone(), r#"{"to":"b"}"#.into())]);
    let sent = net.relay_events.iter().find_map(|e| match e {
        RelayEvent::Delivered { to, transfer_id, delivery_id, bytes_sent, .. }
            if to == "b" && *transfer_id == t(7) =>
        {
            Some((*delivery_id, *bytes_sent))
        }
        _ => None,
    });
    assert_eq!(sent, Some((did, payload.len() as u64)), "every chunk forwarded once");
    assert!(net.stored(t(7)).is_some(), "and kept for a later delivery");
}

#[test]
fn a_forward_fails_when_its_source_cancels() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let payload = bundle(2 * 1024 * 1024, 5); // more than one window (32 chunks)
    net.send("a", t(7), &payload, "{}");
    step_until(&mut net, |n| {
        n.relay_events
            .iter()
            .any(|e| matches!(e, RelayEvent::Receiving { transfer_id, .. } if *transfer_id == t(7)))
    });
    let did = net.relay.deliver(t(7), "b", net.now).expect("forward");
    step_until(&mut net, |n| n.endpoints["b"].receivers().receiver("baton", did).is_some());
    let now = net.now;
    assert!(net.endpoint("a").cancel("baton", t(7), "the caller hung up", now));
    net.run(Duration::from_secs(5));
    assert!(net.delivered_to("b").is_empty());
    assert!(net.stored(t(7)).is_none());
    let failed = net.relay_events.iter().find_map(|e| match e {
        RelayEvent::DeliveryFailed { to, delivery_id, error, .. } if to == "b" && *delivery_id == did => {
            Some(error.clone())
        }
        _ => None,
    });
    let failed = failed.expect("the forward failed");
    assert_eq!(failed.code, ErrorCode::Cancelled);
    assert!(failed.reason.contains("the caller hung up"), "{failed}");
    assert!(
        net.events.iter().any(|(n, e)| n == "b" && matches!(e, Event::ReceiveFailed { .. })),
        "b was told"
    );
}

#[test]
fn delivery_resumes_after_target_reconnect_without_restarting() {
    delivery_resumes_after(Change::Joined(member("b", true)));
}

/// LiveKit can report the rejoin as an update of the identity with a new session id (sid)
/// rather than a join (issue 11 item 6); the delivery resumes all the same.
#[test]
fn delivery_resumes_when_the_rejoin_is_an_update_with_a_new_sid() {
    let mut after = member("b", true);
    after.sid = "PA_b_rejoined".into();
    after.version = 2;
    delivery_resumes_after(Change::Updated { before: member("b", true), after });
}

/// Delivers 3 MiB to `b`, cuts `b` off two thirds of the way, reports `rejoin` to the relay,
/// and checks the delivery resumed from what was acknowledged instead of restarting.
fn delivery_resumes_after(rejoin: Change) {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let payload = bundle(3 * 1024 * 1024, 8);
    net.send("a", t(11), &payload, "");
    net.run(Duration::from_secs(5));
    net.relay.deliver(t(11), "b", net.now).expect("deliver");
    // Let about two thirds through (~2 MB), then cut b off.
    let mut delivered_packets = 0;
    while delivered_packets < 140 {
        net.collect();
        let Some((from, to, bytes)) = net.wire.pop_front() else {
            break;
        };
        let now = net.now;
        if to == "baton" {
            net.relay.handle_packet(&from, &bytes, now);
        } else {
            net.endpoint(&to).handle_packet(&from, &bytes, now);
            delivered_packets += 1;
        }
    }
    net.offline.push("b".into());
    net.run(Duration::from_millis(2500)); // RTO fires while b is away: those resends are lost
    net.offline.clear();
    let now = net.now;
    net.relay.handle_change(&rejoin, now);
    net.endpoint("b").reconnected(now);
    // Resumed at once on the rejoin, not when the next retransmission timer fires.
    net.run(Duration::from_millis(300));
    let got = net.delivered_to("b");
    assert_eq!(got.len(), 1);
    assert!(got[0].1 == payload);
    let sent = net
        .relay_events
        .iter()
        .find_map(|e| match e {
            RelayEvent::Delivered { bytes_sent, .. } => Some(*bytes_sent),
            _ => None,
        })
        .expect("delivered");
    let window = u64::from(SenderConfig::default().window) * u64::from(MAX_CHUNK_SIZE);
    // A restart would resend everything held before the cut (~2 MB); a resume resends
    // what was in flight at the cut, plus the RTO's resends lost during the outage.
    eprintln!("bytes sent for {} after the outage: {sent}", payload.len());
    assert!(sent > payload.len() as u64, "the outage cost nothing: nothing was cut");
    assert!(sent < payload.len() as u64 + 2 * window, "{sent} bytes sent for {}", payload.len());
}

#[test]
fn ack_for_unknown_transfer_answered_and_others_continue() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let payload = bundle(400_000, 9);
    net.send("a", t(21), &payload, "");
    let ack = Frame::Ack {
        id: t(99),
        ack: baton_transfer::Ack {
            cumulative: 1,
            window: 32,
            ranges: vec![],
            resume: false,
            solicited: false,
        },
    };
    net.relay.handle_packet("b", &ack.encode().unwrap(), net.now);
    let (tx, ev) = net.drain();
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].to, "b");
    match Frame::decode(&tx[0].payload).unwrap() {
        Frame::Cancel { id, code, .. } if id == t(99) => assert_eq!(code, ErrorCode::UnknownTransfer),
        f => panic!("expected CANCEL, got {f:?}"),
    }
    assert!(matches!(&ev[..], [RelayEvent::Rejected { transfer_id: Some(id), .. }] if *id == t(99)));
    // Garbage and corrupt frames in the middle of a transfer change nothing.
    for junk in [&b"\xba\x01\x02"[..], b"hello", &[0xba, 9, 1, 0][..]] {
        net.relay.handle_packet("a", junk, net.now);
    }
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("a", t(21)), Some(Ok(())));
    assert_eq!(net.stored(t(21)).map(|i| i.size), Some(400_000));
}

#[test]
fn repeated_open_for_a_stored_bundle_is_confirmed_not_refetched() {
    let cfg = RelayConfig {
        endpoint: EndpointConfig {
            receivers: ReceiversConfig { finished_linger: Duration::from_secs(1), ..Default::default() },
            ..Default::default()
        },
        ..RelayConfig::default()
    };
    let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
    let payload = bundle(50_000, 10);
    net.send("a", t(31), &payload, "");
    net.run(Duration::from_secs(5));
    net.now += Duration::from_secs(5); // past the engine's linger
    net.send("a", t(31), &payload, "");
    net.run(Duration::from_secs(5));
    assert_eq!(received(&net.relay_events).len(), 1, "stored once");
    let oks = net
        .events
        .iter()
        .filter(|(n, e)| n == "a" && matches!(e, Event::Sent { id, .. } if *id == t(31)))
        .count();
    assert_eq!(oks, 2);
    // Another agent reusing the id is refused.
    net.send("b", t(31), &bundle(50_000, 11), "");
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("b", t(31)).unwrap().unwrap_err().code, ErrorCode::ConflictingOpen);
}

#[test]
fn stored_bundles_expire_after_retention() {
    let cfg = RelayConfig { retention: Some(Duration::from_secs(60)), ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a"], &["a"]);
    net.send("a", t(41), &bundle(1000, 12), "");
    net.run(Duration::from_secs(5));
    assert!(net.stored(t(41)).is_some());
    net.run(Duration::from_secs(120));
    assert!(net.stored(t(41)).is_none());
    assert!(net.relay_events.contains(&RelayEvent::Expired { transfer_id: t(41) }));
    assert_eq!(net.relay.poll_timeout(), None);
}

#[test]
fn meta_target_routing_forwards_to_a_present_agent_and_waits_for_an_absent_one() {
    let cfg = RelayConfig { routing: Routing::MetaTarget, ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a", "b", "c", "caller"], &["a", "b"]);
    // b is in the room: forwarded from the OPEN on, before baton holds the whole bundle.
    let payload = bundle(600 * 1024, 13);
    net.send("a", t(51), &payload, r#"{"to":"b"}"#);
    step_until(&mut net, |n| n.endpoints["b"].receivers().active() > 0);
    assert!(net.stored(t(51)).is_none(), "b is receiving while leg 1 is still arriving");
    net.run(Duration::from_secs(5));
    assert_eq!(net.delivered_to("b").len(), 1);
    assert!(net.delivered_to("b")[0].1 == payload);

    // c is in the room but not an agent, the caller neither: nothing goes to them.
    net.send("a", t(52), &bundle(1000, 14), r#"{"to":"caller"}"#);
    net.run(Duration::from_secs(5));
    assert!(net.stored(t(52)).is_some());
    assert!(net.delivered_to("caller").is_empty());

    // d is not in the room yet: the bundle waits in the store and goes out when d joins.
    net.endpoints.insert("d".into(), Endpoint::new(EndpointConfig::default()));
    let small = bundle(2000, 15);
    net.send("a", t(53), &small, r#"{"to":"d"}"#);
    net.run(Duration::from_secs(5));
    assert!(net.delivered_to("d").is_empty());
    let now = net.now;
    net.relay.handle_change(&Change::Joined(member("d", true)), now);
    net.run(Duration::from_secs(5));
    let got = net.delivered_to("d");
    assert_eq!(got.len(), 1);
    assert!(got[0].1 == small);
    assert_eq!(got[0].2, r#"{"to":"d"}"#);
}

#[test]
fn on_command_routing_ignores_the_meta_target_and_delivers_only_to_agents() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b", "caller"], &["a", "b"]);
    net.send("a", t(61), &bundle(3000, 16), r#"{"to":"b"}"#);
    net.run(Duration::from_secs(5));
    assert!(net.stored(t(61)).is_some());
    assert!(net.delivered_to("b").is_empty(), "the arbiter decides, not the meta");
    assert_eq!(net.relay.deliver(t(61), "caller", net.now), Err(RelayError::NotAnAgent("caller".into())));
    assert_eq!(net.relay.deliver(t(61), "gone", net.now), Err(RelayError::NotAnAgent("gone".into())));
    assert_eq!(net.relay.delivering(), 0);
}

#[test]
fn a_sender_the_room_has_not_announced_gets_no_answer() {
    let mut net = Net::new(RelayConfig::default(), &["a"], &["a"]);
    net.endpoints.insert("ghost".into(), Endpoint::new(EndpointConfig::default()));
    net.send("ghost", t(71), &bundle(1000, 17), "");
    net.collect();
    let (from, to, open) = net.wire.pop_front().expect("the OPEN");
    assert_eq!((from.as_str(), to.as_str()), ("ghost", "baton"));
    net.relay.handle_packet("ghost", &open, net.now);
    let (tx, ev) = net.drain();
    assert!(tx.is_empty() && ev.is_empty(), "{tx:?} {ev:?}");
    assert_eq!(net.relay.receiving(), 0);
}

#[test]
fn deliveries_to_one_target_are_cancelled_together_and_the_bundle_stays() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    net.send("a", t(81), &bundle(2 * 1024 * 1024, 18), "");
    net.run(Duration::from_secs(5));
    let did = net.relay.deliver(t(81), "b", net.now).expect("deliver");
    net.collect();
    let now = net.now;
    assert_eq!(net.relay.cancel_deliveries(t(81), "b", "handoff cancelled", now), 1);
    net.run(Duration::from_secs(5));
    let failed = net.relay_events.iter().find_map(|e| match e {
        RelayEvent::DeliveryFailed { to, transfer_id, delivery_id, error } if to == "b" => {
            Some((*transfer_id, *delivery_id, error.code))
        }
        _ => None,
    });
    assert_eq!(failed, Some((t(81), did, ErrorCode::Cancelled)));
    assert!(net.events.iter().any(|(n, e)| n == "b" && matches!(e, Event::ReceiveFailed { .. })));
    assert!(net.stored(t(81)).is_some());
    assert_eq!(net.relay.cancel_deliveries(t(81), "b", "again", now), 0);
}

/// A store whose backend refuses every write.
#[derive(Debug)]
struct BrokenStore;

impl BundleStore for BrokenStore {
    fn put(&mut self, _: TransferId, _: StoredBundle) -> Result<(), StoreError> {
        Err(StoreError::Backend("disk full".into()))
    }
    fn get(&self, _: TransferId) -> Result<Option<StoredBundle>, StoreError> {
        Ok(None)
    }
    fn info(&self, _: TransferId) -> Result<Option<BundleInfo>, StoreError> {
        Ok(None)
    }
    fn remove(&mut self, _: TransferId) -> Result<Option<BundleInfo>, StoreError> {
        Ok(None)
    }
    fn usage(&self) -> Result<StoreUsage, StoreError> {
        Ok(StoreUsage { bytes: 0, capacity: u64::MAX, bundles: 0 })
    }
}

/// Agent `a` alone in the room with a relay over the [`BrokenStore`].
fn net_over_a_broken_store() -> Net {
    let mut net = Net::new(RelayConfig::default(), &["a"], &["a"]);
    net.relay = Relay::with_store(RelayConfig::default(), Box::new(BrokenStore));
    let (roster, _) = Roster::new(
        "PA_baton",
        &[crate::room::roster::announced("a", proto::participant_info::Kind::Agent, Some("a"))],
    );
    net.relay.handle_connected(&roster, net.now);
    net
}

#[test]
fn a_bundle_the_store_refuses_is_answered_with_an_error_not_complete() {
    let mut net = net_over_a_broken_store();
    net.send("a", t(91), &bundle(40_000, 19), "");
    net.run(Duration::from_secs(5));
    let err = net.send_outcome("a", t(91)).expect("outcome").expect_err("not stored, so not COMPLETE");
    assert_eq!(err.code, ErrorCode::BufferFull);
    assert!(err.reason.contains("disk full"), "{}", err.reason);
    assert!(net.relay_events.iter().any(
        |e| matches!(e, RelayEvent::ReceiveFailed { transfer_id, error, .. } if *transfer_id == t(91) && error.reason.contains("disk full"))
    ));
    assert!(received(&net.relay_events).is_empty());
}

/// (bytes) of each progress event for `transfer_id`, upload (`true`) or delivery, in order.
fn progress(events: &[RelayEvent], upload: bool, bundle: TransferId) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::UploadProgress { transfer_id, bytes, .. } if upload && *transfer_id == bundle => {
                Some(*bytes)
            }
            RelayEvent::DeliveryProgress { transfer_id, bytes, .. } if !upload && *transfer_id == bundle => {
                Some(*bytes)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn both_legs_report_growing_progress_under_the_bundles_id() {
    // The target acknowledges through the authorized path (any agent may send) and through the
    // unauthorized one (only `a` may send; `b`'s ACKs are for baton's own delivery).
    for allowed in [BTreeSet::new(), BTreeSet::from(["a".to_string()])] {
        let cfg = RelayConfig { allowed_agents: allowed.clone(), ..RelayConfig::default() };
        let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
        let payload = bundle(1024 * 1024, 5);
        net.send("a", t(21), &payload, "{}");
        net.run(Duration::from_secs(5));
        let up = progress(&net.relay_events, true, t(21));
        assert!(up.len() >= 10, "{allowed:?}: one report per few chunks of a 1 MiB upload, got {up:?}");
        assert!(up.windows(2).all(|w| w[0] < w[1]), "{allowed:?}: upload progress grows: {up:?}");
        assert!(*up.last().unwrap() <= payload.len() as u64);
        let received_at =
            net.relay_events.iter().position(|e| matches!(e, RelayEvent::BundleReceived { .. }));
        let last_up = net.relay_events.iter().rposition(|e| matches!(e, RelayEvent::UploadProgress { .. }));
        assert!(last_up < received_at, "{allowed:?}: progress comes before the bundle is stored");

        let did = net.relay.deliver(t(21), "b", net.now).expect("deliver");
        net.run(Duration::from_secs(5));
        let down = progress(&net.relay_events, false, t(21));
        assert!(down.len() >= 5, "{allowed:?}: the target's ACKs are reported, got {down:?}");
        assert!(down.windows(2).all(|w| w[0] < w[1]), "{allowed:?}: delivery progress grows: {down:?}");
        assert!(net.relay_events.iter().any(|e| matches!(
            e,
            RelayEvent::DeliveryProgress { to, delivery_id, .. } if to == "b" && *delivery_id == did
        )));
        assert!(
            matches!(net.relay_events.last(), Some(RelayEvent::Delivered { .. })),
            "{:?}",
            net.relay_events.last()
        );
    }
}

// --- checkpoints (issue 13) ------------------------------------------------------------------

const CHECKPOINT_META: &str =
    r#"{"content_type":"application/vnd.baton.checkpoint+json","purpose":"checkpoint"}"#;

/// A `baton.checkpoint/1` payload for agent `agent` carrying one user message per id.
fn checkpoint(agent: &str, seq: u64, base: bool, ids: &[&str]) -> Vec<u8> {
    let items: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({"id": id, "type": "message", "role": "user", "content": [format!("said {id}")],
                               "created_at": 1796049000.5})
        })
        .collect();
    let mut v = serde_json::json!({"schema": "baton.checkpoint/1", "agent": agent, "seq": seq, "base": base,
                                   "created_at": 1796049001.0, "items": items, "journal": []});
    if base {
        v["user_state"] = serde_json::json!({"account": "A-1001"});
        v["agent_state"] = serde_json::json!({});
    }
    serde_json::to_vec(&v).expect("json")
}

/// Sends one checkpoint from `from` and runs until it is answered.
fn send_checkpoint(net: &mut Net, from: &str, id: TransferId, payload: &[u8]) -> Result<(), TransferError> {
    net.send(from, id, payload, CHECKPOINT_META);
    net.run(Duration::from_secs(5));
    net.send_outcome(from, id).expect("the checkpoint was answered")
}

fn applied(events: &[RelayEvent]) -> Vec<(String, String, u64, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::CheckpointApplied { from, agent, seq, base, .. } => {
                Some((from.clone(), agent.clone(), *seq, *base))
            }
            _ => None,
        })
        .collect()
}

fn rejected_checkpoints(events: &[RelayEvent]) -> Vec<(TransferId, ErrorCode, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::CheckpointRejected { transfer_id, error, .. } => {
                Some((*transfer_id, error.code, error.reason.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Nothing of a checkpoint looks like a bundle: not stored, not announced, no upload progress
/// (the floor would take it for a handoff's bundle).
fn assert_no_bundle_traffic(net: &Net) {
    assert_eq!(net.usage().bundles, 0, "a checkpoint is never stored as a bundle");
    let bundle_events: Vec<_> = net
        .relay_events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RelayEvent::Receiving { .. }
                    | RelayEvent::BundleReceived { .. }
                    | RelayEvent::UploadProgress { .. }
                    | RelayEvent::ReceiveFailed { .. }
            )
        })
        .collect();
    assert!(bundle_events.is_empty(), "{bundle_events:?}");
}

#[test]
fn a_base_then_deltas_are_applied_and_acknowledged_with_complete() {
    let mut net = Net::new(RelayConfig::default(), &["a"], &["a"]);
    assert_eq!(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 0, true, &["u1"])), Ok(()));
    assert_eq!(send_checkpoint(&mut net, "a", t(2), &checkpoint("a", 1, false, &["u2"])), Ok(()));
    // An item sent again replaces itself in place.
    assert_eq!(send_checkpoint(&mut net, "a", t(3), &checkpoint("a", 2, false, &["u1", "u3"])), Ok(()));
    assert_eq!(
        applied(&net.relay_events),
        [
            ("a".into(), "a".into(), 0, true),
            ("a".into(), "a".into(), 1, false),
            ("a".into(), "a".into(), 2, false)
        ]
    );
    let m = net.relay.checkpoints().get("a").expect("merged state");
    let ids: Vec<&str> = m.items().iter().map(|i| i.id.as_str()).collect();
    assert_eq!((m.owner(), m.last_seq(), ids), ("a", 2, vec!["u1", "u2", "u3"]));
    let last = net.relay_events.iter().rev().find_map(|e| match e {
        RelayEvent::CheckpointApplied { state_bytes, bytes, .. } => Some((*state_bytes, *bytes)),
        _ => None,
    });
    let payload_len = checkpoint("a", 2, false, &["u1", "u3"]).len() as u64;
    assert_eq!(last, Some((net.relay.checkpoints().bytes() as u64, payload_len)));
    assert!(rejected_checkpoints(&net.relay_events).is_empty());
    assert_no_bundle_traffic(&net);
    assert_eq!(net.relay.receiving(), 0);
    // A checkpoint cannot be delivered onwards: it is not a bundle.
    assert_eq!(net.relay.deliver(t(1), "a", net.now), Err(RelayError::UnknownBundle(t(1))));
}

#[test]
fn refused_checkpoints_get_error_14_with_the_reason_and_a_base_is_taken_next() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    let refused = |r: Result<(), TransferError>| {
        let e = r.expect_err("refused");
        assert!(e.remote, "the refusal came from baton");
        (e.code, e.reason)
    };
    // A delta before any base.
    let (code, reason) = refused(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 4, false, &["u1"])));
    assert_eq!(code, ErrorCode::CheckpointRejected);
    assert!(reason.starts_with("no_base"), "{reason}");
    assert_eq!(send_checkpoint(&mut net, "a", t(2), &checkpoint("a", 0, true, &["u1"])), Ok(()));
    // seq 2 after seq 0.
    let (code, reason) = refused(send_checkpoint(&mut net, "a", t(3), &checkpoint("a", 2, false, &["u2"])));
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::CheckpointRejected, "out_of_sequence: expected seq 1, got 2")
    );
    // `a` claims to be `b`: the agent name is the server's, not the packet's.
    let (code, reason) = refused(send_checkpoint(&mut net, "a", t(4), &checkpoint("b", 0, true, &["x"])));
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::CheckpointRejected, r#"wrong_agent: the checkpoint is for "b", the sender is agent "a""#)
    );
    let (code, reason) = refused(send_checkpoint(&mut net, "a", t(5), b"{\"schema\":\"baton.bundle/1\"}"));
    assert!(code == ErrorCode::CheckpointRejected && reason.starts_with("bad_checkpoint"), "{reason}");
    let (code, reason) = refused(send_checkpoint(&mut net, "a", t(6), b"\xff not json"));
    assert!(code == ErrorCode::CheckpointRejected && reason.starts_with("bad_checkpoint"), "{reason}");
    let tokens: Vec<String> = rejected_checkpoints(&net.relay_events)
        .into_iter()
        .map(|(_, _, r)| r.split(':').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(tokens, ["no_base", "out_of_sequence", "wrong_agent", "bad_checkpoint", "bad_checkpoint"]);
    // The refusals changed nothing; the adapter's next checkpoint, a base, is applied.
    let m = net.relay.checkpoints().get("a").expect("state");
    assert_eq!((m.last_seq(), m.items().len()), (0, 1));
    assert!(net.relay.checkpoints().get("b").is_none());
    assert_eq!(send_checkpoint(&mut net, "a", t(7), &checkpoint("a", 3, true, &["u1", "u2"])), Ok(()));
    assert_eq!(net.relay.checkpoints().get("a").map(|m| (m.last_seq(), m.items().len())), Some((3, 2)));
    // A sender that missed the ERROR and opens the refused transfer again is told the refusal
    // again, not COMPLETE.
    let open = Frame::Open {
        id: t(3),
        open: baton_transfer::Open {
            payload_size: 1,
            wire_size: 1,
            chunk_size: 1024,
            sha256: [0; 32],
            deflate: false,
            meta: CHECKPOINT_META.into(),
        },
    };
    net.relay.handle_packet("a", &open.encode().expect("encode"), net.now);
    let (tx, _) = net.drain();
    let answers: Vec<Frame> = tx.iter().map(|t| Frame::decode(&t.payload).expect("frame")).collect();
    assert!(
        matches!(&answers[..], [Frame::Error { id, code: ErrorCode::CheckpointRejected, .. }] if *id == t(3)),
        "{answers:?}"
    );
    assert_no_bundle_traffic(&net);
}

#[test]
fn a_standby_may_checkpoint_while_its_bundles_are_refused() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    // `a` holds the floor; `b` is a configured agent on standby.
    net.relay.set_uploaders(Some(BTreeSet::from(["a".to_string()])));
    net.send("b", t(1), &bundle(5_000, 1), r#"{"purpose":"handoff"}"#);
    net.run(Duration::from_secs(5));
    let err = net.send_outcome("b", t(1)).expect("outcome").expect_err("a standby's bundle");
    assert_eq!(err.code, ErrorCode::NotFloorHolder);
    assert_eq!(send_checkpoint(&mut net, "b", t(2), &checkpoint("b", 0, true, &["s1"])), Ok(()));
    assert_eq!(send_checkpoint(&mut net, "a", t(3), &checkpoint("a", 0, true, &["h1"])), Ok(()));
    assert_eq!(
        applied(&net.relay_events),
        [("b".into(), "b".into(), 0, true), ("a".into(), "a".into(), 0, true)]
    );
    assert_eq!(net.usage().bundles, 0);
    // Checkpoints still come only from configured agents.
    let cfg = RelayConfig { allowed_agents: BTreeSet::from(["a".to_string()]), ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
    let err =
        send_checkpoint(&mut net, "b", t(4), &checkpoint("b", 0, true, &["s1"])).expect_err("not configured");
    assert_eq!(err.code, ErrorCode::NotAuthorized);
    assert!(net.relay.checkpoints().get("b").is_none());
}

#[test]
fn a_sender_declared_stale_is_refused_and_its_arriving_transfers_aborted() {
    let mut net = Net::new(RelayConfig::default(), &["a", "b"], &["a", "b"]);
    assert_eq!(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 0, true, &["u1"])), Ok(()));
    // A large delta and a bundle are on their way when `a` is declared crashed.
    // Both are more than one window (32 chunks), so neither can arrive whole at once.
    let big: Vec<String> = (0..20_000).map(|n| format!("item-{n}")).collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    net.send("a", t(3), &bundle(600_000, 3), "");
    net.send("a", t(2), &checkpoint("a", 1, false, &big), CHECKPOINT_META);
    step_until(&mut net, |n| n.relay.receiving() == 2);
    net.relay.declare_stale("a", net.now);
    net.run(Duration::from_secs(5));
    let err = net.send_outcome("a", t(2)).expect("outcome").expect_err("aborted");
    assert_eq!(err.code, ErrorCode::CheckpointRejected);
    assert!(err.reason.starts_with("stale_sender"), "{}", err.reason);
    let err = net.send_outcome("a", t(3)).expect("outcome").expect_err("aborted");
    assert_eq!(err.code, ErrorCode::NotFloorHolder);
    assert!(err.reason.contains("declared crashed or replaced"), "{}", err.reason);
    assert_eq!(net.relay.receiving(), 0);
    assert!(net.relay_events.iter().any(
        |e| matches!(e, RelayEvent::ReceiveFailed { transfer_id, error, .. } if *transfer_id == t(3) && error.code == ErrorCode::NotFloorHolder)
    ));
    // Later ones are refused at OPEN; the state `a` owned stays for its replacement.
    let err = send_checkpoint(&mut net, "a", t(4), &checkpoint("a", 0, true, &["u9"])).expect_err("stale");
    assert!(
        err.code == ErrorCode::CheckpointRejected && err.reason.starts_with("stale_sender"),
        "{}",
        err.reason
    );
    net.send("a", t(5), &bundle(1_000, 5), "");
    net.run(Duration::from_secs(5));
    assert_eq!(
        net.send_outcome("a", t(5)).expect("outcome").expect_err("stale").code,
        ErrorCode::NotFloorHolder
    );
    let reasons: Vec<(TransferId, ErrorCode)> =
        rejected_checkpoints(&net.relay_events).into_iter().map(|(id, code, _)| (id, code)).collect();
    assert_eq!(reasons, [(t(2), ErrorCode::CheckpointRejected), (t(4), ErrorCode::CheckpointRejected)]);
    let m = net.relay.checkpoints().get("a").expect("kept");
    assert_eq!((m.owner(), m.last_seq(), m.items().len()), ("a", 0, 1));
    assert_eq!(net.usage().bundles, 0);
    // Others are not affected.
    assert_eq!(send_checkpoint(&mut net, "b", t(6), &checkpoint("b", 0, true, &["v1"])), Ok(()));
}

#[test]
fn merged_checkpoints_over_the_store_cap_are_refused_with_buffer_full() {
    let cfg = RelayConfig { store_bytes: 2_000, ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a"], &["a"]);
    assert_eq!(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 0, true, &["u1"])), Ok(()));
    let many: Vec<String> = (0..40).map(|n| format!("item-{n}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err =
        send_checkpoint(&mut net, "a", t(2), &checkpoint("a", 1, false, &many)).expect_err("over the cap");
    assert_eq!(err.code, ErrorCode::BufferFull);
    assert!(err.reason.starts_with("buffer_full"), "{}", err.reason);
    assert_eq!(net.relay.checkpoints().get("a").map(|m| m.items().len()), Some(1));
}

#[test]
fn the_recovery_bundle_is_the_merged_state_stored_and_delivered_like_a_handoff_bundle() {
    let cfg = RelayConfig { retention: Some(Duration::from_secs(60)), ..RelayConfig::default() };
    let mut net = Net::new(cfg, &["a", "b"], &["a", "b"]);
    assert_eq!(net.relay.recovery_bundle("a", "r-0", "recovery after job_failed", 1.0, net.now), None);
    assert_eq!(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 0, true, &["u1", "a1"])), Ok(()));
    assert_eq!(send_checkpoint(&mut net, "a", t(2), &checkpoint("a", 1, false, &["u2"])), Ok(()));
    net.relay.declare_stale("a", net.now);
    let (reason, at) = ("recovery after job_failed", 1796049010.5);
    let expected = net.relay.checkpoints().get("a").expect("state").recovery_bundle(reason, Some("r-1"), at);
    let (id, size) = net.relay.recovery_bundle("a", "r-1", reason, at, net.now).expect("built");
    assert_eq!(size, expected.len() as u64);
    let info = net.stored(id).expect("stored like a bundle");
    let meta = r#"{"content_type":"application/vnd.baton.bundle+json","purpose":"recovery"}"#;
    assert_eq!((info.from.as_str(), info.meta.as_str(), info.size), ("a", meta, size));
    let v: serde_json::Value = serde_json::from_slice(&expected).expect("json");
    let ids: Vec<&str> =
        v["chat"]["items"].as_array().expect("items").iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!((v["cause"].as_str(), ids), (Some("recovery"), vec!["u1", "a1", "u2"]));
    // The replacement (`b` here) receives it through an ordinary delivery, byte for byte.
    let did = net.relay.deliver(id, "b", net.now).expect("deliver");
    net.run(Duration::from_secs(5));
    assert_eq!(net.delivered_to("b"), vec![(did, expected, meta.to_string())]);
    assert!(net.relay_events.iter().any(
        |e| matches!(e, RelayEvent::Delivered { to, transfer_id, .. } if to == "b" && *transfer_id == id)
    ));
    // The store's retention applies to it as to any bundle.
    net.run(Duration::from_secs(120));
    assert!(net.stored(id).is_none());
    assert!(net.relay_events.contains(&RelayEvent::Expired { transfer_id: id }));
}

#[test]
fn a_recovery_bundle_the_store_refuses_is_none() {
    let mut net = net_over_a_broken_store();
    // Checkpoints are not stored in the bundle store, so a broken store does not refuse them.
    assert_eq!(send_checkpoint(&mut net, "a", t(1), &checkpoint("a", 0, true, &["u1"])), Ok(()));
    assert_eq!(net.relay.recovery_bundle("a", "r-1", "recovery after job_failed", 1.0, net.now), None);
}

// --- durable acknowledgements (issue 14) -----------------------------------------------------

#[test]
fn a_held_checkpoint_ack_goes_out_only_when_released_and_a_refused_one_becomes_an_error() {
    let mut net = Net::new(RelayConfig::default(), &["a"], &["a"]);
    net.relay.hold_checkpoint_acks(true);
    net.send("a", t(1), &checkpoint("a", 0, true, &["u1"]), CHECKPOINT_META);
    // Long enough for the sender's retransmissions: none of them gets a COMPLETE either.
    net.run(Duration::from_secs(3));
    assert_eq!(applied(&net.relay_events).len(), 1, "applied in memory at once");
    assert_eq!(net.send_outcome("a", t(1)), None, "no COMPLETE before the state is durable");
    assert!(net.relay.release_ack("a", t(1)), "the COMPLETE was held");
    net.run(Duration::from_secs(5));
    assert_eq!(net.send_outcome("a", t(1)), Some(Ok(())));
    assert!(!net.relay.release_ack("a", t(1)), "released once");

    net.send("a", t(2), &checkpoint("a", 1, false, &["u2"]), CHECKPOINT_META);
    net.run(Duration::from_millis(200));
    assert_eq!(net.send_outcome("a", t(2)), None);
    assert!(net.relay.refuse_ack("a", t(2), "room over its cap"));
    net.run(Duration::from_secs(5));
    let outcome = net.send_outcome("a", t(2)).expect("answered");
    assert!(
        matches!(&outcome, Err(e) if e.code == ErrorCode::BufferFull && e.reason.contains("durably")),
        "{outcome:?}"
    );
}
