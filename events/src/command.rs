//! Control-plane commands as pure functions: `handle(&state, command, now)` validates against
//! the current state and returns the events to append, or a typed rejection. The shell
//! generates ids and secrets, appends, and retries on a version conflict.

use uuid::Uuid;

use crate::decision::DecisionRecord;
use crate::event::*;
use crate::ids::{Action, AppName, Cidr, KeyId, NodeId, Protocol, Role, StreamName, SubscriberId, Timestamp};
use crate::policy::{Policy, SecretKind};
use crate::secret::{Sealed, SealingKey, Sha256Digest};
use crate::state::{AuthState, TokenStatus, app_secret_purpose, subscriber_secret_purpose};

/// A secret sealed by the shell for a command, with what the core may know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSecret {
    sealed: Sealed,
    purpose: String,
    len: usize,
}

impl NewSecret {
    pub fn seal(key: &SealingKey, purpose: String, plaintext: &[u8], nonce: [u8; 24]) -> Self {
        NewSecret { sealed: key.seal(&purpose, plaintext, nonce), purpose, len: plaintext.len() }
    }

    pub fn for_app(key: &SealingKey, app: &AppName, kind: SecretKind, plaintext: &[u8], nonce: [u8; 24]) -> Self {
        Self::seal(key, app_secret_purpose(app, kind), plaintext, nonce)
    }

    pub fn for_subscriber(
        key: &SealingKey,
        app: &AppName,
        stream: &StreamName,
        id: &SubscriberId,
        plaintext: &[u8],
        nonce: [u8; 24],
    ) -> Self {
        Self::seal(key, subscriber_secret_purpose(app, stream, id), plaintext, nonce)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateApiKey {
        key_id: KeyId,
        name: String,
        role: Role,
        secret_sha256: Sha256Digest,
        cidrs: Vec<Cidr>,
        expires_at: Option<Timestamp>,
    },
    RevokeApiKey {
        key_id: KeyId,
    },
    CreateApp {
        app: AppName,
        policy: Policy,
    },
    SetPolicy {
        app: AppName,
        policy: Policy,
    },
    RotateAppSecret {
        app: AppName,
        kind: SecretKind,
        secret: NewSecret,
    },
    RemoveAppSecret {
        app: AppName,
        kind: SecretKind,
    },
    DeleteApp {
        app: AppName,
    },
    RegisterStream {
        app: AppName,
        name: StreamName,
        publish_name: Option<StreamName>,
        description: Option<String>,
    },
    /// Another player name for what a stream publishes (`plays`: its publish name, or the
    /// stream's own name when it has none).
    RegisterPlayer {
        app: AppName,
        name: StreamName,
        plays: StreamName,
        description: Option<String>,
    },
    UpdateStream {
        app: AppName,
        name: StreamName,
        publish_name: Option<StreamName>,
        description: Option<String>,
    },
    DeleteStream {
        app: AppName,
        name: StreamName,
    },
    IssueToken {
        app: AppName,
        stream: StreamName,
        action: Action,
        token_sha256: Sha256Digest,
        expires_at: Option<Timestamp>,
    },
    RevokeToken {
        token_sha256: Sha256Digest,
    },
    ConsumeToken {
        token_sha256: Sha256Digest,
        decision_id: Option<Uuid>,
        node: Option<NodeId>,
    },
    AddSubscriber {
        app: AppName,
        stream: StreamName,
        subscriber_id: SubscriberId,
        action: Option<Action>,
        secret: NewSecret,
    },
    RemoveSubscriber {
        app: AppName,
        stream: StreamName,
        subscriber_id: SubscriberId,
    },
    BlockSubscriber {
        app: AppName,
        stream: StreamName,
        subscriber_id: SubscriberId,
        until: Timestamp,
        /// Only this action is refused; `None`: both.
        action: Option<Action>,
    },
    /// Ends the live sessions of `stream` (of one action, from one address, when given).
    KickSessions {
        app: AppName,
        stream: StreamName,
        action: Option<Action>,
        client_ip: Option<std::net::IpAddr>,
    },
    UseTotpStep {
        app: AppName,
        stream: StreamName,
        subscriber_id: SubscriberId,
        step: u64,
    },
    RefreshJwks {
        app: AppName,
        jwks: serde_json::Value,
    },
    RegisterNode {
        node_id: NodeId,
        version: String,
        protocols: Vec<Protocol>,
    },
    RecordDecision {
        record: Box<DecisionRecord>,
    },
}

/// Why a command was refused. Kept apart from infrastructure failures, which the shell owns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{what} {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("invalid {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
}

fn not_found(what: &'static str, id: impl ToString) -> Rejection {
    Rejection::NotFound { what, id: id.to_string() }
}

fn exists(what: &'static str, id: impl ToString) -> Rejection {
    Rejection::AlreadyExists { what, id: id.to_string() }
}

fn invalid(field: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection::Invalid { field, detail: detail.into() }
}

const MAX_TEXT: usize = 1024;

