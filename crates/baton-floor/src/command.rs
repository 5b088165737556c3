//! Outputs of the arbiter: what the IO shell must do, in order.

use std::time::Duration;

use baton_transfer::TransferId;
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, PROTOCOL_VERSION};
use crate::event::{DispatchTicket, ParticipantKind, ToolCallStatus};
use crate::policy::ReleasePolicy;
use crate::timeline::{Timeline, TimelineEvent};

/// Why baton refused a handoff request (`handoff_refused.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// Another handoff is under way in this room.
    HandoffInProgress,
    /// Only the agent holding the floor may hand it on.
    NotFloorHolder,
    /// The target is not a configured agent.
    UnknownTarget,
    /// The target is the requesting agent itself.
    SameAgent,
    /// The session is over (the caller left).
    SessionEnded,
    /// The `prepare` baton would forward to the target would not fit one data packet
    /// ([`MAX_CONTROL_MESSAGE`]) because of the request's `reason`: shorten it.
    ReasonTooLong,
    /// The `prepare` baton would forward would not fit one data packet even without the
    /// `reason`. Agent names (at most 128 bytes) and transfer ids (32 digits) keep every
    /// `prepare` baton builds today under the limit, so this is a guard, not a code an agent
    /// should see.
    MessageTooLarge,
}

impl RefuseReason {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::HandoffInProgress => "handoff_in_progress",
            RefuseReason::NotFloorHolder => "not_floor_holder",
            RefuseReason::UnknownTarget => "unknown_target",
            RefuseReason::SameAgent => "same_agent",
            RefuseReason::SessionEnded => "session_ended",
            RefuseReason::ReasonTooLong => "reason_too_long",
            RefuseReason::MessageTooLarge => "message_too_large",
        }
    }
}

/// Why a handoff (or one target of it) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The target was dispatched but never joined within `join_timeout` (every attempt).
    TargetNoShow,
    /// CreateDispatch failed on every attempt.
    DispatchFailed,
    /// The target joined but did not send `ready` within `ready_timeout`.
    TargetNotReady,
    /// The target left the room before taking the floor.
    TargetLeft,
    /// The bundle could not be moved (to the target, or from the source).
    DeliveryFailed,
    /// The source announced a bundle that did not arrive within `bundle_timeout`.
    BundleTimeout,
    /// The caller heard filler for `max_filler` without a target taking over.
    FillerLimit,
    /// The caller left; everything was cancelled.
    CallerLeft,
}

impl FailReason {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::TargetNoShow => "target_no_show",
            FailReason::DispatchFailed => "dispatch_failed",
            FailReason::TargetNotReady => "target_not_ready",
            FailReason::TargetLeft => "target_left",
            FailReason::DeliveryFailed => "delivery_failed",
            FailReason::BundleTimeout => "bundle_timeout",
            FailReason::FillerLimit => "filler_limit",
            FailReason::CallerLeft => "caller_left",
        }
    }
}

/// Why an agent is being activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivateCause {
    /// It is the first agent of the call.
    Start,
    /// It is the target of a handoff and has the context.
    Handoff,
    /// A handoff it asked for failed; it has the floor again.
    Handback,
    /// It replaces an agent that crashed, from that agent's last checkpoint (docs/protocol.md,
    /// "Checkpoints, heartbeats and recovery").
    Recovery,
}

/// Why an agent is being deactivated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeactivateReason {
    /// It asked for a handoff: finish the sentence, then go quiet.
    Handoff,
    /// It is in the room but not holding the floor: stay silent until activated.
    Standby,
}

