//! What a media thread shares with its connections (`Ctx`), and the worker-wide `Directory`
//! of which thread each live RTMP stream is published on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::channel::mpsc as fmpsc;
use tokio::sync::mpsc;

use super::chunk::Media;
use super::hub::{Channel, Hub, Key, Mirror, PlayerLimits};
use sluice_events::AccessRequest;
use tokio::sync::oneshot;

use crate::admit::{Admission, Admitted, Refusal};
use crate::stats::StreamCounters;

/// The admitted RTMP publishers of this worker, by stream: on which media thread each is, so
/// a player on another thread can have it relayed. The publisher slot itself (one per stream,
/// across protocols and workers) is `crate::slot`'s; an entry here exists only while its
/// publisher holds the slot.
#[derive(Debug, Default)]
pub(super) struct Directory {
    streams: Mutex<HashMap<Key, Entry>>,
}

#[derive(Debug)]
struct Entry {
    thread: usize,
    publisher: u64,
    counters: Arc<StreamCounters>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An admitted publisher of `key` is live on `thread`.
    pub(super) fn admitted(&self, key: &Key, thread: usize, publisher: u64, counters: Arc<StreamCounters>) {
        self.lock().insert(key.clone(), Entry { thread, publisher, counters });
    }

    pub(super) fn release(&self, key: &Key, publisher: u64) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|e| e.publisher == publisher) {
            streams.remove(key);
        }
    }

    /// The thread and counters of the admitted publisher of `key`.
    pub(super) fn live(&self, key: &Key) -> Option<(usize, Arc<StreamCounters>)> {
        self.lock().get(key).map(|e| (e.thread, e.counters.clone()))
    }
}

/// An admission asked of the tokio thread (claims, the spool and NATS live there).
#[derive(Debug)]
pub struct AdmitJob {
    pub request: AccessRequest,
    /// For a play: whether the stream is live on some media thread of this worker.
    pub live: bool,
    /// The request could not be read: only recorded (`Decider::record_malformed`), refused.
    pub malformed: bool,
    /// For a play that is not live under the name asked for: whether the public name it
    /// resolves to (another player id of a publisher) is live on this worker.
    pub live_as: Option<LiveCheck>,
    pub reply: oneshot::Sender<Result<Admitted, Refusal>>,
}

/// Whether a stream is live on any media thread (the directory, shared by them).
pub struct LiveCheck(pub Box<dyn Fn(&Key) -> bool + Send>);

impl std::fmt::Debug for LiveCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCheck")
    }
}

/// Runs the media threads' admissions on the tokio runtime.
pub async fn serve_admissions(admission: Admission, mut jobs: mpsc::Receiver<AdmitJob>) {
    while let Some(job) = jobs.recv().await {
        let admission = admission.clone();
        tokio::spawn(async move {
            let r = &job.request;
            let answer = if job.malformed {
                match admission.decider.record_malformed(r.action, r.protocol, r.client_ip).await {
                    Ok(record) => Err(Refusal::Refused(Box::new(record))),
                    Err(e) => Err(Refusal::Unavailable(e.to_string())),
                }
            } else {
                let live = job.live
                    || job.live_as.as_ref().is_some_and(|live_as| {
                        let public = sluice_events::decide::public_stream(&admission.decider.shared.state.load(), r);
                        public != r.stream && (live_as.0)(&(r.app.clone(), public))
                    });
                admission.admit(job.request, live).await
            };
            let _ = job.reply.send(answer);
        });
    }
}

/// A media thread asks the publisher's thread to relay a stream to it.
pub(super) struct Attach {
    pub(super) key: Key,
    pub(super) mirror: Mirror,
}

pub(super) struct Ctx {
    /// Which media thread this is.
    pub(super) thread: usize,
    pub(super) directory: Arc<Directory>,
    /// Every media thread's inbox, by thread.
    pub(super) inboxes: Arc<Vec<fmpsc::UnboundedSender<Attach>>>,
    pub(super) hub: RefCell<Hub>,
    pub(super) gate: std::sync::Arc<crate::limits::Gate>,
    pub(super) jobs: mpsc::Sender<AdmitJob>,
    pub(super) next_id: Cell<u64>,
    /// `SLUICE_RTMP_MAX_MESSAGE_BYTES`.
    pub(super) max_message: usize,
    pub(super) player_limits: PlayerLimits,
    pub(super) idle_timeout: Duration,
}

impl Ctx {
    /// A connection or relay id, unique across the media threads.
    pub(super) fn new_id(&self) -> u64 {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        ((self.thread as u64) << 48) | n
    }

    /// Whether `key` has a publisher on this thread or another (a player here can have it).
    pub(super) fn live(&self, key: &Key) -> bool {
        self.hub.borrow().channels.get(key).is_some_and(|c| c.publisher.is_some()) || self.directory.live(key).is_some()
    }

    /// Gives this thread a copy of `key` relayed from the thread where it is published, if
    /// it is live there. The copy is a channel like any other; its players join it.
    pub(super) fn mirror(self: &Rc<Self>, key: &Key) -> bool {
        let Some((thread, counters)) = self.directory.live(key) else { return false };
        if thread == self.thread {
            return false;
        }
        let (tx, mut rx) = fmpsc::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let mirror = Mirror { tx, queued: queued.clone(), skipping: false };
        if self.inboxes[thread].unbounded_send(Attach { key: key.clone(), mirror }).is_err() {
            return false;
        }
        let id = self.new_id();
        let ch = Channel { publisher: Some(id), mirror: true, counters: Some(counters), ..Channel::default() };
        let mut hub = self.hub.borrow_mut();
        hub.channels.insert(key.clone(), ch);
        hub.wake_timer();
        drop(hub);
        tracing::info!(app = %key.0, stream = %key.1, from = thread, to = self.thread, "RTMP stream relayed from another media thread");
        let ctx = self.clone();
        let key = key.clone();
        monoio::spawn(async move {
            let ours = |hub: &Hub| hub.channels.get(&key).is_some_and(|c| c.mirror && c.publisher == Some(id));
            while let Some(m) = rx.next().await {
                queued.fetch_sub(1, Ordering::Relaxed);
                let mut hub = ctx.hub.borrow_mut();
                if !ours(&hub) {
                    // Nobody here watches it any more: dropping `rx` tells the publisher's
                    // thread at its next message.
                    return;
                }
                if matches!(m, Media::End) {
                    hub.end(&key);
                    return;
                }
                hub.publish(&key, m);
            }
            let mut hub = ctx.hub.borrow_mut();
            if ours(&hub) {
                hub.end(&key);
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn only_admitted_publishers_are_found_and_only_their_own_release_removes_them() {
        let stats = crate::stats::MediaStats::default();
        let dir = Directory::default();
        let key: Key = (sluice_events::AppName::parse("tv").unwrap(), sluice_events::StreamName::parse("cam").unwrap());
        assert!(dir.live(&key).is_none());
        dir.admitted(&key, 0, 1, stats.stream_started("tv", "cam", "rtmp", None));
        assert_eq!(dir.live(&key).map(|(t, _)| t), Some(0));
        dir.release(&key, 2);
        assert!(dir.live(&key).is_some(), "released only by its publisher");
        dir.release(&key, 1);
        assert!(dir.live(&key).is_none());
    }
}
