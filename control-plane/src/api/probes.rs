//! Probes: `/health` (no auth, SRT Live Server's shape) and `/ready` (Postgres reachable and
//! the projection caught up with the log). Outside the API's allow-list and audit.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::ApiState;

/// SRT Live Server's member order.
#[derive(Debug, serde::Serialize)]
struct Health {
    status: &'static str,
    service: &'static str,
    version: &'static str,
}

pub(super) async fn health() -> impl IntoResponse {
    Json(Health { status: "ok", service: "sluice-control", version: env!("CARGO_PKG_VERSION") })
}

pub(super) async fn ready(State(api): State<ApiState>) -> impl IntoResponse {
    let diverged = api.relay_health.diverged_at.load(std::sync::atomic::Ordering::Relaxed);
    if diverged != 0 {
        let detail = format!(
            "SLUICE_EVENTS and the log disagree at position {diverged}: the relay stopped; re-seed NATS from the log \
             (docs/security.md)"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "relay_diverged_at": diverged, "detail": detail})),
        );
    }
    match api.writer.store().head().await {
        Ok(head) => {
            let applied = api.writer.projection().position();
            let ok = applied >= head;
            let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, Json(json!({"ready": ok, "log_head": head.0, "applied": applied.0})))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"ready": false, "detail": if e.is_unavailable() { "Postgres is unreachable" } else { "Postgres error" }}),
            ),
        ),
    }
}

/// Prometheus text: the log's head, the projection, the relay's divergences, JWKS failures.
pub(super) async fn metrics(State(api): State<ApiState>) -> impl IntoResponse {
    use std::sync::atomic::Ordering::Relaxed;
    let head = api.writer.store().head().await.map(|h| h.0).unwrap_or(0);
    let h = &api.relay_health;
    let lines = [
        ("sluice_log_head", "gauge", "The log's last position.", head),
        (
            "sluice_projection_position",
            "gauge",
            "Position the API's projection has applied.",
            api.writer.projection().position().0,
        ),
        (
            "sluice_relay_diverged",
            "gauge",
            "Position where SLUICE_EVENTS and the log disagree (0: none).",
            h.diverged_at.load(Relaxed),
        ),
        (
            "sluice_relay_diverged_total",
            "counter",
            "Times the relay found SLUICE_EVENTS and the log apart and stopped.",
            h.diverged_total.load(Relaxed),
        ),
        (
            "sluice_jwks_refresh_failures_total",
            "counter",
            "Failed fetches of an app's stream-JWT JWKS (its previous keys kept).",
            api.jwks.failures_total.load(Relaxed),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
