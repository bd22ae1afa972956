//! The relay (DESIGN.md §5): publishes every event of the log, in order, to the JetStream
//! stream `SLUICE_EVENTS`, so that the stream's sequence *is* the log position, and stores a
//! snapshot of the data-plane state in NATS every N events or T seconds.
//!
//! - Exactly one instance relays: the one holding a Postgres advisory lock on a dedicated
//!   connection. When that instance dies its connection closes, the lock is freed, and
//!   another instance takes over within a second.
//! - Each message carries `Nats-Msg-Id = event_id` and `Nats-Expected-Last-Sequence =
//!   position − 1`. The stream's last sequence is the checkpoint: after a crash (between a
//!   publish and anything else) or a NATS outage, publishing resumes from it, and the server
//!   refuses anything that would leave a gap or a duplicate, even from two relays at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use sluice_events::dist::{self, SnapshotManifest};
use sluice_events::state::snapshot;
use sluice_events::{AuthState, Position, RecordedEvent};
use sqlx::Connection as _;
use tokio::sync::watch;

use crate::projection::Projection;
use crate::store::EventStore;
use crate::task::{Backoff, Tasks};

/// `pg_advisory_lock` key of the relay: "SLUICERL" as an integer.
const RELAY_LOCK: i64 = 0x534c_5549_4345_524c;
/// Events read from Postgres per round trip while catching up.
const READ_BATCH: i64 = 1000;
/// Publishes in flight before waiting for their acknowledgements.
const PIPELINE: usize = 256;

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub nats_url: String,
    pub snapshot_every_events: u64,
    pub snapshot_every: Duration,
    pub retention: Retention,
}

/// How long `SLUICE_EVENTS` keeps its messages (docs/operations.md, "A bounded SLUICE_EVENTS").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// The stream's `max_age` (zero: for ever). Snapshots make it safe for workers.
    pub max_age: Duration,
    /// A per-message TTL on the events no worker receives (none: kept as long as the rest).
    pub audit_ttl: Option<Duration>,
}

/// What the relay is doing, for `/ready` and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayStatus {
    pub leader: bool,
    /// The stream's last sequence as this instance last saw it.
    pub relayed: Position,
    pub snapshot: Position,
}

/// What `/ready` and `/metrics` need to know of the relay: whether SLUICE_EVENTS and the log
/// disagree about what was relayed (issue #16 item 7).
#[derive(Debug, Default)]
pub struct RelayHealth {
    /// The stream position where the stream's message and the log's row differ (0: none).
    pub diverged_at: std::sync::atomic::AtomicU64,
    /// Times the relay found them apart and stopped (`sluice_relay_diverged_total`).
    pub diverged_total: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("postgres: {0}")]
    Store(String),
    #[error("lost the relay lock")]
    LostLock,
    #[error(
        "SLUICE_EVENTS is ahead of the log (stream at {stream}, log at {log}): a NATS server from another database? \
         Not relaying."
    )]
    Ahead { stream: u64, log: u64 },
    #[error(
        "SLUICE_EVENTS and the log disagree at position {position}: the message relayed there is not the log's \
         row there (Postgres restored from an older backup, or rows deleted and rewritten). Not relaying; \
         re-seed NATS from the log (docs/security.md)"
    )]
    Diverged { position: u64 },
}

fn nats<E: std::fmt::Display>(e: E) -> RelayError {
    RelayError::Nats(e.to_string())
}

