//! The Postgres event store: `append` (group-committed under one advisory lock, gap-free
//! positions, optimistic concurrency, idempotent by event id, hash-chained), `read_all`,
//! `read_stream`, `subscribe` (LISTEN/NOTIFY wake-ups, then read from the last position) and
//! `verify` (walks the chain).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sluice_events::canonical::to_canonical;
use sluice_events::event::{CanonicalJson, CanonicalRow, GENESIS, chain_hash_row};
use sluice_events::{DecodeError, Event, Metadata, NewEvent, Position, RecordedEvent, Sha256Digest, Timestamp};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgRow};
use sqlx::{Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Every appender takes this transaction-scoped advisory lock ("sluice" + 1).
const APPEND_LOCK: i64 = 0x736c_7569_6365_0001;
/// Most requests folded into one transaction.
const MAX_BATCH_REQUESTS: usize = 256;
/// Rows read per page.
const PAGE: i64 = 1000;

/// What the appender believes the stream's version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check (used for facts that cannot conflict, such as decisions).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event has this version.
    Exact(u64),
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub positions: Vec<Position>,
    /// The stream's version after the append.
    pub stream_version: Option<u64>,
    /// True when every event id was already in the log: nothing was written.
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict on stream {stream}: expected {expected}, found {}", actual.map_or("no stream".to_owned(), |v| format!("version {v}")))]
    Conflict { stream: String, expected: ExpectedVersion, actual: Option<u64> },
    #[error("event {event_id} was already appended with a different batch of events")]
    IdempotencyMismatch { event_id: Uuid },
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    #[error("cannot read the event at position {position}: {source}")]
    Decode { position: Position, source: DecodeError },
    #[error("Postgres is unreachable: {0}")]
    Unavailable(String),
    #[error("Postgres error: {0}")]
    Database(String),
    #[error("the event store's writer has stopped")]
    WriterGone,
}

impl StoreError {
    fn from_sqlx(e: sqlx::Error) -> StoreError {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("57P01") => {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        }
    }

    /// True for failures worth retrying later (the database went away), as opposed to
    /// requests that are wrong.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::WriterGone)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from_sqlx(e)
    }
}

struct AppendRequest {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    /// Each event's payload as canonical JSON, and the request's metadata: written by the
    /// caller's task, so concurrent callers serialize in parallel and the writer only chains.
    data: Vec<String>,
    metadata: String,
    /// Facts (decisions): each event id already in the log is skipped on its own, instead of
    /// the whole request having to be an exact retry.
    skip_known: bool,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// Handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventStore {
    pool: PgPool,
    writer: mpsc::Sender<AppendRequest>,
    paths: Arc<PathCounters>,
}

/// How many group commits took each path (see `commit_batch`).
#[derive(Debug, Default)]
struct PathCounters {
    one_statement: AtomicU64,
    general: AtomicU64,
}

/// Group commits so far by path: one statement (the writer's belief about the log held), or
/// the general path (reads under the lock first: the first append, another writer appended,
/// a retried event id, a request with unknown expectations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendPaths {
    pub one_statement: u64,
    pub general: u64,
}

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendRequest").field("stream", &self.stream).field("events", &self.events.len()).finish()
    }
}

/// Runs the embedded migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("../migrations").run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(inner) => StoreError::from_sqlx(inner),
        other => StoreError::Database(other.to_string()),
    })
}

fn to_datetime(t: Timestamp) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.0).single().unwrap_or_default()
}

/// A row as stored, before decoding: what verification hashes.
struct RawRow {
    position: Position,
    event_id: Uuid,
    stream: String,
    version: u64,
    event_type: String,
    type_version: u16,
    /// The JSON text as stored: canonical for rows appended since the log became `json`,
    /// jsonb's rendering for rows from before.
    data: String,
    metadata: String,
    recorded_at: Timestamp,
    hash: Vec<u8>,
}

/// The row columns, with a fixed tail; sqlx wants a `&'static str`.
macro_rules! select_rows {
    ($tail:literal) => {
        concat!(
            "SELECT position, event_id, stream, version, type, type_version, data::text AS data, \
             metadata::text AS metadata, recorded_at, hash FROM events",
            $tail
        )
    };
}

impl RawRow {
    fn from_row(row: &PgRow) -> Result<RawRow, sqlx::Error> {
        let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
        Ok(RawRow {
            position: Position(row.try_get::<i64, _>("position")? as u64),
            event_id: row.try_get("event_id")?,
            stream: row.try_get("stream")?,
            version: row.try_get::<i64, _>("version")? as u64,
            event_type: row.try_get("type")?,
            type_version: row.try_get::<i16, _>("type_version")? as u16,
            data: row.try_get("data")?,
            metadata: row.try_get("metadata")?,
            recorded_at: Timestamp(recorded_at.timestamp_millis()),
            hash: row.try_get("hash")?,
        })
    }

