//! baton as a LiveKit participant: signaling, the one peer connection, data, the audio track,
//! and staying in the room through network trouble.
//!
//! One task owns one room ([`run`]). It multiplexes the signal websocket, the UDP socket and the
//! audio clock in a single `select!`, feeding the sans-IO peer connection and the
//! [`RoomHandler`] that holds baton's own logic.

pub mod data;
pub mod peer;
pub mod roster;
mod session;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audio::encoded_loop::EncodedLoop;
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
    /// The looped audio the track plays.
    pub filler: Arc<EncodedLoop>,
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

/// What baton's logic asks the room to do.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Reliable user packets: (topic, payload, destination identities).
    pub data: Vec<(String, Vec<u8>, Vec<String>)>,
    /// Mute or unmute baton's own track.
    pub set_muted: Option<bool>,
}

impl Outbox {
    pub fn send(&mut self, topic: &str, payload: Vec<u8>, to: &str) {
        self.data.push((topic.to_string(), payload, vec![to.to_string()]));
    }
}

/// baton's logic for one room, called from the room task (no IO of its own).
pub trait RoomHandler: Send {
    /// A reliable or lossy user packet arrived for baton.
    fn on_data(&mut self, msg: &Incoming, out: &mut Outbox);
    /// Someone joined, changed or left.
    fn on_change(&mut self, _change: &Change, _roster: &Roster, _out: &mut Outbox) {}
    /// baton is (again) connected with a working data channel.
    fn on_connected(&mut self, _out: &mut Outbox) {}
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
