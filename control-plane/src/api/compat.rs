//! Error envelopes of the compatibility surfaces. Errors are raised once, as `ApiError`
//! (which renders problem+json and leaves a `Problem` in the response); these middlewares
//! re-render them in the shape SRT Live Server or Ant Media clients parse.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::Problem;

/// `{"status": …, "message": …}` in SRT Live Server's member order.
#[derive(Debug, Serialize)]
pub struct SlsMessage<'a> {
    pub status: &'a str,
    pub message: &'a str,
}

/// Ant Media's `Result`, in its member order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmsResult<'a> {
    pub success: bool,
    pub message: Option<&'a str>,
    pub data_id: Option<&'a str>,
    pub error_id: i32,
}

/// SRT Live Server's messages for the statuses its clients know.
pub fn sls_message(problem: &Problem) -> String {
    match problem.status {
        StatusCode::UNAUTHORIZED => "Missing or invalid Authorization header".into(),
        StatusCode::FORBIDDEN => "Insufficient permissions".into(),
        StatusCode::TOO_MANY_REQUESTS => "Rate limit exceeded".into(),
        _ => problem.detail.clone(),
    }
}

/// `{"status":"error","message":…}` with the original status and headers
/// (`WWW-Authenticate`, `Retry-After`).
pub async fn sls_envelope(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let Some(problem) = response.extensions().get::<Problem>().cloned() else { return response };
    let message = sls_message(&problem);
    rewrap(response, Json(SlsMessage { status: "error", message: &message }))
}

/// Ant Media's `Result`: `{"success":false,"message":…,"dataId":null,"errorId":0}`.
pub async fn antmedia_envelope(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let Some(problem) = response.extensions().get::<Problem>().cloned() else { return response };
    let body = AmsResult { success: false, message: Some(&problem.detail), data_id: None, error_id: 0 };
    rewrap(response, Json(body))
}

fn rewrap<T: Serialize>(original: Response, body: Json<T>) -> Response {
    let (mut parts, _) = original.into_parts();
    let mut fresh = (parts.status, body).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in parts.headers.drain().filter_map(|(n, v)| n.map(|n| (n, v))) {
        fresh.headers_mut().insert(name, value);
    }
    std::mem::swap(fresh.extensions_mut(), &mut parts.extensions);
    fresh
}
