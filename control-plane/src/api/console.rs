//! The operators' console at `/console`: a single page (HTML, JavaScript and CSS compiled into
//! the binary from `control-plane/console/`) that drives the same REST API as every other
//! client, with the same roles and audit.
//!
//! Signing in exchanges a credential (an API key, an API JWT, or the static admin's user and
//! password) for a session cookie. The cookie is the credential sealed with the node's
//! sealing key (XChaCha20-Poly1305, its own purpose), with a CSRF token and an expiry: any
//! control plane holding the key opens it, nothing is kept in memory, and the credential is
//! checked again on every request, so a revoked key ends its sessions at once. The cookie is
//! `HttpOnly`, `SameSite=Strict` and `Secure` under TLS; a request it authenticates that
//! changes anything must carry the CSRF token in `X-CSRF-Token` as well. The credential never
//! reaches a URL, the page's storage or a log.

use axum::Json;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::{Keyring, Role, Sealed};

use super::auth::Principal;
use super::body::StrictJson;
use super::error::ApiError;
use super::{ApiState, ClientIp, now, random};

/// The session cookie's name.
pub const COOKIE: &str = "sluice_console";
/// The header a cookie-authenticated write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// What the sealed cookie is bound to.
const PURPOSE: &str = "console-session";
/// How long a session lasts.
const SESSION_SECS: i64 = 12 * 3600;

/// The strict policy of every console response: only this origin's script, style and API.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/app.css");

/// `POST /console/session`: an API key or JWT (`key`), or the static admin's `user` and
/// `password`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub key: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Who the session is, and the token its writes carry in `X-CSRF-Token`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Session {
    pub subject: String,
    pub role: Role,
    pub csrf: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Where clients reach the workers (`SLUICE_PUBLIC_RTMP_URL`, `SLUICE_PUBLIC_SRT_URL`): the
    /// console builds publish and play URLs from them.
    pub public_rtmp_url: String,
    pub public_srt_url: String,
}

/// What the cookie seals.
#[derive(Serialize, Deserialize)]
struct Sealed1 {
    /// The `Authorization` value the credential stands for.
    a: String,
    /// The CSRF token.
    x: String,
    /// Expiry, Unix seconds.
    e: i64,
}

fn keyring(api: &ApiState) -> Keyring {
    Keyring::new((*api.sealing).clone())
}

fn encode(sealed: &Sealed) -> String {
    format!("{}.{}.{}", sealed.kid, sealed.nonce, sealed.ct)
}

fn decode(text: &str) -> Option<Sealed> {
    let mut parts = text.splitn(3, '.');
    let (kid, nonce, ct) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Sealed { kid: kid.to_owned(), nonce: nonce.to_owned(), ct: ct.to_owned() })
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn open(api: &ApiState, headers: &HeaderMap) -> Result<Option<Sealed1>, ApiError> {
    const EXPIRED: &str = "the console session has expired or is not valid; sign in again";
    let Some(value) = cookie_value(headers) else { return Ok(None) };
    let sealed = decode(value).ok_or(ApiError::Unauthorized(EXPIRED))?;
    let plain = keyring(api).open(&sealed, PURPOSE).map_err(|_| ApiError::Unauthorized(EXPIRED))?;
    let session: Sealed1 = serde_json::from_slice(&plain).map_err(|_| ApiError::Unauthorized(EXPIRED))?;
    if session.e <= now().0 / 1000 {
        return Err(ApiError::Unauthorized(EXPIRED));
    }
    Ok(Some(session))
}

/// The `Authorization` value a request's console cookie stands for, when it has one. A
/// method that may change something needs the session's CSRF token in `X-CSRF-Token`.
pub fn credential(api: &ApiState, parts: &Parts) -> Result<Option<String>, ApiError> {
    let Some(session) = open(api, &parts.headers)? else { return Ok(None) };
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !sluice_events::secret::ct_eq(sent.as_bytes(), session.x.as_bytes()) {
            return Err(ApiError::Forbidden("missing or wrong X-CSRF-Token for a console session"));
        }
    }
    Ok(Some(session.a))
}

fn set_cookie(api: &ApiState, value: &str, max_age: i64) -> HeaderValue {
    let secure = if api.console_secure { "; Secure" } else { "" };
    let text = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    // The value is base64 and dots, the rest fixed ASCII.
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("sluice_console=; Max-Age=0"))
}

fn session(api: &ApiState, principal: Principal, csrf: String, expires_at: i64) -> Session {
    Session {
        subject: principal.subject,
        role: principal.role,
        csrf,
        expires_at,
        public_rtmp_url: api.settings.public_rtmp_url.clone(),
        public_srt_url: api.settings.public_srt_url.clone(),
    }
}

/// `POST /console/session`: checks the credential as the API would and answers the session.
pub(super) async fn sign_in(
    State(api): State<ApiState>,
    parts: Parts,
    StrictJson(req): StrictJson<SignIn>,
) -> Result<Response, ApiError> {
    let authorization = match (req.key, req.user, req.password) {
        (Some(key), None, None) if !key.trim().is_empty() => format!("Bearer {}", key.trim()),
        (None, Some(user), Some(password)) => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}").as_bytes())
        ),
        _ => return Err(ApiError::BadRequest("give either `key`, or `user` and `password`".into())),
    };
    let state = api.writer.projection().current();
    let now = now();
    let principal = api.auth.authenticate(Some(&authorization), &state, ClientIp::of(&parts), now)?;
    if let Some(slot) = parts.extensions.get::<super::AuditSlot>() {
        slot.set(principal.subject.clone());
    }
    let csrf = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::<24>());
    let expires_at = now.0 / 1000 + SESSION_SECS;
    let plain = serde_json::to_vec(&Sealed1 { a: authorization, x: csrf.clone(), e: expires_at })
        .map_err(|_| ApiError::Internal)?;
    let sealed = api.sealing.seal(PURPOSE, &plain, random::<24>());
    let mut response = (StatusCode::CREATED, Json(session(&api, principal, csrf, expires_at))).into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&api, &encode(&sealed), SESSION_SECS));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /console/session`: who the cookie (or the `Authorization` header) is.
pub(super) async fn current(State(api): State<ApiState>, principal: Principal, parts: Parts) -> Response {
    let (csrf, expires_at) = match open(&api, &parts.headers) {
        Ok(Some(s)) => (s.x, s.e),
        _ => (String::new(), 0),
    };
    let mut response = Json(session(&api, principal, csrf, expires_at)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `DELETE /console/session`: the browser forgets the cookie.
pub(super) async fn sign_out(State(api): State<ApiState>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&api, "", 0));
    response
}

/// `POST /console/qr`: a QR code of `text` (a TOTP provisioning URI) as SVG, drawn here so the
/// page loads no third-party code.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QrRequest {
    /// At most 1024 characters.
    pub text: String,
}

pub(super) async fn qr(StrictJson(req): StrictJson<QrRequest>) -> Result<Response, ApiError> {
    if req.text.is_empty() || req.text.len() > 1024 {
        return Err(ApiError::invalid("text", "1 to 1024 characters"));
    }
    let code =
        qrcode::QrCode::new(req.text.as_bytes()).map_err(|_| ApiError::invalid("text", "too long for a QR code"))?;
    let svg = code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "no-store")], svg).into_response())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page and its two files.
pub fn assets() -> axum::Router<ApiState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/console", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/console/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}
