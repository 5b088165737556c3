//! Golden vectors in `tests/vectors/transfer/` (repository root), shared with the Python
//! adapter. Regenerate with `BATON_REGEN_VECTORS=1 cargo test -p baton-transfer --test vectors`
//! after an intentional format change (and bump the version if older implementations would misread it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_transfer::frame::{MAX_FRAME_SIZE, MIN_CHUNK_SIZE};
use baton_transfer::{Ack, ErrorCode, Frame, Open, Sender, SenderConfig, TransferId};
use serde_json::{Value, json};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/transfer")
}

fn id_hex(id: TransferId) -> String {
    id.to_string()
}

fn frame_json(f: &Frame) -> Value {
    match f {
        Frame::Open { id, open } => json!({
            "kind": "open", "id": id_hex(*id), "payload_size": open.payload_size,
            "wire_size": open.wire_size, "chunk_size": open.chunk_size,
            "sha256": hex::encode(open.sha256), "deflate": open.deflate, "meta": open.meta,
        }),
        Frame::Data { id, index, bytes } => json!({
            "kind": "data", "id": id_hex(*id), "index": index, "bytes": hex::encode(bytes),
        }),
        Frame::Ack { id, ack } => json!({
            "kind": "ack", "id": id_hex(*id), "cumulative": ack.cumulative, "window": ack.window,
            "ranges": ack.ranges.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>(),
            "resume": ack.resume, "solicited": ack.solicited,
        }),
        Frame::Complete { id, sha256 } => json!({
            "kind": "complete", "id": id_hex(*id), "sha256": hex::encode(sha256),
        }),
        Frame::Cancel { id, code, reason } | Frame::Error { id, code, reason } => json!({
            "kind": if matches!(f, Frame::Cancel { .. }) { "cancel" } else { "error" },
            "id": id_hex(*id), "code": code.to_u16(), "code_name": code.as_str(), "reason": reason,
        }),
        Frame::Resume { id, sent } => json!({
            "kind": "resume", "id": id_hex(*id), "sent": sent,
        }),
    }
}

fn entry(name: &str, f: &Frame) -> Value {
    json!({"name": name, "hex": hex::encode(f.encode().expect("valid")), "frame": frame_json(f)})
}

const ID: TransferId = TransferId::new(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);

fn frames_vectors() -> Value {
    let sha = |s: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(s).into()
    };
    let open = Open {
        payload_size: 1000,
        wire_size: 1000,
        chunk_size: 256,
        sha256: sha(&[0x42; 1000]),
        deflate: false,
        meta: r#"{"content_type":"application/vnd.baton.bundle+json","purpose":"handoff"}"#.into(),
    };
    let frames = vec![
        entry("open_plain", &Frame::Open { id: ID, open: open.clone() }),
        entry(
            "open_deflate_no_meta",
            &Frame::Open {
                id: TransferId::new(1),
                open: Open {
                    payload_size: 50_000,
                    wire_size: 321,
                    chunk_size: 14_976,
                    sha256: [0xee; 32],
                    deflate: true,
                    meta: String::new(),
                },
            },
        ),
        entry("data_first", &Frame::Data { id: ID, index: 0, bytes: vec![0x42; 256] }),
        entry("data_last_short", &Frame::Data { id: ID, index: 3, bytes: vec![0x42; 232] }),
        entry(
            "ack_cumulative_only",
            &Frame::Ack { id: ID, ack: Ack { cumulative: 2, window: 32, ..Default::default() } },
        ),
        entry(
            "ack_selective",
            &Frame::Ack {
                id: ID,
                ack: Ack {
                    cumulative: 1,
                    window: 32,
                    ranges: vec![(2, 3), (5, 9)],
                    resume: false,
                    solicited: false,
                },
            },
        ),
        entry(
            "ack_resume_solicited",
            &Frame::Ack {
                id: ID,
                ack: Ack { cumulative: 0, window: 64, ranges: vec![(1, 2)], resume: true, solicited: true },
            },
        ),
        entry(
            "ack_resume_unsolicited",
            &Frame::Ack {
                id: ID,
                ack: Ack { cumulative: 4, window: 32, resume: true, ..Default::default() },
            },
        ),
        entry("complete", &Frame::Complete { id: ID, sha256: sha(&[0x42; 1000]) }),
        entry(
            "cancel_user",
            &Frame::Cancel { id: ID, code: ErrorCode::Cancelled, reason: "caller hung up".into() },
        ),
        entry(
            "error_too_large_utf8",
            &Frame::Error {
                id: ID,
                code: ErrorCode::TooLarge,
                reason: "bundle exceeds 32 MiB — trim history".into(),
            },
        ),
        entry(
            "error_unknown_code",
            &Frame::Error {
                id: TransferId::new(u128::MAX),
                code: ErrorCode::Other(999),
                reason: String::new(),
            },
        ),
        entry("resume", &Frame::Resume { id: ID, sent: 4 }),
    ];
    let codes: Vec<Value> =
        ErrorCode::ALL.iter().map(|c| json!({"code": c.to_u16(), "name": c.as_str()})).collect();
    json!({
        "description": "One valid frame of each kind; hex is the exact encoding, frame the decoded fields (ids and hashes as lowercase hex, ranges half-open).",
        "frames": frames,
        "error_codes": codes,
    })
}

