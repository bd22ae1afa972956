//! Workers as the control plane sees them: their heartbeats (core NATS `sluice.hb.<node>`),
//! kept in memory by every control-plane instance, and `GET /v1/nodes`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use sluice_events::AuthState;
use sluice_events::dist::{self, Heartbeat};
use sluice_events::state::AccessDigestMemo;

#[derive(Debug, Clone)]
struct Seen {
    beat: Heartbeat,
    at: Instant,
}

/// The newest heartbeat of each worker, and the control plane's own access digest (cached per
/// table change, since it costs a pass over the state).
#[derive(Debug, Default)]
pub struct Nodes {
    seen: Mutex<BTreeMap<String, Seen>>,
    digest: AccessDigestMemo,
}

impl Nodes {
    pub fn record(&self, beat: Heartbeat) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(beat.node_id.as_str().to_owned(), Seen { beat, at: Instant::now() });
    }

    /// `app/stream` as reported by every worker heard from within `fresh` that has it live.
    pub fn stream(&self, app: &str, stream: &str, fresh: Duration) -> Vec<(String, dist::StreamStat)> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .filter(|(_, s)| s.at.elapsed() < fresh)
            .flat_map(|(node, s)| {
                s.beat
                    .streams
                    .iter()
                    .filter(|st| st.app == app && st.stream == stream)
                    .map(|st| (node.clone(), st.clone()))
            })
            .collect()
    }

    /// Every live stream on the nodes heard from within `fresh`, by app, stream and node.
    pub fn streams(&self, fresh: Duration) -> Vec<(String, dist::StreamStat)> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = seen
            .iter()
            .filter(|(_, s)| s.at.elapsed() < fresh)
            .flat_map(|(node, s)| s.beat.streams.iter().map(|st| (node.clone(), st.clone())))
            .collect();
        out.sort_by(|a, b| (&a.1.app, &a.1.stream, &a.0).cmp(&(&b.1.app, &b.1.stream, &b.0)));
        out
    }

    /// Forgets nodes silent for longer than `forget`.
    fn prune(&self, forget: Duration) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, s| s.at.elapsed() < forget);
    }

    pub fn list(&self, state: &AuthState, stale_after: Duration) -> Vec<NodeView> {
        self.prune(stale_after * 20);
        let seen: Vec<Seen> = self.seen.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let head = state.position();
        let ours = if seen.is_empty() { None } else { Some(self.digest.of(state)) };
        seen.into_iter()
            .map(|s| {
                let b = s.beat;
                // The worker's digest covers its tables as of `digest_position`; ours covers
                // ours from `tables_position` to `head`. Comparable when that range holds it.
                let digest_match = match (b.digest, b.digest_position, ours) {
                    (Some(d), Some(at), Some(o)) if at >= state.tables_position() && at <= head => Some(d == o),
                    _ => None,
                };
                let last_seen_ms = s.at.elapsed().as_millis() as u64;
                NodeView {
                    node_id: b.node_id.as_str().to_owned(),
                    version: b.version,
                    position: b.position.0,
                    lag: head.0.saturating_sub(b.position.0),
                    digest: b.digest.map(|d| d.to_hex()),
                    digest_match,
                    ready: b.ready,
                    synced: b.synced,
                    live_sessions: b.live_sessions,
                    decisions_pending: b.decisions_pending,
                    uptime_secs: b.uptime_secs,
                    last_seen_ms,
                    stale: s.at.elapsed() > stale_after,
                }
            })
            .collect()
    }

    /// Listens to heartbeats until shutdown, reconnecting as needed.
    pub fn spawn_listener(self: &Arc<Self>, tasks: &crate::task::Tasks, nats_url: String) {
        let me = Arc::downgrade(self);
        tasks.spawn("heartbeat listener", async move {
            loop {
                match crate::relay::connect(&nats_url).await {
                    Ok(client) => match client.subscribe(dist::HEARTBEAT_SUBJECTS).await {
                        Ok(mut sub) => {
                            while let Some(msg) = sub.next().await {
                                let Some(nodes) = me.upgrade() else { return };
                                match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                                    Ok(beat) => nodes.record(beat),
                                    Err(e) => {
                                        tracing::warn!(subject = %msg.subject, error = %e, "bad heartbeat ignored")
                                    }
                                }
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "heartbeats: cannot subscribe"),
                    },
                    Err(e) => tracing::debug!(error = %e, "heartbeats: NATS unreachable; retrying"),
                }
                if me.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct NodeView {
    pub node_id: String,
    pub version: String,
    /// The log position the worker's state has applied.
    pub position: u64,
    /// Log head minus `position`.
    pub lag: u64,
    /// Hex `access_digest` of the worker's tables, once it has computed it.
    pub digest: Option<String>,
    /// Whether it equals the control plane's; `null` while the two cannot be compared yet.
    pub digest_match: Option<bool>,
    pub ready: bool,
    /// Whether its event feed from NATS is live.
    pub synced: bool,
    pub live_sessions: u64,
    /// Decisions in its spool that the log does not hold yet (grows while NATS or the
    /// control plane is away).
    pub decisions_pending: u64,
    pub uptime_secs: u64,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// No heartbeat for longer than `node_stale_secs`.
    pub stale: bool,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_events::event::{ApiAccessed, AppCreated, GENESIS};
    use sluice_events::{Event, Metadata, NodeId, Position, RecordedEvent, Sha256Digest, Timestamp};

    fn record(state: &mut AuthState, event: Event) {
        let position = state.position().next();
        let e = RecordedEvent {
            position,
            event_id: uuid::Uuid::from_u128(position.0 as u128),
            stream: event.log_stream(),
            version: 0,
            event,
            metadata: Metadata::default(),
            recorded_at: Timestamp(0),
            hash: GENESIS,
        };
        state.apply(&e).unwrap();
    }

    fn beat(position: u64, digest: Option<(u64, Sha256Digest)>) -> Heartbeat {
        Heartbeat {
            node_id: NodeId::parse("edge-1").unwrap(),
            version: "0.1.0".into(),
            position: Position(position),
            digest: digest.map(|(_, d)| d),
            digest_position: digest.map(|(p, _)| Position(p)),
            live_sessions: 0,
            decisions_pending: 0,
            streams: vec![],
            uptime_secs: 1,
            ready: true,
            synced: true,
            sent_at: Timestamp(0),
        }
    }

    #[test]
    fn lag_and_digest_match_are_judged_against_the_last_table_change() {
        let mut state = AuthState::new();
        record(&mut state, AppCreated { app: "live".parse().unwrap(), policy: Default::default() }.into());
        let ours = state.access_digest();
        // An audit event moves the head but not the tables.
        record(&mut state, ApiAccessed { instance: "cp".into(), entries: vec![] }.into());
        let nodes = Nodes::default();
        let stale = Duration::from_secs(15);
        let one = |nodes: &Nodes| nodes.list(&state, stale).pop().unwrap();

        nodes.record(beat(1, Some((1, ours))));
        let v = one(&nodes);
        assert_eq!((v.lag, v.digest_match, v.stale), (1, Some(true), false));
        nodes.record(beat(2, Some((2, Sha256Digest([7; 32])))));
        assert_eq!(one(&nodes).digest_match, Some(false), "a wrong state is flagged");
        nodes.record(beat(0, Some((0, ours))));
        assert_eq!(one(&nodes).digest_match, None, "behind the last table change: not comparable");
        nodes.record(beat(2, None));
        assert_eq!((one(&nodes).lag, one(&nodes).digest_match), (0, None));
    }
}
