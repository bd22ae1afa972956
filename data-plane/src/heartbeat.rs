//! Heartbeats: every few seconds the worker says on `sluice.hb.<node>` where its state is,
//! its access digest, its sessions and uptime. Core NATS, fire and forget: a missed beat is
//! replaced by the next one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_events::NodeId;
use sluice_events::dist::{self, Heartbeat};

use crate::sync::Shared;

pub fn beat(
    shared: &Shared,
    node: &NodeId,
    digest: Option<(sluice_events::Position, sluice_events::Sha256Digest)>,
    decisions_pending: u64,
    streams: Vec<sluice_events::dist::StreamStat>,
) -> Heartbeat {
    Heartbeat {
        node_id: node.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        position: shared.position(),
        digest: digest.map(|(_, d)| d),
        digest_position: digest.map(|(p, _)| p),
        live_sessions: shared.live_sessions.load(Ordering::Relaxed),
        uptime_secs: shared.started.elapsed().as_secs(),
        ready: shared.is_ready(),
        synced: shared.synced.load(Ordering::Acquire),
        sent_at: crate::clock::now(),
        decisions_pending,
        streams,
    }
}

pub async fn run(
    shared: Arc<Shared>,
    spool: Option<crate::spool::Spool>,
    stats: Option<Arc<crate::stats::MediaStats>>,
    node: NodeId,
    nats_url: String,
    every: Duration,
) {
    let subject = dist::heartbeat_subject(&node);
    let mut client: Option<async_nats::Client> = None;
    loop {
        if client.is_none() {
            client = crate::sync::connect(&nats_url).await.ok();
        }
        if let Some(c) = &client {
            let sh = shared.clone();
            let digest = if shared.is_ready() {
                tokio::task::spawn_blocking(move || sh.current_digest()).await.ok()
            } else {
                None
            };
            let body = serde_json::to_vec(&beat(
                &shared,
                &node,
                digest,
                spool.as_ref().map_or(0, |s| s.backlog() as u64),
                stats.as_ref().map(|s| s.snapshot()).unwrap_or_default(),
            ))
            .unwrap_or_default();
            if c.publish(subject.clone(), body.into()).await.is_err() {
                client = None;
            }
        }
        tokio::time::sleep(every).await;
    }
}
