//! Stable-toolchain stand-in for the fuzz targets: every decoder and the endpoint run over the
//! committed fuzz corpus and a few thousand deterministic mutations of it. Nothing may panic,
//! and whatever decodes must re-encode to the identical bytes (the encoding is canonical).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_transfer::{Endpoint, EndpointConfig, Frame, TransferId};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            3 => {
                for _ in 0..rng.below(16) {
                    v.push(rng.next() as u8);
                }
            }
            4 if v.len() >= 4 => {
                // Length and count fields are where decoders go wrong: write extreme values.
                let i = rng.below(v.len() - 3);
                let x: [u8; 4] = match rng.below(3) {
                    0 => [0xff; 4],
                    1 => [0; 4],
                    _ => (rng.next() as u32).to_be_bytes(),
                };
                v[i..i + 4].copy_from_slice(&x);
            }
            _ => {
                let n: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                v = [&[0xba, 1][..], &n].concat();
            }
        }
    }
    v
}

#[test]
fn decoder_total_and_canonical_on_corpus_and_mutations() {
    let seeds = corpus("decode_frame");
    assert!(seeds.len() >= 20, "seed corpus present");
    let mut rng = Rng(0x5eed_ba70_0000_0001);
    let (mut ok, mut err) = (0, 0);
    let inputs = seeds.iter().cloned().chain((0..6000).map(|i| mutate(&mut rng, &seeds[i % seeds.len()])));
    for input in inputs {
        match Frame::decode(&input) {
            Ok(f) => {
                ok += 1;
                assert_eq!(f.encode().expect("decoded frame encodes"), input);
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    // Both outcomes are exercised, or the mutations are not reaching the decoder's branches.
    assert!(ok > 500 && err > 500, "ok {ok}, err {err}");
}

#[test]
fn endpoint_survives_hostile_packets() {
    let seeds = corpus("decode_frame");
    let mut rng = Rng(42);
    let t0 = Instant::now();
    let mut ep = Endpoint::new(EndpointConfig::default());
    ep.send("agent-a", TransferId::new(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210), &[7u8; 40_000], "{}", t0)
        .unwrap();
    let mut now = t0;
    let mut outputs = 0usize;
    for i in 0..4000 {
        let pkt = if i % 3 == 0 {
            seeds[i % seeds.len()].clone()
        } else {
            let k = rng.below(seeds.len());
            mutate(&mut rng, &seeds[k])
        };
        now += Duration::from_millis(rng.below(50) as u64);
        let from = ["agent-a", "agent-b", "agent-c"][rng.below(3)];
        ep.handle_packet(from, &pkt, now);
        if i % 97 == 0 {
            ep.participant_reconnected(from, now);
        }
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        while ep.poll_output().is_some() {
            outputs += 1;
        }
    }
    assert!(outputs > 1000, "the endpoint reacted ({outputs} outputs)");
    // Limits held despite hostile OPENs.
    assert!(ep.receivers().buffered_bytes() <= 64 * 1024 * 1024);
}
