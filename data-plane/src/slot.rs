//! One publisher per stream, whatever the protocol and whichever worker: the publisher slot.
//!
//! A slot is claimed in two places. On this worker, in one map shared by RTMP, SRT and anything
//! later (a mutex touched at publish and unpublish only). Across the cluster, as a lease in the
//! NATS KV bucket `sluice-publishers`: `create` of the stream's key (it fails while another
//! worker holds it), renewed every third of the lease while the publisher is live, deleted at
//! the end (only at the revision this worker wrote, so a lease taken over by another worker is
//! never deleted by mistake). The bucket's `max_age` is the lease time: the lease of a worker
//! that dies without a word expires by itself.
//!
//! When NATS does not answer within `CLAIM_TIMEOUT`, the stream is admitted on the local slot
//! alone, the decision says so (`SlotScope::Local`), and the lease is created once NATS is back;
//! if another worker took the stream meanwhile, that is logged (media keeps flowing: an outage
//! of the control path must not become one of the media path).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use sluice_events::decision::SlotScope;
use sluice_events::{AppName, NodeId, StreamName, dist};
use tokio::sync::{OnceCell, mpsc};

use crate::task::Tasks;

/// How long claiming the lease may take before the worker treats NATS as unreachable.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);

/// A stream, by app and (public) stream name.
pub type Key = (AppName, StreamName);

/// What the renewal task is told, in order.
#[derive(Debug)]
enum Change {
    /// A lease this worker holds (at `revision`), or must create once NATS answers (`None`).
    Hold { lease: String, owner: u64, revision: Option<u64> },
    /// The slot ended.
    Release { lease: String, owner: u64 },
}

/// The cluster half: the bucket, and the channel to the renewal task.
#[derive(Debug)]
struct Cluster {
    client: async_nats::Client,
    kv: OnceCell<kv::Store>,
    ttl: Duration,
    node: NodeId,
    changes: mpsc::UnboundedSender<Change>,
}

/// The publisher slots of this worker.
#[derive(Debug)]
pub struct Slots {
    local: Mutex<HashMap<Key, u64>>,
    next: AtomicU64,
    cluster: Option<Cluster>,
}

/// A held slot; dropping it frees the stream (here at once, in the cluster by the renewal task).
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    key: Key,
    owner: u64,
    /// Whether the cluster's lease backs it, or this worker's slot alone (NATS unreachable).
    pub scope: SlotScope,
}

impl Slot {
    pub fn key(&self) -> &Key {
        &self.key
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut local = self.slots.local.lock().unwrap_or_else(|p| p.into_inner());
        if local.get(&self.key) == Some(&self.owner) {
            local.remove(&self.key);
        }
        drop(local);
        if let Some(c) = &self.slots.cluster {
            let _ = c.changes.send(Change::Release { lease: lease_key(&self.key), owner: self.owner });
        }
    }
}

/// The stream's key in `sluice-publishers` (app and stream names may hold characters KV keys
/// may not, so the key is a digest).
pub fn lease_key(key: &Key) -> String {
    dist::publisher_lease_key(key.0.as_str(), key.1.as_str())
}

impl Slots {
    /// Slots on this worker only (tests of the pure parts; a worker always has NATS).
    pub fn local_only() -> Arc<Slots> {
        Arc::new(Slots { local: Mutex::default(), next: AtomicU64::new(1), cluster: None })
    }

    /// Slots backed by leases of `ttl` in NATS; the renewal task runs among `tasks`.
    pub fn with_cluster(tasks: &Tasks, client: async_nats::Client, node: NodeId, ttl: Duration) -> Arc<Slots> {
        let (changes, rx) = mpsc::unbounded_channel();
        let ttl = ttl.max(Duration::from_secs(1));
        let slots = Arc::new(Slots {
            local: Mutex::default(),
            next: AtomicU64::new(1),
            cluster: Some(Cluster { client, kv: OnceCell::new(), ttl, node, changes }),
        });
        tasks.spawn("publisher leases", renew(Arc::downgrade(&slots), rx));
        slots
    }

