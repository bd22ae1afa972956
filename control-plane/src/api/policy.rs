//! The policy as a REST body: its own strict types (`deny_unknown_fields` at every level),
//! converted into the event payload `sluice_events::Policy`. The payload stays lenient on read
//! (a newer writer may add fields that an older worker must still fold); a request is strict, so
//! a misspelt member is a 400 that names it instead of a setting silently left at its default.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_events::policy::{JwtSettings, TotpSettings, WebhookSettings};
use sluice_events::{ActionPolicy, Cidr, Method, OfflineOneTime, Policy};

/// The whole policy of an app.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub publish: ActionPolicyBody,
    pub play: ActionPolicyBody,
    #[serde(default)]
    pub totp: TotpBody,
    #[serde(default)]
    pub jwt: JwtBody,
    #[serde(default)]
    pub webhook: Option<WebhookBody>,
    #[serde(default)]
    pub offline_one_time: OfflineOneTime,
}

/// The rules for one action (publish or play).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionPolicyBody {
    /// Any-of: a request passes when one of these accepts it. Empty denies everything. A
    /// method listed twice is refused (the document says the items are unique).
    #[serde(deserialize_with = "unique_methods")]
    pub methods: BTreeSet<Method>,
    /// IP gate, checked before any method. Empty means anywhere.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// When false, only registered streams may be used.
    #[serde(default = "yes")]
    pub accept_undefined_streams: bool,
}

fn yes() -> bool {
    true
}

fn unique_methods<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeSet<Method>, D::Error> {
    let listed = Vec::<Method>::deserialize(d)?;
    let mut set = BTreeSet::new();
    for m in listed {
        if !set.insert(m) {
            return Err(serde::de::Error::custom(format!("method {m:?} is listed twice")));
        }
    }
    Ok(set)
}

/// TOTP parameters for the app's subscribers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpBody {
    /// Seconds per step (Ant Media's `timeTokenPeriod`, default 60).
    pub period_secs: u32,
    /// Digits per code, 6 to 8.
    pub digits: u8,
}

impl Default for TotpBody {
    fn default() -> Self {
        let d = TotpSettings::default();
        TotpBody { period_secs: d.period_secs, digits: d.digits }
    }
}

/// JWT settings beyond the secret (which is set through the app's secrets).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtBody {
    /// JWKS URL the control plane fetches.
    #[serde(default)]
    pub jwks_url: Option<String>,
}

/// Where a `webhook` method asks, and for how long it waits.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    /// `http://` or `https://` URL that receives a POST per request.
    pub url: String,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u32,
}

fn default_webhook_timeout() -> u32 {
    2000
}

impl From<ActionPolicyBody> for ActionPolicy {
    fn from(b: ActionPolicyBody) -> ActionPolicy {
        ActionPolicy { methods: b.methods, cidrs: b.cidrs, accept_undefined_streams: b.accept_undefined_streams }
    }
}

impl From<PolicyBody> for Policy {
    fn from(b: PolicyBody) -> Policy {
        Policy {
            publish: b.publish.into(),
            play: b.play.into(),
            totp: TotpSettings { period_secs: b.totp.period_secs, digits: b.totp.digits },
            jwt: JwtSettings { jwks_url: b.jwt.jwks_url },
            webhook: b.webhook.map(|w| WebhookSettings { url: w.url, timeout_ms: w.timeout_ms }),
            offline_one_time: b.offline_one_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_becomes_the_payload_with_the_payloads_defaults() {
        let body: PolicyBody =
            serde_json::from_str(r#"{"publish":{"methods":["one_time_token"]},"play":{"methods":["open"]}}"#).unwrap();
        let policy = Policy::from(body);
        let payload: Policy =
            serde_json::from_str(r#"{"publish":{"methods":["one_time_token"]},"play":{"methods":["open"]}}"#).unwrap();
        assert_eq!(policy, payload, "the same defaults as the payload's");
        let full = Policy::default();
        let body: PolicyBody = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(Policy::from(body), full, "every member of the payload is a member of the body");
    }

    #[test]
    fn unknown_members_are_refused_at_every_level() {
        for bad in [
            r#"{"publish":{"methods":[]},"play":{"methods":[]},"extra":1}"#,
            r#"{"publish":{"methods":[],"method":["open"]},"play":{"methods":[]}}"#,
            r#"{"publish":{"methods":[]},"play":{"methods":[]},"totp":{"period_secs":30,"digits":6,"x":1}}"#,
            r#"{"publish":{"methods":[]},"play":{"methods":[]},"webhook":{"url":"http://h","timeout":5}}"#,
            r#"{"publish":{"methods":[]},"play":{"methods":[]},"jwt":{"jwks":"http://h"}}"#,
        ] {
            assert!(serde_json::from_str::<PolicyBody>(bad).is_err(), "{bad}");
        }
    }
}