    /// The row's chain hash after `prev`, recomputed: over the stored text when that is the
    /// canonical text (every row appended since the log became `json`), else over the text
    /// canonicalized (rows from before, stored as jsonb printed them).
    fn chain_hash(&self, prev: &Sha256Digest) -> Sha256Digest {
        let row = |data, metadata| CanonicalRow {
            position: self.position,
            event_id: &self.event_id,
            stream: &self.stream,
            version: self.version,
            event_type: &self.event_type,
            type_version: self.type_version,
            recorded_at: self.recorded_at,
            data,
            metadata,
        };
        let stored = (CanonicalJson::Written(self.data.as_bytes()), CanonicalJson::Written(self.metadata.as_bytes()));
        let (hash, _) = chain_hash_row(prev, &row(stored.0, stored.1));
        if hash.0.as_slice() == self.hash.as_slice() {
            return hash;
        }
        let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
        let (data, metadata) = (parse(&self.data), parse(&self.metadata));
        chain_hash_row(prev, &row(CanonicalJson::Value(&data), CanonicalJson::Value(&metadata))).0
    }

    fn decode(self) -> Result<RecordedEvent, StoreError> {
        let event = Event::decode_str(&self.event_type, self.type_version, &self.data)
            .map_err(|source| StoreError::Decode { position: self.position, source })?;
        let hash: [u8; 32] = self.hash.as_slice().try_into().unwrap_or([0; 32]);
        Ok(RecordedEvent {
            position: self.position,
            event_id: self.event_id,
            stream: self.stream,
            version: self.version,
            event,
            // Metadata is informational: an unreadable one must not make the event unreadable.
            metadata: serde_json::from_str(&self.metadata).unwrap_or_default(),
            recorded_at: self.recorded_at,
            hash: Sha256Digest(hash),
        })
    }
}

impl EventStore {
    /// Starts the group-commit writer. The pool should already be migrated.
    pub fn start(pool: PgPool) -> EventStore {
        let (tx, rx) = mpsc::channel(4096);
        let paths = Arc::new(PathCounters::default());
        tokio::spawn(writer(pool.clone(), rx, paths.clone()));
        EventStore { pool, writer: tx, paths }
    }

