//! The control plane's instruments (`prometheus-client`): API latency per route, method and
//! status; append latency and batch size; relay lag; ingest backlog and the decisions it
//! brings in by outcome and reason; the API's malformed, refused and rate-limited requests.
//! One set per process (`METRICS`), updated where the work happens; `/metrics` renders them
//! with the figures read at scrape time (log head, projection, nodes; `api::probes`).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use sluice_events::metrics::prometheus_client::metrics::counter::Counter;
use sluice_events::metrics::prometheus_client::metrics::family::Family;
use sluice_events::metrics::prometheus_client::metrics::histogram::Histogram;
use sluice_events::metrics::prometheus_client::registry::Registry;
use sluice_events::metrics::{self, ProcReaders, ProcessCollector, Snapshot};

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    pub api_seconds: HistogramFamily,
    /// By status only: the histogram has them per route.
    pub api_malformed: Counter,
    pub api_denied: Counter,
    pub api_rate_limited: Counter,
    pub append_seconds: Histogram,
    pub append_batch_events: Histogram,
    pub relay_lag_seconds: Histogram,
    pub relay_position: AtomicU64,
    pub ingest_backlog: AtomicU64,
    pub ingested: Family<Labels, Counter>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    api_seconds: Family::new_with_constructor(metrics::latency_histogram),
    api_malformed: Counter::default(),
    api_denied: Counter::default(),
    api_rate_limited: Counter::default(),
    append_seconds: metrics::latency_histogram(),
    append_batch_events: metrics::count_histogram(),
    relay_lag_seconds: metrics::latency_histogram(),
    relay_position: AtomicU64::new(0),
    ingest_backlog: AtomicU64::new(0),
    ingested: Family::default(),
});

/// Middleware: times every API request under its route's pattern (`/v1/apps/{app}`; an
/// unknown path is `unmatched`, so a scanner cannot make the label set grow) and counts the
/// malformed (400, 413, 415, 422), refused (401, 403) and rate-limited (429) ones.
pub async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let m = &*METRICS;
    m.api_seconds
        .get_or_create(&vec![("route", route), ("method", method), ("status", status.to_string())])
        .observe(started.elapsed().as_secs_f64());
    match status {
        400 | 413 | 415 | 422 => {
            m.api_malformed.inc();
        }
        401 | 403 => {
            m.api_denied.inc();
        }
        429 => {
            m.api_rate_limited.inc();
        }
        _ => {}
    }
    response
}

/// Notes a decision the ingest brought into the log.
pub fn ingested(allowed: bool, reason: &str) {
    let outcome = if allowed { "allow" } else { "deny" };
    METRICS.ingested.get_or_create(&vec![("outcome", outcome.to_owned()), ("reason", reason.to_owned())]).inc();
}

/// The exposition: the instruments, `scraped` (figures read for this scrape), build and
/// process figures.
pub fn render(scraped: Snapshot) -> String {
    let m = &*METRICS;
    let mut r = Registry::default();
    metrics::register_build_info(&mut r, "sluice-control", env!("CARGO_PKG_VERSION"));
    r.register(
        "sluice_api_request_duration_seconds",
        "API requests by route pattern, method and status.",
        m.api_seconds.clone(),
    );
    r.register(
        "sluice_api_malformed_requests",
        "API requests refused as unreadable (400, 413, 415, 422); by route in sluice_api_request_duration_seconds.",
        m.api_malformed.clone(),
    );
    r.register(
        "sluice_api_denied_requests",
        "API requests refused for their credential or role (401, 403).",
        m.api_denied.clone(),
    );
    r.register(
        "sluice_api_rate_limited_requests",
        "API requests refused by a rate limit (429).",
        m.api_rate_limited.clone(),
    );
    r.register("sluice_log_append_seconds", "One group commit of the event store's writer.", m.append_seconds.clone());
    r.register("sluice_log_append_batch_events", "Events in one group commit.", m.append_batch_events.clone());
    r.register(
        "sluice_relay_lag_seconds",
        "From an event's record in the log to its acknowledgement by SLUICE_EVENTS.",
        m.relay_lag_seconds.clone(),
    );
    r.register(
        "sluice_ingested_decisions",
        "Media decisions of every worker brought into the log, by outcome and reason.",
        m.ingested.clone(),
    );
    let mut own = Snapshot::default();
    own.gauge(
        "sluice_relay_position",
        "The last log position this instance relayed to SLUICE_EVENTS (0: not relaying).",
        m.relay_position.load(Ordering::Relaxed) as f64,
    )
    .gauge(
        "sluice_ingest_backlog",
        "Decisions in SLUICE_DECISIONS waiting for the ingest (as of its last fetch).",
        m.ingest_backlog.load(Ordering::Relaxed) as f64,
    );
    r.register_collector(Box::new(own));
    r.register_collector(Box::new(scraped));
    r.register_collector(Box::new(ProcessCollector::of_self(ProcReaders {
        text: |p| std::fs::read_to_string(p).unwrap_or_default(),
        entries: |p| std::fs::read_dir(p).map_or(0, |d| d.count() as u64),
    })));
    metrics::render(&r)
}
