//! An app's access policy: for each action, an IP gate AND any-of a set of methods.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{Action, Cidr, ParseError};

/// How a publisher or player may prove it is allowed. Any enabled method that accepts the
/// request is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// No credential: the (registered) name is enough.
    Open,
    /// A token issued by the API, usable once, optionally expiring.
    OneTimeToken,
    /// Ant Media's `sha256(stream + role + secret)`, hex.
    Hash,
    /// `base64(hmac_sha256(stream + role + expires, secret))` with `expires` (Unix seconds).
    Hmac,
    /// HS256 with the app's JWT secret, or RS256/ES256 with a key from the app's JWKS.
    Jwt,
    /// A subscriber's time-based one-time code.
    Totp,
    /// Ask an HTTP endpoint: 200 allows, 403 denies.
    Webhook,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Open => "open",
            Method::OneTimeToken => "one_time_token",
            Method::Hash => "hash",
            Method::Hmac => "hmac",
            Method::Jwt => "jwt",
            Method::Totp => "totp",
            Method::Webhook => "webhook",
        }
    }
}

/// The rules for one action (publish or play).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ActionPolicy {
    /// Any-of: a request passes when one of these accepts it. Empty denies everything.
    pub methods: BTreeSet<Method>,
    /// IP gate, checked before any method. Empty means anywhere.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// When false, only registered streams may be used (Ant Media's
    /// `acceptOnlyStreamsInDataStore`, SRT Live Server's stream ids).
    #[serde(default = "yes")]
    pub accept_undefined_streams: bool,
}

fn yes() -> bool {
    true
}

impl ActionPolicy {
    pub fn open() -> Self {
        ActionPolicy { methods: [Method::Open].into(), cidrs: vec![], accept_undefined_streams: true }
    }

    pub fn registered_only(mut self) -> Self {
        self.accept_undefined_streams = false;
        self
    }
}

/// TOTP parameters for the app's subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TotpSettings {
    /// Seconds per step (Ant Media's `timeTokenPeriod`, default 60).
    pub period_secs: u32,
    /// Digits per code, 6 to 8.
    pub digits: u8,
}

impl Default for TotpSettings {
    fn default() -> Self {
        TotpSettings { period_secs: 60, digits: 6 }
    }
}

/// Where a `webhook` method asks, and for how long it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookSettings {
    /// `http://` or `https://` URL that receives a POST per request.
    pub url: String,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u32,
}

fn default_webhook_timeout() -> u32 {
    2000
}

/// What a worker does with a one-time token while it cannot reach NATS to consume it
/// cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OfflineOneTime {
    /// Refuse: a token may not be used twice, so without the shared guard it is not used.
    #[default]
    Deny,
    /// Accept, remember the local consumption, reconcile when NATS returns.
    AllowLocal,
}

/// JWT settings beyond the secret (which is sealed separately).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct JwtSettings {
    /// JWKS URL the control plane fetches; its keys arrive as `JwksRefreshed` events.
    #[serde(default)]
    pub jwks_url: Option<String>,
}

/// The whole policy of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Policy {
    pub publish: ActionPolicy,
    pub play: ActionPolicy,
    #[serde(default)]
    pub totp: TotpSettings,
    #[serde(default)]
    pub jwt: JwtSettings,
    #[serde(default)]
    pub webhook: Option<WebhookSettings>,
    #[serde(default)]
    pub offline_one_time: OfflineOneTime,
}

impl Default for Policy {
    /// Open for both actions, undefined streams accepted: what a fresh SRS or Ant Media app does.
    fn default() -> Self {
        Policy {
            publish: ActionPolicy::open(),
            play: ActionPolicy::open(),
            totp: TotpSettings::default(),
            jwt: JwtSettings::default(),
            webhook: None,
            offline_one_time: OfflineOneTime::Deny,
        }
    }
}

impl Policy {
    pub fn for_action(&self, action: Action) -> &ActionPolicy {
        match action {
            Action::Publish => &self.publish,
            Action::Play => &self.play,
        }
    }

    /// The policy of SRT Live Server's app: the registered names are the credential.
    pub fn sls() -> Self {
        Policy {
            publish: ActionPolicy::open().registered_only(),
            play: ActionPolicy::open().registered_only(),
            ..Policy::default()
        }
    }

