//! Media and decision statistics of one worker: per live stream (bytes in and out, bitrate
//! over 1 s and 10 s, players, frames dropped for slow players, uptime), counted with atomics
//! on the media threads and sampled once a second on the tokio thread; decisions by outcome
//! and reason. They travel with the heartbeat (`/v1/stats/streams/...` and SLS `/stats` on the
//! control plane) and are served on the admin port (`/metrics`, OpenMetrics text through
//! `prometheus-client`) with the decision and revocation histograms, the connection limits'
//! refusals and the process's own figures.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_events::dist::{SrtLink, StreamStat};
use sluice_events::metrics::prometheus_client::metrics::histogram::Histogram;
use sluice_events::metrics::prometheus_client::registry::Registry;
use sluice_events::metrics::{self, ProcReaders, ProcessCollector, Snapshot};

/// Counters of one live stream, shared with the media thread that serves it.
#[derive(Debug)]
pub struct StreamCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub players: AtomicU64,
    pub dropped: AtomicU64,
    /// Set for a stream published over SRT, updated once a second by its sessions.
    pub srt: Mutex<Option<SrtLink>>,
    started: Instant,
}

impl StreamCounters {
    /// Updates the SRT figures (the stream is published over SRT from now on).
    pub fn srt_link(&self, update: impl FnOnce(&mut SrtLink)) {
        update(self.srt.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(SrtLink::default));
    }
}

#[derive(Debug)]
struct Live {
    counters: Arc<StreamCounters>,
    protocol: &'static str,
    publisher: Option<std::net::IpAddr>,
    /// `bytes_in` at each of the last samples (one a second), newest last.
    samples: VecDeque<u64>,
}

#[derive(Debug)]
pub struct MediaStats {
    live: Mutex<HashMap<(String, String), Live>>,
    decisions: Mutex<BTreeMap<(bool, &'static str), u64>>,
    /// Totals over streams that have ended.
    ended_in: AtomicU64,
    ended_out: AtomicU64,
    ended_dropped: AtomicU64,
    /// SRT packet counters of ended streams: (retransmitted, lost, dropped) in and out.
    ended_srt: Mutex<SrtLink>,
    /// Media decision latency (command received → answer sent).
    decision_seconds: Histogram,
    /// From a change's record in the log to the end of a session it refused.
    revocation_seconds: Histogram,
}

impl Default for MediaStats {
    fn default() -> Self {
        MediaStats {
            live: Mutex::default(),
            decisions: Mutex::default(),
            ended_in: AtomicU64::default(),
            ended_out: AtomicU64::default(),
            ended_dropped: AtomicU64::default(),
            ended_srt: Mutex::default(),
            decision_seconds: metrics::latency_histogram(),
            revocation_seconds: metrics::latency_histogram(),
        }
    }
}

fn bits_per_sec(samples: &VecDeque<u64>, window: usize) -> u64 {
    let n = samples.len();
    if n < 2 {
        return 0;
    }
    let span = (n - 1).min(window);
    let delta = samples[n - 1] - samples[n - 1 - span];
    delta * 8 / span as u64
}

impl MediaStats {
    pub fn new() -> Arc<MediaStats> {
        Arc::new(MediaStats::default())
    }

    /// A publisher went live on `app/stream`.
    /// A stream's publisher came in, over `protocol`, from `publisher`.
    pub fn stream_started(
        &self,
        app: &str,
        stream: &str,
        protocol: &'static str,
        publisher: Option<std::net::IpAddr>,
    ) -> Arc<StreamCounters> {
        let counters = Arc::new(StreamCounters {
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            players: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            srt: Mutex::new(None),
            started: Instant::now(),
        });
        let live = Live { counters: counters.clone(), protocol, publisher, samples: VecDeque::from([0]) };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert((app.to_owned(), stream.to_owned()), live);
        counters
    }

