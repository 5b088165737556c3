//! baton's side of context transfer: receive a bundle from a source agent, keep it, deliver it
//! to a target agent. The semantics (two legs, ids, when the source is acknowledged, who may
//! send and receive, retention) are specified in `docs/protocol.md`, section 4.10.
//!
//! ```text
//!  source agent ──leg 1 (id T, chosen by the source)──▶ baton ──leg 2 (id D, chosen by baton)──▶ target agent
//!               ◀── ACK … COMPLETE = stored and verified       ◀── ACK … COMPLETE = delivered and verified
//! ```
//!
//! - **Leg 1** ends when baton has verified the SHA-256 and put the bundle in its
//!   [`BundleStore`]; that is what the source's COMPLETE means. It does not wait for the
//!   target, which may not even have been dispatched yet.
//! - **Leg 2** is a new transfer with a fresh random id per delivery attempt, carrying the same
//!   bytes, the same SHA-256 and the source's meta string unchanged. The SHA-256 is the end to
//!   end correlation. A fresh id means a redelivery after a failure is never answered with the
//!   target's remembered verdict for the failed attempt.
//! - Only configured agents may send bundles to baton, and bundles go only to agent
//!   participants ([`members`]).
//! - The store has a byte cap; an OPEN that would not fit in what the store has left (counting
//!   transfers already accepted and still arriving) is refused with `buffer_full` before
//!   anything is buffered.
//! - A transfer whose OPEN meta says `"purpose":"checkpoint"` is not a bundle: once whole it is
//!   merged into the room's [`Checkpoints`](crate::recovery::checkpoint::Checkpoints) (any
//!   configured agent may send one, not only the floor holder), and its COMPLETE means
//!   "applied"; a refusal replaces the COMPLETE with ERROR 14 `checkpoint_rejected` (6
//!   `buffer_full` over the room's cap). After a crash, [`Relay::recovery_bundle`] turns an
//!   agent's merged state into a stored bundle that is delivered like a handoff's
//!   (`docs/protocol.md`, "Checkpoints, heartbeats and recovery").
//!
//! Layout:
//!
//! - [`relay`](Relay): the [`Relay`] state machine (sans-IO: packets, roster changes and timer
//!   expiries in, packets to publish and [`RelayEvent`]s out).
//! - [`store`]: the [`BundleStore`] trait and the in-memory [`MemoryStore`].
//! - [`members`]: who may send bundles to baton and who may receive them.

pub mod members;
#[allow(clippy::module_inception)] // the relay module's main type, next to its store and members
mod relay;
pub mod store;
#[cfg(test)]
mod tests;

pub use relay::{Relay, RelayConfig, RelayError, RelayEvent, Routing, Transmit};
pub use store::{BundleInfo, BundleStore, MemoryStore, StoreError, StoreUsage, StoredBundle};
