//! The decisions read model (DESIGN.md §7): every `AccessDecided` of the log, flattened into
//! the indexed `decisions` table for audit queries, plus access-table checkpoints of the state
//! every N events (`state_checkpoints`) so that `explain` rebuilds the state a decision was
//! made on from the nearest checkpoint and the log after it, then re-runs `decide`.
//!
//! The table is a projection: it follows the log from its checkpoint (in the same transaction
//! as its rows, so a crash never skips or doubles a row) and can be dropped and rebuilt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use sluice_events::decision::WebhookAnswer;
use sluice_events::state::snapshot;
use sluice_events::{AuthState, DecisionRecord, Event, Keyring, Outcome, Position, RecordedEvent};
use sqlx::{PgPool, QueryBuilder, Row};
use uuid::Uuid;

use crate::store::{EventStore, StoreError};
use crate::task::{Backoff, Tasks};

const NAME: &str = "decisions";
/// Events folded into the table per transaction at most.
const BURST: usize = 5000;

/// Starts the projector as a supervised task, until shutdown.
pub fn spawn(tasks: &Tasks, store: EventStore, keyring: Arc<Keyring>, checkpoint_every: u64) {
    let every = checkpoint_every.max(1);
    tasks.supervise("decisions read model", Backoff::new(Duration::from_secs(1), Duration::from_secs(1)), move || {
        let (store, keyring) = (store.clone(), keyring.clone());
        async move { project(&store, &keyring, every).await.map_err(|e| e.to_string()) }
    });
}

