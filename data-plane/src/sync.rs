//! Worker sync (DESIGN.md §5): boot from the newest of {local snapshot file, NATS snapshot},
//! then follow `SLUICE_EVENTS` from the next position with an ordered consumer, applying
//! each burst to a spare copy of the state and swapping it in (`arc-swap`: readers never
//! block). The state survives any outage of NATS or the control plane; the worker keeps
//! deciding from what it has.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::{FutureExt as _, StreamExt as _};
use sluice_events::dist::{self, SnapshotManifest};
use sluice_events::state::snapshot::{self, SnapshotInfo};
use sluice_events::state::{AccessDigestMemo, Spare};
use sluice_events::{AuthState, Keyring, Position, RecordedEvent, Sha256Digest};
use tokio::io::AsyncReadExt as _;

use crate::config::Config;
use crate::task::{Backoff, Tasks};

/// Events applied per swap at most, so a long catch-up still publishes progress.
const MAX_BURST: usize = 4096;

/// What the worker's threads share.
#[derive(Debug)]
pub struct Shared {
    /// The access tables every decision reads (`state.load()`; never held across awaits).
    pub state: ArcSwap<AuthState>,
    /// Has a state to decide from (a snapshot, or a completed catch-up).
    pub ready: AtomicBool,
    /// The event feed from NATS is live.
    pub synced: AtomicBool,
    pub live_sessions: AtomicU64,
    pub started: Instant,
    /// The access digest, recomputed only when the tables change.
    pub digest: AccessDigestMemo,
    /// The applied position, for waiters (`GET /wait`).
    pub applied: tokio::sync::watch::Sender<u64>,
    /// Set on SIGTERM: `/ready` is 503, the listeners take no one new, live sessions go on
    /// until they end or the drain time is up.
    pub draining: tokio::sync::watch::Sender<bool>,
    /// When the last applied change of the access tables was recorded in the log (ms since
    /// the epoch, the control plane's clock): the start of a revocation's clock.
    pub tables_changed_at: std::sync::atomic::AtomicI64,
    /// Kicks applied and not yet acted on (`sessions::recheck_loop` takes them), each with
    /// its log position.
    pub kicks: std::sync::Mutex<Vec<(sluice_events::event::SessionsKicked, Position)>>,
    /// Asks the event feed to look for the log's head now (a `/wait` for a position past
    /// ours: the events in between may all be ones no worker receives).
    pub head_probe: tokio::sync::Notify,
    /// The highest position a `/wait` asked for: while it is past ours, the feed looks for the
    /// head every `WANTED_PROBE_EVERY`.
    pub wanted: AtomicU64,
}

impl Shared {
    pub fn new(state: AuthState) -> Arc<Shared> {
        let applied = tokio::sync::watch::Sender::new(state.position().0);
        Arc::new(Shared {
            applied,
            draining: tokio::sync::watch::Sender::new(false),
            state: ArcSwap::from_pointee(state),
            ready: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            live_sessions: AtomicU64::new(0),
            started: Instant::now(),
            digest: AccessDigestMemo::default(),
            tables_changed_at: std::sync::atomic::AtomicI64::new(0),
            kicks: std::sync::Mutex::default(),
            head_probe: tokio::sync::Notify::new(),
            wanted: AtomicU64::new(0),
        })
    }

    pub fn position(&self) -> Position {
        self.state.load().position()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// The access digest of the current tables and the position it holds at (a pass over
    /// the state when the tables changed: call it off the async threads).
    pub fn current_digest(&self) -> (Position, Sha256Digest) {
        let state = self.state.load_full();
        (state.position(), self.digest.of(&state))
    }
}

/// Applies bursts to a spare copy and swaps it in. The copy swapped out becomes the next
/// spare once no reader holds it (`Spare`), so a burst costs its own events, not a clone of
/// the state.
#[derive(Debug)]
pub struct Applier {
    shared: Arc<Shared>,
    spare: Spare,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Gap(String);

impl Applier {
    pub fn new(shared: Arc<Shared>) -> Applier {
        Applier { shared, spare: Spare::default() }
    }

