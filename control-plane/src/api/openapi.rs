//! The OpenAPI 3.1 document, generated from the route table (`routes::table`), with
//! request and response schemas from the same Rust types the handlers use (via schemars,
//! whose JSON Schema 2020-12 is OpenAPI 3.1's dialect; the event schemas come from it too).
//! Served at `/v1/openapi.json`; `schemas/openapi.json` holds a copy and a test fails when
//! they drift, and another when a documented route is not served.

use axum::Json;
use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Map, Value, json};
use sluice_events::Role;

use super::limits::Class;
use super::routes;

/// Serves the document.
pub(super) async fn serve() -> Json<Value> {
    Json(document())
}

/// One documented operation.
#[derive(Debug)]
pub struct Op {
    pub method: String,
    pub path: &'static str,
    pub summary: &'static str,
    /// The role needed; `None` for unauthenticated routes.
    pub role: Option<&'static str>,
    pub class: &'static str,
    pub tag: &'static str,
    request: Option<Schema>,
    status: u16,
    response: Option<Schema>,
    produces: &'static str,
    body_optional: bool,
    /// SLS and Ant Media routes answer errors in their own JSON envelopes.
    envelope: bool,
}

/// Every route of the surface, documented from the route table.
pub fn operations(g: &mut SchemaGenerator) -> Vec<Op> {
    routes::table()
        .into_iter()
        .map(|r| Op {
            method: r.method.as_str().to_ascii_lowercase(),
            path: r.path,
            summary: r.summary,
            role: r.guard.role.map(Role::as_str),
            class: r.guard.class.map_or("none", Class::as_str),
            tag: r.tag,
            request: r.request.map(|f| f(g)),
            status: r.status,
            response: r.response.map(|f| f(g)),
            produces: r.produces,
            body_optional: r.body_optional,
            envelope: matches!(r.surface, routes::Surface::Sls | routes::Surface::AntMedia),
        })
        .collect()
}

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// An error in a compatibility envelope: SLS `{"status":"error","message"}`, Ant Media
/// `{"success":false,"message",…}`.
fn envelope(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"type": "object"}}}})
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
            Some(_) if op.produces == "text/event-stream" => {
                // Each Server-Sent Event: `id` (the position), `event` (the type), `data` (the
                // event as JSON text).
                let event = json!({"type": "object", "properties": {
                    "id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}}});
                json!({"description": "success", "content": {op.produces: {"schema": event}}})
            }
            Some(_) if op.produces != "application/json" => {
                json!({"description": "success", "content": {op.produces: {"schema": {"type": "string"}}}})
            }
            Some(schema) => json!({"description": "success", "content": {"application/json": {"schema": schema}}}),
            None => json!({"description": "success"}),
        };
        responses.insert(op.status.to_string(), ok);
        let problem = if op.envelope { envelope } else { problem };
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
            operation["requestBody"] =
                json!({"required": !op.body_optional, "content": {"application/json": {"schema": schema}}});
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method.as_str()] = operation;
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
