//! `baton worker`: a LiveKit agent worker. It registers on the server's `/agent` websocket, is
//! dispatched into rooms (RoomAgentDispatch in a token, or AgentDispatchService), and holds each
//! room in its own task running [`crate::room::run`].
//!
//! The protocol lives in [`state`] (sans-IO); this module is the IO shell around it: the
//! websocket, the timers, the room tasks, and reconnecting with backoff when the websocket
//! drops. Rooms already running are not touched by a reconnect: they have their own
//! connections, and the worker websocket only carries new work and status.

pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use livekit_api::access_token::{AccessToken, VideoGrants};
use livekit_protocol::participant_info::Kind as ParticipantKind;
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::audio::filler::FillerSound;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::observe::{Observed, Observer};
use crate::room::{self, RoomEnd, RoomHandler, RoomParams, TokenSource};
use crate::server_api::ServerApi;
use crate::store::{Acquired, RoomStoreClient, Snapshot, StoreConfig, StoreHandle, StoreSignal};
pub use state::{Action, Backoff, JobStart, StateConfig, WorkerState};

/// The `/agent` websocket protocol version this worker speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Everything `baton worker` needs, resolved from flags, environment and `configs/baton.toml`
/// (see [`crate::config`]).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// LiveKit server URL (`ws(s)://` or `http(s)://`).
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
    /// Registration, capacity and protocol timers.
    pub protocol: StateConfig,
    /// How long a room task keeps trying to get back into its room after losing it.
    pub rejoin_timeout: Duration,
    /// Comfort-noise level of the filler track, dBFS.
    pub noise_dbfs: f64,
    /// A WAV clip looped as the filler instead of comfort noise.
    pub filler_clip: Option<std::path::PathBuf>,
    /// Gain applied to the filler clip, dB.
    pub filler_gain_db: f64,
    /// First wait before reconnecting the worker websocket.
    pub reconnect_initial: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How long a clean exit waits for the rooms to be left.
    pub drain_timeout: Duration,
    /// The floor arbiter's policy for every room (agents, starting agent, timeouts).
    pub policy: baton_floor::Policy,
    /// Where room state is kept (`[store]`).
    pub store: crate::store::StoreConfig,
    /// How long a room's lease lasts without renewal.
    pub lease_ttl: Duration,
}

/// Why the worker could not run at all. Trouble after the first registration is never fatal:
/// the worker reconnects.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid server URL `{0}`: {1}; use ws://, wss://, http:// or https://")]
    Url(String, String),
    #[error(
        "the LiveKit server at {url} refused the worker's credentials (HTTP {status}); check \
         LIVEKIT_API_KEY and LIVEKIT_API_SECRET (--api-key/--api-secret)"
    )]
    Unauthorized { url: String, status: u16 },
    #[error("could not sign the worker token: {0}")]
    Token(String),
    #[error("could not prepare the filler: {0}")]
    Filler(String),
}

/// The per-room logic the worker runs in every room it is dispatched to.
///
/// Kept in one place on purpose: this is where the floor arbiter will be built per room.
pub fn room_handler(job: &JobStart, opts: &WorkerOptions, trace_context: bool) -> Box<dyn RoomHandler> {
    room_handler_with(job, opts, trace_context, None)
}

/// [`room_handler`] with the room's state store and what it held when this baton joined.
pub fn room_handler_with(
    job: &JobStart,
    opts: &WorkerOptions,
    trace_context: bool,
    durable: Option<(RoomStoreClient, Snapshot)>,
) -> Box<dyn RoomHandler> {
    let api = match ServerApi::new(&opts.url, &opts.api_key, &opts.api_secret) {
        Ok(api) => Some(Arc::new(api)),
        Err(e) => {
            tracing::error!(error = %e, "server API unavailable: baton cannot dispatch or mute");
            None
        }
    };
    let cfg = CoordinatorConfig {
        room: job.room.clone(),
        policy: opts.policy.clone(),
        api,
        echo: false,
        trace_context,
    };
    match Coordinator::new(cfg, StdInstant::now()) {
        Ok(c) => match durable {
            Some((client, snapshot)) => Box::new(c.with_store(client, snapshot)),
            None => Box::new(c),
        },
        Err(e) => {
            // The policy was validated at start-up, so this is not expected; answering pings
            // beats failing the job.
            tracing::error!(error = %e, "invalid handoff policy; this room only answers pings");
            Box::new(Coordinator::minimal(&job.room, false))
        }
    }
}