fn check_text(field: &'static str, s: &Option<String>) -> Result<(), Rejection> {
    match s {
        Some(s) if s.len() > MAX_TEXT => Err(invalid(field, format!("at most {MAX_TEXT} bytes"))),
        Some(s) if s.chars().any(char::is_control) => Err(invalid(field, "control characters are not allowed")),
        _ => Ok(()),
    }
}

fn check_future(field: &'static str, t: Option<Timestamp>, now: Timestamp) -> Result<(), Rejection> {
    match t {
        Some(t) if t <= now => Err(invalid(field, "must be in the future")),
        _ => Ok(()),
    }
}

pub fn handle(state: &AuthState, command: Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
    let app_of = |app: &AppName| state.apps.get(app).ok_or_else(|| not_found("app", app));
    let one = |e: Event| Ok(vec![e]);
    match command {
        Command::CreateApiKey { key_id, name, role, secret_sha256, cidrs, expires_at } => {
            if state.api_keys.contains_key(&key_id) {
                return Err(exists("key", key_id));
            }
            if state.api_key_by_secret(&secret_sha256).is_some() {
                return Err(invalid("secret", "already used by another key"));
            }
            check_text("name", &Some(name.clone()))?;
            check_future("expires_at", expires_at, now)?;
            one(ApiKeyCreated { key_id, name, role, secret_sha256, cidrs, expires_at }.into())
        }
        Command::RevokeApiKey { key_id } => match state.api_keys.get(&key_id) {
            Some(k) if !k.revoked => one(ApiKeyRevoked { key_id }.into()),
            _ => Err(not_found("key", key_id)),
        },
        Command::CreateApp { app, policy } => {
            // One namespace whatever the case: `Studio` and `studio` would be told apart by
            // URLs and encoders that treat them as one.
            if let Some(existing) = state.apps.keys().find(|a| a.as_str().eq_ignore_ascii_case(app.as_str())) {
                return Err(exists("app", existing.clone()));
            }
            policy.validate().map_err(|e| invalid("policy", e.to_string()))?;
            one(AppCreated { app, policy }.into())
        }
        Command::SetPolicy { app, policy } => {
            app_of(&app)?;
            policy.validate().map_err(|e| invalid("policy", e.to_string()))?;
            one(AppPolicyChanged { app, policy }.into())
        }
        Command::RotateAppSecret { app, kind, secret } => {
            app_of(&app)?;
            if secret.purpose != app_secret_purpose(&app, kind) {
                return Err(invalid("secret", "sealed for a different app or kind"));
            }
            if secret.len < kind.min_len() || secret.len > kind.max_len() {
                return Err(invalid(
                    "secret",
                    format!(
                        "a {} secret needs at least {} bytes (at most {})",
                        kind.as_str(),
                        kind.min_len(),
                        kind.max_len()
                    ),
                ));
            }
            one(AppSecretRotated { app, kind, secret: secret.sealed }.into())
        }
        Command::RemoveAppSecret { app, kind } => {
            if !app_of(&app)?.secrets.contains_key(&kind) {
                return Err(Rejection::NotFound { what: "secret", id: kind.as_str().into() });
            }
            one(AppSecretRemoved { app, kind }.into())
        }
        Command::DeleteApp { app } => {
            app_of(&app)?;
            one(AppDeleted { app }.into())
        }
        Command::RegisterStream { app, name, publish_name, description } => {
            let a = app_of(&app)?;
            if a.streams.contains_key(&name) || a.publish_names.contains_key(&name) {
                return Err(exists("stream", &name));
            }
            check_publish_name(a, &name, publish_name.as_ref())?;
            check_text("description", &description)?;
            one(StreamRegistered { app, name, publish_name, description, plays: None }.into())
        }
        Command::RegisterPlayer { app, name, plays, description } => {
            let a = app_of(&app)?;
            if a.streams.contains_key(&name) || a.publish_names.contains_key(&name) {
                return Err(exists("stream", &name));
            }
            let publishes = a.publish_names.contains_key(&plays)
                || a.streams.get(&plays).is_some_and(|s| s.publish_name.is_none() && s.plays.is_none());
            if !publishes {
                return Err(not_found("publish name", &plays));
            }
            check_text("description", &description)?;
            one(StreamRegistered { app, name, publish_name: None, description, plays: Some(plays) }.into())
        }
        Command::UpdateStream { app, name, publish_name, description } => {
            let a = app_of(&app)?;
            let current = a.streams.get(&name).ok_or_else(|| not_found("stream", &name))?;
            if current.plays.is_some() && publish_name.is_some() {
                return Err(invalid("publish_name", "an extra player name has no publish name of its own"));
            }
            if current.publish_name != publish_name {
                check_publish_name(a, &name, publish_name.as_ref())?;
            }
            check_text("description", &description)?;
            one(StreamUpdated { app, name, publish_name, description }.into())
        }
        Command::DeleteStream { app, name } => {
            if !app_of(&app)?.streams.contains_key(&name) {
                return Err(not_found("stream", name));
            }
            one(StreamDeleted { app, name }.into())
        }
        Command::IssueToken { app, stream, action, token_sha256, expires_at } => {
            let a = app_of(&app)?;
            if !a.streams.contains_key(&stream) && !a.policy.for_action(action).accept_undefined_streams {
                return Err(not_found("stream", stream));
            }
            if state.tokens.contains_key(&token_sha256) {
                return Err(exists("token", token_id(&token_sha256)));
            }
            check_future("expires_at", expires_at, now)?;
            one(TokenIssued { token_sha256, app, stream, action, expires_at }.into())
        }
        Command::RevokeToken { token_sha256 } => match state.tokens.get(&token_sha256) {
            Some(t) if t.status != TokenStatus::Revoked => one(TokenRevoked { token_sha256 }.into()),
            _ => Err(not_found("token", token_id(&token_sha256))),
        },
        Command::ConsumeToken { token_sha256, decision_id, node } => match state.tokens.get(&token_sha256) {
            Some(t) if t.status == TokenStatus::Active => one(TokenConsumed { token_sha256, decision_id, node }.into()),
            // Re-delivered or raced: the token is already used up, nothing new to record.
            Some(_) => Ok(vec![]),
            None => Err(not_found("token", token_id(&token_sha256))),
        },
        Command::AddSubscriber { app, stream, subscriber_id, action, secret } => {
            let a = app_of(&app)?;
            if a.subscribers.contains_key(&(stream.clone(), subscriber_id.clone())) {
                return Err(exists("subscriber", &subscriber_id));
            }
            if secret.purpose != subscriber_secret_purpose(&app, &stream, &subscriber_id) {
                return Err(invalid("secret", "sealed for a different subscriber"));
            }
            // RFC 4226 asks for at least 128 bits; totp-rs refuses less.
            if secret.len < 16 {
                return Err(invalid("secret", "a TOTP secret needs at least 16 bytes"));
            }
            one(SubscriberAdded { app, stream, subscriber_id, action, secret: secret.sealed }.into())
        }
        Command::RemoveSubscriber { app, stream, subscriber_id } => {
            if !app_of(&app)?.subscribers.contains_key(&(stream.clone(), subscriber_id.clone())) {
                return Err(not_found("subscriber", subscriber_id));
            }
            one(SubscriberRemoved { app, stream, subscriber_id }.into())
        }
        Command::BlockSubscriber { app, stream, subscriber_id, until, action } => {
            if !app_of(&app)?.subscribers.contains_key(&(stream.clone(), subscriber_id.clone())) {
                return Err(not_found("subscriber", subscriber_id));
            }
            one(SubscriberBlocked { app, stream, subscriber_id, until, action }.into())
        }
        Command::KickSessions { app, stream, action, client_ip } => {
            app_of(&app)?;
            one(SessionsKicked { app, stream, action, client_ip }.into())
        }
        Command::UseTotpStep { app, stream, subscriber_id, step } => {
            let a = app_of(&app)?;
            let sub = a
                .subscribers
                .get(&(stream.clone(), subscriber_id.clone()))
                .ok_or_else(|| not_found("subscriber", &subscriber_id))?;
            if sub.last_step.is_some_and(|last| step <= last) {
                return Ok(vec![]);
            }
            one(TotpStepUsed { app, stream, subscriber_id, step }.into())
        }
        Command::RefreshJwks { app, jwks } => {
            app_of(&app)?;
            check_jwks(&jwks)?;
            if state.apps.get(&app).and_then(|a| a.jwks.as_ref()).is_some_and(|j| j.raw == jwks) {
                return Ok(vec![]);
            }
            one(JwksRefreshed { app, jwks }.into())
        }
        Command::RegisterNode { node_id, version, protocols } => {
            if state.nodes.get(&node_id).is_some_and(|n| n.version == version && n.protocols == protocols) {
                return Ok(vec![]);
            }
            one(NodeRegistered { node_id, version, protocols }.into())
        }
        Command::RecordDecision { record } => one(AccessDecided { decision: *record }.into()),
    }
}

/// A publish name must differ from the public name and from every other name in the app.
fn check_publish_name(
    app: &crate::state::App,
    name: &StreamName,
    publish: Option<&StreamName>,
) -> Result<(), Rejection> {
    let Some(p) = publish else { return Ok(()) };
    if p == name {
        return Err(invalid("publish_name", "must differ from the stream name"));
    }
    if app.streams.contains_key(p) || app.publish_names.contains_key(p) {
        return Err(exists("stream or publish name", p));
    }
    Ok(())
}

/// A JWK set with public keys only: members that belong to private keys are refused so a
/// private key can never reach the log.
fn check_jwks(jwks: &serde_json::Value) -> Result<(), Rejection> {
    let keys = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| invalid("jwks", "expected an object with a `keys` array"))?;
    for key in keys {
        let obj = key.as_object().ok_or_else(|| invalid("jwks", "every key must be an object"))?;
        if ["d", "p", "q", "dp", "dq", "qi", "k"].iter().any(|m| obj.contains_key(*m)) {
            return Err(invalid("jwks", "contains private or symmetric key material"));
        }
    }
    Ok(())
}
