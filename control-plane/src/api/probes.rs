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