/// The `/agent` websocket URL for a server URL: http(s) becomes ws(s), and the protocol version
/// is passed as the server expects it.
pub fn agent_url(url: &str) -> Result<String, WorkerError> {
    let bad = |why: &str| WorkerError::Url(url.to_string(), why.to_string());
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return Err(bad("unsupported scheme")),
    };
    if rest.contains(['?', '#']) {
        return Err(bad("a query or fragment is not allowed"));
    }
    let base = rest.trim_end_matches('/');
    if base.is_empty() {
        return Err(bad("no host"));
    }
    Ok(format!("{scheme}://{base}/agent?protocol={PROTOCOL_VERSION}"))
}

/// The token for the `/agent` websocket: only the `agent` grant, which is what the server checks.
pub fn worker_token(api_key: &str, api_secret: &str) -> Result<String, WorkerError> {
    AccessToken::with_api_key(api_key, api_secret)
        .with_ttl(Duration::from_secs(600))
        .with_grants(VideoGrants { agent: true, ..Default::default() })
        .to_jwt()
        .map_err(|e| WorkerError::Token(e.to_string()))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum ConnectFailure {
    Unauthorized(u16),
    Other(String),
}

async fn connect(url: &str, jwt: &str) -> Result<Ws, ConnectFailure> {
    let mut req = url.into_client_request().map_err(|e| ConnectFailure::Other(e.to_string()))?;
    let auth = format!("Bearer {jwt}")
        .parse()
        .map_err(|_| ConnectFailure::Other("the token is not a valid header value".into()))?;
    req.headers_mut().insert("Authorization", auth);
    match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await {
        Err(_) => Err(ConnectFailure::Other("no websocket handshake within 10s".into())),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(resp))) if matches!(resp.status().as_u16(), 401 | 403) => {
            Err(ConnectFailure::Unauthorized(resp.status().as_u16()))
        }
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            Err(ConnectFailure::Other(format!("HTTP {}: {}", resp.status(), body.trim())))
        }
        Ok(Err(e)) => Err(ConnectFailure::Other(e.to_string())),
    }
}

/// What room tasks report to the worker.
enum RoomEvent {
    Joined { job_id: String },
    Ended { job_id: String, result: Result<RoomEnd, String> },
}

struct Worker {
    opts: WorkerOptions,
    /// The process's event sinks; every room's logic is wrapped to feed it.
    observer: Arc<Observer>,
    state: WorkerState,
    filler: Arc<FillerSound>,
    /// Shutdown switch of each running room task, by job id.
    rooms: HashMap<String, watch::Sender<bool>>,
    /// When each job was assigned, for the dispatch-to-joined latency.
    assigned_at: HashMap<String, Instant>,
    events_tx: mpsc::UnboundedSender<RoomEvent>,
    events: mpsc::UnboundedReceiver<RoomEvent>,
    shutdown: watch::Receiver<bool>,
    draining: bool,
    /// The worker's store task (None: `[store] kind = "memory"`, or the store could not open).
    store: Option<StoreHandle>,
    /// Unique per worker process: the prefix of its lease holder ids.
    instance: String,
}

/// Why the connected loop ended.
enum Disconnect {
    Lost(String),
    Done,
}

/// Runs the worker until `shutdown` turns true and every room has been left (or the drain
/// timeout passed). Returns an error only for problems that retrying cannot fix: a bad URL or
/// credentials the server rejects before the first registration.
pub async fn run(
    opts: WorkerOptions,
    observer: Arc<Observer>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    // A room task's future is not `Send` (it holds its handler across awaits), so the rooms run
    // on a local task set; they are idle almost all the time, one thread carries many.
    tokio::task::LocalSet::new().run_until(run_local(opts, observer, shutdown)).await
}