/// Starts the relay as a supervised task: it waits for leadership, relays, and starts over
/// after a failure, until shutdown.
pub fn spawn(
    tasks: &Tasks,
    store: EventStore,
    projection: Projection,
    settings: RelaySettings,
    health: Arc<RelayHealth>,
) -> watch::Receiver<RelayStatus> {
    let (tx, rx) = watch::channel(RelayStatus::default());
    let tx = Arc::new(tx);
    tasks.supervise("relay", Backoff::new(Duration::from_millis(200), Duration::from_secs(5)), move || {
        let (store, projection, settings, tx) = (store.clone(), projection.clone(), settings.clone(), tx.clone());
        let health = health.clone();
        async move {
            let result = lead(&store, &projection, &settings, &tx, &health).await;
            tx.send_modify(|s| s.leader = false);
            if let Err(RelayError::Diverged { position }) = &result {
                use std::sync::atomic::Ordering::Relaxed;
                health.diverged_at.store(*position, Relaxed);
                health.diverged_total.fetch_add(1, Relaxed);
            }
            result.map_err(|e| e.to_string())
        }
    });
    rx
}

/// Waits for the lock, then relays until something fails.
async fn lead(
    store: &EventStore,
    projection: &Projection,
    settings: &RelaySettings,
    status: &watch::Sender<RelayStatus>,
    health: &RelayHealth,
) -> Result<(), RelayError> {
    let mut lock = store.lead(RELAY_LOCK).await.map_err(|e| RelayError::Store(e.to_string()))?;
    tracing::info!("relay: this instance is the relay");
    let result = relay(store, projection, settings, status, &mut lock, health).await;
    // Dropping the connection frees the lock; close it politely when we still can.
    let _ = lock.close().await;
    result
}

/// How every NATS connection of this process authenticates (`nats_ca_file`, an NKey seed or
/// a `.creds` file), set once at start; unset: the URL alone.
static NATS_AUTH: std::sync::OnceLock<sluice_events::settings::NatsAuth> = std::sync::OnceLock::new();

pub fn set_nats_auth(auth: sluice_events::settings::NatsAuth) {
    let _ = NATS_AUTH.set(auth);
}

/// A NATS client that gives up a connection attempt after 2 s (callers retry), with the
/// process's TLS trust and credentials.
pub async fn connect(url: &str) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2));
    options = match sluice_events::settings::url_credentials(url) {
        Some((user, Some(password))) => options.user_and_password(user, password),
        Some((token, None)) => options.token(token),
        None => options,
    };
    let options = match NATS_AUTH.get() {
        Some(auth) => nats_options(options, auth).await?,
        None => options,
    };
    let servers = sluice_events::settings::nats_servers(url);
    options
        .connect(servers.as_slice())
        .await
        .map_err(|e| format!("NATS at {}: {e}", sluice_events::settings::redact_url(url)))
}

/// The replicas every stream and bucket this process creates gets (`nats_replicas`).
pub fn replicas() -> usize {
    NATS_AUTH.get().map_or(1, |a| a.replicas.max(1))
}

/// Refuses an existing stream (or a bucket's stream) whose replicas differ from `replicas()`.
pub async fn check_replicas(js: &jetstream::Context, stream: &str) -> Result<(), String> {
    let mut s = js.get_stream(stream).await.map_err(|e| format!("{stream}: {e}"))?;
    let have = s.info().await.map_err(|e| format!("{stream}: {e}"))?.config.num_replicas;
    dist::replicas_agree(stream, have, replicas())
}

/// `options` with a CA to trust (and TLS required) and an NKey seed or a `.creds` file.
pub async fn nats_options(
    mut options: async_nats::ConnectOptions,
    auth: &sluice_events::settings::NatsAuth,
) -> Result<async_nats::ConnectOptions, String> {
    if let Some(ca) = &auth.ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some(path) = &auth.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| format!("nats_nkey_seed_file {}: {e}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(path) = &auth.creds_file {
        options =
            options.credentials_file(path).await.map_err(|e| format!("nats_creds_file {}: {e}", path.display()))?;
    }
    Ok(options)
}