    /// Applies events of `SLUICE_EVENTS` as the worker receives them: only those that reach
    /// workers (`dist::WORKER_SUBJECTS`), in order, so the positions between two of them
    /// belong to events no worker needs (decisions, the API audit, API keys) and are skipped.
    pub fn apply(&mut self, burst: Vec<RecordedEvent>) -> Result<(), Gap> {
        let mut next = self.spare.take(&self.shared.state.load());
        let mut gap = None;
        let mut applied = Vec::with_capacity(burst.len());
        for e in burst {
            let _ = next.skip_to(Position(e.position.0.saturating_sub(1)));
            match next.apply(&e) {
                Ok(()) => applied.push(e),
                Err(err) => {
                    gap = Some(Gap(err.to_string()));
                    break;
                }
            }
        }
        let position = next.position().0;
        if let Some(e) = applied.iter().rev().find(|e| e.event.changes_access_tables()) {
            self.shared.tables_changed_at.store(e.recorded_at.0, Ordering::Relaxed);
        }
        for e in &applied {
            if let sluice_events::Event::SessionsKicked(k) = &e.event {
                self.shared.kicks.lock().unwrap_or_else(|p| p.into_inner()).push((k.clone(), e.position));
            }
        }
        let old = self.shared.state.swap(Arc::new(next));
        self.shared.applied.send_replace(position);
        self.spare.keep(old, applied);
        gap.map_or(Ok(()), Err)
    }
}

impl Applier {
    /// Replaces the state with a snapshot's (newer than ours): what a worker does when the
    /// events it needs have aged out of `SLUICE_EVENTS`. Sessions are checked against it as
    /// after any change of the tables.
    pub fn replace(&mut self, state: AuthState) {
        let position = state.position().0;
        self.shared.tables_changed_at.store(crate::clock::now().0, Ordering::Relaxed);
        self.shared.state.store(Arc::new(state));
        self.shared.applied.send_replace(position);
        self.spare = Spare::default();
    }

