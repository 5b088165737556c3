//! The room task: one connection incarnation at a time (join, resume, rejoin) and the loop that
//! drives it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_floor::FillerCommand;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use livekit_protocol as proto;
use livekit_signaling::{SignalClient, SignalEvent, SignalEvents, SignalOptions};
use proto::signal_request::Message as Req;
use proto::signal_response::Message as Resp;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::sleep_until;

use super::data::{Received, Reliable};
use super::peer::{Drained, Peer, PeerEvent};
use super::roster::Roster;
use super::{Outbox, RoomHandler, RoomParams};
use crate::audio::FRAME_DURATION;
use crate::audio::filler::Envelope;
use crate::server_api::{ApiError, ApiResult, ServerApi};

/// How long the first join may take before it is reported as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a resume may take before falling back to a full rejoin.
const RESUME_TIMEOUT: Duration = Duration::from_secs(4);
/// Frames written at once when the audio clock fell behind; beyond this, frames are skipped
/// rather than burst, since a burst only adds delay at the receiver.
const MAX_AUDIO_CATCH_UP: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Token(#[from] crate::token::TokenError),
    #[error("invalid server URL `{0}`: {1}")]
    Url(String, String),
    #[error("could not reach the LiveKit server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the LiveKit server refused the credentials ({0}); check the API key and secret")]
    Unauthorized(String),
    #[error("could not join: {0}")]
    Signal(String),
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer connection: {0}")]
    Peer(#[from] super::peer::PeerError),
    #[error("no media connection to the server within {0:?}")]
    PeerTimeout(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("lost the room and could not rejoin within {0:?}: {1}")]
    RejoinFailed(Duration, String),
}

/// Why the room task ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEnd {
    /// Shutdown was requested and baton left cleanly.
    Left,
    /// The server ended baton's participation (room closed, removed, duplicate identity...).
    Removed(String),
}

/// One connection incarnation: a signal client and the peer connection negotiated through it.
struct Link {
    signal: SignalClient,
    events: SignalEvents,
    peer: Peer,
    cid: String,
    track_sid: Option<String>,
}

/// What the connection should do after a signal message.
enum Flow {
    Continue,
    Removed(String),
    Reconnect(String),
}

enum Phase {
    Connected,
    Resuming { deadline: Instant, last_message_seq: u32 },
}

pub(super) struct RoomTask {
    params: RoomParams,
    handler: Box<dyn RoomHandler>,
    shutdown: watch::Receiver<bool>,
    socket: UdpSocket,
    local_ip: IpAddr,
    link: Link,
    phase: Phase,
    roster: Roster,
    reliable: Reliable,
    own_identity: String,
    room_name: String,
    muted: bool,
    /// Filler level over time; silence frames are sent while it is silent and unmuted.
    envelope: Envelope,
    /// An `Off` arrived during a fade: mute once the fade is over.
    mute_after_fade: bool,
    audio_start: Instant,
    audio_tick: u64,
    /// Server API calls under way (their results go to the handler).
    calls: FuturesUnordered<ApiCallFuture>,
    /// What runs the handler's server API calls.
    api: Option<Arc<ServerApi>>,
    /// Store writes under way (their answers go to the handler).
    store_writes: FuturesUnordered<StoreFuture>,
    /// Where the handler's store writes go.
    store: Option<crate::store::RoomStoreClient>,
    /// Callers missing after a rejoin, awaited before they count as gone.
    back_after_rejoin: super::back_after_rejoin::BackAfterRejoin,
}

type ApiCallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ApiResult> + Send>>;
type StoreFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (u64, crate::store::Reply)> + Send>>;

