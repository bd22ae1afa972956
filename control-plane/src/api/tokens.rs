//! Credentials for one stream: one-time tokens (issued, listed, revoked), stream JWTs minted
//! with the app's JWT secret, and the hash/HMAC helper that computes the token a client
//! should present. Every answer carries the RTMP URL and SRT streamid to use.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::decide::{stream_hash, stream_hmac};
use sluice_events::event::token_id;
use sluice_events::state::{App, TokenStatus};
use sluice_events::{Action, AppName, Command, Method, SecretKind, Sha256Digest, StreamName, Timestamp};

use super::apps::{app_name, lookup};
use super::body::StrictJson;
use super::error::ApiError;
use super::streams::stream_name;
use super::{ApiState, Ctx, now, random, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueToken {
    pub action: Action,
    /// Unix seconds; or give `expires_in`. Neither: the token never expires (used once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Seconds from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
}

/// How a client presents a credential.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Usage {
    /// `rtmp://host/app/stream?...` (the publish name for publishing, when the stream has one).
    pub rtmp_url: String,
    /// SRT access-control streamid (`#!::r=app/stream,m=publish|request,t=...`).
    pub srt_streamid: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct IssuedToken {
    /// Public id (the first 8 bytes of the token's SHA-256, hex): list and revoke by it.
    pub id: String,
    /// The token: shown once, never stored.
    pub token: String,
    pub action: Action,
    pub expires_at: Option<i64>,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenView {
    pub id: String,
    pub action: Action,
    pub expires_at: Option<i64>,
    /// `active`, `consumed` or `revoked`.
    pub status: &'static str,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MintJwt {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Seconds from now (default 3600 when neither is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct MintedJwt {
    pub token: String,
    pub action: Action,
    pub expires_at: i64,
    #[serde(flatten)]
    pub usage: Usage,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashRequest {
    pub action: Action,
    /// `hash` (no expiry) or `hmac` (needs an expiry); default: `hmac` when an expiry is
    /// given, else `hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct HashToken {
    pub method: Method,
    pub token: String,
    /// The `expires` parameter for `hmac`.
    pub expires: Option<i64>,
    #[serde(flatten)]
    pub usage: Usage,
}

/// The expiry in Unix seconds from `expires_at` or `expires_in`.
pub fn expiry(at: Option<i64>, within: Option<i64>, now: Timestamp) -> Result<Option<i64>, ApiError> {
    match (at, within) {
        (Some(_), Some(_)) => Err(ApiError::invalid("expires_at", "give expires_at or expires_in, not both")),
        (Some(t), None) if t <= now.as_secs() => Err(ApiError::invalid("expires_at", "must be in the future")),
        (None, Some(s)) if s <= 0 => Err(ApiError::invalid("expires_in", "must be positive")),
        (Some(t), None) => Ok(Some(t)),
        (None, Some(s)) => Ok(Some(now.as_secs().saturating_add(s))),
        (None, None) => Ok(None),
    }
}

/// Where a client sends media with `query` (e.g. `token=...`).
pub fn usage(
    api: &ApiState,
    app_name: &AppName,
    app: &App,
    stream: &StreamName,
    action: Action,
    query: &[(&str, String)],
) -> Usage {
    let wire = match action {
        Action::Publish => {
            app.streams.get(stream).and_then(|s| s.publish_name.clone()).unwrap_or_else(|| stream.clone())
        }
        Action::Play => stream.clone(),
    };
    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let rtmp_url = format!(
        "{}/{app_name}/{wire}{}{}",
        api.settings.public_rtmp_url.trim_end_matches('/'),
        if q.is_empty() { "" } else { "?" },
        q.join("&")
    );
    let mode = match action {
        Action::Publish => "publish",
        Action::Play => "request",
    };
    let mut srt_streamid = format!("#!::r={app_name}/{wire},m={mode}");
    for (k, v) in query {
        let key = match *k {
            "token" => "t",
            "expires" => "e",
            "subscriberId" => "u",
            "subscriberCode" => "s",
            other => other,
        };
        srt_streamid.push_str(&format!(",{key}={v}"));
    }
    Usage { rtmp_url, srt_streamid }
}

/// A fresh one-time token: 24 random bytes, base64url.
pub fn new_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<24>())
}

/// Issues a one-time token (shared with the Ant Media adapter).
pub async fn issue_token(
    api: &ApiState,
    ctx: &Ctx,
    app: &AppName,
    stream: &StreamName,
    action: Action,
    expires_at: Option<i64>,
) -> Result<(String, IssuedToken, crate::commands::Committed), ApiError> {
    let token = new_token();
    let digest = Sha256Digest::of(token.as_bytes());
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| {
            Ok(Command::IssueToken {
                app: app.clone(),
                stream: stream.clone(),
                action,
                token_sha256: digest,
                expires_at: expires_at.map(Timestamp::from_secs),
            })
        })
        .await?;
    let state = api.writer.projection().current();
    let a = lookup(&state, app)?;
    let issued = IssuedToken {
        id: token_id(&digest),
        token: token.clone(),
        action,
        expires_at,
        usage: usage(api, app, a, stream, action, &[("token", token.clone())]),
    };
    Ok((token, issued, committed))
}

