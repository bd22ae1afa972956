//! API authentication: `Bearer <api key>`, `Basic base64(key_id:secret)` (Agora style),
//! `Bearer <JWT>` (HS256 with a configured secret, RS256/ES256 from a configured JWKS URL),
//! and an optional static admin user (SRS style). The result is a `Principal` with a role;
//! handlers ask for the role they need. Secrets are compared in constant time and never
//! echoed.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sluice_events::ids::cidrs_allow;
use sluice_events::state::{JwkKey, jwks_keys};
use sluice_events::{AuthState, KeyId, Role, SecretString, Sha256Digest, Timestamp};

use super::error::ApiError;
use super::{ApiState, AuditSlot, ClientIp, now};
use crate::config::ApiSettings;

/// Who is calling, and with which role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `key:<id>`, `jwt:<sub>` or `basic:<user>`: what the audit records.
    pub subject: String,
    pub role: Role,
    pub key: Option<KeyId>,
}

impl Principal {
    /// 403 unless the role allows `needed`.
    pub fn require(&self, needed: Role) -> Result<&Principal, ApiError> {
        if self.role.allows(needed) { Ok(self) } else { Err(ApiError::Forbidden("Insufficient permissions")) }
    }
}

/// A JWT verification key with the one algorithm it may be used with (no algorithm confusion).
type VerifyKey = JwkKey;

/// Verifies API credentials other than keys in the log: the static admin and API JWTs.
#[derive(Clone)]
pub struct Authenticator {
    admin: Option<(String, SecretString)>,
    hs256: Option<VerifyKey>,
    jwks: Arc<RwLock<Vec<VerifyKey>>>,
    jwks_url: Option<String>,
    role_claim: String,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    leeway_secs: u64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("admin", &self.admin.as_ref().map(|(u, _)| u))
            .field("hs256", &self.hs256.is_some())
            .field("jwks_url", &self.jwks_url)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(settings: &ApiSettings) -> Authenticator {
        Authenticator {
            admin: settings.admin_user.clone(),
            hs256: settings.jwt_secret.as_ref().map(|s| VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(s.expose().as_bytes()),
            }),
            jwks: Arc::default(),
            jwks_url: settings.jwt_jwks_url.clone(),
            role_claim: settings.jwt_role_claim.clone(),
            leeway_secs: settings.jwt_leeway_secs,
        }
    }

    pub fn jwks_url(&self) -> Option<&str> {
        self.jwks_url.as_deref()
    }

    /// Fetches the configured JWKS and replaces the cached keys; returns how many were usable.
    pub async fn refresh_jwks(&self, client: &reqwest::Client) -> Result<usize, String> {
        let Some(url) = &self.jwks_url else { return Err("no api_jwt_jwks_url is configured".into()) };
        let set: serde_json::Value = client
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("cannot fetch the JWKS: {e}"))?
            .json()
            .await
            .map_err(|e| format!("the JWKS is not a JWK set: {e}"))?;
        let keys = jwks_keys(&set);
        let n = keys.len();
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(n)
    }

    /// Keeps the JWKS fresh in the background.
    pub fn spawn_jwks_refresh(&self, tasks: &crate::task::Tasks, every: Duration) {
        if self.jwks_url.is_none() {
            return;
        }
        let me = self.clone();
        tasks.spawn("API JWKS refresh", async move {
            let client = reqwest::Client::new();
            loop {
                match me.refresh_jwks(&client).await {
                    Ok(n) => tracing::info!(keys = n, "API JWKS refreshed"),
                    Err(e) => tracing::warn!(error = %e, "API JWKS refresh failed; keeping the previous keys"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Checks one `Authorization` header value against the state.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        state: &AuthState,
        ip: IpAddr,
        now: Timestamp,
    ) -> Result<Principal, ApiError> {
        const MISSING: &str = "Missing or invalid Authorization header";
        let value = authorization.map(str::trim).filter(|v| !v.is_empty()).ok_or(ApiError::Unauthorized(MISSING))?;
        let (scheme, rest) = value.split_once(' ').map_or(("", value), |(s, r)| (s, r.trim()));
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" if looks_like_jwt(rest) => self.jwt(rest, now),
            "bearer" => key_by_secret(state, rest, ip, now),
            "basic" => self.basic(rest, state, ip, now),
            // Ant Media sends the JWT as the whole header value.
            "" if looks_like_jwt(rest) => self.jwt(rest, now),
            _ => Err(ApiError::Unauthorized(MISSING)),
        }
    }

    fn basic(&self, encoded: &str, state: &AuthState, ip: IpAddr, now: Timestamp) -> Result<Principal, ApiError> {
        const BAD: &str = "malformed Basic credentials (expected base64 of id:secret)";
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| ApiError::Unauthorized(BAD))?;
        let text = String::from_utf8(decoded).map_err(|_| ApiError::Unauthorized(BAD))?;
        let (user, secret) = text.split_once(':').ok_or(ApiError::Unauthorized(BAD))?;
        if let Some((admin, password)) = &self.admin {
            // Both compared in constant time, and both always compared.
            let user_ok = sluice_events::secret::ct_eq(user.as_bytes(), admin.as_bytes());
            let pass_ok = sluice_events::secret::ct_eq(secret.as_bytes(), password.expose().as_bytes());
            if user_ok & pass_ok {
                return Ok(Principal { subject: format!("basic:{admin}"), role: Role::Admin, key: None });
            }
        }
        let invalid = ApiError::Unauthorized("invalid credentials");
        let id = KeyId::parse(user).map_err(|_| ApiError::Unauthorized("invalid credentials"))?;
        let (id, key) = state.api_keys.get_key_value(&id).ok_or(invalid)?;
        if !key.secret_sha256.ct_eq(&Sha256Digest::of(secret.as_bytes())) {
            return Err(ApiError::Unauthorized("invalid credentials"));
        }
        admit(id, key, ip, now)
    }

    fn jwt(&self, token: &str, now: Timestamp) -> Result<Principal, ApiError> {
        const BAD: &str = "invalid or expired token";
        let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::Unauthorized(BAD))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.clone(),
            Algorithm::RS256 | Algorithm::ES256 => {
                let keys = self.jwks.read().unwrap_or_else(|p| p.into_inner());
                keys.iter().find(|k| k.alg == header.alg && (header.kid.is_none() || k.kid == header.kid)).cloned()
            }
            _ => None,
        }
        .ok_or(ApiError::Unauthorized(BAD))?;
        let mut validation = Validation::new(key.alg);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        validation.set_required_spec_claims(&["exp"]);
        // jsonwebtoken checks `exp`/`nbf` against the wall clock; they are checked against `now`
        // as well, with `iat`, so the decision is reproducible in tests.
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|_| ApiError::Unauthorized(BAD))?;
        if !times_hold(&data.claims, now, self.leeway_secs) {
            return Err(ApiError::Unauthorized(BAD));
        }
        let claims = data.claims;
        let role = claims
            .get(&self.role_claim)
            .and_then(serde_json::Value::as_str)
            .and_then(|r| Role::parse(r).ok())
            .ok_or(ApiError::Forbidden("the token carries no known role claim"))?;
        let sub = claims.get("sub").and_then(serde_json::Value::as_str).unwrap_or("-");
        Ok(Principal { subject: format!("jwt:{sub}"), role, key: None })
    }
}

