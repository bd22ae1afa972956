//! The control plane's read model: `AuthState` folded from the log at start and kept live
//! through the store's subscription. Reads never hit Postgres.

use std::sync::{Arc, RwLock};

use sluice_events::{AuthState, Keyring, Position};

use crate::store::{EventStore, StoreError};

/// Shared, always-current state. Writers (one task) apply; readers clone an `Arc`.
#[derive(Debug, Clone)]
pub struct Projection {
    state: Arc<RwLock<Arc<AuthState>>>,
}

impl Projection {
    /// Folds the whole log, then keeps folding in the background.
    pub async fn start(store: &EventStore, keyring: Option<Arc<Keyring>>) -> Result<Projection, StoreError> {
        let mut state = match keyring {
            Some(k) => AuthState::with_keyring(k),
            None => AuthState::new(),
        };
        loop {
            let page = store.read_all(state.position(), 5000).await?;
            if page.is_empty() {
                break;
            }
            for e in &page {
                apply_or_log(&mut state, e);
            }
        }
        let projection = Projection { state: Arc::new(RwLock::new(Arc::new(state))) };
        let mut sub = store.subscribe(projection.position()).await?;
        let live = projection.clone();
        tokio::spawn(async move {
            while let Some(first) = sub.recv().await {
                // Copy-on-write, once per burst: readers keep their snapshot, the next read sees
                // every event that had arrived.
                let mut s = (*live.current()).clone();
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        Ok(e) => apply_or_log(&mut s, &e),
                        Err(e) => {
                            tracing::error!(error = %e, "projection stopped: the log holds an event this build cannot read");
                            *live.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
                            return;
                        }
                    }
                    next = sub.try_recv();
                }
                *live.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
            }
        });
        Ok(projection)
    }

    pub fn current(&self) -> Arc<AuthState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn position(&self) -> Position {
        self.current().position()
    }
}

fn apply_or_log(state: &mut AuthState, e: &sluice_events::RecordedEvent) {
    if let Err(err) = state.apply(e) {
        tracing::error!(error = %err, "projection could not apply an event");
    }
}