impl RoomTask {
    pub(super) async fn join(
        params: RoomParams,
        handler: Box<dyn RoomHandler>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConnectError> {
        let started = Instant::now();
        let token = params.token.token()?;
        let server = server_addr(&params.url).await?;
        let (socket, local_ip) = bind_towards(server).await?;
        let muted = !params.start_unmuted;
        let (link, join) = connect(&params.url, &token, &socket, local_ip, muted).await?;
        let own = join.participant.clone().unwrap_or_default();
        let room_name = join.room.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        let (roster, _) = Roster::new(&own.sid, &join.other_participants);
        tracing::info!(
            room = %room_name,
            identity = %own.identity,
            participants = roster.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "signal connected"
        );
        let mut task = Self {
            params,
            handler,
            shutdown,
            socket,
            local_ip,
            link,
            phase: Phase::Connected,
            roster: Roster::default(),
            reliable: Reliable::new(),
            own_identity: own.identity.clone(),
            room_name,
            muted,
            envelope: if muted { Envelope::Silent } else { Envelope::Full },
            mute_after_fade: false,
            audio_start: Instant::now(),
            audio_tick: 0,
            calls: FuturesUnordered::new(),
            api: None,
            store_writes: FuturesUnordered::new(),
            store: None,
            back_after_rejoin: Default::default(),
        };
        task.api = task.handler.server_api();
        task.store = task.handler.state_store();
        // Report the people already present as joins, so the handler sees one consistent stream.
        let mut out = Outbox::default();
        let (roster, changes) = Roster::new(&own.sid, &join.other_participants);
        task.roster = roster;
        for c in &changes {
            task.handler.on_change(c, &task.roster, Instant::now(), &mut out);
        }
        task.wait_until_open(started).await?;
        tracing::info!(
            room = %task.room_name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "joined: data channel open"
        );
        task.handler.on_connected(&task.roster, Instant::now(), &mut out);
        task.execute(out).await;
        task.pump().await?;
        Ok(task)
    }

    /// Pumps the connection until the reliable data channel is open.
    async fn wait_until_open(&mut self, started: Instant) -> Result<(), ConnectError> {
        let deadline = started + CONNECT_TIMEOUT;
        let mut buf = vec![0u8; 2000];
        while !self.link.peer.reliable_open() {
            let wake = self.link.peer.next_timeout().min(deadline);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => {
                    let (n, from) = r?;
                    self.link.peer.handle_datagram(Instant::now(), from, &buf[..n])?;
                }
                ev = self.link.events.recv() => match ev {
                    Some(SignalEvent::Message(m)) => match self.on_signal(*m).await {
                        Flow::Continue => {}
                        Flow::Removed(why) => {
                            return Err(ConnectError::Signal(format!("removed while joining: {why}")));
                        }
                        Flow::Reconnect(why) => return Err(ConnectError::Signal(why)),
                    },
                    Some(SignalEvent::Close(why)) => return Err(ConnectError::Signal(why.into_owned())),
                    None => return Err(ConnectError::Signal("signal connection closed".into())),
                },
                _ = sleep_until(wake.into()) => {
                    if Instant::now() >= deadline {
                        return Err(ConnectError::PeerTimeout(CONNECT_TIMEOUT));
                    }
                    self.link.peer.handle_timeout(Instant::now())?;
                }
            }
            self.pump().await?;
        }
        Ok(())
    }