    /// Claims `key`'s publisher slot; `None` when a publisher holds it, here or on another
    /// worker.
    pub async fn claim(self: &Arc<Self>, key: &Key) -> Option<Slot> {
        let owner = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            if local.contains_key(key) {
                return None;
            }
            local.insert(key.clone(), owner);
        }
        let mut slot = Slot { slots: self.clone(), key: key.clone(), owner, scope: SlotScope::Local };
        let Some(cluster) = &self.cluster else { return Some(slot) };
        let lease = lease_key(key);
        let created = match cluster.store().await {
            Some(kv) => tokio::time::timeout(CLAIM_TIMEOUT, kv.create(&lease, cluster.value())).await.ok(),
            None => None,
        };
        let revision = match created {
            Some(Ok(revision)) => Some(revision),
            Some(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Live on another worker: this slot is dropped, which frees the local one (the
                // release it sends finds no lease of ours and deletes nothing).
                return None;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, bucket = dist::PUBLISHERS_BUCKET, "publisher lease not created; this worker's slot alone holds the stream");
                None
            }
            None => {
                tracing::warn!(
                    bucket = dist::PUBLISHERS_BUCKET,
                    "NATS unreachable; this worker's slot alone holds the stream"
                );
                None
            }
        };
        if revision.is_some() {
            slot.scope = SlotScope::Cluster;
        }
        let _ = cluster.changes.send(Change::Hold { lease, owner, revision });
        Some(slot)
    }
}

impl Cluster {
    fn value(&self) -> bytes::Bytes {
        bytes::Bytes::from(self.node.as_str().to_owned())
    }

    async fn store(&self) -> Option<&kv::Store> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return None;
        }
        let js = jetstream::new(self.client.clone());
        let init = async {
            let kv = match js.get_key_value(dist::PUBLISHERS_BUCKET).await {
                Ok(kv) => kv,
                Err(_) => js
                    .create_key_value(kv::Config {
                        bucket: dist::PUBLISHERS_BUCKET.to_owned(),
                        history: 1,
                        // The lease time: a lease nobody renews is gone after it.
                        max_age: self.ttl,
                        storage: jetstream::stream::StorageType::Memory,
                        num_replicas: crate::sync::replicas(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?,
            };
            crate::sync::check_replicas(&js, &dist::kv_stream(dist::PUBLISHERS_BUCKET)).await?;
            Ok::<_, String>(kv)
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, self.kv.get_or_try_init(|| init)).await {
            Ok(Ok(kv)) => Some(kv),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, bucket = dist::PUBLISHERS_BUCKET, "cannot open the publishers bucket");
                None
            }
            Err(_) => None,
        }
    }
}

/// A lease this worker holds.
#[derive(Debug)]
struct Held {
    owner: u64,
    /// The revision this worker last wrote; `None` until it could create the lease.
    revision: Option<u64>,
    /// Another worker had the stream when this one came back (logged once).
    lost: bool,
}