/// A control message from baton to one agent: the `type` tag and members of an
/// [`Envelope`], which the shell sends with its own `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BatonMessage {
    /// Turn audio input and output on: you have the floor.
    Activate {
        /// The handoff this activation concludes, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        handoff: Option<String>,
        /// Why.
        cause: ActivateCause,
        /// For a handback, why the handoff failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<FailReason>,
    },
    /// Turn audio output and input off (after the current sentence when `reason` is `handoff`).
    Deactivate {
        /// The handoff this belongs to, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        handoff: Option<String>,
        /// Why.
        reason: DeactivateReason,
    },
    /// The handoff request was accepted under this handoff id.
    HandoffAccepted {
        /// The handoff id, used in every later message about it.
        handoff: String,
        /// The agent the call is going to.
        target: String,
    },
    /// The handoff request was refused; the requester keeps the floor (if it had it).
    HandoffRefused {
        /// Why.
        reason: RefuseReason,
    },
    /// To a handoff source that plays a filler of its own (`filler` in its request): fade it
    /// out over `fade_ms` and stop; baton's own filler fades the same way at the same moment.
    FillerStop {
        /// The handoff the filler covered.
        handoff: String,
        /// The fade-out, ms (0: stop at once).
        fade_ms: u32,
    },
    /// To the target: you are taking over this call; load the bundle and send `ready`.
    Prepare {
        /// The handoff id.
        handoff: String,
        /// The source agent's name.
        source: String,
        /// The source's reason for the handoff.
        reason: String,
        /// The transfer id of the bundle, when baton knows it already.
        #[serde(skip_serializing_if = "Option::is_none")]
        transfer: Option<TransferId>,
        /// Whether a bundle will be delivered at all.
        bundle: bool,
        /// `recovery` when the target replaces a crashed agent (its bundle is that agent's last
        /// checkpoint, `source` is the crashed agent's name, `handoff` the recovery's id);
        /// absent for a handoff.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<ActivateCause>,
        /// For a recovery: whether the replacement should say one short sentence that shows it
        /// still knows the conversation when it is activated (policy `recovery_greeting`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        greeting: Option<bool>,
    },
    /// To the target: the bundle announced in `prepare` will not come (the source left first);
    /// take over with what you have.
    BundleUnavailable {
        /// The handoff id.
        handoff: String,
    },
    /// To a target that will not get the floor after all: drop the prepared context, stay silent.
    HandoffCancelled {
        /// The handoff id.
        handoff: String,
        /// Why.
        reason: FailReason,
    },
    /// To the source: the handoff failed. Followed by `activate` (cause `handback`).
    HandoffFailed {
        /// The handoff id.
        handoff: String,
        /// The agent that could not take the call (the last one tried).
        target: String,
        /// Why.
        reason: FailReason,
    },
    /// To the source after a completed handoff: leave the room, or stay as a muted standby.
    Release {
        /// The handoff id.
        handoff: String,
        /// Leave or stay.
        mode: ReleasePolicy,
    },
    /// A source's `tool_result`, forwarded to the agent that continues the call; `source` is
    /// the sender's agent name.
    ToolResult {
        /// The handoff whose bundle carried the call in flight.
        handoff: String,
        /// The source's agent name.
        source: String,
        /// The call's id.
        call_id: String,
        /// The tool.
        name: String,
        /// Whether the tool returned or was cancelled.
        status: ToolCallStatus,
        /// The output is an error.
        is_error: bool,
        /// What the tool returned.
        output: String,
        /// The source cut `output` to fit one packet.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// A source's `tail`, forwarded to the handoff's target (before its `activate`), or to
    /// the floor holder when it comes after the handoff completed; `source` is the sender's
    /// agent name.
    Tail {
        /// The handoff whose bundle this completes.
        handoff: String,
        /// The source's agent name.
        source: String,
        /// Chat items as the source sent them (docs/bundle.md's item format).
        items: Vec<serde_json::Value>,
        /// The source's user state, when it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_state: Option<serde_json::Value>,
    },
}

/// The largest control message that fits one LiveKit data packet, in bytes of encoded JSON:
/// LiveKit documents 15 KiB for a reliable packet and baton keeps 15 000 (docs/protocol.md,
/// section 1).
pub const MAX_CONTROL_MESSAGE: usize = 15_000;

/// The longest envelope `id` (and so `re`) the protocol allows, in bytes (docs/protocol.md,
/// section 2).
pub const MAX_MESSAGE_ID: usize = 64;

impl BatonMessage {
    /// The size in bytes of this message as one `baton.control` envelope
    /// (`{"v":1,"type":...,"id":...,"re":...,<members>}`, compact JSON, non-ASCII as UTF-8), with
    /// the longest `id` the protocol allows ([`MAX_MESSAGE_ID`]), so an upper bound of what
    /// the shell sends whatever id it mints, and with a `traceparent` (which the shell adds to
    /// a handoff's messages while it exports traces). The arbiter never emits a message for which this is
    /// over [`MAX_CONTROL_MESSAGE`]: it refuses a `handoff` whose `prepare` would be
    /// ([`RefuseReason::ReasonTooLong`]), cuts a forwarded `tool_result`'s `output`, and keeps
    /// configured agent names short ([`MAX_AGENT_NAME`](crate::policy::MAX_AGENT_NAME)).
    pub fn envelope_len(&self, re: Option<&str>) -> usize {
        let id = "i".repeat(MAX_MESSAGE_ID);
        let envelope = Envelope {
            v: PROTOCOL_VERSION,
            id,
            re: re.map(str::to_owned),
            traceparent: Some("0".repeat(crate::envelope::TRACEPARENT_LEN)),
            message: self,
        };
        envelope.encode().map_or(usize::MAX, |bytes| bytes.len())
    }