    /// Moves the position to `position` (no event: every one up to it that reaches workers
    /// has been applied; `follow_once` checks that first).
    pub fn skip_to(&mut self, position: Position) {
        let current = self.shared.state.load_full();
        if position <= current.position() {
            return;
        }
        let mut next = self.spare.take(&current);
        let _ = next.skip_to(position);
        let old = self.shared.state.swap(Arc::new(next));
        self.shared.applied.send_replace(position.0);
        self.spare.keep(old, Vec::new());
    }
}

/// Boots: the newest usable snapshot of {local file, NATS}, or an empty state.
pub async fn boot(config: &Config, keyring: Arc<Keyring>) -> (AuthState, Option<SnapshotInfo>, &'static str) {
    let dir = config.state_dir.clone();
    let ring = keyring.clone();
    let local = tokio::task::spawn_blocking(move || crate::local::read(&dir, Some(ring))).await.ok().flatten();
    let js = match connect(&config.nats_url).await {
        Ok(client) => Some(jetstream::new(client)),
        Err(e) => {
            tracing::warn!(error = %e, "NATS unreachable at boot");
            None
        }
    };
    let remote_manifest = match &js {
        Some(js) => manifest(js).await.map(|m| (m, js)),
        None => None,
    };
    let local_pos = local.as_ref().map(|(_, i)| i.position);
    if let Some((m, js)) = remote_manifest {
        if local_pos.is_some_and(|p| p >= m.position) {
            tracing::info!(
                local = local_pos.map(|p| p.0),
                nats = m.position.0,
                "local snapshot is as new as the NATS one or newer; using it"
            );
        } else if let Some((state, info)) = fetch(js, &m, keyring.clone()).await {
            return (state, Some(info), "nats");
        }
    }
    match local {
        Some((state, info)) => (state, Some(info), "local"),
        None => (AuthState::for_data_plane(Some(keyring)), None, "empty"),
    }
}

/// How every NATS connection of this process authenticates (`nats_ca_file`, an NKey seed or
/// a `.creds` file), set once at start; unset: the URL alone.
static NATS_AUTH: std::sync::OnceLock<sluice_events::settings::NatsAuth> = std::sync::OnceLock::new();

pub fn set_nats_auth(auth: sluice_events::settings::NatsAuth) {
    let _ = NATS_AUTH.set(auth);
}

/// Options for `url` with its credentials (a user and password, or a token, written in it),
/// the process's TLS trust (TLS then required) and NKey or `.creds` credentials.
pub async fn nats_options(
    options: async_nats::ConnectOptions,
    url: &str,
) -> Result<async_nats::ConnectOptions, String> {
    let mut options = match sluice_events::settings::url_credentials(url) {
        Some((user, Some(password))) => options.user_and_password(user, password),
        Some((token, None)) => options.token(token),
        None => options,
    };
    let Some(auth) = NATS_AUTH.get() else { return Ok(options) };
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

/// A NATS client that gives up a connection attempt after 2 s (callers retry).
pub async fn connect(url: &str) -> Result<async_nats::Client, String> {
    connect_with(async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)), url).await
}

/// `options` (with the process's TLS trust and credentials) connected to the servers of `url`:
/// one, or a cluster's, comma-separated.
pub async fn connect_with(options: async_nats::ConnectOptions, url: &str) -> Result<async_nats::Client, String> {
    let servers = sluice_events::settings::nats_servers(url);
    nats_options(options, url)
        .await?
        .connect(servers.as_slice())
        .await
        .map_err(|e| format!("NATS at {}: {e}", sluice_events::settings::redact_url(url)))
}

/// The replicas of the buckets this worker creates (`nats_replicas`).
pub fn replicas() -> usize {
    NATS_AUTH.get().map_or(1, |a| a.replicas.max(1))
}

/// Refuses an existing bucket whose stream's replicas differ from `replicas()`.
pub async fn check_replicas(js: &jetstream::Context, stream: &str) -> Result<(), String> {
    let mut s = js.get_stream(stream).await.map_err(|e| format!("{stream}: {e}"))?;
    let have = s.info().await.map_err(|e| format!("{stream}: {e}"))?.config.num_replicas;
    dist::replicas_agree(stream, have, replicas())
}

async fn manifest(js: &jetstream::Context) -> Option<SnapshotManifest> {
    let kv = js.get_key_value(dist::SNAPSHOTS_BUCKET).await.ok()?;
    let bytes = kv.get(dist::SNAPSHOT_KEY).await.ok()??;
    match serde_json::from_slice::<SnapshotManifest>(&bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(error = %e, "NATS snapshot manifest unreadable; ignoring it");
            None
        }
    }
}

async fn fetch(
    js: &jetstream::Context,
    m: &SnapshotManifest,
    keyring: Arc<Keyring>,
) -> Option<(AuthState, SnapshotInfo)> {
    let store = js.get_object_store(dist::SNAPSHOT_OBJECTS).await.ok()?;
    let mut object = match store.get(&m.object).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(object = %m.object, error = %e, "NATS snapshot body missing; booting without it");
            return None;
        }
    };
    let mut bytes = Vec::with_capacity(m.bytes as usize);
    if let Err(e) = object.read_to_end(&mut bytes).await {
        tracing::error!(error = %e, "NATS snapshot body unreadable; booting without it");
        return None;
    }
    match tokio::task::spawn_blocking(move || snapshot::decode(&bytes, Some(keyring))).await {
        Ok(Ok(ok)) => Some(ok),
        Ok(Err(e)) => {
            tracing::error!(position = m.position.0, error = %e, "NATS snapshot rejected; booting without it");
            None
        }
        Err(_) => None,
    }
}

