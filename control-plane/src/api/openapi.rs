//! The OpenAPI 3.1 document, generated from the code: one table of operations below, with
//! request and response schemas from the same Rust types the handlers use (via schemars,
//! whose JSON Schema 2020-12 is OpenAPI 3.1's dialect; the event schemas come from it too).
//! Served at `/v1/openapi.json`; `schemas/openapi.json` holds a copy and a test fails when
//! they drift, and another when a documented route is not served.

use axum::routing::get;
use axum::{Json, Router};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};
use sluice_events::Policy;

use super::ApiState;
use super::{antmedia, apps, decisions, events, keys, nodes, sls, streams, subscribers, tokens};

pub fn router() -> Router<ApiState> {
    Router::new().route("/openapi.json", get(|| async { Json(document()) }))
}

/// One documented operation.
#[derive(Debug)]
pub struct Op {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// The role needed; `None` for unauthenticated routes.
    pub role: Option<&'static str>,
    pub class: &'static str,
    pub tag: &'static str,
    request: Option<Schema>,
    status: u16,
    response: Option<Schema>,
}

struct Table<'g> {
    g: &'g mut SchemaGenerator,
    ops: Vec<Op>,
}

impl Table<'_> {
    #[allow(clippy::too_many_arguments)]
    fn op<Req: JsonSchema, Res: JsonSchema>(
        &mut self,
        method: &'static str,
        path: &'static str,
        role: Option<&'static str>,
        class: &'static str,
        tag: &'static str,
        summary: &'static str,
        status: u16,
    ) -> &mut Self {
        let request = (std::any::type_name::<Req>() != "()").then(|| self.g.subschema_for::<Req>());
        let response = (std::any::type_name::<Res>() != "()").then(|| self.g.subschema_for::<Res>());
        self.ops.push(Op { method, path, summary, role, class, tag, request, status, response });
        self
    }
}

