//! `/v1/apps/{app}/streams/{name}/subscribers`: TOTP identities (Ant Media's subscribers).
//! The base32 secret is generated when absent and returned once, with an `otpauth://` URI.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Action, AppName, Command, NewSecret, StreamName, SubscriberId, Timestamp};

use super::apps::{app_name, lookup};
use super::body::StrictJson;
use super::error::ApiError;
use super::streams::stream_name;
use super::{ApiState, Ctx, now, random, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSubscriber {
    pub id: SubscriberId,
    /// `publish` or `play`; absent means both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// RFC 4648 base32 secret, a multiple of 8 characters and at least 16 bytes decoded
    /// (32 characters); 20 random bytes are generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_b32: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AddedSubscriber {
    pub id: SubscriberId,
    pub action: Option<Action>,
    /// Shown once.
    pub secret_b32: String,
    /// For authenticator apps.
    pub otpauth_uri: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SubscriberView {
    pub id: SubscriberId,
    pub action: Option<Action>,
    /// Unix seconds; refused until then.
    pub blocked_until: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SubscriberList {
    pub subscribers: Vec<SubscriberView>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Block {
    /// How long to refuse the subscriber, 1 s to 1 year; 0 unblocks.
    pub seconds: i64,
    /// Refuse only `publish` or only `play`; absent: both. A block replaces the previous one.
    #[serde(default)]
    pub action: Option<Action>,
}

/// Decodes a base32 secret the way Ant Media's users give it (a multiple of 8 characters).
pub fn decode_b32(text: &str) -> Result<Vec<u8>, ApiError> {
    let t = text.trim().to_ascii_uppercase();
    if t.is_empty() || !t.len().is_multiple_of(8) {
        return Err(ApiError::invalid("secret", "base32 of a length that is a multiple of 8 characters"));
    }
    let bytes = base32::decode(base32::Alphabet::Rfc4648 { padding: true }, &t)
        .ok_or_else(|| ApiError::invalid("secret", "not RFC 4648 base32 (A-Z, 2-7)"))?;
    if bytes.len() < 16 {
        return Err(ApiError::invalid("secret", "at least 16 bytes (32 base32 characters)"));
    }
    Ok(bytes)
}

pub fn subscriber_id(id: &str) -> Result<SubscriberId, ApiError> {
    SubscriberId::parse(id).map_err(|_| ApiError::not_found("subscriber", id))
}

/// Adds a subscriber (shared with the Ant Media adapter). Returns the base32 secret.
pub async fn add_subscriber(
    api: &ApiState,
    ctx: &Ctx,
    app: &AppName,
    stream: &StreamName,
    id: &SubscriberId,
    action: Option<Action>,
    secret_b32: Option<&str>,
) -> Result<(AddedSubscriber, crate::commands::Committed), ApiError> {
    let (bytes, b32) = match secret_b32 {
        Some(t) => (decode_b32(t)?, t.trim().to_ascii_uppercase()),
        None => {
            let b = random::<20>().to_vec();
            let t = base32::encode(base32::Alphabet::Rfc4648 { padding: false }, &b);
            (b, t)
        }
    };
    let sealed = NewSecret::for_subscriber(&api.sealing, app, stream, id, &bytes, random::<24>());
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| {
            Ok(Command::AddSubscriber {
                app: app.clone(),
                stream: stream.clone(),
                subscriber_id: id.clone(),
                action,
                secret: sealed.clone(),
            })
        })
        .await?;
    let state = api.writer.projection().current();
    let totp = lookup(&state, app)?.policy.totp;
    let label = format!("Sluice:{app}%2F{stream}%2F{id}");
    let otpauth_uri = format!(
        "otpauth://totp/{label}?secret={}&issuer=Sluice&algorithm=SHA1&digits={}&period={}",
        b32.trim_end_matches('='),
        totp.digits,
        totp.period_secs
    );
    Ok((AddedSubscriber { id: id.clone(), action, secret_b32: b32, otpauth_uri }, committed))
}

pub(super) async fn add(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<AddSubscriber>,
) -> Result<Response, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let (added, committed) =
        add_subscriber(&api, &ctx, &app, &name, &req.id, req.action, req.secret_b32.as_deref()).await?;
    if committed.replayed {
        return Ok(written(StatusCode::CREATED, committed, Some(serde_json::json!({"id": req.id, "replayed": true}))));
    }
    Ok(written(StatusCode::CREATED, committed, Some(added)))
}

/// The subscribers of one stream.
pub fn subscribers_of(api: &ApiState, app: &AppName, stream: &StreamName) -> Result<Vec<SubscriberView>, ApiError> {
    let state = api.writer.projection().current();
    let a = lookup(&state, app)?;
    Ok(a.subscribers
        .iter()
        .filter(|((s, _), _)| s == stream)
        .map(|((_, id), sub)| SubscriberView {
            id: id.clone(),
            action: sub.action,
            blocked_until: sub.blocked_until.map(Timestamp::as_secs),
        })
        .collect())
}

pub(super) async fn list(
    State(api): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<SubscriberList>, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    Ok(Json(SubscriberList { subscribers: subscribers_of(&api, &app, &name)? }))
}

/// Removes a subscriber (shared with the Ant Media adapter).
pub async fn remove_subscriber(
    api: &ApiState,
    ctx: &Ctx,
    app: &AppName,
    stream: &StreamName,
    id: &SubscriberId,
) -> Result<crate::commands::Committed, ApiError> {
    Ok(api
        .writer
        .run(&ctx.origin(), now(), |_| {
            Ok(Command::RemoveSubscriber { app: app.clone(), stream: stream.clone(), subscriber_id: id.clone() })
        })
        .await?)
}

pub(super) async fn remove(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (app, name, id) = (app_name(&app)?, stream_name(&name)?, subscriber_id(&id)?);
    let committed = remove_subscriber(&api, &ctx, &app, &name, &id).await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}

pub(super) async fn block(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name, id)): Path<(String, String, String)>,
    StrictJson(req): StrictJson<Block>,
) -> Result<Response, ApiError> {
    let (app, name, id) = (app_name(&app)?, stream_name(&name)?, subscriber_id(&id)?);
    if !(0..=366 * 24 * 3600).contains(&req.seconds) {
        return Err(ApiError::invalid("seconds", "0 (unblock) to one year"));
    }
    let now = now();
    let until = now.plus_secs(req.seconds);
    let committed = api
        .writer
        .run(&ctx.origin(), now, |_| {
            Ok(Command::BlockSubscriber {
                app: app.clone(),
                stream: name.clone(),
                subscriber_id: id.clone(),
                until,
                action: req.action,
            })
        })
        .await?;
    let view = SubscriberView { id, action: None, blocked_until: Some(until.as_secs()) };
    let state = api.writer.projection().current();
    let action = lookup(&state, &app)?.subscribers.get(&(name, view.id.clone())).and_then(|s| s.action);
    Ok(written(StatusCode::OK, committed, Some(SubscriberView { action, ..view })))
}
