//! `AuthState`: the fold of the log that both planes decide from. `apply` is total (it never
//! panics on any event), idempotent per position, and reports gaps.

pub mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hmac::{Hmac, KeyInit};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::{Digest, Sha256};

use crate::event::{Event, RecordedEvent};
use crate::ids::{Action, AppName, Cidr, KeyId, NodeId, Position, Protocol, Role, StreamName, SubscriberId, Timestamp};
use crate::policy::{Policy, SecretKind, TotpSettings};
use crate::secret::{Keyring, Sealed, Sha256Digest};

/// Where the purpose string of a sealed app secret comes from; binding it stops a sealed
/// value from being replayed into another app or field.
pub fn app_secret_purpose(app: &AppName, kind: SecretKind) -> String {
    format!("app/{app}/{}", kind.as_str())
}

pub fn subscriber_secret_purpose(app: &AppName, stream: &StreamName, id: &SubscriberId) -> String {
    format!("subscriber/{app}/{stream}/{id}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub role: Role,
    pub secret_sha256: Sha256Digest,
    pub cidrs: Vec<Cidr>,
    pub expires_at: Option<Timestamp>,
    pub revoked: bool,
    /// When the key's `ApiKeyCreated` was recorded.
    pub created_at: Timestamp,
}

/// Something derived from an opened secret. `Debug` never shows it, so a state can be
/// printed without leaking what it holds.
#[derive(Clone)]
pub struct Opened<T>(pub(crate) T);

impl<T> std::fmt::Debug for Opened<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<opened secret>")
    }
}

/// A sealed secret and, when this node holds the key, what decisions need from it, prepared
/// once here rather than per request: the HMAC-SHA256 state keyed with it (hash/HMAC methods
/// and HS256 JWTs) and its raw bytes.
#[derive(Debug, Clone)]
pub struct AppSecret {
    pub sealed: Sealed,
    pub(crate) plain: Option<Opened<Arc<[u8]>>>,
    pub(crate) mac: Option<Opened<Hmac<Sha256>>>,
}

/// A public key from a JWK set, with the one algorithm it may verify.
#[derive(Debug, Clone)]
pub struct JwkKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

#[derive(Debug, Clone)]
pub struct Jwks {
    pub raw: serde_json::Value,
    pub(crate) keys: Vec<JwkKey>,
}

impl Jwks {
    /// How many of the set's keys are usable (RSA or EC P-256/P-384 with a `kid`).
    pub fn usable(&self) -> usize {
        self.keys.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub publish_name: Option<StreamName>,
    pub description: Option<String>,
    /// An extra player name: plays what is published under this name (`StreamRegistered`).
    pub plays: Option<StreamName>,
}

#[derive(Debug, Clone)]
pub struct Subscriber {
    pub action: Option<Action>,
    pub secret: Sealed,
    pub(crate) plain: Option<Opened<Arc<[u8]>>>,
    /// The TOTP key for the app's current period and digits.
    pub(crate) totp: Option<Opened<Arc<TotpKey>>>,
    pub blocked_until: Option<Timestamp>,
    /// The action `blocked_until` refuses; `None`: both.
    pub blocked_action: Option<Action>,
    /// The last TOTP step accepted: a code at or before it is a replay.
    pub last_step: Option<u64>,
}

impl Subscriber {
    /// The code for TOTP `step`, zero-padded to the app's digits; `None` when this node cannot
    /// open the secret (Ant Media's `/subscribers/{sid}/totp` helper).
    pub fn code_at(&self, step: u64) -> Option<String> {
        let key = &self.totp.as_ref()?.0;
        Some(format!("{:0width$}", key.code(step), width = key.digits))
    }
}

/// Derived state is built here, once: the fold (`AuthState::apply`) and the snapshot decoder
/// (`snapshot::decode`) both construct apps, secrets, subscribers and JWKS through these, so a
/// booted worker precomputes exactly what a folded one does.
impl AuthState {
    /// An app secret with what checks need from it: its opened bytes and HMAC-SHA256 state,
    /// when this node holds the key.
    pub(crate) fn app_secret(&self, app: &AppName, kind: SecretKind, sealed: Sealed) -> AppSecret {
        let plain = self.open(&sealed, &app_secret_purpose(app, kind));
        let mac = plain.as_ref().and_then(|p| <Hmac<Sha256> as KeyInit>::new_from_slice(&p.0).ok()).map(Opened);
        AppSecret { sealed, plain, mac }
    }

