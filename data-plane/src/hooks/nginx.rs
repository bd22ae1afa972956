//! nginx-rtmp's notify module (`on_publish`, `on_play`, `on_update`, `on_publish_done`,
//! `on_play_done`, `on_done`), as `ngx_rtmp_notify_module.c` sends them: an
//! `application/x-www-form-urlencoded` POST of the session (`app`, `flashver`, `swfurl`,
//! `tcurl`, `pageurl`, `addr`, `clientid`), then `call`, `name`, `type` (publish), `time` and
//! `timestamp` (update), and the stream name's own query appended as it came (`token=…`).
//!
//! nginx-rtmp reads only the status: 2xx goes on, 3xx with a `Location` that is not an
//! `rtmp://` URL renames the published stream, anything else refuses (and an `on_update`
//! refusal drops the session). A publisher that used the stream's publish name is answered
//! 302 to the public name, so players play the public name as they do on Sluice's own RTMP.

use std::net::IpAddr;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_events::Action;

use super::{Answer, ClientKey, HookError, Hooks, Standing, refuse};

/// What nginx-rtmp itself sends; every other field is the stream name's query.
const SESSION_FIELDS: &[&str] =
    &["app", "flashver", "swfurl", "tcurl", "pageurl", "addr", "clientid", "call", "name", "type", "time", "timestamp"];

pub const KIND: &str = "nginx-rtmp";

/// The form as pairs, in order (the stream name's query comes last).
pub(super) fn parse(body: &[u8]) -> Result<Vec<(String, String)>, HookError> {
    serde_urlencoded::from_bytes(body).map_err(|_| HookError::new(StatusCode::BAD_REQUEST, "the body is not a form"))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn required<'a>(fields: &'a [(String, String)], name: &str) -> Result<&'a str, HookError> {
    field(fields, name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HookError::new(StatusCode::BAD_REQUEST, format!("missing `{name}`")))
}

pub(super) async fn answer(hooks: &Hooks, server: IpAddr, fields: &[(String, String)]) -> Result<Response, HookError> {
    let call = required(fields, "call")?;
    let client = |action| -> Result<ClientKey, HookError> {
        Ok(ClientKey { server, kind: KIND, client_id: required(fields, "clientid")?.to_owned(), action })
    };
    let action = match call {
        "publish" => Action::Publish,
        "play" => Action::Play,
        "update_publish" | "update_play" => {
            let action = if call == "update_publish" { Action::Publish } else { Action::Play };
            return Ok(match hooks.standing(&client(action)?) {
                Standing::Revoked(reason) => refuse(StatusCode::FORBIDDEN, reason.as_str()),
                // Unknown: admitted before this worker restarted, or elsewhere; it keeps going.
                Standing::Allowed | Standing::Unknown => ok(),
            });
        }
        "publish_done" | "play_done" => {
            let action = if call == "publish_done" { Action::Publish } else { Action::Play };
            hooks.done(&client(action)?);
            return Ok(ok());
        }
        "done" => {
            hooks.done(&client(Action::Publish)?);
            hooks.done(&client(Action::Play)?);
            return Ok(ok());
        }
        // `on_connect`, `on_disconnect`, `on_update` of a connection, `on_record_done`: not
        // access decisions.
        "connect" | "disconnect" | "update" | "record_done" => return Ok(ok()),
        other => return Err(HookError::new(StatusCode::BAD_REQUEST, format!("unknown call `{other}`"))),
    };
    let key = client(action)?;
    let app = required(fields, "app")?;
    let name = required(fields, "name")?;
    let addr: IpAddr = required(fields, "addr")?
        .parse()
        .map_err(|_| HookError::new(StatusCode::BAD_REQUEST, "`addr` is not an IP address"))?;
    // The credential: the stream name's query (the fields nginx-rtmp did not add itself), or
    // the connect URL's (`tcurl`), as on Sluice's own RTMP.
    let query: Vec<(&str, &str)> = fields
        .iter()
        .filter(|(k, _)| !SESSION_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let stream_key = if query.is_empty() {
        name.to_owned()
    } else {
        format!("{name}?{}", serde_urlencoded::to_string(&query).unwrap_or_default())
    };
    let connect_query = field(fields, "tcurl").and_then(|t| t.split_once('?')).map(|(_, q)| q);
    let app = match connect_query {
        Some(q) if !app.contains('?') && !q.is_empty() => format!("{app}?{q}"),
        _ => app.to_owned(),
    };
    let mut req = crate::rtmp::access_request(&app, &stream_key, action, addr)
        .map_err(|e| HookError::new(StatusCode::BAD_REQUEST, format!("stream: {e}")))?;
    req.client_id = Some(key.client_id.clone());
    // nginx-rtmp says when a session ends (`*_done`) and re-checks it (`on_update`).
    let hold = super::Hold { kick: None, liveness: None, hold_slot: true };
    Ok(match hooks.admit(key, req, hold).await {
        Answer::Allowed(record) => {
            let public = record.decision.stream.as_str();
            if public != name {
                // nginx-rtmp renames the stream it publishes or plays to the Location (not a
                // URL): a publish name becomes the public name.
                (StatusCode::FOUND, [(header::LOCATION, public.to_owned())], "").into_response()
            } else {
                ok()
            }
        }
        Answer::Refused(record) => refuse(StatusCode::FORBIDDEN, record.final_reason.as_str()),
        Answer::Unavailable(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "no decision possible yet; try again"),
    })
}

fn ok() -> Response {
    (StatusCode::OK, "allowed\n").into_response()
}
