//! Ant Media Server's stream-security REST calls (seeds 003/004, REST v2), as thin adapters
//! over the native commands, under `/{app}/rest/v2/broadcasts/…` with Ant Media's paths,
//! verbs, bodies and envelopes, transcribed from its `BroadcastRestService.java` and the
//! `Token`, `Subscriber`, `ConnectionEvent`, `Broadcast` and `Result` types: one-time tokens
//! (issue, list, revoke, validate), JWT tokens, TOTP subscribers (add, list, delete one or
//! all, block by type, the `/totp` helper, connection events and the older subscriber-stats)
//! and broadcasts (create, get, list, delete). Authentication is the API's (a key or an API
//! JWT, which Ant Media clients already send in `Authorization`).
//!
//! Where Sluice differs, on purpose: a listed token's `tokenId` is Sluice's token id, not
//! the token (tokens are shown once and stored as digests); `validate-token` checks without
//! consuming (a token is used up by the media path, where the use is a recorded decision);
//! connection events are the allowed TOTP decisions (`connected`): Sluice records
//! admissions, not disconnects.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Action, AppName, Command, StreamName};

use super::apps::app_name;
use super::body::StrictJson;
use super::compat::AmsResult;
use super::error::ApiError;
use super::query::{Path, Query};
use super::streams::stream_name;
use super::subscribers::{add_subscriber, remove_subscriber, subscriber_id};
use super::tokens::{issue_token, mint};
use super::{ApiState, Ctx, now, random};

/// Ant Media's `Subscriber` as posted.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct AmsSubscriber {
    pub subscriber_id: String,
    /// Generated when absent, as Ant Media does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b32_secret: Option<String>,
    /// `publish` or `play`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub kind: Option<Action>,
    /// Ant Media's own members of `Subscriber`, which its clients send back as they got them:
    /// `streamId` must name the path's stream; the others are Ant's bookkeeping and are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_concurrent_connections: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_connections_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

/// `new Result(true)`.
fn success() -> Json<AmsResult> {
    Json(AmsResult { success: true, message: None, data_id: None, error_id: 0 })
}

/// `new Result(success, message)`.
fn outcome(success: bool, message: impl Into<String>) -> Json<AmsResult> {
    Json(AmsResult { success, message: Some(message.into()), data_id: None, error_id: 0 })
}

/// Ant Media's `Token`, in its member order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsToken {
    token_id: String,
    stream_id: StreamName,
    expire_date: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    room_id: Option<String>,
}

/// Ant Media's `Subscriber` as listed, in its member order (`b32Secret` is write-only there
/// too). Blocks are Sluice's; the figures Sluice does not keep are Ant's defaults.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsSubscriberView {
    subscriber_id: sluice_events::SubscriberId,
    subscriber_name: Option<String>,
    stream_id: StreamName,
    #[serde(rename = "type")]
    kind: Option<&'static str>,
    connected: bool,
    current_concurrent_connections: u32,
    concurrent_connections_limit: u32,
    blocked_type: Option<&'static str>,
    blocked_until_unit_time_stamp_ms: i64,
    registered_node_ip: Option<String>,
    avg_video_bitrate: u64,
    avg_audio_bitrate: u64,
    totp_expiry_period_seconds: u32,
}

/// `expireDate` (Unix seconds, required) and `type` (publish | play).
fn token_query(q: &HashMap<String, String>) -> Result<(i64, Action), ApiError> {
    let expire = q
        .get("expireDate")
        .ok_or_else(|| ApiError::invalid("expireDate", "required (Unix seconds)"))?
        .parse::<i64>()
        .map_err(|_| ApiError::invalid("expireDate", "Unix seconds"))?;
    if expire <= now().as_secs() {
        return Err(ApiError::invalid("expireDate", "must be in the future"));
    }
    let kind = q.get("type").ok_or_else(|| ApiError::invalid("type", "publish or play"))?;
    let action = Action::parse(kind).map_err(|_| ApiError::invalid("type", "publish or play"))?;
    Ok((expire, action))
}

