//! Decisions up to the control plane (DESIGN.md §5): the spool's unconfirmed decisions are
//! published, in order, to `SLUICE_DECISIONS` (`sluice.dec.<node>`, `Nats-Msg-Id` = decision
//! id), and the control plane's mark for this node (KV `sluice-decision-marks`) trims the
//! spool. Nothing is trimmed on a publish ack alone: JetStream acknowledges before fsync, and
//! only the mark says the decision is in the log.
//!
//! While NATS is down the spool just grows; when it returns, publishing resumes after the last
//! acknowledged decision. If the mark stops moving while decisions are out (a NATS that lost
//! them, a control plane that restarted), everything unconfirmed is sent again after
//! `RESEND_AFTER`; ingestion is idempotent by decision id, so a re-send never duplicates.

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::StreamExt as _;
use sluice_events::NodeId;
use sluice_events::dist::{self, DecisionMark};

use crate::spool::Spool;

const IN_FLIGHT: usize = 256;
const RESEND_AFTER: Duration = Duration::from_secs(10);

fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Publishes the spool's decisions forever.
pub async fn publish_loop(spool: Spool, client: async_nats::Client, node: NodeId) {
    let js = jetstream::new(client.clone());
    let subject = dist::decision_subject(&node);
    let spool_id = spool.id().to_string();
    let mut durable = spool.watch_durable();
    let mut sent = spool.confirmed();
    let mut last_confirmed = spool.confirmed();
    let mut progress = Instant::now();
    let mut failing = false;
    loop {
        let confirmed = spool.confirmed();
        if confirmed != last_confirmed {
            last_confirmed = confirmed;
            progress = Instant::now();
        }
        sent = sent.max(confirmed);
        if sent > confirmed && progress.elapsed() > RESEND_AFTER {
            tracing::info!(
                from = confirmed + 1,
                to = sent,
                "decisions published but not confirmed; sending them again"
            );
            sent = confirmed;
            progress = Instant::now();
        }
        let batch = spool.unconfirmed_after(sent, IN_FLIGHT);
        if batch.is_empty() {
            tokio::select! {
                _ = durable.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        if !connected(&client) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut acks = Vec::with_capacity(batch.len());
        let mut error = None;
        for s in &batch {
            let mut headers = HeaderMap::new();
            headers.insert(dist::HEADER_SPOOL, spool_id.as_str());
            headers.insert(dist::HEADER_SEQUENCE, s.sequence.to_string().as_str());
            let publish = PublishMessage::build()
                .payload(s.payload.clone())
                .headers(headers)
                .message_id(s.decision_id.to_string());
            match js.send_publish(subject.clone(), publish).await {
                Ok(ack) => acks.push((s.sequence, ack)),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        for (sequence, ack) in acks {
            match ack.await {
                Ok(_) => sent = sequence,
                Err(e) => {
                    error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
        match error {
            None => {
                if failing {
                    tracing::info!(sent, backlog = spool.backlog(), "decision uplink restored");
                    failing = false;
                }
            }
            Some(e) => {
                if !failing {
                    tracing::warn!(error = %e, backlog = spool.backlog(), "cannot publish decisions; they stay in the spool");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Follows this node's mark and trims the spool up to it.
pub async fn mark_loop(spool: Spool, client: async_nats::Client, node: NodeId) {
    let js = jetstream::new(client.clone());
    loop {
        if connected(&client) {
            match js.get_key_value(dist::DECISION_MARKS_BUCKET).await {
                Ok(kv) => match kv.watch_with_history(node.as_str()).await {
                    Ok(mut watch) => {
                        while let Some(entry) = watch.next().await {
                            let Ok(entry) = entry else { break };
                            match serde_json::from_slice::<DecisionMark>(&entry.value) {
                                Ok(mark) if mark.spool == spool.id() => spool.confirm(mark.sequence),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "unreadable decision mark ignored"),
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot watch the decision mark yet"),
                },
                Err(e) => tracing::debug!(error = %e, "no decision marks bucket yet (the control plane makes it)"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
