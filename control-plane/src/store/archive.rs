//! Archived log ranges (issue #19, "a log that stays bounded"). The log is partitioned by
//! position ranges (`migrations/20261130000001_partitioned_log.sql`); `archive` writes a whole
//! partition's rows to a segment file, checks it, records it in `log_archives` with the chain
//! hashes around it and a signed anchor of its last hash, and detaches the partition (never a
//! `DELETE`). Every read of the log below the live range goes through the segments, so the
//! projection's checked fold, `verify-log`, `replay` and `explain` see one log.
//!
//! A segment is NDJSON: a header line, then one line per row with the stored JSON text of its
//! data and metadata (the chain hashes that text), so a segment verifies on its own.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_events::{Position, Sha256Digest, Timestamp};
use sqlx::Row;
use uuid::Uuid;

use super::{EventStore, RawRow, StoreError};

/// One archived range as `log_archives` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    pub first: Position,
    pub last: Position,
    /// The chain hash before the first row (the previous range's last, or genesis).
    pub prev_hash: Sha256Digest,
    pub last_hash: Sha256Digest,
    pub events: u64,
    /// The file's name in the archive directory.
    pub segment: String,
    pub segment_sha256: Sha256Digest,
    pub bytes: u64,
    /// The signed anchor of (`last`, `last_hash`), as JSON.
    pub anchor: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    sluice_segment: u32,
    first: u64,
    last: u64,
    prev_hash: Sha256Digest,
    last_hash: Sha256Digest,
    events: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    position: u64,
    event_id: Uuid,
    stream: String,
    version: u64,
    #[serde(rename = "type")]
    event_type: String,
    type_version: u16,
    data: String,
    metadata: String,
    recorded_at: i64,
    hash: String,
}

impl From<&RawRow> for Line {
    fn from(r: &RawRow) -> Line {
        Line {
            position: r.position.0,
            event_id: r.event_id,
            stream: r.stream.clone(),
            version: r.version,
            event_type: r.event_type.clone(),
            type_version: r.type_version,
            data: r.data.clone(),
            metadata: r.metadata.clone(),
            recorded_at: r.recorded_at.0,
            hash: hex::encode(&r.hash),
        }
    }
}

impl Line {
    fn into_raw(self) -> Result<RawRow, String> {
        Ok(RawRow {
            position: Position(self.position),
            event_id: self.event_id,
            stream: self.stream,
            version: self.version,
            event_type: self.event_type,
            type_version: self.type_version,
            data: self.data,
            metadata: self.metadata,
            recorded_at: Timestamp(self.recorded_at),
            hash: hex::decode(&self.hash).map_err(|e| format!("position {}: hash: {e}", self.position))?,
        })
    }
}

/// Where segments are read from, and a reader kept open between pages (a fold reads a
/// segment front to back, a page at a time).
#[derive(Debug, Default)]
pub(super) struct Segments {
    pub(super) dir: Option<PathBuf>,
    open: Option<OpenSegment>,
    /// Segments whose file digest was checked by this process.
    checked: HashSet<String>,
}

#[derive(Debug)]
struct OpenSegment {
    name: String,
    /// The position of the last row read (the next line follows it).
    at: Position,
    lines: std::io::Lines<BufReader<std::fs::File>>,
}

fn corrupt(segment: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Integrity(format!("archive segment {segment}: {what}"))
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Database(format!("archive: {e}"))
}

fn file_sha256(path: &Path) -> std::io::Result<(Sha256Digest, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((Sha256Digest(hasher.finalize().into()), bytes))
}

