//! The node's claims on disk (issue #16 item 5): every one-time token and TOTP step this node
//! admitted, one JSON line each, written and fsynced before the admission answers. A worker
//! restarted during a NATS outage (SIGTERM or SIGKILL) still knows what it admitted, so a
//! token admitted offline (`offline_one_time = allow_local`) is not admitted again, and what
//! was not yet claimed cluster-wide is claimed when NATS returns.
//!
//! Lines: `{"key","decision","at","local"}` for a claim (`local`: admitted while NATS was
//! away, to reconcile), `{"key","reconciled":true}` once a local claim is in KV. The file is
//! compacted when it is opened: entries older than `KEEP` are dropped (the log has long
//! recorded the consumption by then).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How long a claim is kept on disk.
const KEEP_MS: i64 = 30 * 24 * 3600 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decision: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    local: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    reconciled: bool,
}

/// What the file held when it was opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Every key this node claimed.
    pub claimed: Vec<String>,
    /// Local claims not yet in KV, with their decisions.
    pub unreconciled: Vec<(String, Uuid)>,
}

#[derive(Debug)]
pub struct ClaimLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl ClaimLog {
    /// Opens (creating) `path`, reads it, and rewrites it compacted.
    pub fn open(path: &Path, now_ms: i64) -> std::io::Result<(ClaimLog, Loaded)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut lines: Vec<Line> = Vec::new();
        let mut reconciled = std::collections::HashSet::new();
        if let Ok(f) = File::open(path) {
            for (n, text) in BufReader::new(f).lines().enumerate() {
                let text = text?;
                // A torn last line (a crash mid-write) never answered anybody: skip it.
                match serde_json::from_str::<Line>(&text) {
                    Ok(l) if l.reconciled => {
                        reconciled.insert(l.key);
                    }
                    Ok(l) => lines.push(l),
                    Err(e) => {
                        tracing::warn!(line = n + 1, error = %e, path = %path.display(), "claims: unreadable line skipped")
                    }
                }
            }
        }
        lines.retain(|l| l.at.is_none_or(|at| now_ms.saturating_sub(at) < KEEP_MS));
        for l in &mut lines {
            if reconciled.contains(&l.key) {
                l.local = false;
            }
        }
        let loaded = Loaded {
            claimed: lines.iter().map(|l| l.key.clone()).collect(),
            unreconciled: lines.iter().filter(|l| l.local).filter_map(|l| Some((l.key.clone(), l.decision?))).collect(),
        };
        // Compacted into a new file, then renamed over the old one.
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            for l in &lines {
                writeln!(f, "{}", serde_json::to_string(l).map_err(std::io::Error::other)?)?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok((ClaimLog { path: path.to_owned(), file: Mutex::new(file) }, loaded))
    }

    fn write(&self, line: &Line) -> std::io::Result<()> {
        let text = serde_json::to_string(line).map_err(std::io::Error::other)? + "\n";
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(text.as_bytes())?;
        f.sync_data()
    }

    /// Records a claim; durable when it returns.
    pub fn claimed(&self, key: &str, decision: Uuid, now_ms: i64, local: bool) -> std::io::Result<()> {
        self.write(&Line { key: key.to_owned(), decision: Some(decision), at: Some(now_ms), local, reconciled: false })
    }

    /// Records that a local claim is now in KV (or was found there).
    pub fn reconciled(&self, key: &str) -> std::io::Result<()> {
        self.write(&Line { key: key.to_owned(), decision: None, at: None, local: false, reconciled: true })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_survive_a_reopen_and_reconciled_ones_are_not_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claims.jsonl");
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        {
            let (log, loaded) = ClaimLog::open(&path, 1_000).unwrap();
            assert_eq!(loaded, Loaded::default());
            log.claimed("t.one", a, 1_000, true).unwrap();
            log.claimed("t.two", b, 1_000, true).unwrap();
            log.claimed("t.kv", c, 1_000, false).unwrap();
            log.reconciled("t.two").unwrap();
        }
        // As after a SIGKILL: a torn last line is skipped.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"key\":\"t.torn").unwrap();
        let (_, loaded) = ClaimLog::open(&path, 2_000).unwrap();
        assert_eq!(loaded.claimed, ["t.one", "t.two", "t.kv"]);
        assert_eq!(loaded.unreconciled, [("t.one".to_owned(), a)]);
        // Old entries go at the next open.
        let (_, loaded) = ClaimLog::open(&path, 1_000 + KEEP_MS).unwrap();
        assert!(loaded.claimed.is_empty());
    }
}
