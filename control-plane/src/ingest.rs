//! Decision ingestion (DESIGN.md §5, §7): the control plane pulls workers' decisions from
//! `SLUICE_DECISIONS`, appends them to the log as `AccessDecided` (stream `decisions-<node>`,
//! event id = decision id, so a re-delivery is a no-op), appends the facts an allowed
//! decision implies (a consumed token, a used TOTP step), and only then publishes, per node,
//! the highest spool sequence below which everything is in the log (KV
//! `sluice-decision-marks`). Workers trim their spools up to that mark and no further.
//!
//! One instance ingests at a time (a Postgres advisory lock, as for the relay), so the marks
//! are computed by one tracker per spool. Messages are acknowledged to JetStream only after
//! the append committed; a crash in between means a re-delivery, which the log ignores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use futures::StreamExt as _;
use sluice_events::dist::{self, DecisionMark, MarkTracker};
use sluice_events::event::AccessDecided;
use sluice_events::{DecisionRecord, Metadata, NewEvent, NodeId};
use sqlx::Connection as _;
use tokio::sync::watch;
use uuid::Uuid;

use crate::projection::Projection;
use crate::relay::connect;
use crate::store::EventStore;
use crate::task::{Backoff, Tasks};

/// `pg_advisory_lock` key of the ingester: "SLUICEIN".
const INGEST_LOCK: i64 = 0x534c_5549_4345_494e;
/// Durable consumer of `SLUICE_DECISIONS`.
const CONSUMER: &str = "sluice-ingest";
/// Decisions fetched (and appended) per round.
const FETCH: usize = 2000;
/// Redelivery of unacknowledged decisions (e.g. to a control plane killed mid-fetch).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// How far ingestion got, for tests and `/v1/nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestStatus {
    pub leader: bool,
    /// Decisions appended by this instance (re-deliveries not counted).
    pub appended: u64,
    /// Messages that were not decisions (logged and dropped).
    pub rejected: u64,
}

#[derive(Debug, thiserror::Error)]
enum IngestError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("postgres: {0}")]
    Store(String),
    #[error("lost the ingest lock")]
    LostLock,
}

fn nats<E: std::fmt::Display>(e: E) -> IngestError {
    IngestError::Nats(e.to_string())
}

