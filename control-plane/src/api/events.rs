//! `/v1/events`: the log itself (admin), as pages and as a live Server-Sent Events tail.
//! Events hold secrets only as digests or sealed values, so nothing here is in clear.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Position, RecordedEvent};

use super::ApiState;
use super::error::ApiError;
use super::query::Query;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this position (default 0: from the start).
    pub after: Option<u64>,
    /// 1 to 1000, default 100.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventView {
    pub position: u64,
    pub event_id: uuid::Uuid,
    pub stream: String,
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub data: serde_json::Value,
    pub metadata: sluice_events::Metadata,
    /// Unix milliseconds.
    pub recorded_at: i64,
    /// Hex of the chain hash.
    pub hash: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// Pass as `after` for the next page.
    pub next_after: u64,
}

/// `GET /v1/log`: the log's head and its newest signed anchor.
#[derive(Debug, Serialize, JsonSchema)]
pub struct LogView {
    /// The head this control plane has applied.
    pub head: u64,
    /// Hex of its chain hash.
    pub hash: Option<String>,
    pub anchor: Option<AnchorView>,
}

/// An anchor of the log (its signature checked here).
#[derive(Debug, Serialize, JsonSchema)]
pub struct AnchorView {
    pub position: u64,
    pub hash: String,
    /// Unix milliseconds.
    pub at: i64,
    pub instance: String,
}

pub(super) async fn log(State(api): State<ApiState>) -> Json<LogView> {
    let head = api.writer.projection().head();
    let anchor = api.anchor.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Json(LogView {
        head: head.map_or(0, |(p, _)| p.0),
        hash: head.map(|(_, h)| h.to_hex()),
        anchor: anchor.map(|a| AnchorView {
            position: a.position,
            hash: a.hash.to_hex(),
            at: a.at,
            instance: a.instance,
        }),
    })
}

pub fn view(e: &RecordedEvent) -> EventView {
    EventView {
        position: e.position.0,
        event_id: e.event_id,
        stream: e.stream.clone(),
        version: e.version,
        event_type: e.event.event_type(),
        data: e.event.data(),
        metadata: e.metadata.clone(),
        recorded_at: e.recorded_at.0,
        hash: e.hash.to_hex(),
    }
}

pub(super) async fn page(
    State(api): State<ApiState>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "between 1 and 1000"));
    }
    let after = q.after.unwrap_or(0);
    if i64::try_from(after).is_err() {
        return Err(ApiError::invalid("after", "a log position (at most 9223372036854775807)"));
    }
    let events = api.writer.store().read_all(Position(after), limit).await?;
    let next_after = events.last().map_or(after, |e| e.position.0);
    Ok(Json(EventPage { events: events.iter().map(view).collect(), next_after }))
}

pub(super) async fn tail(
    State(api): State<ApiState>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let after = q.after.unwrap_or(0);
    if i64::try_from(after).is_err() {
        return Err(ApiError::invalid("after", "a log position (at most 9223372036854775807)"));
    }
    let sub = api.writer.store().subscribe(Position(after)).await?;
    let stream = futures::stream::unfold(sub, |mut sub| async move {
        match sub.recv().await? {
            Ok(e) => {
                let data = serde_json::to_string(&view(&e)).unwrap_or_default();
                let sse = SseEvent::default().id(e.position.0.to_string()).event(e.event.event_type()).data(data);
                Some((Ok(sse), sub))
            }
            Err(e) => {
                // The reader must not skip an event: end the stream and say why.
                let sse = SseEvent::default().event("error").data(e.to_string());
                Some((Ok(sse), sub))
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
