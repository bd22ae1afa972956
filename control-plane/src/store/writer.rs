//! The one writer task: group commit (every waiting request, up to 256, in one transaction),
//! the one-statement path on the writer's belief about the log (`Known`), the general path
//! under the append lock, and the writer's own connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_events::{Position, Sha256Digest};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Row};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::plan::{Head, Plan, plan};
use super::sql::{MAX_INSERT_BYTES, is_unique_violation, read_heads};
use super::{AppendRequest, Appended, ExpectedVersion, PathCounters, StoreError};

/// Every appender takes this transaction-scoped advisory lock ("sluice" + 1).
pub(super) const APPEND_LOCK: i64 = 0x736c_7569_6365_0001;
/// Most requests folded into one transaction.
pub(super) const MAX_BATCH_REQUESTS: usize = 256;

pub(super) async fn writer(pool: PgPool, mut rx: mpsc::Receiver<AppendRequest>, paths: Arc<PathCounters>) {
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
        let started = std::time::Instant::now();
        let results = match commit_round(&pool, &mut conn, &batch, &mut known, &paths).await {
            Ok(results) => results,
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        };
        let m = &*crate::metrics::METRICS;
        m.append_seconds.observe(started.elapsed().as_secs_f64());
        m.append_batch_events.observe(batch.iter().map(|r| r.events.len()).sum::<usize>() as f64);
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
pub(super) async fn commit_round(
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

/// Streams' last versions (`None`: the stream has no event).
pub(super) type Versions = HashMap<String, Option<u64>>;

/// Streams whose version the writer remembers between batches, at most.
pub(super) const MAX_KNOWN_STREAMS: usize = 65_536;

/// What the writer believes about the log between batches: the head it last read under the
/// lock or committed itself, and the last version of the streams it has read or written
/// since. True while no other writer appends; the one-statement append checks it under the
/// lock, and any doubt (a stale belief, an error) forgets it all.
#[derive(Debug, Default)]
pub(super) struct Known {
    pub(super) head: Option<Head>,
    pub(super) versions: HashMap<String, Option<u64>>,
}

impl Known {
    pub(super) fn forget(&mut self) {
        self.head = None;
        self.versions.clear();
    }

    pub(super) fn learn(&mut self, plan: &Plan<'_>) {
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
    pub(super) fn versions_for(&self, batch: &[AppendRequest]) -> Option<(Versions, Vec<String>)> {
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

pub(super) async fn commit_batch(
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
pub(super) async fn append_in_one_statement(
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

pub(super) enum Attempt {
    Done(Vec<Result<Appended, StoreError>>),
    /// Rolled back: decide again with every event id probed.
    ProbeAll,
}

pub(super) async fn commit_batch_once(
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

/// The batch, inside the transaction that holds the append lock.
pub(super) async fn commit_locked(
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
    // The log is partitioned: no index keeps event ids or stream versions unique across
    // partitions, so they are checked here, under the lock (SQLSTATE 23505, as the indexes
    // answered), and the partition the last row goes to is made if it does not exist yet.
    let checked = sqlx::query("SELECT sluice_check_new_rows($1, $2, $3, '{}', $4)")
        .bind(&cols.event_id)
        .bind(&cols.stream)
        .bind(&cols.version)
        .bind(cols.position.last().copied().unwrap_or(1))
        .execute(&mut *conn)
        .await;
    match checked {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) && !probe_all => return Ok(Attempt::ProbeAll),
        Err(e) => return Err(e.into()),
    }
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
    use tokio::sync::oneshot;

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
}
