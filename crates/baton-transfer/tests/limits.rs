//! Receiver-side limits and rejects through the public `Endpoint`/`Receivers` API: each gives
//! a typed error to the sender and the application, and other transfers carry on.

use std::time::Instant;

use baton_transfer::{
    Endpoint, EndpointConfig, ErrorCode, Event, Frame, Open, Output, ReceiverConfig, ReceiversConfig,
    TransferId,
};

const T77: TransferId = TransferId::new(77);
const T999: TransferId = TransferId::new(999);

fn open(id: u128, size: u64) -> Vec<u8> {
    Frame::Open {
        id: TransferId::new(id),
        open: Open {
            payload_size: size,
            wire_size: size,
            chunk_size: 1024,
            sha256: [0; 32],
            deflate: false,
            meta: String::new(),
        },
    }
    .encode()
    .unwrap()
}

fn drain(ep: &mut Endpoint) -> (Vec<(String, Frame)>, Vec<Event>) {
    let (mut f, mut e) = (vec![], vec![]);
    while let Some(o) = ep.poll_output() {
        match o {
            Output::Transmit { to, payload } => f.push((to, Frame::decode(&payload).unwrap())),
            Output::Event(ev) => e.push(ev),
        }
    }
    (f, e)
}

fn error_code(frames: &[(String, Frame)]) -> Option<ErrorCode> {
    frames.iter().find_map(|(_, f)| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

fn endpoint() -> Endpoint {
    Endpoint::new(EndpointConfig {
        receivers: ReceiversConfig {
            transfer: ReceiverConfig { max_bundle_size: 10_000, ..Default::default() },
            max_transfers_per_sender: 2,
            max_buffered_bytes: 15_000,
            ..Default::default()
        },
        ..Default::default()
    })
}

#[test]
fn too_large_is_refused_from_open() {
    let mut ep = endpoint();
    let now = Instant::now();
    ep.handle_packet("a", &open(1, 10_001), now);
    let (f, e) = drain(&mut ep);
    assert_eq!(error_code(&f), Some(ErrorCode::TooLarge));
    assert_eq!(f[0].0, "a", "answer goes to the sender only");
    assert!(matches!(&e[..], [Event::Rejected { error, .. }] if error.code == ErrorCode::TooLarge));
    assert_eq!(ep.receivers().buffered_bytes(), 0, "nothing buffered");
}

#[test]
fn per_sender_cap_and_total_buffer_cap() {
    let mut ep = endpoint();
    let now = Instant::now();
    ep.handle_packet("a", &open(1, 5_000), now);
    ep.handle_packet("a", &open(2, 5_000), now);
    assert_eq!(error_code(&drain(&mut ep).0), None);
    ep.handle_packet("a", &open(3, 100), now);
    assert_eq!(error_code(&drain(&mut ep).0), Some(ErrorCode::TooManyTransfers));
    // Another sender is not limited by a's count, but by the room's buffer: 10 000 used of 15 000.
    ep.handle_packet("b", &open(1, 6_000), now);
    assert_eq!(error_code(&drain(&mut ep).0), Some(ErrorCode::BufferFull));
    ep.handle_packet("b", &open(1, 4_000), now);
    assert_eq!(error_code(&drain(&mut ep).0), None);
    assert_eq!(ep.receivers().active(), 3);
    assert_eq!(ep.receivers().buffered_bytes(), 14_000);
}

#[test]
fn unknown_and_corrupt_frames_reject_without_harming_others() {
    let mut ep = endpoint();
    let now = Instant::now();
    let payload = vec![9u8; 3000];
    let mut sender = Endpoint::new(EndpointConfig::default());
    sender.send("rx", T77, &payload, "m", now).unwrap();
    let (frames, _) = drain(&mut sender);
    // Garbage, a DATA and a RESUME for unknown transfers, and an ACK for a transfer this side
    // never sent, interleaved with the real transfer.
    ep.handle_packet("tx", b"\x00garbage", now);
    ep.handle_packet("tx", &Frame::Resume { id: TransferId::new(5), sent: 0 }.encode().unwrap(), now);
    ep.handle_packet(
        "tx",
        &Frame::Data { id: TransferId::new(6), index: 0, bytes: vec![1] }.encode().unwrap(),
        now,
    );
    let (f, e) = drain(&mut ep);
    assert_eq!(error_code(&f), Some(ErrorCode::UnknownTransfer), "RESUME for unknown answered");
    assert_eq!(f.len(), 1, "DATA for unknown is dropped silently");
    let codes: Vec<_> = e
        .iter()
        .map(|ev| match ev {
            Event::Rejected { error, .. } => error.code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, [ErrorCode::BadFrame, ErrorCode::UnknownTransfer, ErrorCode::UnknownTransfer]);
    for (_, fr) in &frames {
        ep.handle_packet("tx", &fr.encode().unwrap(), now);
    }
    let (f, e) = drain(&mut ep);
    assert!(f.iter().any(|(_, fr)| matches!(fr, Frame::Complete { id: T77, .. })));
    assert!(e.iter().any(|ev| matches!(ev, Event::Received { id: T77, payload: p, .. } if *p == payload)));
    // A repeated frame after completion is answered with COMPLETE again, not received again.
    ep.handle_packet("tx", &frames[1].1.encode().unwrap(), now);
    let (f, e) = drain(&mut ep);
    assert!(matches!(&f[..], [(_, Frame::Complete { id: T77, .. })]));
    assert!(e.is_empty());
    // Sender side: an ACK for an unknown transfer is rejected and answered with CANCEL.
    let ack = Frame::Ack { id: T999, ack: Default::default() }.encode().unwrap();
    sender.handle_packet("rx", &ack, now);
    let (f, e) = drain(&mut sender);
    assert!(matches!(&f[..], [(_, Frame::Cancel { code: ErrorCode::UnknownTransfer, .. })]));
    assert!(matches!(&e[..], [Event::Rejected { id: Some(T999), .. }]));
}

#[test]
fn unsupported_version_is_a_typed_reject() {
    let mut ep = endpoint();
    let mut bytes = open(1, 10);
    bytes[1] = 2;
    ep.handle_packet("a", &bytes, Instant::now());
    let (f, e) = drain(&mut ep);
    assert!(f.is_empty());
    assert!(matches!(&e[..], [Event::Rejected { error, .. }] if error.code == ErrorCode::UnsupportedVersion));
}

#[test]
fn the_application_can_abort_an_arrival_and_overrule_a_completion() {
    let mut ep = endpoint();
    let now = Instant::now();
    let mut sender = Endpoint::new(EndpointConfig::default());
    sender.send("rx", T77, &[7u8; 3000], "m", now).unwrap();
    let (frames, _) = drain(&mut sender);
    // Aborted while it arrives: ERROR to the sender, ReceiveFailed here, the buffer freed, and
    // a repeated frame is answered with the failure.
    ep.handle_packet("tx", &frames[0].1.encode().unwrap(), now);
    drain(&mut ep);
    assert!(ep.abort_incoming("tx", T77, ErrorCode::Cancelled, "sender declared gone", now));
    let (f, e) = drain(&mut ep);
    assert!(matches!(&f[..], [(to, Frame::Error { code: ErrorCode::Cancelled, reason, .. })]
        if to == "tx" && reason == "sender declared gone"));
    assert!(
        matches!(&e[..], [Event::ReceiveFailed { id: T77, error, .. }] if error.code == ErrorCode::Cancelled)
    );
    assert_eq!((ep.receivers().active(), ep.receivers().buffered_bytes()), (0, 0));
    assert!(!ep.abort_incoming("tx", T77, ErrorCode::Cancelled, "again", now), "already over");
    ep.handle_packet("tx", &frames[1].1.encode().unwrap(), now);
    assert_eq!(error_code(&drain(&mut ep).0), Some(ErrorCode::Cancelled));

    // Completed, then refused by the application: a repeat gets the refusal, not COMPLETE.
    let t78 = TransferId::new(78);
    sender.send("rx", t78, &[8u8; 3000], "m", now).unwrap();
    for (_, fr) in drain(&mut sender).0 {
        ep.handle_packet("tx", &fr.encode().unwrap(), now);
    }
    assert!(drain(&mut ep).0.iter().any(|(_, fr)| matches!(fr, Frame::Complete { id, .. } if *id == t78)));
    assert!(!ep.reject_completed("tx", T77, ErrorCode::BufferFull), "T77 failed, it did not complete");
    assert!(ep.reject_completed("tx", t78, ErrorCode::CheckpointRejected));
    ep.handle_packet("tx", &open(78, 3000), now);
    assert_eq!(error_code(&drain(&mut ep).0), Some(ErrorCode::CheckpointRejected));
}