/// Follows the log from the read model's checkpoint, folding its own worker-view state so that
/// state checkpoints fall on exact multiples of `every` (as `rebuild` writes them): where they
/// land never depends on how the log arrived in bursts.
async fn project(store: &EventStore, keyring: &Arc<Keyring>, every: u64) -> Result<(), StoreError> {
    let pool = store.pool();
    let from = checkpoint(pool).await?;
    let (mut state, _, _) = state_at(store, keyring, from).await?;
    let mut sub = store.subscribe(from).await?;
    loop {
        let mut burst: Vec<RecordedEvent> = Vec::new();
        match sub.recv().await {
            Some(e) => burst.push(e?),
            None => return Err(StoreError::Database("the log subscription ended".into())),
        }
        while burst.len() < BURST {
            match sub.try_recv() {
                Some(e) => burst.push(e?),
                None => break,
            }
        }
        let mut checkpoints = Vec::new();
        for e in &burst {
            state.apply(e).map_err(|err| StoreError::Database(err.to_string()))?;
            if e.position.0 % every == 0 {
                let at = state.clone();
                let bytes = tokio::task::spawn_blocking(move || snapshot::encode(&at))
                    .await
                    .map_err(|e| StoreError::Database(e.to_string()))?;
                checkpoints.push((e.position.0 as i64, bytes));
            }
        }
        // Checkpoints first: a crash in between repeats them harmlessly, never skips one.
        for (at, bytes) in checkpoints {
            sqlx::query("INSERT INTO state_checkpoints (position, snapshot) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(at)
                .bind(bytes)
                .execute(pool)
                .await?;
        }
        if let Some(last) = burst.last() {
            insert(pool, &burst, last.position).await?;
        }
    }
}

fn to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

async fn insert(pool: &PgPool, burst: &[RecordedEvent], upto: Position) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(&RecordedEvent, &DecisionRecord)> = burst
        .iter()
        .filter_map(|e| match &e.event {
            Event::AccessDecided(d) => Some((e, &d.decision)),
            _ => None,
        })
        .collect();
    // Chunks keep each statement small (see store::MAX_INSERT_BYTES on why).
    for chunk in rows.chunks(40) {
        let mut q = QueryBuilder::new(
            "INSERT INTO decisions (id, position, state_position, node, app, stream, action, protocol, subject, \
             client_ip, allowed, reason, method, decided_at, record) ",
        );
        q.push_values(chunk, |mut b, (e, r)| {
            b.push_bind(r.decision.id)
                .push_bind(e.position.0 as i64)
                .push_bind(r.decision.position.0 as i64)
                .push_bind(r.node.as_ref().map(|n| n.as_str().to_owned()).unwrap_or_else(|| "local".into()))
                .push_bind(r.request.app.as_str().to_owned())
                .push_bind(r.decision.stream.as_str().to_owned())
                .push_bind(r.request.action.as_str())
                .push_bind(r.request.protocol.as_str())
                .push_bind(r.decision.subject.clone())
                .push_bind(r.request.client_ip.to_string())
                .push_unseparated("::inet")
                .push_bind(r.allowed)
                .push_bind(r.final_reason.as_str())
                .push_bind(r.decision.method.map(|m| m.as_str()))
                .push_bind(to_time(r.decided_at.0))
                .push_bind(serde_json::to_value(r).unwrap_or_default());
        });
        q.push(" ON CONFLICT (id) DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position",
    )
    .bind(NAME)
    .bind(upto.0 as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Rebuilds the read models from the log (`sluice-control replay --read-models`): empties the
/// `decisions` table, its checkpoint and the state checkpoints, then projects every event
/// again, folding a worker-view state to write a checkpoint every `every` events. Answers the
/// number of decisions projected. Run it with the control planes stopped (or expect their
/// projector to interleave harmlessly: inserts are idempotent).
pub async fn rebuild(store: &EventStore, keyring: Arc<Keyring>, every: u64) -> Result<u64, StoreError> {
    let pool = store.pool();
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM decisions").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM state_checkpoints").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1").bind(NAME).execute(&mut *tx).await?;
    tx.commit().await?;
    let mut state = AuthState::for_data_plane(Some(keyring));
    let mut rows = 0;
    loop {
        let page = store.read_all(state.position(), BURST as i64).await?;
        let Some(last) = page.last().map(|e| e.position) else { break };
        rows += page.iter().filter(|e| matches!(e.event, Event::AccessDecided(_))).count() as u64;
        insert(pool, &page, last).await?;
        for e in &page {
            state.apply(e).map_err(|err| StoreError::Database(err.to_string()))?;
            if e.position.0 % every.max(1) == 0 {
                sqlx::query(
                    "INSERT INTO state_checkpoints (position, snapshot) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(e.position.0 as i64)
                .bind(snapshot::encode(&state))
                .execute(pool)
                .await?;
            }
        }
    }
    Ok(rows)
}

/// Where the read model has got to in the log.
pub async fn checkpoint(pool: &PgPool) -> Result<Position, StoreError> {
    let p: Option<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
        .bind(NAME)
        .fetch_optional(pool)
        .await?;
    Ok(Position(p.unwrap_or(0) as u64))
}

/// The filters of `GET /v1/decisions`, already validated.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub app: Option<String>,
    pub stream: Option<String>,
    pub subject: Option<String>,
    /// An address or a CIDR (`client_ip <<= ip`).
    pub ip: Option<ipnet::IpNet>,
    pub allowed: Option<bool>,
    pub reason: Option<String>,
    pub node: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only rows with a log position below this (the cursor; newest first).
    pub before: Option<i64>,
    /// Only rows with a log position above this (the live tail).
    pub after: Option<i64>,
    pub limit: i64,
    /// Subjects starting with this (`subscriber:` for Ant Media's connection events).
    pub subject_prefix: Option<String>,
    /// Oldest first (Ant Media's lists), and rows skipped before the first returned.
    pub oldest_first: bool,
    pub offset: i64,
}

/// One row of the audit table.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DecisionRow {
    pub id: Uuid,
    /// Position of the decision in the log (the cursor).
    pub position: u64,
    /// Position of the state it was decided on.
    pub state_position: u64,
    pub node: String,
    pub app: String,
    pub stream: String,
    pub action: String,
    pub protocol: String,
    pub subject: Option<String>,
    pub client_ip: String,
    pub allowed: bool,
    pub reason: String,
    pub method: Option<String>,
    /// RFC 3339.
    pub decided_at: String,
    /// The attempts this row stands for: 1, or more when the worker coalesced a retrying
    /// client's identical refusals (`first_decided_at` is then the first of them).
    pub count: u64,
    pub first_decided_at: Option<String>,
    /// For an allowed one-time token: an earlier allow of the same token, when there is one
    /// (a double use, possible only while workers were cut off from NATS with
    /// `offline_one_time = allow_local`).
    pub conflict_with: Option<Uuid>,
}

pub const CSV_HEADER: &str = "id,position,state_position,node,app,stream,action,protocol,subject,client_ip,allowed,reason,method,decided_at,count,first_decided_at,conflict_with";

/// An earlier allow of the same one-time token than the `decisions` row in scope (`d`).
macro_rules! conflict_with {
    () => {
        "CASE WHEN d.allowed AND d.method = 'one_time_token' AND d.subject IS NOT NULL THEN \
     (SELECT e.id FROM decisions e WHERE e.subject = d.subject AND e.allowed AND e.method = 'one_time_token' \
      AND e.position < d.position ORDER BY e.position LIMIT 1) END"
    };
}
const CONFLICT_WITH: &str = conflict_with!();

impl DecisionRow {
    /// One CSV line (RFC 4180 quoting where a field needs it).
    pub fn csv(&self) -> String {
        fn field(s: &str) -> String {
            if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
        }
        [
            self.id.to_string(),
            self.position.to_string(),
            self.state_position.to_string(),
            field(&self.node),
            field(&self.app),
            field(&self.stream),
            self.action.clone(),
            self.protocol.clone(),
            field(self.subject.as_deref().unwrap_or("")),
            self.client_ip.clone(),
            self.allowed.to_string(),
            self.reason.clone(),
            self.method.clone().unwrap_or_default(),
            self.decided_at.clone(),
            self.count.to_string(),
            self.first_decided_at.clone().unwrap_or_default(),
            self.conflict_with.map(|u| u.to_string()).unwrap_or_default(),
        ]
        .join(",")
    }
}

pub async fn query(pool: &PgPool, f: &Filter) -> Result<Vec<DecisionRow>, StoreError> {
    let mut q = QueryBuilder::new(format!(
        "SELECT id, position, state_position, node, app, stream, action, protocol, subject, \
         host(client_ip) AS ip, allowed, reason, method, decided_at, \
         COALESCE((record->'repeats'->>'count')::bigint, 1) AS count, \
         (record->'repeats'->>'first')::bigint AS first_ms, {CONFLICT_WITH} AS conflict_with \
         FROM decisions d WHERE true"
    ));
    let text =
        [("app", &f.app), ("stream", &f.stream), ("subject", &f.subject), ("reason", &f.reason), ("node", &f.node)];
    for (column, value) in text {
        if let Some(v) = value {
            q.push(format!(" AND {column} = ")).push_bind(v.clone());
        }
    }
    if let Some(ip) = f.ip {
        q.push(" AND client_ip <<= ").push_bind(ip.to_string()).push("::inet");
    }
    if let Some(a) = f.allowed {
        q.push(" AND allowed = ").push_bind(a);
    }
    if let Some(t) = f.since {
        q.push(" AND decided_at >= ").push_bind(t);
    }
    if let Some(t) = f.until {
        q.push(" AND decided_at < ").push_bind(t);
    }
    if let Some(b) = f.before {
        q.push(" AND position < ").push_bind(b);
    }
    if let Some(a) = f.after {
        q.push(" AND position > ").push_bind(a);
    }
    if let Some(p) = &f.subject_prefix {
        q.push(" AND starts_with(subject, ").push_bind(p.clone()).push(")");
    }
    q.push(if f.oldest_first { " ORDER BY position ASC" } else { " ORDER BY position DESC" });
    q.push(" LIMIT ").push_bind(f.limit).push(" OFFSET ").push_bind(f.offset.max(0));
    let rows = q.build().fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            let at: DateTime<Utc> = r.try_get("decided_at")?;
            Ok(DecisionRow {
                id: r.try_get("id")?,
                position: r.try_get::<i64, _>("position")? as u64,
                state_position: r.try_get::<i64, _>("state_position")? as u64,
                node: r.try_get("node")?,
                app: r.try_get("app")?,
                stream: r.try_get("stream")?,
                action: r.try_get("action")?,
                protocol: r.try_get("protocol")?,
                subject: r.try_get("subject")?,
                client_ip: r.try_get("ip")?,
                allowed: r.try_get("allowed")?,
                reason: r.try_get("reason")?,
                method: r.try_get("method")?,
                decided_at: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                count: r.try_get::<i64, _>("count")?.max(1) as u64,
                first_decided_at: r
                    .try_get::<Option<i64>, _>("first_ms")?
                    .and_then(DateTime::<Utc>::from_timestamp_millis)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                conflict_with: r.try_get("conflict_with")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The recorded decision and its log position.
pub async fn find(pool: &PgPool, id: Uuid) -> Result<Option<(Position, DecisionRecord)>, StoreError> {
    Ok(find_with_conflict(pool, id).await?.map(|(p, r, _)| (p, r)))
}

/// As `find`, with an earlier allow of the same one-time token (see `DecisionRow`).
pub async fn find_with_conflict(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(Position, DecisionRecord, Option<Uuid>)>, StoreError> {
    let sql =
        concat!("SELECT position, record, ", conflict_with!(), " AS conflict_with FROM decisions d WHERE id = $1");
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await?;
    let Some(row) = row else { return Ok(None) };
    let conflict: Option<Uuid> = row.try_get("conflict_with")?;
    let position: i64 = row.try_get("position")?;
    let record: serde_json::Value = row.try_get("record")?;
    let record = serde_json::from_value(record).map_err(|e| StoreError::Database(format!("decision {id}: {e}")))?;
    Ok(Some((Position(position as u64), record, conflict)))
}

/// What `decide` says about a decision, re-run on the state it was made on.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Verdict {
    pub outcome: String,
    pub reason: String,
    pub method: Option<String>,
    pub subject: Option<String>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Explanation {
    pub decision_id: Uuid,
    /// Position of the decision in the log.
    pub position: u64,
    /// Position of the state it was decided on (rebuilt here).
    pub state_position: u64,
    pub node: Option<String>,
    pub app: String,
    pub stream: String,
    pub action: String,
    pub client_ip: String,
    /// What the worker's `decide` said.
    pub recorded: Verdict,
    /// What it says again now, on the rebuilt state with the recorded request and time.
    pub replayed: Verdict,
    /// `recorded` and `replayed` agree.
    pub matches: bool,
    /// The final verdict the worker acted on (after claims and the webhook).
    pub allowed: bool,
    pub final_reason: String,
    /// In words: which rule decided.
    pub rule: String,
    /// A webhook's answer, as recorded (it cannot be replayed).
    pub webhook: Option<WebhookAnswer>,
    /// Identical refusals the worker recorded as this one (see `DecisionRow::count`).
    pub repeats: Option<sluice_events::Repeats>,
    /// An earlier allow of the same one-time token: this allow was a double use (see
    /// `DecisionRow::conflict_with`); `matches` can be true all the same.
    pub conflict_with: Option<Uuid>,
    /// The checkpoint the state was rebuilt from (0: the start of the log), and the events
    /// applied after it.
    pub rebuilt_from: u64,
    pub events_replayed: u64,
    pub took_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("decision {0} not found (or not yet in the read model)")]
    NotFound(Uuid),
    #[error("the decision's credential cannot be opened: {0}")]
    Sealed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn verdict(d: &sluice_events::Decision) -> Verdict {
    let outcome = match &d.outcome {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
        Outcome::AskWebhook { .. } => "ask_webhook",
    };
    Verdict {
        outcome: outcome.into(),
        reason: d.reason.as_str().into(),
        method: d.method.map(|m| m.as_str().to_owned()),
        subject: d.subject.as_deref().map(str::to_owned),
    }
}

/// The state at `position`: the nearest checkpoint at or below it, then the log.
pub async fn state_at(
    store: &EventStore,
    keyring: &Arc<Keyring>,
    position: Position,
) -> Result<(AuthState, u64, u64), StoreError> {
    let pool = store.pool();
    let row = sqlx::query(
        "SELECT position, snapshot FROM state_checkpoints WHERE position <= $1 ORDER BY position DESC LIMIT 1",
    )
    .bind(position.0 as i64)
    .fetch_optional(pool)
    .await?;
    let mut state = AuthState::for_data_plane(Some(keyring.clone()));
    let mut from = 0;
    if let Some(row) = row {
        let bytes: Vec<u8> = row.try_get("snapshot")?;
        let ring = keyring.clone();
        match tokio::task::spawn_blocking(move || snapshot::decode(&bytes, Some(ring))).await {
            Ok(Ok((s, info))) => {
                from = info.position.0;
                state = s;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "state checkpoint unreadable; rebuilding from the start of the log")
            }
            Err(_) => {}
        }
    }
    // Only the events that change access tables are read; the state skips over the rest
    // (decisions, API calls, API keys), which are most of the log.
    let mut replayed = 0;
    loop {
        let page = store.read_tables_between(state.position(), position, 5000).await?;
        let Some(last) = page.last().map(|e| e.position) else { break };
        for e in &page {
            state.skip_to(Position(e.position.0 - 1)).map_err(|err| StoreError::Database(err.to_string()))?;
            state.apply(e).map_err(|err| StoreError::Database(err.to_string()))?;
            replayed += 1;
        }
        if page.len() < 5000 || last >= position {
            break;
        }
    }
    state.skip_to(position).map_err(|err| StoreError::Database(err.to_string()))?;
    Ok((state, from, replayed))
}

pub async fn explain(store: &EventStore, keyring: &Arc<Keyring>, id: Uuid) -> Result<Explanation, ExplainError> {
    let started = Instant::now();
    let (position, record, conflict_with) =
        find_with_conflict(store.pool(), id).await?.ok_or(ExplainError::NotFound(id))?;
    let request = record.request.reopen(id, keyring).map_err(|e| ExplainError::Sealed(e.to_string()))?;
    let recorded = verdict(&record.decision);
    // A request that could not be read has nothing to replay: its record is its explanation.
    let malformed = record.decision.reason == sluice_events::Reason::Malformed;
    let (replay, matches, from, replayed) = if malformed {
        (recorded.clone(), true, 0, 0)
    } else {
        let (state, from, replayed) = state_at(store, keyring, record.decision.position).await?;
        let again = sluice_events::decide(&state, &request, record.decided_at);
        let matches = again.outcome == record.decision.outcome
            && again.reason == record.decision.reason
            && again.method == record.decision.method
            && again.subject == record.decision.subject;
        (verdict(&again), matches, from, replayed)
    };
    let d = &record.decision;
    let policy = format!("{} policy of app {}", request.action.as_str(), request.app);
    let mut rule = match (&d.outcome, d.method) {
        (Outcome::Allow, Some(m)) => format!(
            "{policy}: method {} accepted{}",
            m.as_str(),
            d.subject.as_ref().map(|s| format!(" {s}")).unwrap_or_default()
        ),
        (Outcome::AskWebhook { url, .. }, _) => {
            format!("{policy}: no local method accepted; the webhook {url} was asked")
        }
        (_, Some(m)) => format!("{policy}: refused, {} ({})", d.reason.as_str(), m.as_str()),
        (_, None) if malformed => "the request could not be read (a malformed streamid or name): refused, malformed; \
             nothing of it is kept but the address, the protocol and the time"
            .to_owned(),
        (_, None) => format!("{policy}: refused, {}", d.reason.as_str()),
    };
    if record.final_reason != d.reason {
        rule.push_str(&format!("; then the worker refused: {}", record.final_reason.as_str()));
    }
    Ok(Explanation {
        decision_id: id,
        position: position.0,
        state_position: d.position.0,
        node: record.node.as_ref().map(|n| n.as_str().to_owned()),
        app: request.app.as_str().to_owned(),
        stream: d.stream.as_str().to_owned(),
        action: request.action.as_str().to_owned(),
        client_ip: request.client_ip.to_string(),
        recorded,
        replayed: replay,
        matches,
        allowed: record.allowed,
        final_reason: record.final_reason.as_str().to_owned(),
        rule,
        webhook: record.webhook.clone(),
        repeats: record.repeats,
        conflict_with,
        rebuilt_from: from,
        events_replayed: replayed,
        took_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}
