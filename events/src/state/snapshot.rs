//! A worker's state at one log position, as bytes: what the control plane stores in NATS
//! and what a worker writes to its local snapshot file and boots from.
//!
//! Layout (integers little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 16 | magic `SLUICE-SNAPSHOT\0` |
//! | 2 | schema version ([`SCHEMA`]) |
//! | 8 | log position |
//! | 8 | position of the last event that changed the access tables |
//! | 32 | `access_digest()` of the state |
//! | 32 | SHA-256 of the compressed body (corruption check) |
//! | 8 | length of the uncompressed body |
//! | … | the body: postcard, LZ4-compressed |
//!
//! The body holds the access tables only: never API keys (a worker does not hold them), and
//! secrets only in their sealed form; a worker reopens them with its own keyring on load.
//! Decoding checks everything and never panics on bad bytes.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{App, AuthState, DigestHasher, Jwks, Node, Token, TokenStatus};
use crate::ids::{Action, AppName, NodeId, Position, Protocol, StreamName, SubscriberId, Timestamp};
use crate::policy::{Policy, SecretKind};
use crate::secret::{Keyring, Sealed, Sha256Digest};

pub const MAGIC: &[u8; 16] = b"SLUICE-SNAPSHOT\0";
/// Bumped when the body's layout changes; a reader refuses a newer one, and an older one
/// (the worker then catches up from the log instead). 2: a subscriber's block names its
/// action, and a stream may be an extra player name (`plays`).
pub const SCHEMA: u16 = 2;
const HEADER: usize = 16 + 2 + 8 + 8 + 32 + 32 + 8;
/// A body larger than this is refused before allocating (1M tokens take ~70 MB).
const MAX_BODY: u64 = 4 << 30;

/// What the header says, readable without decoding the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub schema: u16,
    pub position: Position,
    pub tables_position: Position,
    pub digest: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a Sluice snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot truncated: {0} bytes")]
    Truncated(usize),
    #[error("snapshot schema {found} is newer than this build reads ({max})")]
    FutureSchema { found: u16, max: u16 },
    #[error("snapshot schema {found} is older than this build reads ({current}); the log replaces it")]
    OldSchema { found: u16, current: u16 },
    #[error("snapshot corrupt: body checksum mismatch")]
    Checksum,
    #[error("snapshot corrupt: {0}")]
    Body(String),
}

#[derive(Serialize, Deserialize)]
struct Body {
    apps: Vec<SnapApp>,
    /// (app, stream) pairs that tokens refer to by index.
    pairs: Vec<(AppName, StreamName)>,
    tokens: Vec<SnapToken>,
    nodes: Vec<(NodeId, String, Vec<Protocol>)>,
}

#[derive(Serialize, Deserialize)]
struct SnapApp {
    name: AppName,
    /// JSON: the policy type uses serde features a compact binary format cannot express.
    policy: String,
    secrets: Vec<(SecretKind, Sealed)>,
    jwks: Option<String>,
    streams: Vec<SnapStream>,
    subscribers: Vec<SnapSubscriber>,
}

/// (name, publish name, description, plays)
type SnapStream = (StreamName, Option<StreamName>, Option<String>, Option<StreamName>);

