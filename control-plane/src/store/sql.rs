//! The SQL side of an append: the column vectors of one multi-row `INSERT … SELECT FROM
//! UNNEST`, the one read of head, known ids and stream versions, and canonical row text.

use chrono::{DateTime, Utc};
use sluice_events::event::{CanonicalJson, CanonicalRow, chain_hash_row};
use sluice_events::{NewEvent, Position, Sha256Digest, Timestamp};
use sqlx::postgres::{PgConnection, PgRow};
use uuid::Uuid;

use super::{StoreError, to_datetime};

/// Column vectors for one multi-row INSERT … SELECT FROM UNNEST. JSON goes as the canonical
/// text the hash covers (written once, stored as that `json` text); metadata once per
/// request, each row pointing at its request's.
#[derive(Default)]
pub(super) struct Columns<'a> {
    pub(super) position: Vec<i64>,
    pub(super) event_id: Vec<Uuid>,
    pub(super) stream: Vec<&'a str>,
    pub(super) version: Vec<i64>,
    pub(super) event_type: Vec<&'static str>,
    pub(super) type_version: Vec<i16>,
    pub(super) data: Vec<&'a str>,
    /// 1-based index into `metadata`.
    pub(super) meta: Vec<i32>,
    pub(super) recorded_at: Vec<DateTime<Utc>>,
    pub(super) hash: Vec<Vec<u8>>,
    pub(super) metadata: Vec<&'a str>,
    /// Approximate encoded size of each row (its canonical bytes), to size the statements.
    pub(super) size: Vec<usize>,
}

impl Columns<'_> {
    /// Splits the rows into runs of at most `max_bytes` (at least one row each).
    pub(super) fn chunks(&self, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
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
pub(super) const MAX_INSERT_BYTES: usize = 4 * 1024 * 1024;

/// Head, already-known event ids (of `ids`) and each stream's version, in one round trip.
/// LATERAL forces index probes (a nested loop) whatever plan the prepared statement's plan
/// cache settles on: a plain `= ANY($1)` drifted to a sequential scan once the table had grown.
pub(super) async fn read_heads(conn: &mut PgConnection, ids: &[Uuid], streams: &[String]) -> Result<PgRow, StoreError> {
    Ok(sqlx::query(
        "WITH known AS ( \
             SELECT k.id, e.position FROM unnest($1::uuid[]) AS k(id) \
             JOIN LATERAL (SELECT position FROM events WHERE event_id = k.id) e ON true), \
         vers AS ( \
             SELECT s.stream, v.version FROM unnest($2::text[]) AS s(stream) \
             JOIN LATERAL (SELECT sluice_stream_version(s.stream) AS version) v ON v.version IS NOT NULL), \
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
pub(super) fn canonical_string(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::with_capacity(256);
    write(&mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Adds one row (an event and its canonical payload) to the INSERT's columns, with the
/// request's metadata already added as the last of `cols.metadata`; answers the row's chain
/// hash.
pub(super) fn push_row<'a>(
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
pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
