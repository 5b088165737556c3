//! Observability: what happened in every room, as an event stream (stdout, webhook), metrics,
//! traces and a call timeline page.
//!
//! Layout: [`event`] is the typed event and its JSON line (schema in `docs/events.md`);
//! [`metrics`] counts events for Prometheus; [`webhook`] delivers lines to an HTTP receiver;
//! [`trace`] turns finished handoffs into OpenTelemetry spans; [`calls`] keeps the recent
//! history the page shows; [`http`] serves `/metrics`, `/healthz`, `/readyz`, the page and its
//! JSON.
//!
//! The coordinator puts [`Event`]s in the room's [`Outbox`]; [`Observed`], wrapped around the
//! coordinator, hands them to the process's one [`Observer`], which fans each out to every
//! sink. Nothing here blocks the room task: metrics are atomics, the webhook has a bounded
//! queue, spans are exported by the OpenTelemetry batch thread.

pub mod calls;
pub mod event;
pub mod http;
pub mod metrics;
pub mod trace;
pub mod webhook;

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use event::{Event, SCHEMA_VERSION};
pub use metrics::Stat;
pub use trace::TraceParent;
pub use webhook::WebhookConfig;

use crate::room::{Change, Incoming, Outbox, RoomHandler, Roster};
use crate::server_api::{ApiResult, ServerApi};
use calls::{CallId, CallLog};
use metrics::Metrics;

/// When `/readyz` answers 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `baton join`: while baton is in its room.
    InRoom,
    /// `baton worker`: while the worker is registered with the LiveKit server and not draining.
    Registered,
}

/// What the observer does besides counting.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// Write every event line to stdout.
    pub stdout: bool,
    /// Deliver every event line to this webhook.
    pub webhook: Option<WebhookConfig>,
    /// Export traces when the environment names an OTLP endpoint.
    pub traces_from_env: bool,
    /// What `/readyz` means.
    pub readiness: Readiness,
}

/// Why observability could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{0}")]
    Webhook(#[from] webhook::WebhookError),
    #[error("{0}")]
    Traces(String),
    #[error("could not serve HTTP on {addr}: {error}")]
    Http { addr: std::net::SocketAddr, error: std::io::Error },
}

/// The process's sinks for events; shared by every room.
pub struct Observer {
    metrics: Arc<Metrics>,
    calls: Mutex<CallLog>,
    stdout: bool,
    webhook: Option<webhook::Webhook>,
    traces: Option<trace::Traces>,
    readiness: Readiness,
    registered: AtomicBool,
    /// Makes event ids unique across restarts: random per process.
    run_id: String,
    next_event: AtomicU64,
}

