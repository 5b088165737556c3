//! The `baton.control` envelope decoder on arbitrary bytes.
//! The body is `lk_baton::fuzzing::control_envelope`, which `tests/no_panic.rs` also runs on stable.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lk_baton::fuzzing::control_envelope(data));
