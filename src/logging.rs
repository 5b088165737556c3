//! Log setup: human or JSON lines on stderr, and security warnings rate-limited with counts.
//!
//! Anything in a room can send baton junk, so the warnings it causes are throttled: a caller that
//! sends 300 junk packets must not write 300 lines. Every warning about refused input is logged
//! under the target [`SECURITY_TARGET`]. The first few of each kind (same message and fields, so
//! the same sender and reason) are written at once, and the rest are counted. Every
//! [`SUMMARY_INTERVAL`], one line per kind says how many were held back
//! (`security: N more like this were not logged`). The throttle is the `tracing-throttle` crate;
//! other targets pass untouched.

use std::sync::Arc;
use std::time::Duration;

use tracing::Subscriber;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use tracing_throttle::{Policy, SuppressionSummary, TracingRateLimitLayer};

/// The `tracing` target of every warning about input baton refused (who sent it and why are
/// fields, which is what tells one kind of warning from another).
pub const SECURITY_TARGET: &str = "baton::security";

/// The target of the periodic lines that count held-back security warnings.
pub const SECURITY_SUMMARY_TARGET: &str = "baton::security_summary";

/// Of each kind of security warning, this many are written per [`SECURITY_WINDOW`].
pub const SECURITY_BURST: usize = 5;

/// The window [`SECURITY_BURST`] counts in.
pub const SECURITY_WINDOW: Duration = Duration::from_secs(60);

/// How often the count of held-back warnings is written (only for kinds that had some).
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// The default filter when `BATON_LOG` is unset.
const DEFAULT_FILTER: &str = "info,livekit_signaling=warn,str0m=warn";

/// Installs the global subscriber: `format` `"json"` for one JSON object per line, anything else
/// for text, both on stderr, filtered by `BATON_LOG` (an `EnvFilter` directive string).
///
/// Must run inside a tokio runtime: the throttle's summary lines come from a task it spawns.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let throttle = SecurityThrottle::new();
    // A log line that cannot be written (the reader of stderr is gone: EPIPE) is dropped. By
    // default tracing-subscriber reports that with `eprintln!`, which panics on the same closed
    // pipe, so any log call would take down the task that made it.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).log_internal_errors(false);
    let layer = if format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    // `and` consults the throttle only for events the level filter lets through, so hidden
    // debug lines never spend the budget. `None` (the throttle could not be built) admits all.
    let _ = tracing_subscriber::registry().with(layer.with_filter(filter.and(throttle))).try_init();
}

/// Lets every event through except those of [`SECURITY_TARGET`], which the rate limiter judges.
pub struct SecurityThrottle {
    limiter: TracingRateLimitLayer,
}

impl SecurityThrottle {
    /// `None` if the limiter cannot be built (it cannot with these constants; logging then
    /// goes on unthrottled rather than not at all).
    pub fn new() -> Option<Self> {
        let policy = Policy::time_window(SECURITY_BURST, SECURITY_WINDOW).ok()?;
        let limiter = TracingRateLimitLayer::builder()
            .with_policy(policy)
            .with_max_signatures(10_000)
            .with_active_emission(true)
            .with_summary_interval(SUMMARY_INTERVAL)
            .with_summary_formatter(Arc::new(|s: &SuppressionSummary| {
                let (message, from) = s
                    .metadata
                    .as_ref()
                    .map(|m| {
                        (m.message.clone(), m.fields.get("from").map(|f| f.to_string()).unwrap_or_default())
                    })
                    .unwrap_or_default();
                tracing::warn!(
                    target: SECURITY_SUMMARY_TARGET,
                    count = s.count,
                    over_s = s.duration.as_secs(),
                    %from,
                    warning = %message,
                    "security: {} more like this were not logged",
                    s.count
                );
            }))
            .build()
            .ok()?;
        Some(Self { limiter })
    }

    /// Whether an event passes: always, unless it is a security warning over its budget.
    pub fn admits<S>(&self, event: &tracing::Event<'_>, cx: &Context<'_, S>) -> bool
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        event.metadata().target() != SECURITY_TARGET || Filter::<S>::event_enabled(&self.limiter, event, cx)
    }
}

impl<S> Filter<S> for SecurityThrottle
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, _meta: &tracing::Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, cx: &Context<'_, S>) -> bool {
        self.admits(event, cx)
    }
}
