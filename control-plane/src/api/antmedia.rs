//! Ant Media Server's stream-security REST calls (seeds 003/004), as thin adapters over the
//! native commands: one-time tokens, JWT tokens, TOTP subscribers and broadcast creation,
//! under `/{app}/rest/v2/broadcasts/…`, with Ant Media's `Token`, `Subscriber`, `Broadcast`
//! and `Result` shapes. Authentication is the API's (a key or an API JWT, which Ant Media
//! clients already send in `Authorization`).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Action, AppName, Command, StreamName};

use super::apps::app_name;
use super::body::StrictJson;
use super::compat::AmsResult;
use super::error::ApiError;
use super::query::Query;
use super::streams::stream_name;
use super::subscribers::{add_subscriber, remove_subscriber, subscriber_id, subscribers_of};
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

fn success() -> Json<AmsResult<'static>> {
    Json(AmsResult { success: true, message: None, data_id: None, error_id: 0 })
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

/// Ant Media's `Subscriber` as listed (the secret is never returned).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AmsSubscriberView {
    subscriber_id: sluice_events::SubscriberId,
    stream_id: StreamName,
    #[serde(rename = "type")]
    kind: Option<&'static str>,
    blocked_until_unit_time_stamp_ms: Option<i64>,
    connected: bool,
    current_concurrent_connections: u32,
}

/// Ant Media's `Broadcast` as answered by `create` (the members Sluice models).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AmsBroadcastView {
    stream_id: StreamName,
    name: Option<String>,
    description: Option<String>,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    date: i64,
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
) -> Result<Json<AmsResult<'static>>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let id = sluice_events::SubscriberId::parse(&req.subscriber_id)
        .map_err(|e| ApiError::invalid("subscriberId", e.to_string()))?;
    if let Some(named) = &req.stream_id
        && named != stream.as_str()
    {
        return Err(ApiError::invalid("streamId", format!("names {named:?}, not the path's stream {stream:?}")));
    }
    add_subscriber(&api, &ctx, &app, &stream, &id, req.kind, req.b32_secret.as_deref()).await?;
    Ok(success())
}

pub(super) async fn list(
    State(api): State<ApiState>,
    Path((app, stream, offset, size)): Path<(String, String, usize, usize)>,
) -> Result<Json<Vec<AmsSubscriberView>>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    let subs = subscribers_of(&api, &app, &stream)?;
    // Ant Media caps a page at 50.
    let page = subs
        .into_iter()
        .skip(offset)
        .take(size.min(50))
        .map(|s| AmsSubscriberView {
            subscriber_id: s.id,
            stream_id: stream.clone(),
            kind: s.action.map(Action::as_str),
            blocked_until_unit_time_stamp_ms: s.blocked_until.map(|t| t * 1000),
            connected: false,
            current_concurrent_connections: 0,
        })
        .collect();
    Ok(Json(page))
}

pub(super) async fn remove(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, stream, id)): Path<(String, String, String)>,
) -> Result<Json<AmsResult<'static>>, ApiError> {
    let (app, stream) = names(&app, &stream)?;
    remove_subscriber(&api, &ctx, &app, &stream, &subscriber_id(&id)?).await?;
    Ok(success())
}

/// Ant Media's `Broadcast` as posted to `create`. Ant Media clients post whole broadcast
/// objects, so members Sluice does not model are accepted and ignored here (the one
/// lenient body in the API).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmsBroadcast {
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
    let req: AmsBroadcast = if body.is_empty() {
        AmsBroadcast { stream_id: None, name: None, description: None }
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
    let body = AmsBroadcastView {
        stream_id: id,
        name: req.name,
        description: req.description,
        status: "created",
        kind: "liveStream",
        date: now.0,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}
