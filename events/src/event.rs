//! The event catalog: every fact Sluice records, past tense, with a stable type name, a
//! schema version and the log stream it belongs to. Type names are never renamed; shapes
//! only grow (new optional fields); every event ever written must keep deserializing.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::decision::DecisionRecord;
use crate::ids::{Action, AppName, Cidr, KeyId, NodeId, Position, Protocol, Role, StreamName, SubscriberId, Timestamp};
use crate::policy::{Policy, SecretKind};
use crate::secret::{Sealed, Sha256Digest};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyCreated {
    pub key_id: KeyId,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret; the secret itself is shown once and never stored.
    pub secret_sha256: Sha256Digest,
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiKeyRevoked {
    pub key_id: KeyId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppCreated {
    pub app: AppName,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppPolicyChanged {
    pub app: AppName,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppSecretRotated {
    pub app: AppName,
    pub kind: SecretKind,
    pub secret: Sealed,
}

/// The app no longer has a secret of this kind (the methods that need it refuse with
/// `secret_unavailable`; without an SRT passphrase, callers must not encrypt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppSecretRemoved {
    pub app: AppName,
    pub kind: SecretKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AppDeleted {
    pub app: AppName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StreamRegistered {
    pub app: AppName,
    pub name: StreamName,
    /// Secret name the publisher uses (a stream key); players use `name`.
    #[serde(default)]
    pub publish_name: Option<StreamName>,
    #[serde(default)]
    pub description: Option<String>,
    /// A second player name (SRT Live Server's many player ids per publisher): this name
    /// plays what is published under this publish name (or under this stream's own name, for
    /// a stream without one). It has no publish name of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plays: Option<StreamName>,
}

/// Replaces a stream's mutable fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StreamUpdated {
    pub app: AppName,
    pub name: StreamName,
    #[serde(default)]
    pub publish_name: Option<StreamName>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StreamDeleted {
    pub app: AppName,
    pub name: StreamName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenIssued {
    /// SHA-256 of the token; the token itself is returned once and never stored.
    pub token_sha256: Sha256Digest,
    pub app: AppName,
    pub stream: StreamName,
    pub action: Action,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenConsumed {
    pub token_sha256: Sha256Digest,
    /// The decision that used it.
    #[serde(default)]
    pub decision_id: Option<Uuid>,
    #[serde(default)]
    pub node: Option<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TokenRevoked {
    pub token_sha256: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriberAdded {
    pub app: AppName,
    pub stream: StreamName,
    pub subscriber_id: SubscriberId,
    /// The action the subscriber may take; `None` means both.
    #[serde(default)]
    pub action: Option<Action>,
    /// The TOTP secret (raw bytes, sealed).
    pub secret: Sealed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriberRemoved {
    pub app: AppName,
    pub stream: StreamName,
    pub subscriber_id: SubscriberId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SubscriberBlocked {
    pub app: AppName,
    pub stream: StreamName,
    pub subscriber_id: SubscriberId,
    /// Refused until this time (an unblock is a block until the past).
    pub until: Timestamp,
    /// Refused for this action only (Ant Media's block types `publish`, `play`); absent:
    /// both (`publish_play`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
}

/// An operator ended a stream's live sessions (`POST /v1/apps/{app}/streams/{name}/kick`):
/// every worker ends those admitted before this event was recorded (of one action, from one
/// address, when given). It changes no access table: a new attempt is decided as usual (to
/// keep someone out, revoke their credential as well).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionsKicked {
    pub app: AppName,
    /// The name the clients used (a player name, a publish name or the public name).
    pub stream: StreamName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TotpStepUsed {
    pub app: AppName,
    pub stream: StreamName,
    pub subscriber_id: SubscriberId,
    /// The TOTP step (Unix seconds / period) whose code was accepted.
    pub step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JwksRefreshed {
    pub app: AppName,
    /// The JWK set as fetched (public keys only: private members are dropped by the fetcher).
    pub jwks: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeRegistered {
    pub node_id: NodeId,
    pub version: String,
    #[serde(default)]
    pub protocols: Vec<Protocol>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AccessDecided {
    pub decision: DecisionRecord,
}

/// One REST call as the API saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiAccess {
    pub at: Timestamp,
    /// `key:<id>`, `jwt:<sub>`, `basic:<user>` or `anonymous`.
    pub subject: String,
    pub method: String,
    pub route: String,
    pub client_ip: std::net::IpAddr,
    pub status: u16,
    /// Identical calls (subject, method, route, address, status) in one batch are one entry:
    /// how many (absent: one), and when the last of them was (`at` is the first).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Timestamp>,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl ApiAccess {
    /// The fields that make two calls identical for the audit.
    pub fn same_call(&self, other: &ApiAccess) -> bool {
        (self.subject == other.subject)
            && self.method == other.method
            && self.route == other.route
            && self.client_ip == other.client_ip
            && self.status == other.status
    }
}

/// A batch of API calls, recorded together so auditing costs no round trip per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiAccessed {
    pub instance: String,
    pub entries: Vec<ApiAccess>,
}

macro_rules! catalog {
    ($($variant:ident => $category:literal),+ $(,)?) => {
        /// Every event type. Serialized as `{"type": "...", "data": {...}}`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(tag = "type", content = "data")]
        pub enum Event { $($variant($variant)),+ }

        impl Event {
            /// All type names, in catalog order.
            pub const TYPES: &'static [&'static str] = &[$(stringify!($variant)),+];

            /// The stable type name (the `type` column).
            pub fn event_type(&self) -> &'static str {
                match self { $(Event::$variant(_) => stringify!($variant)),+ }
            }

            /// The category: the log stream's prefix and the NATS subject's last token.
            pub fn category(&self) -> &'static str {
                match self { $(Event::$variant(_) => $category),+ }
            }

            /// The payload alone (the `data` column).
            pub fn data(&self) -> serde_json::Value {
                match self {
                    // Serializing these plain structs to a Value cannot fail.
                    $(Event::$variant(e) => serde_json::to_value(e).unwrap_or_default()),+
                }
            }

            /// The payload of a known type at a readable version, deserialized straight into
            /// its struct from any serde source (a `Value`, JSON text).
            fn decode_data<'de, D: serde::Deserializer<'de>>(event_type: &str, version: u16, data: D) -> Result<Event, DecodeError>
            where
                D::Error: std::fmt::Display,
            {
                if version == 0 || version > 1 {
                    if !Event::TYPES.contains(&event_type) {
                        return Err(DecodeError::UnknownType { event_type: event_type.to_owned() });
                    }
                    return Err(DecodeError::UnknownVersion { event_type: event_type.to_owned(), version, max: 1 });
                }
                let bad = |e: D::Error| DecodeError::BadData { event_type: event_type.to_owned(), detail: e.to_string() };
                match event_type {
                    $(stringify!($variant) => <$variant as serde::Deserialize>::deserialize(data).map(Event::$variant).map_err(bad),)+
                    _ => Err(DecodeError::UnknownType { event_type: event_type.to_owned() }),
                }
            }

            /// Appends the payload's canonical JSON (`write_canonical` of `data()`), written
            /// straight from the struct.
            pub fn write_data(&self, out: &mut Vec<u8>) {
                match self {
                    $(Event::$variant(e) => crate::canonical::to_canonical(e, out)),+
                }
            }
        }

        $(impl From<$variant> for Event {
            fn from(e: $variant) -> Event { Event::$variant(e) }
        })+
    };
}

catalog! {
    ApiKeyCreated => "key",
    ApiKeyRevoked => "key",
    AppCreated => "app",
    AppPolicyChanged => "app",
    AppSecretRotated => "app",
    AppSecretRemoved => "app",
    AppDeleted => "app",
    StreamRegistered => "stream",
    StreamUpdated => "stream",
    StreamDeleted => "stream",
    TokenIssued => "token",
    TokenConsumed => "token",
    TokenRevoked => "token",
    SubscriberAdded => "subscriber",
    SubscriberRemoved => "subscriber",
    SubscriberBlocked => "subscriber",
    TotpStepUsed => "subscriber",
    SessionsKicked => "stream",
    JwksRefreshed => "jwks",
    NodeRegistered => "node",
    AccessDecided => "decisions",
    ApiAccessed => "api",
}

/// Why a stored row could not become an `Event`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {event_type:?} (written by a newer Sluice?)")]
    UnknownType { event_type: String },
    #[error("event type {event_type} has schema version {version}; this build reads up to {max}")]
    UnknownVersion { event_type: String, version: u16, max: u16 },
    #[error("event data of type {event_type} does not match its schema: {detail}")]
    BadData { event_type: String, detail: String },
}

impl Event {
    /// The schema version written with every new event of this type.
    pub const fn schema_version(&self) -> u16 {
        1
    }

    /// Rebuilds an event from its stored parts, upcasting older schema versions.
    pub fn decode(event_type: &str, version: u16, data: &serde_json::Value) -> Result<Event, DecodeError> {
        Event::decode_data(event_type, version, data)
    }

    /// `decode` from the JSON text (what the log stores), without building a `Value`.
    pub fn decode_str(event_type: &str, version: u16, data: &str) -> Result<Event, DecodeError> {
        let mut de = serde_json::Deserializer::from_str(data);
        let event = Event::decode_data(event_type, version, &mut de)?;
        de.end().map_err(|e| DecodeError::BadData { event_type: event_type.to_owned(), detail: e.to_string() })?;
        Ok(event)
    }

    /// The types for which `changes_access_tables` is false (for queries that skip them).
    pub const NON_TABLE_TYPES: &'static [&'static str] =
        &["AccessDecided", "ApiAccessed", "ApiKeyCreated", "ApiKeyRevoked", "SessionsKicked"];

    /// Whether applying it changes what a worker holds: audit facts, API keys and kicks (which
    /// a worker acts on as they arrive) do not.
    pub fn changes_access_tables(&self) -> bool {
        !matches!(
            self,
            Event::AccessDecided(_)
                | Event::ApiAccessed(_)
                | Event::ApiKeyCreated(_)
                | Event::ApiKeyRevoked(_)
                | Event::SessionsKicked(_)
        )
    }

    /// The log stream this event belongs to; optimistic concurrency works per stream.
    pub fn log_stream(&self) -> String {
        match self {
            Event::ApiKeyCreated(e) => format!("key-{}", e.key_id),
            Event::ApiKeyRevoked(e) => format!("key-{}", e.key_id),
            Event::AppCreated(e) => format!("app-{}", e.app),
            Event::AppPolicyChanged(e) => format!("app-{}", e.app),
            Event::AppSecretRotated(e) => format!("app-{}", e.app),
            Event::AppSecretRemoved(e) => format!("app-{}", e.app),
            Event::AppDeleted(e) => format!("app-{}", e.app),
            Event::StreamRegistered(e) => stream_log(&e.app, &e.name),
            Event::StreamUpdated(e) => stream_log(&e.app, &e.name),
            Event::StreamDeleted(e) => stream_log(&e.app, &e.name),
            Event::TokenIssued(e) => token_log(&e.token_sha256),
            Event::TokenConsumed(e) => token_log(&e.token_sha256),
            Event::TokenRevoked(e) => token_log(&e.token_sha256),
            Event::SubscriberAdded(e) => subscriber_log(&e.app, &e.stream, &e.subscriber_id),
            Event::SubscriberRemoved(e) => subscriber_log(&e.app, &e.stream, &e.subscriber_id),
            Event::SubscriberBlocked(e) => subscriber_log(&e.app, &e.stream, &e.subscriber_id),
            Event::TotpStepUsed(e) => subscriber_log(&e.app, &e.stream, &e.subscriber_id),
            Event::SessionsKicked(e) => stream_log(&e.app, &e.stream),
            Event::JwksRefreshed(e) => format!("jwks-{}", e.app),
            Event::NodeRegistered(e) => format!("node-{}", e.node_id),
            Event::AccessDecided(e) => {
                format!("decisions-{}", e.decision.node.as_ref().map(NodeId::as_str).unwrap_or("local"))
            }
            Event::ApiAccessed(e) => format!("api-{}", e.instance),
        }
    }
}

pub fn stream_log(app: &AppName, name: &StreamName) -> String {
    bounded("stream", format!("stream-{app}.{name}"))
}

pub fn subscriber_log(app: &AppName, stream: &StreamName, id: &SubscriberId) -> String {
    bounded("subscriber", format!("subscriber-{app}.{stream}.{id}"))
}

/// The log's stream names are at most `MAX_LOG_STREAM` bytes (the `events` table checks it): a
/// longer one (long app, stream and subscriber names together) becomes `<kind>-#<sha256 hex>`
/// of itself, still one stream per entity. Shorter names are as they always were.
fn bounded(kind: &str, name: String) -> String {
    if name.len() <= MAX_LOG_STREAM {
        return name;
    }
    format!("{kind}-#{}", Sha256Digest::of(name.as_bytes()).to_hex())
}

/// The longest log stream name (`events.stream`'s CHECK).
pub const MAX_LOG_STREAM: usize = 300;

/// The token's short public id: the first 16 hex digits of its SHA-256.
pub fn token_id(digest: &Sha256Digest) -> String {
    let mut buf = [0u8; 16];
    // 8 bytes always fit in 16 hex digits.
    let _ = hex::encode_to_slice(&digest.0[..8], &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn token_log(digest: &Sha256Digest) -> String {
    format!("token-{}", token_id(digest))
}

/// Who caused an event and on what request: stored beside it, never folded into state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<std::net::IpAddr>,
    /// SHA-256 of the method, path and body of the request written under an
    /// `Idempotency-Key`: a reuse of the key with another request is refused, not replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<crate::Sha256Digest>,
}

/// An event about to be appended: its id makes re-appending idempotent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: Event,
}

/// An event as the log holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: Position,
    pub event_id: Uuid,
    pub stream: String,
    /// Version within `stream`, from 0.
    pub version: u64,
    pub event: Event,
    pub metadata: Metadata,
    pub recorded_at: Timestamp,
    pub hash: Sha256Digest,
}

/// The canonical bytes of an event for the hash chain. Object keys are sorted here rather
/// than trusting serde_json's map order (a `preserve_order` feature anywhere in the build, or
/// jsonb's own key order on read-back, would otherwise change the bytes).
pub fn canonical_bytes(row: &CanonicalRow<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    feed_canonical(row, |bytes| out.extend_from_slice(bytes));
    out
}

/// `chain_hash(previous, &canonical_bytes(row))` and the canonical length, without
/// assembling the bytes.
pub fn chain_hash_row(previous: &Sha256Digest, row: &CanonicalRow<'_>) -> (Sha256Digest, usize) {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(previous.0);
    let mut len = 0;
    feed_canonical(row, |bytes| {
        len += bytes.len();
        h.update(bytes);
    });
    (Sha256Digest(h.finalize().into()), len)
}

/// Hands the canonical bytes of `row` to `sink`, in pieces.
fn feed_canonical(row: &CanonicalRow<'_>, mut sink: impl FnMut(&[u8])) {
    // A tuple serializes as the JSON array `[position,"id","stream",...]`: no object, so no
    // key order to fix, and no intermediate `Value`.
    let head =
        (row.position.0, row.event_id, row.stream, row.version, row.event_type, row.type_version, row.recorded_at.0);
    let mut buf = Vec::with_capacity(160);
    // Writing numbers and strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut buf, &head);
    sink(&buf);
    for part in [&row.data, &row.metadata] {
        sink(b"|");
        match part {
            CanonicalJson::Value(v) => {
                buf.clear();
                write_canonical(v, &mut buf);
                sink(&buf);
            }
            CanonicalJson::Written(bytes) => sink(bytes),
        }
    }
}

/// Everything the hash chain covers: the row as stored, metadata (who did it) and time included.
#[derive(Debug, Clone, Copy)]
pub struct CanonicalRow<'a> {
    pub position: Position,
    pub event_id: &'a Uuid,
    pub stream: &'a str,
    pub version: u64,
    pub event_type: &'a str,
    pub type_version: u16,
    pub recorded_at: Timestamp,
    pub data: CanonicalJson<'a>,
    pub metadata: CanonicalJson<'a>,
}

/// A JSON part of a canonical row: a value, or the bytes `write_canonical` already made of
/// one (the writer keeps those to store, and so writes each value once).
#[derive(Debug, Clone, Copy)]
pub enum CanonicalJson<'a> {
    Value(&'a serde_json::Value),
    Written(&'a [u8]),
}

/// Writes `v` as JSON with object keys in byte order, no whitespace.
pub fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Writing a string or a scalar into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// `sha256(previous ‖ canonical event)`: each hash commits to the whole log before it.
pub fn chain_hash(previous: &Sha256Digest, canonical: &[u8]) -> Sha256Digest {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(previous.0);
    h.update(canonical);
    Sha256Digest(h.finalize().into())
}

/// The hash before position 1.
pub const GENESIS: Sha256Digest = Sha256Digest([0u8; 32]);

#[cfg(test)]
mod log_stream_tests {
    use super::*;

    #[test]
    fn log_stream_names_fit_the_table_and_stay_distinct() {
        let app = AppName::parse(&"a".repeat(AppName::MAX_LEN)).unwrap();
        let stream = StreamName::parse(&"s".repeat(StreamName::MAX_LEN)).unwrap();
        let (one, two) = (
            SubscriberId::parse(&"x".repeat(SubscriberId::MAX_LEN)).unwrap(),
            SubscriberId::parse(&"y".repeat(SubscriberId::MAX_LEN)).unwrap(),
        );
        let (a, b) = (subscriber_log(&app, &stream, &one), subscriber_log(&app, &stream, &two));
        assert!(a.len() <= MAX_LOG_STREAM && b.len() <= MAX_LOG_STREAM, "{a}");
        assert_ne!(a, b);
        assert!(stream_log(&app, &stream).len() <= MAX_LOG_STREAM);
        // Short names are as they always were.
        let short = AppName::parse("studio").unwrap();
        let cam = StreamName::parse("cam1").unwrap();
        assert_eq!(subscriber_log(&short, &cam, &one.clone()), format!("subscriber-studio.cam1.{one}"));
        assert_eq!(stream_log(&short, &cam), "stream-studio.cam1");
    }
}
