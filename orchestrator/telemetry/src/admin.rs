//! The admin HTTP server: `GET /metrics` (Prometheus text exposition), `GET /healthz`
//! (liveness: the process answers) and `GET /readyz` (readiness, from [`Admin::ready`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;

/// The default admin listen address of the orchestrator.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// The paths the admin server answers (probes and scrapers may use these and no others).
pub const PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// `healthcheck` for container images that have no HTTP client: a GET of `url`
/// (`http://HOST:PORT/PATH`) that succeeds on status 200 within `timeout`; the error says
/// what happened.
pub async fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {authority}: {e}"))?;
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("no reply from {authority}: {e}"))?;
        let reply = String::from_utf8_lossy(&reply);
        let status = reply.split_whitespace().nth(1).unwrap_or("");
        if status == "200" {
            Ok(())
        } else {
            let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
            Err(format!("{url} answered {status}: {body}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("{url} did not answer within {} ms", timeout.as_millis()))?
}

/// The OpenMetrics content type prometheus-client's text encoder produces.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin endpoints report.
#[derive(Clone)]
pub struct Admin {
    /// The metrics, encoded in the OpenMetrics text format (e.g. with
    /// `prometheus_client::encoding::text::encode`).
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Ok when ready to serve; Err says why not (answered with 503).
    pub ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, then lets requests in
/// flight finish.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve_admin`] with more routes (e.g. a participant's test-only `/faults`).
pub async fn serve_admin_with(
    listener: TcpListener,
    admin: Admin,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin).merge(extra))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The admin routes, for callers that compose their own server.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
        .with_state(admin)
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let body = (admin.metrics)();
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Admin>) -> Response {
    match (admin.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}
