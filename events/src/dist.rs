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

/// The subjects of `SLUICE_EVENTS` a worker consumes: the categories whose events a worker
/// acts on (they change its tables, or, a kick, its sessions). Decisions (`sluice.ev.decisions`),
/// the API audit (`.api`) and API keys (`.key`) are the control plane's alone: a worker never
/// receives them, and moves its position over them (`sync::Applier`).
pub const WORKER_SUBJECTS: &[&str] = &[
    "sluice.ev.app",
    "sluice.ev.stream",
    "sluice.ev.token",
    "sluice.ev.subscriber",
    "sluice.ev.jwks",
    "sluice.ev.node",
];

/// Whether a worker receives `event` (its subject is one of `WORKER_SUBJECTS`).
pub fn reaches_workers(event: &Event) -> bool {
    WORKER_SUBJECTS.contains(&event_subject(event).as_str())
}
/// KV bucket holding the manifest of the newest data-plane snapshot.
pub const SNAPSHOTS_BUCKET: &str = "sluice-snapshots";
/// The key of that manifest.
pub const SNAPSHOT_KEY: &str = "data-plane";
/// Object store holding the snapshot bodies (a KV value is capped at the server's
/// `max_payload`, 1 MiB by default; a state with a million tokens is tens of MiB).
pub const SNAPSHOT_OBJECTS: &str = "sluice-snapshot-data";
/// Core NATS subject of worker heartbeats: `sluice.hb.<node>`.
pub const HEARTBEAT_SUBJECTS: &str = "sluice.hb.*";

/// JetStream stream of the decisions workers made: `sluice.dec.<node>`.
pub const DECISIONS_STREAM: &str = "SLUICE_DECISIONS";
pub const DECISIONS_SUBJECTS: &str = "sluice.dec.>";
/// KV bucket where the control plane says, per node, up to which spool sequence it has
/// durably appended that node's decisions to the log (key = node id, value = `DecisionMark`).
pub const DECISION_MARKS_BUCKET: &str = "sluice-decision-marks";
/// KV bucket of used one-time tokens (key `t.<sha256 hex>`) and TOTP steps
/// (key `s.<sha256 hex of app/stream/subscriber/step>`): `create` fails if the key exists,
/// so a credential is used once across every worker.
pub const CONSUMED_BUCKET: &str = "sluice-consumed";
/// KV bucket of the log's signed anchors (key `head`: the newest; history kept).
pub const ANCHORS_BUCKET: &str = "sluice-anchors";
/// KV bucket of publisher leases (key `p.<sha256 hex of app/stream>`, value the node id): one
/// publisher per stream across the cluster. Its `max_age` is the lease time.
pub const PUBLISHERS_BUCKET: &str = "sluice-publishers";
/// Message headers of a decision: the spool it came from and its sequence there.
pub const HEADER_SPOOL: &str = "Sluice-Spool";
pub const HEADER_SEQUENCE: &str = "Sluice-Sequence";

pub fn decision_subject(node: &NodeId) -> String {
    format!("sluice.dec.{node}")
}

pub fn consumed_token_key(token: &Sha256Digest) -> String {
    format!("t.{}", token.to_hex())
}

pub fn publisher_lease_key(app: &str, stream: &str) -> String {
    format!("p.{}", Sha256Digest::of(format!("{app}/{stream}").as_bytes()).to_hex())
}

pub fn used_step_key(app: &str, stream: &str, subscriber: &str, step: u64) -> String {
    format!("s.{}", Sha256Digest::of(format!("{app}/{stream}/{subscriber}/{step}").as_bytes()).to_hex())
}

/// How far a node's decisions are in the log. A spool is named by a random id made when its
/// directory is created, so a worker whose disk was wiped (sequences start again at 1) is
/// never told that its new decisions are already in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionMark {
    pub spool: Uuid,
    pub sequence: u64,
}

/// The control plane's side of the mark: the highest sequence below which *every* sequence
/// of the spool has been appended. Sequences ingested above a gap wait in `above` until the
/// gap fills (a worker re-sends what stays unconfirmed), so a lost message never lets the
/// worker trim a decision that is not in the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkTracker {
    confirmed: u64,
    above: std::collections::BTreeSet<u64>,
}

