//! Checkpoint write latency of the room-state stores (`./scripts/bench failover` runs it):
//! `--writes N` checkpoint writes of `--bytes B` each, through the worker's store task as a room
//! makes them (request → durable answer), to the embedded store (a redb file in a temporary
//! directory) and to Redis (`--redis-url`, a running server). Prints one JSON object per store:
//! `{"store": ..., "writes": N, "bytes": B, "p50_ms": ..., "p95_ms": ..., "max_ms": ...}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lk_baton::store::{Acquired, EmbeddedStore, RedisStore, StateStore, StoreHandle, Write, spawn};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

async fn measure(name: &str, handle: StoreHandle, writes: usize, bytes: usize) {
    let room = format!("bench-{}", std::process::id());
    let token = match handle.acquire(&room, "bench", Duration::from_secs(60)).await {
        Ok(Acquired::Held(lease)) => lease.token,
        other => {
            eprintln!("{name}: no lease: {other:?}");
            return;
        }
    };
    let mut ms = Vec::with_capacity(writes);
    for n in 0..writes {
        let payload = vec![b'a' + (n % 26) as u8; bytes];
        let write = Write::Checkpoint { agent: "triage".into(), owner: "agent-1".into(), payload };
        let started = Instant::now();
        if let Err(e) = handle.write(&room, token, write).await {
            eprintln!("{name}: write failed: {e}");
            return;
        }
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = handle.write(&room, token, Write::Forget).await;
    ms.sort_by(f64::total_cmp);
    println!(
        "{{\"store\":\"{name}\",\"writes\":{writes},\"bytes\":{bytes},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"max_ms\":{:.3}}}",
        percentile(&ms, 0.5),
        percentile(&ms, 0.95),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

fn start<S: StateStore>(store: S) -> StoreHandle {
    spawn(store, Arc::new(|_| {}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let writes: usize = arg("--writes", "200").parse().unwrap_or(200);
    let bytes: usize = arg("--bytes", "20000").parse().unwrap_or(20000);
    let dir = std::env::temp_dir().join(format!("baton-store-bench-{}", std::process::id()));
    match EmbeddedStore::open(&dir, 64 << 20, Duration::from_secs(600)) {
        Ok(store) => measure("embedded", start(store), writes, bytes).await,
        Err(e) => eprintln!("embedded: {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    let url = arg("--redis-url", "");
    if !url.is_empty() {
        match RedisStore::new(&url, 64 << 20, Duration::from_secs(600)) {
            Ok(store) => measure("redis", start(store), writes, bytes).await,
            Err(e) => eprintln!("redis: {e}"),
        }
    }
}