    /// A subscriber with its opened secret and the TOTP key for `settings`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn subscriber(
        &self,
        (app, stream, id): (&AppName, &StreamName, &SubscriberId),
        settings: TotpSettings,
        action: Option<Action>,
        secret: Sealed,
        (blocked_until, blocked_action): (Option<Timestamp>, Option<Action>),
        last_step: Option<u64>,
    ) -> Subscriber {
        let plain = self.open(&secret, &subscriber_secret_purpose(app, stream, id));
        let totp = build_totp(plain.as_ref(), settings);
        Subscriber { action, secret, plain, totp, blocked_until, blocked_action, last_step }
    }
}

impl Jwks {
    /// A JWK set and the keys in it that this build can verify with.
    pub(crate) fn from_raw(raw: serde_json::Value) -> Jwks {
        Jwks { keys: jwks_keys(&raw), raw }
    }
}

impl App {
    /// A new app with `policy` and nothing else yet.
    pub(crate) fn new(policy: Policy) -> App {
        App {
            policy,
            secrets: BTreeMap::new(),
            jwks: None,
            streams: BTreeMap::new(),
            publish_names: HashMap::new(),
            subscribers: BTreeMap::new(),
        }
    }

    /// Registers a stream and its publish name.
    /// After the stream publishing under `published` is deleted, its first other player name
    /// (by name) takes the publish name over, so the publisher and every other player keep
    /// working: SRT Live Server deletes one player id, not the publisher. Deterministic, so
    /// every node folds the same. Nothing to do when the deleted stream was itself an extra
    /// player.
    fn promote_player(&mut self, published: &StreamName, was_player: bool) {
        if was_player {
            return;
        }
        let Some(heir) = self.streams.iter().find(|(_, s)| s.plays.as_ref() == Some(published)).map(|(n, _)| n.clone())
        else {
            return;
        };
        if let Some(s) = self.streams.get_mut(&heir) {
            s.plays = None;
            s.publish_name = Some(published.clone());
        }
        self.publish_names.insert(published.clone(), heir);
    }

    pub(crate) fn add_stream(
        &mut self,
        name: StreamName,
        publish_name: Option<StreamName>,
        description: Option<String>,
        plays: Option<StreamName>,
    ) {
        if let Some(p) = &publish_name {
            self.publish_names.insert(p.clone(), name.clone());
        }
        self.streams.insert(name, Stream { publish_name, description, plays });
    }

    /// The opened bytes of an app secret, when this node holds the sealing key (the control
    /// plane mints JWTs and hash tokens with them).
    pub fn secret_bytes(&self, kind: SecretKind) -> Option<&[u8]> {
        self.secrets.get(&kind)?.plain.as_ref().map(|o| &*o.0)
    }
}

#[derive(Debug, Clone)]
pub struct App {
    pub policy: Policy,
    pub secrets: BTreeMap<SecretKind, AppSecret>,
    pub jwks: Option<Jwks>,
    pub streams: BTreeMap<StreamName, Stream>,
    /// publish name → public name.
    pub publish_names: HashMap<StreamName, StreamName>,
    pub subscribers: BTreeMap<(StreamName, SubscriberId), Subscriber>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Active,
    Consumed,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub app: AppName,
    pub stream: StreamName,
    pub action: Action,
    pub expires_at: Option<Timestamp>,
    pub status: TokenStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub version: String,
    pub protocols: Vec<Protocol>,
}

