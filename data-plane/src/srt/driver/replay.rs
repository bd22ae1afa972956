//! A transport that replays datagrams instead of a socket: the driver's unit tests and its
//! fuzz entry (`data-plane/fuzz`, target `srt_driver`).

use super::*;

/// A transport that replays datagrams instead of a socket (the fuzz entry and the tests): what
/// is pushed to `inbox` arrives at the next round; what the driver sends is serialized and
/// dropped, except the SYN cookie a handshake gives each peer, so its conclusion can carry it.
#[derive(Default)]
struct Replay {
    inbox: std::collections::VecDeque<srt_protocol::packet::ReceivePacketResult>,
    cookies: [i32; 4],
    sent: usize,
}

impl Replay {
    /// Peer `peer` (0 to 3) sends `datagram`.
    fn push(&mut self, peer: usize, datagram: &[u8]) {
        use srt_protocol::packet::{ControlPacket, ControlTypes, Packet, ShakeType};
        let from = SocketAddr::from(([127, 0, 0, 1 + (peer & 3) as u8], 5000));
        let mut parsed = Packet::parse(&mut std::io::Cursor::new(datagram), false)
            .map(|p| (p, from))
            .map_err(srt_protocol::packet::ReceivePacketError::from);
        if let Ok((Packet::Control(ControlPacket { control_type: ControlTypes::Handshake(hs), .. }), _)) = &mut parsed
            && hs.shake_type == ShakeType::Conclusion
        {
            hs.syn_cookie = self.cookies[peer & 3];
        }
        self.inbox.push_back(parsed);
    }
}

impl Transport for Replay {
    fn receive(&mut self, each: &mut dyn FnMut(srt_protocol::packet::ReceivePacketResult)) {
        while let Some(p) = self.inbox.pop_front() {
            each(p);
        }
    }
    fn queue(&mut self, packet: &srt_protocol::packet::Packet, to: SocketAddr) {
        use srt_protocol::packet::{ControlPacket, ControlTypes, Packet};
        if let Packet::Control(ControlPacket { control_type: ControlTypes::Handshake(hs), .. }) = packet
            && let std::net::IpAddr::V4(ip) = to.ip()
        {
            self.cookies[usize::from(ip.octets()[3].wrapping_sub(1) & 3)] = hs.syn_cookie;
        }
        let mut out = bytes::BytesMut::new();
        packet.serialize(&mut out);
        self.sent += 1;
    }
    fn flush(&mut self) {}
}

/// A driver over `Replay`, and the receiver of its access requests.
fn replay_driver() -> (Driver<Replay>, mpsc::Receiver<(SessionId, AccessControlRequest)>, Commands) {
    let (requests, asked) = mpsc::channel(PENDING_REQUESTS);
    let (commands, received) = commands().expect("a socket pair");
    let local = SocketAddr::from(([127, 0, 0, 1], 4200));
    let driver = Driver::new(
        Replay::default(),
        local,
        ConnInitSettings::default(),
        requests,
        received,
        LiveSet::default(),
        Duration::from_millis(5),
    );
    (driver, asked, commands)
}