async fn run_local(
    opts: WorkerOptions,
    observer: Arc<Observer>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let agent_url = agent_url(&opts.url)?;
    let filler = FillerSound::configured(opts.filler_clip.as_deref(), opts.filler_gain_db, opts.noise_dbfs)
        .map_err(|e| WorkerError::Filler(e.to_string()))?;
    tracing::info!(filler = %filler.description, "filler ready");
    let (events_tx, events) = mpsc::unbounded_channel();
    let store = start_store(&opts.store, &observer);
    let instance =
        format!("{}-{}-{:08x}", opts.protocol.agent_name, std::process::id(), rand::random::<u32>());
    if let Some(store) = &store {
        tokio::task::spawn_local(adopt_rooms(
            store.clone(),
            opts.clone(),
            instance.clone(),
            shutdown.clone(),
        ));
    }
    let mut w = Worker {
        store,
        instance,
        state: WorkerState::new(opts.protocol.clone()),
        opts,
        observer,
        filler,
        rooms: HashMap::new(),
        assigned_at: HashMap::new(),
        events_tx,
        events,
        shutdown,
        draining: false,
    };
    let mut backoff = Backoff::new(w.opts.reconnect_initial, w.opts.reconnect_max);
    let mut ever_registered = false;
    let mut drain_deadline: Option<Instant> = None;
    tracing::info!(
        url = %agent_url,
        agent_name = %w.opts.protocol.agent_name,
        max_rooms = w.opts.protocol.max_rooms,
        "starting worker"
    );
    loop {
        if w.draining {
            drain_deadline.get_or_insert_with(|| Instant::now() + w.opts.drain_timeout);
        }
        if w.state.drained() || drain_deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let jwt = worker_token(&w.opts.api_key, &w.opts.api_secret)?;
        let attempt = connect(&agent_url, &jwt);
        tokio::pin!(attempt);
        let connected = loop {
            tokio::select! {
                r = &mut attempt => break Some(r),
                Some(ev) = w.events.recv() => w.on_room_event(ev, None).await,
                _ = w.shutdown.changed(), if !w.draining => { w.start_drain(None).await; }
            }
            if w.state.drained() {
                break None;
            }
        };
        let Some(connected) = connected else { break };
        let reason = match connected {
            Ok(ws) => match w.connected(ws, &mut backoff, &mut ever_registered).await {
                Disconnect::Done => break,
                Disconnect::Lost(reason) => reason,
            },
            Err(ConnectFailure::Unauthorized(status)) if !ever_registered => {
                return Err(WorkerError::Unauthorized { url: w.opts.url.clone(), status });
            }
            Err(ConnectFailure::Unauthorized(status)) => {
                format!("credentials refused (HTTP {status})")
            }
            Err(ConnectFailure::Other(e)) => e,
        };
        w.state.on_disconnected();
        if w.draining {
            // No point in registering again only to say goodbye; wait for the rooms to leave.
            w.pump_until(drain_deadline.unwrap_or_else(Instant::now)).await;
            break;
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tracing::warn!(
            %reason,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            rooms = w.state.job_count(),
            "worker connection to the LiveKit server lost or refused; rooms keep running, registering again"
        );
        w.pump_until(Instant::now() + delay).await;
    }
    for (job_id, stop) in &w.rooms {
        tracing::warn!(%job_id, "room still running at exit; abandoning it");
        let _ = stop.send(true);
    }
    tracing::info!("worker stopped");
    Ok(())
}

impl Worker {
    /// Runs one websocket connection: register, then serve until it is lost or the worker is done.
    async fn connected(&mut self, ws: Ws, backoff: &mut Backoff, ever_registered: &mut bool) -> Disconnect {
        let (mut sink, mut stream): (SplitSink<Ws, Message>, SplitStream<Ws>) = ws.split();
        let actions = self.state.on_connected(Instant::now().into_std());
        if let Err(reason) = self.apply(actions, Some(&mut sink)).await {
            return Disconnect::Lost(reason);
        }
        loop {
            let was_registered = self.state.worker_id().is_some();
            let wake = self.state.poll_timeout().map(Instant::from_std);
            let step: Result<(), String> = tokio::select! {
                frame = stream.next() => match frame {
                    Some(Ok(Message::Binary(bytes))) => match livekit_protocol::ServerMessage::decode(bytes) {
                        Ok(m) => {
                            let actions = self.state.on_server_message(m, Instant::now().into_std());
                            self.apply(actions, Some(&mut sink)).await
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable message from the server; ignored");
                            Ok(())
                        }
                    },
                    Some(Ok(Message::Close(frame))) => Err(format!("server closed the websocket: {frame:?}")),
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("websocket ended".into()),
                },
                Some(ev) = self.events.recv() => { self.on_room_event(ev, Some(&mut sink)).await; Ok(()) }
                _ = sleep_until_opt(wake) => {
                    let actions = self.state.on_tick(Instant::now().into_std());
                    self.apply(actions, Some(&mut sink)).await
                }
                _ = self.shutdown.changed(), if !self.draining => { self.start_drain(Some(&mut sink)).await; Ok(()) }
            };
            if let Err(reason) = step {
                self.observer.set_registered(false);
                return Disconnect::Lost(reason);
            }
            if !was_registered && let Some(id) = self.state.worker_id() {
                self.observer.set_registered(!self.draining);
                tracing::info!(
                    worker_id = %id,
                    agent_name = %self.opts.protocol.agent_name,
                    rooms = self.state.job_count(),
                    "worker registered"
                );
                *ever_registered = true;
                backoff.reset();
            }
            if self.state.drained() {
                let _ = sink.send(Message::Close(None)).await;
                return Disconnect::Done;
            }
        }
    }

    /// Executes the state machine's actions. An error means the connection must be replaced.
    async fn apply(
        &mut self,
        actions: Vec<Action>,
        mut sink: Option<&mut SplitSink<Ws, Message>>,
    ) -> Result<(), String> {
        for action in actions {
            match action {
                Action::Send(m) => {
                    if let Some(sink) = sink.as_deref_mut() {
                        sink.send(Message::Binary(m.encode_to_vec().into()))
                            .await
                            .map_err(|e| format!("could not send to the server: {e}"))?;
                    }
                }
                Action::SpawnRoom(job) => self.spawn_room(job),
                Action::StopRoom { job_id } => {
                    tracing::info!(%job_id, room = %self.state.room_of(&job_id).unwrap_or(""), "leaving the room");
                    if let Some(stop) = self.rooms.get(&job_id) {
                        let _ = stop.send(true);
                    }
                }
                Action::Reconnect { reason } => return Err(reason),
            }
        }
        Ok(())
    }

    fn spawn_room(&mut self, job: JobStart) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let params = RoomParams {
            url: job.url.clone().unwrap_or_else(|| self.opts.url.clone()),
            token: TokenSource::Fixed(job.token.clone()),
            start_unmuted: false,
            filler: self.filler.clone(),
            rejoin_deadline: self.opts.rejoin_timeout,
            drop_signal: Arc::new(tokio::sync::Notify::new()),
        };
        let joined = self.events_tx.clone();
        let joined_id = job.job_id.clone();
        tracing::info!(job_id = %job.job_id, room = %job.room, dispatch_id = %job.dispatch_id, "job assigned; joining");
        let events = self.events_tx.clone();
        let job_id = job.job_id.clone();
        let (opts, observer, store) = (self.opts.clone(), self.observer.clone(), self.store.clone());
        let trace_context = self.observer.exports_traces();
        let holder = format!("{}/{}", self.instance, job.job_id);
        let job_key = job.job_id.clone();
        tokio::task::spawn_local(async move {
            let durable = match before_join(&job, &opts, store, &holder).await {
                Ok(durable) => durable,
                Err(why) => {
                    // Another baton coordinates the room: joining with the same identity would
                    // evict it (DuplicateIdentity) in the middle of its call.
                    tracing::warn!(job_id = %job.job_id, room = %job.room, %why, "not joining: the room has a live baton");
                    let _ = events.send(RoomEvent::Ended { job_id, result: Ok(RoomEnd::Left) });
                    return;
                }
            };
            let lease = durable.as_ref().map(|(client, _)| client.clone());
            let handler = Box::new(
                Observed::new(room_handler_with(&job, &opts, trace_context, durable), observer, &job.room)
                    .on_joined(
                        // When baton is first in the room the job counts as running.
                        move || {
                            let _ = joined.send(RoomEvent::Joined { job_id: joined_id });
                        },
                    ),
            );
            let result = room::run(params, handler, stop_rx).await.map_err(|e| e.to_string());
            // Left or removed: the room's state stays (a call still going gets another baton,
            // see `adopt_rooms`), the lease goes at once rather than after its TTL.
            if let Some(client) = lease {
                client.handle.release(&client.room, &client.holder, client.token);
            }
            let _ = events.send(RoomEvent::Ended { job_id, result });
        });
        self.assigned_at.insert(job_key.clone(), Instant::now());
        self.rooms.insert(job_key, stop_tx);
    }

    async fn on_room_event(&mut self, ev: RoomEvent, sink: Option<&mut SplitSink<Ws, Message>>) {
        let actions = match ev {
            RoomEvent::Joined { job_id } => {
                let ms = self.assigned_at.get(&job_id).map(|t| t.elapsed().as_millis()).unwrap_or(0);
                tracing::info!(%job_id, room = %self.state.room_of(&job_id).unwrap_or(""), assigned_to_joined_ms = ms as u64, "joined the room");
                self.state.on_room_joined(&job_id)
            }
            RoomEvent::Ended { job_id, result } => {
                self.rooms.remove(&job_id);
                self.assigned_at.remove(&job_id);
                let room = self.state.room_of(&job_id).unwrap_or("").to_string();
                let error = match &result {
                    Ok(RoomEnd::Left) => {
                        tracing::info!(%job_id, %room, "job ended: left the room");
                        None
                    }
                    Ok(RoomEnd::Removed(why)) => {
                        tracing::info!(%job_id, %room, reason = %why, "job ended: removed from the room");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(%job_id, %room, error = %e, "job failed");
                        Some(e.as_str())
                    }
                };
                let actions = self.state.on_room_ended(&job_id, error);
                tracing::debug!(rooms = self.state.job_count(), "room freed");
                actions
            }
        };
        // A send failure here surfaces as a read error on the next loop turn.
        let _ = self.apply(actions, sink).await;
    }

    async fn start_drain(&mut self, sink: Option<&mut SplitSink<Ws, Message>>) {
        tracing::info!(rooms = self.state.job_count(), "shutting down: leaving every room");
        self.draining = true;
        self.observer.set_registered(false);
        let actions = self.state.drain();
        let _ = self.apply(actions, sink).await;
    }

    /// Waits until `until` while still serving room events (and shutdown) with no connection.
    async fn pump_until(&mut self, until: Instant) {
        let sleep = tokio::time::sleep_until(until);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return,
                Some(ev) = self.events.recv() => self.on_room_event(ev, None).await,
                _ = self.shutdown.changed(), if !self.draining => self.start_drain(None).await,
            }
            if self.state.drained() {
                return;
            }
        }
    }
}

