//! The worker's admin port, in two parts (issue #16):
//! - probes and metrics, open: `/health` (alive), `/ready` (503 until it has a state to decide
//!   from, then 200 even when NATS or the control plane is gone: Kong's hybrid-mode rule) and
//!   `/metrics`. `SLUICE_PROBE_LISTEN` serves these alone on a second listener, the one to
//!   expose to a kubelet or a Prometheus;
//! - the node API, only with the node credential (`Authorization: Bearer <node secret>`,
//!   compared in constant time; 401 otherwise): `POST /v1/decide` (the same path as an RTMP
//!   or SRT connection, spool and all: it can spend a one-time token), `/state` (position,
//!   tables position, access digest), `/wait` and `/spool`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use sluice_events::secret::SecretString;
use sluice_events::{AccessRequest, Action, Protocol, wire};

use crate::decide::{DecideError, Decider};
use crate::sync::Shared;

/// Largest `POST /v1/decide` body.
const MAX_DECIDE_BODY: usize = 8 * 1024;

/// The bearer token `/metrics` asks for (`SLUICE_METRICS_TOKEN`), if any.
pub type MetricsToken = Option<Arc<SecretString>>;

/// Probes and metrics: what may be reached without a credential (`/metrics` with the metrics
/// token when one is set).
pub fn probes(shared: Arc<Shared>, decider: Arc<Decider>, token: MetricsToken) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok", "service": "sluice-dataplane"})) }))
        .route("/ready", get(ready))
        .with_state(shared)
        .merge(metrics_only(decider, token))
}

/// `/metrics` alone (`SLUICE_METRICS_LISTEN`).
pub fn metrics_only(decider: Arc<Decider>, token: MetricsToken) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(decider)
        .layer(middleware::from_fn_with_state(token, metrics_auth))
}

/// Refuses a scrape without the metrics token, when one is set.
async fn metrics_auth(State(token): State<MetricsToken>, req: Request, next: Next) -> Response {
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if sluice_events::metrics::bearer_allows(token.as_deref(), header) {
        return next.run(req).await;
    }
    let body =
        json!({"error": "unauthorized", "detail": "metrics need `Authorization: Bearer <SLUICE_METRICS_TOKEN>`"});
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response()
}

/// The admin port: the probes, and the node API behind the node credential.
pub fn router(
    shared: Arc<Shared>,
    decider: Arc<Decider>,
    node_secret: Arc<SecretString>,
    token: MetricsToken,
) -> Router {
    let node = Router::new()
        .route("/state", get(state))
        .route("/wait", get(wait))
        .with_state(shared.clone())
        .merge(
            Router::new()
                .route("/v1/decide", post(decide))
                .route("/spool", get(spool))
                .layer(DefaultBodyLimit::max(MAX_DECIDE_BODY))
                .with_state(decider.clone()),
        )
        .layer(middleware::from_fn_with_state(node_secret, node_only));
    probes(shared, decider, token).merge(node)
}

/// Refuses a node-API request without the node credential.
async fn node_only(State(secret): State<Arc<SecretString>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if sluice_events::secret::ct_eq(presented.as_bytes(), secret.expose().as_bytes()) {
        return next.run(req).await;
    }
    let body = json!({
        "error": "unauthorized",
        "detail": "the node API needs `Authorization: Bearer <node secret>` (SLUICE_NODE_SECRET)",
    });
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response()
}

/// `POST /v1/decide`: either an RTMP-style target (`app`, `stream` with its query, `action`)
/// or an SRT `streamid`; plus the client's IP.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    streamid: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    client_ip: std::net::IpAddr,
}

fn bad(detail: impl std::fmt::Display) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({"error": "bad_request", "detail": detail.to_string()})))
}

