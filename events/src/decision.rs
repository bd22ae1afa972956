//! What a publish/play request looks like to the core, and the verdict it gets.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::command::Command;
use crate::ids::{Action, AppName, NodeId, Position, Protocol, StreamName, SubscriberId, Timestamp};
use crate::policy::Method;
use crate::secret::{Keyring, SealError, Sealed, SealingKey, SecretString, Sha256Digest};

/// The credential a client presented, as parsed from the wire. Secrets never print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credential {
    /// `token=` (one-time token, hash, HMAC or JWT: which one is for the policy to find out).
    pub token: Option<SecretString>,
    /// `expires=` (Unix seconds), used by the HMAC method.
    pub expires: Option<i64>,
    /// `subscriberId=` / SRT `u=`.
    pub subscriber_id: Option<SubscriberId>,
    /// `subscriberCode=` / SRT `s=`.
    pub subscriber_code: Option<SecretString>,
}

impl Credential {
    pub fn is_empty(&self) -> bool {
        self.token.is_none() && self.subscriber_id.is_none() && self.subscriber_code.is_none()
    }

    pub fn token(t: &str) -> Self {
        Credential { token: Some(SecretString::new(t)), ..Credential::default() }
    }
}

/// One publish or play attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// Chosen by the caller (the core draws no random numbers); becomes the decision id.
    pub id: Uuid,
    pub app: AppName,
    /// The name as the client sent it (a publish name or a public name).
    pub stream: StreamName,
    pub action: Action,
    pub protocol: Protocol,
    pub client_ip: IpAddr,
    pub credential: Credential,
    /// The media server's own id of the client, when a media server asked through a hook
    /// (nginx-rtmp's `clientid`, SRS's `client_id`, MediaMTX's `id`).
    pub client_id: Option<String>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    /// No local method accepted, but the app asks a webhook: the shell calls it and records
    /// the answer.
    AskWebhook {
        url: String,
        timeout_ms: u32,
    },
}

/// A stable, machine-readable reason. Clients see it; dashboards count it; never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Allowed,
    WebhookRequired,
    AppNotFound,
    StreamNotRegistered,
    PublishNameRequired,
    CidrDenied,
    NoMethodEnabled,
    CredentialMissing,
    TokenNotFound,
    TokenExpired,
    TokenConsumed,
    TokenRevoked,
    TokenWrongStream,
    TokenWrongAction,
    HashMismatch,
    HmacMismatch,
    HmacExpired,
    HmacMalformed,
    JwtMalformed,
    JwtBadSignature,
    JwtAlgorithmRefused,
    JwtKeyUnknown,
    JwtExpired,
    JwtNotYetValid,
    JwtWrongApp,
    JwtWrongStream,
    JwtWrongAction,
    SubscriberNotFound,
    SubscriberBlocked,
    SubscriberWrongAction,
    TotpInvalid,
    TotpReplayed,
    SecretUnavailable,
    WebhookDenied,
    WebhookFailed,
    /// A one-time token could not be checked against the cluster (NATS unreachable) and the
    /// app's `offline_one_time` policy is `deny`.
    OneTimeUnavailable,
    /// The stream already has a live publisher.
    StreamBusy,
    /// Too many denials from this address lately (per-IP backoff).
    RateLimited,
    /// A play of a stream nobody publishes: the credential passed, nothing was claimed.
    NotLive,
    /// The request could not be read (an empty or malformed streamid, a name with characters a
    /// name cannot have): recorded so a misconfigured client shows in the audit, with
    /// `MALFORMED_TARGET` for its app and stream.
    Malformed,
    /// A live session an operator ended (`SessionsKicked`); a new attempt is decided as usual.
    Kicked,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        // Equal to serde's snake_case names; a test keeps the table and the enum in step.
        REASON_CODES[self as usize]
    }
}

