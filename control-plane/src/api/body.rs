//! Strict JSON request bodies: `application/json` only (415), within the size limit (413),
//! well-formed (400), the right types (400) and no unknown fields (400), at any depth.
//!
//! Unknown fields are refused by the body types themselves (`deny_unknown_fields`): a REST
//! body is its own type, converted into the event payload (`api::policy` for the policy),
//! so the payload can stay lenient on read while a request is strict.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// A JSON body parsed strictly into `T`.
#[derive(Debug, Clone)]
pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || (m.starts_with("application/") && m.ends_with("+json")));
        if !json_type {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::BadRequest("could not read the request body".into())
            }
        })?;
        parse(&bytes).map(StrictJson)
    }
}

/// Like `StrictJson`, but an empty body is `None` (endpoints whose body is optional).
#[derive(Debug, Clone)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let empty = req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0")
            || (req.headers().get(header::CONTENT_TYPE).is_none()
                && req.headers().get(header::TRANSFER_ENCODING).is_none()
                && req.headers().get(header::CONTENT_LENGTH).is_none());
        if empty {
            return Ok(OptionalJson(None));
        }
        StrictJson::<T>::from_request(req, state).await.map(|j| OptionalJson(Some(j.0)))
    }
}

/// Parses `bytes` as a strict `T` (exposed for the tests and the compatibility adapters).
/// Body types deny unknown fields themselves (`#[serde(deny_unknown_fields)]`); this names
/// where in the body a problem is.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let input: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    if !input.is_object() {
        return Err(ApiError::BadRequest("expected a JSON object".into()));
    }
    serde_path_to_error::deserialize(input).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // The path ends at the unknown member itself.
        if inner.starts_with("unknown field `") {
            ApiError::BadRequest(format!("unknown field `{path}`"))
        } else if path == "." {
            ApiError::BadRequest(format!("invalid request: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid request: {path}: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only parsed
    struct Inner {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only parsed
    struct Outer {
        inner: Inner,
        list: Vec<Inner>,
    }

    fn err(text: &str) -> String {
        parse::<Outer>(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn strict_parsing_names_what_is_wrong() {
        assert!(parse::<Outer>(br#"{"inner":{"a":1},"list":[{"a":2,"b":"x"}]}"#).is_ok());
        assert!(parse::<Outer>(br#"{"inner":{"a":1,"b":null},"list":[]}"#).is_ok());
        assert_eq!(err(r#"{"inner":{"a":1},"list":[],"extra":1}"#), "unknown field `extra`");
        assert_eq!(err(r#"{"inner":{"a":1,"c":2},"list":[]}"#), "unknown field `inner.c`");
        assert_eq!(err(r#"{"inner":{"a":1},"list":[{"a":1,"z":true}]}"#), "unknown field `list[0].z`");
        assert!(err(r#"{"inner":{"a":"one"},"list":[]}"#).starts_with("invalid request: inner.a: invalid type"));
        assert!(err(r#"{"inner":{"a":1}"#).starts_with("malformed JSON"));
        assert_eq!(err("[1]"), "expected a JSON object");
    }
}
