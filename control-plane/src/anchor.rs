//! Signed anchors of the log's head (issue #16 item 8). The hash chain proves that a row was
//! not changed *unless* every later hash was recomputed, and it says nothing about rows
//! deleted from the end. An anchor, `{position, hash, at, instance, mac}`, is the chain's head
//! signed with a key derived from the sealing key (HMAC-SHA256), which Postgres does not
//! hold: a database superuser can rewrite or truncate the log, but not sign its new head.
//!
//! `serve` writes one every `SLUICE_ANCHOR_EVERY_SECS` (when the head moved), after checking
//! the chain from the previous anchor to the new head: to NATS KV `sluice-anchors` (key
//! `head`) and, when `SLUICE_ANCHOR_FILE` is set, appended to that file (fsynced), which the
//! operator can ship elsewhere. `serve` (at start) and `verify-log` check the log against the
//! newest anchor they can reach: a log that ends before it (truncated), or whose hash at its
//! position differs (rewritten), is refused with the anchored positions that agree and
//! disagree. What an anchor does not prove: anything after it, and anything if the sealing
//! key is also stolen (docs/security.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sluice_events::{Position, SealingKey, Sha256Digest, dist};

use crate::store::{EventStore, StoreError};

const KEY_PURPOSE: &str = "log anchors";
const HEAD_KEY: &str = "head";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub position: u64,
    pub hash: Sha256Digest,
    /// When it was signed (ms since the epoch).
    pub at: i64,
    pub instance: String,
    /// HMAC-SHA256 (hex) of the fields above, with the anchor key.
    pub mac: String,
}

/// Signs and checks anchors.
#[derive(Clone)]
pub struct Signer {
    key: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    pub fn new(sealing: &SealingKey) -> Signer {
        Signer { key: sealing.derive(KEY_PURPOSE) }
    }

    fn mac(&self, position: u64, hash: &Sha256Digest, at: i64, instance: &str) -> String {
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("sluice-anchor-v1|{position}|{}|{at}|{instance}", hash.to_hex()).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn sign(&self, position: Position, hash: Sha256Digest, at: i64, instance: &str) -> Anchor {
        let mac = self.mac(position.0, &hash, at, instance);
        Anchor { position: position.0, hash, at, instance: instance.to_owned(), mac }
    }

    /// Whether `anchor` was signed with this deployment's key (constant-time compare).
    pub fn genuine(&self, anchor: &Anchor) -> bool {
        let expected = self.mac(anchor.position, &anchor.hash, anchor.at, &anchor.instance);
        sluice_events::secret::ct_eq(expected.as_bytes(), anchor.mac.as_bytes())
    }
}

/// The genuine anchors in `path`, oldest first (a torn or foreign line is skipped with a
/// warning). A missing file has none.
pub fn read_file(path: &Path, signer: &Signer) -> Vec<Anchor> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<Anchor>(line) {
            Ok(a) if signer.genuine(&a) => out.push(a),
            Ok(_) => {
                tracing::warn!(file = %path.display(), line = n + 1, "anchor not signed with this deployment's key; ignored")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), line = n + 1, error = %e, "unreadable anchor line; ignored")
            }
        }
    }
    out
}

