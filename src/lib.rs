//! baton: keeps a LiveKit voice call alive and coherent while it passes between AI agents that
//! run in different processes.
//!
//! # Layout
//!
//! The decisions live in sans-IO crates of their own (`crates/`), so the compiler keeps IO out
//! of them: `baton-floor` (who may be heard, handoffs, the filler) and `baton-transfer`
//! (acknowledged, chunked transfer of context bundles). This crate holds the rest:
//!
//! - [`coordinator`]: baton's logic in one room, no IO: arbiter, relay, and the loop between them.
//! - [`recovery`]: checkpoints agents stream to baton, merged per agent name, and the recovery bundle.
//! - [`relay`]: context transfer at baton (`baton.xfer`), sans-IO: the relay, its `BundleStore`, who may send.
//! - [`protocol`]: baton's own wire messages: the `baton.control` codec, topics, the packet limit.
//! - [`room`]: baton as a LiveKit participant: signaling, the str0m peer connection, data, the filler track.
//! - [`store`]: durable room state (floor, handoff, checkpoints, lease) in a redb file or Redis, behind one trait.
//! - [`server_api`]: the LiveKit server API calls baton makes (dispatch, mute, remove), as values.
//! - [`audio`]: the filler sound: comfort noise or a clip, encoded to Opus once and looped.
//! - [`observe`]: what happens in rooms as an event stream, webhook, metrics, traces and a timeline page.
//! - [`worker`]: `baton worker`, a LiveKit agent worker running one room task per job.
//! - [`config`]: `configs/baton.toml` and the worker's options, merged into a floor `Policy`.
//! - [`logging`]: log setup; security warnings rate-limited with counts.
//! - [`token`]: access tokens baton mints for itself.
//! - `fuzzing`: entry points of the fuzz targets and `tests/no_panic.rs` (hidden).
//!
//! `src/main.rs` is the `baton` command (`join`, `worker`, `ensure`).

pub mod audio;
pub mod config;
pub mod coordinator;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod observe;
pub mod protocol;
pub mod recovery;
pub mod relay;
pub mod room;
pub mod server_api;
pub mod store;
pub mod token;
pub mod worker;