pub async fn ensure_decisions_stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream, String> {
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: dist::DECISIONS_STREAM.into(),
            subjects: vec![dist::DECISIONS_SUBJECTS.into()],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            // Ingested decisions live in the log; the stream is only the queue in front of it.
            max_age: Duration::from_secs(7 * 24 * 3600),
            num_replicas: crate::relay::replicas(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    crate::relay::check_replicas(js, dist::DECISIONS_STREAM).await?;
    Ok(stream)
}

pub async fn ensure_marks(js: &jetstream::Context) -> Result<kv::Store, String> {
    let kv = match js.get_key_value(dist::DECISION_MARKS_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: dist::DECISION_MARKS_BUCKET.into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: crate::relay::replicas(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?,
    };
    crate::relay::check_replicas(js, &dist::kv_stream(dist::DECISION_MARKS_BUCKET)).await?;
    Ok(kv)
}

/// Starts ingestion as a supervised task: it waits for leadership, ingests, and starts over
/// after a failure, until shutdown.
pub fn spawn(
    tasks: &Tasks,
    store: EventStore,
    projection: Projection,
    nats_url: String,
) -> watch::Receiver<IngestStatus> {
    let (tx, rx) = watch::channel(IngestStatus::default());
    let tx = Arc::new(tx);
    tasks.supervise("ingest", Backoff::new(Duration::from_millis(200), Duration::from_secs(5)), move || {
        let (store, projection, nats_url, tx) = (store.clone(), projection.clone(), nats_url.clone(), tx.clone());
        async move {
            let result = lead(&store, &projection, &nats_url, &tx).await;
            tx.send_modify(|s| s.leader = false);
            result.map_err(|e| e.to_string())
        }
    });
    rx
}

async fn lead(
    store: &EventStore,
    projection: &Projection,
    nats_url: &str,
    status: &watch::Sender<IngestStatus>,
) -> Result<(), IngestError> {
    let mut lock = store.lead(INGEST_LOCK).await.map_err(|e| IngestError::Store(e.to_string()))?;
    let result = ingest(store, projection, nats_url, status, &mut lock).await;
    let _ = lock.close().await;
    result
}

/// One decision message, decoded.
struct Incoming {
    node: NodeId,
    spool: Option<Uuid>,
    sequence: Option<u64>,
    record: DecisionRecord,
}

/// The node, spool and sequence a message says it comes from (from its subject and headers).
fn origin(msg: &jetstream::Message) -> (Option<NodeId>, Option<Uuid>, Option<u64>) {
    let node = msg.subject.as_str().strip_prefix("sluice.dec.").and_then(|n| NodeId::parse(n).ok());
    let header = |name: &str| msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let spool = header(dist::HEADER_SPOOL).and_then(|s| Uuid::parse_str(&s).ok());
    let sequence = header(dist::HEADER_SEQUENCE).and_then(|s| s.parse().ok());
    (node, spool, sequence)
}

fn decode(msg: &jetstream::Message) -> Result<Incoming, String> {
    let (node, spool, sequence) = origin(msg);
    let node = node.ok_or_else(|| format!("subject {} does not name a node", msg.subject))?;
    let mut record: DecisionRecord =
        serde_json::from_slice(&msg.payload).map_err(|e| format!("not a decision record: {e}"))?;
    if record.node.as_ref().is_some_and(|n| n != &node) {
        return Err(format!("record names node {:?} but came on {}", record.node, msg.subject));
    }
    record.node = Some(node.clone());
    Ok(Incoming { node, spool, sequence, record })
}

async fn ingest(
    store: &EventStore,
    projection: &Projection,
    nats_url: &str,
    status: &watch::Sender<IngestStatus>,
    lock: &mut sqlx::PgConnection,
) -> Result<(), IngestError> {
    let js = jetstream::new(connect(nats_url).await.map_err(nats)?);
    let stream = ensure_decisions_stream(&js).await.map_err(IngestError::Nats)?;
    let marks = ensure_marks(&js).await.map_err(IngestError::Nats)?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::All,
                // What a killed instance had fetched but not acknowledged (a pull request
                // outlives its instance by up to its 500 ms expiry) comes back after this;
                // appends are idempotent, so a slow batch delivered twice costs nothing.
                ack_wait: ACK_WAIT,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
    status.send_modify(|s| s.leader = true);
    tracing::info!("ingest: this instance ingests decisions");
    let mut trackers: HashMap<(NodeId, Uuid), MarkTracker> = HashMap::new();
    let mut published: HashMap<NodeId, DecisionMark> = HashMap::new();
    let mut unpublished: HashMap<NodeId, DecisionMark> = HashMap::new();
    let mut lock_check = std::time::Instant::now();
    loop {
        let mut batch =
            consumer.fetch().max_messages(FETCH).expires(Duration::from_millis(500)).messages().await.map_err(nats)?;
        let mut messages = Vec::new();
        while let Some(m) = batch.next().await {
            messages.push(m.map_err(nats)?);
        }
        if lock_check.elapsed() >= Duration::from_secs(2) {
            sqlx::query("SELECT 1").execute(&mut *lock).await.map_err(|_| IngestError::LostLock)?;
            lock_check = std::time::Instant::now();
        }
        let backlog = messages.last().and_then(|m| m.info().ok()).map_or(0, |i| i.pending);
        crate::metrics::METRICS.ingest_backlog.store(backlog, std::sync::atomic::Ordering::Relaxed);
        let Some(last) = messages.last() else {
            if !unpublished.is_empty() {
                publish_marks(&marks, &mut published, &mut unpublished).await;
            }
            continue;
        };
        let mut by_node: HashMap<NodeId, Vec<NewEvent>> = HashMap::new();
        let mut follow_ups: Vec<NewEvent> = Vec::new();
        let mut seen: Vec<(NodeId, Uuid, u64)> = Vec::new();
        let mut rejected = 0;
        let mut outcomes: Vec<(bool, &'static str)> = Vec::new();
        let state = projection.current();
        let now = crate::clock::now();
        for msg in &messages {
            let incoming = match decode(msg) {
                Ok(i) => i,
                Err(e) => {
                    rejected += 1;
                    let (node, spool, sequence) = origin(msg);
                    tracing::error!(subject = %msg.subject, ?sequence, error = %e, "ingest: message is not a decision this build can read; dropped");
                    // Marked as handled all the same: a message that can never be read must
                    // not hold the node's mark (and its spool) back forever.
                    if let (Some(node), Some(spool), Some(seq)) = (node, spool, sequence) {
                        seen.push((node, spool, seq));
                    }
                    continue;
                }
            };
            let record = incoming.record;
            outcomes.push((record.allowed, record.final_reason.as_str()));
            for (n, command) in record.follow_up().into_iter().enumerate() {
                match sluice_events::handle(&state, command, now) {
                    Ok(events) => follow_ups
                        .extend(events.into_iter().map(|event| NewEvent { event_id: record.follow_up_id(n), event })),
                    Err(r) => {
                        tracing::debug!(decision = %record.decision.id, rejection = %r, "ingest: follow-up fact not recorded")
                    }
                }
            }
            if let (Some(spool), Some(seq)) = (incoming.spool, incoming.sequence.or(record.sequence)) {
                seen.push((incoming.node.clone(), spool, seq));
            }
            let event_id = record.decision.id;
            by_node
                .entry(incoming.node)
                .or_default()
                .push(NewEvent { event_id, event: AccessDecided { decision: record }.into() });
        }
        let mut appended = 0;
        for (node, events) in by_node {
            let stream = format!("decisions-{node}");
            let meta = Metadata { actor: Some(format!("node:{node}")), ..Metadata::default() };
            let done =
                store.append_facts(&stream, events, meta).await.map_err(|e| IngestError::Store(e.to_string()))?;
            appended += done.positions.len() as u64;
        }
        let mut by_stream: HashMap<String, Vec<NewEvent>> = HashMap::new();
        for e in follow_ups {
            by_stream.entry(e.event.log_stream()).or_default().push(e);
        }
        for (stream, events) in by_stream {
            let meta = Metadata { actor: Some("ingest".into()), ..Metadata::default() };
            store.append_facts(&stream, events, meta).await.map_err(|e| IngestError::Store(e.to_string()))?;
        }
        // Durable in Postgres: now JetStream may forget them, and the workers may trim.
        last.ack().await.map_err(nats)?;
        for (allowed, reason) in outcomes {
            crate::metrics::ingested(allowed, reason);
        }
        for (node, spool, seq) in seen {
            let key = (node.clone(), spool);
            if !trackers.contains_key(&key) {
                let start = current_mark(&marks, &node).await.filter(|m| m.spool == spool).map_or(0, |m| m.sequence);
                trackers.insert(key.clone(), MarkTracker::starting_at(start));
                published.insert(node.clone(), DecisionMark { spool, sequence: start });
            }
            if let Some(t) = trackers.get_mut(&key)
                && t.ingested(seq)
            {
                unpublished.insert(node, DecisionMark { spool, sequence: t.confirmed() });
            }
        }
        // Marks that moved (or failed to publish last time) go out now.
        publish_marks(&marks, &mut published, &mut unpublished).await;
        status.send_modify(|s| {
            s.appended += appended;
            s.rejected += rejected;
        });
    }
}

async fn publish_marks(
    marks: &kv::Store,
    published: &mut HashMap<NodeId, DecisionMark>,
    unpublished: &mut HashMap<NodeId, DecisionMark>,
) {
    let pending: Vec<(NodeId, DecisionMark)> = unpublished.drain().collect();
    for (node, mark) in pending {
        if published.get(&node) == Some(&mark) {
            continue;
        }
        let value = serde_json::to_vec(&mark).unwrap_or_default();
        match marks.put(node.as_str(), value.into()).await {
            Ok(_) => {
                published.insert(node, mark);
            }
            Err(e) => {
                // The worker keeps its spool a little longer.
                tracing::warn!(%node, error = %e, "ingest: cannot publish the decision mark; retrying");
                unpublished.insert(node, mark);
            }
        }
    }
}

async fn current_mark(marks: &kv::Store, node: &NodeId) -> Option<DecisionMark> {
    let bytes = marks.get(node.as_str()).await.ok()??;
    serde_json::from_slice(&bytes).ok()
}