fn parse_decide(body: &[u8], decider: &Decider) -> Result<AccessRequest, String> {
    let b: DecideBody = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    // Time-ordered, as every decision id (it becomes an event id in the log).
    let id = uuid::Uuid::now_v7();
    if let Some(sid) = &b.streamid {
        if b.app.is_some() || b.stream.is_some() {
            return Err("give either `streamid` or `app` and `stream`, not both".into());
        }
        let state = decider.shared.state.load();
        let req = crate::srt::access_request(sid.as_bytes(), b.client_ip, &state, &decider.sls_app)
            .map_err(|e| format!("streamid: {e}"))?;
        if let Some(a) = &b.action
            && Action::parse(a).map_err(|e| e.to_string())? != req.action
        {
            return Err("`action` disagrees with the streamid's mode".into());
        }
        return Ok(AccessRequest { id, ..req });
    }
    let (Some(app), Some(stream)) = (&b.app, &b.stream) else {
        return Err("missing `app` and `stream` (or `streamid`)".into());
    };
    let action =
        Action::parse(b.action.as_deref().ok_or("missing `action` (publish or play)")?).map_err(|e| e.to_string())?;
    let protocol = match &b.protocol {
        Some(p) => Protocol::parse(p).map_err(|e| e.to_string())?,
        None => Protocol::Rtmp,
    };
    let target = wire::parse_rtmp(app, stream).map_err(|e| format!("stream: {e}"))?;
    Ok(AccessRequest {
        id,
        app: target.app,
        stream: target.stream,
        action,
        protocol,
        client_ip: b.client_ip,
        credential: target.credential,
        client_id: None,
    })
}

/// Media, decisions, sessions, connections, limits, state and spool (OpenMetrics text).
async fn metrics(State(d): State<Arc<Decider>>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let counter = |v: u64| vec![(Vec::new(), v as f64)];
    let mut extra = sluice_events::metrics::Snapshot::default();
    extra
        .gauge("sluice_sessions", "Live sessions (publishers and players).", d.sessions.len() as f64)
        .gauge("sluice_connections", "Open media connections.", d.gate.connections() as f64)
        .gauge("sluice_state_position", "Log position of the applied state.", d.shared.position().0 as f64)
        .gauge(
            "sluice_ready",
            "1 when the worker has a state to decide from.",
            f64::from(u8::from(d.shared.is_ready())),
        )
        .gauge(
            "sluice_draining",
            "1 while the worker drains (SIGTERM): no new sessions.",
            f64::from(u8::from(*d.shared.draining.borrow())),
        )
        .gauge("sluice_decisions_pending", "Decisions in the spool not yet in the log.", d.spool.backlog() as f64)
        .counters(
            "sluice_limit_refusals",
            "Connections closed at accept by SLUICE_MAX_CONNECTIONS (limit=\"total\") or SLUICE_MAX_CONNECTIONS_PER_IP \
             (limit=\"per_ip\"); attempts in the penalty box are decisions with reason rate_limited.",
            d.gate.refusals().into_iter().map(|(limit, n)| (vec![("limit", limit.to_owned())], n as f64)).collect(),
        )
        .counters(
            "sluice_one_time_conflicts",
            "One-time tokens admitted here offline (allow_local) that another worker had also admitted.",
            counter(d.guard.conflicts.load(Ordering::Relaxed)),
        )
        .counters(
            "sluice_refusals_coalesced",
            "Refusals held and recorded as part of one record with a count (SLUICE_REFUSAL_WINDOW_MS).",
            counter(d.refusals.held.load(Ordering::Relaxed)),
        )
        .counters(
            "sluice_events_skipped",
            "Events of a type or schema version this worker does not know (a newer control plane), skipped.",
            counter(crate::sync::SKIPPED_EVENTS.load(Ordering::Relaxed)),
        )
        .counters(
            "sluice_snapshot_catch_ups",
            "Times the event feed caught up from the newest snapshot because events it needed had aged out of SLUICE_EVENTS.",
            counter(crate::sync::SNAPSHOT_CATCH_UPS.load(Ordering::Relaxed)),
        )
        .counters(
            "sluice_srt_refused_datagrams",
            "SRT datagrams the listener refused (unparseable, or failing their session); logged at most once per 10 s.",
            counter(srt_protocol::listener::REFUSED_DATAGRAMS.load(Ordering::Relaxed)),
        );
    ([(axum::http::header::CONTENT_TYPE, sluice_events::metrics::CONTENT_TYPE)], d.stats.render(extra))
}

