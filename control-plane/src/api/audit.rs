//! Every API decision (who, route, method, IP, status) goes into the log as `ApiAccessed`
//! batches: a request only pushes to a channel, a background task appends at most once a
//! second (or per 500 calls), so auditing never costs a Postgres round trip per request.
//! While Postgres is down the batch is kept (up to a bound) and appended when it returns.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use sluice_events::event::{ApiAccess, ApiAccessed};
use sluice_events::{Metadata, NewEvent};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{ApiState, ClientIp, now};
use crate::store::{EventStore, ExpectedVersion};

const BATCH: usize = 500;
const KEEP_WHILE_DOWN: usize = 50_000;

/// The calls not yet written, identical calls merged into one entry with a count (issue #16
/// item 9: a client hammering one route adds one entry per batch, not one per call).
#[derive(Debug, Default)]
struct Pending {
    entries: Vec<ApiAccess>,
}

impl Pending {
    fn push(&mut self, access: ApiAccess) {
        // Every pending entry is unwritten (the task appends between pushes), so any may be
        // merged into; only the newest batch's worth is searched, to bound the cost.
        let recent = self.entries.len().saturating_sub(BATCH);
        if let Some(same) = self.entries[recent..].iter_mut().rev().find(|e| e.same_call(&access)) {
            same.count += access.count;
            same.last = Some(access.last.unwrap_or(access.at));
            return;
        }
        self.entries.push(access);
    }
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Filled by the `Principal` extractor with the authenticated subject.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(Arc<OnceLock<String>>);

impl AuditSlot {
    pub fn set(&self, subject: String) {
        let _ = self.0.set(subject);
    }
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<ApiAccess>,
}

impl AuditLog {
    /// Starts the batching task that appends to `api-<instance>`.
    /// Tracked, not cancelled: it ends once every sender is gone, after appending what it holds.
    pub fn start(tasks: &crate::task::Tasks, store: EventStore, instance: String) -> AuditLog {
        let (tx, mut rx) = mpsc::channel::<ApiAccess>(8192);
        tasks.track("API audit", async move {
            let mut pending = Pending::default();
            let mut open = true;
            while open || !pending.is_empty() {
                if pending.is_empty() {
                    match rx.recv().await {
                        Some(a) => pending.push(a),
                        None => break,
                    }
                }
                // Gather for up to a second, or until the batch is full.
                let deadline = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(deadline);
                while open && pending.len() < BATCH {
                    tokio::select! {
                        a = rx.recv() => match a {
                            Some(a) => pending.push(a),
                            None => open = false,
                        },
                        _ = &mut deadline => break,
                    }
                }
                let pending = &mut pending.entries;
                let take = pending.len().min(BATCH);
                let entries: Vec<ApiAccess> = pending[..take].to_vec();
                let event = ApiAccessed { instance: instance.clone(), entries }.into();
                let stream = format!("api-{instance}");
                let metadata = Metadata { actor: Some("api-audit".into()), ..Metadata::default() };
                let new = vec![NewEvent { event_id: Uuid::now_v7(), event }];
                match store.append(&stream, ExpectedVersion::Any, new, metadata).await {
                    Ok(_) => {
                        pending.drain(..take);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pending = pending.len(), "could not record API audit; will retry");
                        if pending.len() > KEEP_WHILE_DOWN {
                            let drop = pending.len() - KEEP_WHILE_DOWN;
                            pending.drain(..drop);
                            tracing::error!(dropped = drop, "API audit buffer full; oldest entries dropped");
                        }
                        if !open {
                            break;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        AuditLog { tx }
    }

    fn record(&self, access: ApiAccess) {
        if self.tx.try_send(access).is_err() {
            tracing::warn!("API audit queue full; an entry was dropped");
        }
    }
}

/// Middleware: records the call once the response is known.
pub async fn record(State(api): State<ApiState>, mut req: Request, next: Next) -> Response {
    let slot = AuditSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().to_string();
    // The route's template (no query string, which may carry credentials); a path that
    // matches no route is "(no route)", so a scan of random paths merges into one entry.
    let route =
        req.extensions().get::<MatchedPath>().map_or_else(|| "(no route)".to_owned(), |p| p.as_str().to_owned());
    let client_ip = ClientIp::of_request(&req);
    let response = next.run(req).await;
    let subject = slot.0.get().cloned().unwrap_or_else(|| "anonymous".into());
    let status = response.status().as_u16();
    api.audit.record(ApiAccess { at: now(), subject, method, route, client_ip, status, count: 1, last: None });
    response
}
