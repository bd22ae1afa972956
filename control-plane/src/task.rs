//! Background tasks with owners, in each shell (the data plane compiles this same file as its
//! `task` module). Every long-lived task starts through `Tasks`: named, tracked (so shutdown and
//! tests can wait for it) and cancelled by one shutdown token. `Tasks::supervise` is the one
//! retry loop (the relay, ingestion, the decisions read model and the worker's event feed each
//! had a copy): run a round, log a failure, back off, run again, until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A shell's background tasks.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// How a supervised task waits after a round: `first` after one that ended well or the first
/// failure, doubling per failure in a row up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The wait after `failures` failures in a row (0: the round ended well).
    pub fn after(&self, failures: u32) -> Duration {
        let doubled = self.first.saturating_mul(1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX));
        doubled.min(self.max).max(self.first.min(self.max))
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` until it ends or shutdown begins.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let token = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => tracing::debug!(task = name, "task ended"),
                () = token.cancelled() => tracing::debug!(task = name, "task stopped for shutdown"),
            }
        });
    }

    /// Runs `task`, which ends by itself (a batcher whose channel closes), and has shutdown
    /// wait for it rather than cancel it, so what it holds is not lost.
    pub fn track(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(async move {
            task.await;
            tracing::debug!(task = name, "task ended");
        });
    }

    /// Runs `round` again and again until shutdown. A round that fails is logged with the
    /// task's name; the next starts after `backoff`.
    pub fn supervise<F, Fut>(&self, name: &'static str, backoff: Backoff, mut round: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        self.spawn(name, async move {
            let mut failures = 0u32;
            loop {
                match round().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        tracing::warn!(task = name, error = %e, "{name}: retrying in {:?}", backoff.after(failures));
                    }
                }
                tokio::time::sleep(backoff.after(failures)).await;
            }
        });
    }

    /// Begins shutdown and waits up to `grace` for every task to end; false if some did not.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_per_failure_up_to_its_cap() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let waits: Vec<_> = (0..8).map(|n| b.after(n).as_millis()).collect();
        assert_eq!(waits, [200, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.after(u32::MAX), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn supervised_rounds_retry_until_shutdown_which_waits_for_them() {
        let tasks = Tasks::new();
        let rounds = Arc::new(AtomicU32::new(0));
        let counted = rounds.clone();
        tasks.supervise("test", Backoff::new(Duration::from_millis(10), Duration::from_millis(40)), move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move { if n.is_multiple_of(2) { Err(format!("round {n} failed")) } else { Ok(()) } }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rounds.load(Ordering::SeqCst) >= 5, "failed rounds are retried");
        assert!(tasks.shutdown(Duration::from_secs(1)).await, "shutdown ends the supervised task");
        let after = rounds.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), after, "no round after shutdown");
    }
}
