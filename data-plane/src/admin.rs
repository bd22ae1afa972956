//! The worker's admin port: `/health` (alive), `/ready` (503 until it has a state to decide
//! from, then 200 even when NATS or the control plane is gone: Kong's hybrid-mode rule) and
//! `/state` (position, tables position, access digest).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::sync::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok", "service": "sluice-dataplane"})) }))
        .route("/ready", get(ready))
        .route("/state", get(state))
        .route("/wait", get(wait))
        .with_state(shared)
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let body = json!({
        "ready": shared.is_ready(),
        "synced": shared.synced.load(Ordering::Acquire),
        "position": shared.position().0,
    });
    let code = if shared.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

#[derive(Debug, serde::Deserialize)]
struct WaitQuery {
    position: u64,
    #[serde(default = "default_wait_ms")]
    timeout_ms: u64,
}

fn default_wait_ms() -> u64 {
    5000
}

/// Answers once the state has applied `position` (200), or after `timeout_ms` (504): lets a
/// client read its own write at the edge, and the propagation benchmark time it.
async fn wait(State(shared): State<Arc<Shared>>, Query(q): Query<WaitQuery>) -> (StatusCode, Json<Value>) {
    let mut rx = shared.applied.subscribe();
    let timeout = std::time::Duration::from_millis(q.timeout_ms.min(60_000));
    let reached = tokio::time::timeout(timeout, rx.wait_for(|p| *p >= q.position)).await;
    let position = shared.position().0;
    match reached {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"position": position}))),
        _ => (StatusCode::GATEWAY_TIMEOUT, Json(json!({"position": position, "waited_for": q.position}))),
    }
}

async fn state(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let sh = shared.clone();
    let (position, digest) = tokio::task::spawn_blocking(move || sh.current_digest())
        .await
        .unwrap_or((shared.position(), sluice_events::Sha256Digest([0; 32])));
    let s = shared.state.load();
    Json(json!({
        "position": position.0,
        "tables_position": s.tables_position().0,
        "access_digest": digest.to_hex(),
        "apps": s.apps.len(),
        "streams": s.apps.values().map(|a| a.streams.len()).sum::<usize>(),
        "tokens": s.tokens.len(),
        "ready": shared.is_ready(),
        "synced": shared.synced.load(Ordering::Acquire),
    }))
}
