//! Recovery of a call whose agent crashed (issue 13): the checkpoints agents stream to baton while
//! the call runs, and the recovery bundle baton builds from them for the replacement.
//!
//! - [`checkpoint`]: parse a `baton.checkpoint/1` payload, merge it into the state baton keeps per
//!   agent name, and build the `baton.bundle/1` a replacement is hydrated from. Sans-IO.

pub mod checkpoint;
