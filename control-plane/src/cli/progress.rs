//! Progress of a long walk over the log, on stderr when it is a terminal (events per second,
//! position, ETA, redrawn at most once a second); silent in scripts and logs.

use std::io::{IsTerminal as _, Write as _};
use std::time::Instant;

/// `sluice_events::progress::Meter` on stderr when it is a terminal.
pub struct Meter {
    meter: sluice_events::progress::Meter,
    epoch: Instant,
    tty: bool,
}

impl Meter {
    pub fn new(what: &'static str, from: u64, to: u64) -> Meter {
        let meter = sluice_events::progress::Meter::new(what, from, to, 0.0);
        Meter { meter, epoch: Instant::now(), tty: std::io::stderr().is_terminal() }
    }

    pub fn at(&mut self, position: u64) {
        if self.tty
            && let Some(line) = self.meter.at(position, self.epoch.elapsed().as_secs_f64())
        {
            let _ = write!(std::io::stderr(), "\r{line}   ");
        }
    }

    /// The final line at `position`, ended with a newline (when one was shown).
    pub fn done(&mut self, position: u64) {
        if self.tty
            && let Some(line) = self.meter.last(position, self.epoch.elapsed().as_secs_f64())
        {
            let _ = writeln!(std::io::stderr(), "\r{line}   ");
        }
    }
}