    pub fn stream_ended(&self, app: &str, stream: &str) {
        let removed = self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&(app.to_owned(), stream.to_owned()));
        if let Some(l) = removed {
            self.ended_in.fetch_add(l.counters.bytes_in.load(Ordering::Relaxed), Ordering::Relaxed);
            self.ended_out.fetch_add(l.counters.bytes_out.load(Ordering::Relaxed), Ordering::Relaxed);
            self.ended_dropped.fetch_add(l.counters.dropped.load(Ordering::Relaxed), Ordering::Relaxed);
            if let Some(link) = l.counters.srt.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                add_packet_counts(&mut self.ended_srt.lock().unwrap_or_else(|p| p.into_inner()), link);
            }
        }
    }

    pub fn decided(&self, allowed: bool, reason: &'static str) {
        *self.decisions.lock().unwrap_or_else(|p| p.into_inner()).entry((allowed, reason)).or_insert(0) += 1;
    }

    /// Notes how long a media decision took, from the client's command to the answer.
    pub fn decision_latency(&self, took: Duration) {
        self.decision_seconds.observe(took.as_secs_f64());
    }

    /// Notes a session ended `after` the change that refused it was recorded in the log.
    pub fn revoked(&self, after: Duration) {
        self.revocation_seconds.observe(after.as_secs_f64());
    }

    /// Takes this second's sample of every live stream.
    pub fn sample(&self) {
        for l in self.live.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
            l.samples.push_back(l.counters.bytes_in.load(Ordering::Relaxed));
            while l.samples.len() > 11 {
                l.samples.pop_front();
            }
        }
    }

    /// Every live stream, for the heartbeat.
    pub fn snapshot(&self) -> Vec<StreamStat> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<StreamStat> = live
            .iter()
            .map(|((app, stream), l)| StreamStat {
                app: app.clone(),
                stream: stream.clone(),
                protocol: l.protocol.to_owned(),
                publisher: l.publisher.map(|ip| ip.to_string()),
                bytes_in: l.counters.bytes_in.load(Ordering::Relaxed),
                bytes_out: l.counters.bytes_out.load(Ordering::Relaxed),
                bitrate_1s: bits_per_sec(&l.samples, 1),
                bitrate_10s: bits_per_sec(&l.samples, 10),
                players: l.counters.players.load(Ordering::Relaxed),
                dropped: l.counters.dropped.load(Ordering::Relaxed),
                uptime_secs: l.counters.started.elapsed().as_secs(),
                srt: l.counters.srt.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.app, &a.stream).cmp(&(&b.app, &b.stream)));
        out
    }

    /// The exposition: media, SRT links, decisions, the histograms, `extra` (the worker's
    /// other figures, taken by the caller), build and process figures.
    pub fn render(&self, extra: Snapshot) -> String {
        let streams = self.snapshot();
        let sum = |f: fn(&StreamStat) -> u64| streams.iter().map(f).sum::<u64>() as f64;
        let one = |v: f64| vec![(Vec::new(), v)];
        let mut m = Snapshot::default();
        m.gauge("sluice_live_streams", "Streams with a live publisher.", streams.len() as f64)
            .gauge("sluice_players", "Players connected.", sum(|s| s.players))
            .counters(
                "sluice_media_bytes",
                "Media bytes received from publishers and sent to players.",
                vec![
                    (
                        vec![("direction", "in".into())],
                        sum(|s| s.bytes_in) + self.ended_in.load(Ordering::Relaxed) as f64,
                    ),
                    (
                        vec![("direction", "out".into())],
                        sum(|s| s.bytes_out) + self.ended_out.load(Ordering::Relaxed) as f64,
                    ),
                ],
            )
            .counters(
                "sluice_player_queue_drops",
                "Media messages skipped for players that fell behind.",
                one(sum(|s| s.dropped) + self.ended_dropped.load(Ordering::Relaxed) as f64),
            );
        let mut srt = self.ended_srt.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for link in streams.iter().filter_map(|s| s.srt.as_ref()) {
            add_packet_counts(&mut srt, link);
        }
        m.counters(
            "sluice_srt_packets",
            "SRT data packets retransmitted, lost or dropped, from publishers (in) and to players (out).",
            [
                ("retransmitted", "in", srt.pkt_rcv_retrans),
                ("lost", "in", srt.pkt_rcv_loss),
                ("dropped", "in", srt.pkt_rcv_drop),
                ("retransmitted", "out", srt.pkt_snd_retrans),
                ("lost", "out", srt.pkt_snd_loss),
                ("dropped", "out", srt.pkt_snd_drop),
            ]
            .into_iter()
            .map(|(kind, direction, n)| {
                (vec![("kind", kind.to_owned()), ("direction", direction.to_owned())], n as f64)
            })
            .collect(),
        );
        m.gauges(
            "sluice_srt_rtt_seconds",
            "Round trip to each SRT publisher (SRT's running estimate).",
            streams
                .iter()
                .filter_map(|s| {
                    let link = s.srt.as_ref()?;
                    Some((vec![("app", s.app.clone()), ("stream", s.stream.clone())], link.rtt_us as f64 / 1e6))
                })
                .collect(),
        );
        let decisions = self.decisions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        m.counters(
            "sluice_decisions",
            "Publish/play decisions by outcome and reason (refusals by reason: outcome=\"deny\").",
            decisions
                .iter()
                .map(|((allowed, reason), n)| {
                    let outcome = if *allowed { "allow" } else { "deny" };
                    (vec![("outcome", outcome.to_owned()), ("reason", (*reason).to_owned())], *n as f64)
                })
                .collect(),
        );
        let mut registry = Registry::default();
        metrics::register_build_info(&mut registry, "sluice-dataplane", env!("CARGO_PKG_VERSION"));
        registry.register(
            "sluice_media_decision_seconds",
            "Media decision latency, command received to answer sent.",
            self.decision_seconds.clone(),
        );
        registry.register(
            "sluice_revocation_seconds",
            "From a change's record in the log (control plane's clock) to the end of a live session it refused.",
            self.revocation_seconds.clone(),
        );
        registry.register_collector(Box::new(m));
        registry.register_collector(Box::new(extra));
        registry.register_collector(Box::new(ProcessCollector::of_self(ProcReaders {
            text: |p| std::fs::read_to_string(p).unwrap_or_default(),
            entries: |p| std::fs::read_dir(p).map_or(0, |d| d.count() as u64),
        })));
        metrics::render(&registry)
    }
}

