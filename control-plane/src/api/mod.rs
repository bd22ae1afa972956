//! The REST API (DESIGN.md §8): the native routes under `/v1`, the SRT Live Server and Ant
//! Media compatibility routes, and the layers every request passes: IP allow-list, audit,
//! per-class rate limits, body size limit, timeout, CORS and CSP. Each resource module
//! exposes a `router()`; `router()` here assembles them.

pub mod antmedia;
pub mod apps;
pub mod audit;
pub mod auth;
pub mod body;
pub mod compat;
pub mod console;
pub mod decisions;
pub mod error;
pub mod events;
pub mod keys;
pub mod limits;
pub mod nodes;
pub mod openapi;
pub mod policy;
pub mod probes;
pub mod proxy;
pub mod query;
pub mod routes;
pub mod sls;
pub mod streams;
pub mod subscribers;
pub mod tokens;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, middleware};
use rand::RngCore;
use serde::Serialize;
use sluice_events::{Keyring, SealingKey};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

use audit::AuditLog;
pub use audit::AuditSlot;
use auth::{Authenticator, Principal};
use error::ApiError;
use limits::Limiters;
use routes::Surface;

use crate::commands::{Committed, Origin, Writer};
use crate::config::{ApiSettings, Config};
use crate::store::EventStore;
use crate::task::Tasks;

/// Everything a handler needs, behind one `Arc`: every layer and route takes its own copy of
/// the state for each request, so a clone must cost one reference count, not the dozen
/// counts, allocations and the cancellation-token lock of copying the fields (a fifth of the
/// control plane's CPU on authenticated reads before).
#[derive(Debug, Clone)]
pub struct ApiState(Arc<ApiInner>);

impl std::ops::Deref for ApiState {
    type Target = ApiInner;
    fn deref(&self) -> &ApiInner {
        &self.0
    }
}

#[derive(Debug)]
pub struct ApiInner {
    pub writer: Writer,
    pub auth: Authenticator,
    pub limiters: Arc<Limiters>,
    pub audit: AuditLog,
    pub settings: Arc<ApiSettings>,
    pub sealing: Arc<SealingKey>,
    pub sls_app: sluice_events::AppName,
    pub http: reqwest::Client,
    /// Workers' heartbeats (filled by `nodes::Nodes::spawn_listener`).
    pub nodes: Arc<crate::nodes::Nodes>,
    /// SLS `/stats/{player_id}?reset=1`: the counters as they were at the last reset.
    pub sls_resets: Arc<sls::Resets>,
    /// The control plane's background tasks: the API's own, and those `serve` adds.
    pub tasks: Tasks,
    /// The relay's view of SLUICE_EVENTS against the log (for `/ready` and `/metrics`).
    pub relay_health: Arc<crate::relay::RelayHealth>,
    /// The apps' JWKS fetches (stream JWTs), kept fresh by `jwks::run`.
    pub jwks: Arc<crate::jwks::JwksStatus>,
    /// How long the projection has trailed the log (for `/ready`).
    pub lag: Arc<probes::LagWatch>,
    /// `SLUICE_WEBHOOK_ALLOWED` (webhook and JWKS URLs), replaced by a reload.
    pub webhook_allowed: Arc<arc_swap::ArcSwap<sluice_events::webhook::WebhookAllowList>>,
    /// The newest anchor of the log checked or signed here (`GET /v1/log`).
    pub anchor: crate::anchor::Latest,
    /// The console's session cookie is `Secure` (the API serves TLS).
    pub console_secure: bool,
}

