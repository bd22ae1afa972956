//! Hooks for the media servers operators already run (issue #22): the worker answers their
//! "may this client publish / play?" calls through the same admission step as its own RTMP
//! and SRT (`admit::Admission`): same methods, one-time claims, webhook, spool and audit, and a
//! session registered for kick on change.
//!
//! Served on `SLUICE_HOOKS_LISTEN` (default `127.0.0.1:9936`) when `SLUICE_HOOKS_SECRET` is
//! set, at `/hooks/<server>/<secret>`: the secret is in the path because nginx-rtmp cannot send
//! a header, and callers must come from `SLUICE_HOOKS_ALLOWED` (default loopback). Today:
//! nginx-rtmp (`nginx.rs`).
//!
//! Sessions admitted through a hook are kept per (media server address, server kind, client
//! id, action). A session ended by a change in the log (its token revoked, its stream deleted,
//! a kick) is remembered as revoked until the media server asks again (nginx-rtmp's
//! `on_update`), which is then refused, so the media server drops the client; its `done`
//! call forgets it. Dropping the session releases what it held (the publisher slot).

pub mod nginx;

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

/// The hooks' state: the admission step, the credential, and the admitted sessions.
#[derive(Debug)]
pub struct Hooks {
    admission: Admission,
    secret: SecretString,
    allowed: Vec<Cidr>,
    sessions: Mutex<HashMap<ClientKey, Held>>,
}

/// What a hook's admission answered.
#[derive(Debug)]
pub enum Answer {
    Allowed(Box<DecisionRecord>),
    Refused(Box<DecisionRecord>),
    /// No decision could be made (no state yet, the spool refuses).
    Unavailable(String),
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
    pub fn new(admission: Admission, secret: SecretString, allowed: Vec<Cidr>) -> Arc<Hooks> {
        Arc::new(Hooks { admission, secret, allowed, sessions: Mutex::default() })
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

    /// Decides `req` for `client` and, when admitted, holds the session until `done`.
    pub async fn admit(&self, client: ClientKey, req: AccessRequest) -> Answer {
        // The media server knows whether the stream is live; a play is not refused here for it.
        match self.admission.admit(req, true).await {
            Ok(mut admitted) => {
                let record = Box::new(admitted.record.clone());
                let revoked = Arc::new(Mutex::new(None));
                let (release, released) = oneshot::channel::<()>();
                let mark = revoked.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        reason = admitted.session.ended() => {
                            *mark.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                        }
                        _ = released => {}
                    }
                    drop(admitted);
                });
                let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                sessions.insert(client, Held { revoked, _release: release });
                Answer::Allowed(record)
            }
            Err(Refusal::Refused(record)) => Answer::Refused(record),
            Err(Refusal::Unavailable(e)) => Answer::Unavailable(e),
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
        .route("/hooks/nginx-rtmp/{secret}", axum::routing::post(nginx::hook))
        .with_state(hooks)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

/// Serves the hooks on `listen` until the process ends.
pub async fn serve(tasks: &crate::task::Tasks, listen: SocketAddr, hooks: Arc<Hooks>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "media server hooks serving (nginx-rtmp)");
    tasks.spawn("hooks listener", async move {
        let app = router(hooks).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the hooks listener stopped");
        }
    });
    Ok(())
}
