//! The sockets' statistics as the stream's `SrtLink` (heartbeats, `/v1/stats`, SLS `/stats`,
//! Prometheus): the publisher's receive side, and players' send-side counters as deltas.

use sluice_events::dist::SrtLink;
use srt_tokio::SocketStatistics;

/// The publisher's link figures from its socket's statistics.
pub(super) fn publisher_link(l: &mut SrtLink, s: &SocketStatistics) {
    if !s.rx_average_rtt.is_zero() {
        l.rtt_us = s.rx_average_rtt.as_micros() as u64;
    }
    // Packets per second of 1,456 bytes (SRT's payload and header), as libsrt's mbpsBandwidth.
    l.bandwidth_bps = s.rx_bandwidth * 1456 * 8;
    l.rcv_buf_ms = s.rx_acknowledged_time.as_millis() as u64;
    l.pkt_rcv_drop = s.rx_dropped_data;
    l.bytes_rcv_drop = s.rx_dropped_bytes;
    l.pkt_rcv_retrans = s.rx_retransmit_data;
    // srt-tokio keeps no loss count: a packet was lost if it had to be retransmitted or never
    // arrived in time; its size is the average.
    l.pkt_rcv_loss = s.rx_retransmit_data + s.rx_dropped_data;
    let average = s.rx_bytes.checked_div(s.rx_data).unwrap_or(0);
    l.bytes_rcv_loss = s.rx_dropped_bytes + s.rx_retransmit_data * average;
}

/// One player's send-side counters, added to its stream's totals as they grow.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PlayerLink {
    retransmitted: u64,
    lost: u64,
    dropped: u64,
}

impl PlayerLink {
    pub(super) fn of(s: &SocketStatistics) -> PlayerLink {
        PlayerLink { retransmitted: s.tx_retransmit_data, lost: s.tx_loss_data, dropped: s.tx_dropped_data }
    }

    pub(super) fn add_since(&self, before: &PlayerLink, l: &mut SrtLink) {
        l.pkt_snd_retrans += self.retransmitted.saturating_sub(before.retransmitted);
        l.pkt_snd_loss += self.lost.saturating_sub(before.lost);
        l.pkt_snd_drop += self.dropped.saturating_sub(before.dropped);
    }
}
