//! `GET /v1/nodes`: the workers, their lag behind the log and whether their state matches.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use sluice_events::Role;

use super::error::ApiError;
use super::{ApiState, Ctx};
use crate::nodes::NodeList;

pub fn router() -> Router<ApiState> {
    Router::new().route("/nodes", get(list))
}

async fn list(State(api): State<ApiState>, ctx: Ctx) -> Result<Json<NodeList>, ApiError> {
    ctx.require(Role::Read)?;
    let state = api.writer.projection().current();
    let stale = Duration::from_secs(api.settings.node_stale_secs);
    // The first call after a table change digests the whole state: off the async threads.
    let registry = api.nodes.clone();
    let nodes =
        tokio::task::spawn_blocking(move || registry.list(&state, stale)).await.map_err(|_| ApiError::Internal)?;
    Ok(Json(NodeList { nodes }))
}
