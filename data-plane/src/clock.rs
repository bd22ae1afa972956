//! The worker's one clock: every wall-clock reading of the shell goes through here (clippy
//! bans `SystemTime::now` elsewhere), so what the pure core is given as `now` has one source.

use sluice_events::Timestamp;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
#[allow(clippy::disallowed_methods)]
pub fn now() -> Timestamp {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    Timestamp(since.map_or(0, |d| d.as_millis() as i64))
}