impl ApiState {
    /// Wires the API to a running store and projection, and starts its background tasks
    /// (audit batching, limiter housekeeping, JWKS refresh).
    pub fn start(config: &Config, writer: Writer, sealing: SealingKey) -> ApiState {
        let tasks = Tasks::new();
        let settings = Arc::new(config.api.clone());
        let auth = Authenticator::new(&settings);
        auth.spawn_jwks_refresh(&tasks, Duration::from_secs(settings.jwt_jwks_refresh_secs.max(10)));
        let limiters = Limiters::new(settings.rate_api, settings.rate_stats, settings.rate_config);
        limiters.spawn_housekeeping(&tasks);
        let audit = AuditLog::start(&tasks, writer.store().clone(), config.instance_id.clone());
        let jwks = Arc::new(crate::jwks::JwksStatus::default());
        let webhook_allowed = Arc::new(arc_swap::ArcSwap::from_pointee(settings.webhook_allowed.clone()));
        tasks.spawn(
            "stream JWKS refresh",
            crate::jwks::run(
                writer.clone(),
                jwks.clone(),
                Duration::from_secs(config.jwks_refresh_secs.max(1)),
                Duration::from_secs(config.jwks_kid_refetch_secs.max(1)),
                webhook_allowed.clone(),
            ),
        );
        ApiState(Arc::new(ApiInner {
            writer,
            auth,
            limiters,
            audit,
            settings,
            sealing: Arc::new(sealing),
            sls_app: config.sls_app.clone(),
            http: reqwest::Client::new(),
            nodes: Arc::default(),
            relay_health: Arc::default(),
            jwks,
            lag: Arc::default(),
            webhook_allowed,
            console_secure: config.api_tls.is_some(),
            anchor: Arc::default(),
            sls_resets: Arc::default(),
            tasks,
        }))
    }
}

/// Starts store-backed pieces for a `Config` (used by `serve` and by the tests).
pub async fn build(config: &Config, store: EventStore) -> Result<(Router, ApiState), crate::store::StoreError> {
    let sealing =
        config.require_sealing_key().map_err(|e| crate::store::StoreError::InvalidAppend(e.to_string()))?.clone();
    let projection =
        crate::projection::Projection::start(&store, Some(Arc::new(Keyring::new(sealing.clone())))).await?;
    let writer = Writer::new(store, projection);
    let state = ApiState::start(config, writer, sealing);
    Ok((router(state.clone()), state))
}

pub use crate::clock::now;

/// Random bytes for secrets and nonces.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// The peer address of the connection (no forwarded headers are trusted).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    pub fn of(parts: &Parts) -> IpAddr {
        Self::from_extensions(&parts.extensions)
    }

    pub fn of_request(req: &Request) -> IpAddr {
        Self::from_extensions(req.extensions())
    }

    /// The client: the one a trusted proxy named (`proxy::real_client`), else the connection's
    /// peer (or the tests' `MockConnectInfo`); unknown is 0.0.0.0, which no default allow-list
    /// admits.
    fn from_extensions(ext: &axum::http::Extensions) -> IpAddr {
        if let Some(proxy::Forwarded(ip)) = ext.get::<proxy::Forwarded>() {
            return *ip;
        }
        Self::peer(ext)
    }

    /// The connection's peer, whatever the headers say.
    fn peer(ext: &axum::http::Extensions) -> IpAddr {
        if let Some(c) = ext.get::<ConnectInfo<SocketAddr>>() {
            return c.0.ip();
        }
        ext.get::<MockConnectInfo<SocketAddr>>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
    }
}

/// The caller of a native route: who, from where, with which idempotency key.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub principal: Principal,
    pub ip: IpAddr,
    pub idempotency_key: Option<String>,
    scope: String,
    request_digest: Option<sluice_events::Sha256Digest>,
}

impl Ctx {
    pub fn origin(&self) -> Origin {
        Origin {
            actor: self.principal.subject.clone(),
            client_ip: Some(self.ip),
            request_id: None,
            idempotency: self.idempotency_key.clone().map(|k| (self.scope.clone(), k)),
            request_digest: self.request_digest,
        }
    }

    pub fn require(&self, role: sluice_events::Role) -> Result<(), ApiError> {
        self.principal.require(role).map(|_| ())
    }
}

impl FromRequestParts<ApiState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &ApiState) -> Result<Ctx, ApiError> {
        let principal = Principal::from_request_parts(parts, api).await?;
        let idempotency_key = match parts.headers.get("idempotency-key") {
            None => None,
            Some(v) => {
                let k = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255 && k.is_ascii());
                Some(
                    k.ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1 to 255 ASCII characters".into()))?
                        .to_owned(),
                )
            }
        };
        Ok(Ctx {
            principal,
            ip: ClientIp::of(parts),
            idempotency_key,
            scope: format!("{} {}", parts.method, parts.uri.path()),
            request_digest: parts.extensions.get::<RequestDigest>().map(|d| d.0),
        })
    }
}

/// The digest of a request made with an `Idempotency-Key`: method, path and query, body.
#[derive(Debug, Clone, Copy)]
pub struct RequestDigest(pub sluice_events::Sha256Digest);