/// Every route of the API, documented.
pub fn operations(g: &mut SchemaGenerator) -> Vec<Op> {
    use Option::Some as R;
    let mut t = Table { g, ops: Vec::new() };
    let (admin, write, read) = (R("admin"), R("write"), R("read"));
    t.op::<(), Value>("get", "/health", None, "none", "probes", "Liveness (SRT Live Server's shape)", 200)
        .op::<(), Value>("get", "/ready", None, "none", "probes", "Postgres reachable and projection caught up", 200)
        .op::<(), Value>("get", "/v1/openapi.json", None, "stats", "meta", "This document", 200)
        .op::<keys::CreateKey, keys::CreatedKey>(
            "post",
            "/v1/keys",
            admin,
            "config",
            "keys",
            "Create an API key (secret returned once)",
            201,
        )
        .op::<(), keys::KeyList>("get", "/v1/keys", admin, "config", "keys", "List API keys", 200)
        .op::<(), keys::KeyView>("get", "/v1/keys/{id}", admin, "config", "keys", "Get an API key", 200)
        .op::<(), ()>("delete", "/v1/keys/{id}", admin, "config", "keys", "Revoke an API key", 204)
        .op::<(), keys::JwksRefreshed>(
            "post",
            "/v1/auth/jwks/refresh",
            admin,
            "config",
            "keys",
            "Refetch the API JWKS now",
            200,
        )
        .op::<apps::CreateApp, apps::AppView>("post", "/v1/apps", write, "api", "apps", "Create an app", 201)
        .op::<(), apps::AppList>("get", "/v1/apps", read, "api", "apps", "List apps", 200)
        .op::<(), apps::AppView>("get", "/v1/apps/{app}", read, "api", "apps", "Get an app", 200)
        .op::<(), ()>("delete", "/v1/apps/{app}", write, "api", "apps", "Delete an app", 204)
        .op::<(), Policy>("get", "/v1/apps/{app}/policy", read, "api", "apps", "Get the publish/play policy", 200)
        .op::<Policy, Policy>("put", "/v1/apps/{app}/policy", admin, "config", "apps", "Replace the policy", 200)
        .op::<apps::RotateSecret, apps::RotatedSecret>(
            "post",
            "/v1/apps/{app}/secrets/{kind}",
            admin,
            "config",
            "apps",
            "Rotate the hash, jwt, webhook or srt_passphrase secret (returned once)",
            200,
        )
        .op::<(), ()>(
            "delete",
            "/v1/apps/{app}/secrets/{kind}",
            admin,
            "config",
            "apps",
            "Remove the secret (its methods refuse; without an SRT passphrase callers must not encrypt)",
            204,
        )
        .op::<streams::RegisterStream, streams::StreamView>(
            "post",
            "/v1/apps/{app}/streams",
            write,
            "api",
            "streams",
            "Register a stream",
            201,
        )
        .op::<(), streams::StreamPage>(
            "get",
            "/v1/apps/{app}/streams",
            read,
            "api",
            "streams",
            "List streams (cursor: after, limit)",
            200,
        )
        .op::<(), streams::StreamView>(
            "get",
            "/v1/apps/{app}/streams/{name}",
            read,
            "api",
            "streams",
            "Get a stream",
            200,
        )
        .op::<streams::UpdateStream, streams::StreamView>(
            "patch",
            "/v1/apps/{app}/streams/{name}",
            write,
            "api",
            "streams",
            "Update a stream (absent keeps, null clears)",
            200,
        )
        .op::<(), ()>("delete", "/v1/apps/{app}/streams/{name}", write, "api", "streams", "Delete a stream", 204)
        .op::<tokens::IssueToken, tokens::IssuedToken>(
            "post",
            "/v1/apps/{app}/streams/{name}/tokens",
            write,
            "api",
            "tokens",
            "Issue a one-time token (returned once)",
            201,
        )
        .op::<(), tokens::TokenList>(
            "get",
            "/v1/apps/{app}/streams/{name}/tokens",
            write,
            "api",
            "tokens",
            "List a stream's tokens",
            200,
        )
        .op::<(), ()>(
            "delete",
            "/v1/apps/{app}/streams/{name}/tokens/{id}",
            write,
            "api",
            "tokens",
            "Revoke a token",
            204,
        )
        .op::<tokens::MintJwt, tokens::MintedJwt>(
            "post",
            "/v1/apps/{app}/streams/{name}/jwt",
            write,
            "api",
            "tokens",
            "Mint a stream JWT (HS256, the app's JWT secret)",
            200,
        )
        .op::<tokens::HashRequest, tokens::HashToken>(
            "post",
            "/v1/apps/{app}/streams/{name}/hash",
            write,
            "api",
            "tokens",
            "Compute the hash or HMAC token a client should use",
            200,
        )
        .op::<subscribers::AddSubscriber, subscribers::AddedSubscriber>(
            "post",
            "/v1/apps/{app}/streams/{name}/subscribers",
            write,
            "api",
            "subscribers",
            "Add a TOTP subscriber (secret returned once)",
            201,
        )
        .op::<(), subscribers::SubscriberList>(
            "get",
            "/v1/apps/{app}/streams/{name}/subscribers",
            write,
            "api",
            "subscribers",
            "List subscribers",
            200,
        )
        .op::<(), ()>(
            "delete",
            "/v1/apps/{app}/streams/{name}/subscribers/{id}",
            write,
            "api",
            "subscribers",
            "Remove a subscriber",
            204,
        )
        .op::<subscribers::Block, subscribers::SubscriberView>(
            "post",
            "/v1/apps/{app}/streams/{name}/subscribers/{id}/block",
            write,
            "api",
            "subscribers",
            "Block a subscriber for N seconds",
            200,
        )
        .op::<(), events::EventPage>("get", "/v1/events", admin, "api", "events", "Read the log (after, limit)", 200)
        .op::<(), Value>("get", "/v1/events/stream", admin, "api", "events", "Tail the log as Server-Sent Events", 200)
        .op::<(), decisions::DecisionPage>(
            "get",
            "/v1/decisions",
            read,
            "api",
            "decisions",
            "Audit: decisions newest first; filters app, stream, subject, ip (or CIDR), outcome, reason, since, until, node; cursor; format json|ndjson|csv",
            200,
        )
        .op::<(), Value>("get", "/v1/decisions/{id}", read, "api", "decisions", "One decision as recorded", 200)
        .op::<(), crate::decisions::Explanation>(
            "get",
            "/v1/decisions/{id}/explain",
            read,
            "api",
            "decisions",
            "Rebuild the state the decision was made on and run decide again",
            200,
        )
        .op::<(), crate::nodes::NodeList>(
            "get",
            "/v1/nodes",
            read,
            "stats",
            "nodes",
            "Workers: applied position, lag, state digest match, last heartbeat",
            200,
        )
        .op::<(), nodes::StreamStats>(
            "get",
            "/v1/stats/streams/{app}/{stream}",
            read,
            "stats",
            "nodes",
            "A live stream's figures from the workers: bytes, bitrate (1 s, 10 s), players, drops, uptime",
            200,
        )
        .op::<(), Value>("get", "/api/stream-ids", read, "api", "sls", "SRT Live Server: list stream ids", 200)
        .op::<sls::StreamId, Value>(
            "post",
            "/api/stream-ids",
            write,
            "api",
            "sls",
            "SRT Live Server: add a stream id",
            200,
        )
        .op::<(), Value>(
            "delete",
            "/api/stream-ids/{player_id}",
            admin,
            "api",
            "sls",
            "SRT Live Server: delete a stream id",
            200,
        )
        .op::<sls::NewKey, Value>(
            "post",
            "/api/keys",
            admin,
            "config",
            "sls",
            "SRT Live Server: create an API key",
            200,
        )
        .op::<(), Value>(
            "get",
            "/stats/{player_id}",
            None,
            "stats",
            "sls",
            "SRT Live Server: publisher statistics (reset, legacy=1)",
            200,
        )
        .op::<(), Value>(
            "get",
            "/{app}/rest/v2/broadcasts/{stream}/token",
            write,
            "api",
            "antmedia",
            "Ant Media: one-time token (expireDate, type)",
            200,
        )
        .op::<(), Value>(
            "get",
            "/{app}/rest/v2/broadcasts/{stream}/jwt-token",
            write,
            "api",
            "antmedia",
            "Ant Media: JWT token (expireDate, type)",
            200,
        )
        .op::<antmedia::AmsSubscriber, Value>(
            "post",
            "/{app}/rest/v2/broadcasts/{stream}/subscribers",
            write,
            "api",
            "antmedia",
            "Ant Media: add a TOTP subscriber",
            200,
        )
        .op::<(), Value>(
            "get",
            "/{app}/rest/v2/broadcasts/{stream}/subscribers/list/{offset}/{size}",
            write,
            "api",
            "antmedia",
            "Ant Media: list subscribers",
            200,
        )
        .op::<(), Value>(
            "delete",
            "/{app}/rest/v2/broadcasts/{stream}/subscribers/{id}",
            write,
            "api",
            "antmedia",
            "Ant Media: remove a subscriber",
            200,
        )
        .op::<Value, Value>(
            "post",
            "/{app}/rest/v2/broadcasts/create",
            write,
            "api",
            "antmedia",
            "Ant Media: create a broadcast (register a stream)",
            200,
        );
    t.ops
}

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// The whole document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    settings.meta_schema = None;
    let mut g = settings.into_generator();
    let ops = operations(&mut g);
    let mut paths: Map<String, Value> = Map::new();
    for op in &ops {
        let params: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut responses = Map::new();
        let ok = match &op.response {
            Some(schema) => json!({"description": "success", "content": {"application/json": {"schema": schema}}}),
            None => json!({"description": "success"}),
        };
        responses.insert(op.status.to_string(), ok);
        if op.role.is_some() {
            responses.insert("401".into(), problem("missing or invalid credentials"));
            responses.insert("403".into(), problem("role or address not allowed"));
        }
        responses.insert("429".into(), problem("rate limit exceeded (see Retry-After)"));
        if op.method != "get" {
            responses.insert("400".into(), problem("invalid request"));
            responses.insert("409".into(), problem("conflict"));
            responses.insert("503".into(), problem("the log is unavailable; nothing was written"));
        }
        let mut operation = json!({
            "summary": op.summary,
            "tags": [op.tag],
            "operationId": format!("{}_{}", op.method, op.path.trim_start_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": params,
            "responses": responses,
            "x-sluice-rate-class": op.class,
        });
        match op.role {
            Some(role) => {
                operation["security"] = json!([{"apiKey": []}, {"basic": []}, {"jwt": []}]);
                operation["x-sluice-role"] = json!(role);
            }
            None => operation["security"] = json!([]),
        }
        if let Some(schema) = &op.request {
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema}}});
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    let mut schemas = g.take_definitions(true);
    schemas.insert(
        "Problem".into(),
        json!({
            "type": "object",
            "description": "RFC 9457 problem details",
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"}
            },
            "required": ["type", "title", "status", "detail"]
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Sluice control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Who may publish and play live media: keys, apps, policies, streams, tokens, subscribers, the log. Errors are application/problem+json. Writes answer with the log position in `Sluice-Position`; POSTs accept `Idempotency-Key`."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key secret"},
                "basic": {"type": "http", "scheme": "basic", "description": "key_id:secret, or the static admin user"},
                "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        }
    })
}

/// The committed text of `schemas/openapi.json`.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}
