//! Stable-toolchain run of the fuzz targets in `fuzz/`: the same entry points
//! (`lk_baton::fuzzing`) over the committed corpus and seeded random mutations of it.
//! `cargo +nightly fuzz` explores further; this keeps every `./scripts/test` honest.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).expect("corpus file")).collect()
}

/// Flips, overwrites, cuts, extends and splices: cheap stand-ins for libFuzzer's mutations.
fn mutations(seeds: &[Vec<u8>], n: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(move |_| {
        let mut v = seeds[rng.random_range(0..seeds.len())].clone();
        for _ in 0..rng.random_range(1..=4) {
            let len = v.len();
            match rng.random_range(0..5) {
                0 if len > 0 => v[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                1 if len > 0 => v[rng.random_range(0..len)] = rng.random(),
                2 => v.truncate(rng.random_range(0..=len)),
                3 => v.extend((0..rng.random_range(0..32)).map(|_| rng.random::<u8>())),
                _ => {
                    let other = &seeds[rng.random_range(0..seeds.len())];
                    let at = rng.random_range(0..=len);
                    v.splice(at..at, other.iter().copied());
                }
            }
        }
        v
    })
}

fn run<T>(target: &str, n: usize, f: fn(&[u8]) -> T) -> Vec<T> {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "{target}: no corpus");
    seeds.iter().cloned().chain(mutations(&seeds, n, 0x5eed)).map(|input| f(&input)).collect()
}

#[test]
fn control_envelope_never_panics() {
    run("control_envelope", 20_000, lk_baton::fuzzing::control_envelope);
}

#[test]
fn data_packet_never_panics() {
    run("data_packet", 20_000, lk_baton::fuzzing::data_packet);
}

#[test]
fn coordinator_never_panics_on_hostile_packet_sequences() {
    let sent = run("coordinator_packets", 3_000, lk_baton::fuzzing::coordinator_packets);
    // The sequences get past the decoders into the floor logic: baton answers many of them.
    let answered = sent.iter().filter(|&&n| n > 0).count();
    assert!(answered > 300, "only {answered} of {} sequences got an answer", sent.len());
}

#[test]
fn checkpoint_merge_never_panics() {
    let applied = run("checkpoint", 5_000, lk_baton::fuzzing::checkpoint);
    // Mutations of a valid chain still reach the merge often enough to exercise it.
    let merged = applied.iter().filter(|&&n| n > 0).count();
    assert!(merged > 500, "only {merged} of {} inputs applied a checkpoint", applied.len());
}