/// Folds `SLUICE_EVENTS` from its first message into a fresh state, up to `to` (default: the
/// stream's last sequence when the rebuild starts): `sluice-dataplane rebuild --from-log`.
/// `progress` is told (position, target) as the fold goes.
pub async fn rebuild_from_log(
    url: &str,
    keyring: Arc<Keyring>,
    to: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<AuthState, String> {
    let js = jetstream::new(connect(url).await?);
    let stream = js.get_stream(dist::EVENTS_STREAM).await.map_err(|e| format!("{}: {e}", dist::EVENTS_STREAM))?;
    let info = stream.get_info().await.map_err(|e| e.to_string())?;
    let last = info.state.last_sequence;
    let target = to.map_or(last, |t| t.min(last));
    let mut state = AuthState::for_data_plane(Some(keyring));
    if target == 0 {
        return Ok(state);
    }
    if let Some(first) = aged_out(&info, Position::ZERO) {
        return Err(format!(
            "{} no longer holds events 1..{} (its max_age): rebuild --from-snapshot instead",
            dist::EVENTS_STREAM,
            first - 1
        ));
    }
    // Only what a worker receives: the rest (decisions, the audit; they may have expired) is
    // stepped over, as the feed does.
    let stop_at = newest_for_workers(&stream).await?.min(target);
    if stop_at > 0 {
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                filter_subjects: dist::WORKER_SUBJECTS.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while state.position().0 < stop_at {
            let m = match messages.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the consumer ended".into()),
            };
            let e = decode(&m)?;
            if e.position.0 > target {
                break;
            }
            let _ = state.skip_to(Position(e.position.0.saturating_sub(1)));
            state.apply(&e).map_err(|e| e.to_string())?;
            progress(state.position().0, target);
        }
    }
    let _ = state.skip_to(Position(target));
    progress(target, target);
    Ok(state)
}

/// The snapshot `sluice-dataplane rebuild --from-snapshot` starts from: `file` if given, else
/// the local one, else the one in NATS.
pub async fn rebuild_from_snapshot(
    config: &Config,
    keyring: Arc<Keyring>,
    file: Option<&std::path::Path>,
) -> Result<AuthState, String> {
    let local = file.map(std::path::Path::to_path_buf).unwrap_or_else(|| crate::local::path(&config.state_dir));
    match std::fs::read(&local) {
        Ok(bytes) => {
            return snapshot::decode(&bytes, Some(keyring))
                .map(|(s, _)| s)
                .map_err(|e| format!("{}: {e}", local.display()));
        }
        Err(e) if file.is_some() || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", local.display()));
        }
        Err(_) => {}
    }
    let js = jetstream::new(connect(&config.nats_url).await?);
    let m = manifest(&js).await.ok_or("no local snapshot and none in NATS")?;
    fetch(&js, &m, keyring).await.map(|(s, _)| s).ok_or_else(|| "the NATS snapshot is unusable (see the log)".into())
}

/// Follows `SLUICE_EVENTS` from the state's next position as a supervised task, reconnecting
/// after every interruption (meanwhile the worker decides from memory), until shutdown.
pub fn follow(tasks: &Tasks, shared: Arc<Shared>, nats_url: String, keyring: Arc<Keyring>) {
    let applier = Arc::new(tokio::sync::Mutex::new(Applier::new(shared.clone())));
    tasks.supervise("event feed", Backoff::new(Duration::from_millis(100), Duration::from_secs(2)), move || {
        let (shared, applier, nats_url, keyring) = (shared.clone(), applier.clone(), nats_url.clone(), keyring.clone());
        async move {
            let result = follow_once(&shared, &mut *applier.lock().await, &nats_url, keyring).await;
            shared.synced.store(false, Ordering::Release);
            result.map_err(|e| format!("interrupted at position {}; deciding from memory: {e}", shared.position().0))
        }
    });
}

