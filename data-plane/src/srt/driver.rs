//! The batched SRT driver (issue #21): every SRT connection of the worker driven by one loop
//! on one thread, over srt-protocol's sans-IO listener and connections, with no task and no
//! channel per connection.
//!
//! A round reads what has arrived, applies the admission side's answers and kicks, releases
//! each publisher's packets to its players (one shared `Bytes` per packet, whatever the number
//! of players), runs every connection whose timer is due, and sends what they produced with
//! `sendmmsg` and GSO (`udp.rs`). Rounds are at least `tick` apart, so a round gathers several
//! packets per player (SRT paces a player's packets at the stream's rate) and the system calls
//! and wakeups are per round, not per packet per player.
//!
//! Deciding stays on the tokio runtime: the listener's access request goes to `admission_loop`,
//! which decides it (`super::verdict`) and answers with a `Command`. An admitted session is
//! held there by a guard task until the driver lets go of its connection, and the guard turns
//! the session's end (kick on change) into `Command::End`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use srt_protocol::connection::{Connection, DuplexConnection};
use srt_protocol::listener::{
    AccessControlRequest, AccessControlResponse, Action, Input, MultiplexListener, NextInputContext, ResultOf,
    SessionId,
};
use srt_protocol::packet::{RejectReason, ServerRejectReason};
use srt_protocol::settings::{ConnInitSettings, KeySettings};
use tokio::sync::{mpsc, oneshot};

use super::feed::Gop;
use super::link::{PlayerLink, publisher_link};
use super::udp::{Io, Transport};
use super::{Accepted, Caller, IDLE_TIMEOUT, verdict};
use crate::admit::{Admission, Admitted};
use crate::limits::Permit;
use crate::slot::Key;
use crate::stats::StreamCounters;

/// Access requests waiting for the admission side at most; more are refused 1503 at once.
pub(super) const PENDING_REQUESTS: usize = 1024;

/// What the tokio side tells the driver.
pub(super) enum Command {
    /// The answer to a caller's access request.
    Decided {
        session: SessionId,
        verdict: Result<Role, RejectReason>,
    },
    /// A session that is no longer allowed (its admission `id`).
    End {
        session: SessionId,
        id: u64,
    },
    Stop,
}

/// An admitted caller as the driver holds it.
pub(super) struct Role {
    /// The admission's session id (a caller's address can come back as another session).
    id: u64,
    keys: Option<KeySettings>,
    key: Key,
    /// A publisher's stream counters; `None` for a player.
    publishing: Option<Arc<StreamCounters>>,
    /// Dropped with the connection: the guard then releases the admission.
    _held: oneshot::Sender<()>,
}

enum Kind {
    Publisher { counters: Arc<StreamCounters>, last_data: Instant },
    Player { counters: Arc<StreamCounters>, reported: PlayerLink },
}

struct Conn {
    conn: DuplexConnection,
    role: Role,
    kind: Kind,
    /// When its timers next need it.
    next: Instant,
}

struct Stream {
    publisher: SessionId,
    counters: Arc<StreamCounters>,
    gop: Gop,
    players: Vec<SessionId>,
}

/// Which streams have a publisher on this worker, for deciding plays.
pub(super) type LiveSet = Arc<Mutex<HashSet<Key>>>;

pub(super) struct Driver<T: Transport = Io> {
    listener: MultiplexListener,
    io: T,
    requests: mpsc::Sender<(SessionId, AccessControlRequest)>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Accepted, waiting for the handshake to open the connection.
    pending: HashMap<SessionId, Role>,
    conns: HashMap<SessionId, Conn>,
    streams: HashMap<Key, Stream>,
    live: LiveSet,
    tick: Duration,
    /// Packets a publisher released this round, by stream.
    released: Vec<(Key, Bytes)>,
}

impl<T: Transport> Driver<T> {
    pub(super) fn new(
        io: T,
        local: SocketAddr,
        settings: ConnInitSettings,
        requests: mpsc::Sender<(SessionId, AccessControlRequest)>,
        commands: mpsc::UnboundedReceiver<Command>,
        live: LiveSet,
        tick: Duration,
    ) -> Driver<T> {
        Driver {
            listener: MultiplexListener::new(Instant::now(), local, settings),
            io,
            requests,
            commands,
            pending: HashMap::new(),
            conns: HashMap::new(),
            streams: HashMap::new(),
            live,
            tick,
            released: Vec::new(),
        }
    }

    /// One round; false once the driver is told to stop.
    fn round(&mut self, now: Instant) -> bool {
        let mut received = Vec::new();
        self.io.receive(&mut |packet| received.push(packet));
        for packet in received {
            self.listen(now, Input::Packet(packet));
        }
        while let Ok(command) = self.commands.try_recv() {
            if !self.command(now, command) {
                return false;
            }
        }
        self.run_timers(now);
        self.io.flush();
        true
    }