    pub(super) async fn run(mut self) -> Result<RoomEnd, RoomError> {
        let mut buf = vec![0u8; 2000];
        self.audio_start = Instant::now();
        self.audio_tick = 0;
        loop {
            if *self.shutdown.borrow() {
                self.leave().await;
                return Ok(RoomEnd::Left);
            }
            if self.handler.finished() {
                tracing::info!(room = %self.room_name, "session over; leaving");
                self.leave().await;
                return Ok(RoomEnd::Left);
            }
            let handler_due = self.handler.poll_timeout();
            let mut wake = self.link.peer.next_timeout();
            // A muted track sends nothing, so an idle room does not wake 50 times a second.
            if !self.muted {
                wake = wake.min(self.audio_start + FRAME_DURATION * (self.audio_tick as u32 + 1));
            }
            if let Some(due) = handler_due {
                wake = wake.min(due);
            }
            let rejoin_due = self.back_after_rejoin.next_deadline();
            if let Some(due) = rejoin_due {
                wake = wake.min(due);
            }
            let mut lost: Option<String> = None;
            let drop_signal = self.params.drop_signal.clone();
            tokio::select! {
                biased;
                r = self.shutdown.changed() => {
                    if r.is_err() {
                        // Whoever could ask us to stop is gone (its task ended): nobody can any
                        // more, so stop now rather than wake on the closed channel forever.
                        tracing::warn!(room = %self.room_name, "shutdown channel closed; leaving");
                        self.leave().await;
                        return Ok(RoomEnd::Left);
                    }
                    continue
                }
                _ = drop_signal.notified() => {
                    self.link.signal.close().await;
                    lost = Some("signal connection dropped on request".into());
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        if let Err(e) = self.link.peer.handle_datagram(Instant::now(), from, &buf[..n]) {
                            lost = Some(format!("peer connection failed: {e}"));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "udp receive error"),
                },
                ev = self.link.events.recv() => match ev {
                    Some(SignalEvent::Message(m)) => match self.on_signal(*m).await {
                        Flow::Continue => {}
                        Flow::Removed(why) => return Ok(RoomEnd::Removed(why)),
                        Flow::Reconnect(why) => lost = Some(why),
                    },
                    Some(SignalEvent::Close(why)) => lost = Some(format!("signal closed: {why}")),
                    None => lost = Some("signal connection gone".into()),
                },
                Some(result) = self.calls.next(), if !self.calls.is_empty() => {
                    let mut out = Outbox::default();
                    self.handler.on_api_result(result, Instant::now(), &mut out);
                    self.execute(out).await;
                }
                Some((tag, result)) = self.store_writes.next(), if !self.store_writes.is_empty() => {
                    let mut out = Outbox::default();
                    self.handler.on_store_result(tag, result, Instant::now(), &mut out);
                    self.execute(out).await;
                }
                _ = sleep_until(wake.into()) => {
                    let now = Instant::now();
                    self.play_audio(now);
                    if self.mute_after_fade && self.envelope.silent_from(self.audio_tick + 1) {
                        self.mute_after_fade = false;
                        self.set_muted(true).await;
                    }
                    if rejoin_due.is_some_and(|due| due <= now) {
                        let mut out = Outbox::default();
                        for c in self.back_after_rejoin.due(now) {
                            self.handler.on_change(&c, &self.roster, now, &mut out);
                        }
                        self.execute(out).await;
                    }
                    if handler_due.is_some_and(|due| due <= now) {
                        let mut out = Outbox::default();
                        self.handler.on_timeout(now, &mut out);
                        self.execute(out).await;
                    }
                    if let Err(e) = self.link.peer.handle_timeout(now) {
                        lost = Some(format!("peer connection failed: {e}"));
                    }
                }
            }
            if lost.is_none() {
                match self.pump().await {
                    Ok(true) => lost = Some("media connection lost".into()),
                    Ok(false) => {}
                    Err(e) => lost = Some(format!("peer connection failed: {e}")),
                }
            }
            if let Phase::Resuming { deadline, .. } = self.phase
                && Instant::now() >= deadline
            {
                lost = Some("resume timed out".into());
            }
            if let Some(reason) = lost {
                self.recover(&reason).await?;
            }
        }
    }