/// Hashes a SHA-256 digest by its first 8 bytes. The keys are digests of secrets, uniformly
/// distributed and not choosable by a client (finding inputs whose digests collide in a bucket
/// is a preimage search), so SipHash's flooding protection buys nothing here.
#[derive(Debug, Clone, Copy, Default)]
pub struct DigestHasher;

impl std::hash::BuildHasher for DigestHasher {
    type Hasher = PrefixHasher;
    fn build_hasher(&self) -> PrefixHasher {
        PrefixHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `Sha256Digest` hashes as its 32-byte array; fold any other input so the hasher
        // stays correct (if slower) for it.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
            if bytes.len() == 32 {
                break;
            }
        }
    }
    fn write_usize(&mut self, _len: usize) {
        // The array length prefix carries no information.
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Why an event was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("log gap: state is at position {at}, next event is at {got} (events were missed)")]
    Gap { at: Position, got: Position },
    #[error("only a data-plane state can skip events (a control-plane state keeps API keys)")]
    NotDataPlane,
}

/// For a holder that publishes a new `Arc<AuthState>` per burst of events while readers keep
/// the one they took: the state published before the current one, and the events it lacks
/// (the burst that made the current one). Once no reader holds it any more, the next burst
/// starts from it caught up by those events, instead of from a copy of the current state. A
/// copy costs every map of the state, which grows with the log; copying per burst made
/// registering streams quadratic. The price is a second copy of the state kept resident.
#[derive(Debug, Default)]
pub struct Spare {
    state: Option<Arc<AuthState>>,
    behind: Vec<RecordedEvent>,
}

impl Spare {
    /// A state of its own equal to `current`: the spare caught up, or (the first time, or
    /// while a reader still holds the spare) a copy.
    pub fn take(&mut self, current: &AuthState) -> AuthState {
        let behind = std::mem::take(&mut self.behind);
        match self.state.take().map(Arc::try_unwrap) {
            Some(Ok(mut state)) => {
                for e in &behind {
                    // These events were applied to the published state already, with the
                    // same outcome; any error was reported then. A worker receives only the
                    // events that reach workers: what lies between was skipped the same way.
                    if state.data_plane {
                        let _ = state.skip_to(Position(e.position.0.saturating_sub(1)));
                    }
                    let _ = state.apply(e);
                }
                if state.data_plane {
                    let _ = state.skip_to(current.position);
                }
                state
            }
            _ => current.clone(),
        }
    }

    /// `previous` was just replaced by a state that is it plus `applied`.
    pub fn keep(&mut self, previous: Arc<AuthState>, applied: Vec<RecordedEvent>) {
        self.state = Some(previous);
        self.behind = applied;
    }
}

/// The access tables at one log position.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    position: Position,
    keyring: Option<Arc<Keyring>>,
    /// A worker's state: API keys are control-plane business and never folded in here.
    data_plane: bool,
    /// The position of the last event that changed what a worker holds (see
    /// `Event::changes_access_tables`); `access_digest()` is the same at every position from
    /// here to `position`.
    tables_position: Position,
    pub api_keys: BTreeMap<KeyId, ApiKey>,
    /// Secret digest → key id, for `Authorization: Bearer <key>`.
    api_key_ids: HashMap<Sha256Digest, KeyId, DigestHasher>,
    pub apps: BTreeMap<AppName, App>,
    pub tokens: HashMap<Sha256Digest, Token, DigestHasher>,
    pub nodes: BTreeMap<NodeId, Node>,
}

impl AuthState {
    /// An empty state that cannot open sealed secrets (hash/HMAC/JWT-HS256/TOTP then fail
    /// closed with `secret_unavailable`).
    pub fn new() -> Self {
        AuthState::default()
    }

    /// An empty state that opens sealed secrets with `keyring` as events arrive.
    pub fn with_keyring(keyring: Arc<Keyring>) -> Self {
        AuthState { keyring: Some(keyring), ..AuthState::default() }
    }

