//! The SRT streams of this worker and what an admitted caller does: a publisher feeds its
//! stream until it leaves, goes silent or is kicked; a player gets the GOP cache, then the
//! packets as they come, and is closed if it falls too far behind.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use srt_protocol::settings::KeySettings;
use srt_tokio::access::{RejectReason, ServerRejectReason};
use tokio::sync::broadcast;

use super::IDLE_TIMEOUT;
use super::feed::{Feed, LAGS_BEFORE_CLOSE};
use super::link::{PlayerLink, publisher_link};
use crate::admit::Admitted;
use crate::slot::Key;
use crate::stats::StreamCounters;

/// A live stream: its admitted publisher's feed. The publisher slot is `crate::slot`'s; an
/// entry here exists only while its publisher holds it.
struct Live {
    publisher: u64,
    feed: Arc<Feed>,
    counters: Arc<StreamCounters>,
}

/// The SRT streams of this worker, by stream (a mutex touched at connect and disconnect).
#[derive(Default)]
pub(super) struct Hub {
    streams: Mutex<HashMap<Key, Live>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Live>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new feed for an admitted publisher of `key`, and its id.
    fn live(&self, key: &Key, counters: Arc<StreamCounters>) -> (u64, Arc<Feed>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let feed = Arc::new(Feed::new());
        self.lock().insert(key.clone(), Live { publisher: id, feed: feed.clone(), counters });
        (id, feed)
    }

    fn release(&self, key: &Key, id: u64) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|l| l.publisher == id) {
            streams.remove(key);
        }
    }

    /// Whether `key` has a live publisher here.
    pub(super) fn is_live(&self, key: &Key) -> bool {
        self.lock().contains_key(key)
    }

    /// A live publisher's GOP cache and a receiver of the packets after it.
    fn subscribe(&self, key: &Key) -> Option<(Vec<Bytes>, broadcast::Receiver<Bytes>, Arc<StreamCounters>)> {
        let (feed, counters) = {
            let streams = self.lock();
            let live = streams.get(key)?;
            (live.feed.clone(), live.counters.clone())
        };
        let (gop, rx) = feed.join();
        Some((gop, rx, counters))
    }
}

/// An admitted publisher: accepted, then its packets fed to the stream until it ends.
pub(super) async fn publish(
    request: srt_tokio::ConnectionRequest,
    keys: Option<KeySettings>,
    admitted: Admitted,
    hub: &Hub,
) {
    let peer = request.remote();
    let Admitted { key, mut session, publishing, .. } = admitted;
    let Some(publishing) = publishing else { return };
    let counters = publishing.counters.clone();
    let (id, feed) = hub.live(&key, counters.clone());
    let mut socket = match request.accept(keys).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, error = %e, "SRT handshake failed after the decision");
            hub.release(&key, id);
            return;
        }
    };
    tracing::info!(%peer, app = %key.0, stream = %key.1, "SRT publisher live");
    let (rtt, latency) = (socket.settings().rtt, socket.settings().recv_tsbpd_latency);
    counters.srt_link(|l| {
        l.rtt_us = rtt.as_micros() as u64;
        l.latency_ms = latency.as_millis() as u64;
    });
    let mut link = socket.statistics().clone();
    loop {
        tokio::select! {
            Some(s) = link.next() => counters.srt_link(|l| publisher_link(l, &s)),
            packet = tokio::time::timeout(IDLE_TIMEOUT, socket.next()) => match packet {
                Ok(Some(Ok((_, data)))) => {
                    counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                    feed.publish(data);
                }
                Ok(Some(Err(_)) | None) => break,
                Err(_) => {
                    tracing::debug!(%peer, "SRT publisher idle; closing");
                    break;
                }
            },
            reason = session.ended() => {
                tracing::info!(%peer, reason = reason.as_str(), "SRT session ended: no longer allowed");
                break;
            }
        }
    }
    hub.release(&key, id);
    // The slot and the stream's counters end here.
    drop(publishing);
    let _ = socket.close().await;
}

/// An admitted player: only a live stream can be played (the caller learns it before the
/// handshake ends), then the GOP so far and the packets as they come.
pub(super) async fn play(
    request: srt_tokio::ConnectionRequest,
    keys: Option<KeySettings>,
    admitted: Admitted,
    hub: &Hub,
) {
    let peer = request.remote();
    let Admitted { key, mut session, .. } = admitted;
    let Some((gop, mut rx, counters)) = hub.subscribe(&key) else {
        let _ = request.reject(RejectReason::Server(ServerRejectReason::Notfound)).await;
        return;
    };
    let mut socket = match request.accept(keys).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, error = %e, "SRT handshake failed after the decision");
            return;
        }
    };
    counters.players.fetch_add(1, Ordering::Relaxed);
    // The GOP so far first, so the player decodes at once instead of waiting for the
    // publisher's next keyframe.
    for data in gop {
        let n = data.len() as u64;
        if socket.send((Instant::now(), data)).await.is_err() {
            break;
        }
        counters.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    let mut lags = 0;
    let mut link = socket.statistics().clone();
    let mut reported = PlayerLink::default();
    loop {
        tokio::select! {
            Some(s) = link.next() => {
                let now = PlayerLink::of(&s);
                counters.srt_link(|l| now.add_since(&reported, l));
                reported = now;
            }
            packet = rx.recv() => match packet {
                Ok(data) => {
                    lags = 0;
                    let n = data.len() as u64;
                    if socket.send((Instant::now(), data)).await.is_err() {
                        break;
                    }
                    counters.bytes_out.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    counters.dropped.fetch_add(missed, Ordering::Relaxed);
                    lags += 1;
                    if lags >= LAGS_BEFORE_CLOSE {
                        tracing::info!(%peer, "SRT player too far behind; closing");
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            reason = session.ended() => {
                tracing::info!(%peer, reason = reason.as_str(), "SRT session ended: no longer allowed");
                break;
            }
        }
    }
    counters.players.fetch_sub(1, Ordering::Relaxed);
    let _ = socket.close().await;
}
