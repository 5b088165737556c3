//! # baton-floor: who may speak in a baton room
//!
//! A sans-IO state machine, one per room, that decides which AI agent holds the floor (is
//! audible), runs handoffs from one agent to another, and covers every gap with baton's filler.
//! It has no sockets, clocks, threads or randomness: the IO shell feeds it [`Event`]s with the
//! current [`Instant`](std::time::Instant), executes the [`Command`]s it emits, and calls
//! [`Arbiter::handle_timeout`] when [`Arbiter::poll_timeout`] says so.
//!
//! ```
//! use std::time::Instant;
//! use baton_floor::{Arbiter, Event, Policy};
//!
//! let now = Instant::now();
//! let mut arbiter = Arbiter::new(Policy::with_agents(["triage", "billing"]), now).unwrap();
//! arbiter.handle(Event::RoomJoined { participants: vec![], token_dispatched: vec![] }, now);
//! while let Some(command) = arbiter.poll_command() {
//!     // execute: send data packet, call RoomService / AgentDispatchService, start filler...
//!     println!("{command:?}");
//! }
//! if let Some(deadline) = arbiter.poll_timeout() {
//!     // sleep until `deadline` or the next event, whichever comes first, then:
//!     arbiter.handle_timeout(deadline);
//! }
//! ```
//!
//! The invariant the arbiter keeps: at most one configured agent is activated or has a live
//! (unmuted) track at any time, and while a handoff has nobody audible, the filler plays; the
//! filler never plays longer than [`Policy::max_filler`] before baton falls back. Once the floor
//! has changed hands the filler plays on until the new holder is heard, at most
//! [`Policy::filler_hold`], then fades out.

#![warn(missing_docs)]

mod arbiter;
mod command;
mod dispatch;
mod envelope;
mod event;
mod policy;
mod timeline;

pub use arbiter::{Arbiter, HandoffStatus, MAX_TAILS_PER_HANDOFF};
/// The transfer engine's id type, re-exported: events and commands name bundles by it.
pub use baton_transfer::TransferId;
pub use command::{
    ActivateCause, Alert, BatonMessage, Command, DeactivateReason, FailReason, FillerCommand,
    MAX_CONTROL_MESSAGE, MAX_MESSAGE_ID, RefuseReason, SecurityEvent, SecurityReason,
};
pub use envelope::{Envelope, PROTOCOL_VERSION, TRACEPARENT_LEN};
pub use event::{
    AgentMessage, AudioTrack, DispatchTicket, Event, Participant, ParticipantKind, ToolCallStatus,
};
pub use policy::{
    MAX_AGENT_NAME, MAX_STANDBY, Policy, PolicyError, ReleasePolicy, Retry, Standby, StandbyFrom,
};
pub use timeline::{Kind, Mark, Outcome, Phase, Timeline, TimelineEvent};