fn append_file(path: &Path, anchor: &Anchor) -> std::io::Result<()> {
    let line = serde_json::to_string(anchor).map_err(std::io::Error::other)? + "\n";
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

async fn bucket(js: &jetstream::Context) -> Result<kv::Store, String> {
    let kv = match js.get_key_value(dist::ANCHORS_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => {
            let config = kv::Config {
                bucket: dist::ANCHORS_BUCKET.to_owned(),
                history: 64,
                storage: jetstream::stream::StorageType::File,
                num_replicas: crate::relay::replicas(),
                ..Default::default()
            };
            js.create_key_value(config).await.map_err(|e| e.to_string())?
        }
    };
    crate::relay::check_replicas(js, &dist::kv_stream(dist::ANCHORS_BUCKET)).await?;
    Ok(kv)
}

/// The newest genuine anchor in NATS KV, if NATS answers within 2 s.
pub async fn read_kv(nats_url: &str, signer: &Signer) -> Option<Anchor> {
    let fetch = async {
        let client = crate::relay::connect(nats_url).await.ok()?;
        let js = jetstream::new(client);
        let kv = js.get_key_value(dist::ANCHORS_BUCKET).await.ok()?;
        let bytes = kv.get(HEAD_KEY).await.ok()??;
        let anchor: Anchor = serde_json::from_slice(&bytes).ok()?;
        if signer.genuine(&anchor) {
            Some(anchor)
        } else {
            tracing::warn!("the anchor in NATS KV is not signed with this deployment's key; ignored");
            None
        }
    };
    tokio::time::timeout(Duration::from_secs(3), fetch).await.ok().flatten()
}

/// Where the log and its anchors disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnchorError {
    #[error(
        "the log ends at position {head}, but an anchor signed at {at} ms covers position {anchored}: \
         rows were deleted from the log (or Postgres was restored from an older backup). Refusing it; \
         see docs/security.md"
    )]
    Truncated { head: u64, anchored: u64, at: i64 },
    #[error(
        "the log disagrees with its anchor at position {position} (signed at {at} ms): the log was rewritten \
         at or before that position{}. Refusing it; see docs/security.md",
        agrees.map_or_else(|| " (no earlier anchor agrees)".to_owned(), |q| format!(", after position {q} (the newest anchor that agrees)"))
    )]
    Rewritten { position: u64, at: i64, agrees: Option<u64> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AnchorError {
    /// The first anchored position that disagrees.
    pub fn position(&self) -> Option<u64> {
        match self {
            AnchorError::Truncated { anchored, .. } => Some(*anchored),
            AnchorError::Rewritten { position, .. } => Some(*position),
            AnchorError::Store(_) => None,
        }
    }
}

/// Checks the log against `anchors` (any order): every one must lie within the log and agree
/// with the stored hash at its position. The stored hashes must already be known to form a
/// chain (`verify`, or the projection's checked fold). Answers the newest anchor checked.
pub async fn check(store: &EventStore, anchors: &[Anchor]) -> Result<Option<Anchor>, AnchorError> {
    // An anchor inside an archived range is superseded by the archive's own (of its last
    // position, checked by `check_archives`): reading a segment for each would cost a pass.
    let archives = store.archives().await?;
    let inside = |p: u64| archives.iter().any(|a| a.first.0 <= p && p < a.last.0);
    let mut sorted: Vec<&Anchor> = anchors.iter().filter(|a| !inside(a.position)).collect();
    sorted.sort_by_key(|a| a.position);
    let Some(newest) = sorted.last().copied() else { return Ok(None) };
    let head = store.head().await?.0;
    if newest.position > head {
        return Err(AnchorError::Truncated { head, anchored: newest.position, at: newest.at });
    }
    let mut agrees = None;
    for a in &sorted {
        if store.hash_at(Position(a.position)).await? != Some(a.hash) {
            return Err(AnchorError::Rewritten { position: a.position, at: a.at, agrees });
        }
        agrees = Some(a.position);
    }
    Ok(Some(newest.clone()))
}

/// The archived ranges' anchors: each one genuine (this deployment's key) and naming its
/// range's last position and hash, each range starting where the previous one ended. Answers
/// how many were checked.
pub async fn check_archives(store: &EventStore, signer: &Signer) -> Result<usize, String> {
    let archives = store.archives().await.map_err(|e| e.to_string())?;
    let mut prev = (Position::ZERO, sluice_events::event::GENESIS);
    for a in &archives {
        let anchor: Anchor = serde_json::from_str(&a.anchor)
            .map_err(|e| format!("the archive of {}..{} has an unreadable anchor: {e}", a.first, a.last))?;
        if !signer.genuine(&anchor) || anchor.position != a.last.0 || anchor.hash != a.last_hash {
            return Err(format!(
                "the archive of {}..{} is not what was signed when it was archived (its anchor does not match)",
                a.first, a.last
            ));
        }
        if (a.first.0 - 1, a.prev_hash) != (prev.0.0, prev.1) {
            return Err(format!("the archive of {}..{} does not follow the one before it", a.first, a.last));
        }
        prev = (a.last, a.last_hash);
    }
    Ok(archives.len())
}

/// What the anchor task needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub signer: Signer,
    pub instance: String,
    pub nats_url: String,
    pub file: Option<PathBuf>,
    pub every: Duration,
    /// The newest anchor signed, for `GET /v1/log`.
    pub latest: Latest,
}

