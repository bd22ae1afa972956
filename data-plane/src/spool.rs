//! The decision spool (DESIGN.md §5): every decision is written here, durably, before the
//! client gets its answer; then it is published to `SLUICE_DECISIONS`, and it stays here until
//! the control plane says (through the KV mark) that it is in the log.
//!
//! On disk, in `<state_dir>/spool/`:
//! - `id`: the spool's random id (made once; names this spool's sequences in the marks);
//! - `seg-<first sequence, 20 digits>.log`: frames `len u32 LE | first 4 bytes of SHA-256 of
//!   the payload | payload` (the record as JSON), sequences ascending, one writer;
//! - `confirmed`: the highest sequence known to be in the log (a hint: without it, the worker
//!   re-sends what the log already holds, and ingestion ignores it).
//!
//! One thread owns the files. It takes every append waiting in its queue, writes them, then
//! one `fdatasync` answers them all: group commit, no timer, so a lone decision waits only for
//! its own fsync and a burst shares one. A torn last frame (a crash mid-write) is cut off at
//! boot with a log line; a bad frame elsewhere stops the read of that segment, loudly.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use sluice_events::DecisionRecord;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// A segment is closed once it grows past this.
const SEGMENT_BYTES: u64 = 4 << 20;
/// A frame larger than this is corruption, not a decision.
const MAX_FRAME: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("decision spool at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the decision spool's writer has stopped")]
    Stopped,
}

/// One durable, unconfirmed decision.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub sequence: u64,
    pub decision_id: Uuid,
    pub payload: Bytes,
}

type Reply = oneshot::Sender<Result<u64, SpoolError>>;

enum Msg {
    Append(Box<DecisionRecord>, Reply),
    Trim(u64),
}

#[derive(Debug)]
struct Inner {
    id: Uuid,
    /// Durable and not yet confirmed, in sequence order.
    pending: Mutex<VecDeque<Spooled>>,
    confirmed: AtomicU64,
    /// Highest durable sequence.
    durable: watch::Sender<u64>,
}

/// Handle to the spool; cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Msg>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), source }
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(payload);
    [d[0], d[1], d[2], d[3]]
}

/// Encodes one frame.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(payload));
    out.extend_from_slice(payload);
    out
}

/// Reads frames from `bytes`: the payloads and the length of the good prefix.
pub fn read_frames(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if len > MAX_FRAME || bytes.len() - at - 8 < len as usize {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len as usize];
        if checksum(payload) != bytes[at + 4..at + 8] {
            break;
        }
        out.push(payload);
        at += 8 + len as usize;
    }
    (out, at)
}

fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

struct Segments {
    dir: PathBuf,
    /// First sequence of each segment, ascending; the last one is open for appends.
    firsts: Vec<u64>,
    file: Option<File>,
    size: u64,
    segment_bytes: u64,
    /// A failed write could not be rolled back: nothing more is written (decisions are
    /// refused rather than recorded after a torn frame).
    broken: bool,
}

impl Segments {
    fn list(dir: &Path) -> io::Result<Vec<u64>> {
        let mut firsts: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        firsts.sort_unstable();
        Ok(firsts)
    }