    /// An empty worker state: like `with_keyring`, but API key events are skipped, so a worker
    /// (and its snapshots) never holds API key material.
    pub fn for_data_plane(keyring: Option<Arc<Keyring>>) -> Self {
        AuthState { keyring, data_plane: true, ..AuthState::default() }
    }

    pub fn is_data_plane(&self) -> bool {
        self.data_plane
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn tables_position(&self) -> Position {
        self.tables_position
    }

    pub fn keyring(&self) -> Option<&Keyring> {
        self.keyring.as_deref()
    }

    /// Folds one recorded event in. An event at or below the current position is a
    /// re-delivery and changes nothing; one past the next position is a gap.
    pub fn apply(&mut self, recorded: &RecordedEvent) -> Result<(), ApplyError> {
        if recorded.position <= self.position {
            return Ok(());
        }
        if recorded.position != self.position.next() {
            return Err(ApplyError::Gap { at: self.position, got: recorded.position });
        }
        self.apply_event(&recorded.event, recorded.recorded_at);
        self.position = recorded.position;
        if recorded.event.changes_access_tables() {
            self.tables_position = recorded.position;
        }
        Ok(())
    }

    /// Moves a data-plane state's position up to `position` over events the caller left out
    /// because they cannot change it (those with `!changes_access_tables()`: audit facts and
    /// API keys). Rebuilding a past state this way reads only the events that matter.
    pub fn skip_to(&mut self, position: Position) -> Result<(), ApplyError> {
        if !self.data_plane {
            return Err(ApplyError::NotDataPlane);
        }
        self.position = self.position.max(position);
        Ok(())
    }

    fn open(&self, sealed: &Sealed, purpose: &str) -> Option<Opened<Arc<[u8]>>> {
        // A secret we cannot open stays sealed: methods that need it fail closed.
        self.keyring.as_ref()?.open(sealed, purpose).ok().map(|p| Opened(Arc::from(p)))
    }

    /// The key whose secret has this SHA-256, revoked or not (the caller checks).
    pub fn api_key_by_secret(&self, digest: &Sha256Digest) -> Option<(&KeyId, &ApiKey)> {
        let id = self.api_key_ids.get(digest)?;
        self.api_keys.get_key_value(id)
    }

    fn apply_event(&mut self, event: &Event, at: Timestamp) {
        match event {
            Event::ApiKeyCreated(_) | Event::ApiKeyRevoked(_) if self.data_plane => {}
            Event::ApiKeyCreated(e) => {
                self.api_key_ids.insert(e.secret_sha256, e.key_id.clone());
                self.api_keys.insert(
                    e.key_id.clone(),
                    ApiKey {
                        name: e.name.clone(),
                        role: e.role,
                        secret_sha256: e.secret_sha256,
                        cidrs: e.cidrs.clone(),
                        expires_at: e.expires_at,
                        revoked: false,
                        created_at: at,
                    },
                );
            }
            Event::ApiKeyRevoked(e) => {
                if let Some(k) = self.api_keys.get_mut(&e.key_id) {
                    k.revoked = true;
                }
            }
            Event::AppCreated(e) => {
                self.apps.insert(e.app.clone(), App::new(e.policy.clone()));
            }
            Event::AppPolicyChanged(e) => {
                if let Some(app) = self.apps.get_mut(&e.app) {
                    let totp_changed = app.policy.totp != e.policy.totp;
                    app.policy = e.policy.clone();
                    if totp_changed {
                        for sub in app.subscribers.values_mut() {
                            sub.totp = build_totp(sub.plain.as_ref(), app.policy.totp);
                        }
                    }
                }
            }
            Event::AppSecretRotated(e) => {
                if self.apps.contains_key(&e.app) {
                    let secret = self.app_secret(&e.app, e.kind, e.secret.clone());
                    if let Some(app) = self.apps.get_mut(&e.app) {
                        app.secrets.insert(e.kind, secret);
                    }
                }
            }
            Event::AppSecretRemoved(e) => {
                if let Some(app) = self.apps.get_mut(&e.app) {
                    app.secrets.remove(&e.kind);
                }
            }
            Event::AppDeleted(e) => {
                if self.apps.remove(&e.app).is_some() {
                    // Tokens die with their app, so re-creating the app does not revive them.
                    self.tokens.retain(|_, t| t.app != e.app);
                }
            }
            Event::StreamRegistered(e) => {
                if let Some(app) = self.apps.get_mut(&e.app) {
                    app.add_stream(e.name.clone(), e.publish_name.clone(), e.description.clone(), e.plays.clone());
                }
            }
            Event::StreamUpdated(e) => {
                if let Some(app) = self.apps.get_mut(&e.app)
                    && let Some(stream) = app.streams.get_mut(&e.name)
                {
                    let was = stream.publish_name.clone().unwrap_or_else(|| e.name.clone());
                    if let Some(old) = stream.publish_name.take() {
                        app.publish_names.remove(&old);
                    }
                    if let Some(p) = &e.publish_name {
                        app.publish_names.insert(p.clone(), e.name.clone());
                    }
                    stream.publish_name = e.publish_name.clone();
                    stream.description = e.description.clone();
                    // Extra players follow the stream to its new publish name.
                    let now = e.publish_name.clone().unwrap_or_else(|| e.name.clone());
                    if was != now {
                        for s in app.streams.values_mut().filter(|s| s.plays.as_ref() == Some(&was)) {
                            s.plays = Some(now.clone());
                        }
                    }
                }
            }
            Event::StreamDeleted(e) => {
                if let Some(app) = self.apps.get_mut(&e.app)
                    && let Some(stream) = app.streams.remove(&e.name)
                {
                    if let Some(p) = &stream.publish_name {
                        app.publish_names.remove(p);
                    }
                    app.promote_player(stream.publish_name.as_ref().unwrap_or(&e.name), stream.plays.is_some());
                    app.subscribers.retain(|(s, _), _| *s != e.name);
                }
            }
            Event::TokenIssued(e) => {
                // Share the name allocations the registry already holds.
                let (app, stream) = match self.apps.get_key_value(&e.app) {
                    Some((a, entry)) => (
                        a.clone(),
                        entry
                            .streams
                            .get_key_value(&e.stream)
                            .map(|(s, _)| s.clone())
                            .unwrap_or_else(|| e.stream.clone()),
                    ),
                    None => (e.app.clone(), e.stream.clone()),
                };
                self.tokens.insert(
                    e.token_sha256,
                    Token { app, stream, action: e.action, expires_at: e.expires_at, status: TokenStatus::Active },
                );
            }
            Event::TokenConsumed(e) => {
                if let Some(t) = self.tokens.get_mut(&e.token_sha256)
                    && t.status == TokenStatus::Active
                {
                    t.status = TokenStatus::Consumed;
                }
            }
            Event::TokenRevoked(e) => {
                if let Some(t) = self.tokens.get_mut(&e.token_sha256) {
                    t.status = TokenStatus::Revoked;
                }
            }
            Event::SubscriberAdded(e) => {
                if let Some(settings) = self.apps.get(&e.app).map(|a| a.policy.totp) {
                    let id = (&e.app, &e.stream, &e.subscriber_id);
                    let sub = self.subscriber(id, settings, e.action, e.secret.clone(), (None, None), None);
                    if let Some(app) = self.apps.get_mut(&e.app) {
                        app.subscribers.insert((e.stream.clone(), e.subscriber_id.clone()), sub);
                    }
                }
            }
            Event::SubscriberRemoved(e) => {
                if let Some(app) = self.apps.get_mut(&e.app) {
                    app.subscribers.remove(&(e.stream.clone(), e.subscriber_id.clone()));
                }
            }
            Event::SubscriberBlocked(e) => {
                if let Some(s) = self.subscriber_mut(&e.app, &e.stream, &e.subscriber_id) {
                    s.blocked_until = Some(e.until);
                    s.blocked_action = e.action;
                }
            }
            Event::TotpStepUsed(e) => {
                if let Some(s) = self.subscriber_mut(&e.app, &e.stream, &e.subscriber_id) {
                    s.last_step = Some(s.last_step.map_or(e.step, |l| l.max(e.step)));
                }
            }
            Event::JwksRefreshed(e) => {
                if let Some(app) = self.apps.get_mut(&e.app) {
                    app.jwks = Some(Jwks::from_raw(e.jwks.clone()));
                }
            }
            Event::NodeRegistered(e) => {
                self.nodes
                    .insert(e.node_id.clone(), Node { version: e.version.clone(), protocols: e.protocols.clone() });
            }
            // Facts about the past that change no access table.
            // A kick changes no table: the workers act on it as it arrives (`sync::Applier`).
            Event::AccessDecided(_) | Event::ApiAccessed(_) | Event::SessionsKicked(_) => {}
        }
    }

    fn subscriber_mut(&mut self, app: &AppName, stream: &StreamName, id: &SubscriberId) -> Option<&mut Subscriber> {
        self.apps.get_mut(app)?.subscribers.get_mut(&(stream.clone(), id.clone()))
    }

    /// A stable SHA-256 over the whole state (not over how it was reached): equal on any
    /// two nodes that applied the same events, whatever their keyrings or map orders.
    pub fn digest(&self) -> Sha256Digest {
        let mut h = DigestWriter(Sha256::new());
        h.u64(self.position.0);
        h.u64(self.api_keys.len() as u64);
        for (id, k) in &self.api_keys {
            h.str(id.as_str());
            h.str(&k.name);
            h.str(k.role.as_str());
            h.bytes(&k.secret_sha256.0);
            h.cidrs(&k.cidrs);
            h.opt_i64(k.expires_at.map(|t| t.0));
            h.u64(k.revoked as u64);
        }
        self.access_tables(&mut h);
        Sha256Digest(h.0.finalize().into())
    }

    /// The digest of what a worker holds: the access tables, without the API keys and
    /// without the position (audit events move the position but change no table). A worker
    /// and the control plane that applied the same events agree on it, so `GET /v1/nodes`
    /// can say whether a worker's state is right, not only how far along it is.
    pub fn access_digest(&self) -> Sha256Digest {
        let mut h = DigestWriter(Sha256::new());
        self.access_tables(&mut h);
        Sha256Digest(h.0.finalize().into())
    }

    fn access_tables(&self, h: &mut DigestWriter) {
        h.u64(self.apps.len() as u64);
        for (name, app) in &self.apps {
            h.str(name.as_str());
            h.json(&serde_json::to_value(&app.policy).unwrap_or_default());
            h.u64(app.secrets.len() as u64);
            for (kind, s) in &app.secrets {
                h.str(kind.as_str());
                h.sealed(&s.sealed);
            }
            match &app.jwks {
                Some(j) => h.json(&j.raw),
                None => h.u64(0),
            }
            h.u64(app.streams.len() as u64);
            for (sname, s) in &app.streams {
                h.str(sname.as_str());
                h.opt_str(s.publish_name.as_ref().map(|p| p.as_str()));
                h.opt_str(s.description.as_deref());
                // Hashed only when set, so a state without extra players keeps its digest.
                if let Some(p) = &s.plays {
                    h.str("plays");
                    h.str(p.as_str());
                }
            }
            h.u64(app.subscribers.len() as u64);
            for ((stream, id), s) in &app.subscribers {
                h.str(stream.as_str());
                h.str(id.as_str());
                h.opt_str(s.action.map(Action::as_str));
                h.sealed(&s.secret);
                h.opt_i64(s.blocked_until.map(|t| t.0));
                // Hashed only when set, so a state without typed blocks keeps its digest.
                if let Some(a) = s.blocked_action {
                    h.str("blocked_action");
                    h.str(a.as_str());
                }
                h.opt_i64(s.last_step.map(|v| v as i64));
            }
        }
        let mut tokens: Vec<(&Sha256Digest, &Token)> = self.tokens.iter().collect();
        tokens.sort_unstable_by_key(|(k, _)| **k);
        h.u64(tokens.len() as u64);
        for (digest, t) in tokens {
            h.bytes(&digest.0);
            h.str(t.app.as_str());
            h.str(t.stream.as_str());
            h.str(t.action.as_str());
            h.opt_i64(t.expires_at.map(|t| t.0));
            h.u64(t.status as u64);
        }
        h.u64(self.nodes.len() as u64);
        for (id, n) in &self.nodes {
            h.str(id.as_str());
            h.str(&n.version);
            for p in &n.protocols {
                h.str(p.as_str());
            }
        }
    }
}

/// `access_digest()` remembered per table change: the digest is a pass over the whole state
/// (hundreds of ms at a million tokens), but it only changes when `tables_position` does.
#[derive(Debug, Default)]
pub struct AccessDigestMemo(std::sync::Mutex<Option<(Position, Sha256Digest)>>);

impl AccessDigestMemo {
    /// The access digest of `state`, computed only if its tables changed since the last call.
    pub fn of(&self, state: &AuthState) -> Sha256Digest {
        if let Some((at, d)) = *self.0.lock().unwrap_or_else(|p| p.into_inner())
            && at == state.tables_position()
        {
            return d;
        }
        let d = state.access_digest();
        self.seed(state.tables_position(), d);
        d
    }

