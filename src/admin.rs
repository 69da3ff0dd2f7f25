//! The admin HTTP endpoints every server has: Prometheus `/metrics`, `/healthz` (the process
//! answers) and `/readyz` (ready for traffic). Servers add their own pages to the router.

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

/// What the shared endpoints need from a server.
pub trait AdminState: Send + Sync + 'static {
    /// The Prometheus text exposition of the server's registry.
    fn metrics(&self) -> String;
    /// Ready for traffic (serving, registered, not shutting down).
    fn ready(&self) -> bool;
}

/// `/metrics`, `/healthz`, `/readyz` over `state`.
pub fn router<S: AdminState>(state: Arc<S>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .with_state(state)
}

async fn metrics<S: AdminState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics(),
    )
}

async fn ready<S: AdminState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    if state.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Renders a Prometheus registry in the text format.
pub fn render(registry: &prometheus::Registry) -> String {
    let mut out = String::new();
    // Encoding into a String fails only for a metric family that cannot be encoded, which
    // registered collectors never produce; an empty page is the safe answer if it ever did.
    let _ = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out);
    out
}