/// Adds the packet counters of `link` to `into`.
fn add_packet_counts(into: &mut SrtLink, link: &SrtLink) {
    into.pkt_rcv_retrans += link.pkt_rcv_retrans;
    into.pkt_rcv_loss += link.pkt_rcv_loss;
    into.pkt_rcv_drop += link.pkt_rcv_drop;
    into.pkt_snd_retrans += link.pkt_snd_retrans;
    into.pkt_snd_loss += link.pkt_snd_loss;
    into.pkt_snd_drop += link.pkt_snd_drop;
}

/// Samples every second, forever.
pub async fn sample_loop(stats: Arc<MediaStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        stats.sample();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitrates_come_from_the_samples_and_ended_streams_keep_their_totals() {
        let stats = MediaStats::new();
        let c = stats.stream_started("live", "cam1", "rtmp", None);
        for _ in 0..10 {
            c.bytes_in.fetch_add(250_000, Ordering::Relaxed);
            stats.sample();
        }
        c.bytes_in.fetch_add(500_000, Ordering::Relaxed);
        stats.sample();
        let s = &stats.snapshot()[0];
        assert_eq!(s.bitrate_1s, 4_000_000, "500 kB in the last second");
        assert_eq!(s.bitrate_10s, (9 * 250_000 + 500_000) * 8 / 10);
        stats.decided(false, "token_expired");
        stats.decided(false, "token_expired");
        let srt = stats.stream_started("live", "cam2", "srt", None);
        srt.srt_link(|l| {
            l.rtt_us = 1500;
            l.pkt_rcv_loss = 7;
        });
        let text = stats.render(Snapshot::default());
        assert!(text.contains("sluice_srt_rtt_seconds{app=\"live\",stream=\"cam2\"} 0.0015"), "{text}");
        stats.stream_ended("live", "cam2");
        stats.stream_ended("live", "cam1");
        stats.decision_latency(Duration::from_micros(300));
        let mut extra = Snapshot::default();
        extra.gauge("sluice_state_position", "Applied log position.", 42.0);
        let text = stats.render(extra);
        assert!(text.contains("sluice_media_bytes_total{direction=\"in\"} 3000000"), "{text}");
        assert!(text.contains("sluice_decisions_total{outcome=\"deny\",reason=\"token_expired\"} 2"), "{text}");
        assert!(text.contains("sluice_state_position 42"), "{text}");
        assert!(text.contains("sluice_live_streams 0"));
        assert!(text.contains("sluice_media_decision_seconds_count 1"), "{text}");
        assert!(text.contains("sluice_media_decision_seconds_bucket{le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("sluice_media_decision_seconds_bucket{le=\"0.00025\"} 0"), "{text}");
        assert!(text.contains("sluice_build_info{service=\"sluice-dataplane\""), "{text}");
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"), "{text}");
        assert!(
            text.contains("sluice_srt_packets_total{kind=\"lost\",direction=\"in\"} 7"),
            "ended streams keep their counts: {text}"
        );
    }
}
