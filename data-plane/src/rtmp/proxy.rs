//! PROXY protocol v1 and v2 (HAProxy's) on the RTMP listener, from the peers in
//! `SLUICE_PROXY_PROTOCOL_FROM` only: their connections must open with the header, whose
//! source address then stands for the client everywhere (connection limits, penalty box,
//! decisions, the audit). A connection from anyone else is plain RTMP: a PROXY header from it
//! is refused like any other garbage, so no client can claim another address.

use std::net::SocketAddr;
use std::time::Duration;

use monoio::io::AsyncReadRent;
use monoio::net::TcpStream;
use ppp::{HeaderResult, PartialResult as _};

/// The longest header read: v1 is at most 107 bytes; v2 with TLVs is capped here.
const MAX_HEADER: usize = 4096;

/// A complete header at the start of `buf`: the client's address (`None` for v1 `UNKNOWN`
/// and v2 `LOCAL`: the peer's own) and the header's length; `Ok(None)` when more is needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, String> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Some((source, h.header.len())))
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
                (_, _) => None,
            };
            Ok(Some((source, h.len())))
        }
        HeaderResult::V1(Err(e)) => Err(format!("not a PROXY header: {e:?}")),
        HeaderResult::V2(Err(e)) => Err(format!("not a PROXY header: {e:?}")),
    }
}

/// Reads the header (within `bound`): the client's address, and what followed it (the start
/// of the RTMP handshake).
pub async fn read_header(stream: &mut TcpStream, bound: Duration) -> Result<(Option<SocketAddr>, Vec<u8>), String> {
    let until = std::time::Instant::now() + bound;
    let mut got: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = vec![0u8; 536];
    loop {
        let left = until.checked_duration_since(std::time::Instant::now()).ok_or("no PROXY header in time")?;
        let (res, b) = monoio::time::timeout(left, stream.read(chunk)).await.map_err(|_| "no PROXY header in time")?;
        chunk = b;
        let n = res.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before its PROXY header".into());
        }
        got.extend_from_slice(&chunk[..n]);
        if let Some((source, len)) = parse(&got)? {
            return Ok((source, got.split_off(len)));
        }
        if got.len() > MAX_HEADER {
            return Err("PROXY header too long".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_headers_name_the_client_and_leave_the_rest() {
        let mut v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 1935\r\n".to_vec();
        v1.extend_from_slice(&[3, 0, 0]);
        let (source, len) = parse(&v1).unwrap().unwrap();
        assert_eq!(source, Some("203.0.113.9:5555".parse().unwrap()));
        assert_eq!(&v1[len..], &[3, 0, 0]);
        assert_eq!(parse(b"PROXY TCP4 203.0.113.9 10.0").unwrap(), None, "incomplete");
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Some((None, 15)));
        // v2: signature, PROXY over TCP/IPv6, 36 bytes of addresses.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x21, 0, 36]);
        v2.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v2.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v2.extend_from_slice(&4711u16.to_be_bytes());
        v2.extend_from_slice(&1935u16.to_be_bytes());
        let (source, len) = parse(&v2).unwrap().unwrap();
        assert_eq!((source, len), (Some("[2001:db8::7]:4711".parse().unwrap()), 52));
        // An RTMP handshake where a header must be: refused.
        assert!(parse(&[3; 1537]).is_err());
    }
}
