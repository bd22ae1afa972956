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
pub struct AmsResult {
    pub success: bool,
    pub message: Option<String>,
    pub data_id: Option<String>,
    pub error_id: i32,
}

/// SRT Live Server's message for an error, as OpenIRL's code words it
/// (`slscore/SLSApiServer.cpp`): which 401 (no header, or a key it does not know), which 403
/// (admin-only routes say so), and its two 400s for `POST /api/stream-ids`.
pub fn sls_message(problem: &Problem, route: &SlsRoute) -> String {
    const MISSING: &str = "Missing or invalid Authorization header";
    match problem.status {
        StatusCode::UNAUTHORIZED if problem.detail == MISSING => MISSING.into(),
        StatusCode::UNAUTHORIZED => "Invalid API key".into(),
        StatusCode::FORBIDDEN if route.admin_only => "Admin permissions required".into(),
        StatusCode::FORBIDDEN => "Insufficient permissions".into(),
        StatusCode::TOO_MANY_REQUESTS => "Rate limit exceeded".into(),
        StatusCode::BAD_REQUEST if problem.detail.starts_with("malformed JSON") => "Invalid JSON body".into(),
        StatusCode::BAD_REQUEST if route.stream_ids_post => {
            "Missing or invalid required fields: publisher, player".into()
        }
        _ => problem.detail.clone(),
    }
}

/// What of the request decides SLS's wording.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlsRoute {
    /// `DELETE /api/stream-ids/{id}` and `POST /api/keys`: admin's.
    pub admin_only: bool,
    pub stream_ids_post: bool,
}

/// OpenIRL's CORS on every SLS route (`setCorsHeaders`): the management UI and OBS overlays
/// run in browsers.
fn sls_cors(headers: &mut axum::http::HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Content-Type, Authorization"));
}

/// `{"status":"error","message":…}` with the original status and headers
/// (`WWW-Authenticate`, `Retry-After`), and SLS's CORS headers (`SLUICE_SLS_CORS_ORIGIN`);
/// `OPTIONS` (a browser's preflight) is 204 at once.
pub async fn sls_envelope(
    axum::extract::State(origin): axum::extract::State<HeaderValue>,
    req: Request,
    next: Next,
) -> Response {
    use axum::http::Method;
    if req.method() == Method::OPTIONS {
        let mut response = StatusCode::NO_CONTENT.into_response();
        sls_cors(response.headers_mut(), &origin);
        return response;
    }
    let path = req.uri().path();
    let route = SlsRoute {
        admin_only: req.method() == Method::DELETE || (req.method() == Method::POST && path == "/api/keys"),
        stream_ids_post: req.method() == Method::POST && path == "/api/stream-ids",
    };
    let mut response = next.run(req).await;
    if let Some(problem) = response.extensions().get::<Problem>().cloned() {
        let message = sls_message(&problem, &route);
        response = rewrap(response, Json(SlsMessage { status: "error", message: &message }));
    }
    sls_cors(response.headers_mut(), &origin);
    response
}

/// Ant Media's `Result`: `{"success":false,"message":…,"dataId":null,"errorId":0}`.
///
/// Ant Media answers a refused operation with 200 and `success: false`
/// (`BroadcastRestService.java`: add, delete and block subscribers, revoke, validate-token,
/// delete a broadcast); only its token calls answer 400 with the `Result`. Authentication,
/// rate limits and outages keep their status (Ant's filters answer 403 before the service).
pub async fn antmedia_envelope(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let keeps_status =
        req.method() == axum::http::Method::GET && (path.ends_with("/token") || path.ends_with("/jwt-token"));
    let response = next.run(req).await;
    let Some(problem) = response.extensions().get::<Problem>().cloned() else { return response };
    // A request that cannot be read (a body that is not the JSON the route takes, a path
    // parameter of the wrong type) stays 400, as Jersey answers it before the service runs.
    let refused = problem.slug != "bad-request"
        && matches!(
            problem.status,
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY
        );
    let body = AmsResult { success: false, message: Some(problem.detail.clone()), data_id: None, error_id: 0 };
    let mut response = rewrap(response, Json(body));
    if refused {
        // The token calls answer every refusal 400 (`Status.BAD_REQUEST`), the rest 200.
        *response.status_mut() = if keeps_status { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    }
    response
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