    /// When a connection's timers next need a round; with none, nothing but a datagram or a
    /// command does (the listener keeps no timer of ours).
    fn next_timer(&self, now: Instant) -> Instant {
        self.conns.values().map(|c| c.next).min().unwrap_or(now + Duration::from_secs(3600))
    }

    /// Feeds the listener one input and carries out what it asks until it waits.
    fn listen(&mut self, now: Instant, input: Input) {
        let mut input = input;
        // A handful of actions per input at most; the bound only guards against a loop.
        for _ in 0..64 {
            let action = self.listener.handle_input(now, input);
            let next = NextInputContext::for_action(&action);
            input = match action {
                Action::SendPacket((packet, to)) => {
                    self.io.queue(&packet, to);
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::RequestAccess(session, request) => match self.requests.try_send((session, request)) {
                    Ok(()) => next.input_from(Ok::<(), ()>(())),
                    Err(_) => Input::AccessResponse(Some((
                        session,
                        AccessControlResponse::Rejected(RejectReason::Server(ServerRejectReason::Down)),
                    ))),
                },
                Action::RejectConnection(session, packet) => {
                    self.pending.remove(&session);
                    if let Some((packet, to)) = packet {
                        self.io.queue(&packet, to);
                    }
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::OpenConnection(session, opened) => {
                    let (packet, connection) = *opened;
                    if let Some((packet, to)) = packet {
                        self.io.queue(&packet, to);
                    }
                    let opened = self.open(now, session, connection);
                    next.input_from(opened)
                }
                Action::DelegatePacket(session, packet) => match self.conns.get_mut(&session) {
                    Some(c) => {
                        c.conn.handle_packet_input(now, Ok(packet));
                        c.next = now;
                        next.input_from(Ok::<(), ()>(()))
                    }
                    None => next.input_from(Err::<(), ()>(())),
                },
                Action::DropConnection(session) => {
                    self.pending.remove(&session);
                    self.remove(now, session);
                    next.input_from(Ok::<(), ()>(()))
                }
                Action::UpdateStatistics(_) => next.input_from(Ok::<(), ()>(())),
                Action::WaitForInput | Action::Close => return,
            };
        }
    }

    /// Applies a command; false for `Stop`.
    fn command(&mut self, now: Instant, command: Command) -> bool {
        match command {
            Command::Decided { session, verdict } => {
                let response = match verdict {
                    // Nothing live to play any more (its publisher left while it was decided).
                    Ok(role) if role.publishing.is_none() && !self.streams.contains_key(&role.key) => {
                        AccessControlResponse::Rejected(RejectReason::Server(ServerRejectReason::Notfound))
                    }
                    Ok(role) => {
                        let keys = role.keys.clone();
                        self.pending.insert(session, role);
                        AccessControlResponse::Accepted(keys)
                    }
                    Err(reason) => AccessControlResponse::Rejected(reason),
                };
                self.listen(now, Input::AccessResponse(Some((session, response))));
            }
            Command::End { session, id } => {
                if self.conns.get(&session).is_some_and(|c| c.role.id == id) {
                    self.end(now, session);
                }
            }
            Command::Stop => return false,
        }
        true
    }

    fn open(&mut self, now: Instant, session: SessionId, connection: Connection) -> Result<(), ()> {
        let role = self.pending.remove(&session).ok_or(())?;
        let conn = DuplexConnection::new(connection);
        let peer = session.0;
        let kind = match &role.publishing {
            Some(counters) => {
                let (rtt, latency) = (conn.settings().rtt, conn.settings().recv_tsbpd_latency);
                counters.srt_link(|l| {
                    l.rtt_us = rtt.as_micros() as u64;
                    l.latency_ms = latency.as_millis() as u64;
                });
                self.streams.insert(
                    role.key.clone(),
                    Stream { publisher: session, counters: counters.clone(), gop: Gop::default(), players: Vec::new() },
                );
                self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(role.key.clone());
                tracing::info!(%peer, app = %role.key.0, stream = %role.key.1, "SRT publisher live");
                Kind::Publisher { counters: counters.clone(), last_data: now }
            }
            None => {
                let Some(stream) = self.streams.get_mut(&role.key) else {
                    // Gone between the answer and the handshake's end: shut down at once (the
                    // listener forgets the session at its next datagram).
                    let mut conn = conn;
                    conn.on_peer_idle_timeout(now);
                    while let Some((packet, to)) = conn.next_packet(now) {
                        self.io.queue(&packet, to);
                    }
                    return Err(());
                };
                stream.players.push(session);
                let counters = stream.counters.clone();
                counters.players.fetch_add(1, Ordering::Relaxed);
                Kind::Player { counters, reported: PlayerLink::default() }
            }
        };
        let mut c = Conn { conn, role, kind, next: now };
        // The GOP so far first, so the player decodes at once instead of waiting for the
        // publisher's next keyframe.
        if let Kind::Player { counters, .. } = &c.kind
            && let Some(stream) = self.streams.get(&c.role.key)
        {
            for data in stream.gop.packets() {
                counters.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                c.conn.handle_data_input(now, Some((now, data.clone())));
            }
        }
        self.conns.insert(session, c);
        Ok(())
    }

    /// Ends a connection at once: a shutdown packet is its last datagram (nothing buffered is
    /// sent; srt-protocol's own close would drain for twice the latency first), then it is
    /// forgotten, by the listener too.
    fn end(&mut self, now: Instant, session: SessionId) {
        let Some(c) = self.conns.get_mut(&session) else { return };
        c.conn.on_peer_idle_timeout(now);
        while let Some((packet, to)) = c.conn.next_packet(now) {
            if matches!(packet, srt_protocol::packet::Packet::Control(_)) {
                self.io.queue(&packet, to);
            }
        }
        self.remove(now, session);
        self.listen(now, Input::Success(ResultOf::DropConnection(session)));
    }

    /// Forgets a connection: its stream if it published it, its place among the players; the
    /// admission it held is released with its `Role`.
    fn remove(&mut self, now: Instant, session: SessionId) {
        let Some(c) = self.conns.remove(&session) else { return };
        match c.kind {
            Kind::Publisher { .. } => {
                if self.streams.get(&c.role.key).is_some_and(|s| s.publisher == session) {
                    let stream = self.streams.remove(&c.role.key).expect("checked");
                    self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&c.role.key);
                    // Its players end once they have sent what they hold.
                    for player in stream.players {
                        if let Some(p) = self.conns.get_mut(&player) {
                            p.conn.handle_data_input(now, None);
                            p.next = now;
                        }
                    }
                }
            }
            Kind::Player { counters, .. } => {
                counters.players.fetch_sub(1, Ordering::Relaxed);
                if let Some(stream) = self.streams.get_mut(&c.role.key) {
                    stream.players.retain(|p| *p != session);
                }
            }
        }
    }

    /// Runs the connections whose timers are due: publishers first, so the packets they
    /// release reach their players in the same round.
    fn run_timers(&mut self, now: Instant) {
        let (mut closed, mut ending) = (Vec::new(), Vec::new());
        for (session, c) in self.conns.iter_mut() {
            if let Kind::Publisher { .. } = c.kind
                && c.next <= now
            {
                if drive(c, now, &mut self.io, &mut self.released) {
                    ending.push(*session);
                } else if !c.conn.is_open() {
                    closed.push(*session);
                }
            }
        }
        for (key, data) in self.released.drain(..) {
            let Some(stream) = self.streams.get_mut(&key) else { continue };
            stream.gop.push(&data);
            let n = data.len() as u64;
            for player in &stream.players {
                if let Some(p) = self.conns.get_mut(player) {
                    p.conn.handle_data_input(now, Some((now, data.clone())));
                    p.next = now;
                    if let Kind::Player { counters, .. } = &p.kind {
                        counters.bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
        let mut none = Vec::new();
        for (session, c) in self.conns.iter_mut() {
            if let Kind::Player { .. } = c.kind
                && c.next <= now
            {
                if drive(c, now, &mut self.io, &mut none) {
                    ending.push(*session);
                } else if !c.conn.is_open() {
                    closed.push(*session);
                }
            }
        }
        for session in ending {
            self.end(now, session);
        }
        for session in closed {
            self.remove(now, session);
            // The listener forgets the session too, so the address can call again.
            self.listen(now, Input::Success(ResultOf::DropConnection(session)));
        }
    }
}

impl Driver<Io> {
    /// Rounds until `Command::Stop` (or every sender is gone).
    pub(super) async fn run(mut self) {
        loop {
            let started = Instant::now();
            if !self.round(started) {
                break;
            }
            // Busy (a timer due within a tick): the next round a tick after this one, one
            // wakeup a round, and a datagram waits for it. Quiet: a round as soon as a timer
            // or a datagram wants one, but not before a tick has passed. Either way a command
            // (a decision to answer, a kick) is carried out the moment it comes.
            let earliest = started + self.tick;
            let busy = self.next_timer(started) <= earliest;
            let wake = if busy { earliest } else { self.next_timer(started) };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => break,
                    _ = self.io.readable(), if !busy => {
                        tokio::time::sleep_until(earliest.into()).await;
                        break;
                    }
                    command = self.commands.recv() => {
                        let Some(command) = command else { return self.stop() };
                        if !self.command(Instant::now(), command) {
                            return self.stop();
                        }
                        self.io.flush();
                        // A connection it opened wants its round before the quiet wake.
                        if !busy && self.next_timer(Instant::now()) < wake {
                            break;
                        }
                    }
                }
            }
        }
        self.stop();
    }

    /// The worker stops: every connection gets a shutdown packet.
    fn stop(&mut self) {
        let now = Instant::now();
        for c in self.conns.values_mut() {
            c.conn.on_peer_idle_timeout(now);
            while let Some((p, to)) = c.conn.next_packet(now) {
                self.io.queue(&p, to);
            }
        }
        self.io.flush();
    }
}

/// Runs one connection's timers and collects what it sends (into the round's datagrams) and,
/// for a publisher, the packets it releases; true if it must end now (a silent publisher).
fn drive(c: &mut Conn, now: Instant, io: &mut impl Transport, released: &mut Vec<(Key, Bytes)>) -> bool {
    if c.conn.should_update_statistics(now) {
        c.conn.update_statistics(now);
        let s = c.conn.statistics();
        match &mut c.kind {
            Kind::Publisher { counters, .. } => counters.srt_link(|l| publisher_link(l, s)),
            Kind::Player { counters, reported } => {
                let link = PlayerLink::of(s);
                counters.srt_link(|l| link.add_since(reported, l));
                *reported = link;
            }
        }
    }
    c.conn.check_timers(now);
    if let Kind::Publisher { counters, last_data } = &mut c.kind {
        while let Some((_, data)) = c.conn.next_data(now) {
            counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            *last_data = now;
            released.push((c.role.key.clone(), data));
        }
        if now.saturating_duration_since(*last_data) > IDLE_TIMEOUT && c.conn.is_open() {
            tracing::debug!(peer = %c.conn.settings().remote, "SRT publisher idle; closing");
            return true;
        }
    }
    while let Some((packet, to)) = c.conn.next_packet(now) {
        io.queue(&packet, to);
    }
    c.next = c.conn.next_timer(now);
    false
}

/// Decides the listener's access requests on the tokio runtime, one task each, and answers
/// the driver; an admitted session is then held by its guard.
pub(super) async fn admission_loop(
    mut requests: mpsc::Receiver<(SessionId, AccessControlRequest)>,
    commands: mpsc::UnboundedSender<Command>,
    admission: Admission,
    live: LiveSet,
) {
    while let Some((session, request)) = requests.recv().await {
        let (commands, admission, live) = (commands.clone(), admission.clone(), live.clone());
        tokio::spawn(async move {
            let matches = |k: &KeySettings| request.passphrase_matches(k);
            let caller = Caller {
                remote: request.remote,
                stream_id: request.stream_id.as_ref().map(|s| s.as_bytes()),
                key_size: request.key_size,
                passphrase_matches: &matches,
            };
            let is_live = |k: &Key| live.lock().unwrap_or_else(|p| p.into_inner()).contains(k);
            match verdict(caller, &admission, is_live).await {
                Err(reason) => {
                    let _ = commands.send(Command::Decided { session, verdict: Err(reason) });
                }
                Ok(Accepted { keys, admitted, permit }) => {
                    let (held, released) = oneshot::channel();
                    let role = Role {
                        id: admitted.session.id,
                        keys,
                        key: admitted.key.clone(),
                        publishing: admitted.publishing.as_ref().map(|p| p.counters.clone()),
                        _held: held,
                    };
                    if commands.send(Command::Decided { session, verdict: Ok(role) }).is_ok() {
                        guard(session, admitted, permit, released, commands).await;
                    }
                }
            }
        });
    }
}

/// Holds an admitted session until the driver lets go of its connection, and tells the
/// driver when the session must end.
async fn guard(
    session: SessionId,
    mut admitted: Admitted,
    permit: Permit,
    mut released: oneshot::Receiver<()>,
    commands: mpsc::UnboundedSender<Command>,
) {
    tokio::select! {
        reason = admitted.session.ended() => {
            tracing::info!(peer = %session.0, reason = reason.as_str(), "SRT session ended: no longer allowed");
            let _ = commands.send(Command::End { session, id: admitted.session.id });
            let _ = released.await;
        }
        _ = &mut released => {}
    }
    // The slot, the stream's counters, the session's registration and the connection's
    // place under the limit end here.
    drop(admitted);
    drop(permit);
}

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
fn replay_driver() -> (Driver<Replay>, mpsc::Receiver<(SessionId, AccessControlRequest)>, mpsc::UnboundedSender<Command>)
{
    let (requests, asked) = mpsc::channel(PENDING_REQUESTS);
    let (commands, received) = mpsc::unbounded_channel();
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