impl Segments {
    /// Up to `limit` rows after `after` from `archive`'s segment (which holds `after + 1`).
    fn rows_after(&mut self, archive: &ArchiveInfo, after: Position, limit: i64) -> Result<Vec<RawRow>, StoreError> {
        let name = &archive.segment;
        let dir = self.dir.clone().ok_or_else(|| {
            StoreError::Integrity(format!(
                "positions {}..{} of the log are archived in {name}; set SLUICE_ARCHIVE_DIR to the directory \
                 that holds the segments",
                archive.first, archive.last
            ))
        })?;
        let path = dir.join(name);
        if !self.checked.contains(name) {
            let (digest, _) = file_sha256(&path).map_err(|e| corrupt(name, format!("{}: {e}", path.display())))?;
            if digest != archive.segment_sha256 {
                return Err(corrupt(name, "its SHA-256 is not the one recorded when it was archived"));
            }
            self.checked.insert(name.clone());
        }
        let reuse = self.open.as_ref().is_some_and(|o| &o.name == name && o.at <= after);
        if !reuse {
            let file = std::fs::File::open(&path).map_err(|e| corrupt(name, e))?;
            let mut lines = BufReader::with_capacity(1 << 20, file).lines();
            let header = lines.next().ok_or_else(|| corrupt(name, "empty"))?.map_err(|e| corrupt(name, e))?;
            let header: Header = serde_json::from_str(&header).map_err(|e| corrupt(name, format!("header: {e}")))?;
            if (header.first, header.last, header.prev_hash, header.last_hash)
                != (archive.first.0, archive.last.0, archive.prev_hash, archive.last_hash)
            {
                return Err(corrupt(name, "its header is not the range log_archives records"));
            }
            self.open = Some(OpenSegment { name: name.clone(), at: Position(header.first - 1), lines });
        }
        let Some(open) = self.open.as_mut() else { return Ok(Vec::new()) };
        let mut rows = Vec::new();
        while (rows.len() as i64) < limit && open.at < archive.last {
            let line = match open.lines.next() {
                Some(line) => line.map_err(|e| corrupt(name, e))?,
                None => return Err(corrupt(name, format!("ends at position {} before {}", open.at, archive.last))),
            };
            let row = serde_json::from_str::<Line>(&line)
                .map_err(|e| corrupt(name, format!("after position {}: {e}", open.at)))?
                .into_raw()
                .map_err(|e| corrupt(name, e))?;
            open.at = row.position;
            if row.position == archive.last && row.hash.as_slice() != archive.last_hash.0.as_slice() {
                return Err(corrupt(name, "its last row is not the hash log_archives records"));
            }
            if row.position > after {
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

fn digest_of(bytes: Vec<u8>) -> Result<Sha256Digest, StoreError> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(Sha256Digest)
        .map_err(|_| StoreError::Integrity("a recorded hash is not 32 bytes".into()))
}

impl EventStore {
    /// Where archived segments are read from (`SLUICE_ARCHIVE_DIR`).
    pub fn set_archive_dir(&self, dir: Option<PathBuf>) {
        self.segments.lock().unwrap_or_else(|p| p.into_inner()).dir = dir;
    }

    /// The archived ranges, oldest first.
    pub async fn archives(&self) -> Result<Vec<ArchiveInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT first_position, last_position, prev_hash, last_hash, events, segment, segment_sha256, bytes, anchor \
             FROM log_archives ORDER BY first_position",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ArchiveInfo {
                    first: Position(r.try_get::<i64, _>("first_position")? as u64),
                    last: Position(r.try_get::<i64, _>("last_position")? as u64),
                    prev_hash: digest_of(r.try_get("prev_hash")?)?,
                    last_hash: digest_of(r.try_get("last_hash")?)?,
                    events: r.try_get::<i64, _>("events")? as u64,
                    segment: r.try_get("segment")?,
                    segment_sha256: digest_of(r.try_get("segment_sha256")?)?,
                    bytes: r.try_get::<i64, _>("bytes")? as u64,
                    anchor: r.try_get("anchor")?,
                })
            })
            .collect()
    }

    /// The archived range holding `position`, if any.
    pub(super) async fn archive_holding(&self, position: Position) -> Result<Option<ArchiveInfo>, StoreError> {
        let archived: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM log_archives WHERE last_position >= $1)")
            .bind(position.0 as i64)
            .fetch_one(&self.pool)
            .await?;
        if !archived {
            return Ok(None);
        }
        Ok(self.archives().await?.into_iter().find(|a| a.first <= position && position <= a.last))
    }

    /// Up to `limit` rows after `after`, from the segments while `after + 1` is archived,
    /// else from the table (a page never spans both).
    pub(super) async fn rows_after(&self, after: Position, limit: i64) -> Result<Vec<RawRow>, StoreError> {
        if let Some(archive) = self.archive_holding(after.next()).await? {
            let mut segments = self.segments.lock().unwrap_or_else(|p| p.into_inner());
            return segments.rows_after(&archive, after, limit);
        }
        let rows = sqlx::query(select_rows!(" WHERE position > $1 ORDER BY position LIMIT $2"))
            .bind(after.0 as i64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| RawRow::from_row(r).map_err(StoreError::from)).collect()
    }

    /// Archives every whole live partition that ends at least `keep` events before the head:
    /// each one's rows (their chain checked from the hash before them) go to a segment file in
    /// `dir` (written, fsynced, read back and checked), `log_archives` records it with `anchor`
    /// of its last hash, and the partition is detached and dropped, in order. Returns what was
    /// archived.
    pub async fn archive(
        &self,
        dir: &Path,
        keep: u64,
        anchor: impl Fn(Position, Sha256Digest) -> String,
    ) -> Result<Vec<ArchiveInfo>, StoreError> {
        let head = self.head().await?;
        let partitions: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT name, from_position, to_position FROM log_partitions WHERE NOT archived ORDER BY from_position",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut done = Vec::new();
        for (name, from, to) in partitions {
            let last = Position(to as u64 - 1);
            if last.0.saturating_add(keep) > head.0 {
                break;
            }
            let start = Position(from as u64 - 1);
            let prev = match start.0 {
                0 => sluice_events::event::GENESIS,
                _ => self.hash_at(start).await?.ok_or_else(|| {
                    StoreError::Integrity(format!("no hash at position {start} before partition {name}"))
                })?,
            };
            let segment = format!("log-{:015}-{:015}.ndjson", from, last.0);
            let path = dir.join(&segment);
            let partial = dir.join(format!("{segment}.partial"));
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial).map_err(io)?);
            // The header names the range and the hashes around it; written first with the last
            // hash known only at the end, so the rows are read twice: once to check the chain.
            let (mut at, mut hash, mut events) = (start, prev, 0u64);
            loop {
                let rows = self.rows_after(at, super::PAGE).await?;
                let rows: Vec<RawRow> = rows.into_iter().filter(|r| r.position <= last).collect();
                let Some(tail) = rows.last() else { break };
                let tail = tail.position;
                for r in &rows {
                    if r.position != at.next() {
                        return Err(StoreError::Integrity(format!("gap in the log at position {}", at.next())));
                    }
                    let expected = r.chain_hash(&hash);
                    if expected.0.as_slice() != r.hash.as_slice() {
                        return Err(StoreError::Integrity(format!("hash chain broken at position {}", r.position)));
                    }
                    (at, hash) = (r.position, expected);
                    events += 1;
                }
                if tail >= last {
                    break;
                }
            }
            if at != last {
                return Err(StoreError::Integrity(format!("partition {name} ends at {at}, not {last}")));
            }
            let header = Header {
                sluice_segment: 1,
                first: from as u64,
                last: last.0,
                prev_hash: prev,
                last_hash: hash,
                events,
            };
            serde_json::to_writer(&mut out, &header).map_err(|e| StoreError::Database(e.to_string()))?;
            out.write_all(b"\n").map_err(io)?;
            let mut at = start;
            while at < last {
                let rows = self.rows_after(at, super::PAGE).await?;
                for r in rows.iter().filter(|r| r.position <= last) {
                    serde_json::to_writer(&mut out, &Line::from(r)).map_err(|e| StoreError::Database(e.to_string()))?;
                    out.write_all(b"\n").map_err(io)?;
                    at = r.position;
                }
            }
            let file = out.into_inner().map_err(|e| StoreError::Database(e.to_string()))?;
            file.sync_all().map_err(io)?;
            drop(file);
            std::fs::rename(&partial, &path).map_err(io)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            let (sha, bytes) = file_sha256(&path).map_err(io)?;
            let info = ArchiveInfo {
                first: Position(from as u64),
                last,
                prev_hash: prev,
                last_hash: hash,
                events,
                segment,
                segment_sha256: sha,
                bytes,
                anchor: anchor(last, hash),
            };
            // Read back through the same reader every later read uses, chain checked.
            let mut check = Segments { dir: Some(dir.to_owned()), ..Segments::default() };
            let (mut at, mut h) = (start, prev);
            while at < last {
                for r in check.rows_after(&info, at, super::PAGE)? {
                    if r.chain_hash(&h).0.as_slice() != r.hash.as_slice() {
                        return Err(corrupt(&info.segment, format!("reads back wrong at position {}", r.position)));
                    }
                    (at, h) = (r.position, r.chain_hash(&h));
                }
            }
            self.record_archive(&info, &name).await?;
            done.push(info);
        }
        Ok(done)
    }

    /// In one transaction: the archive's record, the streams' last versions, the partition
    /// detached; then the partition dropped.
    async fn record_archive(&self, info: &ArchiveInfo, partition: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO log_archives (first_position, last_position, prev_hash, last_hash, events, segment, \
             segment_sha256, bytes, anchor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(info.first.0 as i64)
        .bind(info.last.0 as i64)
        .bind(info.prev_hash.0.as_slice())
        .bind(info.last_hash.0.as_slice())
        .bind(info.events as i64)
        .bind(&info.segment)
        .bind(info.segment_sha256.0.as_slice())
        .bind(info.bytes as i64)
        .bind(&info.anchor)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO archived_stream_heads (stream, version, position) \
             SELECT DISTINCT ON (stream) stream, version, position FROM {} ORDER BY stream, version DESC \
             ON CONFLICT (stream) DO UPDATE SET version = excluded.version, position = excluded.position \
             WHERE archived_stream_heads.version < excluded.version",
            quote_ident(partition)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE events DETACH PARTITION {}", quote_ident(partition))))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE log_partitions SET archived = true WHERE name = $1")
            .bind(partition)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {}", quote_ident(partition)))).execute(&self.pool).await?;
        Ok(())
    }
}

/// A partition name as an SQL identifier (names are made by `sluice_ensure_partition`:
/// letters, digits and '_', but quoted all the same).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