/// The decision spool: durable, confirmed (in the log), waiting.
async fn spool(State(decider): State<Arc<Decider>>) -> Json<Value> {
    let s = &decider.spool;
    Json(json!({"id": s.id(), "durable": s.durable(), "confirmed": s.confirmed(), "backlog": s.backlog()}))
}

/// 200 allowed, 403 denied (nginx-rtmp's `on_publish` convention), 400 bad input, 503 when
/// the worker cannot decide or cannot record the decision.
async fn decide(State(decider): State<Arc<Decider>>, body: axum::body::Bytes) -> (StatusCode, Json<Value>) {
    let req = match parse_decide(&body, &decider) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    match decider.decide(req).await {
        Ok(r) => {
            let code = if r.allowed { StatusCode::OK } else { StatusCode::FORBIDDEN };
            (
                code,
                Json(json!({
                    "decision_id": r.decision.id,
                    "allowed": r.allowed,
                    "reason": r.final_reason.as_str(),
                    "method": r.decision.method,
                    "subject": r.decision.subject,
                    "app": r.request.app,
                    "stream": r.decision.stream,
                    "position": r.decision.position.0,
                    "sequence": r.sequence,
                    // False for a refusal held with identical ones (recorded as one, later).
                    "recorded": r.sequence.is_some(),
                })),
            )
        }
        Err(e @ DecideError::NotReady) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "not_ready", "detail": e.to_string()})))
        }
        Err(e @ DecideError::Spool(_)) => {
            tracing::error!(error = %e, "decision refused: it could not be recorded");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "spool_unavailable", "detail": "the decision could not be recorded"})),
            )
        }
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let ready = shared.is_ready() && !shared.is_draining();
    let body = json!({
        "ready": ready,
        "draining": shared.is_draining(),
        "synced": shared.synced.load(Ordering::Acquire),
        "position": shared.position().0,
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

#[derive(Debug, serde::Deserialize)]
struct WaitQuery {
    position: u64,
    #[serde(default = "default_wait_ms")]
    timeout_ms: u64,
}

fn default_wait_ms() -> u64 {
    5000
}

/// Answers once the state has applied `position` (200), or after `timeout_ms` (504): lets a
/// client read its own write at the edge, and the propagation benchmark time it.
async fn wait(State(shared): State<Arc<Shared>>, Query(q): Query<WaitQuery>) -> (StatusCode, Json<Value>) {
    let mut rx = shared.applied.subscribe();
    if q.position > shared.position().0 {
        // The events in between may all be ones no worker receives: the feed looks now, and
        // again while the position is not reached.
        shared.wanted.fetch_max(q.position, Ordering::Relaxed);
        shared.head_probe.notify_one();
    }
    let timeout = std::time::Duration::from_millis(q.timeout_ms.min(60_000));
    let reached = tokio::time::timeout(timeout, rx.wait_for(|p| *p >= q.position)).await;
    let position = shared.position().0;
    match reached {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"position": position}))),
        _ => (StatusCode::GATEWAY_TIMEOUT, Json(json!({"position": position, "waited_for": q.position}))),
    }
}

async fn state(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let sh = shared.clone();
    let (position, digest) = tokio::task::spawn_blocking(move || sh.current_digest())
        .await
        .unwrap_or((shared.position(), sluice_events::Sha256Digest([0; 32])));
    let s = shared.state.load();
    Json(json!({
        "position": position.0,
        "tables_position": s.tables_position().0,
        "access_digest": digest.to_hex(),
        "apps": s.apps.len(),
        "streams": s.apps.values().map(|a| a.streams.len()).sum::<usize>(),
        "tokens": s.tokens.len(),
        "ready": shared.is_ready(),
        "synced": shared.synced.load(Ordering::Acquire),
    }))
}
