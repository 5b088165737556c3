//! The LiveKit server APIs baton calls (Twirp over HTTP, through `livekit-api`): muting an
//! agent's track and dispatching agents. Thin on purpose: the floor arbiter decides, this module
//! only executes, and turns failures into errors that say what to do next.

use futures_util::FutureExt;
use livekit_api::services::agent_dispatch::AgentDispatchClient;
use livekit_api::services::room::RoomClient;
use livekit_api::services::{ServerError, ServiceError};
use livekit_protocol as proto;

/// Why a server API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid server URL `{url}`: {reason}; use ws://, wss://, http:// or https://")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "could not reach the LiveKit server API at {url} ({reason}); check the URL and that the server is up"
    )]
    Unreachable { url: String, reason: String },
    #[error("the LiveKit server refused {op} ({detail}); check LIVEKIT_API_KEY and LIVEKIT_API_SECRET")]
    Unauthorized { op: &'static str, detail: String },
    #[error("{op}: not found ({detail}); the room or dispatch may already be gone")]
    NotFound { op: &'static str, detail: String },
    #[error("{op} was rejected: {detail}{hint}")]
    Rejected { op: &'static str, detail: String, hint: &'static str },
    #[error(
        "{op}: the server had no answer from the room ({detail}); the participant may have left or \
         the room may be closing: re-check the room before retrying"
    )]
    Unavailable { op: &'static str, detail: String },
    #[error(
        "{op}: the server's reply was not a LiveKit API answer ({detail}); a wrong API key or secret \
         (HTTP 401) looks like this: check LIVEKIT_API_KEY and LIVEKIT_API_SECRET, or a proxy in between"
    )]
    Unreadable { op: &'static str, detail: String },
    #[error("{op} failed: {detail}")]
    Other { op: &'static str, detail: String },
    #[error("{op}: no server API configured (it needs the server URL, API key and secret)")]
    NotConfigured { op: &'static str },
}

impl ApiError {
    /// Worth retrying later (the server was unreachable or had a transient problem).
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Unreachable { .. } | ApiError::Unavailable { .. } | ApiError::Other { .. })
    }
}

/// A LiveKit server API call that baton's room logic asks for, as a value. The room task runs it
/// off its loop with [`ServerApi::execute`] and hands the [`ApiResult`] back to the logic
/// (`RoomHandler::on_api_result`), so the logic never holds a client or awaits a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiCall {
    /// AgentDispatchService.ListDispatch for the room: which agents are dispatched already
    /// (including those from the room's token).
    ListDispatch,
    /// AgentDispatchService.CreateDispatch of `agent_name` into the room, with job metadata.
    CreateDispatch { agent_name: String, metadata: String },
    /// AgentDispatchService.DeleteDispatch; the server ends the dispatch's jobs.
    DeleteDispatch { dispatch_id: String },
    /// RoomService.MutePublishedTrack; unmuting needs `room.enable_remote_unmute` on the server.
    MuteTrack { identity: String, track_sid: String, muted: bool },
    /// RoomService.RemoveParticipant.
    RemoveParticipant { identity: String },
    /// AgentDispatchService.ListDispatch, read for the status of the agent job whose
    /// participant is `identity` (`state.jobs[].state.participant_identity`): a crash check.
    JobStatus { identity: String },
}

impl ApiCall {
    /// The API operation's name, as the errors and logs say it.
    pub fn op(&self) -> &'static str {
        match self {
            ApiCall::ListDispatch => "ListDispatch",
            ApiCall::CreateDispatch { .. } => "CreateDispatch",
            ApiCall::DeleteDispatch { .. } => "DeleteDispatch",
            ApiCall::MuteTrack { .. } => "MutePublishedTrack",
            ApiCall::RemoveParticipant { .. } => "RemoveParticipant",
            ApiCall::JobStatus { .. } => "ListDispatch",
        }
    }
}

