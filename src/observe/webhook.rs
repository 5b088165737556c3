//! The event stream as a webhook: every event POSTed to one URL, signed the way the LiveKit
//! server signs its own webhooks, retried until the receiver takes it.
//!
//! Signature (LiveKit's `webhook` package in livekit/protocol, `URLNotifier.send` and
//! `Receive`): the body is the event's JSON line; the `Authorization` header is a JWT signed
//! with HMAC-SHA256 (HS256) by the API secret, with the API key as issuer and a `sha256` claim
//! holding the base64 (standard alphabet, padded) SHA-256 of the body; `Content-Type` is
//! `application/webhook+json`. A receiver verifies the JWT with its copy of the secret, then
//! the body's hash against the claim (LiveKit's server SDKs' `WebhookReceiver` do exactly that
//! before decoding; our body is not a LiveKit `WebhookEvent`, so decode it yourself).
//!
//! Delivery: one event at a time, in order, from a bounded queue. A failed request (connection
//! error, timeout, 5xx, 408, 429) is retried with doubling backoff; a receiver that answers
//! another 4xx refused the event and retrying cannot change that. An event is dropped only when
//! the queue is full, when it was refused, when it waited longer than [`GIVE_UP_AFTER`], or
//! when baton exits with it still queued; each drop is counted in
//! `baton_events_dropped_total{sink="webhook"}` and logged. A receiver may see an event twice
//! (its answer was lost and baton retried): the `id` field tells.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use livekit_api::access_token::AccessToken;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};

use super::metrics::{Dropped, Metrics};

/// Events waiting at most; beyond this, new events are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 4096;
/// First wait before retrying a failed request.
const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// An event still undelivered this long after it was queued is dropped.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// Longest one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the signature stays valid (LiveKit's notifier uses 5 minutes).
const SIGNATURE_TTL: Duration = Duration::from_secs(300);
/// The content type LiveKit's webhooks use.
pub const CONTENT_TYPE: &str = "application/webhook+json";

/// Where to send events and how to sign them.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver's URL (`http://` or `https://`).
    pub url: String,
    /// The LiveKit API key: the JWT's issuer.
    pub api_key: String,
    /// The LiveKit API secret: the HMAC-SHA256 key.
    pub api_secret: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig").field("url", &self.url).field("api_key", &self.api_key).finish()
    }
}

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL `{0}` must start with http:// or https://")]
    Url(String),
    #[error("could not build the webhook's HTTP client: {0}")]
    Client(String),
}

/// The sending side: a bounded queue drained by one task.
pub struct Webhook {
    tx: mpsc::Sender<Queued>,
    /// Events queued or being sent.
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    /// Set at exit: retry at once and then every [`RETRY_FIRST`], no longer backing off.
    hurry: Arc<Hurry>,
    metrics: Arc<Metrics>,
    /// Drops logged so far (the first of a burst is a warning, the rest debug).
    drops: AtomicUsize,
}

struct Queued {
    body: String,
    queued_at: Instant,
}

#[derive(Default)]
struct Hurry {
    on: AtomicBool,
    wake: Notify,
}

impl Webhook {
    /// Starts the delivery task on the current tokio runtime.
    pub fn start(cfg: WebhookConfig, metrics: Arc<Metrics>) -> Result<Webhook, WebhookError> {
        if !(cfg.url.starts_with("http://") || cfg.url.starts_with("https://")) {
            return Err(WebhookError::Url(cfg.url));
        }
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let pending = Arc::new(AtomicUsize::new(0));
        let idle = Arc::new(Notify::new());
        let hurry = Arc::new(Hurry::default());
        let sender = Sender {
            client,
            cfg,
            metrics: metrics.clone(),
            pending: pending.clone(),
            idle: idle.clone(),
            hurry: hurry.clone(),
        };
        tokio::spawn(sender.run(rx));
        Ok(Webhook { tx, pending, idle, hurry, metrics, drops: AtomicUsize::new(0) })
    }

