//! baton: keeps a LiveKit voice call alive and coherent while it passes between AI agents that
//! run in different processes.
//!
//! Layout: [`room`] is the LiveKit participant (signaling, the str0m peer connection, data,
//! audio); [`coordinator`] is baton's per-room logic, with no IO; [`protocol`] holds baton's
//! own wire messages; [`audio`] makes the filler. The sans-IO transfer engine and floor arbiter
//! live in their own crates (`crates/`), so the compiler keeps IO out of them.

pub mod audio;
pub mod config;
pub mod coordinator;
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod relay;
pub mod room;
pub mod server_api;
pub mod token;
pub mod worker;
