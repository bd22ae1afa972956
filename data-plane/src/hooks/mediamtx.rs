//! MediaMTX's `authHTTPAddress` (`authMethod: http`), as `internal/auth/manager.go`
//! (`authenticateHTTP`, MediaMTX 1.x, 2026-08) sends it: a JSON POST with `ip`, `user`,
//! `password`, `token`, `action` (`publish`, `read`, `playback`, `api`, `metrics`, `pprof`),
//! `path`, `protocol` (`rtsp`, `rtmp`, `hls`, `webrtc`, `srt`, `moq`), `id` (the session or
//! connection, a UUID or null), `query` and `userAgent`. MediaMTX admits on any 2xx and
//! refuses otherwise; Sluice answers 401 to refuse.
//!
//! The path is `app/stream`. The credential is read from `query` as on Sluice's own RTMP
//! (`token=…`), else MediaMTX's `token` (a bearer token or `jwt` parameter), else the
//! password (`rtsp://user:TOKEN@host/app/stream`). `api`, `metrics` and `pprof` are not
//! Sluice's to decide: they are refused (MediaMTX excludes them by default,
//! `authHTTPExclude`). MediaMTX says nothing when a session ends and enforces one publisher
//! per path itself: Sluice holds no publisher slot for it, and with `SLUICE_HOOKS_MEDIAMTX_API`
//! it kicks a revoked session (`POST /v3/<list>/kick/{id}`) and forgets a session the API no
//! longer lists.

use std::net::IpAddr;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_events::{Action, Protocol, SecretString};

use super::{Answer, ClientKey, Hold, HookError, Hooks, Kick, Liveness, refuse};

pub const KIND: &str = "mediamtx";

#[derive(Debug, Deserialize)]
pub(super) struct AuthRequest {
    ip: Option<String>,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    token: String,
    action: Option<String>,
    #[serde(default)]
    path: String,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    query: String,
}

pub(super) fn parse(body: &[u8]) -> Result<AuthRequest, HookError> {
    serde_json::from_slice(body).map_err(|e| HookError::new(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

/// MediaMTX's protocol names, and the control API's lists of that protocol's sessions (plain,
/// then TLS: the request does not say which).
fn protocol(name: &str) -> Result<(Protocol, &'static [&'static str]), HookError> {
    Ok(match name {
        "rtsp" => (Protocol::Rtsp, &["rtspsessions", "rtspssessions"]),
        "rtmp" => (Protocol::Rtmp, &["rtmpconns", "rtmpsconns"]),
        "hls" => (Protocol::Hls, &["hlssessions"]),
        "webrtc" => (Protocol::Webrtc, &["webrtcsessions"]),
        "srt" => (Protocol::Srt, &["srtconns"]),
        "moq" => (Protocol::Moq, &["moqsessions"]),
        other => return Err(HookError::new(StatusCode::BAD_REQUEST, format!("unknown protocol `{other}`"))),
    })
}

pub(super) async fn answer(hooks: &Hooks, server: IpAddr, r: AuthRequest) -> Result<Response, HookError> {
    let action = match r.action.as_deref() {
        Some("publish") => Action::Publish,
        Some("read" | "playback") => Action::Play,
        Some("api" | "metrics" | "pprof") => {
            return Ok(refuse(StatusCode::UNAUTHORIZED, "not a stream: exclude it with authHTTPExclude"));
        }
        Some(other) => return Err(HookError::new(StatusCode::BAD_REQUEST, format!("unknown action `{other}`"))),
        None => return Err(HookError::new(StatusCode::BAD_REQUEST, "missing `action`")),
    };
    let ip: IpAddr =
        r.ip.filter(|v| !v.is_empty())
            .ok_or_else(|| HookError::new(StatusCode::BAD_REQUEST, "missing `ip`"))?
            .parse()
            .map_err(|_| HookError::new(StatusCode::BAD_REQUEST, "`ip` is not an IP address"))?;
    let (protocol, lists) = protocol(&r.protocol)?;
    let Some((app, stream)) = r.path.split_once('/') else {
        return Err(HookError::new(StatusCode::BAD_REQUEST, "`path` is not app/stream"));
    };
    let stream_key = if r.query.is_empty() { stream.to_owned() } else { format!("{stream}?{}", r.query) };
    let mut req = crate::rtmp::access_request(app, &stream_key, action, ip)
        .map_err(|e| HookError::new(StatusCode::BAD_REQUEST, format!("path: {e}")))?;
    req.protocol = protocol;
    if req.credential.token.is_none() {
        let fallback = if r.token.is_empty() { &r.password } else { &r.token };
        if !fallback.is_empty() {
            req.credential.token = Some(SecretString::new(fallback.as_str()));
        }
    }
    if req.credential.subscriber_id.is_none() && !r.user.is_empty() && r.token.is_empty() {
        // `rtsp://alice:123456@…`: a TOTP subscriber and its code.
        if let Ok(id) = sluice_events::SubscriberId::parse(&r.user) {
            req.credential.subscriber_id = Some(id);
            req.credential.subscriber_code = Some(SecretString::new(r.password.as_str()));
        }
    }
    let client_id = r.id.filter(|id| !id.is_empty());
    req.client_id = client_id.clone();
    let (kick, liveness) = match (&hooks.apis.mediamtx, &client_id) {
        (Some(api), Some(id)) => {
            let id = super::srs::urlencoding(id);
            let kick = Kick {
                method: reqwest::Method::POST,
                urls: lists.iter().map(|l| format!("{api}/v3/{l}/kick/{id}")).collect(),
            };
            let live = Liveness { urls: lists.iter().map(|l| format!("{api}/v3/{l}/get/{id}")).collect() };
            (Some(kick), Some(live))
        }
        _ => (None, None),
    };
    let answer = match client_id {
        // Without its API or an id, a session cannot be revoked or known to end: decided only.
        Some(client_id) if liveness.is_some() => {
            let hold = Hold { kick, liveness, hold_slot: false };
            hooks.admit(ClientKey { server, kind: KIND, client_id, action }, req, hold).await
        }
        _ => hooks.decide_only(req).await,
    };
    Ok(match answer {
        Answer::Allowed(_) => (StatusCode::OK, "allowed\n").into_response(),
        Answer::Refused(record) => refuse(StatusCode::UNAUTHORIZED, record.final_reason.as_str()),
        Answer::Unavailable(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "no decision possible yet; try again"),
    })
}