/// `exp` (required) is not past, and `nbf` and `iat` (optional, but numbers when present) are
/// not in the future, each with `leeway` seconds of clock skew.
fn times_hold(claims: &serde_json::Value, now: Timestamp, leeway: u64) -> bool {
    let (now, leeway) = (now.0 as f64 / 1000.0, leeway as f64);
    let claim = |name: &str| claims.get(name).map(serde_json::Value::as_f64);
    let exp_ok = matches!(claim("exp"), Some(Some(exp)) if exp + leeway >= now);
    let not_future = |name: &str| match claim(name) {
        None => true,
        Some(Some(t)) => t - leeway <= now,
        Some(None) => false,
    };
    exp_ok && not_future("nbf") && not_future("iat")
}

fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.bytes().filter(|b| *b == b'.').count() == 2
}

fn key_by_secret(state: &AuthState, secret: &str, ip: IpAddr, now: Timestamp) -> Result<Principal, ApiError> {
    let digest = Sha256Digest::of(secret.as_bytes());
    let (id, key) = state.api_key_by_secret(&digest).ok_or(ApiError::Unauthorized("invalid API key"))?;
    if !key.secret_sha256.ct_eq(&digest) {
        return Err(ApiError::Unauthorized("invalid API key"));
    }
    admit(id, key, ip, now)
}

fn admit(id: &KeyId, key: &sluice_events::state::ApiKey, ip: IpAddr, now: Timestamp) -> Result<Principal, ApiError> {
    if key.revoked {
        return Err(ApiError::Unauthorized("the API key was revoked"));
    }
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(ApiError::Unauthorized("the API key has expired"));
    }
    if !cidrs_allow(&key.cidrs, ip) {
        return Err(ApiError::Forbidden("the API key may not be used from this address"));
    }
    Ok(Principal { subject: format!("key:{id}"), role: key.role, key: Some(id.clone()) })
}

impl FromRequestParts<ApiState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &ApiState) -> Result<Principal, ApiError> {
        // Already authenticated by the route's guard.
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let ip = ClientIp::of(parts);
        let cookie;
        let authorization = match parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            Some(a) => Some(a),
            // The console's session: the credential it was opened with, checked again here.
            None => {
                cookie = super::console::credential(api, parts)?;
                cookie.as_deref()
            }
        };
        let state = api.writer.projection().current();
        let now = now();
        let principal = api.auth.authenticate(authorization, &state, ip, now)?;
        if let Some(slot) = parts.extensions.get::<AuditSlot>() {
            slot.set(principal.subject.clone());
        }
        if let Some(key) = &principal.key {
            api.writer.projection().touch(key, now);
        }
        Ok(principal)
    }
}