fn names(app: &str, stream: &str) -> Result<(AppName, StreamName), ApiError> {
    Ok((app_name(app)?, stream_name(stream)?))
}

fn token_body(token: &str, stream: &StreamName, expire: i64, action: Action) -> Json<AmsToken> {
    Json(AmsToken {
        token_id: token.to_owned(),
        stream_id: stream.clone(),
        expire_date: expire,
        kind: action.as_str(),
        room_id: None,
    })
}

pub(super) async fn token(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AmsToken>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let (expire, action) = token_query(&q)?;
    let (token, _, committed) = issue_token(&api, &ctx, &app, &stream, action, Some(expire)).await?;
    if committed.replayed {
        // The token of the first request was shown once and never stored.
        return Err(ApiError::Conflict("this Idempotency-Key already issued a token; it was shown once".into()));
    }
    Ok(token_body(&token, &stream, expire, action))
}

pub(super) async fn jwt_token(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AmsToken>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let (expire, action) = token_query(&q)?;
    let (token, _) = mint(&api, &ctx, &app, &stream, action, expire)?;
    Ok(token_body(&token, &stream, expire, action))
}

pub(super) async fn add(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
    StrictJson(req): StrictJson<AmsSubscriber>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let id = sluice_events::SubscriberId::parse(&req.subscriber_id)
        .map_err(|e| ApiError::invalid("subscriberId", e.to_string()))?;
    if let Some(named) = &req.stream_id
        && named != stream.as_str()
    {
        return Err(ApiError::invalid("streamId", format!("names {named:?}, not the path's stream {stream:?}")));
    }
    add_subscriber(&api, &ctx, &app, &stream, &id, req.kind, req.b32_secret.as_deref()).await?;
    Ok(outcome(true, ""))
}

pub(super) async fn list(
    State(api): State<ApiState>,
    Path((app, stream, offset, size)): Path<(String, String, usize, usize)>,
) -> Json<Vec<AmsSubscriberView>> {
    let state = api.writer.projection().current();
    let Some((_, stream, a)) = known(&state, &app, &stream) else { return Json(Vec::new()) };
    let page = a
        .subscribers
        .iter()
        .filter(|((s, _), _)| *s == stream)
        .skip(offset)
        .take(size.min(50))
        .map(|((_, id), sub)| AmsSubscriberView {
            subscriber_id: id.clone(),
            subscriber_name: None,
            stream_id: stream.clone(),
            kind: sub.action.map(Action::as_str),
            connected: false,
            current_concurrent_connections: 0,
            concurrent_connections_limit: 1,
            blocked_type: sub.blocked_until.map(|_| block_type(sub.blocked_action)),
            blocked_until_unit_time_stamp_ms: sub.blocked_until.map_or(0, |t| t.0),
            registered_node_ip: None,
            avg_video_bitrate: 0,
            avg_audio_bitrate: 0,
            totp_expiry_period_seconds: a.policy.totp.period_secs,
        })
        .collect();
    Json(page)
}

pub(super) async fn remove(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream, id)): Path<(String, String, String)>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    remove_subscriber(&api, &ctx, &app, &stream, &subscriber_id(&id)?).await?;
    Ok(success())
}

/// Ant Media's `Broadcast` as posted to `create`. Ant Media clients post whole broadcast
/// objects, so members Sluice does not model are accepted and ignored here (the one
/// lenient body in the API).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmsBroadcastBody {
    stream_id: Option<String>,
    name: Option<String>,
    description: Option<String>,
}