    /// The handoff (or recovery) this message is about, if any.
    pub fn handoff(&self) -> Option<&str> {
        match self {
            BatonMessage::Activate { handoff, .. } | BatonMessage::Deactivate { handoff, .. } => {
                handoff.as_deref()
            }
            BatonMessage::HandoffAccepted { handoff, .. }
            | BatonMessage::Prepare { handoff, .. }
            | BatonMessage::BundleUnavailable { handoff }
            | BatonMessage::HandoffCancelled { handoff, .. }
            | BatonMessage::HandoffFailed { handoff, .. }
            | BatonMessage::Release { handoff, .. }
            | BatonMessage::FillerStop { handoff, .. }
            | BatonMessage::ToolResult { handoff, .. }
            | BatonMessage::Tail { handoff, .. } => Some(handoff),
            BatonMessage::HandoffRefused { .. } => None,
        }
    }

    /// The envelope `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            BatonMessage::Activate { .. } => "activate",
            BatonMessage::Deactivate { .. } => "deactivate",
            BatonMessage::HandoffAccepted { .. } => "handoff_accepted",
            BatonMessage::HandoffRefused { .. } => "handoff_refused",
            BatonMessage::FillerStop { .. } => "filler_stop",
            BatonMessage::Prepare { .. } => "prepare",
            BatonMessage::BundleUnavailable { .. } => "bundle_unavailable",
            BatonMessage::HandoffCancelled { .. } => "handoff_cancelled",
            BatonMessage::HandoffFailed { .. } => "handoff_failed",
            BatonMessage::Release { .. } => "release",
            BatonMessage::ToolResult { .. } => "tool_result",
            BatonMessage::Tail { .. } => "tail",
        }
    }
}

/// Why a control message was ignored as a security matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SecurityReason {
    /// The sender is not a participant baton knows.
    UnknownParticipant,
    /// The sender is not of kind AGENT (a caller's client, for instance).
    NotAnAgent,
    /// The sender is an agent without an `lk.agent.name` attribute.
    UnnamedAgent,
    /// The sender's agent name is not in the configured agent set.
    AgentNotConfigured {
        /// Its agent name.
        agent_name: String,
    },
    /// `hello` claimed a name different from the server-stamped attribute.
    NameMismatch {
        /// The name in the message.
        claimed: String,
        /// The attribute.
        actual: String,
    },
}

/// A control message or bundle from someone not allowed to send it. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    /// The server-stamped sender.
    pub from: String,
    /// The sender's kind, if known.
    #[serde(skip)]
    pub kind: Option<ParticipantKind>,
    /// The message type (or `bundle`).
    pub message_type: &'static str,
    /// Why it was refused.
    pub reason: SecurityReason,
}

/// Something an operator should see. Serialises as baton's `alert` event (`docs/events.md`):
/// `alert` names the variant, its fields alongside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
pub enum Alert {
    /// An agent never joined after every dispatch attempt. The message to log says which.
    AgentNoShow {
        /// The agent name.
        agent_name: String,
        /// How many dispatches were tried.
        attempts: u32,
        /// The last API error, if the dispatch itself failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
    },
    /// One CreateDispatch call failed (it may be retried).
    DispatchFailed {
        /// The agent name.
        agent_name: String,
        /// Which attempt.
        attempt: u32,
        /// The API error.
        error: String,
    },
    /// A handoff failed with nobody to hand back to (its source left): no agent is talking to
    /// the caller. (A floor holder that leaves outside a handoff is replaced by a recovery.)
    FloorVacant {
        /// The agent that left, or the failed handoff's source.
        identity: String,
    },
    /// A crashed agent could not be replaced: every replacement (and alternate) failed. The
    /// caller heard the filler to its hold limit; an agent of that name that joins later gets
    /// the call with the last checkpoint.
    RecoveryFailed {
        /// The crashed agent's name.
        agent: String,
        /// The crashed participant.
        identity: String,
        /// Why the last replacement failed.
        reason: FailReason,
    },
    /// An authorised agent sent a message that does not fit the current state.
    IgnoredMessage {
        /// The sender.
        from: String,
        /// The message type.
        message_type: &'static str,
        /// Why it was ignored.
        why: &'static str,
    },
}