/// The call in words, for logs ("mute agent-1's track TR_x").
impl std::fmt::Display for ApiCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiCall::ListDispatch => write!(f, "list the room's dispatches"),
            ApiCall::CreateDispatch { agent_name, .. } => write!(f, "dispatch {agent_name}"),
            ApiCall::DeleteDispatch { dispatch_id } => write!(f, "delete dispatch {dispatch_id}"),
            ApiCall::MuteTrack { identity, track_sid, muted } => {
                let verb = if *muted { "mute" } else { "unmute" };
                write!(f, "{verb} {identity}'s track {track_sid}")
            }
            ApiCall::RemoveParticipant { identity } => write!(f, "remove {identity}"),
            ApiCall::JobStatus { identity } => write!(f, "read the status of {identity}'s agent job"),
        }
    }
}

/// What a successful [`ApiCall`] returns, as far as baton uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiReply {
    /// The call succeeded and returns nothing baton needs.
    Done,
    /// ListDispatch: the agent names dispatched to the room (unnamed dispatches left out).
    Dispatched(Vec<String>),
    /// CreateDispatch: the new dispatch's id.
    DispatchCreated { dispatch_id: String },
    /// JobStatus: the job's status as the server names it (`JS_PENDING`, `JS_RUNNING`,
    /// `JS_SUCCESS`, `JS_FAILED`), or `None` when no dispatch of the room has a job for that
    /// participant (an agent that was not dispatched, or a dispatch already deleted).
    JobStatus(Option<&'static str>),
}

/// The outcome of one [`ApiCall`], handed back to the logic that asked for it.
#[derive(Debug)]
pub struct ApiResult {
    /// The asker's own tag for the call, unchanged (baton's coordinator puts a dispatch ticket
    /// there, so a CreateDispatch result finds its handoff).
    pub tag: u64,
    /// The call, as asked.
    pub call: ApiCall,
    pub result: Result<ApiReply, ApiError>,
}

/// The status of the job whose participant is `identity`, among a room's dispatches. An
/// unknown status number (a newer server) reads as `None`: no conclusion is drawn from it.
pub fn job_status(dispatches: &[proto::AgentDispatch], identity: &str) -> Option<&'static str> {
    dispatches
        .iter()
        .filter_map(|d| d.state.as_ref())
        .flat_map(|s| &s.jobs)
        .filter_map(|j| j.state.as_ref())
        .find(|s| s.participant_identity == identity)
        .and_then(|s| proto::JobStatus::try_from(s.status).ok())
        .map(|s| s.as_str_name())
}

/// Whether a job status says the job's process is gone (it failed, or it returned).
pub fn job_ended(status: &str) -> bool {
    matches!(status, "JS_FAILED" | "JS_SUCCESS")
}

