//! Strict query strings: a parameter of the wrong type, or one the route does not know, is a
//! 400 problem+json naming it (axum's own `Query` answers in plain text).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The query string parsed into `T` (whose type says which parameters exist).
#[derive(Debug, Clone)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let pairs = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(pairs).map(Query).map_err(|e| {
            let path = e.path().to_string();
            ApiError::BadRequest(format!("invalid query string: {path}: {}", e.into_inner()))
        })
    }
}