    /// Group commits so far, by path.
    pub fn append_paths(&self) -> AppendPaths {
        AppendPaths {
            one_statement: self.paths.one_statement.load(Ordering::Relaxed),
            general: self.paths.general.load(Ordering::Relaxed),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream` if its version is `expected`; answers once committed.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        if let Some(e) = events.iter().find(|e| e.event.log_stream() != stream) {
            return Err(StoreError::InvalidAppend(format!(
                "{} belongs to stream {}, not {stream}",
                e.event.event_type(),
                e.event.log_stream()
            )));
        }
        self.send(stream, expected, events, metadata, false).await
    }

    /// Appends facts that cannot conflict (decisions re-delivered in any grouping): events
    /// whose id is already in the log are skipped one by one, the rest appended in order.
    /// `positions` holds only the new ones; `duplicate` says nothing was new.
    pub async fn append_facts(
        &self,
        stream: &str,
        events: Vec<NewEvent>,
        metadata: Metadata,
    ) -> Result<Appended, StoreError> {
        if let Some(e) = events.iter().find(|e| e.event.log_stream() != stream) {
            return Err(StoreError::InvalidAppend(format!(
                "{} belongs to stream {}, not {stream}",
                e.event.event_type(),
                e.event.log_stream()
            )));
        }
        self.send(stream, ExpectedVersion::Any, events, metadata, true).await
    }

    async fn send(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        metadata: Metadata,
        skip_known: bool,
    ) -> Result<Appended, StoreError> {
        let (reply, answer) = oneshot::channel();
        let data = events.iter().map(|e| canonical_string(|out| e.event.write_data(out))).collect();
        let metadata = canonical_string(|out| to_canonical(&metadata, out));
        let request = AppendRequest { stream: stream.to_owned(), expected, events, data, metadata, skip_known, reply };
        self.writer.send(request).await.map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// A dedicated connection holding the session-level advisory lock `key`, waited for (every
    /// 500 ms): leadership for one-per-cluster jobs (relay, ingest). The lock dies with the
    /// connection, so a crashed leader frees it at once.
    pub async fn lead(&self, key: i64) -> Result<sqlx::PgConnection, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
            if got {
                return Ok(conn);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The last position in the log (0 when empty).
    pub async fn head(&self) -> Result<Position, StoreError> {
        let p: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events").fetch_one(&self.pool).await?;
        Ok(Position(p.unwrap_or(0) as u64))
    }

    /// The version of a stream's last event, or `None` if it has none.
    pub async fn stream_version(&self, stream: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM events WHERE stream = $1")
            .bind(stream)
            .fetch_one(&self.pool)
            .await?;
        Ok(v.map(|v| v as u64))
    }

    /// Events after `after`, in log order, at most `limit`. An event this build cannot decode
    /// ends the page: the events before it are returned, and a read that starts at it fails
    /// with `Decode`, so a reader neither skips it nor loses what precedes it.
    pub async fn read_all(&self, after: Position, limit: i64) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(select_rows!(" WHERE position > $1 ORDER BY position LIMIT $2"))
            .bind(after.0 as i64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            match RawRow::from_row(row).map_err(StoreError::from).and_then(RawRow::decode) {
                Ok(e) => events.push(e),
                Err(e) if events.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(events)
    }

    /// The position of an event, if it is in the log (idempotent request replays).
    pub async fn position_of(&self, event_id: Uuid) -> Result<Option<Position>, StoreError> {
        let p: Option<i64> = sqlx::query_scalar("SELECT position FROM events WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(p.map(|p| Position(p as u64)))
    }

    /// Events in (`after`, `upto`] that change access tables (`Event::NON_TABLE_TYPES` left
    /// out: decisions, API calls, API keys), at most `limit`, in order.
    pub async fn read_tables_between(
        &self,
        after: Position,
        upto: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let skipped: Vec<String> = Event::NON_TABLE_TYPES.iter().map(|t| (*t).to_owned()).collect();
        let rows = sqlx::query(select_rows!(
            " WHERE position > $1 AND position <= $2 AND NOT (type = ANY($3)) ORDER BY position LIMIT $4"
        ))
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .bind(skipped)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| RawRow::from_row(r).map_err(StoreError::from)?.decode()).collect()
    }

    /// Every event of one stream, in version order.
    pub async fn read_stream(&self, stream: &str) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows =
            sqlx::query(select_rows!(" WHERE stream = $1 ORDER BY version")).bind(stream).fetch_all(&self.pool).await?;
        rows.iter().map(|r| RawRow::from_row(r).map_err(StoreError::from)?.decode()).collect()
    }

    /// Live tail from `after`: catches up, then wakes on NOTIFY (and every second, in case a
    /// notification was missed) and reads from the last delivered position. It listens before
    /// it reads, so nothing committed between catch-up and live is lost. A decode error ends
    /// the subscription with that error: a reader must never skip an event.
    pub async fn subscribe(&self, after: Position) -> Result<Subscription, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("sluice_events").await?;
        let (tx, rx) = mpsc::channel(1024);
        let store = self.clone();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                match store.read_all(last, PAGE).await {
                    Ok(events) if !events.is_empty() => {
                        for e in events {
                            last = e.position;
                            if tx.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e @ StoreError::Decode { .. }) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event subscription could not read; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                tokio::select! {
                    n = listener.recv() => {
                        if let Err(e) = n {
                            tracing::warn!(error = %e, "event subscription lost its LISTEN connection; reconnecting");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Subscription { rx })
    }

    /// Walks the whole chain: positions contiguous from 1, every hash recomputed.
    pub async fn verify(&self) -> Result<VerifyReport, VerifyError> {
        let mut prev = GENESIS;
        let mut last = Position::ZERO;
        loop {
            let rows = sqlx::query(select_rows!(" WHERE position > $1 ORDER BY position LIMIT $2"))
                .bind(last.0 as i64)
                .bind(PAGE)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| VerifyError::Store(StoreError::from(e)))?;
            if rows.is_empty() {
                return Ok(VerifyReport { events: last.0, head: last, head_hash: prev });
            }
            for row in &rows {
                let raw = RawRow::from_row(row).map_err(|e| VerifyError::Store(e.into()))?;
                if raw.position != last.next() {
                    return Err(VerifyError::Gap { expected: last.next(), found: raw.position });
                }
                let expected = raw.chain_hash(&prev);
                if expected.0.as_slice() != raw.hash.as_slice() {
                    return Err(VerifyError::HashMismatch { position: raw.position });
                }
                prev = expected;
                last = raw.position;
            }
        }
    }
}

/// A live tail of the log.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<RecordedEvent, StoreError>>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Option<Result<RecordedEvent, StoreError>> {
        self.rx.recv().await
    }

    /// The next event if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Result<RecordedEvent, StoreError>> {
        self.rx.try_recv().ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub events: u64,
    pub head: Position,
    pub head_hash: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "hash chain broken at position {position}: the stored hash does not match the event (tampered or corrupted)"
    )]
    HashMismatch { position: Position },
    #[error("position gap: expected {expected}, found {found}")]
    Gap { expected: Position, found: Position },
    #[error(transparent)]
    Store(StoreError),
}

impl VerifyError {
    /// The first bad position, if the chain itself is broken.
    pub fn position(&self) -> Option<Position> {
        match self {
            VerifyError::HashMismatch { position } => Some(*position),
            VerifyError::Gap { expected, .. } => Some(*expected),
            VerifyError::Store(_) => None,
        }
    }
}

async fn writer(pool: PgPool, mut rx: mpsc::Receiver<AppendRequest>, paths: Arc<PathCounters>) {
    let mut batch: Vec<AppendRequest> = Vec::new();
    let mut known = Known::default();
    // The writer's own connection, kept between rounds: taking one from the pool for each
    // round cost a ping round trip (the pool checks an idle connection before lending it),
    // a third of the client's CPU per one-event append.
    let mut conn: Option<PoolConnection<Postgres>> = None;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // The callers answered last round are still making their next request: let them run
        // once, so a round gathers all of them instead of alternating one caller and the rest.
        tokio::task::yield_now().await;
        // Everything that queued up while the previous transaction committed goes together.
        while batch.len() < MAX_BATCH_REQUESTS {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let results = match commit_round(&pool, &mut conn, &batch, &mut known, &paths).await {
            Ok(results) => results,
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        };
        for (req, result) in batch.drain(..).zip(results) {
            let _ = req.reply.send(result);
        }
    }
}

/// One group commit on the writer's connection, taken from the pool (which checks it) when it
/// has none. After an error the connection is closed, not returned: it may be broken or hold
/// a transaction. A connection lost between rounds (Postgres restarted, a network cut) costs
/// one retry on a fresh one rather than an error. Retrying is safe: the retry plans from
/// nothing and reads the truth under the lock, so a round that did commit before the
/// connection went is found by its event ids and answered as the retry it is.
async fn commit_round(
    pool: &PgPool,
    conn: &mut Option<PoolConnection<Postgres>>,
    batch: &[AppendRequest],
    known: &mut Known,
    paths: &PathCounters,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    let mut retried = false;
    loop {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(pool.acquire().await?),
        };
        match commit_batch(c, batch, known, paths).await {
            Ok(results) => return Ok(results),
            Err(e) => {
                known.forget();
                if let Some(c) = conn.take() {
                    drop(c.detach());
                }
                if retried || !e.is_unavailable() {
                    return Err(e);
                }
                retried = true;
            }
        }
    }
}

/// The last event of the log: where the next append chains from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    position: Position,
    hash: Sha256Digest,
}

impl Head {
    const EMPTY: Head = Head { position: Position::ZERO, hash: GENESIS };
}

/// Streams' last versions (`None`: the stream has no event).
type Versions = HashMap<String, Option<u64>>;

/// Streams whose version the writer remembers between batches, at most.
const MAX_KNOWN_STREAMS: usize = 65_536;

/// What the writer believes about the log between batches: the head it last read under the
/// lock or committed itself, and the last version of the streams it has read or written
/// since. True while no other writer appends; the one-statement append checks it under the
/// lock, and any doubt (a stale belief, an error) forgets it all.
#[derive(Debug, Default)]
struct Known {
    head: Option<Head>,
    versions: HashMap<String, Option<u64>>,
}

impl Known {
    fn forget(&mut self) {
        self.head = None;
        self.versions.clear();
    }

    fn learn(&mut self, plan: &Plan<'_>) {
        if self.versions.len() > MAX_KNOWN_STREAMS {
            self.versions.clear();
        }
        self.head = Some(plan.head);
        self.versions.extend(plan.after.iter().map(|(s, v)| (s.clone(), *v)));
    }

    /// Each stream's version before `batch`, if every one is known or implied by the
    /// request's expectation; `None` sends the batch the general way. Also the streams whose
    /// version only an `Exact` expectation implies: the statement must check those.
    ///
    /// The rest need no check. The statement checks the head's position and hash, and the
    /// chain commits to the whole log, so an unchanged head means every version the writer
    /// learned is still exact. A stream believed absent gets version 0, which the
    /// `(stream, version)` index refuses if it exists. An `Exact(v)` belief can be wrong both
    /// ways, and too high would leave a gap in the stream's versions.
    fn versions_for(&self, batch: &[AppendRequest]) -> Option<(Versions, Vec<String>)> {
        let (mut before, mut check) = (HashMap::new(), Vec::new());
        for req in batch {
            if before.contains_key(&req.stream) {
                continue;
            }
            let version = match (self.versions.get(&req.stream), req.expected) {
                (Some(v), _) => *v,
                (None, ExpectedVersion::NoStream) => None,
                (None, ExpectedVersion::Exact(v)) => {
                    check.push(req.stream.clone());
                    Some(v)
                }
                (None, ExpectedVersion::Any) => return None,
            };
            before.insert(req.stream.clone(), version);
        }
        Some((before, check))
    }
}

/// Column vectors for one multi-row INSERT … SELECT FROM UNNEST. JSON goes as the canonical
/// text the hash covers (written once, stored as that `json` text); metadata once per
/// request, each row pointing at its request's.
#[derive(Default)]
struct Columns<'a> {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    stream: Vec<&'a str>,
    version: Vec<i64>,
    event_type: Vec<&'static str>,
    type_version: Vec<i16>,
    data: Vec<&'a str>,
    /// 1-based index into `metadata`.
    meta: Vec<i32>,
    recorded_at: Vec<DateTime<Utc>>,
    hash: Vec<Vec<u8>>,
    metadata: Vec<&'a str>,
    /// Approximate encoded size of each row (its canonical bytes), to size the statements.
    size: Vec<usize>,
}

impl Columns<'_> {
    /// Splits the rows into runs of at most `max_bytes` (at least one row each).
    fn chunks(&self, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, size) in self.size.iter().enumerate() {
            if i > start && bytes + size > max_bytes {
                out.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes += size;
        }
        if start < self.size.len() {
            out.push(start..self.size.len());
        }
        out
    }
}

/// Largest INSERT statement we send (rows' canonical bytes); a larger batch goes in several
/// statements of one transaction, on the general path. (sqlx 0.9.0 dropped TCP_NODELAY, so a
/// message over one TCP segment stalled ~40 ms; the vendored sqlx-core sets it again.)
const MAX_INSERT_BYTES: usize = 4 * 1024 * 1024;

async fn commit_batch(
    conn: &mut PgConnection,
    batch: &[AppendRequest],
    known: &mut Known,
    paths: &PathCounters,
) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
    // Fast path: what the writer knows of the log (nothing, after a doubt) lets it number and
    // chain the rows before it talks to Postgres, and send them in one statement.
    if let (Some(head), Some((before, check))) = (known.head, known.versions_for(batch)) {
        let plan = plan(batch, head, &mut HashMap::new(), before, crate::clock::now());
        // A conflict may be a retry of an append that already happened, which only probing
        // the event ids can tell: that is the general path's job.
        let conflict = plan.results.iter().any(Result::is_err);
        if !conflict && plan.cols.chunks(MAX_INSERT_BYTES).len() <= 1 {
            match append_in_one_statement(conn, &plan, &check).await {
                Ok(true) => {
                    paths.one_statement.fetch_add(1, Ordering::Relaxed);
                    known.learn(&plan);
                    return Ok(plan.results);
                }
                // Someone else appended (the head moved, or a row collided with theirs), or an
                // event id is already in the log (a retry): the general path reads the truth
                // under the lock.
                Ok(false) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
            known.forget();
        }
    }
    // General path: probe only each request's first event id. A request whose later ids are
    // already in the log (a mixed retry) makes the INSERT hit the unique index; then the
    // whole batch is decided again with every id probed. Nothing is written twice.
    paths.general.fetch_add(1, Ordering::Relaxed);
    match commit_batch_once(conn, batch, false, known).await? {
        Attempt::Done(results) => Ok(results),
        Attempt::ProbeAll => match commit_batch_once(conn, batch, true, known).await? {
            Attempt::Done(results) => Ok(results),
            Attempt::ProbeAll => Err(StoreError::Database("duplicate event id after a full probe".into())),
        },
    }
}

/// The planned rows, checked and committed by `sluice_append_at` in one round trip. False
/// when the head or a `check`ed stream's version was not what the plan assumed: nothing was
/// written (see `Known::versions_for` for why the other streams need no check).
async fn append_in_one_statement(
    conn: &mut PgConnection,
    plan: &Plan<'_>,
    check: &[String],
) -> Result<bool, sqlx::Error> {
    let (streams, versions): (Vec<&str>, Vec<Option<i64>>) =
        check.iter().map(|s| (s.as_str(), plan.before.get(s).copied().flatten().map(|v| v as i64))).unzip();
    let empty = plan.start == Head::EMPTY;
    let cols = &plan.cols;
    sqlx::query_scalar(
        "SELECT sluice_append_at($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::json[], $13, $14, $15, $16::json[])",
    )
        .bind(APPEND_LOCK)
        .bind((!empty).then_some(plan.start.position.0 as i64))
        .bind((!empty).then(|| plan.start.hash.0.to_vec()))
        .bind(streams)
        .bind(versions)
        .bind(&cols.position)
        .bind(&cols.event_id)
        .bind(&cols.stream)
        .bind(&cols.version)
        .bind(&cols.event_type)
        .bind(&cols.type_version)
        .bind(&cols.data)
        .bind(&cols.meta)
        .bind(&cols.recorded_at)
        .bind(&cols.hash)
        .bind(&cols.metadata)
        .fetch_one(conn)
        .await
}

enum Attempt {
    Done(Vec<Result<Appended, StoreError>>),
    /// Rolled back: decide again with every event id probed.
    ProbeAll,
}

async fn commit_batch_once(
    conn: &mut PgConnection,
    batch: &[AppendRequest],
    probe_all: bool,
    known: &mut Known,
) -> Result<Attempt, StoreError> {
    // BEGIN and the lock in one round trip. The lock must come before the reads in its own
    // statement: a statement's snapshot is taken when it starts, so reads in the same
    // statement as the lock could miss a commit that happened while it waited.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK})")))
        .execute(&mut *conn)
        .await?;
    let outcome = commit_locked(conn, batch, probe_all, known).await;
    if matches!(outcome, Ok(Attempt::Done(_))) {
        return outcome;
    }
    // Leave no transaction open. If even ROLLBACK fails the connection is broken; the error
    // makes the writer close it.
    let rolled_back = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    outcome.and_then(|attempt| rolled_back.map(|_| attempt).map_err(StoreError::from))
}

/// Head, already-known event ids (of `ids`) and each stream's version, in one round trip.
/// LATERAL forces index probes (a nested loop) whatever plan the prepared statement's plan
/// cache settles on: a plain `= ANY($1)` drifted to a sequential scan once the table had grown.
async fn read_heads(conn: &mut PgConnection, ids: &[Uuid], streams: &[String]) -> Result<PgRow, StoreError> {
    Ok(sqlx::query(
        "WITH known AS ( \
             SELECT k.id, e.position FROM unnest($1::uuid[]) AS k(id) \
             JOIN LATERAL (SELECT position FROM events WHERE event_id = k.id) e ON true), \
         vers AS ( \
             SELECT s.stream, v.version FROM unnest($2::text[]) AS s(stream) \
             JOIN LATERAL (SELECT version FROM events e WHERE e.stream = s.stream \
                           ORDER BY version DESC LIMIT 1) v ON true), \
         head AS (SELECT position, hash FROM events ORDER BY position DESC LIMIT 1) \
         SELECT (SELECT position FROM head) AS head, \
                (SELECT hash FROM head) AS head_hash, \
                (SELECT coalesce(array_agg(id), '{}') FROM known) AS known_ids, \
                (SELECT coalesce(array_agg(position), '{}') FROM known) AS known_positions, \
                (SELECT coalesce(array_agg(stream), '{}') FROM vers) AS version_streams, \
                (SELECT coalesce(array_agg(version), '{}') FROM vers) AS versions",
    )
    .bind(ids)
    .bind(streams)
    .fetch_one(conn)
    .await?)
}

/// Canonical JSON as a `String` (serde_json writes UTF-8).
fn canonical_string(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::with_capacity(256);
    write(&mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Adds one row (an event and its canonical payload) to the INSERT's columns, with the
/// request's metadata already added as the last of `cols.metadata`; answers the row's chain
/// hash.
fn push_row<'a>(
    cols: &mut Columns<'a>,
    prev: &Sha256Digest,
    position: Position,
    (e, data): (&NewEvent, &'a str),
    stream: &'a str,
    version: u64,
    recorded_at: Timestamp,
) -> Sha256Digest {
    let metadata = cols.metadata.last().copied().unwrap_or("{}");
    let (hash, size) = chain_hash_row(
        prev,
        &CanonicalRow {
            position,
            event_id: &e.event_id,
            stream,
            version,
            event_type: e.event.event_type(),
            type_version: e.event.schema_version(),
            recorded_at,
            data: CanonicalJson::Written(data.as_bytes()),
            metadata: CanonicalJson::Written(metadata.as_bytes()),
        },
    );
    cols.size.push(size);
    cols.position.push(position.0 as i64);
    cols.event_id.push(e.event_id);
    cols.stream.push(stream);
    cols.version.push(version as i64);
    cols.event_type.push(e.event.event_type());
    cols.type_version.push(e.event.schema_version() as i16);
    cols.data.push(data);
    cols.meta.push(i32::try_from(cols.metadata.len()).unwrap_or(i32::MAX));
    cols.recorded_at.push(to_datetime(recorded_at));
    cols.hash.push(hash.0.to_vec());
    hash
}

/// True for a unique violation (SQLSTATE 23505).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// A batch numbered, checked and hash-chained against a head and stream versions, before
/// anything is written.
struct Plan<'a> {
    /// The rows to insert.
    cols: Columns<'a>,
    /// One answer per request, true once the rows are committed.
    results: Vec<Result<Appended, StoreError>>,
    /// The head the rows chain from, and the head after them.
    start: Head,
    head: Head,
    /// Every stream of the batch: its version before the batch, and after it.
    before: HashMap<String, Option<u64>>,
    after: HashMap<String, Option<u64>>,
}

/// Plans `batch` on top of `start`, given the event ids known to be in the log and each of
/// the batch's streams' version (`before`, every stream present). Pure: no I/O.
fn plan<'a>(
    batch: &'a [AppendRequest],
    start: Head,
    known: &mut HashMap<Uuid, Position>,
    before: HashMap<String, Option<u64>>,
    recorded_at: Timestamp,
) -> Plan<'a> {
    let mut after = before.clone();
    let (mut position, mut prev) = (start.position, start.hash);
    let mut cols = Columns::default();
    let mut results = Vec::with_capacity(batch.len());
    for req in batch {
        let current = after.get(&req.stream).copied().flatten();
        if req.events.is_empty() {
            results.push(Ok(Appended { positions: vec![], stream_version: current, duplicate: false }));
            continue;
        }
        // A retry of an append that already happened (here or earlier in this batch). Facts
        // skip what is known one by one and append the rest.
        let seen: Vec<Option<Position>> = req.events.iter().map(|e| known.get(&e.event_id).copied()).collect();
        if !req.skip_known && seen.iter().any(Option::is_some) {
            results.push(match seen.iter().position(Option::is_none) {
                Some(i) => Err(StoreError::IdempotencyMismatch { event_id: req.events[i].event_id }),
                None => Ok(Appended {
                    positions: seen.into_iter().flatten().collect(),
                    stream_version: current,
                    duplicate: true,
                }),
            });
            continue;
        }
        let ok = match req.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current.is_none(),
            ExpectedVersion::Exact(v) => current == Some(v),
        };
        if !ok {
            results.push(Err(StoreError::Conflict {
                stream: req.stream.clone(),
                expected: req.expected,
                actual: current,
            }));
            continue;
        }
        cols.metadata.push(&req.metadata);
        let mut version = current;
        let mut positions = Vec::with_capacity(req.events.len());
        for (e, data) in req.events.iter().zip(&req.data) {
            if req.skip_known && known.contains_key(&e.event_id) {
                continue;
            }
            position = position.next();
            let v = version.map_or(0, |v| v + 1);
            version = Some(v);
            prev = push_row(&mut cols, &prev, position, (e, data), &req.stream, v, recorded_at);
            known.insert(e.event_id, position);
            positions.push(position);
        }
        after.insert(req.stream.clone(), version);
        let duplicate = req.skip_known && positions.is_empty();
        results.push(Ok(Appended { positions, stream_version: version, duplicate }));
    }
    Plan { cols, results, start, head: Head { position, hash: prev }, before, after }
}

/// The batch, inside the transaction that holds the append lock.
async fn commit_locked(
    conn: &mut PgConnection,
    batch: &[AppendRequest],
    mut probe_all: bool,
    learned: &mut Known,
) -> Result<Attempt, StoreError> {
    let streams: Vec<String> = batch.iter().map(|r| r.stream.clone()).collect::<HashSet<_>>().into_iter().collect();
    let row = loop {
        let ids: Vec<Uuid> = if probe_all {
            batch.iter().flat_map(|r| r.events.iter().map(|e| e.event_id)).collect()
        } else {
            // Facts are probed whole: any of their ids may be a re-delivery.
            batch
                .iter()
                .flat_map(|r| {
                    let n = if r.skip_known { r.events.len() } else { 1 };
                    r.events.iter().take(n).map(|e| e.event_id)
                })
                .collect()
        };
        let row = read_heads(conn, &ids, &streams).await?;
        // A retry (first id already in the log) needs every id's position: read again,
        // still under the lock.
        let retry =
            !probe_all && batch.iter().any(|r| !r.skip_known) && !row.try_get::<Vec<Uuid>, _>("known_ids")?.is_empty();
        if !retry {
            break row;
        }
        probe_all = true;
    };
    let start = match row.try_get::<Option<i64>, _>("head")? {
        Some(p) => {
            let hash: Vec<u8> = row.try_get("head_hash")?;
            Head { position: Position(p as u64), hash: Sha256Digest(hash.as_slice().try_into().unwrap_or([0; 32])) }
        }
        None => Head::EMPTY,
    };
    let known_ids: Vec<Uuid> = row.try_get("known_ids")?;
    let known_positions: Vec<i64> = row.try_get("known_positions")?;
    let mut known: HashMap<Uuid, Position> =
        known_ids.into_iter().zip(known_positions).map(|(id, p)| (id, Position(p as u64))).collect();
    let version_streams: Vec<String> = row.try_get("version_streams")?;
    let version_values: Vec<i64> = row.try_get("versions")?;
    let mut before: HashMap<String, Option<u64>> = streams.into_iter().map(|s| (s, None)).collect();
    before.extend(version_streams.into_iter().zip(version_values).map(|(s, v)| (s, Some(v as u64))));

    let plan = plan(batch, start, &mut known, before, crate::clock::now());
    if plan.cols.position.is_empty() {
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
        learned.learn(&plan);
        return Ok(Attempt::Done(plan.results));
    }
    let cols = &plan.cols;
    for range in cols.chunks(MAX_INSERT_BYTES) {
        let inserted = sqlx::query(
            "INSERT INTO events (position, event_id, stream, version, type, type_version, data, metadata, recorded_at, hash) \
             SELECT r.position, r.event_id, r.stream, r.version, r.type, r.type_version, r.data, ($11::json[])[r.meta], \
                    r.recorded_at, r.hash \
             FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::smallint[], \
                         $7::json[], $8::integer[], $9::timestamptz[], $10::bytea[]) \
                  AS r(position, event_id, stream, version, type, type_version, data, meta, recorded_at, hash)",
        )
        .bind(&cols.position[range.clone()])
        .bind(&cols.event_id[range.clone()])
        .bind(&cols.stream[range.clone()])
        .bind(&cols.version[range.clone()])
        .bind(&cols.event_type[range.clone()])
        .bind(&cols.type_version[range.clone()])
        .bind(&cols.data[range.clone()])
        .bind(&cols.meta[range.clone()])
        .bind(&cols.recorded_at[range.clone()])
        .bind(&cols.hash[range])
        .bind(&cols.metadata)
        .execute(&mut *conn)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) && !probe_all => return Ok(Attempt::ProbeAll),
            Err(e) => return Err(e.into()),
        }
    }
    sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
    learned.learn(&plan);
    Ok(Attempt::Done(plan.results))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: &str, expected: ExpectedVersion) -> AppendRequest {
        let (reply, _) = oneshot::channel();
        AppendRequest {
            stream: stream.into(),
            expected,
            events: vec![],
            data: vec![],
            metadata: "{}".into(),
            skip_known: false,
            reply,
        }
    }

    #[test]
    fn the_one_statement_path_needs_every_streams_version_known_or_implied() {
        let mut known = Known { head: Some(Head::EMPTY), versions: HashMap::from([("a".to_owned(), Some(3))]) };
        let batch = [
            request("a", ExpectedVersion::Exact(1)),
            request("b", ExpectedVersion::NoStream),
            request("c", ExpectedVersion::Exact(7)),
            request("c", ExpectedVersion::Any),
        ];
        let (before, check) = known.versions_for(&batch).unwrap();
        // What the writer saw wins over a request's expectation; the first request on a stream
        // the writer has not seen says what it believes, and the statement checks it.
        let expected = HashMap::from([("a".to_owned(), Some(3)), ("b".to_owned(), None), ("c".to_owned(), Some(7))]);
        assert_eq!(before, expected);
        // Only a version nothing but an `Exact` expectation vouches for is checked.
        assert_eq!(check, vec!["c".to_owned()]);
        assert_eq!(known.versions_for(&[request("d", ExpectedVersion::Any)]), None, "unknown: read it first");
        known.forget();
        assert_eq!((known.head, known.versions.len()), (None, 0));
    }

    #[test]
    fn rows_are_chunked_by_size_and_never_dropped() {
        let cols = Columns { size: vec![10, 10, 25, 5, 40, 1], ..Columns::default() };
        assert_eq!(cols.chunks(30), vec![0..2, 2..4, 4..5, 5..6]);
        assert_eq!(cols.chunks(1000), vec![0..6]);
        // A row larger than the cap still goes, alone.
        assert_eq!(cols.chunks(1), vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6]);
        assert!(Columns::default().chunks(10).is_empty());
    }
}
