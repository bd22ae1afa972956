//! What a publish/play request looks like to the core, and the verdict it gets.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{Action, AppName, NodeId, Position, Protocol, StreamName, SubscriberId, Timestamp};
use crate::policy::Method;
use crate::secret::{Sealed, SecretString, Sha256Digest};

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
    pub subject: Option<String>,
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