pub(super) async fn create_broadcast(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(app): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let app = app_name(&app)?;
    let req: AmsBroadcastBody = if body.is_empty() {
        AmsBroadcastBody { stream_id: None, name: None, description: None }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?
    };
    let id = match &req.stream_id {
        Some(s) => StreamName::parse(s).map_err(|e| ApiError::invalid("streamId", e.to_string()))?,
        None => StreamName::parse(&hex::encode(random::<9>())).map_err(|_| ApiError::Internal)?,
    };
    let description = req.description.clone().or(req.name.clone());
    let now = now();
    api.writer
        .run(&ctx.origin(), now, |_| {
            Ok(Command::RegisterStream {
                app: app.clone(),
                name: id.clone(),
                publish_name: None,
                description: description.clone(),
            })
        })
        .await?;
    let stream = sluice_events::state::Stream { publish_name: None, description: description.clone(), plays: None };
    let body = AmsBroadcast { name: req.name, date: now.0, ..broadcast_of(&api, &app, &id, &stream) };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// The app and the registered stream, when both exist (Ant's lists are empty otherwise).
fn known<'a>(
    state: &'a sluice_events::AuthState,
    app: &str,
    stream: &str,
) -> Option<(AppName, StreamName, &'a sluice_events::state::App)> {
    let app = AppName::parse(app).ok()?;
    let stream = StreamName::parse(stream).ok()?;
    let a = state.apps.get(&app)?;
    Some((app, stream, a))
}

/// Ant's block types: `publish`, `play`, `publish_play` (both).
fn block_type(action: Option<Action>) -> &'static str {
    action.map_or("publish_play", Action::as_str)
}