    /// Queues one event line; never blocks. A full queue drops the event (counted).
    pub fn enqueue(&self, line: &str) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Queued { body: line.to_string(), queued_at: Instant::now() }) {
            Ok(()) => self.metrics.webhook_queue(QUEUE_CAPACITY - self.tx.capacity()),
            Err(_) => {
                self.done_one();
                self.metrics.dropped("webhook", Dropped::QueueFull);
                if self.drops.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        capacity = QUEUE_CAPACITY,
                        "webhook queue full: events dropped (counted in baton_events_dropped_total)"
                    );
                }
            }
        }
    }

    fn done_one(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Waits until every queued event was delivered or dropped, at most `limit`; events still
    /// waiting then are counted as dropped at shutdown. Returns how many were left.
    pub async fn flush(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        self.hurry.on.store(true, Ordering::SeqCst);
        self.hurry.wake.notify_one();
        loop {
            let idle = self.idle.notified();
            let left = self.pending.load(Ordering::SeqCst);
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                let left = self.pending.load(Ordering::SeqCst);
                for _ in 0..left {
                    self.metrics.dropped("webhook", Dropped::Shutdown);
                }
                tracing::warn!(events = left, "exiting with webhook events undelivered");
                return left;
            }
        }
    }
}

/// The delivery task's state.
struct Sender {
    client: reqwest::Client,
    cfg: WebhookConfig,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    hurry: Arc<Hurry>,
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        while let Some(event) = rx.recv().await {
            self.metrics.webhook_queue(rx.len());
            match self.deliver(&event).await {
                Ok(()) => self.metrics.webhook_delivered(),
                Err(why) => {
                    self.metrics.dropped("webhook", why);
                    tracing::warn!(reason = ?why, url = %self.cfg.url, "webhook event dropped");
                }
            }
            if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.idle.notify_waiters();
            }
        }
    }

    /// Sends one event until the receiver takes it or it must be dropped.
    async fn deliver(&self, event: &Queued) -> Result<(), Dropped> {
        let mut wait = RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            let failure = match self.post(&event.body).await {
                Ok(status) if status.is_success() => {
                    if failures > 0 {
                        tracing::info!(attempts = failures + 1, "webhook receiver reachable again");
                    }
                    return Ok(());
                }
                Ok(status) if refused(status) => {
                    self.metrics.webhook_attempt_failed();
                    tracing::warn!(%status, "webhook receiver refused the event");
                    return Err(Dropped::Rejected);
                }
                Ok(status) => format!("HTTP {status}"),
                Err(e) => e,
            };
            self.metrics.webhook_attempt_failed();
            failures += 1;
            if failures == 1 {
                tracing::warn!(url = %self.cfg.url, error = %failure, "webhook delivery failed; retrying");
            } else {
                tracing::debug!(url = %self.cfg.url, error = %failure, failures, "webhook delivery failed again");
            }
            if event.queued_at.elapsed() + wait > GIVE_UP_AFTER {
                return Err(Dropped::Expired);
            }
            if self.hurry.on.load(Ordering::SeqCst) {
                wait = RETRY_FIRST;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.hurry.wake.notified() => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    async fn post(&self, body: &str) -> Result<reqwest::StatusCode, String> {
        let auth = sign(&self.cfg.api_key, &self.cfg.api_secret, body.as_bytes())?;
        let response = self
            .client
            .post(&self.cfg.url)
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status())
    }
}

/// A 4xx that retrying cannot change (408 Request Timeout and 429 Too Many Requests can).
fn refused(status: reqwest::StatusCode) -> bool {
    status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// The `Authorization` value for `body`: a LiveKit access token (HS256 JWT, issuer the API
/// key) whose `sha256` claim is the base64 SHA-256 of the body.
pub fn sign(api_key: &str, api_secret: &str, body: &[u8]) -> Result<String, String> {
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
    AccessToken::with_api_key(api_key, api_secret)
        .with_ttl(SIGNATURE_TTL)
        .with_sha256(&digest)
        .to_jwt()
        .map_err(|e| format!("could not sign the webhook: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_api::access_token::TokenVerifier;

    #[test]
    fn signature_is_a_livekit_token_over_the_body_hash() {
        let body = br#"{"event":"room_joined","v":1}"#;
        let jwt = sign("key", "a-secret-that-is-long-enough-0123456789", body).expect("signed");
        let claims = TokenVerifier::with_api_key("key", "a-secret-that-is-long-enough-0123456789")
            .verify(&jwt)
            .expect("valid token");
        assert_eq!(claims.iss, "key");
        let hash = base64::engine::general_purpose::STANDARD.decode(claims.sha256).expect("base64");
        assert_eq!(hash, Sha256::digest(body).to_vec());
        assert!(
            TokenVerifier::with_api_key("key", "another-secret-0123456789abcdef012345").verify(&jwt).is_err()
        );
    }

    #[test]
    fn only_final_client_errors_are_not_retried() {
        assert!(refused(reqwest::StatusCode::UNAUTHORIZED));
        assert!(!refused(reqwest::StatusCode::TOO_MANY_REQUESTS));
        assert!(!refused(reqwest::StatusCode::SERVICE_UNAVAILABLE));
    }
}
