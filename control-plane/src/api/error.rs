//! The one error type of the REST API. Each variant maps to a status and a stable problem
//! `type` (RFC 9457 `application/problem+json`); internal failures never reach the client's
//! text. The compatibility routes re-render the same error in their own envelope
//! (`compat.rs`), reading the `Problem` this type leaves in the response's extensions.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_events::Rejection;

use crate::commands::CommandError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid {field}: {detail}")]
    Invalid { field: String, detail: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// A 404 with a fixed message (compatibility routes).
    #[error("{0}")]
    Missing(&'static str),
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    /// Well-formed but not to be done: an `Idempotency-Key` reused with another request.
    #[error("{0}")]
    Unprocessable(String),
    #[error("this path does not serve that method (see Allow)")]
    MethodNotAllowed,
    #[error("the request body is larger than the limit (max_body_bytes)")]
    TooLarge,
    #[error("expected a JSON body (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("rate limit exceeded; retry in {0} s")]
    RateLimited(u64),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal,
}

/// What the error looked like, kept in the response so compatibility envelopes can re-render it.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } | ApiError::Missing(_) => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. } | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable last segment of the problem `type` URI.
    pub fn slug(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Invalid { .. } => "invalid-field",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound { .. } | ApiError::Missing(_) => "not-found",
            ApiError::AlreadyExists { .. } => "already-exists",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "idempotency-key-reused",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::TooLarge => "payload-too-large",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::RateLimited(_) => "rate-limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal => "internal",
        }
    }

    pub fn not_found(what: &'static str, id: impl ToString) -> ApiError {
        ApiError::NotFound { what, id: id.to_string() }
    }

    pub fn invalid(field: &str, detail: impl ToString) -> ApiError {
        ApiError::Invalid { field: field.to_owned(), detail: detail.to_string() }
    }
}

pub const PROBLEM_BASE: &str = "https://sluice.dev/problems/";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let slug = self.slug();
        let detail = self.to_string();
        let body = json!({
            "type": format!("{PROBLEM_BASE}{slug}"),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="sluice", Basic realm="sluice", charset="UTF-8""#),
                );
            }
            ApiError::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from((*secs).max(1)));
            }
            _ => {}
        }
        response.extensions_mut().insert(Problem { status, slug, detail });
        response
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::AlreadyExists { what, id } => ApiError::AlreadyExists { what, id },
            Rejection::NotFound { what, id } => ApiError::NotFound { what, id },
            Rejection::Invalid { field, detail } => ApiError::Invalid { field: field.to_owned(), detail },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            ApiError::Unavailable("the event log (Postgres) is unreachable; nothing was written, try again later")
        } else {
            tracing::error!(error = %e, "event store failure");
            ApiError::Internal
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rejected(r) => r.into(),
            CommandError::Conflict { .. } => ApiError::Conflict(e.to_string()),
            CommandError::IdempotencyMismatch => ApiError::Unprocessable(e.to_string()),
            CommandError::Store(s) => s.into(),
        }
    }
}