/// The codes in declaration order, so `as_str` allocates nothing.
const REASON_CODES: &[&str] = &[
    "allowed",
    "webhook_required",
    "app_not_found",
    "stream_not_registered",
    "publish_name_required",
    "cidr_denied",
    "no_method_enabled",
    "credential_missing",
    "token_not_found",
    "token_expired",
    "token_consumed",
    "token_revoked",
    "token_wrong_stream",
    "token_wrong_action",
    "hash_mismatch",
    "hmac_mismatch",
    "hmac_expired",
    "hmac_malformed",
    "jwt_malformed",
    "jwt_bad_signature",
    "jwt_algorithm_refused",
    "jwt_key_unknown",
    "jwt_expired",
    "jwt_not_yet_valid",
    "jwt_wrong_app",
    "jwt_wrong_stream",
    "jwt_wrong_action",
    "subscriber_not_found",
    "subscriber_blocked",
    "subscriber_wrong_action",
    "totp_invalid",
    "totp_replayed",
    "secret_unavailable",
    "webhook_denied",
    "webhook_failed",
    "one_time_unavailable",
    "stream_busy",
    "rate_limited",
    "not_live",
    "malformed",
    "kicked",
];

/// Something the shell must do for an `Allow` to hold (and record in the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Consume this one-time token cluster-wide before admitting the client.
    ConsumeToken { token_sha256: Sha256Digest },
    /// Mark this TOTP step as used so the code cannot be replayed.
    UseTotpStep { subscriber_id: SubscriberId, step: u64 },
}

/// The credential-independent part of a decision, returned by `decide`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Decision {
    pub id: Uuid,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub reason: Reason,
    /// The method that accepted (or, for a denial, the one whose check failed most specifically).
    pub method: Option<Method>,
    /// Who matched: `token:<id>`, `subscriber:<id>`, `jwt:<sub>`, …
    // Borrowed for the fixed ones, so an allowed hash or HMAC decision allocates nothing here.
    pub subject: Option<std::borrow::Cow<'static, str>>,
    /// The stream's public name after publish-name mapping.
    pub stream: StreamName,
    /// Log position of the state the decision was made on.
    pub position: Position,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effects: Vec<Effect>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.outcome == Outcome::Allow
    }

    /// The refusal of a request that could not be read, decided on the state at `position`.
    pub fn malformed(id: Uuid, position: Position) -> Decision {
        Decision {
            id,
            outcome: Outcome::Deny,
            reason: Reason::Malformed,
            method: None,
            subject: None,
            stream: malformed_target().1,
            position,
            effects: Vec::new(),
        }
    }
}

/// The app and stream a malformed request is recorded under: `-` and `-` (valid names, so the
/// record reads back; nothing was readable of the real ones, and nothing of the raw text is
/// kept: it may carry a credential).
pub fn malformed_target() -> (AppName, StreamName) {
    (
        AppName::parse("-").unwrap_or_else(|_| unreachable!("`-` is a valid app name")),
        StreamName::parse("-").unwrap_or_else(|_| unreachable!("`-` is a valid stream name")),
    )
}

impl AccessRequest {
    /// A request that could not be read, from `client_ip`, for the audit.
    pub fn malformed(id: Uuid, action: Action, protocol: Protocol, client_ip: IpAddr) -> AccessRequest {
        let (app, stream) = malformed_target();
        AccessRequest {
            id,
            app,
            stream,
            action,
            protocol,
            client_ip,
            credential: Credential::default(),
            client_id: None,
        }
    }
}

/// The request as the audit log keeps it: the credential sealed, never in plaintext, so
/// `explain` can re-run `decide` and nobody reading the log learns a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecordedRequest {
    pub app: AppName,
    pub stream: StreamName,
    pub action: Action,
    pub protocol: Protocol,
    pub client_ip: IpAddr,
    #[serde(default)]
    pub subscriber_id: Option<SubscriberId>,
    #[serde(default)]
    pub expires: Option<i64>,
    /// JSON `{"token":…,"subscriber_code":…}` sealed under the cluster key.
    #[serde(default)]
    pub credential: Option<Sealed>,
    /// The media server's id of the client (a hook's request); absent for the worker's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// The purpose a decision's credential is sealed under: bound to the decision id, so a
/// sealed credential cannot be moved onto another decision.
pub fn credential_purpose(decision_id: &Uuid) -> String {
    format!("decision-credential:{decision_id}")
}

#[derive(Serialize, Deserialize)]
struct CredentialPlain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subscriber_code: Option<String>,
}

