//! What both planes' Prometheus endpoints share, on `prometheus-client` (OpenMetrics text):
//! the bucket sets, build information, the process figures (parsed here from the text of
//! `/proc/self/*`, which the plane reads and hands in: this crate does no I/O), the bearer
//! check of `SLUICE_METRICS_TOKEN`, and rendering.

use std::fmt;

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::secret::{SecretString, ct_eq};

/// The scrape's content type (OpenMetrics 1.0 text, which Prometheus negotiates).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latencies from a tenth of a millisecond (a media decision on a warm state) to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counts (events in a batch): 1 to 4096, doubling.
pub const COUNT_BUCKETS: [f64; 13] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub fn count_histogram() -> Histogram {
    Histogram::new(COUNT_BUCKETS)
}

/// The exposition of `registry`, ending in `# EOF`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(8192);
    // Writing into a String cannot fail; a metric that fails to encode is a bug caught by tests.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// `sluice_build_info{service, version}` (always 1).
pub fn register_build_info(registry: &mut Registry, service: &'static str, version: &'static str) {
    registry.register(
        "sluice_build",
        "The running build: service and version.",
        Info::new(vec![("service", service), ("version", version)]),
    );
}

/// Whether an `Authorization` header value carries the metrics token (constant time). With
/// no token configured every scrape is allowed.
pub fn bearer_allows(token: Option<&SecretString>, authorization: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let presented = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    ct_eq(presented.as_bytes(), token.expose().as_bytes())
}

/// A process's figures as `process_*` metrics (the names Prometheus's own clients use).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

/// Linux's `USER_HZ`: the unit of `/proc/<pid>/stat` times on every architecture it runs on.
const TICKS_PER_SEC: f64 = 100.0;

impl ProcessFigures {
    /// From the text of `/proc/self/stat`, `/proc/self/status`, `/proc/self/limits` and
    /// `/proc/stat`, and the number of entries in `/proc/self/fd`. `None` when `stat` cannot
    /// be read (not Linux).
    pub fn parse(stat: &str, status: &str, limits: &str, system_stat: &str, open_fds: u64) -> Option<ProcessFigures> {
        // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): field n is f[n - 3].
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = (field(14)? + field(15)?) as f64 / TICKS_PER_SEC;
        let boot: u64 = system_stat.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok()).unwrap_or(0);
        let kb = |key: &str| -> Option<u64> {
            status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        };
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l["Max open files".len()..].split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Some(ProcessFigures {
            cpu_seconds,
            resident_bytes: kb("VmRSS:").unwrap_or(0) * 1024,
            virtual_bytes: field(23).unwrap_or(0),
            threads: field(20).unwrap_or(0),
            start_time_seconds: boot as f64 + field(22).unwrap_or(0) as f64 / TICKS_PER_SEC,
            open_fds,
            max_fds,
        })
    }
}

/// The plane's readers of `/proc`: a file's text (empty when unreadable), a directory's
/// entry count.
#[derive(Debug, Clone, Copy)]
pub struct ProcReaders {
    pub text: fn(&str) -> String,
    pub entries: fn(&str) -> u64,
}

impl ProcessFigures {
    /// This process's figures, read through `read` (`None` when not on Linux).
    pub fn of_self(read: ProcReaders) -> Option<ProcessFigures> {
        let t = read.text;
        ProcessFigures::parse(
            &t("/proc/self/stat"),
            &t("/proc/self/status"),
            &t("/proc/self/limits"),
            &t("/proc/stat"),
            (read.entries)("/proc/self/fd"),
        )
    }
}

/// Reads the process's figures at each scrape, through the plane's readers (they do the I/O).
pub struct ProcessCollector {
    read: Box<dyn Fn() -> Option<ProcessFigures> + Send + Sync>,
}

impl ProcessCollector {
    pub fn new(read: impl Fn() -> Option<ProcessFigures> + Send + Sync + 'static) -> ProcessCollector {
        ProcessCollector { read: Box::new(read) }
    }

    /// This process's figures from `/proc`.
    pub fn of_self(read: ProcReaders) -> ProcessCollector {
        ProcessCollector::new(move || ProcessFigures::of_self(read))
    }
}

