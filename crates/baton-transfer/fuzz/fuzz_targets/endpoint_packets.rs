//! A sequence of packets (split on 0xff 0x00 0xff) from two participants into one endpoint that is
//! also sending: the state machines must never panic on hostile input.
#![no_main]

use std::time::{Duration, Instant};

use baton_transfer::{Endpoint, EndpointConfig, TransferId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(EndpointConfig::default());
    let _ = ep.send("agent-a", TransferId::new(1), &[7u8; 40_000], "{}", t0);
    let mut now = t0;
    for (i, pkt) in data.split(|&b| b == 0xff).enumerate() {
        now += Duration::from_millis(u64::from(pkt.first().copied().unwrap_or(0)));
        let from = if i % 2 == 0 { "agent-a" } else { "agent-b" };
        ep.handle_packet(from, pkt, now);
        if i % 7 == 3 {
            ep.participant_reconnected(from, now);
        }
        if let Some(t) = ep.poll_timeout() {
            if t <= now {
                ep.handle_timeout(now);
            }
        }
        while ep.poll_output().is_some() {}
    }
});
