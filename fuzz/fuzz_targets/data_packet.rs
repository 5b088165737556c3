//! LiveKit data packets as baton receives them from the server, on arbitrary bytes.
//! The body is `lk_baton::fuzzing::data_packet`, which `tests/no_panic.rs` also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lk_baton::fuzzing::data_packet(data));
