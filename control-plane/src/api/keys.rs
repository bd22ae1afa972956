//! `/v1/keys`: API keys (admin). The secret is returned once, on creation; the log keeps
//! only its SHA-256.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::state::ApiKey;
use sluice_events::{AuthState, Cidr, Command, Event, KeyId, Position, Role, Sha256Digest, Timestamp};

use super::body::StrictJson;
use super::error::ApiError;
use super::{ApiState, Ctx, now, random, written};
use crate::projection::Projection;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A label for people.
    pub name: String,
    pub role: Role,
    /// Optional id (letters, digits, `_`, `-`); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<KeyId>,
    /// Client addresses the key may be used from; empty means anywhere.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Unix seconds after which the key stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyView {
    pub id: KeyId,
    pub name: String,
    pub role: Role,
    pub cidrs: Vec<Cidr>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    pub revoked: bool,
    /// Unix seconds of the last authenticated request with this key, as far as this control
    /// plane knows (its own requests and the audit log).
    pub last_used: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyView,
    /// The secret: shown once, never stored. Use `Authorization: Bearer <secret>` or
    /// `Basic base64(id:secret)`.
    pub secret: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct JwksRefreshed {
    /// Usable RS256/ES256 keys now cached.
    pub keys: usize,
}

/// Refetches `SLUICE_API_JWT_JWKS_URL` now (after a key rotation at the identity provider).
pub(super) async fn refresh_jwks(State(api): State<ApiState>) -> Result<Json<JwksRefreshed>, ApiError> {
    if api.auth.jwks_url().is_none() {
        return Err(ApiError::Conflict("no api_jwt_jwks_url is configured".into()));
    }
    match api.auth.refresh_jwks(&api.http).await {
        Ok(keys) => Ok(Json(JwksRefreshed { keys })),
        Err(e) => {
            tracing::warn!(error = %e, "forced API JWKS refresh failed");
            Err(ApiError::Unavailable("the JWKS URL could not be fetched; the previous keys stay in use"))
        }
    }
}

pub fn view(projection: &Projection, id: &KeyId, k: &ApiKey) -> KeyView {
    KeyView {
        id: id.clone(),
        name: k.name.clone(),
        role: k.role,
        cidrs: k.cidrs.clone(),
        expires_at: k.expires_at.map(Timestamp::as_secs),
        created_at: k.created_at.as_secs(),
        revoked: k.revoked,
        last_used: projection.last_used(id).map(Timestamp::as_secs),
    }
}

/// A new key secret and a generated id.
pub fn new_key_material() -> (KeyId, String) {
    let secret = crate::bootstrap::generate_key_secret();
    let id = hex::encode(random::<6>());
    (KeyId::parse(&format!("k_{id}")).unwrap_or_else(|_| unreachable!("hex is a valid key id")), secret)
}

/// Creates a key (shared with the SLS `POST /api/keys` adapter). The secret is `None` when an
/// idempotent retry replayed an earlier creation: that secret was shown once and never stored.
pub async fn create_key(api: &ApiState, ctx: &Ctx, req: CreateKey) -> Result<(Option<String>, Response), ApiError> {
    let (generated, secret) = new_key_material();
    let id = req.id.unwrap_or(generated);
    let now = now();
    let expires_at = req.expires_at.map(Timestamp::from_secs);
    let committed = api
        .writer
        .run(&ctx.origin(), now, |_| {
            Ok(Command::CreateApiKey {
                key_id: id.clone(),
                name: req.name.clone(),
                role: req.role,
                secret_sha256: Sha256Digest::of(secret.as_bytes()),
                cidrs: req.cidrs.clone(),
                expires_at,
            })
        })
        .await?;
    // A replay created its key under the id of the first request: read it from that event.
    let id = if committed.replayed {
        let first = api.writer.store().read_all(Position(committed.position.0.saturating_sub(1)), 1).await?;
        match first.first().map(|e| &e.event) {
            Some(Event::ApiKeyCreated(e)) => e.key_id.clone(),
            _ => return Err(ApiError::Unprocessable("the Idempotency-Key was used for a different request".into())),
        }
    } else {
        id
    };
    let state = api.writer.projection().current();
    let key = state.api_keys.get(&id).ok_or(ApiError::Internal)?;
    let view = view(api.writer.projection(), &id, key);
    let body = if committed.replayed {
        // A replay cannot show the secret again: it was never stored.
        serde_json::to_value(&view).map_err(|_| ApiError::Internal)?
    } else {
        serde_json::to_value(CreatedKey { key: view, secret: secret.clone() }).map_err(|_| ApiError::Internal)?
    };
    let secret = (!committed.replayed).then_some(secret);
    Ok((secret, written(StatusCode::CREATED, committed, Some(body))))
}

pub(super) async fn create(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<CreateKey>,
) -> Result<Response, ApiError> {
    Ok(create_key(&api, &ctx, req).await?.1)
}

pub(super) async fn list(State(api): State<ApiState>) -> Result<Json<KeyList>, ApiError> {
    let state = api.writer.projection().current();
    Ok(Json(KeyList { keys: state.api_keys.iter().map(|(id, k)| view(api.writer.projection(), id, k)).collect() }))
}

fn key_id(id: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(id).map_err(|_| ApiError::not_found("key", id))
}

fn lookup<'a>(state: &'a AuthState, id: &KeyId) -> Result<&'a ApiKey, ApiError> {
    state.api_keys.get(id).ok_or_else(|| ApiError::not_found("key", id))
}

pub(super) async fn read(State(api): State<ApiState>, Path(id): Path<String>) -> Result<Json<KeyView>, ApiError> {
    let id = key_id(&id)?;
    let state = api.writer.projection().current();
    Ok(Json(view(api.writer.projection(), &id, lookup(&state, &id)?)))
}

pub(super) async fn revoke(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&id)?;
    let committed = api.writer.run(&ctx.origin(), now(), |_| Ok(Command::RevokeApiKey { key_id: id.clone() })).await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}