/// The fuzz entry (`data-plane/fuzz`, target `srt_driver`): datagrams from four peers into the
/// driver itself (its listener, access answers, connections, streams and players, kicks,
/// timers) over `Replay`, with the clock moved by the input. Input: records of
/// `[length, control, bytes...]`; `control` picks the peer (2 bits), how far the clock moves
/// (3 bits), and how an access request is answered (3 bits: refused, a publisher or a player
/// of one of two streams, with or without a passphrase; 7 also kicks the session).
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let (mut driver, mut asked, _commands) = replay_driver();
    let stats = crate::stats::MediaStats::new();
    let app = sluice_events::AppName::parse("fuzz").expect("a valid name");
    let streams = ["a", "b"].map(|s| sluice_events::StreamName::parse(s).expect("a valid name"));
    let mut held = Vec::new();
    let mut next_id = 0u64;
    let mut now = Instant::now();
    let mut rest = data;
    while let [len, control, tail @ ..] = rest {
        let (datagram, tail) = tail.split_at((*len as usize).min(tail.len()));
        rest = tail;
        now += Duration::from_millis(u64::from((control >> 2) & 7) * 15);
        driver.io.push(usize::from(control & 3), datagram);
        driver.round(now);
        // The admission side's answers, as `control`'s top bits say.
        let answer = control >> 5;
        while let Ok((session, request)) = asked.try_recv() {
            let verdict = if answer == 0 {
                Err(RejectReason::Server(ServerRejectReason::Forbidden))
            } else {
                let key = (app.clone(), streams[usize::from(answer & 1)].clone());
                let publishing = (answer & 2 != 0).then(|| stats.stream_started("fuzz", key.1.as_str(), "srt", None));
                let keys = (answer & 4 != 0)
                    .then(|| KeySettings { key_size: request.key_size, passphrase: "sluice-fuzz-passphrase".into() });
                let (tx, rx) = oneshot::channel();
                held.push(rx);
                next_id += 1;
                Ok(Role { id: next_id, keys, key, publishing, _held: tx })
            };
            driver.command(now, Command::Decided { session, verdict });
            if answer == 7 {
                driver.command(now, Command::End { session, id: next_id });
            }
        }
        driver.round(now);
    }
    // Time runs on with nothing arriving: timers, releases, idle and peer timeouts.
    for _ in 0..8 {
        now += Duration::from_secs(2);
        driver.round(now);
    }
    driver.command(now, Command::Stop);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An induction and a conclusion with a streamid, from srt-protocol's test vectors of the
    /// reference implementation (the fuzz targets' seeds).
    const HANDSHAKE: [&str; 2] = [
        "8000000000000000000002b00000000000000004000000023c3b0296000005dc00002000000000010669ead20000000000000000000000000000000001000000",
        "800000000000000000000b1400000000000000050000000563444b2e000005dc00002000ffffffff37eb0ee52154fbd60100007f0000000000000000000000000001000300010401000000bf0014001400050003646362616867666500006a69",
    ];

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len()).step_by(2).map(|j| u8::from_str_radix(&hex[j..j + 2], 16).unwrap()).collect()
    }

    /// Inputs the fuzzer found that panicked the driver (`data-plane/fuzz/regressions`).
    #[test]
    fn the_fuzzers_crashes_do_not_panic() {
        // A caller's key material with no key flag, answered with a passphrase: srt-protocol
        // unwrapped 8 bytes of wrap and asserted more than 16 (data-plane/vendor/README.md).
        fuzz(include_bytes!("../../../fuzz/regressions/srt_driver-key-material-without-key"));
    }

    #[test]
    fn a_caller_is_asked_about_then_live_until_kicked_and_its_admission_is_released() {
        let (mut driver, mut asked, _commands) = replay_driver();
        let mut now = Instant::now();
        for hex in HANDSHAKE {
            driver.io.push(0, &bytes(hex));
            driver.round(now);
            now += Duration::from_millis(10);
        }
        let (session, request) = asked.try_recv().expect("the listener asks about the caller");
        assert_eq!(session.0, SocketAddr::from(([127, 0, 0, 1], 5000)));
        assert!(request.stream_id.is_some(), "the streamid reaches the admission side");
        assert!(asked.try_recv().is_err(), "asked once");

        let stats = crate::stats::MediaStats::new();
        let key = (sluice_events::AppName::parse("live").unwrap(), sluice_events::StreamName::parse("cam").unwrap());
        let (held, mut released) = oneshot::channel();
        let counters = stats.stream_started("live", "cam", "srt", None);
        let role = Role { id: 7, keys: None, key: key.clone(), publishing: Some(counters), _held: held };
        let sent = driver.io.sent;
        driver.command(now, Command::Decided { session, verdict: Ok(role) });
        assert!(driver.io.sent > sent, "the conclusion is answered");
        assert!(driver.conns.contains_key(&session), "the connection is open");
        assert!(driver.live.lock().unwrap().contains(&key), "its stream is live for plays");
        assert!(released.try_recv().is_err(), "the admission is held while the connection lives");

        // A kick for another admission of the same address changes nothing; its own ends it.
        driver.command(now, Command::End { session, id: 6 });
        driver.round(now);
        assert!(driver.conns.contains_key(&session));
        driver.command(now, Command::End { session, id: 7 });
        now += Duration::from_millis(10);
        driver.round(now);
        assert!(!driver.conns.contains_key(&session), "kicked");
        assert!(driver.live.lock().unwrap().is_empty(), "its stream is no longer live");
        assert!(matches!(released.try_recv(), Err(oneshot::error::TryRecvError::Closed)), "the admission is released");
    }

    #[test]
    fn a_refused_caller_gets_no_connection_and_garbage_changes_nothing() {
        let (mut driver, mut asked, _commands) = replay_driver();
        let now = Instant::now();
        for hex in HANDSHAKE {
            driver.io.push(1, &bytes(hex));
            driver.round(now);
        }
        let (session, _) = asked.try_recv().expect("asked");
        let sent = driver.io.sent;
        driver.command(
            now,
            Command::Decided { session, verdict: Err(RejectReason::Server(ServerRejectReason::Forbidden)) },
        );
        assert!(driver.io.sent > sent, "the rejection is sent");
        assert!(driver.conns.is_empty() && driver.pending.is_empty());
        for junk in [&b""[..], &[0xff; 3], &[0x80; 64], &bytes(HANDSHAKE[1])[..20]] {
            driver.io.push(2, junk);
            driver.round(now);
        }
        assert!(driver.conns.is_empty() && asked.try_recv().is_err());
        // The fuzz entry runs the same paths with every answer.
        let records: Vec<u8> = HANDSHAKE
            .iter()
            .flat_map(|h| {
                let b = bytes(h);
                [vec![b.len() as u8, 0x40], b].concat()
            })
            .collect();
        fuzz(&records);
    }
}