/// How long the checks before a join may take (lease, stored state) before the baton joins
/// without them: the call matters more than the store.
const BEFORE_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Before joining a room: takes its lease and loads what the store holds about it. `Ok(None)`:
/// join without a store (none configured); `Err`: another baton holds the room, do not join.
/// A store that is down or slow does not keep baton out: it joins with token 0 and an empty
/// snapshot, and its writes wait for the store.
async fn before_join(
    job: &JobStart,
    opts: &WorkerOptions,
    store: Option<StoreHandle>,
    holder: &str,
) -> Result<Option<(RoomStoreClient, Snapshot)>, String> {
    let Some(handle) = store else {
        return live_baton_in_room(job, opts).await.map(|()| None);
    };
    let steps = async {
        let lease = handle.acquire(&job.room, holder, opts.lease_ttl).await?;
        let snapshot = handle.load(&job.room).await?;
        Ok::<_, crate::store::StateError>((lease, snapshot))
    };
    let client = |token| RoomStoreClient {
        handle: handle.clone(),
        room: job.room.clone(),
        holder: holder.to_owned(),
        token,
    };
    match tokio::time::timeout(BEFORE_JOIN_TIMEOUT, steps).await {
        Ok(Ok((Acquired::Held(lease), snapshot))) => {
            tracing::info!(room = %job.room, token = lease.token, floor = ?snapshot.record.as_ref().and_then(|r| r.floor.as_ref()).map(|f| &f.identity), checkpoints = snapshot.checkpoints.len(), "room lease taken");
            Ok(Some((client(lease.token), snapshot)))
        }
        Ok(Ok((Acquired::Busy(lease), _))) => Err(format!(
            "lease held by {} (token {}) for {} ms more",
            lease.holder,
            lease.token,
            lease.expires_at_ms.saturating_sub(crate::store::epoch_ms())
        )),
        Ok(Err(e)) => {
            tracing::error!(room = %job.room, error = %e, "state store unavailable at join: joining without its lease and state");
            Ok(Some((client(0), Snapshot::default())))
        }
        Err(_) => {
            tracing::error!(room = %job.room, "state store too slow at join: joining without its lease and state");
            Ok(Some((client(0), Snapshot::default())))
        }
    }
}