/// Creates `SLUICE_EVENTS`, or brings an existing one to `retention` (its `max_age`, and
/// per-message TTLs allowed when the audit expires); its replicas are checked, not changed.
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    retention: Retention,
) -> Result<jetstream::stream::Stream, String> {
    let mut stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: dist::EVENTS_STREAM.into(),
            subjects: vec![dist::EVENTS_SUBJECTS.into()],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: duplicate_window(retention),
            num_replicas: replicas(),
            max_age: retention.max_age,
            allow_message_ttl: retention.audit_ttl.is_some(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    check_replicas(js, dist::EVENTS_STREAM).await?;
    let mut config = stream.info().await.map_err(|e| e.to_string())?.config.clone();
    // A TTL once allowed stays allowed (JetStream cannot take it back); unused, it costs nothing.
    let allow_ttl = config.allow_message_ttl || retention.audit_ttl.is_some();
    if config.max_age != retention.max_age
        || config.allow_message_ttl != allow_ttl
        || config.duplicate_window > duplicate_window(retention)
    {
        tracing::info!(
            max_age_secs = retention.max_age.as_secs(),
            audit_ttl_secs = retention.audit_ttl.map(|t| t.as_secs()),
            "relay: {} retention updated",
            dist::EVENTS_STREAM
        );
        (config.max_age, config.allow_message_ttl) = (retention.max_age, allow_ttl);
        config.duplicate_window = duplicate_window(retention);
        js.update_stream(&config).await.map_err(|e| format!("{}: {e}", dist::EVENTS_STREAM))?;
    }
    Ok(stream)
}

/// JetStream's window for `Nats-Msg-Id` deduplication: two minutes, or the `max_age` when it
/// is shorter (the server refuses a window longer than the stream keeps anything).
fn duplicate_window(retention: Retention) -> Duration {
    match retention.max_age.is_zero() {
        true => Duration::from_secs(120),
        false => retention.max_age.min(Duration::from_secs(120)),
    }
}

/// The newest message still in the stream at or below its last sequence: the last one, or,
/// when that one expired (a TTL), the newest left. None when the stream holds nothing.
async fn newest_message(
    stream: &jetstream::stream::Stream,
    last: u64,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, String> {
    match stream.get_raw_message(last).await {
        Ok(m) => return Ok(Some(m)),
        Err(e) if e.kind() != async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            return Err(e.to_string());
        }
        Err(_) => {}
    }
    match stream.get_last_raw_message_by_subject(dist::EVENTS_SUBJECTS).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn relay(
    store: &EventStore,
    projection: &Projection,
    settings: &RelaySettings,
    status: &watch::Sender<RelayStatus>,
    lock: &mut sqlx::PgConnection,
    health: &RelayHealth,
) -> Result<(), RelayError> {
    let js = jetstream::new(connect(&settings.nats_url).await.map_err(nats)?);
    let stream = ensure_events_stream(&js, settings.retention).await.map_err(RelayError::Nats)?;
    let stream_state = stream.get_info().await.map_err(nats)?.state;
    let mut last = stream_state.last_sequence;
    let head = store.head().await.map_err(|e| RelayError::Store(e.to_string()))?.0;
    if last > head {
        return Err(RelayError::Ahead { stream: last, log: head });
    }
    // Positions are not enough: the stream's last message must be the log's row at that
    // position (same hash), or the log was rewritten under the stream and what lies between
    // would never reach the workers.
    // With retention the last message may have expired: the newest one left is compared.
    if last > 0 {
        match newest_message(&stream, last).await {
            Ok(Some(message)) => match dist::decode_event(&message.payload) {
                Ok(relayed) => {
                    let at = relayed.position;
                    let ours = store.hash_at(at).await.map_err(|e| RelayError::Store(e.to_string()))?;
                    if ours != Some(relayed.hash) {
                        tracing::error!(position = at.0, "relay: SLUICE_EVENTS and the log disagree; not relaying");
                        return Err(RelayError::Diverged { position: at.0 });
                    }
                }
                Err(e) => tracing::warn!(position = last, error = %e, "relay: cannot read the stream's last message"),
            },
            Ok(None) => tracing::info!(position = last, "relay: every message of the stream has expired"),
            Err(e) => tracing::warn!(position = last, error = %e, "relay: cannot fetch the stream's last message"),
        }
    }
    health.diverged_at.store(0, std::sync::atomic::Ordering::Relaxed);
    let snapshots = Snapshots::open(&js).await?;
    let mut snap_at = snapshots.latest_position().await;
    // A worker that fell behind a bounded stream needs a snapshot at least as new as the
    // stream's first message; when the newest is older (no relay ran for a while), one is
    // taken at once rather than a snapshot interval later.
    let mut snap_time = match stream_state.first_sequence > snap_at.0 + 1 {
        false => Instant::now(),
        true => Instant::now().checked_sub(settings.snapshot_every).unwrap_or_else(Instant::now),
    };
    status.send_modify(|s| {
        s.leader = true;
        s.relayed = Position(last);
        s.snapshot = snap_at;
    });
    tracing::info!(from = last, head, "relay: resuming");
    // Catch up from the stream's last sequence, then follow the log.
    let mut sub = store.subscribe(Position(last)).await.map_err(|e| RelayError::Store(e.to_string()))?;
    let mut lock_check = Instant::now();
    loop {
        let mut batch: Vec<RecordedEvent> = Vec::new();
        match tokio::time::timeout(Duration::from_millis(500), sub.recv()).await {
            Ok(Some(Ok(e))) => batch.push(e),
            Ok(Some(Err(e))) => return Err(RelayError::Store(e.to_string())),
            Ok(None) => return Err(RelayError::Store("the log subscription ended".into())),
            Err(_) => {}
        }
        while batch.len() < READ_BATCH as usize {
            match sub.try_recv() {
                Some(Ok(e)) => batch.push(e),
                Some(Err(e)) => return Err(RelayError::Store(e.to_string())),
                None => break,
            }
        }
        if !batch.is_empty() {
            last = publish(&js, &batch, last, settings.retention.audit_ttl).await?;
            status.send_modify(|s| s.relayed = Position(last));
        }
        let due = Position(last).0.saturating_sub(snap_at.0) >= settings.snapshot_every_events
            || (snap_time.elapsed() >= settings.snapshot_every && projection.position() > snap_at);
        if due {
            let state = projection.current();
            if state.position() > snap_at {
                snap_at = snapshots.store(state).await?;
                status.send_modify(|s| s.snapshot = snap_at);
            }
            snap_time = Instant::now();
        }
        if lock_check.elapsed() >= Duration::from_secs(2) {
            // The lock lives as long as this connection does.
            sqlx::query("SELECT 1").execute(&mut *lock).await.map_err(|_| RelayError::LostLock)?;
            lock_check = Instant::now();
        }
    }
}

/// Publishes a batch in order with up to `PIPELINE` acknowledgements outstanding; returns the
/// new last sequence. Events at or below `last` (already in the stream) are skipped.
async fn publish(
    js: &jetstream::Context,
    batch: &[RecordedEvent],
    mut last: u64,
    audit_ttl: Option<Duration>,
) -> Result<u64, RelayError> {
    for chunk in batch.chunks(PIPELINE) {
        let mut acks = Vec::with_capacity(chunk.len());
        for e in chunk {
            if e.position.0 <= last {
                continue;
            }
            let mut msg = PublishMessage::build()
                .payload(dist::encode_event(e).into())
                .message_id(e.event_id.to_string())
                .expected_last_sequence(e.position.0 - 1);
            if let Some(ttl) = audit_ttl
                && !dist::reaches_workers(&e.event)
            {
                msg = msg.ttl(ttl);
            }
            let ack = js.send_publish(dist::event_subject(&e.event), msg).await.map_err(nats)?;
            acks.push((e.position.0, e.recorded_at, ack));
        }
        for (position, recorded_at, ack) in acks {
            match ack.await {
                Ok(a) if a.sequence == position => {
                    last = position;
                    let m = &*crate::metrics::METRICS;
                    let lag_ms = crate::clock::now().0.saturating_sub(recorded_at.0).max(0);
                    m.relay_lag_seconds.observe(lag_ms as f64 / 1000.0);
                    m.relay_position.store(position, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(a) => {
                    return Err(RelayError::Nats(format!(
                        "stream sequence {} for log position {position}: the stream and the log disagree",
                        a.sequence
                    )));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another relay got there first, or our view is stale: start over from the
                    // stream's own last sequence.
                    return Err(RelayError::Nats(format!("wrong last sequence at position {position}; resyncing")));
                }
                Err(e) => return Err(nats(e)),
            }
        }
    }
    Ok(last)
}

/// Stores `state` as the newest data-plane snapshot in NATS, as the relay does (benchmarks
/// and tools; the relay calls it on its schedule).
pub async fn publish_snapshot(js: &jetstream::Context, state: Arc<AuthState>) -> Result<Position, String> {
    let snapshots = Snapshots::open(js).await.map_err(|e| e.to_string())?;
    snapshots.store(state).await.map_err(|e| e.to_string())
}

/// The snapshot store: bodies in an object store, the newest one's manifest in KV.
struct Snapshots {
    kv: jetstream::kv::Store,
    objects: jetstream::object_store::ObjectStore,
}

impl Snapshots {
    async fn open(js: &jetstream::Context) -> Result<Snapshots, RelayError> {
        let kv = match js.get_key_value(dist::SNAPSHOTS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: dist::SNAPSHOTS_BUCKET.into(),
                    history: 1,
                    num_replicas: replicas(),
                    ..Default::default()
                })
                .await
                .map_err(nats)?,
        };
        let objects = match js.get_object_store(dist::SNAPSHOT_OBJECTS).await {
            Ok(o) => o,
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: dist::SNAPSHOT_OBJECTS.into(),
                    num_replicas: replicas(),
                    ..Default::default()
                })
                .await
                .map_err(nats)?,
        };
        for stream in [dist::kv_stream(dist::SNAPSHOTS_BUCKET), dist::object_stream(dist::SNAPSHOT_OBJECTS)] {
            check_replicas(js, &stream).await.map_err(RelayError::Nats)?;
        }
        Ok(Snapshots { kv, objects })
    }

    async fn latest(&self) -> Option<SnapshotManifest> {
        let bytes = self.kv.get(dist::SNAPSHOT_KEY).await.ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    async fn latest_position(&self) -> Position {
        self.latest().await.map_or(Position(0), |m| m.position)
    }

    /// Encodes off the async threads, uploads the body, then points the manifest at it and
    /// drops the previous body.
    async fn store(&self, state: Arc<AuthState>) -> Result<Position, RelayError> {
        let previous = self.latest().await;
        let started = Instant::now();
        let (bytes, digest, position) = tokio::task::spawn_blocking(move || {
            let digest = state.access_digest();
            (snapshot::encode_with_digest(&state, digest), digest, state.position())
        })
        .await
        .map_err(|e| RelayError::Nats(format!("snapshot task: {e}")))?;
        let object = format!("p{:020}", position.0);
        let size = bytes.len() as u64;
        self.objects.put(object.as_str(), &mut bytes.as_slice()).await.map_err(nats)?;
        let manifest = SnapshotManifest {
            position,
            digest,
            schema: snapshot::SCHEMA,
            object: object.clone(),
            bytes: size,
            created_at: crate::clock::now(),
        };
        let json = serde_json::to_vec(&manifest).map_err(nats)?;
        self.kv.put(dist::SNAPSHOT_KEY, json.into()).await.map_err(nats)?;
        if let Some(prev) = previous.filter(|p| p.object != object) {
            let _ = self.objects.delete(&prev.object).await;
        }
        tracing::info!(
            position = position.0,
            bytes = size,
            ms = started.elapsed().as_millis() as u64,
            "relay: snapshot stored"
        );
        Ok(position)
    }
}
