//! SRS's `http_hooks` (`on_publish`, `on_unpublish`, `on_play`, `on_stop`), as
//! `trunk/src/app/srs_app_http_hooks.cpp` (SRS 6, develop, 2024-10) sends them: a JSON POST
//! with `action`, `client_id`, `ip`, `vhost`, `app`, `stream`, `param` (the URL's query with
//! its `?`), `tcUrl`, `server_id`, `stream_id`, `stream_url`, …; fields SRS adds in later
//! versions are ignored. SRS accepts a status 200 or 201 whose body is `0` or an object with
//! `"code": 0`; anything else refuses. SRS has no re-check hook: a session the log revokes is
//! kicked through SRS's HTTP API (`DELETE /api/v1/clients/{client_id}`) when
//! `SLUICE_HOOKS_SRS_API` is set.

use std::net::IpAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sluice_events::{Action, Protocol};

use super::{Answer, ClientKey, Hold, HookError, Hooks, Kick};

pub const KIND: &str = "srs";

/// What Sluice reads of SRS's request (the rest is ignored: SRS adds fields over versions).
#[derive(Debug, Deserialize)]
pub(super) struct SrsHook {
    action: String,
    client_id: Option<String>,
    ip: Option<String>,
    app: Option<String>,
    stream: Option<String>,
    #[serde(default)]
    param: String,
    #[serde(default, rename = "tcUrl")]
    tc_url: String,
}

pub(super) fn parse(body: &[u8]) -> Result<SrsHook, HookError> {
    serde_json::from_slice(body).map_err(|e| HookError::new(StatusCode::BAD_REQUEST, format!("body: {e}")))
}

fn required(value: Option<String>, name: &str) -> Result<String, HookError> {
    value.filter(|v| !v.is_empty()).ok_or_else(|| HookError::new(StatusCode::BAD_REQUEST, format!("missing `{name}`")))
}

/// The protocol SRS served the client on, from its `tcUrl`'s scheme.
fn protocol(tc_url: &str) -> Protocol {
    match tc_url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
        Some(s) if s == "srt" => Protocol::Srt,
        Some(s) if s == "webrtc" || s == "rtc" => Protocol::Webrtc,
        Some(s) if s == "http" || s == "https" => Protocol::Http,
        _ => Protocol::Rtmp,
    }
}

/// SRS's "go on".
fn allow() -> Response {
    (StatusCode::OK, Json(json!({"code": 0}))).into_response()
}

pub(super) async fn answer(hooks: &Hooks, server: IpAddr, r: SrsHook) -> Result<Response, HookError> {
    let action = match r.action.as_str() {
        "on_publish" => Action::Publish,
        "on_play" => Action::Play,
        "on_unpublish" | "on_stop" => {
            let action = if r.action == "on_unpublish" { Action::Publish } else { Action::Play };
            let client_id = required(r.client_id, "client_id")?;
            hooks.done(&ClientKey { server, kind: KIND, client_id, action });
            return Ok(allow());
        }
        // Not access decisions.
        "on_connect" | "on_close" | "on_dvr" | "on_hls" | "on_hls_notify" | "on_forward" => return Ok(allow()),
        other => return Err(HookError::new(StatusCode::BAD_REQUEST, format!("unknown action `{other}`"))),
    };
    let client_id = required(r.client_id, "client_id")?;
    let ip: IpAddr = required(r.ip, "ip")?
        .parse()
        .map_err(|_| HookError::new(StatusCode::BAD_REQUEST, "`ip` is not an IP address"))?;
    let app = required(r.app, "app")?;
    let stream = required(r.stream, "stream")?;
    let query = r.param.trim_start_matches('?');
    let stream_key = if query.is_empty() { stream.clone() } else { format!("{stream}?{query}") };
    let mut req = crate::rtmp::access_request(&app, &stream_key, action, ip)
        .map_err(|e| HookError::new(StatusCode::BAD_REQUEST, format!("stream: {e}")))?;
    req.protocol = protocol(&r.tc_url);
    req.client_id = Some(client_id.clone());
    let kick = hooks.apis.srs.as_ref().map(|api| Kick {
        method: reqwest::Method::DELETE,
        urls: vec![format!("{api}/api/v1/clients/{}", urlencoding(&client_id))],
    });
    let hold = Hold { kick, liveness: None, hold_slot: true };
    Ok(match hooks.admit(ClientKey { server, kind: KIND, client_id, action }, req, hold).await {
        Answer::Allowed(_) => allow(),
        Answer::Refused(record) => {
            let reason = record.final_reason.as_str();
            (StatusCode::FORBIDDEN, Json(json!({"code": StatusCode::FORBIDDEN.as_u16(), "reason": reason})))
                .into_response()
        }
        Answer::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"code": StatusCode::SERVICE_UNAVAILABLE.as_u16(), "reason": "no decision possible yet"})),
        )
            .into_response(),
    })
}

/// A path segment: everything but unreserved characters percent-encoded.
pub(super) fn urlencoding(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
