//! baton's per-room logic (control messages, floor arbiter, bundle relay) fed hostile packet
//! sequences from two agents and the caller, with time passing and people leaving and returning.
//! The body is `lk_baton::fuzzing::coordinator_packets`, which `tests/no_panic.rs` also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    lk_baton::fuzzing::coordinator_packets(data);
});
