//! The `webhook` method: when no local method accepts and the app names a webhook, the worker
//! POSTs the request to it (from the tokio thread) and records the answer. 200 allows, 403
//! denies, anything else (another status, a timeout, a refused connection) fails closed.
//!
//! Body (JSON): `app`, `stream` (as the client sent it), `public_stream`, `action`,
//! `client_ip`, `protocol`, `query` (the credential as a query string, so the receiver can
//! check its own tokens), `decision_id`, `at` (Unix ms). When the app has a webhook secret
//! (`POST /v1/apps/{app}/secrets/webhook`) the request carries
//! `X-Sluice-Signature: sha256=<hex of HMAC-SHA256(secret, body)>`.
//!
//! Allow answers are cached for `webhook_cache_secs` per (URL, app, stream, action, client IP,
//! credential), so a reconnecting player does not ask again every time; denials are not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sluice_events::decision::WebhookAnswer;
use sluice_events::webhook::{WebhookAllowList, url_host_port};
use sluice_events::{AccessRequest, Sha256Digest, StreamName};

#[derive(Debug)]
pub struct Webhooks {
    ttl: Duration,
    /// `SLUICE_WEBHOOK_ALLOWED`: checked against the addresses the host resolves to, before
    /// each call, and the call pinned to a checked address (a name that moves between the check
    /// and the connection cannot take it elsewhere).
    /// Replaced live by a reload (SIGHUP).
    allow: arc_swap::ArcSwap<WebhookAllowList>,
    allowed: Mutex<HashMap<Sha256Digest, Instant>>,
}

fn query(req: &AccessRequest) -> String {
    let c = &req.credential;
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(t) = &c.token {
        pairs.push(("token", t.expose().to_owned()));
    }
    if let Some(e) = c.expires {
        pairs.push(("expires", e.to_string()));
    }
    if let Some(s) = &c.subscriber_id {
        pairs.push(("subscriberId", s.as_str().to_owned()));
    }
    if let Some(code) = &c.subscriber_code {
        pairs.push(("subscriberCode", code.expose().to_owned()));
    }
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k}={}", percent_encoding::utf8_percent_encode(&v, percent_encoding::NON_ALPHANUMERIC)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `sha256=<hex>` of the body under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else { return String::new() };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhooks {
    pub fn new(cache_ttl: Duration, allow: WebhookAllowList) -> Webhooks {
        Webhooks { ttl: cache_ttl, allow: arc_swap::ArcSwap::from_pointee(allow), allowed: Mutex::default() }
    }

    /// A new allow-list (a reload): calls from now on are checked against it.
    pub fn set_allow_list(&self, allow: WebhookAllowList) {
        self.allow.store(Arc::new(allow));
    }

    /// A client that reaches `url`'s host only at an address the allow-list admits.
    async fn client_for(&self, url: &str, timeout: Duration) -> Result<reqwest::Client, String> {
        let (host, port) = url_host_port(url).ok_or("not an http(s) URL")?;
        let found = tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
            .await
            .map_err(|_| format!("resolving {host} timed out"))?
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        let addresses: Vec<SocketAddr> = found.collect();
        let allow = self.allow.load();
        let Some(addr) = addresses.iter().find(|a| allow.allows(&host, a.ip())) else {
            return Err(format!(
                "{host} resolves only to internal addresses ({addresses:?}); not in SLUICE_WEBHOOK_ALLOWED"
            ));
        };
        reqwest::Client::builder().resolve(&host, *addr).build().map_err(|e| e.to_string())
    }

    pub async fn ask(
        &self,
        url: &str,
        timeout: Duration,
        secret: Option<&[u8]>,
        req: &AccessRequest,
        public_stream: &StreamName,
        now_ms: i64,
    ) -> WebhookAnswer {
        let query = query(req);
        let key = Sha256Digest::of(
            format!("{url}\n{}\n{}\n{}\n{}\n{query}", req.app, req.stream, req.action.as_str(), req.client_ip)
                .as_bytes(),
        );
        if !self.ttl.is_zero() {
            let cache = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
            if cache.get(&key).is_some_and(|until| *until > Instant::now()) {
                return WebhookAnswer { status: Some(200), allowed: true };
            }
        }
        let body = serde_json::json!({
            "app": req.app,
            "stream": req.stream,
            "public_stream": public_stream,
            "action": req.action.as_str(),
            "client_ip": req.client_ip.to_string(),
            "protocol": req.protocol.as_str(),
            "query": query,
            "decision_id": req.id,
            "at": now_ms,
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let http = match self.client_for(url, timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook refused by the allow-list; failing closed");
                return WebhookAnswer { status: None, allowed: false };
            }
        };
        let mut call = http.post(url).timeout(timeout).header("content-type", "application/json");
        if let Some(secret) = secret {
            call = call.header("x-sluice-signature", signature(secret, &bytes));
        }
        let answer = match call.body(bytes).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                WebhookAnswer { status: Some(status), allowed: status == 200 }
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "webhook call failed; failing closed");
                WebhookAnswer { status: None, allowed: false }
            }
        };
        if answer.allowed && !self.ttl.is_zero() {
            let mut cache = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if cache.len() > 100_000 {
                cache.retain(|_, until| *until > now);
            }
            cache.insert(key, now + self.ttl);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
