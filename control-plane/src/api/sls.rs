//! SRT Live Server's REST API (seed 001), exactly: `/api/stream-ids`, `/api/keys`,
//! `/stats/{player_id}`, with its `{"status": "success" | "error", …}` envelope, its rate
//! classes and its roles. It manages the app `SLUICE_SLS_APP`: a stream id's `player` is the
//! stream's public name, its `publisher` the publish name.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Command, Rejection, Role, StreamName};

use super::body::StrictJson;
use super::compat::SlsMessage;
use super::error::ApiError;
use super::keys::{CreateKey, create_key};
use super::query::Query;
use super::{ApiState, Ctx, now, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamId {
    pub publisher: String,
    pub player: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// SLS's default when absent: "New API Key".
    #[serde(default = "new_key_name")]
    pub name: String,
    /// `admin`, `write` or `read` (SLS's default when absent: `read`).
    #[serde(default = "read_role")]
    pub permissions: Role,
}

fn new_key_name() -> String {
    "New API Key".to_owned()
}

fn read_role() -> Role {
    Role::Read
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StatsQuery {
    /// Reset the counters after reading.
    pub reset: Option<String>,
    /// `1` for the legacy shape.
    pub legacy: Option<String>,
    /// `1` for the BELABOX receiver's shape (NOALBS's `Belabox` type): the modern members
    /// under `publishers.live`.
    pub belabox: Option<String>,
}

fn name(sls_app: &sluice_events::AppName, field: &str, value: &str) -> Result<StreamName, ApiError> {
    sls_stream(sls_app, value).map_err(|e| ApiError::invalid(field, e))
}

/// A stream id as SLS users write it: `name`, `app/name` or `host/app/name` (its streamid
/// forms, e.g. `uplive.sls.com/live/x`), the app being SLS's (`SLUICE_SLS_APP`).
fn sls_stream(sls_app: &sluice_events::AppName, value: &str) -> Result<StreamName, String> {
    let parts: Vec<&str> = value.split('/').collect();
    let last = match parts.as_slice() {
        [name] => name,
        [app, name] | [_, app, name] if *app == sls_app.as_str() => name,
        [_, _] | [_, _, _] => return Err(format!("the app must be {sls_app} (SRT Live Server's)")),
        _ => return Err("a name, app/name or host/app/name".into()),
    };
    StreamName::parse(last).map_err(|e| e.to_string())
}

#[derive(Debug, Serialize)]
struct SlsList {
    status: &'static str,
    data: Vec<StreamId>,
}

#[derive(Debug, Serialize)]
struct SlsKey {
    status: &'static str,
    api_key: String,
    message: &'static str,
}

/// `GET /stats/{player_id}` as OpenIRL/srt-live-server's code answers it
/// (`slscore/SLSManager.cpp`, `generate_json_for_publisher`): nlohmann's json, so members in
/// sorted order; a live publisher under `publisher`, or with `legacy=1` under the literal key
/// `publishers.live` in camelCase (`create_legacy_json_stats_for_publisher`); a known stream with
/// no publisher is 200 `{"message":"Publisher is currently not streaming","status":"ok"}` (and
/// `"publishers":{}` with `legacy=1`), not a zero-filled publisher that a dashboard shows as
/// online; an unknown id is 404 `{"message":"Invalid player key","status":"error"}`.
#[derive(Debug, Serialize)]
struct Stats {
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<PublisherStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publishers: Option<Publishers>,
    status: &'static str,
}

/// `publishers`: OpenIRL's legacy members, or (`belabox=1`) the modern ones, by key.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Publishers {
    Legacy(std::collections::BTreeMap<&'static str, LegacyPublisher>),
    Belabox(std::collections::BTreeMap<&'static str, PublisherStats>),
}

/// `create_json_stats_for_publisher`, members sorted.
#[derive(Debug, Default, Serialize)]
struct PublisherStats {
    bitrate: u64,
    buffer: u64,
    dropped_pkts: u64,
    latency: u64,
    rtt: f64,
    uptime: u64,
}

/// `create_legacy_json_stats_for_publisher`, members sorted.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct LegacyPublisher {
    bitrate: u64,
    bytes_rcv_drop: u64,
    bytes_rcv_loss: u64,
    latency: u64,
    mbps_bandwidth: f64,
    mbps_recv_rate: f64,
    ms_rcv_buf: u64,
    pkt_rcv_drop: u64,
    pkt_rcv_loss: u64,
    rtt: f64,
    uptime: u64,
}

fn sls_ok(message: &'static str) -> SlsMessage<'static> {
    SlsMessage { status: "success", message }
}

pub(super) async fn list(State(api): State<ApiState>) -> Result<Response, ApiError> {
    let state = api.writer.projection().current();
    let data: Vec<StreamId> = state
        .apps
        .get(&api.sls_app)
        .map(|a| {
            a.streams
                .iter()
                .map(|(n, s)| StreamId {
                    publisher: s.publish_name.as_ref().or(s.plays.as_ref()).unwrap_or(n).to_string(),
                    player: n.to_string(),
                    description: s.description.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(SlsList { status: "success", data }).into_response())
}

pub(super) async fn add(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<StreamId>,
) -> Result<Response, ApiError> {
    let player = name(&api.sls_app, "player", &req.player)?;
    let publisher = name(&api.sls_app, "publisher", &req.publisher)?;
    let publish_name = (publisher != player).then_some(publisher);
    // SLS omits an empty description.
    let description = req.description.clone().filter(|d| !d.is_empty());
    let app = api.sls_app.clone();
    let result = api
        .writer
        .run(&ctx.origin(), now(), |state| {
            // A publisher that is already registered gets another player id (SLS keeps many
            // per publisher): a name that plays it.
            let existing = state.apps.get(&app).is_some_and(|a| {
                publish_name.as_ref().is_some_and(|p| {
                    a.publish_names.contains_key(p)
                        || a.streams.get(p).is_some_and(|s| s.publish_name.is_none() && s.plays.is_none())
                })
            });
            Ok(match (&publish_name, existing) {
                (Some(p), true) => Command::RegisterPlayer {
                    app: app.clone(),
                    name: player.clone(),
                    plays: p.clone(),
                    description: description.clone(),
                },
                _ => Command::RegisterStream {
                    app: app.clone(),
                    name: player.clone(),
                    publish_name: publish_name.clone(),
                    description: description.clone(),
                },
            })
        })
        .await;
    match result {
        Ok(committed) => Ok(written(StatusCode::OK, committed, Some(sls_ok("Stream ID added successfully")))),
        Err(crate::commands::CommandError::Rejected(Rejection::AlreadyExists { what: "stream", .. })) => {
            Err(ApiError::Conflict(format!("Stream ID with player '{}' already exists", req.player)))
        }
        Err(crate::commands::CommandError::Rejected(Rejection::AlreadyExists { id, .. })) => {
            Err(ApiError::Conflict(format!("Stream ID with publisher '{id}' already exists")))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn remove(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(player_id): Path<String>,
) -> Result<Response, ApiError> {
    let Ok(player) = sls_stream(&api.sls_app, &player_id) else { return Err(sls_not_found()) };
    let app = api.sls_app.clone();
    let result = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::DeleteStream { app: app.clone(), name: player.clone() }))
        .await;
    match result {
        Ok(committed) => Ok(written(StatusCode::OK, committed, Some(sls_ok("Stream ID deleted successfully")))),
        Err(crate::commands::CommandError::Rejected(Rejection::NotFound { .. })) => Err(sls_not_found()),
        Err(e) => Err(e.into()),
    }
}

fn sls_not_found() -> ApiError {
    ApiError::Missing("Stream ID not found")
}

pub(super) async fn new_key(
    State(api): State<ApiState>,
    ctx: Ctx,
    StrictJson(req): StrictJson<NewKey>,
) -> Result<Response, ApiError> {
    let create = CreateKey { name: req.name, role: req.permissions, id: None, cidrs: vec![], expires_at: None };
    let (secret, _) = create_key(&api, &ctx, create).await?;
    let secret = secret.ok_or_else(|| {
        ApiError::Conflict("this Idempotency-Key already created a key; its secret was shown once".into())
    })?;
    let body =
        SlsKey { status: "success", api_key: secret, message: "Save this key securely. It cannot be retrieved again." };
    Ok(Json(body).into_response())
}

/// The counters of each stream as they were when `reset` was last asked, with the publisher's
/// uptime then: a newer publisher (a smaller uptime) starts from zero.
#[derive(Debug, Default)]
pub struct Resets(std::sync::Mutex<std::collections::HashMap<String, (u64, Counters)>>);

/// The cumulative counters `/stats` shows.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    dropped: u64,
    pkt_loss: u64,
    bytes_loss: u64,
    pkt_drop: u64,
    bytes_drop: u64,
}

impl Counters {
    fn since(self, base: Counters) -> Counters {
        Counters {
            dropped: self.dropped.saturating_sub(base.dropped),
            pkt_loss: self.pkt_loss.saturating_sub(base.pkt_loss),
            bytes_loss: self.bytes_loss.saturating_sub(base.bytes_loss),
            pkt_drop: self.pkt_drop.saturating_sub(base.pkt_drop),
            bytes_drop: self.bytes_drop.saturating_sub(base.bytes_drop),
        }
    }
}

impl Resets {
    /// The counters since the last reset, resetting them if `reset`.
    fn read(&self, player_id: &str, uptime: u64, now: Counters, reset: bool) -> Counters {
        let mut resets = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let base = match resets.get(player_id) {
            Some((at, base)) if *at <= uptime => *base,
            _ => Counters::default(),
        };
        if reset {
            resets.insert(player_id.to_owned(), (uptime, now));
        }
        now.since(base)
    }
}

/// SLS reports its publisher's SRT link. For a stream published over SRT the figures are
/// srt-tokio's (RTT from the handshake); one published over RTMP has no RTT or SRT latency:
/// they are 0 (clients parse numbers). The id is a player id (a stream's public name in the SLS
/// app) or, as OpenIRL falls back to, the key of a live publisher (a publish name).
pub(super) async fn stats(
    State(api): State<ApiState>,
    Path(player_id): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Response, ApiError> {
    let state = api.writer.projection().current();
    let app = state.apps.get(&api.sls_app);
    let id = sls_stream(&api.sls_app, &player_id).ok();
    // A player id, or (OpenIRL's fallback) the key of a publisher, which counts only while live.
    let found = id.as_ref().and_then(|id| {
        let app = app?;
        if let Some(s) = app.streams.get(id) {
            // Another player id of a publisher: the stats of what it plays.
            let primary = s.plays.as_ref().map_or(id, |p| app.publish_names.get(p).unwrap_or(p));
            Some((primary.clone(), false))
        } else {
            app.publish_names.get(id).map(|public| (public.clone(), true))
        }
    });
    let legacy = q.legacy.as_deref() == Some("1");
    let belabox = q.belabox.as_deref() == Some("1") && !legacy;
    let invalid = || {
        let body = Stats { message: Some("Invalid player key"), publisher: None, publishers: None, status: "error" };
        (StatusCode::NOT_FOUND, Json(body)).into_response()
    };
    let Some((player, by_publisher_key)) = found else { return Ok(invalid()) };
    let live = super::nodes::stream_stats_of(&api, api.sls_app.as_str(), player.as_str());
    if by_publisher_key && !live.live {
        return Ok(invalid());
    }
    if !live.live {
        let body = Stats {
            message: Some("Publisher is currently not streaming"),
            publisher: None,
            publishers: (legacy || belabox).then(|| Publishers::Legacy(Default::default())),
            status: "ok",
        };
        return Ok(Json(body).into_response());
    }
    let link = live.srt.clone().unwrap_or_default();
    let (rtt, latency) = match &live.srt {
        Some(l) => (l.rtt_us as f64 / 1000.0, l.latency_ms),
        None => (0.0, 0),
    };
    let dropped = if live.srt.is_some() { link.pkt_rcv_drop } else { live.dropped };
    let counters = Counters {
        dropped,
        pkt_loss: link.pkt_rcv_loss,
        bytes_loss: link.bytes_rcv_loss,
        pkt_drop: link.pkt_rcv_drop,
        bytes_drop: link.bytes_rcv_drop,
    };
    let c = api.sls_resets.read(player.as_str(), live.uptime_secs, counters, q.reset.is_some());
    let kbps = live.bitrate_10s / 1000;
    if legacy {
        let publisher = LegacyPublisher {
            bitrate: kbps,
            bytes_rcv_drop: c.bytes_drop,
            bytes_rcv_loss: c.bytes_loss,
            latency,
            mbps_bandwidth: link.bandwidth_bps as f64 / 1e6,
            mbps_recv_rate: live.bitrate_1s as f64 / 1e6,
            ms_rcv_buf: link.rcv_buf_ms,
            pkt_rcv_drop: c.pkt_drop,
            pkt_rcv_loss: c.pkt_loss,
            rtt,
            uptime: live.uptime_secs,
        };
        let publishers = Some(Publishers::Legacy([("live", publisher)].into_iter().collect()));
        return Ok(Json(Stats { message: None, publisher: None, publishers, status: "ok" }).into_response());
    }
    let publisher = PublisherStats {
        bitrate: kbps,
        buffer: link.rcv_buf_ms,
        dropped_pkts: c.dropped,
        latency,
        rtt,
        uptime: live.uptime_secs,
    };
    if belabox {
        let publishers = Some(Publishers::Belabox([("live", publisher)].into_iter().collect()));
        return Ok(Json(Stats { message: None, publisher: None, publishers, status: "ok" }).into_response());
    }
    Ok(Json(Stats { message: None, publisher: Some(publisher), publishers: None, status: "ok" }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_counts_from_the_last_reset_until_a_new_publisher() {
        let resets = Resets::default();
        let at =
            |n: u64| Counters { dropped: n, pkt_loss: n * 2, bytes_loss: n * 2000, pkt_drop: n, bytes_drop: n * 1000 };
        assert_eq!(resets.read("cam", 10, at(5), false).pkt_loss, 10, "no reset yet: cumulative");
        assert_eq!(resets.read("cam", 11, at(7), true).dropped, 7, "the read that resets shows the totals");
        let c = resets.read("cam", 12, at(9), false);
        assert_eq!((c.dropped, c.pkt_loss, c.bytes_drop), (2, 4, 2000), "counted since the reset");
        assert_eq!(resets.read("other", 12, at(9), false).dropped, 9, "per stream");
        // A new publisher (uptime went back) starts from its own zero.
        assert_eq!(resets.read("cam", 3, at(1), false).dropped, 1);
    }

    /// The live shapes byte for byte as OpenIRL/srt-live-server builds them
    /// (`slscore/SLSManager.cpp`: `create_json_stats_for_publisher`,
    /// `create_legacy_json_stats_for_publisher`, nlohmann's sorted members), with the figures of
    /// the sls-management-ui's own examples (`usePublisherStats.ts`).
    #[test]
    fn live_stats_are_openirls_shapes() {
        let modern = Stats {
            message: None,
            publisher: Some(PublisherStats {
                bitrate: 2261,
                buffer: 2990,
                dropped_pkts: 0,
                latency: 3000,
                rtt: 33.494,
                uptime: 7,
            }),
            publishers: None,
            status: "ok",
        };
        assert_eq!(
            serde_json::to_string(&modern).unwrap(),
            r#"{"publisher":{"bitrate":2261,"buffer":2990,"dropped_pkts":0,"latency":3000,"rtt":33.494,"uptime":7},"status":"ok"}"#
        );
        let live = LegacyPublisher {
            bitrate: 3726,
            bytes_rcv_drop: 0,
            bytes_rcv_loss: 4943644,
            latency: 3000,
            mbps_bandwidth: 330.828,
            mbps_recv_rate: 3.3834749940744926,
            ms_rcv_buf: 2972,
            pkt_rcv_drop: 0,
            pkt_rcv_loss: 3636,
            rtt: 32.23,
            uptime: 38,
        };
        let legacy = Stats {
            message: None,
            publisher: None,
            publishers: Some(Publishers::Legacy([("live", live)].into_iter().collect())),
            status: "ok",
        };
        assert_eq!(
            serde_json::to_string(&legacy).unwrap(),
            concat!(
                r#"{"publishers":{"live":{"bitrate":3726,"bytesRcvDrop":0,"bytesRcvLoss":4943644,"latency":3000,"#,
                r#""mbpsBandwidth":330.828,"mbpsRecvRate":3.3834749940744926,"msRcvBuf":2972,"pktRcvDrop":0,"#,
                r#""pktRcvLoss":3636,"rtt":32.23,"uptime":38}},"status":"ok"}"#
            )
        );
        // `belabox=1`: the modern members under `publishers.live` (NOALBS's Belabox type).
        let publisher =
            PublisherStats { bitrate: 2261, buffer: 2990, dropped_pkts: 4, latency: 3000, rtt: 33.494, uptime: 7 };
        let belabox = Stats {
            message: None,
            publisher: None,
            publishers: Some(Publishers::Belabox([("live", publisher)].into_iter().collect())),
            status: "ok",
        };
        assert_eq!(
            serde_json::to_string(&belabox).unwrap(),
            r#"{"publishers":{"live":{"bitrate":2261,"buffer":2990,"dropped_pkts":4,"latency":3000,"rtt":33.494,"uptime":7}},"status":"ok"}"#
        );
    }
}