#[derive(Serialize, Deserialize)]
struct SnapSubscriber {
    stream: StreamName,
    id: SubscriberId,
    action: Option<Action>,
    secret: Sealed,
    blocked_until: Option<Timestamp>,
    blocked_action: Option<Action>,
    last_step: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct SnapToken {
    digest: [u8; 32],
    pair: u32,
    action: Action,
    expires_at: Option<Timestamp>,
    status: u8,
}

/// Encodes the access tables of `state` (its API keys, if any, are left out).
pub fn encode(state: &AuthState) -> Vec<u8> {
    encode_with_digest(state, state.access_digest())
}

/// As `encode`, with the access digest already known (it costs a pass over the state).
pub fn encode_with_digest(state: &AuthState, digest: Sha256Digest) -> Vec<u8> {
    let apps = state
        .apps
        .iter()
        .map(|(name, app)| SnapApp {
            name: name.clone(),
            policy: serde_json::to_string(&app.policy).unwrap_or_default(),
            secrets: app.secrets.iter().map(|(k, s)| (*k, s.sealed.clone())).collect(),
            jwks: app.jwks.as_ref().map(|j| j.raw.to_string()),
            streams: app
                .streams
                .iter()
                .map(|(n, s)| (n.clone(), s.publish_name.clone(), s.description.clone(), s.plays.clone()))
                .collect(),
            subscribers: app
                .subscribers
                .iter()
                .map(|((stream, id), s)| SnapSubscriber {
                    stream: stream.clone(),
                    id: id.clone(),
                    action: s.action,
                    secret: s.secret.clone(),
                    blocked_until: s.blocked_until,
                    blocked_action: s.blocked_action,
                    last_step: s.last_step,
                })
                .collect(),
        })
        .collect();
    let mut pairs: Vec<(AppName, StreamName)> = Vec::new();
    let mut pair_ids: HashMap<(&str, &str), u32> = HashMap::new();
    let mut tokens: Vec<SnapToken> = Vec::with_capacity(state.tokens.len());
    for (digest, t) in &state.tokens {
        let next = pairs.len() as u32;
        let pair = *pair_ids.entry((t.app.as_str(), t.stream.as_str())).or_insert_with(|| {
            pairs.push((t.app.clone(), t.stream.clone()));
            next
        });
        let status = match t.status {
            TokenStatus::Active => 0,
            TokenStatus::Consumed => 1,
            TokenStatus::Revoked => 2,
        };
        tokens.push(SnapToken { digest: digest.0, pair, action: t.action, expires_at: t.expires_at, status });
    }
    let nodes = state.nodes.iter().map(|(id, n)| (id.clone(), n.version.clone(), n.protocols.clone())).collect();
    let body = Body { apps, pairs, tokens, nodes };
    // Serializing plain data into a Vec cannot fail.
    let raw = postcard::to_stdvec(&body).unwrap_or_default();
    let compressed = lz4_flex::block::compress(&raw);
    let mut out = Vec::with_capacity(HEADER + compressed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SCHEMA.to_le_bytes());
    out.extend_from_slice(&state.position.0.to_le_bytes());
    out.extend_from_slice(&state.tables_position.0.to_le_bytes());
    out.extend_from_slice(&digest.0);
    out.extend_from_slice(&Sha256::digest(&compressed));
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    out.extend_from_slice(&compressed);
    out
}

/// Reads the header only.
pub fn info(bytes: &[u8]) -> Result<SnapshotInfo, SnapshotError> {
    if bytes.len() < 18 {
        return Err(if bytes.len() >= 16 && &bytes[..16] != MAGIC {
            SnapshotError::BadMagic
        } else {
            SnapshotError::Truncated(bytes.len())
        });
    }
    if &bytes[..16] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let schema = u16::from_le_bytes([bytes[16], bytes[17]]);
    if schema > SCHEMA {
        return Err(SnapshotError::FutureSchema { found: schema, max: SCHEMA });
    }
    if schema < SCHEMA {
        return Err(SnapshotError::OldSchema { found: schema, current: SCHEMA });
    }
    if bytes.len() < HEADER {
        return Err(SnapshotError::Truncated(bytes.len()));
    }
    let position = Position(u64_at(bytes, 18));
    let tables_position = Position(u64_at(bytes, 26));
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&bytes[34..66]);
    Ok(SnapshotInfo { schema, position, tables_position, digest: Sha256Digest(digest) })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Rebuilds a worker state (`AuthState::for_data_plane`) from snapshot bytes, opening its
/// sealed secrets with `keyring`.
pub fn decode(bytes: &[u8], keyring: Option<Arc<Keyring>>) -> Result<(AuthState, SnapshotInfo), SnapshotError> {
    let info = info(bytes)?;
    let compressed = &bytes[HEADER..];
    if Sha256::digest(compressed).as_slice() != &bytes[66..98] {
        return Err(SnapshotError::Checksum);
    }
    let raw_len = u64_at(bytes, 98);
    if raw_len > MAX_BODY {
        return Err(SnapshotError::Body(format!("body of {raw_len} bytes is too large")));
    }
    let raw = lz4_flex::block::decompress(compressed, raw_len as usize)
        .map_err(|e| SnapshotError::Body(format!("decompress: {e}")))?;
    let body: Body = postcard::from_bytes(&raw).map_err(|e| SnapshotError::Body(e.to_string()))?;

    let mut state = AuthState::for_data_plane(keyring);
    for a in body.apps {
        let policy: Policy =
            serde_json::from_str(&a.policy).map_err(|e| SnapshotError::Body(format!("policy of {}: {e}", a.name)))?;
        let mut app = App::new(policy);
        for (kind, sealed) in a.secrets {
            let secret = state.app_secret(&a.name, kind, sealed);
            app.secrets.insert(kind, secret);
        }
        if let Some(raw) = a.jwks {
            let raw: serde_json::Value =
                serde_json::from_str(&raw).map_err(|e| SnapshotError::Body(format!("jwks of {}: {e}", a.name)))?;
            app.jwks = Some(Jwks::from_raw(raw));
        }
        for (name, publish_name, description, plays) in a.streams {
            app.add_stream(name, publish_name, description, plays);
        }
        for s in a.subscribers {
            let id = (&a.name, &s.stream, &s.id);
            let sub = state.subscriber(
                id,
                app.policy.totp,
                s.action,
                s.secret,
                (s.blocked_until, s.blocked_action),
                s.last_step,
            );
            app.subscribers.insert((s.stream, s.id), sub);
        }
        state.apps.insert(a.name, app);
    }
    // Share the registry's name allocations, as `TokenIssued` does when applied.
    let pairs: Vec<(AppName, StreamName)> = body
        .pairs
        .into_iter()
        .map(|(app, stream)| match state.apps.get_key_value(&app) {
            Some((a, entry)) => {
                let s = entry.streams.get_key_value(&stream).map(|(s, _)| s.clone()).unwrap_or(stream);
                (a.clone(), s)
            }
            None => (app, stream),
        })
        .collect();
    let mut tokens = HashMap::with_capacity_and_hasher(body.tokens.len(), DigestHasher);
    for t in body.tokens {
        let (app, stream) = pairs
            .get(t.pair as usize)
            .cloned()
            .ok_or_else(|| SnapshotError::Body(format!("token refers to pair {} of {}", t.pair, pairs.len())))?;
        let status = match t.status {
            0 => TokenStatus::Active,
            1 => TokenStatus::Consumed,
            2 => TokenStatus::Revoked,
            other => return Err(SnapshotError::Body(format!("token status {other}"))),
        };
        tokens
            .insert(Sha256Digest(t.digest), Token { app, stream, action: t.action, expires_at: t.expires_at, status });
    }
    state.tokens = tokens;
    for (id, version, protocols) in body.nodes {
        state.nodes.insert(id, Node { version, protocols });
    }
    state.position = info.position;
    state.tables_position = info.tables_position;
    Ok((state, info))
}
