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
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
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

mod admission;
mod replay;

pub(super) use admission::admission_loop;
pub use replay::fuzz;

/// Access requests waiting for the admission side at most; more are refused 1503 at once.
pub(super) const PENDING_REQUESTS: usize = 1024;

/// The tokio side's way to the driver: the command, then a byte on a socket the driver polls
/// (`Inbox`), so the driver's thread needs no runtime of its own. Once every sender is gone
/// the socket reads as closed, which wakes the driver to stop.
#[derive(Clone)]
pub(super) struct Commands {
    tx: mpsc::UnboundedSender<Command>,
    wake: Arc<UnixStream>,
}

impl Commands {
    /// Err once the driver is gone.
    pub(super) fn send(&self, command: Command) -> Result<(), ()> {
        self.tx.send(command).map_err(drop)?;
        // A full socket means a wake is already waiting.
        let _ = (&*self.wake).write(&[1]);
        Ok(())
    }
}

/// The driver's end of `Commands`.
pub(super) struct Inbox {
    rx: mpsc::UnboundedReceiver<Command>,
    wake: UnixStream,
}

impl Inbox {
    /// Forgets the wakes so far (the commands themselves are read after, so none is missed).
    fn drain(&self) {
        let mut bytes = [0; 64];
        // Until nothing is left, or the end of the stream (the senders gone: `take_commands`
        // then finds the channel closed).
        while matches!((&self.wake).read(&mut bytes), Ok(n) if n > 0) {}
    }
}

/// A channel from the tokio side to the driver.
pub(super) fn commands() -> std::io::Result<(Commands, Inbox)> {
    let (wake, woken) = UnixStream::pair()?;
    wake.set_nonblocking(true)?;
    woken.set_nonblocking(true)?;
    let (tx, rx) = mpsc::unbounded_channel();
    Ok((Commands { tx, wake: Arc::new(wake) }, Inbox { rx, wake: woken }))
}

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
    commands: Inbox,
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
        commands: Inbox,
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
        if !self.take_commands(now) {
            return false;
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

    /// Applies the commands waiting; false on `Stop` or once every sender is gone.
    fn take_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.rx.try_recv() {
                Ok(command) => {
                    if !self.command(now, command) {
                        return false;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
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
    /// Rounds until `Command::Stop` (or every sender is gone), on the calling thread.
    ///
    /// Rounds are at least a tick apart and cost one wakeup each: until a tick after a round
    /// only a command wakes the driver (a decision to answer, a kick: carried out at once),
    /// and datagrams wait in the socket, which is not watched then. After it, a round at once
    /// if a timer is due or a datagram came; if not, the driver sleeps until a datagram, a
    /// timer or a command wants one. Each wait is one `ppoll`, with no runtime around it.
    pub(super) fn run(mut self) {
        loop {
            let started = Instant::now();
            if !self.round(started) || !self.commands_until(started + self.tick) {
                break;
            }
            let wake = self.next_timer(Instant::now());
            loop {
                let now = Instant::now();
                if wake <= now {
                    break;
                }
                let ready = self.io.wait(&self.commands.wake, true, wake - now);
                if ready.command {
                    self.commands.drain();
                    if !self.take_commands(Instant::now()) {
                        return self.stop();
                    }
                    self.io.flush();
                }
                // A datagram, the timeout, or a connection a command opened wants its round.
                if ready.datagram || !ready.command || self.next_timer(Instant::now()) < wake {
                    break;
                }
            }
        }
        self.stop();
    }

    /// Carries out commands as they come until `deadline`; false on `Stop`.
    fn commands_until(&mut self, deadline: Instant) -> bool {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            if self.io.wait(&self.commands.wake, false, deadline - now).command {
                self.commands.drain();
                if !self.take_commands(Instant::now()) {
                    return false;
                }
                self.io.flush();
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver on a loopback socket, run on its own thread; the receiver hears when `run`
    /// returns.
    fn running() -> (Commands, std::sync::mpsc::Receiver<()>) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let local = socket.local_addr().expect("address");
        let io = Io::new(socket).expect("io");
        let (requests, _asked) = mpsc::channel(PENDING_REQUESTS);
        let (commands, inbox) = commands().expect("a socket pair");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _asked = _asked;
            let driver = Driver::new(
                io,
                local,
                ConnInitSettings::default(),
                requests,
                inbox,
                LiveSet::default(),
                Duration::from_millis(10),
            );
            driver.run();
            let _ = done.send(());
        });
        (commands, finished)
    }

    #[test]
    fn an_idle_driver_wakes_for_a_stop() {
        let (commands, finished) = running();
        // Idle, it waits with no timer; the command's byte is what wakes it.
        assert!(finished.recv_timeout(Duration::from_millis(200)).is_err(), "ran off by itself");
        commands.send(Command::Stop).expect("the driver is there");
        finished.recv_timeout(Duration::from_secs(60)).expect("the driver stopped");
    }

    #[test]
    fn an_idle_driver_stops_once_every_sender_is_gone() {
        let (commands, finished) = running();
        let other = commands.clone();
        drop(commands);
        assert!(finished.recv_timeout(Duration::from_millis(200)).is_err(), "stopped with a sender left");
        drop(other);
        finished.recv_timeout(Duration::from_secs(60)).expect("the driver stopped");
    }
}