/// Without a store there is no lease: ask the server whether a participant with baton's
/// identity is already in the room. An error of the server API lets baton join.
async fn live_baton_in_room(job: &JobStart, opts: &WorkerOptions) -> Result<(), String> {
    let Ok(api) = ServerApi::new(&opts.url, &opts.api_key, &opts.api_secret) else { return Ok(()) };
    match tokio::time::timeout(BEFORE_JOIN_TIMEOUT, api.list_participants(&job.room)).await {
        Ok(Ok(participants)) => match participants.iter().find(|p| p.identity == opts.protocol.identity) {
            Some(p) => Err(format!("participant {} ({}) is in the room", p.identity, p.sid)),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Opens the configured store and starts its task; `None` for `memory`, or (logged) when the
/// store cannot be opened: baton then runs without durable state rather than not at all.
fn start_store(config: &StoreConfig, observer: &Arc<Observer>) -> Option<StoreHandle> {
    let observer = observer.clone();
    let signals: Arc<dyn Fn(StoreSignal) + Send + Sync> = Arc::new(move |s| match s {
        StoreSignal::Error(_) => observer.metrics().store_error(),
        StoreSignal::Degraded(d) => observer.metrics().store_degraded(d),
        StoreSignal::LeaseLost(_) => {}
    });
    match config {
        StoreConfig::Memory => {
            tracing::info!(
                "room state in memory only ([store] kind = \"memory\"): a restarted baton starts rooms afresh"
            );
            None
        }
        StoreConfig::Embedded { dir, room_bytes, ttl } => {
            match crate::store::EmbeddedStore::open(dir, *room_bytes, *ttl) {
                Ok(store) => {
                    tracing::info!(dir = %dir.display(), "room state in the embedded store");
                    Some(crate::store::spawn(store, signals))
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot open the embedded state store (one worker per directory: set [store] path or --store-path); running without durable room state");
                    None
                }
            }
        }
        StoreConfig::Redis { url, room_bytes, ttl } => {
            match crate::store::RedisStore::new(url, *room_bytes, *ttl) {
                Ok(store) => {
                    tracing::info!("room state in Redis");
                    Some(crate::store::spawn(store, signals))
                }
                Err(e) => {
                    tracing::error!(error = %e, "invalid [store] url; running without durable room state");
                    None
                }
            }
        }
    }
}

/// Rooms the store holds state for but no live baton coordinates (their baton was killed, its
/// lease lapsed): once at start and then every quarter of the lease TTL, dispatch baton (CreateDispatch of this
/// worker's agent name) into each such room that still has people in it, and forget the state
/// of rooms that are gone. Several workers sharing Redis may all see the same room: a short
/// claim (a lease on `<room>#adopt`) lets one of them dispatch, and the room's lease lets one
/// baton join.
async fn adopt_rooms(
    store: StoreHandle,
    opts: WorkerOptions,
    instance: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(api) = ServerApi::new(&opts.url, &opts.api_key, &opts.api_secret) else { return };
    let mut attempts: HashMap<String, u32> = HashMap::new();
    // The first look comes after the worker had a moment to register, so the server has a
    // worker to give the dispatch to.
    // A quarter of the lease TTL: a lapsed lease is seen within that, so a dead baton's rooms
    // wait at most the TTL and a quarter of it (one store scan per look; cheap next to the
    // renewals every third of the TTL).
    let every = (opts.lease_ttl / 4).max(Duration::from_millis(250));
    let mut tick = tokio::time::interval_at(Instant::now() + ADOPT_FIRST_LOOK, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Ok(rooms) = store.rooms().await else { continue };
        for (room, lease) in rooms {
            if lease.is_some() || room.ends_with(ADOPT_SUFFIX) {
                continue;
            }
            let n = attempts.entry(room.clone()).or_insert(0);
            if *n >= ADOPT_ATTEMPTS {
                continue;
            }
            *n += 1;
            // The embedded store has one worker; Redis may have many looking at the same room.
            let shared = matches!(opts.store, StoreConfig::Redis { .. });
            let claim = format!("{room}{ADOPT_SUFFIX}");
            if shared && !matches!(store.acquire(&claim, &instance, ADOPT_CLAIM).await, Ok(Acquired::Held(_)))
            {
                continue;
            }
            let people = match api.list_participants(&room).await {
                Ok(people) => people,
                Err(e) => {
                    tracing::warn!(%room, error = %e, "cannot list the room's participants");
                    continue;
                }
            };
            let identity = &opts.protocol.identity;
            let present = people.iter().map(|p| {
                (
                    p.identity.as_str(),
                    ParticipantKind::try_from(p.kind).is_ok_and(crate::room::roster::is_caller),
                )
            });
            match adopt_step(present, identity) {
                AdoptStep::Forget => {
                    tracing::info!(%room, "room with stored state is gone or has no caller left; forgetting its state");
                    let _ = store.write(&room, 0, crate::store::Write::Forget).await;
                }
                AdoptStep::Dispatch { remove_stale_baton } => {
                    tracing::warn!(%room, attempt = *n, "room has state but no live baton (its baton died); dispatching baton into it");
                    if remove_stale_baton {
                        // The dead baton's participant is still in the room until the server
                        // notices (about 5 s after a SIGKILL). livekit-server (1.13.5,
                        // pkg/rtc/room.go) maps a participant identity to the newest job that
                        // uses it, so when that stale participant is dropped after the new job
                        // was assigned and before it joined, the server terminates the *new* job
                        // (AGENT_LEFT_ROOM). Removing it first closes that race.
                        match api.remove_participant(&room, identity).await {
                            Ok(()) => {
                                tracing::info!(%room, %identity, "removed the dead baton's participant")
                            }
                            Err(e) => {
                                tracing::info!(%room, error = %e, "could not remove the dead baton's participant")
                            }
                        }
                    }
                    if let Err(e) = api.create_dispatch(&room, &opts.protocol.agent_name, "").await {
                        tracing::warn!(%room, error = %e, "could not dispatch baton into the room");
                    }
                }
            }
        }
    }
}

/// What [`adopt_rooms`] does with a room whose stored lease lapsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdoptStep {
    /// No caller is in the room: the call is over (its agents may still be on their way out),
    /// drop its state.
    Forget,
    /// A caller is still in the call: dispatch baton into it, removing first the participant a
    /// dead baton left behind (`remove_stale_baton`).
    Dispatch { remove_stale_baton: bool },
}

/// The step for a room whose lease lapsed, from (identity, is a caller) of those in it and
/// baton's identity. A participant with baton's identity in such a room is a baton that no
/// longer renews its lease (killed, or cut off from the store longer than a lease TTL). Only a
/// caller brings baton back: a baton that ended its session when the caller left releases its
/// lease while the agents are still leaving, and must not be dispatched again.
fn adopt_step<'a>(present: impl IntoIterator<Item = (&'a str, bool)>, baton: &str) -> AdoptStep {
    let (mut caller, mut stale) = (false, false);
    for (identity, is_caller) in present {
        if identity == baton {
            stale = true;
        } else if is_caller {
            caller = true;
        }
    }
    if caller { AdoptStep::Dispatch { remove_stale_baton: stale } } else { AdoptStep::Forget }
}