/// Digests the request when it carries an `Idempotency-Key`, so a reuse of the key with
/// another request can be told from a retry (the IETF idempotency-key draft's 422).
async fn digest_idempotent(
    axum::extract::State(api): axum::extract::State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !req.headers().contains_key("idempotency-key") {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, api.settings.max_body_bytes).await else {
        return ApiError::TooLarge.into_response();
    };
    let mut text = Vec::with_capacity(bytes.len() + 64);
    text.extend_from_slice(parts.method.as_str().as_bytes());
    text.push(b' ');
    text.extend_from_slice(parts.uri.path_and_query().map_or("", |p| p.as_str()).as_bytes());
    text.push(b'\n');
    text.extend_from_slice(&bytes);
    parts.extensions.insert(RequestDigest(sluice_events::Sha256Digest::of(&text)));
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// A response to a write: the status, the body, and the log position in `Sluice-Position`.
pub fn written<T: Serialize>(status: StatusCode, committed: Committed, body: Option<T>) -> Response {
    let mut response = match body {
        Some(b) => (status, Json(b)).into_response(),
        None => status.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert("sluice-position", HeaderValue::from(committed.position.0));
    if committed.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Axum answers a method a path does not serve with an empty 405: it becomes problem+json,
/// keeping its `Allow`.
async fn method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut problem = ApiError::MethodNotAllowed.into_response();
    if let Some(allow) = allow {
        problem.headers_mut().insert(header::ALLOW, allow);
    }
    problem
}

/// `/metrics` alone, for `SLUICE_METRICS_LISTEN`.
pub fn metrics_router(api: ApiState) -> Router {
    Router::new().route("/metrics", axum::routing::get(probes::metrics)).with_state(api)
}

/// The whole HTTP surface, built from the route table: each route behind its guard (rate
/// class, then role), grouped by surface for its error envelope.
pub fn router(api: ApiState) -> Router {
    let settings = api.settings.clone();
    let (mut probes, mut native, mut sls, mut ams) = (Router::new(), Router::new(), Router::new(), Router::new());
    // Checked by the settings (visible ASCII), so the fallback is never taken.
    let sls_origin = HeaderValue::from_str(&settings.sls_cors_origin).unwrap_or(HeaderValue::from_static("*"));
    for route in routes::table() {
        let group = match route.surface {
            Surface::Probe => &mut probes,
            Surface::Native => &mut native,
            Surface::Sls => &mut sls,
            Surface::AntMedia => &mut ams,
        };
        *group = std::mem::take(group).route(route.path, route.service(&api));
    }
    let api_routes = Router::new()
        .merge(native)
        .merge(sls.layer(middleware::from_fn_with_state(sls_origin, compat::sls_envelope)))
        .merge(ams.layer(middleware::from_fn(compat::antmedia_envelope)))
        .fallback(|| async { ApiError::NotFound { what: "route", id: "this path".into() } })
        .layer(middleware::from_fn_with_state(api.clone(), digest_idempotent))
        .layer(axum::middleware::map_response(method_not_allowed))
        .layer(middleware::from_fn_with_state(api.clone(), audit::record))
        .layer(middleware::from_fn_with_state(api.clone(), limits::allow_list));
    let mut app = Router::new()
        .merge(probes)
        .merge(console::assets())
        .merge(api_routes)
        .with_state(api)
        .layer(axum::extract::DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(settings.request_timeout_ms.max(100)),
        ))
        .layer(middleware::from_fn(crate::metrics::observe));
    if !settings.trusted_proxies.is_empty() {
        // Outermost: the allow-list, rate limits, key CIDRs and the audit all see the client.
        app = app.layer(middleware::from_fn_with_state(settings.trusted_proxies.clone(), proxy::real_client));
    }
    if let Some(csp) = settings.content_security_policy.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
        app = app.layer(SetResponseHeaderLayer::overriding(header::CONTENT_SECURITY_POLICY, csp));
    }
    if !settings.cors_allowed_origins.is_empty() {
        let origins = if settings.cors_allowed_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(settings.cors_allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::ACCEPT,
                    HeaderName::from_static("idempotency-key"),
                ])
                .expose_headers([HeaderName::from_static("sluice-position")]),
        );
    }
    app
}
