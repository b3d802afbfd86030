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
