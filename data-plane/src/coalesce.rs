//! Repeated refusals recorded as one (issue #16 item 9). A misbehaving client retries a
//! refused request every few milliseconds (GStreamer's `srtsrc` every ~10 ms, VLC 944 times in
//! 15 s); recording each attempt grows the append-only log and JetStream without bound.
//!
//! A refusal is keyed by (address, app, stream, action, reason). The first of a key is
//! recorded at once; identical ones within `window` of the last recorded are held, counted,
//! and recorded as one record (the last attempt, with `repeats`: how many, first and last
//! time) when the next attempt comes after the window or when `due` finds the window passed.
//! So one client adds at most about one event per window per key. Every allow is recorded on
//! its own; a held refusal answers the client at once like any other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_events::{Action, AppName, DecisionRecord, Reason, Repeats, StreamName, Timestamp};

type Key = (IpAddr, AppName, StreamName, Action, Reason);

/// Keys tracked at most; beyond them a refusal is recorded on its own (memory stays bounded).
const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
struct Entry {
    /// When the key's last record went to the spool.
    recorded_at: Instant,
    /// The held attempts: the last one, how many, the first one's time.
    held: Option<(DecisionRecord, u64, Timestamp)>,
}

#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Refusals held rather than recorded on their own (`sluice_refusals_coalesced_total`).
    pub held: std::sync::atomic::AtomicU64,
}

impl Coalescer {
    /// `window` zero: every refusal is recorded.
    pub fn new(window: Duration) -> Coalescer {
        Coalescer { window, entries: Mutex::new(HashMap::new()), held: Default::default() }
    }

    fn key(record: &DecisionRecord) -> Key {
        (
            record.request.client_ip,
            record.request.app.clone(),
            record.decision.stream.clone(),
            record.request.action,
            record.final_reason,
        )
    }

    /// Whether `record` goes to the spool now. When it does and it closes a run of held
    /// attempts, its `repeats` says so; when it does not, it is held.
    pub fn offer(&self, record: &mut DecisionRecord, now: Instant) -> bool {
        if record.allowed || self.window.is_zero() {
            return true;
        }
        let key = Self::key(record);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get_mut(&key) {
            Some(e) if now.saturating_duration_since(e.recorded_at) < self.window => {
                let (count, first) = match e.held.take() {
                    Some((_, count, first)) => (count + 1, first),
                    None => (1, record.decided_at),
                };
                e.held = Some((record.clone(), count, first));
                self.held.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            Some(e) => {
                if let Some((_, count, first)) = e.held.take() {
                    record.repeats = Some(Repeats { count: count + 1, first, last: record.decided_at });
                }
                e.recorded_at = now;
                true
            }
            None => {
                if entries.len() < MAX_KEYS {
                    entries.insert(key, Entry { recorded_at: now, held: None });
                }
                true
            }
        }
    }

    /// The held runs whose window has passed, to record now; keys quiet for 30 windows are
    /// forgotten.
    pub fn due(&self, now: Instant) -> Vec<DecisionRecord> {
        let mut out = Vec::new();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| {
            let quiet = now.saturating_duration_since(e.recorded_at);
            if quiet < self.window {
                return true;
            }
            match e.held.take() {
                Some((mut record, count, first)) => {
                    if count > 1 {
                        record.repeats = Some(Repeats { count, first, last: record.decided_at });
                    }
                    out.push(record);
                    e.recorded_at = now;
                    true
                }
                None => quiet < self.window * 30,
            }
        });
        out
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Keys tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_events::{AccessRequest, AuthState, Credential, Protocol};

    fn refusal(ip: &str, stream: &str, at: i64) -> DecisionRecord {
        let req = AccessRequest {
            id: uuid::Uuid::now_v7(),
            app: AppName::parse("studio").unwrap(),
            stream: StreamName::parse(stream).unwrap(),
            action: Action::Play,
            protocol: Protocol::Srt,
            client_ip: ip.parse().unwrap(),
            credential: Credential::default(),
            client_id: None,
        };
        let state = AuthState::for_data_plane(None);
        let decision = sluice_events::decide(&state, &req, Timestamp(at));
        DecisionRecord {
            request: sluice_events::decision::RecordedRequest::record(&req, None, [0; 24]),
            final_reason: decision.reason,
            decision,
            allowed: false,
            decided_at: Timestamp(at),
            node: None,
            webhook: None,
            sequence: None,
            publisher_slot: None,
            repeats: None,
        }
    }

    #[test]
    fn a_retrying_client_is_one_record_per_window_with_its_count() {
        let c = Coalescer::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // 100 attempts, 10 ms apart: the first is recorded, the other 99 are held.
        let mut recorded = Vec::new();
        for i in 0..100u64 {
            let mut r = refusal("198.51.100.7", "cam1", 1_000 + i as i64 * 10);
            if c.offer(&mut r, t0 + Duration::from_millis(i * 10)) {
                recorded.push(r);
            }
        }
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].repeats, None);
        // Not due before the window has passed; then one record for the 99.
        assert!(c.due(t0 + Duration::from_millis(995)).is_empty());
        let due = c.due(t0 + Duration::from_millis(1_000));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].repeats, Some(Repeats { count: 99, first: Timestamp(1_010), last: Timestamp(1_990) }));
        // The next attempt after another window is recorded at once, alone.
        let mut next = refusal("198.51.100.7", "cam1", 3_000);
        assert!(c.offer(&mut next, t0 + Duration::from_millis(2_000)));
        assert_eq!(next.repeats, None);
    }

    #[test]
    fn a_held_run_closes_into_the_next_attempt_after_the_window() {
        let c = Coalescer::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(c.offer(&mut refusal("198.51.100.7", "cam1", 0), t0));
        assert!(!c.offer(&mut refusal("198.51.100.7", "cam1", 100), t0 + Duration::from_millis(100)));
        assert!(!c.offer(&mut refusal("198.51.100.7", "cam1", 200), t0 + Duration::from_millis(200)));
        let mut late = refusal("198.51.100.7", "cam1", 1_500);
        assert!(c.offer(&mut late, t0 + Duration::from_millis(1_500)));
        assert_eq!(late.repeats, Some(Repeats { count: 3, first: Timestamp(100), last: Timestamp(1_500) }));
        assert!(c.due(t0 + Duration::from_secs(3)).is_empty(), "nothing held any more");
    }

    #[test]
    fn other_addresses_streams_and_every_allow_are_recorded_on_their_own() {
        let c = Coalescer::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(c.offer(&mut refusal("198.51.100.7", "cam1", 0), t0));
        assert!(c.offer(&mut refusal("198.51.100.8", "cam1", 0), t0), "another address");
        assert!(c.offer(&mut refusal("198.51.100.7", "cam2", 0), t0), "another stream");
        let mut allowed = refusal("198.51.100.7", "cam1", 0);
        allowed.allowed = true;
        assert!(c.offer(&mut allowed, t0), "an allow");
        assert_eq!(c.tracked(), 3);
        // Quiet keys are forgotten.
        assert!(c.due(t0 + Duration::from_secs(31)).is_empty());
        assert_eq!(c.tracked(), 0);
        // A zero window records everything.
        let all = Coalescer::new(Duration::ZERO);
        assert!(all.offer(&mut refusal("198.51.100.7", "cam1", 0), t0));
        assert!(all.offer(&mut refusal("198.51.100.7", "cam1", 0), t0));
    }
}