impl RecordedRequest {
    /// The request as the log keeps it; the secret parts of the credential are sealed under
    /// `key` (dropped when there is no key: the decision is still recorded, but `explain`
    /// cannot re-run it). `nonce` must be fresh (the shell draws it).
    pub fn record(req: &AccessRequest, key: Option<&SealingKey>, nonce: [u8; 24]) -> RecordedRequest {
        let c = &req.credential;
        let credential = if c.token.is_none() && c.subscriber_code.is_none() {
            None
        } else {
            key.map(|key| {
                let plain = CredentialPlain {
                    token: c.token.as_ref().map(|t| t.expose().to_owned()),
                    subscriber_code: c.subscriber_code.as_ref().map(|t| t.expose().to_owned()),
                };
                // Two optional strings: cannot fail to serialize.
                let bytes = serde_json::to_vec(&plain).unwrap_or_default();
                key.seal(&credential_purpose(&req.id), &bytes, nonce)
            })
        };
        RecordedRequest {
            app: req.app.clone(),
            stream: req.stream.clone(),
            action: req.action,
            protocol: req.protocol,
            client_ip: req.client_ip,
            subscriber_id: c.subscriber_id.clone(),
            expires: c.expires,
            credential,
            client_id: req.client_id.clone(),
        }
    }

    /// The request again, credential unsealed, for `explain`.
    pub fn reopen(&self, decision_id: Uuid, keyring: &Keyring) -> Result<AccessRequest, SealError> {
        let mut credential =
            Credential { expires: self.expires, subscriber_id: self.subscriber_id.clone(), ..Credential::default() };
        if let Some(sealed) = &self.credential {
            let bytes = keyring.open(sealed, &credential_purpose(&decision_id))?;
            let plain: CredentialPlain = serde_json::from_slice(&bytes).map_err(|_| SealError::Malformed)?;
            credential.token = plain.token.map(SecretString::new);
            credential.subscriber_code = plain.subscriber_code.map(SecretString::new);
        }
        Ok(AccessRequest {
            id: decision_id,
            app: self.app.clone(),
            stream: self.stream.clone(),
            action: self.action,
            protocol: self.protocol,
            client_ip: self.client_ip,
            credential,
            client_id: self.client_id.clone(),
        })
    }
}

/// What a webhook answered (recorded because it cannot be replayed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookAnswer {
    /// HTTP status, or `None` when the call failed (timeout, refused).
    pub status: Option<u16>,
    pub allowed: bool,
}

/// A decision as recorded in the log by the worker that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionRecord {
    #[serde(flatten)]
    pub decision: Decision,
    /// The final verdict after effects and webhook (e.g. a consumed-elsewhere token denies).
    pub allowed: bool,
    /// The final reason (differs from `decision.reason` when the shell overrode it).
    pub final_reason: Reason,
    pub request: RecordedRequest,
    pub decided_at: Timestamp,
    #[serde(default)]
    pub node: Option<NodeId>,
    #[serde(default)]
    pub webhook: Option<WebhookAnswer>,
    /// The worker's spool sequence, for idempotent ingestion and spool trimming.
    #[serde(default)]
    pub sequence: Option<u64>,
    /// For an allowed publish: what held the stream's one publisher slot (absent otherwise,
    /// and in records from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_slot: Option<SlotScope>,
    /// For a refusal: the identical refusals (same address, app, stream, action and reason)
    /// this one stands for, itself included, when the worker coalesced a retrying client's
    /// attempts rather than record each (absent: this attempt alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<Repeats>,
}

/// Identical refusals recorded as one (see `DecisionRecord::repeats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Repeats {
    /// How many attempts, this one included (at least 2).
    pub count: u64,
    /// When the first and the last of them were decided.
    pub first: Timestamp,
    pub last: Timestamp,
}

/// What held a publisher's slot when it was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlotScope {
    /// The cluster's lease (NATS KV `sluice-publishers`): no other worker publishes the stream.
    Cluster,
    /// This worker's slot alone: NATS did not answer, so another worker cut off from this one
    /// could admit a publisher of the same stream until the lease is taken again.
    Local,
}