impl Observer {
    /// Starts the sinks. With a webhook this must run inside a tokio runtime (the delivery
    /// task is spawned on it).
    ///
    /// Installs ring as the process's default rustls provider unless one is installed: the
    /// webhook's and the OTLP exporter's reqwest clients need one, and with both ring and
    /// aws-lc-rs in the build rustls cannot pick.
    pub fn new(cfg: ObserverConfig) -> Result<Arc<Observer>, ObserveError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let metrics = Arc::new(Metrics::new());
        let webhook = cfg.webhook.map(|w| webhook::Webhook::start(w, metrics.clone())).transpose()?;
        let traces =
            if cfg.traces_from_env { trace::Traces::from_env().map_err(ObserveError::Traces)? } else { None };
        if traces.is_some() {
            tracing::info!("exporting handoff traces over OTLP");
        }
        Ok(Arc::new(Observer::with_sinks(metrics, cfg.stdout, webhook, traces, cfg.readiness)))
    }

    /// An observer that only counts and keeps the call log (tests, benchmarks).
    pub fn quiet() -> Arc<Observer> {
        Arc::new(Observer::with_sinks(Arc::new(Metrics::new()), false, None, None, Readiness::InRoom))
    }

    fn with_sinks(
        metrics: Arc<Metrics>,
        stdout: bool,
        webhook: Option<webhook::Webhook>,
        traces: Option<trace::Traces>,
        readiness: Readiness,
    ) -> Observer {
        Observer {
            metrics,
            calls: Mutex::new(CallLog::default()),
            stdout,
            webhook,
            traces,
            readiness,
            registered: AtomicBool::new(false),
            run_id: format!("{:08x}", rand::random::<u32>()),
            next_event: AtomicU64::new(1),
        }
    }

    /// Hands one event to every sink.
    pub fn emit(&self, call: CallId, room: &str, event: &Event) {
        let id = format!("{}-{}", self.run_id, self.next_event.fetch_add(1, Ordering::Relaxed));
        let time = SystemTime::now();
        let line = event.to_json_line(event::Envelope { id: &id, room, time });
        self.metrics.record(event);
        if self.stdout {
            // Not println!, which panics when nobody reads stdout any more.
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        }
        self.call_log().record(call, event, &line, unix_ms(time));
        if let Some(webhook) = &self.webhook {
            webhook.enqueue(&line);
        }
        if let (Some(traces), Event::HandoffFinished(timeline, parent)) = (&self.traces, event) {
            traces.handoff(room, timeline, time, *parent);
        }
    }

    fn call_log(&self) -> MutexGuard<'_, CallLog> {
        // A panic while holding the lock cannot leave the log inconsistent enough to matter.
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a call (one stay in one room) in the page's log.
    pub fn open_call(&self, room: &str) -> CallId {
        self.call_log().open(room)
    }

    /// The `/api/calls` document, with events for the `detailed` most recent calls.
    pub fn calls_json(&self, detailed: usize) -> String {
        self.call_log().to_json(unix_ms(SystemTime::now()), detailed)
    }

    /// Whether handoffs are exported as traces (then their control messages carry
    /// `traceparent`: [`CoordinatorConfig::trace_context`](crate::coordinator::CoordinatorConfig)).
    pub fn exports_traces(&self) -> bool {
        self.traces.is_some()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The worker is registered (true) or not / draining (false).
    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    /// What `/readyz` answers.
    pub fn ready(&self) -> bool {
        match self.readiness {
            Readiness::InRoom => self.metrics.rooms() > 0,
            Readiness::Registered => self.registered.load(Ordering::Relaxed),
        }
    }

    /// Delivers what is still queued (webhook, at most `limit`) and exports buffered spans.
    /// Call once, at exit, after the rooms are left.
    pub async fn shutdown(self: &Arc<Self>, limit: Duration) {
        let started = Instant::now();
        if let Some(webhook) = &self.webhook {
            webhook.flush(limit).await;
        }
        if self.traces.is_some() {
            let left = limit.saturating_sub(started.elapsed()).max(Duration::from_millis(500));
            let me = self.clone();
            // The SDK blocks while it exports.
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(traces) = &me.traces {
                    traces.shutdown(left);
                }
            })
            .await;
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// A room's logic with its events handed to the [`Observer`]: wraps the coordinator, emits
/// `room_joined` at the first connection and `room_left` when the room task drops it.
pub struct Observed {
    inner: Box<dyn RoomHandler>,
    observer: Arc<Observer>,
    room: String,
    /// Opened at the first connection.
    call: Option<CallId>,
    on_joined: Option<Box<dyn FnOnce() + Send>>,
}

impl Observed {
    /// Wraps `inner`, the logic of room `room`.
    pub fn new(inner: Box<dyn RoomHandler>, observer: Arc<Observer>, room: &str) -> Self {
        Observed { inner, observer, room: room.to_string(), call: None, on_joined: None }
    }

    /// Also calls `f` once, when baton is first in the room.
    pub fn on_joined(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_joined = Some(Box::new(f));
        self
    }

    fn emit(&self, event: &Event) {
        if let Some(call) = self.call {
            self.observer.emit(call, &self.room, event);
        }
    }

    fn pass(&self, out: &mut Outbox) {
        for event in out.events.drain(..) {
            self.emit(&event);
        }
        for stat in out.stats.drain(..) {
            self.observer.metrics().count(&stat);
        }
    }
}

impl RoomHandler for Observed {
    fn on_data(&mut self, msg: &Incoming, now: Instant, out: &mut Outbox) {
        self.inner.on_data(msg, now, out);
        self.pass(out);
    }
    fn on_change(&mut self, change: &Change, roster: &Roster, now: Instant, out: &mut Outbox) {
        self.inner.on_change(change, roster, now, out);
        self.pass(out);
    }
    fn on_speaking(&mut self, identity: &str, speaking: bool, now: Instant, out: &mut Outbox) {
        self.inner.on_speaking(identity, speaking, now, out);
        self.pass(out);
    }
    fn on_connected(&mut self, roster: &Roster, now: Instant, out: &mut Outbox) {
        if self.call.is_none() {
            self.call = Some(self.observer.open_call(&self.room));
            self.emit(&Event::RoomJoined);
            if let Some(f) = self.on_joined.take() {
                f();
            }
        }
        self.inner.on_connected(roster, now, out);
        self.pass(out);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
    fn on_timeout(&mut self, now: Instant, out: &mut Outbox) {
        self.inner.on_timeout(now, out);
        self.pass(out);
    }
    fn server_api(&self) -> Option<Arc<ServerApi>> {
        self.inner.server_api()
    }
    fn on_api_result(&mut self, result: ApiResult, now: Instant, out: &mut Outbox) {
        self.inner.on_api_result(result, now, out);
        self.pass(out);
    }
    fn state_store(&self) -> Option<crate::store::RoomStoreClient> {
        self.inner.state_store()
    }
    fn on_store_result(&mut self, tag: u64, result: crate::store::Reply, now: Instant, out: &mut Outbox) {
        self.inner.on_store_result(tag, result, now, out);
        self.pass(out);
    }
    fn finished(&self) -> bool {
        self.inner.finished()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.emit(&Event::RoomLeft);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits whatever it is told to on every call.
    struct Emitter(Vec<Event>);

    impl RoomHandler for Emitter {
        fn on_data(&mut self, _msg: &Incoming, _now: Instant, out: &mut Outbox) {
            out.events.append(&mut self.0);
        }
    }

    #[test]
    fn the_wrapper_brackets_a_call_with_joined_and_left_and_passes_events_on() {
        let observer = Observer::quiet();
        let joined = Arc::new(AtomicBool::new(false));
        let flag = joined.clone();
        let mut room = Observed::new(Box::new(Emitter(vec![Event::SessionEnded])), observer.clone(), "r")
            .on_joined(move || flag.store(true, Ordering::Relaxed));
        let mut out = Outbox::default();
        let now = Instant::now();
        room.on_connected(&Roster::default(), now, &mut out);
        assert!(joined.load(Ordering::Relaxed));
        assert!(observer.ready(), "in a room: ready");
        let msg = Incoming { from: "a".into(), from_sid: "PA_a".into(), topic: "t".into(), payload: vec![] };
        room.on_data(&msg, now, &mut out);
        assert!(out.events.is_empty(), "events were handed on");
        drop(room);
        assert!(!observer.ready());
        let v: serde_json::Value = serde_json::from_str(&observer.calls_json(5)).expect("json");
        let events: Vec<&str> = v["calls"][0]["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["event"].as_str())
            .collect();
        assert_eq!(events, ["room_joined", "session_ended", "room_left"]);
        assert!(v["calls"][0]["left_unix_ms"].is_u64());
    }
}