/// The renewal task: applies holds and releases in order, and renews every held lease each
/// third of the lease time.
async fn renew(slots: std::sync::Weak<Slots>, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut held: HashMap<String, Held> = HashMap::new();
    let every = match slots.upgrade().and_then(|s| s.cluster.as_ref().map(|c| c.ttl)) {
        Some(ttl) => ttl / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = changes.recv() => {
                let Some(change) = change else { return };
                let Some(slots) = slots.upgrade() else { return };
                let Some(cluster) = slots.cluster.as_ref() else { return };
                match change {
                    Change::Hold { lease, owner, revision } => {
                        held.insert(lease, Held { owner, revision, lost: false });
                    }
                    Change::Release { lease, owner } => {
                        let Some(h) = held.get(&lease).filter(|h| h.owner == owner) else { continue };
                        let revision = h.revision;
                        held.remove(&lease);
                        if let (Some(revision), Some(kv)) = (revision, cluster.store().await) {
                            // At our revision only: a lease another worker took is not ours.
                            let deleted = tokio::time::timeout(CLAIM_TIMEOUT, kv.delete_expect_revision(&lease, Some(revision))).await;
                            if !matches!(deleted, Ok(Ok(()))) {
                                tracing::debug!(lease, "publisher lease not deleted; it expires by itself");
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let Some(slots) = slots.upgrade() else { return };
                let Some(cluster) = slots.cluster.as_ref() else { return };
                if held.is_empty() {
                    continue;
                }
                let Some(kv) = cluster.store().await else { continue };
                for (lease, h) in held.iter_mut() {
                    let written = match h.revision {
                        Some(revision) => tokio::time::timeout(CLAIM_TIMEOUT, kv.update(lease, cluster.value(), revision)).await.map(|r| r.map_err(|e| e.to_string())),
                        None => tokio::time::timeout(CLAIM_TIMEOUT, kv.create(lease, cluster.value())).await.map(|r| r.map_err(|e| e.to_string())),
                    };
                    match written {
                        Ok(Ok(revision)) => {
                            h.revision = Some(revision);
                            h.lost = false;
                        }
                        Ok(Err(e)) => {
                            // Our own create, which timed out at claim time but landed: adopt it.
                            if h.revision.is_none()
                                && let Ok(Ok(Some(entry))) = tokio::time::timeout(CLAIM_TIMEOUT, kv.entry(lease.as_str())).await
                                && entry.value == cluster.value()
                            {
                                h.revision = Some(entry.revision);
                                continue;
                            }
                            // Expired during an outage (then created again at the next tick),
                            // or taken by another worker meanwhile.
                            if h.revision.is_none() && !h.lost {
                                tracing::warn!(lease, error = %e, "stream published on another worker while this one was cut off from NATS");
                                h.lost = true;
                            }
                            h.revision = None;
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(app: &str, stream: &str) -> Key {
        (AppName::parse(app).unwrap(), StreamName::parse(stream).unwrap())
    }

    #[tokio::test]
    async fn one_publisher_per_stream_until_its_slot_is_dropped() {
        let slots = Slots::local_only();
        let cam = key("tv", "cam");
        let first = slots.claim(&cam).await.expect("free");
        assert_eq!(first.scope, SlotScope::Local);
        assert!(slots.claim(&cam).await.is_none(), "a second publisher, whatever its protocol");
        assert!(slots.claim(&key("tv", "other")).await.is_some(), "another stream is free");
        drop(first);
        assert!(slots.claim(&cam).await.is_some(), "free again once the first ends");
    }

    #[tokio::test]
    async fn without_nats_the_local_slot_alone_holds_the_stream_and_says_so() {
        // A real client with no server to reach (nothing listens on port 9).
        let client =
            async_nats::ConnectOptions::new().retry_on_initial_connect().connect("nats://127.0.0.1:9").await.unwrap();
        let tasks = Tasks::new();
        let slots = Slots::with_cluster(&tasks, client, NodeId::parse("w1").unwrap(), Duration::from_secs(3));
        let cam = key("tv", "cam");
        let slot = slots.claim(&cam).await.expect("admitted on this worker's slot");
        assert_eq!(slot.scope, SlotScope::Local);
        assert!(slots.claim(&cam).await.is_none(), "still one publisher per stream on this worker");
        drop(slot);
        assert!(slots.claim(&cam).await.is_some());
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
    }

    #[test]
    fn lease_keys_are_valid_kv_keys_for_any_name() {
        let k = lease_key(&key("tv", "cam.one~2"));
        assert!(k.starts_with("p."));
        assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'), "{k}");
        assert_ne!(k, lease_key(&key("tv", "cam.one~3")));
    }
}
