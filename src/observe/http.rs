//! The `--http` endpoint: `/metrics` (OpenMetrics text), `/healthz` and `/readyz` (Kubernetes
//! probes), and the call timeline page (`/`, its script and style, and `/api/calls`).
//!
//! HTTP/1.1 through hyper; GET and HEAD only. The page is three static files compiled into
//! the binary: no build step, nothing to install.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{ObserveError, Observer, calls};

const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/timeline.js");
const PAGE_CSS: &str = include_str!("page/timeline.css");

/// The content type `prometheus-client`'s text format is (OpenMetrics 1.0).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections served at once; more wait for a free slot.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this (slow clients would hold a slot).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most calls `/api/calls?detailed=N` may ask events for.
const MAX_DETAILED: usize = 100;

/// Binds `addr` and serves on the current tokio runtime; returns the bound address (useful
/// with port 0).
pub async fn serve(addr: SocketAddr, observer: Arc<Observer>) -> Result<SocketAddr, ObserveError> {
    let listener = TcpListener::bind(addr).await.map_err(|error| ObserveError::Http { addr, error })?;
    let local = listener.local_addr().map_err(|error| ObserveError::Http { addr, error })?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let observer = observer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let observer = observer.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &observer)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "http: connection ended with an error");
                }
                drop(permit);
            });
        }
    });
    tracing::info!(addr = %local, "http: serving /metrics, /healthz, /readyz and the call timeline page");
    Ok(local)
}

fn respond(req: &Request<Incoming>, observer: &Observer) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => body(StatusCode::OK, OPENMETRICS, observer.metrics().encode()),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if observer.ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/" | "/index.html" => body(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML),
        "/timeline.js" => body(StatusCode::OK, "text/javascript; charset=utf-8", PAGE_JS),
        "/timeline.css" => body(StatusCode::OK, "text/css; charset=utf-8", PAGE_CSS),
        "/api/calls" => {
            let detailed = query_usize(req.uri().query(), "detailed").unwrap_or(calls::DEFAULT_DETAILED);
            body(StatusCode::OK, "application/json", observer.calls_json(detailed.min(MAX_DETAILED)))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `name=N` from a query string; anything malformed is ignored.
fn query_usize(query: Option<&str>, name: &str) -> Option<usize> {
    query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn text(status: StatusCode, s: &'static str) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", s)
}

fn body(status: StatusCode, content_type: &'static str, content: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(content.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_read_and_junk_ignored() {
        assert_eq!(query_usize(Some("detailed=3"), "detailed"), Some(3));
        assert_eq!(query_usize(Some("a=1&detailed=12"), "detailed"), Some(12));
        assert_eq!(query_usize(Some("detailed=-1"), "detailed"), None);
        assert_eq!(query_usize(Some("detailedx=1"), "detailed"), None);
        assert_eq!(query_usize(None, "detailed"), None);
    }
}
