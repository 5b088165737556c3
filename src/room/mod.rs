//! baton as a LiveKit participant: signaling, the one peer connection, data, the audio track,
//! and staying in the room through network trouble.
//!
//! One task owns one room ([`run`]). It multiplexes the signal websocket, the UDP socket and the
//! audio clock in a single `select!`, feeding the sans-IO peer connection and the
//! [`RoomHandler`] that holds baton's own logic.

mod back_after_rejoin;
pub mod data;
pub mod peer;
pub mod roster;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audio::filler::FillerSound;
use crate::server_api::{ApiCall, ApiResult, ServerApi};
/// The name of a filler track: baton's own, and the one a handoff source may publish for the
/// filler it plays itself (docs/protocol.md, "The source's filler"). Never an agent's voice:
/// baton neither mutes it nor counts it as what the caller hears of the agent.
pub const FILLER_TRACK_NAME: &str = "baton-filler";

pub use data::Incoming;
pub use roster::{Change, Member, Roster};
pub use session::{ConnectError, RoomEnd, RoomError};

/// Everything needed to join one room.
#[derive(Clone)]
pub struct RoomParams {
    /// `ws://` or `wss://` URL of the LiveKit server (http(s) is accepted and converted).
    pub url: String,
    /// Where to get a token, initially and for a full rejoin.
    pub token: TokenSource,
    /// Start with the filler track audible.
    pub start_unmuted: bool,
    /// The looped filler the track plays, at every fade step.
    pub filler: Arc<FillerSound>,
    /// How long to keep trying to get back into the room after losing it.
    pub rejoin_deadline: Duration,
    /// Fault injection: when notified, baton drops its signal connection as a network blip
    /// would, and must resume. Lets tests and operators exercise the resume path for real.
    pub drop_signal: Arc<tokio::sync::Notify>,
}

/// Tokens expire and a worker is handed a token it cannot re-mint, so the source is explicit.
#[derive(Clone)]
pub enum TokenSource {
    /// A fixed token (from a job assignment); refreshed tokens from the server replace it.
    Fixed(String),
    /// Mint one from the API key and secret whenever one is needed.
    Mint { api_key: String, api_secret: String, room: String, identity: String },
}

impl TokenSource {
    fn token(&self) -> Result<String, crate::token::TokenError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Mint { api_key, api_secret, room, identity } => crate::token::participant_token(
                api_key,
                api_secret,
                room,
                identity,
                Duration::from_secs(6 * 3600),
            ),
        }
    }
}

/// What baton's logic asks the room to do: values only, which the room task carries out.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Reliable user packets of control priority: (topic, payload, destination identities).
    pub data: Vec<(String, Vec<u8>, Vec<String>)>,
    /// Reliable user packets of bulk priority (context transfer frames): sent only while no
    /// control packet waits, so a bundle on the wire never delays a control message.
    pub bulk: Vec<(String, Vec<u8>, Vec<String>)>,
    /// Filler changes, applied in order (the floor arbiter's commands; see
    /// [`baton_floor::FillerCommand`]).
    pub filler: Vec<baton_floor::FillerCommand>,
    /// Server API calls with the handler's tag for each, run off the room loop; each result
    /// comes back through [`RoomHandler::on_api_result`].
    pub calls: Vec<(u64, ApiCall)>,
    /// Events for the event stream, metrics and traces ([`crate::observe`]); the room's
    /// [`crate::observe::Observed`] wrapper hands them to the observer.
    pub events: Vec<crate::observe::Event>,
    /// Writes to the room's state store with the handler's tag for each, carried out by the
    /// worker's store task; each answer comes back through [`RoomHandler::on_store_result`]
    /// once the write is durable (or refused).
    pub store: Vec<(u64, crate::store::Write)>,
    /// Counts for the metrics alone (transfers, checkpoints, undecodable messages): too
    /// frequent or too internal for the event stream. The same wrapper hands them on.
    pub stats: Vec<crate::observe::Stat>,
}

impl Outbox {
    /// Queues a control-priority packet on `topic` for the participant `to`.
    pub fn send(&mut self, topic: &str, payload: Vec<u8>, to: &str) {
        self.data.push((topic.to_string(), payload, vec![to.to_string()]));
    }

    /// Queues a bulk-priority packet on `topic` for the participant `to`.
    pub fn send_bulk(&mut self, topic: &str, payload: Vec<u8>, to: &str) {
        self.bulk.push((topic.to_string(), payload, vec![to.to_string()]));
    }

    /// Asks for a server API call; `tag` comes back unchanged in its [`ApiResult`].
    pub fn call(&mut self, tag: u64, call: ApiCall) {
        self.calls.push((tag, call));
    }
}

/// baton's logic for one room, called from the room task (no IO of its own). Every call gets
/// the current time, so the logic underneath can stay sans-IO.
pub trait RoomHandler: Send {
    /// A reliable or lossy user packet arrived for baton.
    fn on_data(&mut self, msg: &Incoming, now: Instant, out: &mut Outbox);
    /// Someone joined, changed or left.
    fn on_change(&mut self, _change: &Change, _roster: &Roster, _now: Instant, _out: &mut Outbox) {}
    /// A participant started or stopped speaking, by the server's audio-level measurement (sent
    /// only to subscribers, so baton, which subscribes to nothing, rarely gets it).
    fn on_speaking(&mut self, _identity: &str, _speaking: bool, _now: Instant, _out: &mut Outbox) {}
    /// baton is connected (first join, resume or rejoin) with a working data channel.
    fn on_connected(&mut self, _roster: &Roster, _now: Instant, _out: &mut Outbox) {}
    /// The next time the handler wants [`RoomHandler::on_timeout`] called.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn on_timeout(&mut self, _now: Instant, _out: &mut Outbox) {}
    /// The server API client the room task runs this handler's [`ApiCall`]s with, asked once at
    /// join; `None` makes every call fail with
    /// [`ApiError::NotConfigured`](crate::server_api::ApiError::NotConfigured).
    fn server_api(&self) -> Option<Arc<ServerApi>> {
        None
    }
    /// A call from [`Outbox::call`] finished.
    fn on_api_result(&mut self, _result: ApiResult, _now: Instant, _out: &mut Outbox) {}
    /// The room's state store, asked once at join; `None` drops [`Outbox::store`] writes.
    fn state_store(&self) -> Option<crate::store::RoomStoreClient> {
        None
    }
    /// A write from [`Outbox::store`] is durable (`Ok`) or was refused.
    fn on_store_result(&mut self, _tag: u64, _result: crate::store::Reply, _now: Instant, _out: &mut Outbox) {
    }
    /// Whether the handler considers the session over (baton should leave the room).
    fn finished(&self) -> bool {
        false
    }
}

/// Joins the room and stays until `shutdown` turns true, the room ends, or baton is removed.
///
/// Errors before the first successful join are returned as [`RoomError::Connect`], so a caller
/// can tell bad credentials from a room that went away later.
pub async fn run(
    params: RoomParams,
    handler: Box<dyn RoomHandler>,
    shutdown: watch::Receiver<bool>,
) -> Result<RoomEnd, RoomError> {
    session::RoomTask::join(params, handler, shutdown).await?.run().await
}
