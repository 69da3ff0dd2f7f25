//! The admin HTTP server: Prometheus `/metrics`, `/healthz` (the process answers), `/readyz`
//! (serving gRPC and not shutting down) and `/status` (JSON summary for humans and scripts).

use std::{sync::Arc, time::Instant};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use marchproxy::names;

use crate::nlb::Nlb;

pub fn router(nlb: Arc<Nlb>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state(nlb)
}

async fn metrics(State(nlb): State<Arc<Nlb>>) -> impl IntoResponse {
    nlb.metrics.refresh(&nlb.state(), Instant::now());
    (
        [("content-type", "text/plain; version=0.0.4")],
        nlb.metrics.render(),
    )
}

async fn ready(State(nlb): State<Arc<Nlb>>) -> impl IntoResponse {
    if nlb.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn status(State(nlb): State<Arc<Nlb>>) -> impl IntoResponse {
    let status = nlb.status(true);
    let modules: Vec<serde_json::Value> = status
        .modules
        .iter()
        .map(|m| {
            serde_json::json!({
                "instance_id": m.instance_id,
                "module_type": names::ModuleKind::from_module_type(m.module_type).map(|k| k.name()),
                "address": m.address,
                "version": m.version,
                "health": names::health_name(m.health_status()),
                "connections": m.current_connections,
                "traffic_weight": m.traffic_weight,
            })
        })
        .collect();
    axum::Json(serde_json::json!({
        "status": names::health_name(status.status()),
        "version": status.version,
        "registered_modules": status.registered_modules,
        "modules_by_type": status.modules_by_type,
        "route_requests": status.total_requests,
        "active_connections": status.active_connections,
        "modules": modules,
        "details": status.details,
    }))
}