/// When [`adopt_rooms`] first looks, after the worker started.
const ADOPT_FIRST_LOOK: Duration = Duration::from_secs(1);
/// The claim key suffix of [`adopt_rooms`].
const ADOPT_SUFFIX: &str = "#adopt";
/// How long one worker's claim to dispatch baton into a room lasts.
const ADOPT_CLAIM: Duration = Duration::from_secs(10);
/// Dispatches into one room per worker process before leaving it to the state's TTL.
const ADOPT_ATTEMPTS: u32 = 3;

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_url_converts_schemes_and_adds_protocol() {
        assert_eq!(
            agent_url("ws://127.0.0.1:7880").ok().as_deref(),
            Some("ws://127.0.0.1:7880/agent?protocol=1")
        );
        assert_eq!(
            agent_url("https://lk.example.com/").ok().as_deref(),
            Some("wss://lk.example.com/agent?protocol=1")
        );
        assert_eq!(agent_url("HTTP://h:1").ok().as_deref(), Some("ws://h:1/agent?protocol=1"));
        assert!(agent_url("ftp://h").is_err());
        assert!(agent_url("127.0.0.1:7880").is_err());
        assert!(agent_url("ws://h/?x=1").is_err());
    }

    #[test]
    fn a_room_whose_lease_lapsed_gets_baton_back_only_while_a_caller_is_in_it() {
        assert_eq!(adopt_step([], "baton"), AdoptStep::Forget);
        assert_eq!(adopt_step([("baton", false)], "baton"), AdoptStep::Forget);
        // The caller left and the agents are on their way out: the call is over.
        assert_eq!(adopt_step([("agent-1", false), ("agent-2", false)], "baton"), AdoptStep::Forget);
        assert_eq!(
            adopt_step([("caller", true), ("agent-1", false)], "baton"),
            AdoptStep::Dispatch { remove_stale_baton: false }
        );
        assert_eq!(
            adopt_step([("caller", true), ("baton", false), ("agent-1", false)], "baton"),
            AdoptStep::Dispatch { remove_stale_baton: true }
        );
        assert!(crate::room::roster::is_caller(ParticipantKind::Sip));
        assert!(!crate::room::roster::is_caller(ParticipantKind::Agent));
        assert!(!crate::room::roster::is_caller(ParticipantKind::Egress));
    }

    #[test]
    fn worker_token_has_the_agent_grant() {
        let secret = "secret-secret-secret-secret-secret";
        let jwt = worker_token("key", secret).expect("sign");
        let claims = livekit_api::access_token::TokenVerifier::with_api_key("key", secret)
            .verify(&jwt)
            .expect("verify");
        assert!(claims.video.agent);
        assert!(!claims.video.room_join);
    }
}
