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

/// Prometheus text: the log's head, the projection, the relay's divergences, JWKS failures.
pub(super) async fn metrics(State(api): State<ApiState>) -> impl IntoResponse {
    use std::sync::atomic::Ordering::Relaxed;
    let head = api.writer.store().head().await.map(|h| h.0).unwrap_or(0);
    let h = &api.relay_health;
    let lines = [
        ("sluice_log_head", "gauge", "The log's last position.", head),
        (
            "sluice_projection_position",
            "gauge",
            "Position the API's projection has applied.",
            api.writer.projection().position().0,
        ),
        (
            "sluice_relay_diverged",
            "gauge",
            "Position where SLUICE_EVENTS and the log disagree (0: none).",
            h.diverged_at.load(Relaxed),
        ),
        (
            "sluice_relay_diverged_total",
            "counter",
            "Times the relay found SLUICE_EVENTS and the log apart and stopped.",
            h.diverged_total.load(Relaxed),
        ),
        (
            "sluice_jwks_refresh_failures_total",
            "counter",
            "Failed fetches of an app's stream-JWT JWKS (its previous keys kept).",
            api.jwks.failures_total.load(Relaxed),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
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