fn invalid_vectors() -> Value {
    let good = Frame::Resume { id: ID, sent: 4 }.encode().unwrap();
    let with = |i: usize, b: u8| {
        let mut v = good.clone();
        v[i] = b;
        hex::encode(v)
    };
    let mut open = Frame::Open {
        id: ID,
        open: Open {
            payload_size: 10,
            wire_size: 10,
            chunk_size: MIN_CHUNK_SIZE,
            sha256: [0; 32],
            deflate: false,
            meta: String::new(),
        },
    }
    .encode()
    .unwrap();
    let mut small_chunk = open.clone();
    small_chunk[36..40].copy_from_slice(&255u32.to_be_bytes());
    let mut bad_utf8 = open.clone();
    bad_utf8[72..74].copy_from_slice(&1u16.to_be_bytes());
    bad_utf8.push(0xff);
    open[28..36].copy_from_slice(&11u64.to_be_bytes());
    let ack = |c: u32, ranges: &[(u32, u32)]| {
        let mut v = vec![0xba, 1, 3, 0];
        v.extend_from_slice(&ID.to_be_bytes());
        v.extend_from_slice(&c.to_be_bytes());
        v.extend_from_slice(&32u32.to_be_bytes());
        v.extend_from_slice(&(ranges.len() as u16).to_be_bytes());
        for (s, e) in ranges {
            v.extend_from_slice(&s.to_be_bytes());
            v.extend_from_slice(&e.to_be_bytes());
        }
        hex::encode(v)
    };
    let mut solicited_alone = hex::decode(ack(0, &[])).unwrap();
    solicited_alone[3] = 2;
    let mut longer = good.clone();
    longer.push(0);
    let data_empty = {
        let mut v = vec![0xba, 1, 2, 0];
        v.extend_from_slice(&ID.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v
    };
    let cases = vec![
        ("empty", String::new(), "truncated"),
        ("magic_only", "ba".into(), "truncated"),
        ("bad_magic", with(0, 0x7b), "bad_magic"),
        ("future_version", with(1, 2), "unsupported_version"),
        ("future_version_short", "ba09".into(), "unsupported_version"),
        ("unknown_kind", with(2, 0x42), "unknown_kind"),
        ("flags_on_resume", with(3, 1), "bad_flags"),
        ("solicited_without_resume", hex::encode(solicited_alone), "bad_flags"),
        ("header_truncated", hex::encode(&good[..19]), "truncated"),
        ("resume_truncated", hex::encode(&good[..23]), "truncated"),
        ("trailing_byte", hex::encode(longer), "trailing"),
        ("data_without_bytes", hex::encode(data_empty), "truncated"),
        ("open_chunk_too_small", hex::encode(small_chunk), "invalid"),
        ("open_wire_size_mismatch", hex::encode(open), "invalid"),
        ("open_meta_not_utf8", hex::encode(bad_utf8), "invalid"),
        ("ack_range_below_cumulative", ack(5, &[(5, 7)]), "invalid"),
        ("ack_ranges_adjacent", ack(1, &[(3, 5), (5, 7)]), "invalid"),
        ("ack_range_empty", ack(1, &[(3, 3)]), "invalid"),
        (
            "ack_range_count_lies",
            {
                let mut v = hex::decode(ack(1, &[(3, 5)])).unwrap();
                v[28..30].copy_from_slice(&2u16.to_be_bytes());
                hex::encode(v)
            },
            "truncated",
        ),
        ("too_large", hex::encode(vec![0xba; MAX_FRAME_SIZE + 1]), "too_large"),
    ];
    json!({
        "description": "Inputs every decoder must reject, with the stable name of the failure.",
        "invalid": cases.into_iter().map(|(n, h, e)| json!({"name": n, "hex": h, "error": e})).collect::<Vec<_>>(),
    })
}

/// The exact frames a sender emits on a perfect link (no compression, chunk size 256,
/// window 3), and the receiver's answers, to pin ordering and ack policy in both languages.
fn transfer_vectors() -> Value {
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
    let t0 = Instant::now();
    let cfg = SenderConfig { chunk_size: 256, window: 3, ..Default::default() };
    let mut s = Sender::new(ID, &payload, r#"{"purpose":"test"}"#, cfg, t0).unwrap();
    let mut first = vec![];
    while let Some(f) = s.poll_frame() {
        first.push(entry("", &f));
    }
    let compressible = vec![b'a'; 3000];
    let zcfg = SenderConfig { chunk_size: 256, window: 64, compress: true, ..Default::default() };
    let mut z = Sender::new(TransferId::new(7), &compressible, "", zcfg, t0 + Duration::ZERO).unwrap();
    let mut zframes = vec![];
    while let Some(f) = z.poll_frame() {
        zframes.push(hex::encode(f.encode().unwrap()));
    }
    json!({
        "description": "A sender's first flight for payload (chunk_size 256, window 3: OPEN then chunks 0..3), and a deflated transfer whose DATA bytes, concatenated and raw-inflated, give the payload (compressed bytes may differ between deflate implementations; only the inflated result is normative).",
        "plain": {
            "payload": hex::encode(&payload),
            "meta": r#"{"purpose":"test"}"#,
            "chunk_size": 256,
            "window": 3,
            "first_flight": first,
        },
        "deflate": {
            "payload": hex::encode(&compressible),
            "frames": zframes,
        },
    })
}

fn check(name: &str, expected: Value) {
    let path = dir().join(name);
    let text = serde_json::to_string_pretty(&expected).unwrap() + "\n";
    if std::env::var_os("BATON_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&path, &text).unwrap();
    }
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
            .unwrap();
    assert_eq!(on_disk, expected, "{name} differs from what this build encodes");
}

#[test]
fn frames_match_golden_vectors() {
    let v = frames_vectors();
    check("frames.json", v.clone());
    // Decoding the stored hex gives the stored fields (independent of how they were made).
    for e in v["frames"].as_array().unwrap() {
        let bytes = hex::decode(e["hex"].as_str().unwrap()).unwrap();
        let f = Frame::decode(&bytes).unwrap_or_else(|err| panic!("{}: {err}", e["name"]));
        assert_eq!(frame_json(&f), e["frame"], "{}", e["name"]);
    }
}

#[test]
fn invalid_inputs_match_golden_vectors() {
    let v = invalid_vectors();
    check("invalid.json", v.clone());
    for e in v["invalid"].as_array().unwrap() {
        let bytes = hex::decode(e["hex"].as_str().unwrap()).unwrap();
        let err = Frame::decode(&bytes).expect_err(e["name"].as_str().unwrap());
        assert_eq!(err.name(), e["error"], "{}", e["name"]);
    }
}

#[test]
fn transfer_matches_golden_vectors() {
    let v = transfer_vectors();
    check("transfer.json", v.clone());
    let kinds: Vec<&str> = v["plain"]["first_flight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["frame"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["open", "data", "data", "data"]);
    // The deflated stream inflates back to the payload.
    let frames: Vec<Frame> = v["deflate"]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Frame::decode(&hex::decode(h.as_str().unwrap()).unwrap()).unwrap())
        .collect();
    let mut wire = vec![];
    for f in &frames[1..] {
        if let Frame::Data { bytes, .. } = f {
            wire.extend_from_slice(bytes);
        }
    }
    assert!(
        matches!(&frames[0], Frame::Open { open, .. } if open.deflate && open.wire_size == wire.len() as u64)
    );
    let mut out = vec![];
    use std::io::Read;
    flate2::read::DeflateDecoder::new(&wire[..]).read_to_end(&mut out).unwrap();
    assert_eq!(hex::encode(out), v["deflate"]["payload"]);
}
