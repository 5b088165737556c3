//! Sans-IO chunked transfer of context bundles over LiveKit reliable data packets.
//!
//! A bundle (bytes plus a small metadata string) is split into chunks that each fit one
//! 15 000-byte packet on topic `baton.xfer`, sent under a sliding window, acknowledged
//! cumulatively and selectively, verified end to end with SHA-256, and resumed after a
//! reconnect from what the receiver holds. The wire format is specified in
//! `docs/protocol.md (section 4)`.
//!
//! # Why sans-IO
//!
//! Nothing here owns a socket, a clock, a task or a thread. Every input carries the current
//! time as a [`std::time::Instant`]; every output is a value the caller acts on. The IO shell
//! (the LiveKit room connection) feeds packets, timer expiries and reconnect notices in, and
//! publishes the packets that come out. Tests drive the same code with a simulated lossy link
//! and a virtual clock (an arbitrary base `Instant` plus offsets), so loss, reordering,
//! reconnects and timeouts are deterministic and fast.
//!
//! # Layers
//!
//! - [`frame`]: the binary codec ([`Frame::encode`], [`Frame::decode`]).
//! - [`Sender`] / [`Receiver`]: one transfer each, frame in, frame out.
//! - [`Receivers`]: all incoming transfers of a room with per-sender and total-buffer limits.
//! - [`Endpoint`]: both directions, bytes in, bytes out; what the shell drives.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod endpoint;
mod error;
pub mod frame;
mod id;
mod receiver;
mod sender;

pub use endpoint::{Endpoint, EndpointConfig, Event, Output, Receivers, ReceiversConfig};
pub use error::{ErrorCode, TransferError};
pub use frame::{Ack, DecodeError, Direction, EncodeError, Frame, Kind, Open};
pub use id::{ParseTransferIdError, TransferId};
pub use receiver::{Receiver, ReceiverConfig, ReceiverEvent};
pub use sender::{Sender, SenderConfig, SenderEvent};

/// LiveKit data topic for transfer frames.
pub const TOPIC: &str = "baton.xfer";
