//! Probes: `/health` (no auth, SRT Live Server's shape) and `/ready` (Postgres reachable and
//! the projection caught up with the log, or trailing it for less than `SLUICE_READY_MAX_LAG_MS`:
//! a write in flight is not an outage). Outside the API's allow-list and audit.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::ApiState;

/// SRT Live Server's member order.
#[derive(Debug, serde::Serialize)]
struct Health {
    status: &'static str,
    service: &'static str,
    version: &'static str,
}

pub(super) async fn health() -> impl IntoResponse {
    Json(Health { status: "ok", service: "sluice-control", version: env!("CARGO_PKG_VERSION") })
}

pub(super) async fn ready(State(api): State<ApiState>) -> impl IntoResponse {
    let diverged = api.relay_health.diverged_at.load(std::sync::atomic::Ordering::Relaxed);
    if diverged != 0 {
        let detail = format!(
            "SLUICE_EVENTS and the log disagree at position {diverged}: the relay stopped; re-seed NATS from the log \
             (docs/security.md)"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "relay_diverged_at": diverged, "detail": detail})),
        );
    }
    match api.writer.store().head().await {
        Ok(head) => {
            let applied = api.writer.projection().position();
            let max_lag = Duration::from_millis(api.settings.ready_max_lag_ms);
            let behind_for = api.lag.observe(Instant::now(), head.0, applied.0);
            let ok = behind_for.is_none_or(|d| d < max_lag);
            let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let mut body = json!({"ready": ok, "log_head": head.0, "applied": applied.0});
            if let Some(d) = behind_for {
                body["behind_ms"] = json!(d.as_millis() as u64);
            }
            (status, Json(body))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"ready": false, "detail": if e.is_unavailable() { "Postgres is unreachable" } else { "Postgres error" }}),
            ),
        ),
    }
}

/// The metrics (OpenMetrics text): the instruments of `crate::metrics`, and what is read for
/// this scrape: the log's head, the projection and its lag, the relay's divergences, JWKS
/// failures, the workers as their heartbeats show them. Behind `SLUICE_METRICS_TOKEN` when set.
pub(super) async fn metrics(State(api): State<ApiState>, headers: axum::http::HeaderMap) -> axum::response::Response {
    use std::sync::atomic::Ordering::Relaxed;
    let authorization = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if !sluice_events::metrics::bearer_allows(api.settings.metrics_token.as_ref(), authorization) {
        return super::error::ApiError::Unauthorized("metrics need `Authorization: Bearer <SLUICE_METRICS_TOKEN>`")
            .into_response();
    }
    let head = api.writer.store().head().await.map(|h| h.0).unwrap_or(0);
    let applied = api.writer.projection().position().0;
    let h = &api.relay_health;
    let mut s = sluice_events::metrics::Snapshot::default();
    s.gauge("sluice_log_head", "The log's last position.", head as f64)
        .gauge("sluice_projection_position", "Position the API's projection has applied.", applied as f64)
        .gauge(
            "sluice_projection_lag_events",
            "Events of the log the projection has not applied yet.",
            head.saturating_sub(applied) as f64,
        )
        .gauge(
            "sluice_relay_diverged",
            "Position where SLUICE_EVENTS and the log disagree (0: none).",
            h.diverged_at.load(Relaxed) as f64,
        )
        .counters(
            "sluice_relay_diverged",
            "Times the relay found SLUICE_EVENTS and the log apart and stopped.",
            vec![(Vec::new(), h.diverged_total.load(Relaxed) as f64)],
        )
        .counters(
            "sluice_jwks_refresh_failures",
            "Failed fetches of an app's stream-JWT JWKS (its previous keys kept).",
            vec![(Vec::new(), api.jwks.failures_total.load(Relaxed) as f64)],
        );
    let nodes = api.nodes.list(&api.writer.projection().current(), Duration::from_secs(api.settings.node_stale_secs));
    let per_node = |f: &dyn Fn(&crate::nodes::NodeView) -> f64| -> Vec<sluice_events::metrics::Sample> {
        nodes.iter().map(|n| (vec![("node", n.node_id.clone())], f(n))).collect()
    };
    let stale = nodes.iter().filter(|n| n.stale).count();
    s.gauges(
        "sluice_nodes",
        "Workers known from their heartbeats, live or stale.",
        vec![
            (vec![("state", "live".to_owned())], (nodes.len() - stale) as f64),
            (vec![("state", "stale".to_owned())], stale as f64),
        ],
    )
    .gauges("sluice_node_lag_events", "Log head minus the position a worker has applied.", per_node(&|n| n.lag as f64))
    .gauges("sluice_node_live_sessions", "A worker's live sessions.", per_node(&|n| n.live_sessions as f64))
    .gauges(
        "sluice_node_decisions_pending",
        "Decisions in a worker's spool that the log does not hold yet.",
        per_node(&|n| n.decisions_pending as f64),
    )
    .gauges(
        "sluice_node_digest_match",
        "1 when a worker's access tables hash as the control plane's (0: apart; absent until comparable).",
        nodes
            .iter()
            .filter_map(|n| Some((vec![("node", n.node_id.clone())], f64::from(u8::from(n.digest_match?)))))
            .collect(),
    )
    .gauges(
        "sluice_node_last_seen_seconds",
        "Seconds since a worker's last heartbeat.",
        per_node(&|n| n.last_seen_ms as f64 / 1000.0),
    );
    ([(axum::http::header::CONTENT_TYPE, sluice_events::metrics::CONTENT_TYPE)], crate::metrics::render(s))
        .into_response()
}

/// How long the projection has trailed the log. A write in flight puts the head one step
/// ahead for a moment; that must not flap readiness. The projection is behind only when a
/// head it was shown is still not applied: the clock starts at the first probe that sees
/// it behind, and restarts whenever it has caught up with the head that started it.
#[derive(Debug, Default)]
pub struct LagWatch {
    /// When the projection was first seen behind, and the head it was behind then.
    since: Mutex<Option<(Instant, u64)>>,
}

impl LagWatch {
    /// `None` when caught up, else for how long the projection has been behind.
    pub fn observe(&self, now: Instant, head: u64, applied: u64) -> Option<Duration> {
        let mut since = self.since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if applied >= head {
            *since = None;
            return None;
        }
        match *since {
            // It reached the head that started the clock: a new write, a new clock.
            Some((_, target)) if applied >= target => *since = Some((now, head)),
            Some(_) => {}
            None => *since = Some((now, head)),
        }
        since.map(|(t, _)| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_flight_is_not_lag_but_a_stuck_projection_is() {
        let w = LagWatch::default();
        let t0 = Instant::now();
        assert_eq!(w.observe(t0, 10, 10), None);
        // Behind by one: the clock starts.
        assert_eq!(w.observe(t0, 11, 10), Some(Duration::ZERO));
        // Caught up with 11 while 12 is being written: the clock restarts.
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(w.observe(t1, 12, 11), Some(Duration::ZERO));
        // Stuck at 11 for 7 s.
        let t2 = t1 + Duration::from_secs(7);
        assert_eq!(w.observe(t2, 13, 11), Some(Duration::from_secs(7)));
        // Caught up: no lag.
        assert_eq!(w.observe(t2, 13, 13), None);
        assert_eq!(w.observe(t2 + Duration::from_secs(1), 14, 13), Some(Duration::ZERO));
    }
}