    /// Remembers a digest known from elsewhere (a snapshot carries its own).
    pub fn seed(&self, tables_position: Position, digest: Sha256Digest) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((tables_position, digest));
    }
}

/// Length-prefixed writes, so that no two different states feed the same bytes.
struct DigestWriter(Sha256);

impl DigestWriter {
    fn u64(&mut self, v: u64) {
        self.0.update(v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.update(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u64(1);
                self.str(s);
            }
            None => self.u64(0),
        }
    }
    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            Some(v) => {
                self.u64(1);
                self.0.update(v.to_le_bytes());
            }
            None => self.u64(0),
        }
    }
    fn cidrs(&mut self, cidrs: &[Cidr]) {
        self.u64(cidrs.len() as u64);
        for c in cidrs {
            self.str(&c.to_string());
        }
    }
    fn sealed(&mut self, s: &Sealed) {
        self.str(&s.kid);
        self.str(&s.nonce);
        self.str(&s.ct);
    }
    fn json(&mut self, v: &serde_json::Value) {
        let mut out = Vec::new();
        crate::event::write_canonical(v, &mut out);
        self.bytes(&out);
    }
}

/// A TOTP key (RFC 6238, HMAC-SHA1) for the app's period and digits; `None` if the secret is
/// unavailable or unusable (totp-rs refuses it, e.g. too short), so the method fails closed.
fn build_totp(secret: Option<&Opened<Arc<[u8]>>>, settings: TotpSettings) -> Option<Opened<Arc<TotpKey>>> {
    let secret = secret?;
    // totp-rs decides which secrets are usable, as for the codes `totp_code` generates.
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(settings.digits)
        .with_step_duration(u64::from(settings.period_secs))
        .with_secret(secret.0.to_vec())
        .build()
        .ok()?;
    let mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&secret.0).ok()?;
    let modulus = 10u32.checked_pow(u32::from(settings.digits))?;
    Some(Opened(Arc::new(TotpKey { mac, digits: usize::from(settings.digits), modulus })))
}

