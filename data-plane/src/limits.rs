//! Connection limits and per-IP failure backoff for the media ports.
//!
//! - At most `max_connections` open media connections, and `max_connections_per_ip` from one
//!   address: beyond that a connection is closed at accept.
//! - Five denials (`failure_backoff_after`; 0 turns it off) from one address for one target
//!   (app, stream, action) within ten seconds put that address and target in the penalty box
//!   for 1 s, then 2, 4, … up to 60 s for each further round: its attempts on that target are
//!   refused with `rate_limited` (and recorded) without being decided, so guessing a stream's
//!   credentials is slow and a misconfigured encoder does not hammer the worker. Other targets
//!   from the same address (a viewer behind the same NAT) are not affected.
//! - Four times as many denials from one address across all targets within ten seconds put the
//!   whole address in the penalty box the same way (guessing across many streams).
//! - An allow clears its target and the address.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);
/// Denials across all targets that penalize a whole address, as a multiple of the per-target
/// threshold.
const ADDRESS_FACTOR: usize = 4;

/// What the penalty box counts: one target of an address, or the whole address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Address(IpAddr),
    Target(IpAddr, String),
}
const MAX_PENALTY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Failures {
    recent: VecDeque<Instant>,
    level: u32,
    until: Option<Instant>,
}

#[derive(Debug)]
pub struct Gate {
    /// The limits, changed live by a reload (SIGHUP).
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    /// Denials within `WINDOW` that open the penalty box (0: never).
    failures_allowed: AtomicUsize,
    total: AtomicUsize,
    /// Connections refused at accept: over the total, over the per-address limit.
    refused_total: AtomicU64,
    refused_per_ip: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    failures: Mutex<HashMap<Scope, Failures>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.total.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.gate.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub fn new(max_total: usize, max_per_ip: usize, failures_allowed: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            failures_allowed: AtomicUsize::new(failures_allowed),
            total: AtomicUsize::new(0),
            refused_total: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
            per_ip: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    /// A place for a new connection from `ip`, if the limits allow one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Permit> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        let over_ip = *n >= self.max_per_ip.load(Ordering::Relaxed);
        if over_ip || self.total.load(Ordering::Acquire) >= self.max_total.load(Ordering::Relaxed) {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            let counter = if over_ip { &self.refused_per_ip } else { &self.refused_total };
            counter.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(Permit { gate: self.clone(), ip })
    }

    pub fn connections(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Connections refused at accept, by limit (`total`, `per_ip`).
    pub fn refusals(&self) -> [(&'static str, u64); 2] {
        [("total", self.refused_total.load(Ordering::Relaxed)), ("per_ip", self.refused_per_ip.load(Ordering::Relaxed))]
    }

    /// New limits (a reload): connections already open stay; new ones meet the new limits.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize, failures_allowed: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
        self.failures_allowed.store(failures_allowed, Ordering::Relaxed);
    }

    /// Whether `ip` is in the penalty box for `target` (say `app/stream/action`), or as a
    /// whole, at `now`.
    pub fn penalized(&self, ip: IpAddr, target: &str, now: Instant) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let boxed = |scope: &Scope| failures.get(scope).and_then(|f| f.until).is_some_and(|until| until > now);
        boxed(&Scope::Target(ip, target.to_owned())) || boxed(&Scope::Address(ip))
    }

    /// Notes a denial for `ip` on `target`.
    pub fn failed(&self, ip: IpAddr, target: &str, now: Instant) {
        let per_target = self.failures_allowed.load(Ordering::Relaxed);
        if per_target == 0 {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures
                .retain(|_, f| f.until.is_some_and(|u| u > now) || f.recent.back().is_some_and(|t| now - *t < WINDOW));
        }
        for (scope, threshold) in
            [(Scope::Target(ip, target.to_owned()), per_target), (Scope::Address(ip), per_target * ADDRESS_FACTOR)]
        {
            let f = failures.entry(scope.clone()).or_default();
            while f.recent.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
                f.recent.pop_front();
            }
            f.recent.push_back(now);
            if f.recent.len() >= threshold {
                let penalty = Duration::from_secs(1u64 << f.level.min(6)).min(MAX_PENALTY);
                f.until = Some(now + penalty);
                f.level += 1;
                f.recent.clear();
                match scope {
                    Scope::Target(..) => {
                        tracing::info!(%ip, target, penalty_secs = penalty.as_secs(), "repeated denials: address refused on this target for a while")
                    }
                    Scope::Address(_) => {
                        tracing::info!(%ip, penalty_secs = penalty.as_secs(), "repeated denials across targets: address refused for a while")
                    }
                }
            }
        }
    }