async fn follow_once(shared: &Shared, applier: &mut Applier, url: &str, keyring: Arc<Keyring>) -> Result<(), String> {
    // An ordered consumer resumes by itself after a reconnection, from the sequence after the
    // last one it delivered; with a bounded stream that one may be gone, and the consumer
    // would go on from the first one left, over a gap nobody sees. So with a `max_age` a
    // disconnection ends this feed: the next one checks the retained range first.
    let disconnects = Arc::new(AtomicU64::new(0));
    let counted = disconnects.clone();
    let options =
        async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).event_callback(move |event| {
            let counted = counted.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    let client = connect_with(options, url).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(dist::EVENTS_STREAM).await.map_err(|e| format!("{}: {e}", dist::EVENTS_STREAM))?;
    let info = stream.get_info().await.map_err(|e| e.to_string())?;
    let bounded = !info.config.max_age.is_zero();
    let last = info.state.last_sequence;
    if let Some(first) = aged_out(&info, shared.position()) {
        catch_up_from_snapshot(&js, applier, shared.position(), first, keyring).await?;
    }
    let from = shared.position().0 + 1;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
            filter_subjects: dist::WORKER_SUBJECTS.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut probe_every = tokio::time::interval(HEAD_PROBE_EVERY);
    probe_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    shared.synced.store(true, Ordering::Release);
    if last < from || head_probe(&stream, shared, applier).await? {
        // Nothing to catch up on (or nothing a worker receives): the state we have is current.
        shared.ready.store(true, Ordering::Release);
    }
    tracing::info!(from, stream_last = last, "following the event feed");
    loop {
        let waited_for = shared.wanted.load(Ordering::Relaxed) > shared.position().0;
        let next = tokio::select! {
            m = messages.next() => Some(m),
            () = tokio::time::sleep(WANTED_PROBE_EVERY), if waited_for => None,
            _ = probe_every.tick() => None,
            () = shared.head_probe.notified() => None,
        };
        let Some(next) = next else {
            if head_probe(&stream, shared, applier).await? {
                shared.ready.store(true, Ordering::Release);
            }
            continue;
        };
        let first = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the consumer ended".into()),
        };
        if bounded && disconnects.load(Ordering::Relaxed) > 0 {
            return Err("the NATS connection was interrupted; following again from our position".into());
        }
        let mut burst = vec![decode(&first)?];
        let mut pending = first.info().map(|i| i.pending).unwrap_or(0);
        while burst.len() < MAX_BURST {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => {
                    pending = m.info().map(|i| i.pending).unwrap_or(0);
                    burst.push(decode(&m)?);
                }
                Some(Some(Err(e))) => return Err(e.to_string()),
                Some(None) => return Err("the consumer ended".into()),
                None => break,
            }
        }
        if bounded && disconnects.load(Ordering::Relaxed) > 0 {
            return Err("the NATS connection was interrupted; following again from our position".into());
        }
        applier.apply(burst).map_err(|g| g.to_string())?;
        if pending == 0 || shared.position().0 >= last {
            shared.ready.store(true, Ordering::Release);
        }
    }
}

/// How often an idle feed looks for the log's head (what `/v1/nodes` shows as the worker's
/// position between two events it receives).
const HEAD_PROBE_EVERY: Duration = Duration::from_secs(2);

/// How often it looks while a `/wait` waits for a position past ours.
const WANTED_PROBE_EVERY: Duration = Duration::from_millis(50);

/// Moves the position over the events no worker receives at the end of the log: the stream's
/// last sequence `L` is read first, then the newest message of each subject a worker receives;
/// when none is past what was applied, every event up to `L` a worker needs has been applied
/// (the stream only grows, in order), and the position becomes `L`.
/// True when the position is the stream's head as read (caught up: the worker is ready).
/// An error when the stream's retention removed events past our position: the feed starts
/// over, from the newest snapshot.
async fn head_probe(
    stream: &jetstream::stream::Stream,
    shared: &Shared,
    applier: &mut Applier,
) -> Result<bool, String> {
    let mut info_of = stream.clone();
    let Ok(info) = info_of.info().await else { return Ok(false) };
    if let Some(first) = aged_out(info, shared.position()) {
        return Err(format!(
            "fell behind {}'s retained range (its first message is {first}, we are at {})",
            dist::EVENTS_STREAM,
            shared.position().0
        ));
    }
    let last = info.state.last_sequence;
    if last <= shared.position().0 {
        return Ok(true);
    }
    let Ok(newest) = newest_for_workers(stream).await else { return Ok(false) };
    if newest > shared.position().0 {
        return Ok(false);
    }
    applier.skip_to(Position(last));
    Ok(true)
}

