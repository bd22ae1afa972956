//! Hooks for the media servers operators already run (issue #22): the worker answers their
//! "may this client publish / play?" calls through the same admission step as its own RTMP
//! and SRT (`admit::Admission`): same methods, one-time claims, webhook, spool and audit, and a
//! session registered for kick on change.
//!
//! Served on `SLUICE_HOOKS_LISTEN` (default `127.0.0.1:9936`) when `SLUICE_HOOKS_SECRET` is
//! set, at `/hooks/<server>/<secret>`: the secret is in the path because nginx-rtmp cannot send
//! a header, and callers must come from `SLUICE_HOOKS_ALLOWED` (default loopback):
//! nginx-rtmp (`nginx.rs`), SRS's `http_hooks` (`srs.rs`), MediaMTX's `authHTTPAddress`
//! (`mediamtx.rs`).
//!
//! Sessions admitted through a hook are kept per (media server address, server kind, client
//! id, action). A session ended by a change in the log (its token revoked, its stream deleted,
//! a kick) is revoked: the worker calls the media server's API to drop the client where that
//! API is configured (SRS `DELETE /api/v1/clients/{id}`, MediaMTX `POST /v3/…/kick/{id}`), and
//! answers the server's next re-check with a refusal (nginx-rtmp's `on_update`). The server's
//! own end-of-session call forgets it; MediaMTX has none, so its sessions are forgotten when
//! its API no longer lists them. Dropping the session releases what it held (the publisher
//! slot).

pub mod mediamtx;
pub mod nginx;
pub mod srs;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sluice_events::{AccessRequest, Action, Cidr, DecisionRecord, Reason, SecretString};
use tokio::sync::oneshot;

use crate::admit::{Admission, Refusal};

/// The largest hook body read (nginx-rtmp's whole form is a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;

/// One media server's client, as its hooks name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The media server's address (the hook's caller).
    pub server: IpAddr,
    pub kind: &'static str,
    pub client_id: String,
    pub action: Action,
}

#[derive(Debug)]
struct Held {
    /// Set when the session ended by a change in the log, with its reason.
    revoked: Arc<Mutex<Option<Reason>>>,
    /// Dropped: the task holding the admitted session ends and releases it.
    _release: oneshot::Sender<()>,
}

type Sessions = Arc<Mutex<HashMap<ClientKey, Held>>>;

/// How a revoked session is ended in its media server: `method` on the first of `urls` that
/// answers 2xx (MediaMTX names a connection by its protocol's list, TLS or not).
#[derive(Debug, Clone)]
pub struct Kick {
    pub method: reqwest::Method,
    pub urls: Vec<String>,
}

/// How the worker learns that a session ended in a media server that does not say so: a GET of
/// any of `urls` answering 404 means it is gone.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub urls: Vec<String>,
}

/// What a hook adds to an admission.
#[derive(Debug, Default)]
pub struct Hold {
    /// Ends the session in the media server when the log revokes it.
    pub kick: Option<Kick>,
    /// Polled to forget a session the media server ended.
    pub liveness: Option<Liveness>,
    /// Keep the stream's publisher slot while the session lives (false: the media server
    /// enforces one publisher itself and never says when one ends).
    pub hold_slot: bool,
}

/// Where the media servers' APIs are, for kicks (`SLUICE_HOOKS_SRS_API`,
/// `SLUICE_HOOKS_MEDIAMTX_API`).
#[derive(Debug, Clone, Default)]
pub struct Apis {
    pub srs: Option<String>,
    pub mediamtx: Option<String>,
}

/// The hooks' state: the admission step, the credential, and the admitted sessions.
#[derive(Debug)]
pub struct Hooks {
    admission: Admission,
    secret: SecretString,
    allowed: Vec<Cidr>,
    sessions: Sessions,
    pub apis: Apis,
    http: reqwest::Client,
}

/// How often a session without an end call is looked up in its media server's API.
const LIVENESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What a hook's admission answered.
#[derive(Debug)]
pub enum Answer {
    Allowed(Box<DecisionRecord>),
    Refused(Box<DecisionRecord>),
    /// No decision could be made (no state yet, the spool refuses).
    Unavailable(String),
}

impl From<Refusal> for Answer {
    fn from(refusal: Refusal) -> Answer {
        match refusal {
            Refusal::Refused(record) => Answer::Refused(record),
            Refusal::Unavailable(e) => Answer::Unavailable(e),
        }
    }
}

/// What the registry knows of a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Admitted and still allowed.
    Allowed,
    /// Ended by a change in the log.
    Revoked(Reason),
    /// Not admitted through this worker's hooks (or forgotten: the worker restarted).
    Unknown,
}

impl Hooks {
    pub fn new(admission: Admission, secret: SecretString, allowed: Vec<Cidr>, apis: Apis) -> Arc<Hooks> {
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().unwrap_or_default();
        Arc::new(Hooks { admission, secret, allowed, sessions: Arc::default(), apis, http })
    }

    /// The caller's address and the path's secret, checked before anything is read.
    pub fn check(&self, peer: IpAddr, secret: &str) -> Result<(), HookError> {
        if !self.allowed.iter().any(|c| c.contains(peer)) {
            return Err(HookError::new(
                StatusCode::FORBIDDEN,
                "this address may not call the hooks (SLUICE_HOOKS_ALLOWED)",
            ));
        }
        if !sluice_events::secret::ct_eq(secret.as_bytes(), self.secret.expose().as_bytes()) {
            return Err(HookError::new(StatusCode::FORBIDDEN, "wrong hook secret"));
        }
        Ok(())
    }