    /// Checks what types cannot: settings that are individually valid but unusable together.
    pub fn validate(&self) -> Result<(), ParseError> {
        let uses = |m: Method| self.publish.methods.contains(&m) || self.play.methods.contains(&m);
        if uses(Method::Webhook) && self.webhook.is_none() {
            return Err(ParseError::Invalid {
                what: "policy",
                detail: "the webhook method needs `webhook.url`".into(),
            });
        }
        if let Some(w) = &self.webhook {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) || w.url.len() > 2048 {
                return Err(ParseError::Invalid {
                    what: "policy.webhook.url",
                    detail: "expected an http:// or https:// URL of at most 2048 characters".into(),
                });
            }
            if w.timeout_ms == 0 || w.timeout_ms > 30_000 {
                return Err(ParseError::Invalid {
                    what: "policy.webhook.timeout_ms",
                    detail: "expected 1 to 30000".into(),
                });
            }
        }
        if !(6..=8).contains(&self.totp.digits) {
            return Err(ParseError::Invalid { what: "policy.totp.digits", detail: "expected 6, 7 or 8".into() });
        }
        if !(15..=300).contains(&self.totp.period_secs) {
            return Err(ParseError::Invalid {
                what: "policy.totp.period_secs",
                detail: "expected 15 to 300 seconds".into(),
            });
        }
        if let Some(url) = &self.jwt.jwks_url
            && !url.starts_with("https://")
            && !url.starts_with("http://")
        {
            return Err(ParseError::Invalid {
                what: "policy.jwt.jwks_url",
                detail: "expected an http:// or https:// URL".into(),
            });
        }
        Ok(())
    }
}

/// Which of an app's secrets a rotation replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SecretKind {
    /// Shared by the `hash` and `hmac` methods (Ant Media's `tokenHashSecret`).
    Hash,
    /// HS256 secret for stream JWTs, at least 32 bytes.
    Jwt,
    /// Signs webhook requests so the receiver can verify them.
    Webhook,
    /// The SRT passphrase (10 to 79 bytes): set, the app's SRT callers must encrypt with it
    /// (AES, the key length the caller asks for); unset, they must not encrypt.
    SrtPassphrase,
}

impl SecretKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Hash => "hash",
            SecretKind::Jwt => "jwt",
            SecretKind::Webhook => "webhook",
            SecretKind::SrtPassphrase => "srt_passphrase",
        }
    }

    /// Smallest length accepted for a secret of this kind.
    pub fn min_len(self) -> usize {
        match self {
            SecretKind::Jwt => 32,
            SecretKind::Hash | SecretKind::Webhook => 16,
            SecretKind::SrtPassphrase => 10,
        }
    }

    /// Largest length accepted (SRT's limit for a passphrase).
    pub fn max_len(self) -> usize {
        match self {
            SecretKind::SrtPassphrase => 79,
            SecretKind::Hash | SecretKind::Jwt | SecretKind::Webhook => 4096,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_open_and_valid() {
        let p = Policy::default();
        assert!(p.validate().is_ok());
        assert!(p.publish.methods.contains(&Method::Open));
        assert!(p.publish.accept_undefined_streams);
        assert!(!Policy::sls().play.accept_undefined_streams);
    }

    #[test]
    fn webhook_method_needs_a_url() {
        let mut p = Policy::default();
        p.publish.methods.insert(Method::Webhook);
        assert!(p.validate().unwrap_err().to_string().contains("webhook.url"));
        p.webhook = Some(WebhookSettings { url: "ftp://x".into(), timeout_ms: 100 });
        assert!(p.validate().is_err());
        p.webhook = Some(WebhookSettings { url: "http://127.0.0.1/hook".into(), timeout_ms: 100 });
        assert!(p.validate().is_ok());
    }

    #[test]
    fn bad_values_are_refused() {
        let err =
            serde_json::from_str::<Policy>(r#"{"publish":{"methods":["magic"]},"play":{"methods":[]}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `magic`"));
        let mut p = Policy::default();
        p.totp.digits = 9;
        assert!(p.validate().is_err());
    }
}
