//! `GET /v1/nodes`: the workers, their lag behind the log and whether their state matches.

use std::time::Duration;

use axum::Json;
use axum::extract::State;

use super::ApiState;
use super::error::ApiError;
use crate::nodes::NodeList;

/// `GET /v1/stats/streams`: what is live, where.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct LiveStreams {
    /// One row per stream and worker, by app, stream and worker.
    pub streams: Vec<WorkerStream>,
}

pub(super) async fn live_streams(State(api): State<ApiState>) -> Json<LiveStreams> {
    let fresh = Duration::from_secs(api.settings.node_stale_secs);
    let streams = api.nodes.streams(fresh).into_iter().map(|(node_id, stat)| WorkerStream { node_id, stat }).collect();
    Json(LiveStreams { streams })
}

/// `GET /v1/stats/streams/{app}/{stream}`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct StreamStats {
    pub app: String,
    pub stream: String,
    /// A worker heard from recently has a publisher live on it.
    pub live: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Bits per second over the last second and the last ten (summed over workers).
    pub bitrate_1s: u64,
    pub bitrate_10s: u64,
    pub players: u64,
    pub dropped: u64,
    pub uptime_secs: u64,
    /// SRT link figures of a stream published over SRT: the publisher's link, packet
    /// counters summed over workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srt: Option<sluice_events::dist::SrtLink>,
    /// Per worker.
    pub workers: Vec<WorkerStream>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct WorkerStream {
    pub node_id: String,
    #[serde(flatten)]
    pub stat: sluice_events::dist::StreamStat,
}

/// The stream's figures from the workers' heartbeats (fresh within `node_stale_secs`).
pub fn stream_stats_of(api: &ApiState, app: &str, stream: &str) -> StreamStats {
    let fresh = Duration::from_secs(api.settings.node_stale_secs);
    let workers: Vec<WorkerStream> = api
        .nodes
        .stream(app, stream, fresh)
        .into_iter()
        .map(|(node_id, stat)| WorkerStream { node_id, stat })
        .collect();
    let sum = |f: fn(&sluice_events::dist::StreamStat) -> u64| workers.iter().map(|w| f(&w.stat)).sum::<u64>();
    StreamStats {
        app: app.to_owned(),
        stream: stream.to_owned(),
        live: !workers.is_empty(),
        bytes_in: sum(|s| s.bytes_in),
        bytes_out: sum(|s| s.bytes_out),
        bitrate_1s: sum(|s| s.bitrate_1s),
        bitrate_10s: sum(|s| s.bitrate_10s),
        players: sum(|s| s.players),
        dropped: sum(|s| s.dropped),
        uptime_secs: workers.iter().map(|w| w.stat.uptime_secs).max().unwrap_or(0),
        srt: srt_of(&workers),
        workers,
    }
}

fn srt_of(workers: &[WorkerStream]) -> Option<sluice_events::dist::SrtLink> {
    let links: Vec<_> = workers.iter().filter_map(|w| w.stat.srt.as_ref()).collect();
    let first = (*links.first()?).clone();
    Some(links[1..].iter().fold(first, |mut t, l| {
        t.rtt_us = t.rtt_us.max(l.rtt_us);
        t.latency_ms = t.latency_ms.max(l.latency_ms);
        t.rcv_buf_ms = t.rcv_buf_ms.max(l.rcv_buf_ms);
        t.bandwidth_bps = t.bandwidth_bps.max(l.bandwidth_bps);
        t.pkt_rcv_loss += l.pkt_rcv_loss;
        t.bytes_rcv_loss += l.bytes_rcv_loss;
        t.pkt_rcv_drop += l.pkt_rcv_drop;
        t.bytes_rcv_drop += l.bytes_rcv_drop;
        t.pkt_rcv_retrans += l.pkt_rcv_retrans;
        t.pkt_snd_retrans += l.pkt_snd_retrans;
        t.pkt_snd_loss += l.pkt_snd_loss;
        t.pkt_snd_drop += l.pkt_snd_drop;
        t
    }))
}

pub(super) async fn stream_stats(
    State(api): State<ApiState>,
    axum::extract::Path((app, stream)): axum::extract::Path<(String, String)>,
) -> Result<Json<StreamStats>, ApiError> {
    let app = sluice_events::AppName::parse(&app).map_err(|e| ApiError::invalid("app", e.to_string()))?;
    let stream = sluice_events::StreamName::parse(&stream).map_err(|e| ApiError::invalid("stream", e.to_string()))?;
    Ok(Json(stream_stats_of(&api, app.as_str(), stream.as_str())))
}

pub(super) async fn list(State(api): State<ApiState>) -> Result<Json<NodeList>, ApiError> {
    let state = api.writer.projection().current();
    let stale = Duration::from_secs(api.settings.node_stale_secs);
    // The first call after a table change digests the whole state: off the async threads.
    let registry = api.nodes.clone();
    let nodes =
        tokio::task::spawn_blocking(move || registry.list(&state, stale)).await.map_err(|_| ApiError::Internal)?;
    Ok(Json(NodeList { nodes }))
}