/// What baton's filler track (comfort noise or a clip) must do. The arbiter emits them in the
/// order `Arm`, `On`, `FadeOut`, `Off` within a handoff (`On` and `FadeOut` only when the gap
/// needed the filler); see [`Policy::filler_hold`](crate::Policy::filler_hold) for when the
/// fade starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillerCommand {
    /// A handoff was accepted: unmute baton's track and send encoded silence, so subscribers'
    /// receivers are already playing baton's stream and the filler can start within one audio
    /// frame once the source is quiet.
    Arm,
    /// Play the filler at full level, now.
    On,
    /// Fade the filler to silence over this long (zero: cut); the track stays unmuted.
    FadeOut(Duration),
    /// No handoff needs the track any more: mute it, after any fade under way has finished.
    Off,
}

/// One thing for the shell to do. Execute in the order polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send a control message, addressed to `to` only.
    Send {
        /// Destination identity.
        to: String,
        /// The envelope `id` this replies to.
        re: Option<String>,
        /// The message.
        message: BatonMessage,
    },
    /// RoomService.MutePublishedTrack(muted = true).
    MuteTrack {
        /// Whose track.
        identity: String,
        /// Which track.
        track_sid: String,
    },
    /// RoomService.MutePublishedTrack(muted = false); needs `enable_remote_unmute`.
    UnmuteTrack {
        /// Whose track.
        identity: String,
        /// Which track.
        track_sid: String,
    },
    /// Change baton's filler track; the arbiter decides the filler's whole lifecycle.
    Filler(FillerCommand),
    /// AgentDispatchService.CreateDispatch; report the result with the same ticket.
    CreateDispatch {
        /// Echo in [`Event::DispatchCreated`](crate::Event::DispatchCreated) or
        /// [`Event::DispatchFailed`](crate::Event::DispatchFailed).
        ticket: DispatchTicket,
        /// The agent name to dispatch.
        agent_name: String,
        /// Dispatch metadata (JSON naming the handoff), passed to the agent's job.
        metadata: String,
    },
    /// AgentDispatchService.DeleteDispatch.
    DeleteDispatch {
        /// The dispatch id.
        dispatch_id: String,
        /// The agent name, for logs.
        agent_name: String,
    },
    /// Send the held bundle `transfer_id` to `to` with the transfer engine.
    DeliverBundle {
        /// The transfer id.
        transfer_id: TransferId,
        /// The receiver.
        to: String,
    },
    /// Abort a transfer to `to`.
    CancelTransfer {
        /// The transfer id.
        transfer_id: TransferId,
        /// The receiver.
        to: String,
    },
    /// An agent was declared crashed (`identity`, agent name `agent`) and the recovery
    /// `recovery` replaces it: refuse its later checkpoints, build the recovery bundle from its
    /// agent name's last checkpoint, and report it with
    /// [`Event::RecoveryBundle`](crate::Event::RecoveryBundle) (with no bundle when baton holds
    /// no checkpoint for that name).
    AgentCrashed {
        /// The crashed participant.
        identity: String,
        /// Its agent name.
        agent: String,
        /// The recovery id (`r-1`, `r-2`, ... per room).
        recovery: String,
        /// `recovery after <signal>`, the bundle's `reason`.
        reason: String,
    },
    /// Ask the server whether `identity`'s agent job is still running (AgentDispatchService
    /// ListDispatch, the job's `state.participant_identity` and `status`); report a job that
    /// ended with [`Event::JobEnded`](crate::Event::JobEnded), nothing otherwise.
    CheckJob {
        /// The agent participant.
        identity: String,
    },
    /// RoomService.RemoveParticipant (a released source that did not leave, a crashed agent
    /// that lingers).
    RemoveParticipant {
        /// Who.
        identity: String,
    },
    /// One timeline mark: log as a tracing event.
    Timeline(TimelineEvent),
    /// A handoff or a recovery is over: write its timeline as one JSON line.
    HandoffFinished(Box<Timeline>),
    /// A security event: log it.
    Security(SecurityEvent),
    /// An operator alert: log it.
    Alert(Alert),
    /// The caller left and everything is cleaned up: baton should leave the room.
    SessionEnded,
}
