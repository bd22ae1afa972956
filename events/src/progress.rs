//! The progress line of a long operation (`verify-log`, `replay`, `rebuild`): position, events
//! per second, time left; at most one a second. The shell gives the time and decides whether
//! to show it (a terminal, not a script).

/// A long operation from `from` to `to` (log positions), started at `now` (seconds on any
/// monotonic clock).
#[derive(Debug, Clone)]
pub struct Meter {
    what: &'static str,
    from: u64,
    to: u64,
    started: f64,
    shown: Option<f64>,
}

impl Meter {
    pub fn new(what: &'static str, from: u64, to: u64, now: f64) -> Meter {
        Meter { what, from, to, started: now, shown: None }
    }

    /// The line to show at `position`, if a second has passed since the last one.
    pub fn at(&mut self, position: u64, now: f64) -> Option<String> {
        if self.shown.is_some_and(|t| now - t < 1.0) {
            return None;
        }
        self.shown = Some(now);
        let secs = (now - self.started).max(0.001);
        let rate = position.saturating_sub(self.from) as f64 / secs;
        let eta = if rate > 0.0 { self.to.saturating_sub(position) as f64 / rate } else { 0.0 };
        Some(format!("{} {position}/{} ({rate:.0} events/s, about {eta:.0} s left)", self.what, self.to))
    }

    /// Whether a line was shown (the shell ends it with a newline).
    pub fn shown(&self) -> bool {
        self.shown.is_some()
    }

    /// The last line, at the end (`position`), whenever the previous one was shown: a
    /// finished operation shows where it ended.
    pub fn last(&mut self, position: u64, now: f64) -> Option<String> {
        self.shown?;
        self.shown = None;
        self.at(position, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_a_second_with_rate_and_time_left() {
        let mut m = Meter::new("replay", 0, 1000, 10.0);
        assert!(!m.shown());
        assert_eq!(m.at(100, 11.0).as_deref(), Some("replay 100/1000 (100 events/s, about 9 s left)"));
        assert_eq!(m.at(150, 11.5), None, "within the second");
        assert_eq!(m.at(400, 12.0).as_deref(), Some("replay 400/1000 (200 events/s, about 3 s left)"));
        assert!(m.shown());
        assert_eq!(m.last(1000, 12.5).as_deref(), Some("replay 1000/1000 (400 events/s, about 0 s left)"));
        assert_eq!(Meter::new("idle", 0, 5, 0.0).last(5, 1.0), None, "nothing shown, nothing to finish");
    }
}