    /// Appends frames for records starting at `first`; rotates first if the open segment
    /// is full.
    fn write(&mut self, first: u64, frames: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("an earlier write failed and could not be rolled back"));
        }
        if self.file.is_none() || self.size >= self.segment_bytes {
            let path = self.dir.join(segment_name(first));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            File::open(&self.dir)?.sync_all()?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
            if self.firsts.last() != Some(&first) {
                self.firsts.push(first);
            }
        }
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        match file.write_all(frames).and_then(|()| file.sync_data()) {
            Ok(()) => {
                self.size += frames.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut back to the last good frame, so later frames never follow a torn one.
                if file.set_len(self.size).and_then(|()| file.sync_all()).is_err() {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    /// Deletes every closed segment whose records are all at or below `confirmed`.
    fn trim(&mut self, confirmed: u64) -> io::Result<()> {
        while self.firsts.len() >= 2 && self.firsts[1] - 1 <= confirmed {
            let first = self.firsts.remove(0);
            fs::remove_file(self.dir.join(segment_name(first)))?;
        }
        Ok(())
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, SEGMENT_BYTES)
    }

    /// `open` with the segment size chosen (tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let id_path = dir.join("id");
        let id = match fs::read_to_string(&id_path) {
            Ok(text) => Uuid::parse_str(text.trim()).map_err(|e| SpoolError::Io {
                path: id_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = Uuid::new_v4();
                write_atomic(dir, "id", id.to_string().as_bytes()).map_err(io_err(dir))?;
                id
            }
            Err(e) => return Err(io_err(&id_path)(e)),
        };
        let confirmed: u64 =
            fs::read_to_string(dir.join("confirmed")).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        let firsts = Segments::list(dir).map_err(io_err(dir))?;
        let mut pending = VecDeque::new();
        let mut last = confirmed;
        for (i, first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(*first));
            let mut bytes = Vec::new();
            File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err(&path))?;
            let (frames, good) = read_frames(&bytes);
            if good < bytes.len() {
                if i + 1 == firsts.len() {
                    tracing::warn!(segment = %path.display(), cut = bytes.len() - good, "decision spool: torn last frame cut off (a crash mid-write; that decision was never answered)");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(good as u64).and_then(|()| f.sync_all()))
                        .map_err(io_err(&path))?;
                } else {
                    tracing::error!(segment = %path.display(), bad_bytes = bytes.len() - good, "decision spool: corrupt frame in a closed segment; the decisions after it in that segment cannot be read");
                }
            }
            for payload in frames {
                match serde_json::from_slice::<DecisionRecord>(payload) {
                    Ok(r) => {
                        let sequence = r.sequence.unwrap_or(0);
                        last = last.max(sequence);
                        if sequence > confirmed {
                            pending.push_back(Spooled {
                                sequence,
                                decision_id: r.decision.id,
                                payload: Bytes::copy_from_slice(payload),
                            });
                        }
                    }
                    Err(e) => {
                        tracing::error!(segment = %path.display(), error = %e, "decision spool: unreadable record skipped")
                    }
                }
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                pending = pending.len(),
                from = pending.front().map(|s| s.sequence),
                "decision spool: unconfirmed decisions from before the restart will be re-sent"
            );
        }
        let inner = Arc::new(Inner {
            id,
            pending: Mutex::new(pending),
            confirmed: AtomicU64::new(confirmed),
            durable: watch::Sender::new(last),
        });
        let (tx, rx) = mpsc::channel(4096);
        // Each run appends to a segment of its own (named by its first sequence).
        let segments = Segments { dir: dir.to_owned(), firsts, file: None, size: 0, segment_bytes, broken: false };
        let writer = Writer { inner: inner.clone(), segments, next: last + 1, rx, confirmed_written: confirmed };
        std::thread::Builder::new().name("sluice-spool".into()).spawn(move || writer.run()).map_err(io_err(dir))?;
        Ok(Spool { inner, tx })
    }

    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    /// Writes the record durably; answers its sequence once it is on disk.
    pub async fn append(&self, record: DecisionRecord) -> Result<u64, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Msg::Append(Box::new(record), reply)).await.map_err(|_| SpoolError::Stopped)?;
        answer.await.map_err(|_| SpoolError::Stopped)?
    }

    /// The control plane has everything up to `sequence`: drop it from memory and disk.
    pub fn confirm(&self, sequence: u64) {
        let before = self.inner.confirmed.fetch_max(sequence, Ordering::AcqRel);
        if sequence <= before {
            return;
        }
        {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            while pending.front().is_some_and(|s| s.sequence <= sequence) {
                pending.pop_front();
            }
        }
        let _ = self.tx.try_send(Msg::Trim(sequence));
    }

    pub fn confirmed(&self) -> u64 {
        self.inner.confirmed.load(Ordering::Acquire)
    }

    /// Highest durable sequence.
    pub fn durable(&self) -> u64 {
        *self.inner.durable.borrow()
    }

    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.inner.durable.subscribe()
    }

    /// Unconfirmed decisions after `after`, at most `max`.
    pub fn unconfirmed_after(&self, after: u64, max: usize) -> Vec<Spooled> {
        let pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        let start = pending.partition_point(|s| s.sequence <= after);
        pending.range(start..).take(max).cloned().collect()
    }

    /// How many decisions wait for the control plane.
    pub fn backlog(&self) -> usize {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

struct Writer {
    inner: Arc<Inner>,
    segments: Segments,
    next: u64,
    rx: mpsc::Receiver<Msg>,
    confirmed_written: u64,
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut appends = Vec::new();
            let mut trim = None;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    Msg::Append(record, reply) => appends.push((record, reply)),
                    Msg::Trim(seq) => trim = Some(trim.unwrap_or(0).max(seq)),
                }
                if appends.len() < 4096 {
                    msg = self.rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.append(appends);
            }
            if let Some(seq) = trim {
                self.trim(seq);
            }
        }
    }

    fn append(&mut self, appends: Vec<(Box<DecisionRecord>, Reply)>) {
        let first = self.next;
        let mut frames = Vec::with_capacity(appends.len() * 700);
        let mut spooled = Vec::with_capacity(appends.len());
        for (i, (record, _)) in appends.iter().enumerate() {
            let mut record = record.clone();
            let sequence = first + i as u64;
            record.sequence = Some(sequence);
            // Plain data: serializing cannot fail.
            let payload = serde_json::to_vec(&record).unwrap_or_default();
            frames.extend_from_slice(&frame(&payload));
            spooled.push(Spooled { sequence, decision_id: record.decision.id, payload: Bytes::from(payload) });
        }
        match self.segments.write(first, &frames) {
            Ok(()) => {
                self.next = first + appends.len() as u64;
                let last = self.next - 1;
                self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(spooled);
                self.inner.durable.send_replace(last);
                for (i, (_, reply)) in appends.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                // Nothing is answered as durable that is not; the open segment is abandoned
                // (its tail may be torn) and the next batch starts a new one.
                tracing::error!(error = %e, "decision spool: write failed; the decisions are refused");
                let path = self.segments.dir.clone();
                for (_, reply) in appends {
                    let _ = reply.send(Err(SpoolError::Io {
                        path: path.clone(),
                        source: io::Error::new(e.kind(), e.to_string()),
                    }));
                }
            }
        }
    }

    fn trim(&mut self, confirmed: u64) {
        if confirmed <= self.confirmed_written {
            return;
        }
        if let Err(e) = write_atomic(&self.segments.dir, "confirmed", confirmed.to_string().as_bytes())
            .and_then(|()| self.segments.trim(confirmed))
        {
            tracing::warn!(error = %e, "decision spool: cannot trim; it will retry on the next confirmation");
            return;
        }
        self.confirmed_written = confirmed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use sluice_events::decision::RecordedRequest;
    use sluice_events::{
        AccessRequest, Action, AppName, Credential, Decision, Outcome, Position, Protocol, Reason, StreamName,
        Timestamp,
    };

    fn record(n: u128) -> DecisionRecord {
        let req = AccessRequest {
            id: Uuid::from_u128(n),
            app: AppName::parse("live").unwrap(),
            stream: StreamName::parse("cam").unwrap(),
            action: Action::Play,
            protocol: Protocol::Rtmp,
            client_ip: "192.0.2.1".parse().unwrap(),
            credential: Credential::default(),
            client_id: None,
        };
        DecisionRecord {
            decision: Decision {
                id: req.id,
                outcome: Outcome::Allow,
                reason: Reason::Allowed,
                method: None,
                subject: None,
                stream: req.stream.clone(),
                position: Position(1),
                effects: vec![],
            },
            allowed: true,
            final_reason: Reason::Allowed,
            request: RecordedRequest::record(&req, None, [0; 24]),
            decided_at: Timestamp(1),
            node: None,
            webhook: None,
            sequence: None,
            publisher_slot: None,
            repeats: None,
        }
    }

    fn segments(dir: &Path) -> Vec<u64> {
        Segments::list(dir).unwrap()
    }

    #[tokio::test]
    async fn sequences_survive_a_restart_and_only_confirmed_decisions_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_with(dir.path(), 1).unwrap();
        let id = spool.id();
        for n in 1..=5 {
            assert_eq!(spool.append(record(n)).await.unwrap(), n as u64);
        }
        assert_eq!((spool.durable(), spool.backlog()), (5, 5));
        let ids: Vec<u128> = spool.unconfirmed_after(2, 10).iter().map(|s| s.decision_id.as_u128()).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        // One record per segment (1-byte segments): confirming 3 deletes the first three files.
        spool.confirm(3);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(segments(dir.path()), vec![4, 5]);
        assert_eq!(spool.backlog(), 2);
        spool.confirm(2);
        assert_eq!(spool.confirmed(), 3, "a mark never moves back");
        drop(spool);

        // A crash mid-write leaves a torn frame: cut off at boot, the rest kept.
        let last = dir.path().join(segment_name(5));
        let mut f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let spool = Spool::open_with(dir.path(), 1).unwrap();
        assert_eq!(spool.id(), id, "the spool keeps its id");
        assert_eq!((spool.confirmed(), spool.durable(), spool.backlog()), (3, 5, 2));
        let again: Vec<u64> = spool.unconfirmed_after(0, 10).iter().map(|s| s.sequence).collect();
        assert_eq!(again, vec![4, 5]);
        assert_eq!(spool.append(record(6)).await.unwrap(), 6, "sequences continue after a restart");
        let bytes = fs::read(&last).unwrap();
        assert_eq!(read_frames(&bytes).1, bytes.len(), "the torn tail is gone");
    }

    #[test]
    fn frames_round_trip_and_a_torn_or_flipped_tail_stops_the_read() {
        let mut bytes = frame(b"one");
        bytes.extend(frame(b"two"));
        let (frames, good) = read_frames(&bytes);
        assert_eq!(frames, vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(good, bytes.len());
        let torn = &bytes[..bytes.len() - 1];
        let (frames, good) = read_frames(torn);
        assert_eq!(frames, vec![&b"one"[..]]);
        assert_eq!(good, 11);
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 1] ^= 1;
        assert_eq!(read_frames(&flipped).0.len(), 1);
        let mut huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
        huge.extend([0; 12]);
        assert_eq!(read_frames(&huge), (vec![], 0));
    }
}
