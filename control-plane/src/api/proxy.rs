//! The client behind a reverse proxy (`SLUICE_TRUSTED_PROXIES`): from a trusted peer,
//! `Forwarded` (RFC 7239) or else `X-Forwarded-For` names the client, so the allow-list, rate
//! limits, key CIDRs and the audit see it instead of the proxy. From anyone else the headers
//! are ignored (a client could write anything there).
//!
//! The chain is read from the right, the way each hop appends: addresses of trusted proxies
//! are skipped, the first other one is the client (what a client wrote further left is not
//! believed). A chain of trusted proxies only names its leftmost.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use sluice_events::Cidr;

use super::ClientIp;

/// The client a trusted proxy named.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded(pub IpAddr);

pub async fn real_client(State(trusted): State<Vec<Cidr>>, mut req: Request, next: Next) -> Response {
    let peer = ClientIp::peer(req.extensions());
    if let Some(ip) = client(peer, req.headers(), &trusted) {
        req.extensions_mut().insert(Forwarded(ip));
    }
    next.run(req).await
}

/// The client, when `peer` is trusted and its headers name one.
pub fn client(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> Option<IpAddr> {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return None;
    }
    let chain = forwarded_for(headers).or_else(|| x_forwarded_for(headers))?;
    let mut leftmost = None;
    for ip in chain.iter().rev() {
        if !is_trusted(*ip) {
            return Some(*ip);
        }
        leftmost = Some(*ip);
    }
    leftmost
}

/// Every `for=` of every `Forwarded` header, in order; `None` if there is none or one is not
/// an address (`unknown`, an obfuscated name): then the chain cannot be trusted at all.
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all("forwarded") {
        let value = value.to_str().ok()?;
        for element in value.split(',') {
            for pair in element.split(';') {
                let Some((name, v)) = pair.trim().split_once('=') else { continue };
                if name.trim().eq_ignore_ascii_case("for") {
                    chain.push(node(v.trim().trim_matches('"'))?);
                }
            }
        }
    }
    (!chain.is_empty()).then_some(chain)
}

fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut chain = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        for part in value.to_str().ok()?.split(',') {
            chain.push(node(part.trim())?);
        }
    }
    (!chain.is_empty()).then_some(chain)
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711` or a bare IPv6 address.
fn node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_trusted_peer_names_the_client_and_the_chain_is_read_from_the_right() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let xff = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(client(ip("10.1.2.3"), &xff, &trusted), Some(ip("203.0.113.7")));
        assert_eq!(client(ip("198.51.100.9"), &xff, &trusted), None, "an untrusted peer's header is ignored");
        // A client that writes its own header behind the proxy is not believed.
        let spoofed = headers(&[("x-forwarded-for", "127.0.0.1, 203.0.113.7")]);
        assert_eq!(client(ip("10.1.2.3"), &spoofed, &trusted), Some(ip("203.0.113.7")));
        // Two proxies: the second's address is skipped.
        let two = headers(&[("x-forwarded-for", "203.0.113.7, 10.9.9.9")]);
        assert_eq!(client(ip("10.1.2.3"), &two, &trusted), Some(ip("203.0.113.7")));
        // Forwarded wins, with ports, brackets and quotes; several headers append.
        let fwd = headers(&[
            ("forwarded", "for=192.0.2.60;proto=https;by=10.1.2.3"),
            ("forwarded", "for=\"[2001:db8:cafe::17]:4711\""),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(client(ip("10.1.2.3"), &fwd, &trusted), Some(ip("2001:db8:cafe::17")));
        assert_eq!(node("192.0.2.1:4711"), Some(ip("192.0.2.1")));
        // `unknown` or garbage: no client named, the peer stands.
        for bad in [("forwarded", "for=unknown"), ("x-forwarded-for", "not-an-address")] {
            assert_eq!(client(ip("10.1.2.3"), &headers(&[bad]), &trusted), None, "{bad:?}");
        }
        assert_eq!(client(ip("10.1.2.3"), &headers(&[]), &trusted), None);
    }
}