impl fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProcessCollector")
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(p) = (self.read)() else { return Ok(()) };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            ("process_resident_memory_bytes", "Resident memory size in bytes.", p.resident_bytes as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes.", p.virtual_bytes as f64),
            ("process_threads", "Threads of the process.", p.threads as f64),
            ("process_open_fds", "Open file descriptors.", p.open_fds as f64),
            ("process_max_fds", "Most file descriptors the process may open.", p.max_fds as f64),
            (
                "process_start_time_seconds",
                "Start of the process since the Unix epoch, in seconds.",
                p.start_time_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// One sample: its label pairs and value.
pub type Sample = (Vec<(&'static str, String)>, f64);

/// Gauges and counters computed at scrape time from a plane's state: each a name, help text
/// and samples.
#[derive(Debug, Default)]
pub struct Snapshot {
    metrics: Vec<(&'static str, &'static str, Kind, Vec<Sample>)>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

impl Snapshot {
    /// A gauge with no labels.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, v: f64) -> &mut Self {
        self.metrics.push((name, help, Kind::Gauge, vec![(Vec::new(), v)]));
        self
    }
    /// A gauge with one sample per label set (the metric is described even with none).
    pub fn gauges(&mut self, name: &'static str, help: &'static str, samples: Vec<Sample>) -> &mut Self {
        self.metrics.push((name, help, Kind::Gauge, samples));
        self
    }
    /// A counter (`name` without `_total`: the encoder adds it) with one sample per label set.
    pub fn counters(&mut self, name: &'static str, help: &'static str, samples: Vec<Sample>) -> &mut Self {
        self.metrics.push((name, help, Kind::Counter, samples));
        self
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, kind, samples) in &self.metrics {
            let metric_type = match kind {
                Kind::Gauge => ConstGauge::new(0.0).metric_type(),
                Kind::Counter => ConstCounter::new(0.0).metric_type(),
            };
            let mut m = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (labels, v) in samples {
                let sample = m.encode_family(labels)?;
                match kind {
                    Kind::Gauge => ConstGauge::new(*v).encode(sample)?,
                    Kind::Counter => ConstCounter::new(*v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn process_figures_come_from_proc_text() {
        let stat = "4242 (sluice (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 12345 \
                    104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\tsluice\nVmRSS:\t   10240 kB\nThreads:\t7\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            65536                524288               files\n";
        let p = ProcessFigures::parse(stat, status, limits, "cpu 1 2 3\nbtime 1700000000\n", 12).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 10_240 * 1024);
        assert_eq!(p.max_fds, 65_536);
        assert_eq!(p.start_time_seconds, 1_700_000_000.0 + 123.45);
        assert_eq!(ProcessFigures::parse("garbage", "", "", "", 0), None);
    }

    #[test]
    fn the_exposition_holds_build_process_and_scrape_time_figures() {
        let mut r = Registry::default();
        register_build_info(&mut r, "sluice-test", "1.2.3");
        r.register_collector(Box::new(ProcessCollector::new(|| {
            Some(ProcessFigures { cpu_seconds: 1.5, open_fds: 9, ..ProcessFigures::default() })
        })));
        let mut s = Snapshot::default();
        s.gauge("sluice_log_head", "Head.", 42.0).counters(
            "sluice_refusals",
            "Refusals.",
            vec![(vec![("reason", "bad \"token\"".to_owned())], 3.0)],
        );
        r.register_collector(Box::new(s));
        let text = render(&r);
        assert!(text.contains("sluice_build_info{service=\"sluice-test\",version=\"1.2.3\"} 1"), "{text}");
        assert!(text.contains("process_cpu_seconds_total 1.5"), "{text}");
        assert!(text.contains("process_open_fds 9"), "{text}");
        assert!(text.contains("sluice_log_head 42"), "{text}");
        assert!(text.contains("sluice_refusals_total{reason=\"bad \\\"token\\\"\"} 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_token_is_required_only_when_set() {
        let token = SecretString::new("s3cret".to_owned());
        assert!(bearer_allows(None, None));
        assert!(bearer_allows(Some(&token), Some("Bearer s3cret")));
        assert!(!bearer_allows(Some(&token), Some("Bearer s3cre")));
        assert!(!bearer_allows(Some(&token), None));
    }
}
