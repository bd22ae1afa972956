//! `/v1/decisions`: the audit trail of every publish/play verdict, newest first, filtered and
//! paged by cursor, as JSON, NDJSON or CSV; one decision in full; and `explain`, which
//! rebuilds the state the decision was made on and runs `decide` again.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use futures::Stream;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::Keyring;
use uuid::Uuid;

use super::ApiState;
use super::error::ApiError;
use super::query::Query;
use crate::decisions::{self, DecisionRow, ExplainError, Explanation, Filter};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionsQuery {
    pub app: Option<String>,
    pub stream: Option<String>,
    /// Who matched, as recorded (`token:<id>`, `subscriber:<id>`, `jwt:<sub>`, …).
    pub subject: Option<String>,
    /// The client's address, or a CIDR such as `203.0.113.0/24`.
    pub ip: Option<String>,
    /// `allow` or `deny` (the final verdict).
    pub outcome: Option<String>,
    /// A reason code (`token_expired`, `cidr_denied`, …).
    pub reason: Option<String>,
    /// RFC 3339 or Unix seconds; inclusive.
    pub since: Option<String>,
    /// RFC 3339 or Unix seconds; exclusive.
    pub until: Option<String>,
    pub node: Option<String>,
    /// 1 to 1000 for JSON (default 100); up to 100000 for NDJSON and CSV.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `json` (default), `ndjson` or `csv`.
    pub format: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DecisionPage {
    pub decisions: Vec<DecisionRow>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn time(field: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(secs) = text.parse::<i64>() {
        return Utc.timestamp_opt(secs, 0).single().ok_or_else(|| ApiError::invalid(field, "out of range"));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::invalid(field, "expected RFC 3339 (2026-11-23T08:00:00Z) or Unix seconds"))
}

fn filter(q: &DecisionsQuery, max: i64) -> Result<Filter, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("between 1 and {max}")));
    }
    let ip = match &q.ip {
        None => None,
        Some(text) => Some(match text.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => text
                .parse::<std::net::IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| ApiError::invalid("ip", "expected an IP address or a CIDR"))?,
        }),
    };
    let allowed = match q.outcome.as_deref() {
        None => None,
        Some("allow") => Some(true),
        Some("deny") => Some(false),
        Some(_) => return Err(ApiError::invalid("outcome", "allow or deny")),
    };
    let before = match &q.cursor {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::invalid("cursor", "not a cursor from this API"))?,
        ),
    };
    Ok(Filter {
        app: q.app.clone(),
        stream: q.stream.clone(),
        subject: q.subject.clone(),
        ip,
        allowed,
        reason: q.reason.clone(),
        node: q.node.clone(),
        since: q.since.as_deref().map(|t| time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| time("until", t)).transpose()?,
        before,
        limit,
        ..Filter::default()
    })
}

pub(super) async fn list(State(api): State<ApiState>, Query(q): Query<DecisionsQuery>) -> Result<Response, ApiError> {
    let format = q.format.as_deref().unwrap_or("json");
    let max = match format {
        "json" => 1000,
        "ndjson" | "csv" => 100_000,
        _ => return Err(ApiError::invalid("format", "json, ndjson or csv")),
    };
    let f = filter(&q, max)?;
    let rows = decisions::query(api.writer.store().pool(), &f).await?;
    let next = (rows.len() as i64 == f.limit).then(|| rows.last().map(|r| r.position.to_string())).flatten();
    let cursor_header = |mut resp: Response| {
        if let Some(n) = next.as_deref().and_then(|n| HeaderValue::from_str(n).ok()) {
            resp.headers_mut().insert("x-next-cursor", n);
        }
        resp
    };
    Ok(match format {
        "ndjson" => {
            let mut body = String::with_capacity(rows.len() * 300);
            for r in &rows {
                body.push_str(&serde_json::to_string(r).unwrap_or_default());
                body.push('\n');
            }
            cursor_header(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
        }
        "csv" => {
            let mut body = String::with_capacity(rows.len() * 200 + 200);
            body.push_str(decisions::CSV_HEADER);
            body.push_str("\r\n");
            for r in &rows {
                body.push_str(&r.csv());
                body.push_str("\r\n");
            }
            cursor_header(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response())
        }
        _ => cursor_header(Json(DecisionPage { decisions: rows, next_cursor: next.clone() }).into_response()),
    })
}

/// `GET /v1/decisions/stream`: new decisions as they reach the audit table, oldest first, as
/// Server-Sent Events (`decision`, the row as JSON, its position as the event id). Resumes
/// after `Last-Event-ID` when the client sends one, else starts at the newest decision.
pub(super) async fn tail(
    State(api): State<ApiState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<DecisionsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    if q.cursor.is_some() || q.format.is_some() {
        return Err(ApiError::invalid("cursor", "the tail takes no cursor or format (it resumes at Last-Event-ID)"));
    }
    let mut f = filter(&q, 1000)?;
    let pool = api.writer.store().pool().clone();
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()?.trim().parse::<i64>().ok());
    let start = match resume {
        Some(p) if p >= 0 => p,
        Some(_) => return Err(ApiError::invalid("Last-Event-ID", "a decision's position")),
        None => {
            decisions::query(&pool, &Filter { limit: 1, ..f.clone() }).await?.first().map_or(0, |r| r.position as i64)
        }
    };
    f.after = Some(start);
    f.oldest_first = true;
    let stream =
        futures::stream::unfold((f, pool, VecDeque::<DecisionRow>::new()), |(mut f, pool, mut buf)| async move {
            loop {
                if let Some(row) = buf.pop_front() {
                    let data = serde_json::to_string(&row).unwrap_or_default();
                    let event = SseEvent::default().id(row.position.to_string()).event("decision").data(data);
                    return Some((Ok(event), (f, pool, buf)));
                }
                tokio::time::sleep(TAIL_EVERY).await;
                match decisions::query(&pool, &f).await {
                    Ok(rows) => {
                        if let Some(last) = rows.last() {
                            f.after = Some(last.position as i64);
                        }
                        buf.extend(rows);
                    }
                    Err(e) => tracing::warn!(error = %e, "decision tail: the audit table could not be read; retrying"),
                }
            }
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// How often the tail looks for new decisions.
const TAIL_EVERY: Duration = Duration::from_millis(500);

fn decision_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::invalid("id", "expected a decision id (UUID)"))
}

/// The decision as recorded in the log (its credential stays sealed).
pub(super) async fn one(
    State(api): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = decision_id(&id)?;
    let (position, record) = decisions::find(api.writer.store().pool(), id)
        .await?
        .ok_or(ApiError::NotFound { what: "decision", id: id.to_string() })?;
    Ok(Json(serde_json::json!({"position": position.0, "record": record})))
}

pub(super) async fn explain(
    State(api): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Explanation>, ApiError> {
    let id = decision_id(&id)?;
    let keyring = std::sync::Arc::new(Keyring::new((*api.sealing).clone()));
    match decisions::explain(api.writer.store(), &keyring, id).await {
        Ok(e) => Ok(Json(e)),
        Err(ExplainError::NotFound(_)) => Err(ApiError::NotFound { what: "decision", id: id.to_string() }),
        Err(ExplainError::Sealed(detail)) => {
            tracing::warn!(%id, %detail, "explain: credential cannot be opened with this node's sealing keys");
            Err(ApiError::Conflict(format!(
                "decision {id} was sealed under a key this control plane does not hold; it cannot be re-run"
            )))
        }
        Err(ExplainError::Store(e)) => Err(e.into()),
    }
}
