//! Checkpoint payloads merged into one room's state, then its recovery bundles built.
//! The body is `lk_baton::fuzzing::checkpoint`, which `tests/no_panic.rs` also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lk_baton::fuzzing::checkpoint(data);
});
