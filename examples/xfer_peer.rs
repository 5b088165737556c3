//! A Rust agent for `bench/transfer.py --rust-agents`: it joins a room through baton's own room
//! stack (str0m, no libwebrtc) and either sends one random bundle to another agent through baton
//! (`--send BYTES --to IDENTITY`) or receives one (`--receive`), using the same transfer engine
//! as baton. It shows what the transfer protocol does when the agents are not Python SDK
//! processes (whose libwebrtc logging costs most of their CPU, see docs/BENCHMARKS.md).
//!
//! Prints `ready` once in the room, then one JSON line: the sender
//! `{"t0": s, "stored": s, "bytes": n, "sha256": hex}` (baton confirmed leg 1), the receiver
//! `{"done": s, "bytes": n, "sha256": hex}`; times are seconds on the system clock, comparable
//! between processes on one machine. On failure one `{"error": "..."}` line.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_transfer::{Endpoint, EndpointConfig, Event, Output, TOPIC, TransferId};
use clap::Parser;
use lk_baton::audio::filler::FillerSound;
use lk_baton::room::{self, Change, Incoming, Outbox, RoomHandler, RoomParams, Roster, TokenSource};
use sha2::Digest;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "LIVEKIT_URL")]
    url: String,
    #[arg(long, env = "LIVEKIT_API_KEY")]
    api_key: String,
    #[arg(long, env = "LIVEKIT_API_SECRET")]
    api_secret: String,
    #[arg(long)]
    room: String,
    #[arg(long)]
    identity: String,
    /// Send this many random bytes (to `--to`, through baton).
    #[arg(long)]
    send: Option<usize>,
    #[arg(long, default_value = "")]
    to: String,
    /// Receive one bundle from baton.
    #[arg(long)]
    receive: bool,
}

struct Agent {
    endpoint: Endpoint,
    present: BTreeSet<String>,
    payload: Option<Vec<u8>>,
    to: String,
    t0: Option<f64>,
    finished: bool,
}

fn clock() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Agent {
    fn try_start(&mut self, now: Instant, out: &mut Outbox) {
        if self.t0.is_some() || !self.present.contains("baton") || !self.present.contains(&self.to) {
            return;
        }
        let Some(payload) = self.payload.as_ref() else { return };
        let meta = serde_json::json!({"to": self.to}).to_string();
        self.t0 = Some(clock());
        if let Err(e) = self.endpoint.send("baton", TransferId::new(rand::random()), payload, &meta, now) {
            self.fail(&e.to_string());
        }
        self.pump(out);
    }

    fn fail(&mut self, why: &str) {
        emit(serde_json::json!({ "error": why }));
        self.finished = true;
    }

    fn pump(&mut self, out: &mut Outbox) {
        while let Some(o) = self.endpoint.poll_output() {
            match o {
                Output::Transmit { to, payload } => out.send_bulk(TOPIC, payload, &to),
                Output::Event(Event::Sent { .. }) => {
                    let payload = self.payload.take().unwrap_or_default();
                    emit(serde_json::json!({
                        "t0": self.t0, "stored": clock(), "bytes": payload.len(), "sha256": hex(&payload),
                    }));
                    self.finished = true;
                }
                Output::Event(Event::Received { payload, .. }) => {
                    let done = clock();
                    emit(
                        serde_json::json!({ "done": done, "bytes": payload.len(), "sha256": hex(&payload) }),
                    );
                    self.finished = true;
                }
                Output::Event(Event::SendFailed { error, .. } | Event::ReceiveFailed { error, .. }) => {
                    self.fail(&error.to_string())
                }
                Output::Event(_) => {}
            }
        }
    }
}

impl RoomHandler for Agent {
    fn on_data(&mut self, msg: &Incoming, now: Instant, out: &mut Outbox) {
        if msg.topic == TOPIC {
            self.endpoint.handle_packet(&msg.from, &msg.payload, now);
            self.pump(out);
        }
    }

    fn on_change(&mut self, change: &Change, _roster: &Roster, now: Instant, out: &mut Outbox) {
        match change {
            Change::Joined(m) => {
                self.present.insert(m.identity.clone());
            }
            Change::Left(m) => {
                self.present.remove(&m.identity);
            }
            Change::Updated { .. } => {}
        }
        self.try_start(now, out);
    }

    fn on_connected(&mut self, roster: &Roster, now: Instant, out: &mut Outbox) {
        self.present = roster.members().map(|m| m.identity.clone()).collect();
        emit(serde_json::json!("ready"));
        self.try_start(now, out);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    fn on_timeout(&mut self, now: Instant, out: &mut Outbox) {
        self.endpoint.handle_timeout(now);
        self.pump(out);
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.send.is_some() == args.receive {
        anyhow::bail!("give exactly one of --send BYTES (with --to) and --receive");
    }
    let payload = args.send.map(|n| (0..n).map(|_| rand::random::<u8>()).collect::<Vec<u8>>());
    let agent = Agent {
        endpoint: Endpoint::new(EndpointConfig::default()),
        present: BTreeSet::new(),
        payload,
        to: args.to,
        t0: None,
        finished: false,
    };
    let params = RoomParams {
        url: args.url,
        token: TokenSource::Mint {
            api_key: args.api_key,
            api_secret: args.api_secret,
            room: args.room,
            identity: args.identity,
        },
        start_unmuted: false,
        filler: FillerSound::configured(None, 0.0, -60.0)?,
        rejoin_deadline: Duration::from_secs(10),
        drop_signal: Arc::new(tokio::sync::Notify::new()),
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    room::run(params, Box::new(agent), rx).await?;
    Ok(())
}
