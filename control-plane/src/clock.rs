//! The control plane's one clock: every wall-clock reading of the shell goes through here
//! (clippy bans `SystemTime::now` and `Utc::now` elsewhere), so what the pure core is given as
//! `now` has one source.

use sluice_events::Timestamp;

/// Milliseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Timestamp {
    Timestamp(chrono::Utc::now().timestamp_millis())
}
