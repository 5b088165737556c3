//! The shared checkpoint vector (`tests/vectors/checkpoint/`, see the README there): baton merges
//! the chain and must build exactly `bundle.json`, which the Python adapter's test validates with
//! `lk_baton.bundle` (summary recomputed there). `BLESS=1` rewrites `bundle.json`.

use std::path::PathBuf;

use lk_baton::recovery::checkpoint::{Checkpoints, Limits};
use serde_json::Value;

#[test]
fn chain_builds_the_shared_bundle() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/checkpoint");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json"))
            .expect("JSON");
    let mut room = Checkpoints::new(Limits::default());
    let mut agent = String::new();
    for step in cases["chain"].as_array().expect("chain") {
        let payload = serde_json::to_vec(&step["payload"]).expect("encode");
        let applied = room
            .apply(step["identity"].as_str().expect("identity"), step["agent_name"].as_str(), &payload)
            .unwrap_or_else(|e| panic!("{e}"));
        agent = applied.agent;
    }
    let merged = room.get(&agent).expect("merged state");
    let got = merged.recovery_bundle(
        cases["reason"].as_str().expect("reason"),
        cases["handoff_id"].as_str(),
        cases["created_at"].as_f64().expect("created_at"),
    );
    let path = dir.join("bundle.json");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &got).expect("write bundle.json");
    }
    let want = std::fs::read(&path).expect("bundle.json");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
    let b: Value = serde_json::from_slice(&got).expect("JSON");
    assert_eq!(b["summary"]["counts"]["items"], 8);
    assert_eq!(b["tool_calls_in_flight"][0]["call_id"], "call_2");
}