/// Runs one command per item of a request that acts on several (revoke all, remove all). An
/// Idempotency-Key covers each item on its own, so a retried request skips what it already
/// did; an item gone meanwhile (used, revoked, removed) is nothing left to do.
async fn run_each(api: &ApiState, ctx: &Ctx, commands: Vec<(String, Command)>) -> Result<(), ApiError> {
    for (item, command) in commands {
        let mut origin = ctx.origin();
        origin.idempotency = origin.idempotency.map(|(scope, key)| (format!("{scope}|{item}"), key));
        match api.writer.run(&origin, now(), |_| Ok(command.clone())).await {
            Ok(_) | Err(crate::commands::CommandError::Rejected(sluice_events::Rejection::NotFound { .. })) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// An unused token of `app`/`stream` (Ant deletes a token when it is used).
fn unused_of(t: &sluice_events::state::Token, app: &AppName, stream: &StreamName) -> bool {
    t.app == *app && t.stream == *stream && t.status == sluice_events::state::TokenStatus::Active
}

/// Ant Media's `Broadcast`, in its member order: the members Sluice fills from the stream's
/// registration and its live figures, and Ant's defaults for the rest it lists.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsBroadcast {
    stream_id: StreamName,
    status: &'static str,
    play_list_status: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    publish_type: Option<&'static str>,
    name: Option<String>,
    description: Option<String>,
    publish: bool,
    date: i64,
    planned_start_date: i64,
    planned_end_date: i64,
    duration: i64,
    public_stream: bool,
    hls_viewer_count: u64,
    dash_viewer_count: u64,
    web_r_t_c_viewer_count: u64,
    rtmp_viewer_count: u64,
    start_time: i64,
    received_bytes: u64,
    bitrate: u64,
    width: u32,
    height: u32,
    user_agent: &'static str,
}

fn broadcast_of(api: &ApiState, app: &AppName, name: &StreamName, s: &sluice_events::state::Stream) -> AmsBroadcast {
    let live = super::nodes::stream_stats_of(api, app.as_str(), name.as_str());
    let started = (now().0 - (live.uptime_secs as i64) * 1000).max(0);
    AmsBroadcast {
        stream_id: name.clone(),
        status: if live.live { "broadcasting" } else { "created" },
        play_list_status: None,
        kind: "liveStream",
        publish_type: live.live.then_some(if live.srt.is_some() { "SRT" } else { "RTMP" }),
        name: s.description.clone(),
        description: s.description.clone(),
        publish: true,
        date: 0,
        planned_start_date: 0,
        planned_end_date: 0,
        duration: 0,
        public_stream: true,
        hls_viewer_count: 0,
        dash_viewer_count: 0,
        // Ant's field is `webRTCViewerCount`.
        web_r_t_c_viewer_count: 0,
        rtmp_viewer_count: if live.live { live.players } else { 0 },
        start_time: if live.live { started } else { 0 },
        received_bytes: live.bytes_in,
        bitrate: live.bitrate_10s,
        width: 0,
        height: 0,
        user_agent: "N/A",
    }
}

/// `GET /{app}/rest/v2/broadcasts/{stream}`: the broadcast, or 404 with no body (Ant's).
pub(super) async fn get_broadcast(
    State(api): State<ApiState>,
    Path((app, stream)): Path<(String, String)>,
) -> Response {
    let state = api.writer.projection().current();
    match known(&state, &app, &stream).and_then(|(app, name, a)| a.streams.get(&name).map(|s| (app, name, s))) {
        Some((app, name, s)) => Json(broadcast_of(&api, &app, &name, s)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /{app}/rest/v2/broadcasts/list/{offset}/{size}`: at most 50, by stream id.
pub(super) async fn list_broadcasts(
    State(api): State<ApiState>,
    Path((app, offset, size)): Path<(String, usize, usize)>,
) -> Json<Vec<AmsBroadcast>> {
    let state = api.writer.projection().current();
    let Some(app) = AppName::parse(&app).ok() else { return Json(Vec::new()) };
    let Some(a) = state.apps.get(&app) else { return Json(Vec::new()) };
    Json(a.streams.iter().skip(offset).take(size.min(50)).map(|(name, s)| broadcast_of(&api, &app, name, s)).collect())
}

/// `DELETE /{app}/rest/v2/broadcasts/{stream}`: unregisters the stream.
pub(super) async fn delete_broadcast(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    api.writer
        .run(&ctx.origin(), now(), |_| Ok(Command::DeleteStream { app: app.clone(), name: stream.clone() }))
        .await?;
    Ok(success())
}

/// `GET …/{stream}/tokens/list/{offset}/{size}`: the stream's unused tokens (Ant deletes a
/// token when it is used). `tokenId` is Sluice's token id: the token was shown once.
pub(super) async fn list_tokens(
    State(api): State<ApiState>,
    Path((app, stream, offset, size)): Path<(String, String, usize, usize)>,
) -> Json<Vec<AmsToken>> {
    let state = api.writer.projection().current();
    let Some((app, stream, _)) = known(&state, &app, &stream) else { return Json(Vec::new()) };
    let mut tokens: Vec<AmsToken> = state
        .tokens
        .iter()
        .filter(|(_, t)| unused_of(t, &app, &stream))
        .map(|(d, t)| AmsToken {
            token_id: sluice_events::event::token_id(d),
            stream_id: stream.clone(),
            expire_date: t.expires_at.map_or(0, sluice_events::Timestamp::as_secs),
            kind: t.action.as_str(),
            room_id: None,
        })
        .collect();
    // Tokens are kept by digest, with no issue order: by expiry, type, then id.
    tokens.sort_by(|a, b| (a.expire_date, a.kind, &a.token_id).cmp(&(b.expire_date, b.kind, &b.token_id)));
    Json(tokens.into_iter().skip(offset).take(size.min(50)).collect())
}

/// `DELETE …/{stream}/tokens`: revokes every unused token of the stream.
pub(super) async fn revoke_tokens(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let state = api.writer.projection().current();
    let digests: Vec<sluice_events::Sha256Digest> =
        state.tokens.iter().filter(|(_, t)| unused_of(t, &app, &stream)).map(|(d, _)| *d).collect();
    let commands = digests
        .into_iter()
        .map(|d| (sluice_events::event::token_id(&d), Command::RevokeToken { token_sha256: d }))
        .collect();
    run_each(&api, &ctx, commands).await?;
    Ok(success())
}

/// Ant Media's `Token` as posted to `validate-token`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct AmsTokenBody {
    /// Members left out are Jackson's nulls, as Ant reads them: such a token is not valid.
    #[serde(default)]
    pub token_id: String,
    #[serde(default)]
    pub stream_id: String,
    /// `publish` or `play`.
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub expire_date: Option<i64>,
    #[serde(default)]
    pub room_id: Option<String>,
    /// Ant's database id, sent back by its clients; ignored.
    #[serde(default)]
    pub db_id: Option<serde_json::Value>,
}

/// `POST /{app}/rest/v2/broadcasts/validate-token`: is this an unused, unexpired token for
/// that stream and type? Checked, not consumed (see the module's note).
pub(super) async fn validate_token(
    State(api): State<ApiState>,
    Path(app): Path<String>,
    StrictJson(req): StrictJson<AmsTokenBody>,
) -> Json<AmsResult> {
    let state = api.writer.projection().current();
    let digest = sluice_events::Sha256Digest::of(req.token_id.as_bytes());
    let now = now();
    let valid = state.tokens.get(&digest).is_some_and(|t| {
        t.app.as_str() == app
            && t.stream.as_str() == req.stream_id
            && t.action.as_str() == req.kind
            && t.status == sluice_events::state::TokenStatus::Active
            && t.expires_at.is_none_or(|e| e > now)
    });
    Json(AmsResult { success: valid, message: None, data_id: None, error_id: 0 })
}

/// `DELETE …/{stream}/subscribers`: removes every subscriber of the stream.
pub(super) async fn revoke_subscribers(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream)): Path<(String, String)>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let state = api.writer.projection().current();
    let ids: Vec<sluice_events::SubscriberId> = super::apps::lookup(&state, &app)?
        .subscribers
        .keys()
        .filter(|(s, _)| *s == stream)
        .map(|(_, id)| id.clone())
        .collect();
    let commands = ids
        .into_iter()
        .map(|id| {
            let remove =
                Command::RemoveSubscriber { app: app.clone(), stream: stream.clone(), subscriber_id: id.clone() };
            (id.to_string(), remove)
        })
        .collect();
    run_each(&api, &ctx, commands).await?;
    Ok(success())
}

/// `PUT …/{stream}/subscribers/{sid}/block/{seconds}/{type}`: `publish`, `play` or
/// `publish_play`; 0 seconds unblocks.
pub(super) async fn block(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream, id, seconds, kind)): Path<(String, String, String, i64, String)>,
) -> Result<Json<AmsResult>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let id = subscriber_id(&id)?;
    let action = match kind.as_str() {
        "publish_play" => None,
        other => Some(Action::parse(other).map_err(|_| ApiError::invalid("type", "publish, play or publish_play"))?),
    };
    if !(0..=366 * 24 * 3600).contains(&seconds) {
        return Err(ApiError::invalid("seconds", "0 (unblock) to one year"));
    }
    let now = now();
    let until = now.plus_secs(seconds);
    api.writer
        .run(&ctx.origin(), now, |_| {
            Ok(Command::BlockSubscriber {
                app: app.clone(),
                stream: stream.clone(),
                subscriber_id: id.clone(),
                until,
                action,
            })
        })
        .await?;
    Ok(outcome(true, ""))
}

/// `GET …/{stream}/subscribers/{sid}/totp`: the subscriber's current code in `dataId`
/// (`new Result(true, totp, "")`). Ant derives one for an unknown subscriber from app-wide
/// secrets Sluice does not have; here it is `success: false`.
pub(super) async fn totp(
    State(api): State<ApiState>,
    Path((app, stream, id)): Path<(String, String, String)>,
) -> Json<AmsResult> {
    let state = api.writer.projection().current();
    let found = known(&state, &app, &stream).and_then(|(_, stream, a)| {
        let id = sluice_events::SubscriberId::parse(&id).ok()?;
        let sub = a.subscribers.get(&(stream, id))?;
        let step = u64::try_from(now().as_secs()).ok()? / u64::from(a.policy.totp.period_secs.max(1));
        sub.code_at(step)
    });
    match found {
        Some(code) => Json(AmsResult { success: true, message: Some(String::new()), data_id: Some(code), error_id: 0 }),
        None => outcome(false, format!("no subscriber {id:?} on this stream")),
    }
}

/// Ant Media's `ConnectionEvent`, in its member order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsConnectionEvent {
    timestamp: i64,
    event_type: &'static str,
    #[serde(rename = "instanceIP")]
    instance_ip: String,
    #[serde(rename = "type")]
    kind: String,
    event_protocol: String,
    stream_id: String,
    subscriber_id: String,
}

async fn connection_events(
    api: &ApiState,
    app: &AppName,
    stream: &StreamName,
    subscriber: Option<&str>,
    offset: usize,
    size: usize,
) -> Result<Vec<AmsConnectionEvent>, ApiError> {
    let filter = crate::decisions::Filter {
        app: Some(app.to_string()),
        stream: Some(stream.to_string()),
        subject: subscriber.map(|s| format!("subscriber:{s}")),
        subject_prefix: Some("subscriber:".into()),
        allowed: Some(true),
        limit: size.min(50) as i64,
        offset: offset as i64,
        oldest_first: true,
        ..Default::default()
    };
    let rows = crate::decisions::query(api.writer.store().pool(), &filter).await?;
    Ok(rows
        .into_iter()
        .map(|r| AmsConnectionEvent {
            timestamp: chrono::DateTime::parse_from_rfc3339(&r.decided_at).map_or(0, |t| t.timestamp_millis()),
            event_type: "connected",
            instance_ip: r.node,
            kind: r.action,
            event_protocol: r.protocol,
            stream_id: r.stream,
            subscriber_id: r.subject.as_deref().and_then(|s| s.strip_prefix("subscriber:")).unwrap_or("").to_owned(),
        })
        .collect())
}

/// `GET …/{stream}/connection-events/{offset}/{size}?subscriberId=`: the admissions of the
/// stream's TOTP subscribers, oldest first.
pub(super) async fn list_connection_events(
    State(api): State<ApiState>,
    Path((app, stream, offset, size)): Path<(String, String, usize, usize)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<AmsConnectionEvent>>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    Ok(Json(connection_events(&api, &app, &stream, q.get("subscriberId").map(String::as_str), offset, size).await?))
}

/// Ant Media's `SubscriberStats` (before 3.0), in its member order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsSubscriberStats {
    subscriber_id: String,
    stream_id: String,
    connection_events: Vec<AmsConnectionEvent>,
    avg_video_bitrate: u64,
    avg_audio_bitrate: u64,
}

/// `GET …/{stream}/subscriber-stats/list/{offset}/{size}`: per subscriber, its connection
/// events (the newest 50).
pub(super) async fn list_subscriber_stats(
    State(api): State<ApiState>,
    Path((app, stream, offset, size)): Path<(String, String, usize, usize)>,
) -> Result<Json<Vec<AmsSubscriberStats>>, ApiError> {
    let state = api.writer.projection().current();
    let Some((app, stream, a)) = known(&state, &app, &stream) else { return Ok(Json(Vec::new())) };
    let ids: Vec<String> = a
        .subscribers
        .keys()
        .filter(|(s, _)| *s == stream)
        .skip(offset)
        .take(size.min(50))
        .map(|(_, id)| id.to_string())
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let events = connection_events(&api, &app, &stream, Some(&id), 0, 50).await?;
        out.push(AmsSubscriberStats {
            subscriber_id: id,
            stream_id: stream.to_string(),
            connection_events: events,
            avg_video_bitrate: 0,
            avg_audio_bitrate: 0,
        });
    }
    Ok(Json(out))
}
