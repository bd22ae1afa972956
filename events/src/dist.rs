//! What travels over NATS between the planes (DESIGN.md §5): the names of the streams,
//! subjects and buckets, an event as a message, and a worker's heartbeat. Pure formats; the
//! shells do the publishing.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{DecodeError, Event, Metadata, RecordedEvent};
use crate::ids::{NodeId, Position, Timestamp};
use crate::secret::Sha256Digest;

/// JetStream stream of every event, in log order: stream sequence == log position.
pub const EVENTS_STREAM: &str = "SLUICE_EVENTS";
/// Subjects of `EVENTS_STREAM`: `sluice.ev.<category>`.
pub const EVENTS_SUBJECTS: &str = "sluice.ev.>";
/// KV bucket holding the manifest of the newest data-plane snapshot.
pub const SNAPSHOTS_BUCKET: &str = "sluice-snapshots";
/// The key of that manifest.
pub const SNAPSHOT_KEY: &str = "data-plane";
/// Object store holding the snapshot bodies (a KV value is capped at the server's
/// `max_payload`, 1 MiB by default; a state with a million tokens is tens of MiB).
pub const SNAPSHOT_OBJECTS: &str = "sluice-snapshot-data";
/// Core NATS subject of worker heartbeats: `sluice.hb.<node>`.
pub const HEARTBEAT_SUBJECTS: &str = "sluice.hb.*";

pub fn event_subject(event: &Event) -> String {
    format!("sluice.ev.{}", event.category())
}

pub fn heartbeat_subject(node: &NodeId) -> String {
    format!("sluice.hb.{node}")
}

/// An event as a NATS message body (JSON, the same fields as `GET /v1/events`).
#[derive(Debug, Serialize, Deserialize)]
struct WireEvent<'a> {
    position: u64,
    event_id: Uuid,
    #[serde(borrow)]
    stream: std::borrow::Cow<'a, str>,
    version: u64,
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    schema_version: u16,
    data: serde_json::Value,
    #[serde(default)]
    metadata: Metadata,
    recorded_at: i64,
    hash: Sha256Digest,
}

pub fn encode_event(e: &RecordedEvent) -> Vec<u8> {
    let wire = WireEvent {
        position: e.position.0,
        event_id: e.event_id,
        stream: e.stream.as_str().into(),
        version: e.version,
        event_type: e.event.event_type().into(),
        schema_version: e.event.schema_version(),
        data: e.event.data(),
        metadata: e.metadata.clone(),
        recorded_at: e.recorded_at.0,
        hash: e.hash,
    };
    // Plain data into a Vec: cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("event message is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

pub fn decode_event(bytes: &[u8]) -> Result<RecordedEvent, WireError> {
    let wire: WireEvent<'_> = serde_json::from_slice(bytes).map_err(|e| WireError::Json(e.to_string()))?;
    let event = Event::decode(&wire.event_type, wire.schema_version, &wire.data)?;
    Ok(RecordedEvent {
        position: Position(wire.position),
        event_id: wire.event_id,
        stream: wire.stream.into_owned(),
        version: wire.version,
        event,
        metadata: wire.metadata,
        recorded_at: Timestamp(wire.recorded_at),
        hash: wire.hash,
    })
}

/// The manifest stored under `SNAPSHOT_KEY`: which object holds the newest snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub position: Position,
    /// `access_digest()` of the state in the snapshot.
    pub digest: Sha256Digest,
    pub schema: u16,
    /// Object name in `SNAPSHOT_OBJECTS`.
    pub object: String,
    pub bytes: u64,
    pub created_at: Timestamp,
}

/// What a worker says about itself every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: NodeId,
    pub version: String,
    /// The log position its state has applied.
    pub position: Position,
    /// `access_digest()` of that state, once computed (large states take a while).
    pub digest: Option<Sha256Digest>,
    /// The position `digest` belongs to.
    pub digest_position: Option<Position>,
    pub live_sessions: u64,
    pub uptime_secs: u64,
    /// Whether it is deciding (has a state).
    pub ready: bool,
    /// Whether its event feed from NATS is live.
    pub synced: bool,
    pub sent_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AppCreated, GENESIS};
    use crate::ids::AppName;

    #[test]
    fn an_event_round_trips_through_its_message() {
        let e = RecordedEvent {
            position: Position(7),
            event_id: Uuid::from_u128(7),
            stream: "app-live".into(),
            version: 0,
            event: Event::AppCreated(AppCreated {
                app: AppName::parse("live").unwrap(),
                policy: crate::policy::Policy::default(),
            }),
            metadata: Metadata { actor: Some("key:k1".into()), ..Metadata::default() },
            recorded_at: Timestamp(1_800_000_000_000),
            hash: GENESIS,
        };
        let bytes = encode_event(&e);
        assert_eq!(decode_event(&bytes).unwrap(), e);
        assert_eq!(event_subject(&e.event), "sluice.ev.app");
    }

    #[test]
    fn bad_messages_are_typed_errors() {
        assert!(matches!(decode_event(b"not json"), Err(WireError::Json(_))));
        let unknown = br#"{"position":1,"event_id":"00000000-0000-0000-0000-000000000001","stream":"x","version":0,
            "type":"SomethingNew","schema_version":1,"data":{},"recorded_at":0,"hash":"00"}"#;
        assert!(decode_event(unknown).is_err());
    }
}
