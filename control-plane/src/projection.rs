//! The control plane's read model: `AuthState` folded from the log at start and kept live
//! through the store's subscription. Reads never hit Postgres.
//!
//! Beside the state it keeps, per log stream, the version of its last event (the expected
//! version of the next append) and, per API key, when it was last used (from the batched
//! `ApiAccessed` audit events, so no request writes an event of its own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sluice_events::secret::Sha256Digest;
use sluice_events::state::Spare;
use sluice_events::{AuthState, Event, KeyId, Keyring, Position, RecordedEvent, Timestamp};
use tokio::sync::watch;

use crate::store::{EventStore, StoreError};

#[derive(Debug, Default)]
struct Side {
    /// Log stream → (version, position) of its last event.
    versions: HashMap<String, (u64, Position)>,
    last_used: HashMap<KeyId, Timestamp>,
    /// Position and chain hash of the last event applied: what this process has served.
    head: Option<(Position, Sha256Digest)>,
}

/// Shared, always-current state. One task applies; readers clone an `Arc`.
#[derive(Debug, Clone)]
pub struct Projection {
    state: Arc<RwLock<Arc<AuthState>>>,
    side: Arc<Mutex<Side>>,
    applied: watch::Receiver<Position>,
}

impl Projection {
    /// Folds the whole log, then keeps folding in the background.
    pub async fn start(store: &EventStore, keyring: Option<Arc<Keyring>>) -> Result<Projection, StoreError> {
        let mut state = match keyring {
            Some(k) => AuthState::with_keyring(k),
            None => AuthState::new(),
        };
        let mut side = Side::default();
        // The whole log, its hash chain checked on the way: a tampered log is not served.
        let (mut after, mut prev) = (Position::ZERO, sluice_events::event::GENESIS);
        loop {
            let page = store.read_chained(after, prev, 5000).await?;
            let Some(last) = page.last() else { break };
            (after, prev) = (last.position, last.hash);
            for e in &page {
                apply_or_log(&mut state, e);
                side.note(e);
            }
        }
        let (tx, applied) = watch::channel(state.position());
        let projection =
            Projection { state: Arc::new(RwLock::new(Arc::new(state))), side: Arc::new(Mutex::new(side)), applied };
        let mut sub = store.subscribe(projection.position()).await?;
        let live = projection.clone();
        tokio::spawn(async move {
            let mut burst = Vec::new();
            let mut spare = Spare::default();
            while let Some(first) = sub.recv().await {
                // A private state equal to the published one, once per burst: readers keep
                // their snapshot, the next read sees every event that had arrived.
                let mut s = spare.take(&live.current());
                let mut next = Some(first);
                let mut stop = false;
                while let Some(item) = next.take() {
                    match item {
                        Ok(e) => {
                            apply_or_log(&mut s, &e);
                            burst.push(e);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "projection stopped: the log holds an event this build cannot read");
                            stop = true;
                            break;
                        }
                    }
                    next = sub.try_recv();
                }
                let position = s.position();
                let previous =
                    std::mem::replace(&mut *live.state.write().unwrap_or_else(|p| p.into_inner()), Arc::new(s));
                // Versions are published after the state that contains them, so a command that
                // reads a version and then the state never validates against an older state.
                {
                    let mut side = live.side.lock().unwrap_or_else(|p| p.into_inner());
                    for e in &burst {
                        side.note(e);
                    }
                }
                spare.keep(previous, std::mem::take(&mut burst));
                tx.send_replace(position);
                if stop {
                    return;
                }
            }
        });
        Ok(projection)
    }

    pub fn current(&self) -> Arc<AuthState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Position and chain hash of the last event applied (none before any).
    pub fn head(&self) -> Option<(Position, Sha256Digest)> {
        self.side.lock().unwrap_or_else(|p| p.into_inner()).head
    }

    pub fn position(&self) -> Position {
        *self.applied.borrow()
    }

    /// The version and position of a log stream's last event, `None` if it has none.
    pub fn stream_version(&self, stream: &str) -> Option<(u64, Position)> {
        self.side.lock().unwrap_or_else(|p| p.into_inner()).versions.get(stream).copied()
    }

    /// When a key was last used, as far as this instance knows (its own requests and the
    /// audit batches of every instance).
    pub fn last_used(&self, key: &KeyId) -> Option<Timestamp> {
        self.side.lock().unwrap_or_else(|p| p.into_inner()).last_used.get(key).copied()
    }

    /// Records a use seen by this instance before its audit batch reaches the log.
    pub fn touch(&self, key: &KeyId, at: Timestamp) {
        let mut side = self.side.lock().unwrap_or_else(|p| p.into_inner());
        let slot = side.last_used.entry(key.clone()).or_insert(at);
        *slot = (*slot).max(at);
    }

    /// Waits until the projection has applied `position`; false on timeout.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> bool {
        let mut rx = self.applied.clone();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p >= position)).await.is_ok_and(|r| r.is_ok())
    }

    /// Waits for the next applied burst (or the timeout).
    pub async fn changed(&self, timeout: Duration) {
        let mut rx = self.applied.clone();
        rx.mark_unchanged();
        let _ = tokio::time::timeout(timeout, rx.changed()).await;
    }
}

impl Side {
    fn note(&mut self, e: &RecordedEvent) {
        self.head = Some((e.position, e.hash));
        match self.versions.get_mut(e.stream.as_str()) {
            Some(v) if v.0 >= e.version => {}
            Some(v) => *v = (e.version, e.position),
            None => {
                self.versions.insert(e.stream.clone(), (e.version, e.position));
            }
        }
        if let Event::ApiAccessed(batch) = &e.event {
            for entry in &batch.entries {
                let Some(id) = entry.subject.strip_prefix("key:") else { continue };
                let Ok(key) = KeyId::parse(id) else { continue };
                let slot = self.last_used.entry(key).or_insert(entry.at);
                *slot = (*slot).max(entry.at);
            }
        }
    }
}

fn apply_or_log(state: &mut AuthState, e: &RecordedEvent) {
    if let Err(err) = state.apply(e) {
        tracing::error!(error = %err, "projection could not apply an event");
    }
}