impl MarkTracker {
    pub fn starting_at(confirmed: u64) -> Self {
        MarkTracker { confirmed, above: Default::default() }
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Notes that `sequence` is in the log; answers whether the mark moved.
    pub fn ingested(&mut self, sequence: u64) -> bool {
        if sequence <= self.confirmed {
            return false;
        }
        if sequence != self.confirmed + 1 {
            self.above.insert(sequence);
            return false;
        }
        self.confirmed = sequence;
        while self.above.remove(&(self.confirmed + 1)) {
            self.confirmed += 1;
        }
        true
    }
}

pub fn event_subject(event: &Event) -> String {
    format!("sluice.ev.{}", event.category())
}

/// The JetStream stream behind a KV bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The JetStream stream behind an object store.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// Whether an existing stream has the replicas a plane asks for (`nats_replicas`; JetStream
/// may report 0 for the default of 1): a bucket made with one replica on a cluster would lose
/// its data with one server, so the difference stops the plane with what to do.
pub fn replicas_agree(stream: &str, have: usize, want: usize) -> Result<(), String> {
    let (have, want) = (have.max(1), want.max(1));
    if have == want {
        return Ok(());
    }
    Err(format!(
        "{stream} has {have} replica(s) but SLUICE_NATS_REPLICAS is {want}: make them agree \
         (`nats stream edit {stream} --replicas {want}`, or SLUICE_NATS_REPLICAS={have})"
    ))
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

/// `decode_event` for a worker older than the log's writer (a rolling upgrade: control planes
/// first): an event of a type or schema version this build does not know is kept as a no-op
/// at its position (an empty `ApiAccessed`, which changes nothing a worker holds), so the
/// worker follows on instead of stopping there; the second member names what was skipped.
/// If the skipped event changed access tables, the worker's access digest no longer matches
/// the control plane's, and `/v1/nodes` shows it.
pub fn decode_event_or_skip(bytes: &[u8]) -> Result<(RecordedEvent, Option<String>), WireError> {
    decode_with(bytes, |wire| match Event::decode(&wire.event_type, wire.schema_version, &wire.data) {
        Ok(event) => Ok((event, None)),
        Err(DecodeError::UnknownType { event_type } | DecodeError::UnknownVersion { event_type, .. }) => {
            let noop = Event::ApiAccessed(crate::event::ApiAccessed { instance: String::new(), entries: Vec::new() });
            Ok((noop, Some(event_type)))
        }
        Err(e) => Err(e.into()),
    })
}

pub fn decode_event(bytes: &[u8]) -> Result<RecordedEvent, WireError> {
    decode_with(bytes, |wire| Ok((Event::decode(&wire.event_type, wire.schema_version, &wire.data)?, ())))
        .map(|(e, ())| e)
}

/// A message's envelope around the event `event` makes of it (and what else it says).
fn decode_with<T>(
    bytes: &[u8],
    event: impl FnOnce(&WireEvent<'_>) -> Result<(Event, T), WireError>,
) -> Result<(RecordedEvent, T), WireError> {
    let wire: WireEvent<'_> = serde_json::from_slice(bytes).map_err(|e| WireError::Json(e.to_string()))?;
    let (event, also) = event(&wire)?;
    let recorded = RecordedEvent {
        position: Position(wire.position),
        event_id: wire.event_id,
        stream: wire.stream.into_owned(),
        version: wire.version,
        event,
        metadata: wire.metadata,
        recorded_at: Timestamp(wire.recorded_at),
        hash: wire.hash,
    };
    Ok((recorded, also))
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
    /// Decisions in its spool that the log does not hold yet.
    #[serde(default)]
    pub decisions_pending: u64,
    /// Its live streams.
    #[serde(default)]
    pub streams: Vec<StreamStat>,
}

/// One live stream on a worker, as its heartbeat reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StreamStat {
    pub app: String,
    /// The public name.
    pub stream: String,
    pub protocol: String,
    /// The publisher's address (absent in heartbeats of older workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bits per second received over the last second and the last ten.
    pub bitrate_1s: u64,
    pub bitrate_10s: u64,
    pub players: u64,
    /// Media messages skipped for players that fell behind.
    pub dropped: u64,
    pub uptime_secs: u64,
    /// SRT link figures, for a stream published over SRT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srt: Option<SrtLink>,
}

/// What srt-tokio measures of an SRT stream: the publisher's link, and the sum over its
/// players' links (ended players included).
///
/// srt-protocol 0.4.4 keeps no loss list count, so a packet counts as lost when it had to be
/// retransmitted or was dropped too late. (Its running RTT and link capacity estimate reach
/// the statistics through the vendored patch.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SrtLink {
    /// Round trip to the publisher, microseconds: SRT's running estimate (ACK/ACK2), the
    /// handshake's until the first.
    pub rtt_us: u64,
    /// The publisher link's capacity as SRT estimates it from packet pairs, bits per second
    /// (0 until 16 pairs have arrived).
    #[serde(default)]
    pub bandwidth_bps: u64,
    /// The negotiated receive latency (TSBPD), ms.
    pub latency_ms: u64,
    /// Media held in the receive buffer, ms.
    pub rcv_buf_ms: u64,
    pub pkt_rcv_loss: u64,
    pub bytes_rcv_loss: u64,
    /// Packets that arrived too late to play, or never.
    pub pkt_rcv_drop: u64,
    pub bytes_rcv_drop: u64,
    /// Retransmitted packets received from the publisher.
    pub pkt_rcv_retrans: u64,
    /// Packets retransmitted to players.
    pub pkt_snd_retrans: u64,
    /// Packets players reported lost.
    pub pkt_snd_loss: u64,
    /// Packets dropped before players got them (too late to send).
    pub pkt_snd_drop: u64,
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

    #[test]
    fn an_older_worker_skips_what_it_does_not_know_at_its_position() {
        let e = RecordedEvent {
            position: Position(9),
            event_id: Uuid::from_u128(9),
            stream: "app-live".into(),
            version: 1,
            event: Event::AppCreated(AppCreated {
                app: AppName::parse("live").unwrap(),
                policy: crate::policy::Policy::default(),
            }),
            metadata: Metadata::default(),
            recorded_at: Timestamp(1_800_000_000_000),
            hash: GENESIS,
        };
        let text = String::from_utf8(encode_event(&e)).unwrap();
        // A type from a newer build, and a known type at a newer schema version.
        for newer in [
            text.replace("\"AppCreated\"", "\"AppSuspended\""),
            text.replace("\"schema_version\":1", "\"schema_version\":99"),
        ] {
            let (skipped, what) = decode_event_or_skip(newer.as_bytes()).unwrap();
            assert_eq!(skipped.position, Position(9), "{newer}");
            assert!(!skipped.event.changes_access_tables());
            assert!(what.is_some(), "{newer}");
        }
        // Known events pass through; data that does not match a known schema is an error.
        assert_eq!(decode_event_or_skip(text.as_bytes()).unwrap(), (e, None));
        let broken = text.replace("\"app\":\"live\"", "\"app\":7");
        assert!(decode_event_or_skip(broken.as_bytes()).is_err());
    }

    #[test]
    fn the_mark_never_passes_a_gap() {
        let mut m = MarkTracker::starting_at(0);
        assert!(m.ingested(1));
        assert!(!m.ingested(3), "3 arrived before 2: the mark stays at 1");
        assert!(!m.ingested(4));
        assert_eq!(m.confirmed(), 1);
        assert!(!m.ingested(1), "a duplicate changes nothing");
        assert!(m.ingested(2), "the gap fills: the mark jumps over what waited");
        assert_eq!(m.confirmed(), 4);
        let mut resumed = MarkTracker::starting_at(10);
        assert!(!resumed.ingested(5));
        assert!(resumed.ingested(11));
        assert_eq!(resumed.confirmed(), 11);
    }

    #[test]
    fn consumed_keys_are_kv_safe_and_distinct() {
        let t = consumed_token_key(&Sha256Digest::of(b"tok"));
        assert!(t.starts_with("t.") && t.len() == 66);
        let a = used_step_key("live", "cam", "alice", 5);
        assert_ne!(a, used_step_key("live", "cam", "alice", 6));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
    }
}