    /// Notes an allow for `ip` on `target`: that record and the address's are cleared.
    pub fn succeeded(&self, ip: IpAddr, target: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&Scope::Target(ip, target.to_owned()));
        failures.remove(&Scope::Address(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_per_address_and_in_total() {
        let gate = Gate::new(3, 2, 5);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a third from one address");
        let _b1 = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "total reached");
        drop(a1);
        assert!(gate.admit(b).is_some(), "a place freed");
    }

    const CAM: &str = "live/cam/publish";

    #[test]
    fn five_denials_in_ten_seconds_open_a_growing_penalty() {
        let gate = Gate::new(10, 10, 5);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..4 {
            gate.failed(ip, CAM, t0 + Duration::from_millis(i * 100));
        }
        assert!(!gate.penalized(ip, CAM, t0 + Duration::from_millis(400)));
        gate.failed(ip, CAM, t0 + Duration::from_millis(500));
        assert!(gate.penalized(ip, CAM, t0 + Duration::from_millis(600)));
        assert!(!gate.penalized(ip, "live/other/play", t0 + Duration::from_millis(600)), "other targets go on");
        assert!(!gate.penalized(ip, CAM, t0 + Duration::from_millis(1600)), "the first penalty is 1 s");
        // Spread-out failures never add up to a penalty.
        let slow: IpAddr = "198.51.100.2".parse().unwrap();
        for i in 0..20 {
            gate.failed(slow, CAM, t0 + Duration::from_secs(i * 3));
        }
        assert!(!gate.penalized(slow, CAM, t0 + Duration::from_secs(60)));
        // A second round costs twice as long; an allow clears the target.
        for i in 0..5 {
            gate.failed(ip, CAM, t0 + Duration::from_secs(2) + Duration::from_millis(i * 10));
        }
        assert!(gate.penalized(ip, CAM, t0 + Duration::from_millis(3500)));
        assert!(!gate.penalized(ip, CAM, t0 + Duration::from_millis(4100)));
        gate.succeeded(ip, CAM);
        gate.failed(ip, CAM, t0 + Duration::from_secs(5));
        assert!(!gate.penalized(ip, CAM, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn denials_across_many_targets_penalize_the_whole_address() {
        let gate = Gate::new(10, 10, 5);
        let ip: IpAddr = "198.51.100.4".parse().unwrap();
        let t0 = Instant::now();
        // Four denials on each of five streams: no stream reaches five, the address reaches 20.
        for n in 0..19 {
            gate.failed(ip, &format!("live/cam{}/publish", n % 5), t0 + Duration::from_millis(n * 10));
        }
        assert!(!gate.penalized(ip, "live/new/play", t0 + Duration::from_millis(200)));
        gate.failed(ip, "live/cam4/publish", t0 + Duration::from_millis(200));
        assert!(gate.penalized(ip, "live/new/play", t0 + Duration::from_millis(210)), "the whole address");
        let other: IpAddr = "198.51.100.5".parse().unwrap();
        assert!(!gate.penalized(other, "live/new/play", t0 + Duration::from_millis(210)));
    }

    #[test]
    fn a_threshold_of_zero_turns_the_backoff_off() {
        let gate = Gate::new(10, 10, 0);
        let ip: IpAddr = "198.51.100.3".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..50 {
            gate.failed(ip, CAM, t0 + Duration::from_millis(i));
        }
        assert!(!gate.penalized(ip, CAM, t0 + Duration::from_millis(60)));
    }
}