    /// Writes the audio frames that are due. The tick counter follows the wall clock even while
    /// muted, so RTP timestamps stay continuous across mute, unmute and reconnects.
    fn current_tick(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.audio_start).as_micros() / FRAME_DURATION.as_micros()) as u64
    }

    fn play_audio(&mut self, now: Instant) {
        let due = self.current_tick(now);
        if due <= self.audio_tick {
            return;
        }
        let first = (self.audio_tick + 1).max(due.saturating_sub(MAX_AUDIO_CATCH_UP - 1));
        if matches!(self.envelope, Envelope::Out { .. }) && self.envelope.silent_from(first) {
            self.envelope = Envelope::Silent;
            tracing::debug!("filler faded out");
        }
        for tick in first..=due {
            if self.muted {
                continue;
            }
            let filler = &self.params.filler;
            let frame = match self.envelope.step(tick) {
                Some(step) => filler.frame(step, tick),
                None => filler.silence(),
            };
            let frame = frame.clone();
            if let Err(e) = self.link.peer.write_audio(&frame, tick, now) {
                tracing::debug!(error = %e, "audio write failed");
            }
        }
        self.audio_tick = due;
    }

    /// Applies a filler change from the handler.
    async fn set_filler(&mut self, filler: FillerCommand, now: Instant) {
        let tick = self.current_tick(now).max(self.audio_tick + 1);
        let fading = self.envelope.fading_out(tick);
        match filler {
            FillerCommand::Arm => {
                self.mute_after_fade = false;
                self.set_muted(false).await;
            }
            FillerCommand::On => {
                self.mute_after_fade = false;
                self.envelope.start(tick);
                self.set_muted(false).await;
            }
            FillerCommand::FadeOut(fade) => self.envelope.stop(tick, fade),
            FillerCommand::Off if fading => self.mute_after_fade = true,
            FillerCommand::Off => {
                self.envelope = Envelope::Silent;
                self.set_muted(true).await;
            }
        }
        tracing::debug!(?filler, "filler");
    }

    async fn set_muted(&mut self, muted: bool) {
        if muted != self.muted {
            self.muted = muted;
            if !muted {
                // Resume on the clock's current frame rather than bursting the frames that
                // passed while muted; timestamps still follow the clock, so RTP stays continuous.
                self.audio_tick = self.current_tick(Instant::now());
            }
            self.announce_mute().await;
            tracing::info!(muted, "filler track mute changed");
        }
    }

    /// Drains the peer connection: sends datagrams, handles events, and drains again until
    /// handling events produced nothing new to send. Returns true when the media path was lost.
    async fn pump(&mut self) -> Result<bool, super::peer::PeerError> {
        let mut lost = false;
        loop {
            let mut drained = Drained::default();
            self.link.peer.drain(&mut drained)?;
            for (to, bytes) in &drained.transmits {
                // UDP send errors are transient (buffer full, route flap); ICE consent notices
                // if they persist.
                if let Err(e) = self.socket.try_send_to(bytes, *to) {
                    tracing::trace!(error = %e, "udp send failed");
                }
            }
            if drained.events.is_empty() {
                return Ok(lost);
            }
            for ev in drained.events {
                match ev {
                    PeerEvent::Data(bytes) => self.on_data(&bytes).await,
                    PeerEvent::Disconnected => lost = true,
                    PeerEvent::Connected => self.on_media_connected().await,
                    PeerEvent::ReliableOpen => {}
                }
            }
        }
    }

    async fn on_media_connected(&mut self) {
        let Phase::Resuming { last_message_seq, .. } = self.phase else { return };
        self.phase = Phase::Connected;
        let replay = self.reliable.replay_after(last_message_seq);
        let replayed = replay.len();
        for bytes in replay {
            if let Err(e) = self.link.peer.send_reliable(bytes, false) {
                tracing::warn!(error = %e, "could not replay data packet");
            }
        }
        // The signal client holds queued requests until told the media path is back.
        self.link.signal.set_reconnected().await;
        tracing::info!(room = %self.room_name, replayed, "resumed");
        let mut out = Outbox::default();
        self.handler.on_connected(&self.roster, Instant::now(), &mut out);
        self.execute(out).await;
    }

    async fn on_data(&mut self, bytes: &[u8]) {
        match self.reliable.decode(bytes) {
            Ok(Received::User(msg)) => {
                let mut out = Outbox::default();
                self.handler.on_data(&msg, Instant::now(), &mut out);
                self.execute(out).await;
            }
            Ok(Received::Speakers(speakers)) => self.on_speakers(&speakers).await,
            Ok(Received::Duplicate | Received::Other) => {}
            Err(e) => tracing::warn!(error = %e, "rejected data packet"),
        }
    }

    /// Speaker changes arrive by signal or, from newer servers, on the data channel.
    async fn on_speakers(&mut self, speakers: &[(String, bool)]) {
        let mut out = Outbox::default();
        for (sid, active) in speakers {
            if let Some(m) = self.roster.by_sid(sid) {
                let identity = m.identity.clone();
                self.handler.on_speaking(&identity, *active, Instant::now(), &mut out);
            }
        }
        self.execute(out).await;
    }

    /// Carries out what the handler asked for. Data is queued on the peer connection; the
    /// caller's next pump sends it.
    async fn execute(&mut self, out: Outbox) {
        let now = Instant::now();
        let packets = out.data.into_iter().map(|p| (p, false)).chain(out.bulk.into_iter().map(|p| (p, true)));
        for ((topic, payload, to), bulk) in packets {
            if to.is_empty() {
                // Broadcasting would reach the caller's client; baton never does it.
                tracing::error!(%topic, "refusing to send a data packet without destinations");
                continue;
            }
            match self.reliable.encode(&topic, &payload, &to, now) {
                Ok(bytes) => {
                    if let Err(e) = self.link.peer.send_reliable(bytes, bulk) {
                        tracing::warn!(%topic, error = %e, "data packet not sent");
                    }
                }
                Err(e) => tracing::warn!(%topic, error = %e, "data packet not sent"),
            }
        }
        for (tag, call) in out.calls {
            let (api, room) = (self.api.clone(), self.room_name.clone());
            self.calls.push(Box::pin(async move {
                let result = match api {
                    Some(api) => api.execute(&room, &call).await,
                    None => Err(ApiError::NotConfigured { op: call.op() }),
                };
                ApiResult { tag, call, result }
            }));
        }
        for (tag, write) in out.store {
            match &self.store {
                // The room does not wait: the store task answers once the write is durable.
                Some(client) => {
                    let client = client.clone();
                    self.store_writes.push(Box::pin(async move {
                        (tag, client.handle.write(&client.room, client.token, write).await)
                    }));
                }
                None => tracing::debug!(key = %write.key(), "no state store: write dropped"),
            }
        }
        for filler in out.filler {
            self.set_filler(filler, now).await;
        }
    }

    /// Tells the server (and so every subscriber) the track's mute state.
    async fn announce_mute(&mut self) {
        // `&mut self` rather than `&self`: a shared borrow held across the await would need the
        // handler to be `Sync`, and the worker moves room tasks between threads.
        if let Some(sid) = self.link.track_sid.clone() {
            let muted = self.muted;
            self.link.signal.send(Req::Mute(proto::MuteTrackRequest { sid, muted })).await;
        }
    }

    /// Handles one signal message and says how the connection should carry on.
    async fn on_signal(&mut self, msg: Resp) -> Flow {
        match msg {
            Resp::Answer(sd) => {
                if let Err(e) = self.link.peer.accept_answer(&sd.sdp) {
                    tracing::error!(error = %e, "could not apply the server's answer");
                }
            }
            Resp::Offer(sd) => {
                // Only a subscriber PC gets offers, and baton has none (canSubscribe=false).
                let valid = Peer::check_offer(&sd.sdp).is_ok();
                tracing::debug!(valid, "ignoring subscriber offer");
            }
            Resp::Trickle(t) if t.target == proto::SignalTarget::Publisher as i32 => {
                if let Err(e) = self.link.peer.add_remote_candidate(&t.candidate_init) {
                    tracing::warn!(error = %e, "ignored server candidate");
                }
            }
            Resp::Update(u) => {
                let changes = self.roster.apply(&u.participants);
                self.back_after_rejoin.seen(&changes);
                let mut out = Outbox::default();
                for c in &changes {
                    log_change(c);
                    self.handler.on_change(c, &self.roster, Instant::now(), &mut out);
                }
                self.execute(out).await;
            }
            Resp::TrackPublished(tp) if tp.cid == self.link.cid => {
                let sid = tp.track.map(|t| t.sid).unwrap_or_default();
                tracing::info!(track_sid = %sid, muted = self.muted, "filler track published");
                self.link.track_sid = Some(sid);
            }
            // An admin (RoomService) changed our track's mute; follow it and confirm.
            Resp::Mute(m) if Some(&m.sid) == self.link.track_sid.as_ref() && m.muted != self.muted => {
                tracing::info!(muted = m.muted, "server changed the filler track's mute");
                self.set_muted(m.muted).await;
            }
            Resp::Leave(l) => {
                use proto::leave_request::Action;
                let action = Action::try_from(l.action).unwrap_or(Action::Disconnect);
                let reason = proto::DisconnectReason::try_from(l.reason).unwrap_or_default();
                tracing::info!(?action, ?reason, "server asked baton to leave");
                match action {
                    Action::Disconnect => {
                        self.link.peer.close();
                        self.link.signal.close().await;
                        return Flow::Removed(format!("{reason:?}"));
                    }
                    Action::Resume | Action::Reconnect => {
                        return Flow::Reconnect(format!("server asked to reconnect ({reason:?})"));
                    }
                }
            }
            Resp::SpeakersChanged(sc) => {
                let speakers: Vec<(String, bool)> =
                    sc.speakers.into_iter().map(|s| (s.sid, s.active)).collect();
                self.on_speakers(&speakers).await;
            }
            Resp::RoomUpdate(u) => {
                if let Some(room) = u.room {
                    tracing::debug!(room = %room.name, participants = room.num_participants, "room update");
                }
            }
            _ => {}
        }
        Flow::Continue
    }

    /// Gets back into the room: resume the session if the server still has it, otherwise join
    /// again from scratch, retrying with backoff until the rejoin deadline.
    async fn recover(&mut self, reason: &str) -> Result<(), RoomError> {
        if matches!(self.phase, Phase::Connected) {
            tracing::warn!(room = %self.room_name, %reason, "connection lost; resuming");
            match self.resume().await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(error = %e, "resume failed; rejoining"),
            }
        } else {
            tracing::warn!(room = %self.room_name, %reason, "resume did not complete; rejoining");
        }
        self.rejoin().await
    }

    async fn resume(&mut self) -> Result<(), String> {
        let resp = self
            .link
            .signal
            .restart(proto::ReconnectReason::RrSignalDisconnected)
            .await
            .map_err(|e| e.to_string())?;
        // The old transport's task reports its end ("stream closed") into the same event queue
        // once it is gone; restart() has awaited that task, so such a report is already queued
        // and is stale now. Keep the messages, drop the stale closes.
        let mut stale_messages = Vec::new();
        while let Ok(ev) = self.link.events.try_recv() {
            if let SignalEvent::Message(m) = ev {
                stale_messages.push(*m);
            }
        }
        for m in stale_messages {
            if let Flow::Removed(why) | Flow::Reconnect(why) = self.on_signal(m).await {
                return Err(why);
            }
        }
        // The ICE restart needs both sides fresh; the server restarts its own side on resume.
        let offer = self.link.peer.ice_restart().map_err(|e| e.to_string())?;
        self.link
            .signal
            .send(Req::Offer(proto::SessionDescription {
                r#type: "offer".into(),
                sdp: offer,
                ..Default::default()
            }))
            .await;
        self.phase = Phase::Resuming {
            deadline: Instant::now() + RESUME_TIMEOUT,
            last_message_seq: resp.last_message_seq,
        };
        Ok(())
    }

    async fn rejoin(&mut self) -> Result<(), RoomError> {
        let deadline = Instant::now() + self.params.rejoin_deadline;
        let mut backoff = Duration::from_millis(250);
        self.link.peer.close();
        self.link.signal.close().await;
        let mut last_error = String::new();
        loop {
            if *self.shutdown.borrow() {
                self.phase = Phase::Connected;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RoomError::RejoinFailed(self.params.rejoin_deadline, last_error));
            }
            match self.try_rejoin().await {
                Ok(()) => {
                    tracing::info!(room = %self.room_name, "rejoined");
                    return Ok(());
                }
                Err(e) => {
                    last_error = e.to_string();
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "rejoin failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn try_rejoin(&mut self) -> Result<(), ConnectError> {
        let started = Instant::now();
        // A refreshed token from the old session stays valid longer than the original.
        let token = match &self.params.token {
            super::TokenSource::Fixed(_) => self.link.signal.token(),
            mint => mint.token()?,
        };
        let (link, join) = connect(&self.params.url, &token, &self.socket, self.local_ip, self.muted).await?;
        self.link = link;
        self.phase = Phase::Connected;
        // Packets of the old session are gone with it; sequence numbers restart with the new one.
        self.reliable = Reliable::new();
        let own = join.participant.unwrap_or_default();
        self.own_identity = own.identity;
        let before: Vec<_> = self.roster.members().cloned().collect();
        let (roster, joined) = Roster::new(&own.sid, &join.other_participants);
        self.roster = roster;
        let mut out = Outbox::default();
        let missing = before.into_iter().filter(|m| self.roster.get(&m.identity).is_none()).collect();
        self.back_after_rejoin.after_rejoin(missing, Instant::now());
        self.back_after_rejoin.seen(&joined);
        for c in &joined {
            self.handler.on_change(c, &self.roster, Instant::now(), &mut out);
        }
        self.execute(out).await;
        self.wait_until_open(started).await
    }

    async fn leave(&mut self) {
        tracing::info!(room = %self.room_name, identity = %self.own_identity, "leaving");
        self.link.peer.close();
        let _ = self.pump().await;
        self.link
            .signal
            .send(Req::Leave(proto::LeaveRequest {
                can_reconnect: false,
                reason: proto::DisconnectReason::ClientInitiated as i32,
                action: proto::leave_request::Action::Disconnect as i32,
                ..Default::default()
            }))
            .await;
        self.link.signal.close().await;
    }
}

fn log_change(c: &super::Change) {
    match c {
        super::Change::Joined(m) => {
            tracing::info!(identity = %m.identity, kind = ?m.kind, agent = ?m.agent_name(), "participant joined")
        }
        super::Change::Left(m) => tracing::info!(identity = %m.identity, "participant left"),
        super::Change::Updated { after, .. } => {
            tracing::debug!(identity = %after.identity, tracks = after.tracks.len(), "participant updated")
        }
    }
}

/// Connects the signal client, sets up the peer connection and publishes the track.
async fn connect(
    url: &str,
    token: &str,
    socket: &UdpSocket,
    local_ip: IpAddr,
    muted: bool,
) -> Result<(Link, proto::JoinResponse), ConnectError> {
    let mut opts = SignalOptions::default();
    opts.auto_subscribe = false;
    opts.adaptive_stream = false;
    opts.region_failover = false;
    opts.connect_timeout = CONNECT_TIMEOUT;
    opts.client_capabilities = Vec::new();
    opts.client_protocol = livekit_signaling::CLIENT_PROTOCOL_DEFAULT;
    let (signal, join, events) =
        tokio::time::timeout(CONNECT_TIMEOUT, SignalClient::connect(url, token, opts, None))
            .await
            .map_err(|_| ConnectError::Unreachable { url: url.into(), reason: "timed out".into() })?
            .map_err(|e| classify(url, e))?;

    let local = SocketAddr::new(local_ip, socket.local_addr()?.port());
    let cid = format!("TR_baton_{}", rand::random::<u32>());
    let (peer, offer) = Peer::new(Instant::now(), local, &cid)?;
    // The track request goes first: the server pairs the offer's track with it by cid.
    signal
        .send(Req::AddTrack(proto::AddTrackRequest {
            cid: cid.clone(),
            name: super::FILLER_TRACK_NAME.into(),
            r#type: proto::TrackType::Audio as i32,
            source: proto::TrackSource::Microphone as i32,
            muted,
            disable_red: true,
            audio_features: vec![proto::AudioTrackFeature::TfNoDtx as i32],
            ..Default::default()
        }))
        .await;
    signal
        .send(Req::Offer(proto::SessionDescription {
            r#type: "offer".into(),
            sdp: offer,
            ..Default::default()
        }))
        .await;
    if let Some(line) = peer.local_candidate_sdp() {
        let init = serde_json::json!({"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0});
        signal
            .send(Req::Trickle(proto::TrickleRequest {
                candidate_init: init.to_string(),
                target: proto::SignalTarget::Publisher as i32,
                ..Default::default()
            }))
            .await;
    }
    Ok((Link { signal, events, peer, cid, track_sid: None }, join))
}

fn classify(url: &str, e: livekit_signaling::SignalError) -> ConnectError {
    use livekit_signaling::SignalError as E;
    match e {
        E::Client(status, msg) if status.as_u16() == 401 || status.as_u16() == 403 => {
            ConnectError::Unauthorized(if msg.is_empty() {
                status.to_string()
            } else {
                msg.trim().to_string()
            })
        }
        E::UrlParse(m) => ConnectError::Url(url.into(), m),
        E::Connection(m) | E::Timeout(m) => ConnectError::Unreachable { url: url.into(), reason: m },
        E::Handshake { status } if status.as_u16() == 401 || status.as_u16() == 403 => {
            ConnectError::Unauthorized(status.to_string())
        }
        other => ConnectError::Signal(other.to_string()),
    }
}

/// Resolves the server's host so the UDP socket can be bound on the interface that reaches it.
async fn server_addr(url: &str) -> Result<SocketAddr, ConnectError> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| ConnectError::Url(url.into(), "expected ws://, wss://, http:// or https://".into()))?;
    let secure = url.starts_with("wss") || url.starts_with("https");
    let hostport = rest.split('/').next().unwrap_or_default();
    if hostport.is_empty() {
        return Err(ConnectError::Url(url.into(), "no host".into()));
    }
    let with_port = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if secure { 443 } else { 80 })
    };
    tokio::net::lookup_host(&with_port)
        .await
        .map_err(|e| ConnectError::Unreachable { url: url.into(), reason: e.to_string() })?
        .next()
        .ok_or_else(|| ConnectError::Unreachable { url: url.into(), reason: "host has no address".into() })
}

/// Binds baton's UDP socket and finds the local address that routes to the server, which is
/// the one host candidate baton offers.
async fn bind_towards(server: SocketAddr) -> Result<(UdpSocket, IpAddr), ConnectError> {
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| ConnectError::Io(std::io::Error::other("bad bind address")))?;
    let probe = UdpSocket::bind(any).await?;
    probe.connect(server).await?;
    let local_ip = probe.local_addr()?.ip();
    drop(probe);
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    Ok((socket, local_ip))
}