impl DecisionRecord {
    /// The facts an allowed decision implies beyond itself (a consumed one-time token, a used
    /// TOTP step), as commands for the control plane to handle when it ingests the record.
    /// A denied decision implies nothing.
    pub fn follow_up(&self) -> Vec<Command> {
        if !self.allowed {
            return Vec::new();
        }
        self.decision
            .effects
            .iter()
            .map(|effect| match effect {
                Effect::ConsumeToken { token_sha256 } => Command::ConsumeToken {
                    token_sha256: *token_sha256,
                    decision_id: Some(self.decision.id),
                    node: self.node.clone(),
                },
                Effect::UseTotpStep { subscriber_id, step } => Command::UseTotpStep {
                    app: self.request.app.clone(),
                    stream: self.decision.stream.clone(),
                    subscriber_id: subscriber_id.clone(),
                    step: *step,
                },
            })
            .collect()
    }

    /// A stable id for the `n`-th fact implied by this decision, so re-ingesting it writes
    /// nothing twice (the log is idempotent by event id).
    pub fn follow_up_id(&self, n: usize) -> Uuid {
        let mut bytes = [0u8; 16];
        let digest = Sha256Digest::of(format!("sluice-follow-up|{}|{n}", self.decision.id).as_bytes());
        bytes.copy_from_slice(&digest.0[..16]);
        uuid::Builder::from_custom_bytes(bytes).into_uuid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_match_serde_names() {
        let all: Vec<Reason> = (0..REASON_CODES.len())
            .map(|i| serde_json::from_value(serde_json::json!(REASON_CODES[i])).unwrap())
            .collect();
        for (i, r) in all.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(r.as_str(), REASON_CODES[i]);
        }
    }

    fn key() -> SealingKey {
        SealingKey::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap()
    }

    fn request() -> AccessRequest {
        AccessRequest {
            id: Uuid::from_u128(42),
            app: AppName::parse("live").unwrap(),
            stream: StreamName::parse("cam").unwrap(),
            action: Action::Play,
            protocol: Protocol::Rtmp,
            client_ip: "192.0.2.7".parse().unwrap(),
            credential: Credential {
                token: Some(SecretString::new("tok-secret")),
                expires: Some(1_900_000_000),
                subscriber_id: Some(SubscriberId::parse("alice").unwrap()),
                subscriber_code: Some(SecretString::new("123456")),
            },
            client_id: Some("nginx-7".into()),
        }
    }

    #[test]
    fn a_recorded_request_keeps_no_plaintext_and_reopens_to_the_same_request() {
        let req = request();
        let rec = RecordedRequest::record(&req, Some(&key()), [7; 24]);
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains("tok-secret") && !json.contains("123456"), "{json}");
        let ring = Keyring::new(key());
        assert_eq!(rec.reopen(req.id, &ring).unwrap(), req);
        // The seal is bound to the decision: moved onto another one it does not open.
        assert!(rec.reopen(Uuid::from_u128(43), &ring).is_err());
        // No key: recorded without the credential, never in the clear.
        let bare = RecordedRequest::record(&req, None, [0; 24]);
        assert!(bare.credential.is_none());
    }

    #[test]
    fn only_an_allowed_decision_implies_follow_up_facts_with_stable_ids() {
        let req = request();
        let digest = Sha256Digest::of(b"tok-secret");
        let mut record = DecisionRecord {
            decision: Decision {
                id: req.id,
                outcome: Outcome::Allow,
                reason: Reason::Allowed,
                method: Some(Method::OneTimeToken),
                subject: None,
                stream: req.stream.clone(),
                position: Position(3),
                effects: vec![Effect::ConsumeToken { token_sha256: digest }],
            },
            allowed: true,
            final_reason: Reason::Allowed,
            request: RecordedRequest::record(&req, None, [0; 24]),
            decided_at: Timestamp(1),
            node: None,
            webhook: None,
            sequence: Some(1),
            publisher_slot: None,
            repeats: None,
        };
        assert!(
            matches!(record.follow_up().as_slice(), [Command::ConsumeToken { token_sha256, .. }] if *token_sha256 == digest)
        );
        assert_eq!(record.follow_up_id(0), record.follow_up_id(0));
        assert_ne!(record.follow_up_id(0), record.follow_up_id(1));
        record.allowed = false;
        assert!(record.follow_up().is_empty());
    }

    #[test]
    fn credential_debug_hides_secrets() {
        let c = Credential {
            token: Some(SecretString::new("tok-secret")),
            subscriber_code: Some(SecretString::new("123456")),
            ..Credential::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("tok-secret") && !s.contains("123456"));
    }
}