/// The newest anchor this control plane checked the log against or signed.
pub type Latest = std::sync::Arc<std::sync::Mutex<Option<Anchor>>>;

/// Anchors the head every `every` while it moves: the chain from the last anchored position
/// to the head is checked first (so an anchor only ever covers a checked chain), then the
/// anchor is put in KV and appended to the file. `from` is where the caller's own check of the
/// chain ended (the projection's start).
pub async fn run(store: EventStore, settings: Settings, from: Position) {
    let (mut at, mut hash) = (from, store.hash_at(from).await.ok().flatten().unwrap_or(sluice_events::event::GENESIS));
    let mut kv: Option<kv::Store> = None;
    let mut signed = Position::ZERO;
    loop {
        tokio::time::sleep(settings.every).await;
        // Extend the checked chain to the head.
        loop {
            match store.read_chained(at, hash, 5000).await {
                Ok(page) => match page.last() {
                    Some(last) => (at, hash) = (last.position, last.hash),
                    None => break,
                },
                Err(e) => {
                    tracing::error!(error = %e, "anchor: the log fails its chain; not anchoring it");
                    break;
                }
            }
        }
        if at == signed || at == Position::ZERO {
            continue;
        }
        let anchor = settings.signer.sign(at, hash, crate::clock::now().0, &settings.instance);
        if let Some(path) = &settings.file
            && let Err(e) = append_file(path, &anchor)
        {
            tracing::warn!(error = %e, file = %path.display(), "anchor: cannot append to SLUICE_ANCHOR_FILE");
        }
        if kv.is_none()
            && let Ok(client) = crate::relay::connect(&settings.nats_url).await
        {
            kv = bucket(&jetstream::new(client)).await.ok();
        }
        if let Some(store) = &kv {
            let bytes = serde_json::to_vec(&anchor).unwrap_or_default();
            if let Err(e) = store.put(HEAD_KEY, bytes.into()).await {
                tracing::warn!(error = %e, "anchor: cannot put it in NATS KV");
                kv = None;
            }
        }
        signed = at;
        *settings.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(anchor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_genuine_only_with_the_deployment_key() {
        let key = SealingKey::new("k1", [7; 32]);
        let signer = Signer::new(&key);
        let a = signer.sign(Position(42), Sha256Digest([1; 32]), 1_000, "cp-1");
        assert!(signer.genuine(&a));
        let mut moved = a.clone();
        moved.position = 41;
        assert!(!signer.genuine(&moved), "a moved anchor");
        let mut rehashed = a.clone();
        rehashed.hash = Sha256Digest([2; 32]);
        assert!(!signer.genuine(&rehashed), "another hash");
        let other = Signer::new(&SealingKey::new("k2", [8; 32]));
        assert!(!other.genuine(&a), "another deployment's key");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchors");
        append_file(&path, &a).unwrap();
        append_file(&path, &other.sign(Position(50), Sha256Digest([3; 32]), 2_000, "x")).unwrap();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"position\":").unwrap();
        assert_eq!(read_file(&path, &signer), [a]);
    }
}
