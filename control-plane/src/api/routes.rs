//! Every route of the HTTP surface, declared once: method, path, the role it needs, its rate
//! class, its request and response types and its handler. The router (`super::router`), the
//! OpenAPI document (`super::openapi`) and the role and class checks (`guard`, run before the
//! handler) are all built from this one table, so none of them can drift from another.

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;
use sluice_events::{Policy, Role};

use super::auth::Principal;
use super::limits::Class;
use super::{ApiState, ClientIp};
use super::{
    antmedia, apps, console, decisions, events, keys, nodes, openapi, probes, sls, streams, subscribers, tokens,
};

/// Which part of the surface a route belongs to: its error envelope and where it is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/health`, `/ready`: outside the allow-list and the audit.
    Probe,
    /// `/v1/…`: problem+json errors.
    Native,
    /// SRT Live Server's `/api/…` and `/stats/…`, in its envelope.
    Sls,
    /// Ant Media's `/{app}/rest/v2/…`, in its envelope.
    AntMedia,
}

/// What a route asks of a request before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// The role needed; `None`: no credentials asked.
    pub role: Option<Role>,
    /// The rate-limit class; `None`: not limited (probes).
    pub class: Option<Class>,
}

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// One route.
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub guard: Guard,
    pub surface: Surface,
    pub tag: &'static str,
    pub summary: &'static str,
    /// The status of a success.
    pub status: u16,
    pub request: Option<SchemaFn>,
    pub response: Option<SchemaFn>,
    /// The success's content type (`application/json` unless the route says otherwise).
    pub produces: &'static str,
    /// Whether the request body may be left out (Ant Media's create takes none).
    pub body_optional: bool,
    handler: MethodRouter<ApiState>,
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// A type in the document, or none for `()`.
fn doc<T: JsonSchema>() -> Option<SchemaFn> {
    (std::any::type_name::<T>() != "()").then_some(schema::<T> as SchemaFn)
}

impl Route {
    /// `handler` serves `method` on `path`, which needs `role` and counts against `class`.
    #[allow(clippy::too_many_arguments)]
    fn new<Req: JsonSchema, Res: JsonSchema, H: Handler<T, ApiState>, T: 'static>(
        method: Method,
        path: &'static str,
        role: Option<Role>,
        class: Option<Class>,
        (surface, tag): (Surface, &'static str),
        summary: &'static str,
        status: u16,
        handler: H,
    ) -> Route {
        let filter = MethodFilter::try_from(method.clone()).unwrap_or(MethodFilter::GET);
        Route {
            method,
            path,
            guard: Guard { role, class },
            surface,
            tag,
            summary,
            status,
            request: doc::<Req>(),
            response: doc::<Res>(),
            produces: "application/json",
            body_optional: false,
            handler: on(filter, handler),
        }
    }

    /// A success that is not JSON (Prometheus text, Server-Sent Events).
    fn produces(mut self, content_type: &'static str) -> Route {
        self.produces = content_type;
        self
    }

    /// A request body that may be left out.
    fn body_optional(mut self) -> Route {
        self.body_optional = true;
        self
    }

    /// The handler behind its guard.
    pub fn service(&self, api: &ApiState) -> MethodRouter<ApiState> {
        self.handler.clone().route_layer(middleware::from_fn_with_state((api.clone(), self.guard), guard))
    }
}

