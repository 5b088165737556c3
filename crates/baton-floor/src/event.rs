//! Inputs to the arbiter: what happened in the room, as the IO shell observed it.
//!
//! Identities here are the server-stamped ones (the data packet's `participant_identity`, the
//! participant info from signalling); nothing in a payload is trusted to say who sent it.

use baton_transfer::TransferId;
use serde::{Deserialize, Serialize};

/// A participant's kind, as LiveKit reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParticipantKind {
    /// A regular client (web or mobile caller, or an observer).
    Standard,
    /// An ingress stream.
    Ingress,
    /// An egress recorder.
    Egress,
    /// A phone caller bridged by LiveKit SIP.
    Sip,
    /// An agent (the only kind that may hold the floor or send control messages).
    Agent,
    /// Anything this crate does not know.
    Other,
}

impl ParticipantKind {
    /// Whether this participant counts as the caller: when the last caller leaves, the session ends.
    pub fn is_caller(self) -> bool {
        matches!(self, ParticipantKind::Standard | ParticipantKind::Sip)
    }
}

/// A participant's published microphone track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioTrack {
    /// The track sid, needed for MutePublishedTrack.
    pub sid: String,
    /// Whether the track is muted (by the publisher or by the server).
    pub muted: bool,
}

/// What the shell knows about one participant (from join, update and room-state messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    /// The participant's identity.
    pub identity: String,
    /// The participant's kind.
    pub kind: ParticipantKind,
    /// The `lk.agent.name` attribute, set by the server when an agent is dispatched.
    pub agent_name: Option<String>,
    /// The dispatch that produced this agent, if the shell can tell; used to match a joining
    /// agent to the dispatch baton created, so a late agent from a cancelled dispatch is not
    /// mistaken for the new one.
    pub dispatch_id: Option<String>,
    /// The participant's audio track, if it publishes one.
    pub audio: Option<AudioTrack>,
}

impl Participant {
    /// Whether the participant's audio can currently reach the caller.
    pub fn audio_live(&self) -> bool {
        self.audio.as_ref().is_some_and(|a| !a.muted)
    }
}

/// Identifies one CreateDispatch call, so its API result can be matched to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DispatchTicket(pub u64);

/// A control message from an agent (`baton.control` topic): the `type` tag and members of an
/// [`Envelope`](crate::Envelope), e.g. `{"v":1,"id":"a-1","type":"handoff","target":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The adapter is connected and listening; sent once after joining and after any reconnect.
    Hello {
        /// The agent's own name; must equal its `lk.agent.name` attribute.
        agent_name: String,
        /// Free-form role (e.g. `triage`), for logs only.
        #[serde(default)]
        role: Option<String>,
        /// The adapter sends a `heartbeat` every this many milliseconds from now on (docs/protocol.md,
        /// "Checkpoints, heartbeats and recovery"); absent: an older adapter, not watched.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat_ms: Option<u32>,
    },
    /// The adapter is alive: sent every `heartbeat_ms` (lossy, to baton only), never answered.
    Heartbeat {
        /// +1 per heartbeat.
        seq: u64,
    },
    /// The active agent asks baton to hand the call to `target`.
    Handoff {
        /// The configured agent name to hand to.
        target: String,
        /// Why, in words the target can use ("caller wants a refund").
        #[serde(default)]
        reason: String,
        /// The transfer id of a context bundle already sent (or being sent) to baton.
        #[serde(default)]
        transfer: Option<TransferId>,
        /// The bundle will be sent after this request; its id is not known yet.
        #[serde(default)]
        bundle_follows: bool,
        /// The source has already finished speaking and turned its audio off: it is quiet now,
        /// and the filler can start at once instead of a `deactivate` → `quiet` round trip later.
        #[serde(default)]
        quiet: bool,
        /// With `quiet`: how long the source had been quiet when it sent the request, ms. The
        /// settle before the switch
        /// ([`Policy::quiet_settle`](crate::Policy::quiet_settle)) counts from then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiet_ms: Option<u32>,
        /// The source plays a filler of its own on its `baton-filler` track from the end of its
        /// sentence until baton's `filler_stop` (docs/protocol.md, "The source's filler"), so
        /// the caller hears no gap while baton's filler is on its way, nor while baton is
        /// down. baton plays its own filler all the same.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        filler: bool,
        /// The source asks at the start of the sentence it says with its transfer tool and
        /// will send `quiet` (after its `tail`) when that sentence has played out: baton
        /// prepares the target meanwhile, waits for the source's word rather than for silence,
        /// and mutes it only after [`Policy::sentence_timeout`](crate::Policy::sentence_timeout).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        speaking: bool,
    },
    /// What the source's context gained after its handoff's bundle was built (the sentence it
    /// said with the request, the caller's words meanwhile), for the handoff's target: baton
    /// forwards it as it forwards a `tool_result`, before the target's `activate`
    /// (docs/protocol.md, `tail`). baton does not read the items.
    Tail {
        /// The handoff whose bundle this completes.
        handoff: String,
        /// Chat items in the bundle's item format (docs/bundle.md), added or changed since the
        /// bundle was built, in the source's context order.
        #[serde(default)]
        items: Vec<serde_json::Value>,
        /// The source's user state, when it changed since the bundle was built (replaces the
        /// bundle's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_state: Option<serde_json::Value>,
    },
    /// The target has loaded the bundle and its pipeline is running; it can speak.
    Ready {
        /// The handoff id from `prepare`.
        handoff: String,
    },
    /// The source has finished its sentence and turned its audio off.
    Quiet {
        /// The handoff id from `handoff_accepted`, if the adapter has it.
        #[serde(default)]
        handoff: Option<String>,
        /// How long the source had been silent when it sent this, ms (its voice's last frame
        /// went out before it could tell its sentence was over): the settle before the
        /// switch ([`Policy::quiet_settle`](crate::Policy::quiet_settle)) counts from then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiet_ms: Option<u32>,
    },
    /// The late result of a tool call the sender's bundle carried in flight: baton forwards it
    /// to the agent that continues the call (docs/protocol.md, `tool_result`).
    ToolResult {
        /// The handoff whose bundle carried the call in flight.
        handoff: String,
        /// The call's id (`tool_calls_in_flight[].call_id`).
        call_id: String,
        /// The tool.
        name: String,
        /// Whether the tool returned or was cancelled.
        #[serde(default)]
        status: ToolCallStatus,
        /// The output is an error.
        #[serde(default)]
        is_error: bool,
        /// What the tool returned, as its `function_call_output` carries it.
        output: String,
        /// The sender cut `output` to fit one packet.
        #[serde(default)]
        truncated: bool,
    },
    /// The floor holder expects to hand the call to `target` soon (its model considers a
    /// transfer): baton gets an instance of `target` into the room as a muted standby, so the
    /// handoff, if it comes within `hint_timeout`, is warm. Never answered; a refused hint is
    /// logged by baton (docs/protocol.md, `hint`).
    Hint {
        /// The configured agent name the call will likely go to.
        target: String,
    },
}

