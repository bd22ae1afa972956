//! SRT Live Server's REST API (seed 001), exactly: `/api/stream-ids`, `/api/keys`,
//! `/stats/{player_id}`, with its `{"status": "success" | "error", …}` envelope, its rate
//! classes and its roles. It manages the app `SLUICE_SLS_APP`: a stream id's `player` is the
//! stream's public name, its `publisher` the publish name.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Command, Rejection, Role, StreamName};

use super::body::StrictJson;
use super::compat::SlsMessage;
use super::error::ApiError;
use super::keys::{CreateKey, create_key};
use super::{ApiState, Ctx, now, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct StreamId {
    pub publisher: String,
    pub player: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct NewKey {
    pub name: String,
    /// `admin`, `write` or `read`.
    pub permissions: Role,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StatsQuery {
    /// Reset the counters after reading.
    pub reset: Option<String>,
    /// `1` for the legacy shape.
    pub legacy: Option<String>,
}

/// `api` class: stream ids.
pub fn api_router() -> Router<ApiState> {
    Router::new().route("/api/stream-ids", get(list).post(add)).route("/api/stream-ids/{player_id}", delete(remove))
}

/// `config` class: API keys.
pub fn config_router() -> Router<ApiState> {
    Router::new().route("/api/keys", post(new_key))
}

/// `stats` class: statistics (no authentication, as in SRT Live Server).
pub fn stats_router() -> Router<ApiState> {
    Router::new().route("/stats/{player_id}", get(stats))
}

fn name(field: &str, value: &str) -> Result<StreamName, ApiError> {
    StreamName::parse(value).map_err(|e| ApiError::invalid(field, e.to_string()))
}

#[derive(Debug, Serialize)]
struct SlsList {
    status: &'static str,
    data: Vec<StreamId>,
}

#[derive(Debug, Serialize)]
struct SlsKey {
    status: &'static str,
    api_key: String,
    message: &'static str,
}

/// `GET /stats/{player_id}`, SRT Live Server's member order.
#[derive(Debug, Serialize)]
struct Stats {
    publisher: PublisherStats,
    status: &'static str,
}

#[derive(Debug, Default, Serialize)]
struct PublisherStats {
    bitrate: u64,
    buffer: u64,
    dropped_pkts: u64,
    rtt: Option<f64>,
    uptime: u64,
    latency: Option<u64>,
}

/// `legacy=1`.
#[derive(Debug, Serialize)]
struct LegacyStats {
    publishers: std::collections::BTreeMap<String, LegacyPublisher>,
    status: &'static str,
}

#[derive(Debug, Default, Serialize)]
struct LegacyPublisher {
    bitrate: u64,
    bytes_rcv_drop: u64,
    bytes_rcv_loss: u64,
    mbps_bandwidth: f64,
    mbps_recv_rate: f64,
    ms_rcv_buf: u64,
    pkt_rcv_drop: u64,
    pkt_rcv_loss: u64,
    rtt: Option<f64>,
    uptime: u64,
    latency: Option<u64>,
}

fn sls_ok(message: &'static str) -> SlsMessage<'static> {
    SlsMessage { status: "success", message }
}

async fn list(State(api): State<ApiState>, ctx: Ctx) -> Result<Response, ApiError> {
    ctx.require(Role::Read)?;
    let state = api.writer.projection().current();
    let data: Vec<StreamId> = state
        .apps
        .get(&api.sls_app)
        .map(|a| {
            a.streams
                .iter()
                .map(|(n, s)| StreamId {
                    publisher: s.publish_name.as_ref().unwrap_or(n).to_string(),
                    player: n.to_string(),
                    description: s.description.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(SlsList { status: "success", data }).into_response())
}

async fn add(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<StreamId>,
) -> Result<Response, ApiError> {
    ctx.require(Role::Write)?;
    let player = name("player", &req.player)?;
    let publisher = name("publisher", &req.publisher)?;
    let publish_name = (publisher != player).then_some(publisher);
    let app = api.sls_app.clone();
    let result = api
        .writer
        .run(&ctx.origin(), now(), |_| {
            Ok(Command::RegisterStream {
                app: app.clone(),
                name: player.clone(),
                publish_name: publish_name.clone(),
                description: req.description.clone(),
            })
        })
        .await;
    match result {
        Ok(committed) => Ok(written(StatusCode::OK, committed, Some(sls_ok("Stream ID added successfully")))),
        Err(crate::commands::CommandError::Rejected(Rejection::AlreadyExists { what: "stream", .. })) => {
            Err(ApiError::Conflict(format!("Stream ID with player '{}' already exists", req.player)))
        }
        Err(crate::commands::CommandError::Rejected(Rejection::AlreadyExists { id, .. })) => {
            Err(ApiError::Conflict(format!("Stream ID with publisher '{id}' already exists")))
        }
        Err(e) => Err(e.into()),
    }
}

async fn remove(State(api): State<ApiState>, ctx: Ctx, Path(player_id): Path<String>) -> Result<Response, ApiError> {
    ctx.require(Role::Admin)?;
    let Ok(player) = StreamName::parse(&player_id) else { return Err(sls_not_found()) };
    let app = api.sls_app.clone();
    let result = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::DeleteStream { app: app.clone(), name: player.clone() }))
        .await;
    match result {
        Ok(committed) => Ok(written(StatusCode::OK, committed, Some(sls_ok("Stream ID deleted successfully")))),
        Err(crate::commands::CommandError::Rejected(Rejection::NotFound { .. })) => Err(sls_not_found()),
        Err(e) => Err(e.into()),
    }
}

fn sls_not_found() -> ApiError {
    ApiError::Missing("Stream ID not found")
}

async fn new_key(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<NewKey>,
) -> Result<Response, ApiError> {
    let create = CreateKey { name: req.name, role: req.permissions, id: None, cidrs: vec![], expires_at: None };
    let (secret, _) = create_key(&api, &ctx, create).await?;
    let secret = secret.ok_or_else(|| {
        ApiError::Conflict("this Idempotency-Key already created a key; its secret was shown once".into())
    })?;
    let body =
        SlsKey { status: "success", api_key: secret, message: "Save this key securely. It cannot be retrieved again." };
    Ok(Json(body).into_response())
}

/// Live numbers arrive from the workers later (issue 4); until then a registered player
/// reads zeros and an unknown one is a 404.
async fn stats(
    State(api): State<ApiState>,
    Path(player_id): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Response, ApiError> {
    let state = api.writer.projection().current();
    let known = StreamName::parse(&player_id)
        .ok()
        .is_some_and(|p| state.apps.get(&api.sls_app).is_some_and(|a| a.streams.contains_key(&p)));
    if !known {
        return Err(sls_not_found());
    }
    // Workers' counters are cumulative; `reset` is accepted and changes nothing.
    let _reset = q.reset.is_some();
    let live = super::nodes::stream_stats_of(&api, api.sls_app.as_str(), &player_id);
    // RTMP has no RTT or latency figure: null where only RTMP reports (SLS itself is SRT).
    let rtmp_only = live.live && live.workers.iter().all(|w| w.stat.protocol == "rtmp");
    let (rtt, latency) = if rtmp_only { (None, None) } else { (Some(0.0), Some(0)) };
    let kbps = live.bitrate_10s / 1000;
    if q.legacy.as_deref() == Some("1") {
        let publisher = LegacyPublisher {
            bitrate: kbps,
            mbps_recv_rate: live.bitrate_1s as f64 / 1e6,
            pkt_rcv_drop: live.dropped,
            rtt,
            uptime: live.uptime_secs,
            latency,
            ..LegacyPublisher::default()
        };
        let publishers = [(player_id, publisher)].into_iter().collect();
        return Ok(Json(LegacyStats { publishers, status: "ok" }).into_response());
    }
    let publisher = PublisherStats {
        bitrate: kbps,
        dropped_pkts: live.dropped,
        rtt,
        uptime: live.uptime_secs,
        latency,
        ..PublisherStats::default()
    };
    Ok(Json(Stats { publisher, status: "ok" }).into_response())
}
