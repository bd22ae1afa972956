//! `/v1/apps`: apps, their publish/play policy, and secret rotation (returned once, sealed
//! in the log).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::state::App;
use sluice_events::webhook::url_host_port;
use sluice_events::{AppName, AuthState, Command, NewSecret, Policy, Role, SecretKind};

use super::body::{OptionalJson, StrictJson};
use super::error::ApiError;
use super::policy::PolicyBody;
use super::{ApiState, Ctx, now, random, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: AppName,
    /// Defaults to open publish and play with undefined streams accepted (a fresh SRS or Ant
    /// Media app). Giving one needs the admin role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyBody>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AppView {
    pub name: AppName,
    pub policy: Policy,
    pub streams: usize,
    /// Which secrets are set (never their values).
    pub secrets: Vec<SecretKind>,
    /// For a policy with `jwt.jwks_url`: the last fetch of its key set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<crate::jwks::JwksView>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct AppList {
    pub apps: Vec<AppView>,
}

#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// The new secret; 32 random bytes (base64url) are generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RotatedSecret {
    pub app: AppName,
    pub kind: SecretKind,
    /// Shown once; the log keeps it sealed.
    pub secret: String,
}

/// A policy's webhook must point where `SLUICE_WEBHOOK_ALLOWED` lets it: every address its host
/// resolves to now must be allowed. A name the control plane cannot resolve (split-horizon DNS)
/// is accepted: the worker checks again before each call, which is what protects its network.
async fn webhook_reachable(api: &ApiState, policy: &Policy) -> Result<(), ApiError> {
    let Some(w) = &policy.webhook else { return Ok(()) };
    let refused = |detail: String| ApiError::invalid("policy.webhook.url", detail);
    let (host, port) = url_host_port(&w.url).ok_or_else(|| refused("expected http(s)://host[:port]/…".into()))?;
    match crate::outbound::resolve_allowed(&host, port, &api.webhook_allowed.load_full()).await {
        Ok(_) => Ok(()),
        Err(crate::outbound::Refused::Unresolved) => {
            tracing::info!(host, "webhook host does not resolve here; the workers check it before each call");
            Ok(())
        }
        Err(e) => Err(refused(format!("{host} {e}"))),
    }
}

pub fn app_name(app: &str) -> Result<AppName, ApiError> {
    AppName::parse(app).map_err(|_| ApiError::not_found("app", app))
}

pub fn lookup<'a>(state: &'a AuthState, app: &AppName) -> Result<&'a App, ApiError> {
    state.apps.get(app).ok_or_else(|| ApiError::not_found("app", app))
}

fn view(api: &ApiState, name: &AppName, app: &App) -> AppView {
    let jwks = app.policy.jwt.jwks_url.as_ref().map(|url| {
        api.jwks
            .view(name)
            .filter(|v| &v.url == url)
            .unwrap_or_else(|| crate::jwks::JwksView { url: url.clone(), ..Default::default() })
    });
    AppView {
        name: name.clone(),
        policy: app.policy.clone(),
        streams: app.streams.len(),
        secrets: app.secrets.keys().copied().collect(),
        jwks,
    }
}

pub(super) async fn create(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<CreateApp>,
) -> Result<Response, ApiError> {
    // The one rule that depends on the body, not the route: choosing the policy is the policy's
    // role (admin, as `PUT …/policy`); a write key gets the default.
    if req.policy.is_some() {
        ctx.principal
            .require(Role::Admin)
            .map_err(|_| ApiError::Forbidden("setting an app's policy needs the admin role"))?;
    }
    let policy = req.policy.map(Policy::from).unwrap_or_default();
    webhook_reachable(&api, &policy).await?;
    let name = req.name;
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::CreateApp { app: name.clone(), policy: policy.clone() }))
        .await?;
    let state = api.writer.projection().current();
    Ok(written(StatusCode::CREATED, committed, Some(view(&api, &name, lookup(&state, &name)?))))
}

pub(super) async fn list(State(api): State<ApiState>) -> Result<Json<AppList>, ApiError> {
    let state = api.writer.projection().current();
    Ok(Json(AppList { apps: state.apps.iter().map(|(n, a)| view(&api, n, a)).collect() }))
}

pub(super) async fn read(State(api): State<ApiState>, Path(app): Path<String>) -> Result<Json<AppView>, ApiError> {
    let name = app_name(&app)?;
    let state = api.writer.projection().current();
    Ok(Json(view(&api, &name, lookup(&state, &name)?)))
}

pub(super) async fn delete(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(app): Path<String>,
) -> Result<Response, ApiError> {
    let name = app_name(&app)?;
    let committed = api.writer.run(&ctx.origin(), now(), |_| Ok(Command::DeleteApp { app: name.clone() })).await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}

pub(super) async fn read_policy(
    State(api): State<ApiState>,
    Path(app): Path<String>,
) -> Result<Json<Policy>, ApiError> {
    let name = app_name(&app)?;
    let state = api.writer.projection().current();
    Ok(Json(lookup(&state, &name)?.policy.clone()))
}

pub(super) async fn replace_policy(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(app): Path<String>,
    StrictJson(policy): StrictJson<PolicyBody>,
) -> Result<Response, ApiError> {
    let name = app_name(&app)?;
    let policy = Policy::from(policy);
    webhook_reachable(&api, &policy).await?;
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::SetPolicy { app: name.clone(), policy: policy.clone() }))
        .await?;
    let state = api.writer.projection().current();
    Ok(written(StatusCode::OK, committed, Some(lookup(&state, &name)?.policy.clone())))
}

fn secret_kind(kind: &str) -> Result<SecretKind, ApiError> {
    Ok(match kind {
        "hash" => SecretKind::Hash,
        "jwt" => SecretKind::Jwt,
        "webhook" => SecretKind::Webhook,
        "srt_passphrase" => SecretKind::SrtPassphrase,
        _ => return Err(ApiError::not_found("secret kind", kind)),
    })
}

/// `DELETE /v1/apps/{app}/secrets/{kind}`: the methods that need it refuse from now on
/// (`secret_unavailable`); without an SRT passphrase, the app's SRT callers must not encrypt.
pub(super) async fn remove_secret(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, kind)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let name = app_name(&app)?;
    let kind = secret_kind(&kind)?;
    let committed =
        api.writer.run(&ctx.origin(), now(), |_| Ok(Command::RemoveAppSecret { app: name.clone(), kind })).await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}

pub(super) async fn rotate(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, kind)): Path<(String, String)>,
    OptionalJson(body): OptionalJson<RotateSecret>,
) -> Result<Response, ApiError> {
    let name = app_name(&app)?;
    let kind = secret_kind(&kind)?;
    let secret = body
        .and_then(|b| b.secret)
        .unwrap_or_else(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<32>()));
    let sealed = NewSecret::for_app(&api.sealing, &name, kind, secret.as_bytes(), random::<24>());
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::RotateAppSecret { app: name.clone(), kind, secret: sealed.clone() }))
        .await?;
    let body = (!committed.replayed).then(|| RotatedSecret { app: name.clone(), kind, secret });
    Ok(written(StatusCode::OK, committed, body))
}
