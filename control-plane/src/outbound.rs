//! Requests the control plane makes to a URL an admin chose (a webhook checked when its policy
//! is set, an app's JWKS fetched): the host is resolved and every address it resolves to must
//! pass the allow-list (`SLUICE_WEBHOOK_ALLOWED`), so a policy cannot point the control plane
//! at its own network. The worker makes the same check before each webhook call.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_events::webhook::WebhookAllowList;

/// Why a host was not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// It did not resolve here (within 3 s).
    Unresolved,
    /// It resolves to an internal address the allow-list does not list.
    Internal(std::net::IpAddr),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unresolved => f.write_str("does not resolve"),
            Refused::Internal(ip) => {
                write!(f, "resolves to {ip}, an internal address; list it in SLUICE_WEBHOOK_ALLOWED to allow it")
            }
        }
    }
}

/// The addresses `host:port` resolves to, all of them allowed.
pub async fn resolve_allowed(host: &str, port: u16, allow: &WebhookAllowList) -> Result<Vec<SocketAddr>, Refused> {
    let lookup = tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host((host, port)));
    let addresses: Vec<SocketAddr> = match lookup.await {
        Ok(Ok(found)) => found.collect(),
        _ => return Err(Refused::Unresolved),
    };
    if addresses.is_empty() {
        return Err(Refused::Unresolved);
    }
    match addresses.iter().find(|a| !allow.allows(host, a.ip())) {
        Some(bad) => Err(Refused::Internal(bad.ip())),
        None => Ok(addresses),
    }
}