    /// Decides `req` for `client` and, when admitted, holds the session until `done` (or
    /// until `hold.liveness` says the media server ended it).
    pub async fn admit(&self, client: ClientKey, req: AccessRequest, hold: Hold) -> Answer {
        // The media server knows whether the stream is live; a play is not refused here for it.
        match self.admission.admit(req, true).await {
            Ok(mut admitted) => {
                let record = Box::new(admitted.record.clone());
                if !hold.hold_slot {
                    admitted.publishing = None;
                }
                let revoked = Arc::new(Mutex::new(None));
                let (release, released) = oneshot::channel::<()>();
                let (mark, http, sessions, key) =
                    (revoked.clone(), self.http.clone(), self.sessions.clone(), client.clone());
                tokio::spawn(async move {
                    let mut released = released;
                    let mut every = tokio::time::interval(LIVENESS_EVERY);
                    every.tick().await;
                    loop {
                        tokio::select! {
                            reason = admitted.session.ended() => {
                                *mark.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                                if let Some(kick) = &hold.kick {
                                    kick_session(&http, kick, &key, reason).await;
                                }
                                break;
                            }
                            _ = &mut released => break,
                            _ = every.tick(), if hold.liveness.is_some() => {
                                if let Some(live) = &hold.liveness && gone(&http, live).await {
                                    sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                                    break;
                                }
                            }
                        }
                    }
                    drop(admitted);
                });
                let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                sessions.insert(client, Held { revoked, _release: release });
                Answer::Allowed(record)
            }
            Err(refusal) => refusal.into(),
        }
    }

    /// Decides `req` and holds nothing: a session the media server cannot be asked about.
    pub async fn decide_only(&self, req: AccessRequest) -> Answer {
        match self.admission.admit(req, true).await {
            Ok(admitted) => Answer::Allowed(Box::new(admitted.record.clone())),
            Err(refusal) => refusal.into(),
        }
    }

    /// Whether `client`'s session is still allowed.
    pub fn standing(&self, client: &ClientKey) -> Standing {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(client) {
            None => Standing::Unknown,
            Some(held) => match *held.revoked.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(reason) => Standing::Revoked(reason),
                None => Standing::Allowed,
            },
        }
    }

    /// The media server says the session ended: forget it (and release what it held).
    pub fn done(&self, client: &ClientKey) -> bool {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(client).is_some()
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ends a revoked session in its media server: the first URL that answers 2xx.
async fn kick_session(http: &reqwest::Client, kick: &Kick, key: &ClientKey, reason: Reason) {
    for url in &kick.urls {
        match http.request(kick.method.clone(), url).send().await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(kind = key.kind, client = %key.client_id, reason = reason.as_str(), "revoked session kicked in its media server");
                return;
            }
            Ok(r) => tracing::debug!(%url, status = %r.status(), "kick not taken"),
            Err(e) => tracing::warn!(kind = key.kind, error = %e, "the media server's API did not answer the kick"),
        }
    }
    tracing::warn!(kind = key.kind, client = %key.client_id, "no kick URL took the revoked session; it ends when the media server asks again");
}

/// Whether every liveness URL answers 404 (the media server no longer has the session).
async fn gone(http: &reqwest::Client, live: &Liveness) -> bool {
    let mut gone = !live.urls.is_empty();
    for url in &live.urls {
        match http.get(url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {}
            _ => gone = false,
        }
    }
    gone
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

/// `POST /hooks/{server}/{secret}`: the caller's address and the path's secret first, then the
/// body in that media server's format, decided and answered as it expects.
async fn hook(
    axum::extract::State(hooks): axum::extract::State<Arc<Hooks>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    axum::extract::Path((server, secret)): axum::extract::Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (hooks, peer) = (&*hooks, peer.ip());
    let answer = async {
        hooks.check(peer, &secret)?;
        match server.as_str() {
            nginx::KIND => {
                content_type(&headers, FORM, "nginx-rtmp's notify")?;
                nginx::answer(hooks, peer, &nginx::parse(&body)?).await
            }
            srs::KIND => {
                content_type(&headers, JSON, "SRS's http_hooks")?;
                srs::answer(hooks, peer, srs::parse(&body)?).await
            }
            mediamtx::KIND => {
                content_type(&headers, JSON, "MediaMTX's authHTTPAddress")?;
                mediamtx::answer(hooks, peer, mediamtx::parse(&body)?).await
            }
            _ => Err(HookError::new(StatusCode::NOT_FOUND, "no such hook: nginx-rtmp, srs or mediamtx")),
        }
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

/// The body's content type is `expected` (`what` names the format in the refusal).
fn content_type(headers: &axum::http::HeaderMap, expected: &str, what: &str) -> Result<(), HookError> {
    let sent = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if sent.starts_with(expected) {
        Ok(())
    } else {
        Err(HookError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("expected {expected} ({what})")))
    }
}

/// A plain-text refusal (what a media server logs).
pub fn refuse(status: StatusCode, detail: &str) -> Response {
    HookError::new(status, detail).into_response()
}

/// A hook request refused before or without a decision: its status and what it says.
#[derive(Debug)]
pub struct HookError {
    pub status: StatusCode,
    pub detail: String,
}

impl HookError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> HookError {
        HookError { status, detail: detail.into() }
    }
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        let text = format!("{}\n", self.detail);
        (self.status, [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
    }
}

/// The hooks' router.
pub fn router(hooks: Arc<Hooks>) -> Router {
    Router::new()
        .route("/hooks/{server}/{secret}", axum::routing::post(hook))
        .with_state(hooks)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

/// Serves the hooks on `listen` until the process ends.
pub async fn serve(tasks: &crate::task::Tasks, listen: SocketAddr, hooks: Arc<Hooks>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "media server hooks serving (nginx-rtmp, SRS, MediaMTX)");
    tasks.spawn("hooks listener", async move {
        let app = router(hooks).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the hooks listener stopped");
        }
    });
    Ok(())
}