/// How a tool call that was in flight at a handoff ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallStatus {
    /// The tool returned (its output may still be an error).
    #[default]
    Finished,
    /// The tool was stopped before it returned; its outcome is unknown.
    Cancelled,
}

impl AgentMessage {
    /// The envelope `type` of this message, for logs and security events.
    pub fn type_name(&self) -> &'static str {
        match self {
            AgentMessage::Hello { .. } => "hello",
            AgentMessage::Heartbeat { .. } => "heartbeat",
            AgentMessage::Handoff { .. } => "handoff",
            AgentMessage::Hint { .. } => "hint",
            AgentMessage::Ready { .. } => "ready",
            AgentMessage::Quiet { .. } => "quiet",
            AgentMessage::ToolResult { .. } => "tool_result",
            AgentMessage::Tail { .. } => "tail",
        }
    }
}

/// Something the arbiter must react to. Timeouts are not events: the shell calls
/// [`Arbiter::handle_timeout`](crate::Arbiter::handle_timeout) at
/// [`Arbiter::poll_timeout`](crate::Arbiter::poll_timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// baton has joined the room: who was already there, and which agent names the room's token
    /// configuration already dispatched (so baton does not dispatch them a second time).
    RoomJoined {
        /// Participants present at join (baton itself excluded).
        participants: Vec<Participant>,
        /// Agent names dispatched by the token's RoomConfiguration.
        token_dispatched: Vec<String>,
    },
    /// A participant joined.
    ParticipantJoined(Participant),
    /// A participant's info changed (attributes, tracks, mute state).
    ParticipantUpdated(Participant),
    /// A participant left.
    ParticipantLeft {
        /// Who left.
        identity: String,
    },
    /// A participant started or stopped speaking (active-speaker updates, or the agent's
    /// `lk.agent.state` attribute).
    SpeakingChanged {
        /// Whose speech changed.
        identity: String,
        /// Whether it is speaking now.
        speaking: bool,
    },
    /// A control message arrived.
    Control {
        /// The server-stamped sender identity.
        from: String,
        /// The envelope `id`, echoed as `re` in replies.
        id: String,
        /// The parsed message.
        message: AgentMessage,
    },
    /// The transfer engine holds a complete bundle from `from`.
    BundleReceived {
        /// The sender.
        from: String,
        /// The transfer id.
        transfer_id: TransferId,
        /// The bundle's size in bytes.
        bytes: u64,
    },
    /// The transfer engine has delivered a bundle to `to` and the receiver acknowledged it.
    BundleDelivered {
        /// The receiver.
        to: String,
        /// The transfer id.
        transfer_id: TransferId,
    },
    /// A transfer to or from `peer` moved: the receiver now holds `bytes` of the bundle
    /// (chunks baton received from a source uploading to it, or chunks a target acknowledged
    /// of a delivery). `bytes` counts from the start of the transfer, so a report that is not
    /// larger than the last one is no progress and changes nothing. The shell reports it for
    /// the bundle's own transfer id (a delivery's as the bundle it carries) and may rate-limit
    /// it: the arbiter's resolution is [`Policy::stall_timeout`](crate::Policy::stall_timeout).
    TransferProgress {
        /// The other end of the transfer: the source uploading, or the target receiving.
        peer: String,
        /// The bundle's transfer id.
        transfer_id: TransferId,
        /// Bytes the receiver holds so far.
        bytes: u64,
    },
    /// A transfer to or from `peer` failed for good.
    TransferFailed {
        /// The other end of the transfer.
        peer: String,
        /// The transfer id.
        transfer_id: TransferId,
        /// Why, for the timeline.
        reason: String,
    },
    /// CreateDispatch succeeded.
    DispatchCreated {
        /// The ticket from [`Command::CreateDispatch`](crate::Command::CreateDispatch).
        ticket: DispatchTicket,
        /// The dispatch id the server returned.
        dispatch_id: String,
    },
    /// CreateDispatch failed.
    DispatchFailed {
        /// The ticket from [`Command::CreateDispatch`](crate::Command::CreateDispatch).
        ticket: DispatchTicket,
        /// The API error, for the alert.
        error: String,
    },
    /// The answer to [`Command::AgentCrashed`](crate::Command::AgentCrashed): the recovery
    /// bundle baton built and holds, ready for [`Command::DeliverBundle`](crate::Command::DeliverBundle),
    /// or `None` when it holds no checkpoint for that agent name (the replacement starts
    /// without context).
    RecoveryBundle {
        /// The recovery id.
        recovery: String,
        /// The bundle's transfer id and size in bytes.
        bundle: Option<(TransferId, u64)>,
    },
    /// The agent job of `identity` has ended on the server (its process died or exited): the
    /// answer to [`Command::CheckJob`](crate::Command::CheckJob) when it found the job ended.
    JobEnded {
        /// The agent participant.
        identity: String,
        /// The job's status as the server reports it (`JS_FAILED`, `JS_SUCCESS`), for the
        /// timeline.
        status: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_messages_parse_from_the_envelope() {
        let m: AgentMessage = serde_json::from_str(
            r#"{"v":1,"type":"handoff","id":"a-1","target":"billing","reason":"refund","transfer":"0000000000000000000000000000000f"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            AgentMessage::Handoff {
                target: "billing".into(),
                reason: "refund".into(),
                transfer: Some(TransferId::new(15)),
                bundle_follows: false,
                quiet: false,
                quiet_ms: None,
                filler: false,
                speaking: false,
            }
        );
        let m: AgentMessage =
            serde_json::from_str(r#"{"v":1,"type":"ready","id":"b-2","handoff":"h-1"}"#).unwrap();
        assert_eq!(m.type_name(), "ready");
        let m: AgentMessage =
            serde_json::from_str(r#"{"v":1,"type":"quiet","id":"a-3","extra":true}"#).unwrap();
        assert_eq!(m, AgentMessage::Quiet { handoff: None, quiet_ms: None });
        assert!(serde_json::from_str::<AgentMessage>(r#"{"v":1,"type":"launch","id":"x"}"#).is_err());
        // A transfer id is 32 hex digits (docs/protocol.md, "Transfer ids in control messages").
        let bad_id =
            r#"{"v":1,"type":"handoff","id":"a-1","target":"billing","reason":"r","transfer":"t-9"}"#;
        assert!(serde_json::from_str::<AgentMessage>(bad_id).is_err());
    }

    #[test]
    fn tool_result_parses_as_the_python_adapter_sends_it() {
        // lk_baton.floor.FloorClient.tool_result, docs/protocol.md `tool_result`
        let m: AgentMessage = serde_json::from_str(
            r#"{"v":1,"type":"tool_result","id":"a1b2c3-14","handoff":"h-1","call_id":"call_7","name":"create_reservation","status":"cancelled","is_error":true,"output":"stopped","truncated":true}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            AgentMessage::ToolResult {
                handoff: "h-1".into(),
                call_id: "call_7".into(),
                name: "create_reservation".into(),
                status: ToolCallStatus::Cancelled,
                is_error: true,
                output: "stopped".into(),
                truncated: true,
            }
        );
        // status, is_error and truncated may be left out; output may not
        let m: AgentMessage = serde_json::from_str(
            r#"{"v":1,"type":"tool_result","id":"a-1","handoff":"h-1","call_id":"c","name":"n","output":""}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            AgentMessage::ToolResult { status: ToolCallStatus::Finished, is_error: false, .. }
        ));
        for bad in [
            r#"{"v":1,"type":"tool_result","id":"a-1","handoff":"h-1","call_id":"c","name":"n"}"#,
            r#"{"v":1,"type":"tool_result","id":"a-1","handoff":"h-1","call_id":"c","name":"n","output":5}"#,
            r#"{"v":1,"type":"tool_result","id":"a-1","handoff":"h-1","call_id":"c","name":"n","output":"","status":"maybe"}"#,
        ] {
            assert!(serde_json::from_str::<AgentMessage>(bad).is_err(), "{bad}");
        }
    }
}
