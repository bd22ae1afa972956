//! Datagrams from the network into srt-protocol's listener (the sans-IO core srt-tokio runs
//! for every SRT caller) and into the connections it opens: parse, handshake (with and without
//! a passphrase), delegated control and data packets, timers. Run against the vendored,
//! patched srt-protocol (data-plane/vendor/README.md).
//!
//! Input: records of `[length, peer, bytes...]`; `peer` picks one of four source addresses,
//! how far the clock moves, and how the access request is answered.
#![no_main]

use std::io::Cursor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use srt_protocol::connection::DuplexConnection;
use srt_protocol::listener::{
    AccessControlResponse, Action, Input, MultiplexListener, NextInputContext, SessionId,
};
use srt_protocol::packet::{ControlPacket, ControlTypes, Packet, ReceivePacketError, ShakeType};
use srt_protocol::settings::{ConnInitSettings, KeySettings};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let local = SocketAddr::from(([127, 0, 0, 1], 4200));
    let mut listener = MultiplexListener::new(start, local, ConnInitSettings::default());
    let mut open: Vec<(SessionId, DuplexConnection)> = Vec::new();
    // The listener's SYN cookie per peer: a conclusion gets the one it was sent, so the
    // fuzzer reaches the handshake's second half without guessing a hash.
    let mut cookies = [0i32; 4];
    let mut now = start;
    let mut rest = data;
    while let [len, peer, tail @ ..] = rest {
        let (datagram, tail) = tail.split_at((*len as usize).min(tail.len()));
        rest = tail;
        now += Duration::from_millis(u64::from(peer & 0x1f) * 20);
        let from = SocketAddr::from(([127, 0, 0, 1 + (peer >> 6)], 5000));
        let parse = || Packet::parse(&mut Cursor::new(datagram), false).map(|p| (p, from));
        let mut parsed = parse();
        if let Ok((Packet::Control(ControlPacket { control_type: ControlTypes::Handshake(hs), .. }), _)) = &mut parsed
            && hs.shake_type == ShakeType::Conclusion
        {
            hs.syn_cookie = cookies[usize::from(peer >> 6)];
        }
        let mut input = Input::Packet(parsed.map_err(ReceivePacketError::from));
        for _ in 0..64 {
            let action = listener.handle_input(now, input);
            let next = NextInputContext::for_action(&action);
            input = match action {
                Action::RequestAccess(id, request) => {
                    let keys = (peer & 0x20 != 0).then(|| KeySettings {
                        key_size: request.key_size,
                        passphrase: "sluice-fuzz-passphrase".into(),
                    });
                    Input::AccessResponse(Some((id, AccessControlResponse::Accepted(keys))))
                }
                Action::OpenConnection(id, opened) => {
                    open.push((id, DuplexConnection::new(opened.1)));
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::DelegatePacket(id, packet) => {
                    if let Some((_, c)) = open.iter_mut().find(|(i, _)| *i == id) {
                        c.handle_packet_input(now, Ok(packet));
                    }
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::SendPacket((Packet::Control(ControlPacket { control_type: ControlTypes::Handshake(hs), .. }), to)) => {
                    if let std::net::IpAddr::V4(ip) = to.ip() {
                        cookies[usize::from(ip.octets()[3].wrapping_sub(1) & 3)] = hs.syn_cookie;
                    }
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::WaitForInput | Action::Close => break,
                _ => next.input_from(Ok::<(), ()>(())),
            };
        }
        for (_, c) in &mut open {
            if let Ok(packet) = parse() {
                c.handle_packet_input(now, Ok(packet));
            }
            c.check_timers(now);
            while c.next_packet(now).is_some() {}
            while c.next_data(now).is_some() {}
            let _ = c.statistics();
        }
        let _ = listener.handle_input(now, Input::Timer);
    }
});
