//! The Postgres event store: `append` (group-committed under one advisory lock, gap-free
//! positions, optimistic concurrency, idempotent by event id, hash-chained), `read_all`,
//! `read_stream`, `subscribe` (LISTEN/NOTIFY wake-ups, then read from the last position) and
//! `verify` (walks the chain).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sluice_events::canonical::to_canonical;
use sluice_events::event::{CanonicalJson, CanonicalRow, chain_hash_row};
use sluice_events::{DecodeError, Event, Metadata, NewEvent, Position, RecordedEvent, Sha256Digest, Timestamp};
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

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
    /// The log fails its hash chain or its anchor: tampered or corrupted.
    #[error("{0}")]
    Integrity(String),
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
    /// Archived ranges' segment files (see `archive`).
    segments: Arc<std::sync::Mutex<archive::Segments>>,
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

mod archive;
mod plan;
mod sql;
mod verify;
mod writer;

pub use archive::ArchiveInfo;

use sql::canonical_string;
pub use verify::{VerifyError, VerifyReport};

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
        tokio::spawn(writer::writer(pool.clone(), rx, paths.clone()));
        EventStore { pool, writer: tx, paths, segments: Arc::default() }
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
        let v: Option<i64> =
            sqlx::query_scalar("SELECT sluice_stream_version($1)").bind(stream).fetch_one(&self.pool).await?;
        Ok(v.map(|v| v as u64))
    }

    /// Events after `after`, in log order, at most `limit`. An event this build cannot decode
    /// ends the page: the events before it are returned, and a read that starts at it fails
    /// with `Decode`, so a reader neither skips it nor loses what precedes it.
    pub async fn read_all(&self, after: Position, limit: i64) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = self.rows_after(after, limit).await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            match row.decode() {
                Ok(e) => events.push(e),
                Err(e) if events.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(events)
    }

    /// As `read_all`, but proven to extend the chain: positions follow `after` without a gap
    /// and every row's hash is recomputed from its stored text and `prev` (the hash at
    /// `after`, `GENESIS` at 0). The projection folds the log through this at start, so a row
    /// edited in Postgres (trigger disabled, replication role) is refused, not served.
    pub async fn read_chained(
        &self,
        after: Position,
        prev: Sha256Digest,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = self.rows_after(after, limit).await?;
        let (mut last, mut prev) = (after, prev);
        let mut events = Vec::with_capacity(rows.len());
        for raw in rows {
            if raw.position != last.next() {
                return Err(StoreError::Integrity(format!(
                    "the log has a gap: position {} follows {last} (rows deleted?)",
                    raw.position
                )));
            }
            let expected = raw.chain_hash(&prev);
            if expected.0.as_slice() != raw.hash.as_slice() {
                return Err(StoreError::Integrity(format!(
                    "hash chain broken at position {}: the stored event does not match its hash (edited in \
                     Postgres, or corrupted); run `sluice-control verify-log`",
                    raw.position
                )));
            }
            match raw.decode() {
                Ok(e) => events.push(e),
                Err(e) if events.is_empty() => return Err(e),
                Err(_) => break,
            }
            (last, prev) = (last.next(), expected);
        }
        Ok(events)
    }

    /// The stored hash of the row at `position`, if there is one.
    pub async fn hash_at(&self, position: Position) -> Result<Option<Sha256Digest>, StoreError> {
        if let Some(archive) = self.archive_holding(position).await? {
            if archive.last == position {
                return Ok(Some(archive.last_hash));
            }
            let row = self.rows_after(Position(position.0 - 1), 1).await?;
            return Ok(row.first().and_then(|r| <[u8; 32]>::try_from(r.hash.as_slice()).ok()).map(Sha256Digest));
        }
        let h: Option<Vec<u8>> = sqlx::query_scalar("SELECT hash FROM events WHERE position = $1")
            .bind(position.0 as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(h.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok()).map(Sha256Digest))
    }

    /// Where `event_id` is in the log, and the request digest it was written with (see
    /// `Metadata::request_digest`).
    pub async fn written_with(&self, event_id: Uuid) -> Result<Option<(Position, Metadata)>, StoreError> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT position, metadata::text FROM events WHERE event_id = $1")
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(p, m)| (Position(p as u64), serde_json::from_str(&m).unwrap_or_default())))
    }

    /// The position of an event, if it is in the log.
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
        // Archived positions come from their segments, every row read and the others left.
        let mut events = Vec::new();
        let mut after = after;
        while after < upto && self.archive_holding(after.next()).await?.is_some() {
            let rows = self.rows_after(after, PAGE).await?;
            let Some(tail) = rows.last().map(|r| r.position) else { break };
            for r in rows.into_iter().filter(|r| r.position <= upto) {
                if !Event::NON_TABLE_TYPES.contains(&r.event_type.as_str()) && (events.len() as i64) < limit {
                    events.push(r.decode()?);
                }
            }
            if events.len() as i64 >= limit {
                return Ok(events);
            }
            after = tail;
        }
        let skipped: Vec<String> = Event::NON_TABLE_TYPES.iter().map(|t| (*t).to_owned()).collect();
        let rows = sqlx::query(select_rows!(
            " WHERE position > $1 AND position <= $2 AND NOT (type = ANY($3)) ORDER BY position LIMIT $4"
        ))
        .bind(after.0 as i64)
        .bind(upto.0 as i64)
        .bind(skipped)
        .bind(limit - events.len() as i64)
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            events.push(RawRow::from_row(r).map_err(StoreError::from)?.decode()?);
        }
        Ok(events)
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