/// A subscriber's TOTP key with the HMAC-SHA1 keyed state computed once, when the secret is
/// applied: checking a code costs one HMAC over the 8-byte step, not a key schedule too.
#[derive(Clone)]
pub struct TotpKey {
    mac: Hmac<sha1::Sha1>,
    digits: usize,
    modulus: u32,
}

impl std::fmt::Debug for TotpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpKey(<opened secret>)")
    }
}

impl TotpKey {
    /// The code at `step` (RFC 4226 dynamic truncation), as a number.
    pub fn code(&self, step: u64) -> u32 {
        use hmac::Mac;
        let mut mac = self.mac.clone();
        mac.update(&step.to_be_bytes());
        let h = mac.finalize().into_bytes();
        let offset = usize::from(h[19] & 0x0f);
        let bin = u32::from_be_bytes([h[offset] & 0x7f, h[offset + 1], h[offset + 2], h[offset + 3]]);
        bin % self.modulus
    }

    /// Is `presented` (exactly the configured number of ASCII digits) the code at `step`?
    /// The codes are compared in constant time.
    pub fn check(&self, presented: &str, step: u64) -> bool {
        use subtle::ConstantTimeEq;
        let bytes = presented.as_bytes();
        if bytes.len() != self.digits || !bytes.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let value = bytes.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
        bool::from(value.ct_eq(&self.code(step)))
    }
}

