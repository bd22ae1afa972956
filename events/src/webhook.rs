//! Where a worker may send a webhook: `SLUICE_WEBHOOK_ALLOWED` (host names or CIDRs) against the
//! URL's host and the addresses it resolves to. Without it, loopback, private, link-local (the
//! cloud metadata address among them), CGNAT and unspecified addresses are refused, so a policy
//! cannot point the workers at their own network. Pure: the shells resolve the name and pass the
//! addresses in (the control plane when the policy is set, the worker before each call).

use std::net::IpAddr;

use crate::ids::{Cidr, ParseError};

/// The operator's allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookAllowList {
    hosts: Vec<String>,
    cidrs: Vec<Cidr>,
}

/// Ranges a webhook may not reach unless listed.
const INTERNAL: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

impl WebhookAllowList {
    /// Each entry a CIDR (`10.1.0.0/16`, `127.0.0.1`) or a host name (`hooks.internal`).
    pub fn parse(entries: &[String]) -> Result<WebhookAllowList, ParseError> {
        let mut list = WebhookAllowList::default();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            match Cidr::parse(e) {
                Ok(c) => list.cidrs.push(c),
                Err(_) if is_host_name(e) => list.hosts.push(e.to_ascii_lowercase()),
                Err(_) => {
                    return Err(ParseError::Invalid {
                        what: "webhook allow-list entry",
                        detail: format!("{e:?} is neither a CIDR nor a host name"),
                    });
                }
            }
        }
        Ok(list)
    }

    /// Whether a webhook to `host` may go to `ip`: the host or the address is listed, or the
    /// address is not internal.
    pub fn allows(&self, host: &str, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
            || self.cidrs.iter().any(|c| c.contains(ip))
            || !INTERNAL.iter().filter_map(|r| Cidr::parse(r).ok()).any(|c| c.contains(ip))
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// The host and port of an `http://` or `https://` URL (brackets removed from an IPv6 host).
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (rest, default_port) =
        if let Some(r) = url.strip_prefix("https://") { (r, 443) } else { (url.strip_prefix("http://")?, 80) };
    let authority = rest.split(['/', '?', '#']).next()?;
    // No credentials in a webhook URL.
    let authority = authority.rsplit('@').next()?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, default_port),
        }
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_unless_listed() {
        let none = WebhookAllowList::default();
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!none.allows("h", ip(internal)), "{internal}");
        }
        assert!(none.allows("hooks.example", ip("93.184.216.34")));
        assert!(none.allows("hooks.example", ip("2606:2800:220:1::1")));
        let listed =
            WebhookAllowList::parse(&["127.0.0.1".into(), "10.0.0.0/8".into(), "Hooks.Internal".into()]).unwrap();
        assert!(listed.allows("x", ip("127.0.0.1")));
        assert!(!listed.allows("x", ip("127.0.0.2")));
        assert!(listed.allows("x", ip("10.9.9.9")));
        assert!(listed.allows("hooks.internal", ip("192.168.7.7")), "a listed host, whatever it resolves to");
        assert!(!listed.allows("other.internal", ip("192.168.7.7")));
        assert!(WebhookAllowList::parse(&["not a host!".into()]).is_err());
    }

    #[test]
    fn hosts_and_ports_come_out_of_urls() {
        assert_eq!(url_host_port("http://127.0.0.1:18999/internal/admin"), Some(("127.0.0.1".into(), 18999)));
        assert_eq!(url_host_port("https://Hooks.Example/x?y"), Some(("hooks.example".into(), 443)));
        assert_eq!(url_host_port("http://[::1]:8080/"), Some(("::1".into(), 8080)));
        assert_eq!(url_host_port("http://[::1]/"), Some(("::1".into(), 80)));
        assert_eq!(url_host_port("http://user:pw@10.0.0.1/"), Some(("10.0.0.1".into(), 80)));
        assert_eq!(url_host_port("ftp://x/"), None);
        assert_eq!(url_host_port("http://:80/"), None);
        assert_eq!(url_host_port("http://h:port/"), None);
    }
}
