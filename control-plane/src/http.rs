//! The HTTP surface. For now: `/health` (no auth, SRT Live Server's shape) and `/ready`
//! (Postgres reachable and the projection caught up with the log).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::projection::Projection;
use crate::store::EventStore;

#[derive(Debug, Clone)]
pub struct AppState {
    pub store: EventStore,
    pub projection: Projection,
}

pub fn router(state: AppState) -> Router {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).with_state(state)
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok", "service": "sluice-control", "version": env!("CARGO_PKG_VERSION")}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.head().await {
        Ok(head) => {
            let applied = state.projection.position();
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
