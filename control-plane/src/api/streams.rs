//! `/v1/apps/{app}/streams`: registered streams, each with a public name (what players use)
//! and an optional secret publish name (what the publisher uses, SRT Live Server's mapping).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::state::{App, Stream};
use sluice_events::{AppName, Command, StreamName};

use super::apps::{app_name, lookup};
use super::body::StrictJson;
use super::error::ApiError;
use super::query::Query;
use super::{ApiState, Ctx, now, written};

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterStream {
    pub name: StreamName,
    /// The secret name the publisher uses instead of `name` (a stream key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_name: Option<StreamName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Another player name for a stream that is registered: the publish name (or the name,
    /// for a stream without one) whose media this name plays. Such a name does not publish,
    /// and outlives the first stream (SRT Live Server's many player ids per publisher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plays: Option<StreamName>,
}

/// A partial update: an absent field is kept, `null` clears it.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateStream {
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    #[schemars(with = "Option<StreamName>")]
    pub publish_name: Option<Option<StreamName>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option")]
    #[schemars(with = "Option<String>")]
    pub description: Option<Option<String>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StreamView {
    pub app: AppName,
    pub name: StreamName,
    pub publish_name: Option<StreamName>,
    pub description: Option<String>,
    /// For another player name: what it plays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plays: Option<StreamName>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StreamPage {
    pub streams: Vec<StreamView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<StreamName>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Start after this stream name.
    pub after: Option<String>,
    /// 1 to 1000, default 100.
    pub limit: Option<usize>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }
}

/// `POST .../kick`: which of the stream's live sessions to end (all when empty).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    /// Only publishers (`publish`) or only players (`play`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<sluice_events::Action>,
    /// Only sessions from this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<std::net::IpAddr>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Kicked {
    /// The kick's log position: every worker ends the matching sessions it admitted before it,
    /// as it applies it.
    pub position: u64,
}

pub fn stream_name(name: &str) -> Result<StreamName, ApiError> {
    StreamName::parse(name).map_err(|_| ApiError::not_found("stream", name))
}

pub fn lookup_stream<'a>(app: &'a App, name: &StreamName) -> Result<&'a Stream, ApiError> {
    app.streams.get(name).ok_or_else(|| ApiError::not_found("stream", name))
}

pub fn view(app: &AppName, name: &StreamName, s: &Stream) -> StreamView {
    StreamView {
        app: app.clone(),
        name: name.clone(),
        publish_name: s.publish_name.clone(),
        description: s.description.clone(),
        plays: s.plays.clone(),
    }
}

pub(super) async fn register(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path(app): Path<String>,
    StrictJson(req): StrictJson<RegisterStream>,
) -> Result<Response, ApiError> {
    let app = app_name(&app)?;
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| match (&req.plays, &req.publish_name) {
            (Some(_), Some(_)) => Err(sluice_events::Rejection::Invalid {
                field: "plays",
                detail: "another player name has no publish_name".into(),
            }),
            (Some(plays), None) => Ok(Command::RegisterPlayer {
                app: app.clone(),
                name: req.name.clone(),
                plays: plays.clone(),
                description: req.description.clone(),
            }),
            (None, _) => Ok(Command::RegisterStream {
                app: app.clone(),
                name: req.name.clone(),
                publish_name: req.publish_name.clone(),
                description: req.description.clone(),
            }),
        })
        .await?;
    let state = api.writer.projection().current();
    let s = lookup_stream(lookup(&state, &app)?, &req.name)?;
    Ok(written(StatusCode::CREATED, committed, Some(view(&app, &req.name, s))))
}

pub(super) async fn list(
    State(api): State<ApiState>,
    Path(app): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Json<StreamPage>, ApiError> {
    let name = app_name(&app)?;
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "between 1 and 1000"));
    }
    let state = api.writer.projection().current();
    let a = lookup(&state, &name)?;
    let start = match &page.after {
        Some(after) => {
            std::ops::Bound::Excluded(StreamName::parse(after).map_err(|e| ApiError::invalid("after", e.to_string()))?)
        }
        None => std::ops::Bound::Unbounded,
    };
    let mut streams: Vec<StreamView> =
        a.streams.range((start, std::ops::Bound::Unbounded)).take(limit + 1).map(|(n, s)| view(&name, n, s)).collect();
    let next = if streams.len() > limit {
        streams.truncate(limit);
        streams.last().map(|s| s.name.clone())
    } else {
        None
    };
    Ok(Json(StreamPage { streams, next }))
}

pub(super) async fn read(
    State(api): State<ApiState>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<StreamView>, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let state = api.writer.projection().current();
    Ok(Json(view(&app, &name, lookup_stream(lookup(&state, &app)?, &name)?)))
}

pub(super) async fn update(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<UpdateStream>,
) -> Result<Response, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |state| {
            let current = state
                .apps
                .get(&app)
                .and_then(|a| a.streams.get(&name))
                .ok_or_else(|| sluice_events::Rejection::NotFound { what: "stream", id: name.to_string() })?;
            Ok(Command::UpdateStream {
                app: app.clone(),
                name: name.clone(),
                publish_name: req.publish_name.clone().unwrap_or_else(|| current.publish_name.clone()),
                description: req.description.clone().unwrap_or_else(|| current.description.clone()),
            })
        })
        .await?;
    let state = api.writer.projection().current();
    Ok(written(StatusCode::OK, committed, Some(view(&app, &name, lookup_stream(lookup(&state, &app)?, &name)?))))
}

/// Ends live sessions of a stream on every worker (the name the clients used: a public,
/// publish or player name; registered or not). Nothing is refused afterwards: revoke the
/// credential as well to keep someone out.
pub(super) async fn kick(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
    StrictJson(req): StrictJson<Kick>,
) -> Result<Response, ApiError> {
    let (app, stream) = (app_name(&app)?, stream_name(&name)?);
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| {
            Ok(Command::KickSessions {
                app: app.clone(),
                stream: stream.clone(),
                action: req.action,
                client_ip: req.client_ip,
            })
        })
        .await?;
    let position = committed.position.0;
    Ok(written(StatusCode::ACCEPTED, committed, Some(Kicked { position })))
}

pub(super) async fn delete(
    State(api): State<ApiState>,
    ctx: Ctx,
    Path((app, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (app, name) = (app_name(&app)?, stream_name(&name)?);
    let committed = api
        .writer
        .run(&ctx.origin(), now(), |_| Ok(Command::DeleteStream { app: app.clone(), name: name.clone() }))
        .await?;
    Ok(written::<()>(StatusCode::NO_CONTENT, committed, None))
}
