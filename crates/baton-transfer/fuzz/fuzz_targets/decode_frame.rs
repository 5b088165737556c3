//! Any bytes: decoding must not panic, and whatever decodes must re-encode to the same bytes
//! (the encoding is canonical, so two implementations can be compared byte for byte).
#![no_main]

use baton_transfer::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let again = frame.encode().expect("a decoded frame is encodable");
        assert_eq!(again, data);
    }
});