/// The HTTP base URL for the server APIs, from a ws(s) or http(s) URL.
pub fn http_url(url: &str) -> Result<String, ApiError> {
    let bad = |reason: &str| ApiError::InvalidUrl { url: url.to_string(), reason: reason.to_string() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        _ => return Err(bad("unsupported scheme")),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(bad("no host"));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// Clients for one LiveKit server, signing each request with the API key and secret.
#[derive(Debug)]
pub struct ServerApi {
    url: String,
    rooms: RoomClient,
    dispatch: AgentDispatchClient,
}

impl ServerApi {
    pub fn new(url: &str, api_key: &str, api_secret: &str) -> Result<Self, ApiError> {
        let url = http_url(url)?;
        Ok(ServerApi {
            rooms: RoomClient::with_api_key(&url, api_key, api_secret),
            dispatch: AgentDispatchClient::with_api_key(&url, api_key, api_secret),
            url,
        })
    }

    /// The HTTP URL the calls go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one [`ApiCall`] for `room`.
    pub async fn execute(&self, room: &str, call: &ApiCall) -> Result<ApiReply, ApiError> {
        match call {
            ApiCall::ListDispatch => {
                let dispatches = self.list_dispatch(room).await?;
                let names = dispatches.into_iter().map(|d| d.agent_name).filter(|n| !n.is_empty());
                Ok(ApiReply::Dispatched(names.collect()))
            }
            ApiCall::CreateDispatch { agent_name, metadata } => {
                let dispatch = self.create_dispatch(room, agent_name, metadata).await?;
                Ok(ApiReply::DispatchCreated { dispatch_id: dispatch.id })
            }
            ApiCall::DeleteDispatch { dispatch_id } => {
                self.delete_dispatch(room, dispatch_id).await.map(|_| ApiReply::Done)
            }
            ApiCall::MuteTrack { identity, track_sid, muted } => {
                self.mute_published_track(room, identity, track_sid, *muted).await.map(|_| ApiReply::Done)
            }
            ApiCall::RemoveParticipant { identity } => {
                self.remove_participant(room, identity).await.map(|()| ApiReply::Done)
            }
            ApiCall::JobStatus { identity } => {
                let dispatches = self.list_dispatch(room).await?;
                Ok(ApiReply::JobStatus(job_status(&dispatches, identity)))
            }
        }
    }

    /// Mutes or unmutes a participant's published track server-side.
    pub async fn mute_published_track(
        &self,
        room: &str,
        identity: &str,
        track_sid: &str,
        muted: bool,
    ) -> Result<proto::TrackInfo, ApiError> {
        const OP: &str = "MutePublishedTrack";
        // livekit-api 0.10 unwraps the reply's `track`, and the server answers without one for
        // a track it no longer has (seen right after a livekit-server restart): a panic there
        // took the whole worker down. Caught here, it is this call's error. (The catch needs
        // unwinding, which is why no profile in Cargo.toml sets `panic = "abort"`.)
        let call = self.rooms.mute_published_track(room, identity, track_sid, muted);
        match std::panic::AssertUnwindSafe(call).catch_unwind().await {
            Ok(reply) => reply.map_err(|e| self.classify(OP, e)),
            Err(_) => Err(ApiError::NotFound {
                op: OP,
                detail: format!("the server's reply named no track for {identity}/{track_sid}"),
            }),
        }
    }

    /// Dispatches `agent_name` into `room`. The server creates the room if needed, and drops
    /// the dispatch silently when no worker with that name is registered: the caller must watch
    /// for the agent to join.
    pub async fn create_dispatch(
        &self,
        room: &str,
        agent_name: &str,
        metadata: &str,
    ) -> Result<proto::AgentDispatch, ApiError> {
        const OP: &str = "CreateDispatch";
        let req = proto::CreateAgentDispatchRequest {
            agent_name: agent_name.to_string(),
            room: room.to_string(),
            metadata: metadata.to_string(),
            ..Default::default()
        };
        self.dispatch.create_dispatch(req).await.map_err(|e| self.classify(OP, e))
    }

    /// Deletes a dispatch; the server terminates its jobs (the agent is asked to leave).
    pub async fn delete_dispatch(
        &self,
        room: &str,
        dispatch_id: &str,
    ) -> Result<proto::AgentDispatch, ApiError> {
        const OP: &str = "DeleteDispatch";
        self.dispatch.delete_dispatch(dispatch_id, room).await.map_err(|e| self.classify(OP, e))
    }

    /// The dispatches of a room (including those from its token's RoomConfiguration).
    pub async fn list_dispatch(&self, room: &str) -> Result<Vec<proto::AgentDispatch>, ApiError> {
        const OP: &str = "ListDispatch";
        self.dispatch.list_dispatch(room).await.map_err(|e| self.classify(OP, e))
    }

    /// Removes a participant from a room (an agent released after a handoff).
    pub async fn remove_participant(&self, room: &str, identity: &str) -> Result<(), ApiError> {
        const OP: &str = "RemoveParticipant";
        self.rooms.remove_participant(room, identity).await.map_err(|e| self.classify(OP, e))
    }

    /// The participants of a room.
    pub async fn list_participants(&self, room: &str) -> Result<Vec<proto::ParticipantInfo>, ApiError> {
        const OP: &str = "ListParticipants";
        self.rooms.list_participants(room).await.map_err(|e| self.classify(OP, e))
    }

    fn classify(&self, op: &'static str, e: ServiceError) -> ApiError {
        match e {
            ServiceError::Env(e) => ApiError::Other { op, detail: e.to_string() },
            ServiceError::AccessToken(e) => {
                ApiError::Unauthorized { op, detail: format!("could not sign: {e}") }
            }
            ServiceError::Twirp(ServerError::Request(e)) => {
                // The server answers a bad token with a plain-text 401 that the Twirp client
                // cannot decode, so the status is lost by the time it reaches us.
                if e.is_decode() {
                    ApiError::Unreadable { op, detail: e.to_string() }
                } else if e.is_connect() || e.is_timeout() {
                    ApiError::Unreachable { url: self.url.clone(), reason: e.to_string() }
                } else {
                    ApiError::Other { op, detail: e.to_string() }
                }
            }
            ServiceError::Twirp(ServerError::Twirp(code)) => {
                let detail = code.to_string();
                match code.code.as_str() {
                    "unauthenticated" | "permission_denied" => ApiError::Unauthorized { op, detail },
                    "not_found" => ApiError::NotFound { op, detail },
                    "unavailable" => ApiError::Unavailable { op, detail },
                    "invalid_argument"
                    | "failed_precondition"
                    | "malformed"
                    | "out_of_range"
                    | "resource_exhausted"
                    | "already_exists" => {
                        let hint = if op == "MutePublishedTrack" && code.msg.contains("unmute") {
                            "; remote unmute needs `room.enable_remote_unmute: true` in the server config"
                        } else {
                            ""
                        };
                        ApiError::Rejected { op, detail, hint }
                    }
                    _ => ApiError::Other { op, detail },
                }
            }
            ServiceError::Twirp(e) => ApiError::Other { op, detail: e.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_url_converts_ws_schemes() {
        assert_eq!(http_url("ws://127.0.0.1:7880").ok().as_deref(), Some("http://127.0.0.1:7880"));
        assert_eq!(http_url("wss://lk.example.com/").ok().as_deref(), Some("https://lk.example.com"));
        assert_eq!(http_url("https://x").ok().as_deref(), Some("https://x"));
        assert!(http_url("x").is_err());
        assert!(http_url("udp://x").is_err());
    }

    #[test]
    fn a_job_status_is_read_by_its_participant_identity() {
        let job = |identity: &str, status: proto::JobStatus| proto::Job {
            state: Some(proto::JobState {
                status: status as i32,
                participant_identity: identity.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let dispatch = |jobs: Vec<proto::Job>| proto::AgentDispatch {
            state: Some(proto::AgentDispatchState { jobs, ..Default::default() }),
            ..Default::default()
        };
        let room = vec![
            dispatch(vec![job("agent-a", proto::JobStatus::JsFailed)]),
            dispatch(vec![
                job("agent-b", proto::JobStatus::JsRunning),
                job("agent-c", proto::JobStatus::JsSuccess),
            ]),
            proto::AgentDispatch::default(),
        ];
        assert_eq!(job_status(&room, "agent-a"), Some("JS_FAILED"));
        assert_eq!(job_status(&room, "agent-b"), Some("JS_RUNNING"));
        assert_eq!(job_status(&room, "agent-c"), Some("JS_SUCCESS"));
        assert_eq!(job_status(&room, "agent-x"), None);
        assert!(job_ended("JS_FAILED") && job_ended("JS_SUCCESS"));
        assert!(!job_ended("JS_RUNNING") && !job_ended("JS_PENDING"));
        // An unknown status number from a newer server concludes nothing.
        let mut odd = job("agent-d", proto::JobStatus::JsRunning);
        if let Some(s) = odd.state.as_mut() {
            s.status = 42;
        }
        assert_eq!(job_status(&[dispatch(vec![odd])], "agent-d"), None);
    }

    #[tokio::test]
    async fn unreachable_server_says_so() {
        // Port 9 (discard) on loopback is closed on any sane test machine.
        let api = ServerApi::new("ws://127.0.0.1:9", "k", "secret-secret-secret-secret-secret").expect("url");
        let err = api.list_dispatch("r").await.expect_err("nothing listens there");
        assert!(matches!(err, ApiError::Unreachable { .. }), "{err}");
        assert!(err.is_transient());
        assert!(err.to_string().contains("check the URL"));
        let call = ApiCall::MuteTrack { identity: "a".into(), track_sid: "TR_a".into(), muted: true };
        let err = api.execute("r", &call).await.expect_err("nothing listens there");
        assert!(matches!(err, ApiError::Unreachable { .. }), "{err}");
        assert_eq!(call.op(), "MutePublishedTrack");
        assert_eq!(call.to_string(), "mute a's track TR_a");
        assert!(!ApiError::NotConfigured { op: call.op() }.is_transient());
    }
}