/// Runs before every handler: the route's rate limit, then its role. An authenticated
/// principal is kept in the request for the handler's `Ctx`.
pub async fn guard(State((api, guard)): State<(ApiState, Guard)>, req: Request, next: Next) -> Response {
    if let Some(class) = guard.class
        && let Err(wait) = api.limiters.check(class, ClientIp::of_request(&req))
    {
        return super::error::ApiError::RateLimited(wait).into_response();
    }
    let Some(role) = guard.role else { return next.run(req).await };
    let (mut parts, body) = req.into_parts();
    let principal =
        match <Principal as axum::extract::FromRequestParts<ApiState>>::from_request_parts(&mut parts, &api).await {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
    if let Err(e) = principal.require(role) {
        return e.into_response();
    }
    parts.extensions.insert(principal);
    next.run(Request::from_parts(parts, body)).await
}

/// The whole surface, a row per route.
#[rustfmt::skip]
pub fn table() -> Vec<Route> {
    use Method as M;
    let (admin, write, read, public) = (Some(Role::Admin), Some(Role::Write), Some(Role::Read), None);
    let (api, stats, config) = (Some(Class::Api), Some(Class::Stats), Some(Class::Config));
    let probe = |tag| (Surface::Probe, tag);
    let v1 = |tag| (Surface::Native, tag);
    let sls_ = (Surface::Sls, "sls");
    let ams = (Surface::AntMedia, "antmedia");
    vec![
        Route::new::<(), Value, _, _>(M::GET, "/health", public, None, probe("probes"), "Liveness (SRT Live Server's shape)", 200, probes::health),
        Route::new::<(), Value, _, _>(M::GET, "/ready", public, None, probe("probes"), "Postgres reachable, projection caught up, relay and log agree", 200, probes::ready),
        Route::new::<(), String, _, _>(M::GET, "/metrics", public, None, probe("probes"), "Prometheus metrics (OpenMetrics text): API, log, relay, ingest, nodes, process; with SLUICE_METRICS_TOKEN, a bearer token", 200, probes::metrics).produces("application/openmetrics-text"),
        // The console's session (`/console` serves the page).
        Route::new::<console::SignIn, console::Session, _, _>(M::POST, "/console/session", public, config, v1("console"), "Sign in to the console: an API key or JWT, or the static admin; answers a session cookie and its CSRF token", 201, console::sign_in),
        Route::new::<(), console::Session, _, _>(M::GET, "/console/session", read, api, v1("console"), "The console session's subject, role and CSRF token", 200, console::current),
        Route::new::<(), (), _, _>(M::DELETE, "/console/session", public, config, v1("console"), "Sign out of the console (the cookie is cleared)", 204, console::sign_out),
        Route::new::<console::QrRequest, String, _, _>(M::POST, "/console/qr", read, api, v1("console"), "A QR code (SVG) of a TOTP provisioning URI", 200, console::qr).produces("image/svg+xml"),
        Route::new::<(), Value, _, _>(M::GET, "/v1/openapi.json", public, stats, v1("meta"), "This document", 200, openapi::serve),
        // Keys (admin, configuration).
        Route::new::<keys::CreateKey, keys::CreatedKey, _, _>(M::POST, "/v1/keys", admin, config, v1("keys"), "Create an API key (secret returned once)", 201, keys::create),
        Route::new::<(), keys::KeyList, _, _>(M::GET, "/v1/keys", admin, config, v1("keys"), "List API keys", 200, keys::list),
        Route::new::<(), keys::KeyView, _, _>(M::GET, "/v1/keys/{id}", admin, config, v1("keys"), "Get an API key", 200, keys::read),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/keys/{id}", admin, config, v1("keys"), "Revoke an API key", 204, keys::revoke),
        Route::new::<(), keys::JwksRefreshed, _, _>(M::POST, "/v1/auth/jwks/refresh", admin, config, v1("keys"), "Refetch the API JWKS now", 200, keys::refresh_jwks),
        // Apps.
        Route::new::<apps::CreateApp, apps::AppView, _, _>(M::POST, "/v1/apps", write, api, v1("apps"), "Create an app (a `policy` other than the default needs admin)", 201, apps::create),
        Route::new::<(), apps::AppList, _, _>(M::GET, "/v1/apps", read, api, v1("apps"), "List apps", 200, apps::list),
        Route::new::<(), apps::AppView, _, _>(M::GET, "/v1/apps/{app}", read, api, v1("apps"), "Get an app", 200, apps::read),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/apps/{app}", admin, config, v1("apps"), "Delete an app (its tokens go with it)", 204, apps::delete),
        Route::new::<(), Policy, _, _>(M::GET, "/v1/apps/{app}/policy", read, api, v1("apps"), "Get the publish/play policy", 200, apps::read_policy),
        Route::new::<super::policy::PolicyBody, Policy, _, _>(M::PUT, "/v1/apps/{app}/policy", admin, config, v1("apps"), "Replace the policy", 200, apps::replace_policy),
        Route::new::<apps::RotateSecret, apps::RotatedSecret, _, _>(M::POST, "/v1/apps/{app}/secrets/{kind}", admin, config, v1("apps"), "Rotate the hash, jwt, webhook or srt_passphrase secret (returned once)", 200, apps::rotate),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/apps/{app}/secrets/{kind}", admin, config, v1("apps"), "Remove the secret (its methods refuse; without an SRT passphrase callers must not encrypt)", 204, apps::remove_secret),
        // Streams, tokens, subscribers.
        Route::new::<streams::RegisterStream, streams::StreamView, _, _>(M::POST, "/v1/apps/{app}/streams", write, api, v1("streams"), "Register a stream", 201, streams::register),
        Route::new::<(), streams::StreamPage, _, _>(M::GET, "/v1/apps/{app}/streams", read, api, v1("streams"), "List streams (cursor: after, limit)", 200, streams::list),
        Route::new::<(), streams::StreamView, _, _>(M::GET, "/v1/apps/{app}/streams/{name}", read, api, v1("streams"), "Get a stream", 200, streams::read),
        Route::new::<streams::UpdateStream, streams::StreamView, _, _>(M::PATCH, "/v1/apps/{app}/streams/{name}", write, api, v1("streams"), "Update a stream (absent keeps, null clears)", 200, streams::update),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/apps/{app}/streams/{name}", write, api, v1("streams"), "Delete a stream", 204, streams::delete),
        Route::new::<streams::Kick, streams::Kicked, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/kick", write, api, v1("streams"), "End the stream's live sessions on every worker (of one action, from one address, when given); new attempts are decided as usual", 202, streams::kick),
        Route::new::<tokens::IssueToken, tokens::IssuedToken, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/tokens", write, api, v1("tokens"), "Issue a one-time token (returned once)", 201, tokens::issue),
        Route::new::<(), tokens::TokenList, _, _>(M::GET, "/v1/apps/{app}/streams/{name}/tokens", write, api, v1("tokens"), "List a stream's tokens", 200, tokens::list),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/apps/{app}/streams/{name}/tokens/{id}", write, api, v1("tokens"), "Revoke a token", 204, tokens::revoke),
        Route::new::<tokens::MintJwt, tokens::MintedJwt, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/jwt", write, api, v1("tokens"), "Mint a stream JWT (HS256, the app's JWT secret)", 200, tokens::mint_jwt),
        Route::new::<tokens::HashRequest, tokens::HashToken, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/hash", write, api, v1("tokens"), "Compute the hash or HMAC token a client should use", 200, tokens::hash_token),
        Route::new::<subscribers::AddSubscriber, subscribers::AddedSubscriber, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/subscribers", write, api, v1("subscribers"), "Add a TOTP subscriber (secret returned once)", 201, subscribers::add),
        Route::new::<(), subscribers::SubscriberList, _, _>(M::GET, "/v1/apps/{app}/streams/{name}/subscribers", write, api, v1("subscribers"), "List subscribers", 200, subscribers::list),
        Route::new::<(), (), _, _>(M::DELETE, "/v1/apps/{app}/streams/{name}/subscribers/{id}", write, api, v1("subscribers"), "Remove a subscriber", 204, subscribers::remove),
        Route::new::<subscribers::Block, subscribers::SubscriberView, _, _>(M::POST, "/v1/apps/{app}/streams/{name}/subscribers/{id}/block", write, api, v1("subscribers"), "Block a subscriber for N seconds", 200, subscribers::block),
        // The log, decisions, workers.
        Route::new::<(), events::LogView, _, _>(M::GET, "/v1/log", read, stats, v1("events"), "The log's head and its newest signed anchor", 200, events::log),
        Route::new::<(), events::EventPage, _, _>(M::GET, "/v1/events", admin, api, v1("events"), "Read the log (after, limit)", 200, events::page),
        Route::new::<(), Value, _, _>(M::GET, "/v1/events/stream", admin, api, v1("events"), "Tail the log as Server-Sent Events", 200, events::tail).produces("text/event-stream"),
        Route::new::<(), Value, _, _>(M::GET, "/v1/decisions/stream", read, api, v1("decisions"), "Tail new decisions as Server-Sent Events (the filters of /v1/decisions but cursor and format)", 200, decisions::tail).produces("text/event-stream"),
        Route::new::<(), decisions::DecisionPage, _, _>(M::GET, "/v1/decisions", read, api, v1("decisions"), "Audit: decisions newest first; filters app, stream, subject, ip (or CIDR), outcome, reason, since, until, node; cursor; format json|ndjson|csv", 200, decisions::list),
        Route::new::<(), Value, _, _>(M::GET, "/v1/decisions/{id}", read, api, v1("decisions"), "One decision as recorded", 200, decisions::one),
        Route::new::<(), crate::decisions::Explanation, _, _>(M::GET, "/v1/decisions/{id}/explain", read, api, v1("decisions"), "Rebuild the state the decision was made on and run decide again", 200, decisions::explain),
        Route::new::<(), crate::nodes::NodeList, _, _>(M::GET, "/v1/nodes", read, stats, v1("nodes"), "Workers: applied position, lag, state digest match, last heartbeat", 200, nodes::list),
        Route::new::<(), nodes::LiveStreams, _, _>(M::GET, "/v1/stats/streams", read, stats, v1("nodes"), "Every live stream on every worker heard from recently", 200, nodes::live_streams),
        Route::new::<(), nodes::StreamStats, _, _>(M::GET, "/v1/stats/streams/{app}/{stream}", read, stats, v1("nodes"), "A live stream's figures from the workers: bytes, bitrate (1 s, 10 s), players, drops, uptime", 200, nodes::stream_stats),
        // SRT Live Server.
        Route::new::<(), Value, _, _>(M::GET, "/api/stream-ids", read, api, sls_, "SRT Live Server: list stream ids", 200, sls::list),
        Route::new::<sls::StreamId, Value, _, _>(M::POST, "/api/stream-ids", write, api, sls_, "SRT Live Server: add a stream id", 200, sls::add),
        Route::new::<(), Value, _, _>(M::DELETE, "/api/stream-ids/{player_id}", admin, api, sls_, "SRT Live Server: delete a stream id", 200, sls::remove),
        Route::new::<sls::NewKey, Value, _, _>(M::POST, "/api/keys", admin, config, sls_, "SRT Live Server: create an API key", 200, sls::new_key),
        Route::new::<(), Value, _, _>(M::GET, "/stats/{player_id}", public, stats, sls_, "SRT Live Server: publisher statistics (reset, legacy=1)", 200, sls::stats),
        // Ant Media.
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/token", write, api, ams, "Ant Media: one-time token (expireDate, type)", 200, antmedia::token),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/jwt-token", write, api, ams, "Ant Media: JWT token (expireDate, type)", 200, antmedia::jwt_token),
        Route::new::<antmedia::AmsSubscriber, Value, _, _>(M::POST, "/{app}/rest/v2/broadcasts/{stream}/subscribers", write, api, ams, "Ant Media: add a TOTP subscriber", 200, antmedia::add),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/subscribers/list/{offset}/{size}", write, api, ams, "Ant Media: list subscribers", 200, antmedia::list),
        Route::new::<(), Value, _, _>(M::DELETE, "/{app}/rest/v2/broadcasts/{stream}/subscribers/{id}", write, api, ams, "Ant Media: remove a subscriber", 200, antmedia::remove),
        Route::new::<Value, Value, _, _>(M::POST, "/{app}/rest/v2/broadcasts/create", write, api, ams, "Ant Media: create a broadcast (register a stream)", 200, antmedia::create_broadcast).body_optional(),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}", read, api, ams, "Ant Media: a broadcast (a registered stream and its live figures); 404 without a body", 200, antmedia::get_broadcast),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/list/{offset}/{size}", read, api, ams, "Ant Media: list broadcasts (at most 50)", 200, antmedia::list_broadcasts),
        Route::new::<(), Value, _, _>(M::DELETE, "/{app}/rest/v2/broadcasts/{stream}", write, api, ams, "Ant Media: delete a broadcast (unregister the stream)", 200, antmedia::delete_broadcast),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/tokens/list/{offset}/{size}", write, api, ams, "Ant Media: a stream's unused tokens (tokenId is Sluice's token id)", 200, antmedia::list_tokens),
        Route::new::<(), Value, _, _>(M::DELETE, "/{app}/rest/v2/broadcasts/{stream}/tokens", write, api, ams, "Ant Media: revoke a stream's tokens", 200, antmedia::revoke_tokens),
        Route::new::<antmedia::AmsTokenBody, Value, _, _>(M::POST, "/{app}/rest/v2/broadcasts/validate-token", write, api, ams, "Ant Media: is this token unused and valid (checked, not consumed)", 200, antmedia::validate_token),
        Route::new::<(), Value, _, _>(M::DELETE, "/{app}/rest/v2/broadcasts/{stream}/subscribers", write, api, ams, "Ant Media: remove every subscriber of a stream", 200, antmedia::revoke_subscribers),
        Route::new::<(), Value, _, _>(M::PUT, "/{app}/rest/v2/broadcasts/{stream}/subscribers/{id}/block/{seconds}/{type}", write, api, ams, "Ant Media: block a subscriber (publish, play or publish_play; 0 s unblocks)", 200, antmedia::block),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/subscribers/{id}/totp", write, api, ams, "Ant Media: the subscriber's current TOTP code (dataId)", 200, antmedia::totp),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/connection-events/{offset}/{size}", read, api, ams, "Ant Media: TOTP subscribers' admissions, oldest first (subscriberId filters)", 200, antmedia::list_connection_events),
        Route::new::<(), Value, _, _>(M::GET, "/{app}/rest/v2/broadcasts/{stream}/subscriber-stats/list/{offset}/{size}", read, api, ams, "Ant Media (before 3.0): per subscriber, its connection events", 200, antmedia::list_subscriber_stats),
    ]
}