/// The sequence of the newest message a worker receives (0: none).
async fn newest_for_workers(stream: &jetstream::stream::Stream) -> Result<u64, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let mut newest = 0;
    for subject in dist::WORKER_SUBJECTS {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => newest = newest.max(m.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(newest)
}

/// The stream's first sequence when its `max_age` may have removed events a worker at
/// `position` has not applied yet. Without a `max_age` nothing a worker receives expires (only
/// the audit's messages carry a TTL), so a first sequence past ours is only those.
fn aged_out(info: &jetstream::stream::Info, position: Position) -> Option<u64> {
    // An empty stream's first sequence is its last + 1, so this covers "everything expired".
    let first = info.state.first_sequence;
    (!info.config.max_age.is_zero() && first > position.0 + 1).then_some(first)
}

/// Replaces the state with the newest NATS snapshot, which must reach at least `first - 1`
/// (what the stream no longer holds); otherwise an error that names the gap (the relay takes
/// a snapshot at its start and then every interval, so a retry finds one).
async fn catch_up_from_snapshot(
    js: &jetstream::Context,
    applier: &mut Applier,
    position: Position,
    first: u64,
    keyring: Arc<Keyring>,
) -> Result<(), String> {
    let gone = format!(
        "events {}..{} this worker needs have aged out of {}",
        position.0 + 1,
        first.saturating_sub(1),
        dist::EVENTS_STREAM
    );
    let m = manifest(js).await.ok_or_else(|| format!("{gone} and NATS has no snapshot"))?;
    if m.position.0 + 1 < first {
        return Err(format!("{gone} and the newest snapshot is at {} (older)", m.position.0));
    }
    let (state, _) = fetch(js, &m, keyring).await.ok_or_else(|| format!("{gone} and the snapshot is unusable"))?;
    tracing::warn!(from = position.0, to = state.position().0, "{gone}; caught up from the newest snapshot");
    SNAPSHOT_CATCH_UPS.fetch_add(1, Ordering::Relaxed);
    applier.replace(state);
    Ok(())
}

/// Times the feed caught up from a snapshot because the events it needed had aged out of
/// `SLUICE_EVENTS`: `sluice_snapshot_catch_ups_total`.
pub static SNAPSHOT_CATCH_UPS: AtomicU64 = AtomicU64::new(0);

/// Events of a type or schema version this build does not know, skipped (kept as no-ops at
/// their positions): `sluice_events_skipped_total`.
pub static SKIPPED_EVENTS: AtomicU64 = AtomicU64::new(0);

fn decode(m: &jetstream::Message) -> Result<RecordedEvent, String> {
    let (event, skipped) = dist::decode_event_or_skip(&m.payload).map_err(|e| {
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        format!("event at stream sequence {seq} unreadable: {e}")
    })?;
    if let Some(event_type) = skipped {
        SKIPPED_EVENTS.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            position = event.position.0, %event_type,
            "an event this worker does not know (written by a newer control plane) is skipped; upgrade the worker"
        );
    }
    Ok(event)
}

/// Writes the local snapshot every `every` while the state moved.
pub async fn snapshot_loop(shared: Arc<Shared>, dir: std::path::PathBuf, every: Duration) {
    let mut written = Position(0);
    loop {
        tokio::time::sleep(every).await;
        let state = shared.state.load_full();
        if state.position() == written || !shared.is_ready() {
            continue;
        }
        let dir = dir.clone();
        let sh = shared.clone();
        let result = tokio::task::spawn_blocking(move || {
            let digest = sh.digest.of(&state);
            crate::local::write(&dir, &snapshot::encode_with_digest(&state, digest)).map(|()| state.position())
        })
        .await;
        match result {
            Ok(Ok(p)) => {
                written = p;
                tracing::debug!(position = p.0, "local snapshot written");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the local snapshot"),
            Err(_) => {}
        }
    }
}