/// The public keys of a JWK set that Sluice accepts: RSA (RS256) and P-256 (ES256). Symmetric
/// keys in a JWKS are ignored, so an HMAC key can never be confused with a public key.
pub fn jwks_keys(raw: &serde_json::Value) -> Vec<JwkKey> {
    let Ok(set) = serde_json::from_value::<JwkSet>(raw.clone()) else {
        return Vec::new();
    };
    set.keys
        .iter()
        .filter_map(|jwk| {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                _ => return None,
            };
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(JwkKey { kid: jwk.common.key_id.clone(), alg, key })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totp_keys_agree_with_totp_rs_and_refuse_anything_but_the_exact_code() {
        let secrets: [&[u8]; 3] = [b"12345678901234567890", &[0xa5; 32], b"another secret of some length!"];
        for secret in secrets {
            let opened = Opened(Arc::<[u8]>::from(secret));
            for digits in [6u8, 7, 8] {
                let settings = TotpSettings { period_secs: 30, digits };
                let key = build_totp(Some(&opened), settings).unwrap();
                for step in [0u64, 1, 59, 1_234_567, 56_666_666, u64::from(u32::MAX) + 7] {
                    let expected = crate::decide::totp_code(secret, digits, 30, step).unwrap();
                    assert_eq!(format!("{:0width$}", key.0.code(step), width = usize::from(digits)), expected);
                    assert!(key.0.check(&expected, step), "{digits} digits, step {step}");
                    assert!(!key.0.check(&expected, step + 1) || key.0.code(step) == key.0.code(step + 1));
                    assert!(!key.0.check(&expected[1..], step), "too short");
                    assert!(!key.0.check(&format!("{expected}0"), step), "too long");
                    assert!(!key.0.check(&format!("+{}", &expected[1..]), step), "a sign is not a digit");
                    assert!(!key.0.check(&format!(" {}", &expected[1..]), step), "nor is a space");
                }
            }
        }
        // RFC 6238 appendix B, SHA-1, 8 digits, T = 59 s (step 1 of 30 s).
        let rfc = build_totp(
            Some(&Opened(Arc::<[u8]>::from(&b"12345678901234567890"[..]))),
            TotpSettings { period_secs: 30, digits: 8 },
        )
        .unwrap();
        assert!(rfc.0.check("94287082", 1));
        // totp-rs refuses a secret shorter than 128 bits: the method then fails closed.
        let short = Opened(Arc::<[u8]>::from(&b"short"[..]));
        assert!(build_totp(Some(&short), TotpSettings::default()).is_none());
        assert!(build_totp(None, TotpSettings::default()).is_none());
    }
}