pub(super) async fn issue(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<IssueToken>,
) -> Result<Response, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let expires_at = expiry(req.expires_at, req.expires_in, now())?;
    let (_, issued, committed) = issue_token(&api, &ctx, &app, &name, req.action, expires_at).await?;
    if committed.replayed {
        return Ok(written(StatusCode::CREATED, committed, Some(serde_json::json!({"replayed": true}))));
    }
    Ok(written(StatusCode::CREATED, committed, Some(issued)))
}

pub(super) async fn list(
    State(api): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<TokenList>, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let state = api.writer.projection().current();
    lookup(&state, &app)?;
    // A scan: tokens are keyed by digest for the media path, not by stream.
    let mut tokens: Vec<TokenView> = state
        .tokens
        .iter()
        .filter(|(_, t)| t.app == app && t.stream == name)
        .map(|(d, t)| TokenView {
            id: token_id(d),
            action: t.action,
            expires_at: t.expires_at.map(Timestamp::as_secs),
            status: match t.status {
                TokenStatus::Active => "active",
                TokenStatus::Consumed => "consumed",
                TokenStatus::Revoked => "revoked",
            },
        })
        .collect();
    tokens.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(TokenList { tokens }))
}

pub(super) async fn revoke(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |state| {
            let digest = state
                .tokens
                .iter()
                .find(|(d, t)| t.app == app && t.stream == name && token_id(d) == id)
                .map(|(d, _)| *d)
                .ok_or_else(|| sluice_events::Rejection::NotFound { what: "token", id: id.clone() })?;
            Ok(Command::RevokeToken { token_sha256: digest })
        })
        .await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}

/// Claims of a minted stream JWT (what `decide` checks).
#[derive(Debug, Serialize)]
struct StreamClaims<'a> {
    app: &'a str,
    stream: &'a str,
    action: &'a str,
    exp: i64,
    iat: i64,
    sub: &'a str,
}

/// Mints an HS256 stream JWT with the app's JWT secret (shared with the Ant Media adapter).
pub fn mint(
    api: &ApiState,
    ctx: &Ctx,
    app: &AppName,
    stream: &StreamName,
    action: Action,
    exp: i64,
) -> Result<(String, Usage), ApiError> {
    let state = api.writer.projection().current();
    let a = lookup(&state, app)?;
    if !a.streams.contains_key(stream) && !a.policy.for_action(action).accept_undefined_streams {
        return Err(ApiError::not_found("stream", stream));
    }
    let secret = a.secret_bytes(SecretKind::Jwt).ok_or_else(|| {
        ApiError::Conflict(format!("app {app} has no JWT secret; rotate one with POST /v1/apps/{app}/secrets/jwt"))
    })?;
    let now = now();
    if exp <= now.as_secs() {
        return Err(ApiError::invalid("expires_at", "must be in the future"));
    }
    let claims = StreamClaims {
        app: app.as_str(),
        stream: stream.as_str(),
        action: action.as_str(),
        exp,
        iat: now.as_secs(),
        sub: &ctx.principal.subject,
    };
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|_| ApiError::Internal)?;
    let usage = usage(api, app, a, stream, action, &[("token", token.clone())]);
    Ok((token, usage))
}

pub(super) async fn mint_jwt(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<MintJwt>,
) -> Result<Json<MintedJwt>, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let exp = expiry(req.expires_at, req.expires_in, now())?.unwrap_or(now().as_secs() + 3600);
    let (token, usage) = mint(&api, &ctx, &app, &name, req.action, exp)?;
    Ok(Json(MintedJwt { token, action: req.action, expires_at: exp, usage }))
}

pub(super) async fn hash_token(
    State(api): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<HashRequest>,
) -> Result<Json<HashToken>, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let expires = expiry(req.expires_at, req.expires_in, now())?;
    let method = req.method.unwrap_or(if expires.is_some() { Method::Hmac } else { Method::Hash });
    let state = api.writer.projection().current();
    let a = lookup(&state, &app)?;
    let secret = a.secret_bytes(SecretKind::Hash).ok_or_else(|| {
        ApiError::Conflict(format!("app {app} has no hash secret; rotate one with POST /v1/apps/{app}/secrets/hash"))
    })?;
    let (token, query) = match (method, expires) {
        (Method::Hash, None) => {
            let t = stream_hash(name.as_str(), req.action, secret).to_hex();
            (t.clone(), vec![("token", t)])
        }
        (Method::Hash, Some(_)) => return Err(ApiError::invalid("method", "hash tokens do not expire; use hmac")),
        (Method::Hmac, Some(e)) => {
            let mac = stream_hmac(name.as_str(), req.action, e, secret).ok_or(ApiError::Internal)?;
            let t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac);
            (t.clone(), vec![("token", t), ("expires", e.to_string())])
        }
        (Method::Hmac, None) => return Err(ApiError::invalid("expires_at", "hmac tokens need an expiry")),
        _ => return Err(ApiError::invalid("method", "hash or hmac")),
    };
    let usage = usage(&api, &app, a, &name, req.action, &query);
    Ok(Json(HashToken { method, token, expires, usage }))
}
