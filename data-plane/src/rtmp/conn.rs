//! One RTMP connection: handshake, rml_rtmp's session, publish and play requests turned into
//! admissions, media into the hub, and the end.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent, Split, Splitable};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult};
use sluice_events::{AccessRequest, Action, Reason};
use tokio::sync::oneshot;

use super::chunk::{Media, audio, video};
use super::ctx::{AdmitJob, Ctx};
use super::hub::{Key, Player};
use super::input::{access_request, guarded_input, within_max_message};
use super::writer::{Out, Outbox, aborted, outbox, writer};
use crate::admit::{Admitted, Publishing, Refusal};
use crate::sessions::Session;

/// How long a client may take to finish the handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A player may stay silent far longer: it only acknowledges its window now and then.
pub(super) const PLAYER_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// After a refusal, how long the worker keeps reading (and discarding) before it closes. The
/// refusal and a half-close go out first; a client still writing meanwhile (librtmp sends its
/// next commands without waiting) must not meet a reset socket: librtmp dies of SIGPIPE then,
/// without printing anything.
pub(super) const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// What a connection is doing.
pub(super) enum Role {
    None,
    /// Holds the stream's publisher slot and counters until the connection ends.
    Publisher(Key, Publishing),
    Player(Key),
}

pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) ctx: Rc<Ctx>,
    pub(super) session: Rc<RefCell<ServerSession>>,
    pub(super) out: Outbox,
    pub(super) role: Role,
    pub(super) closed: Rc<Cell<bool>>,
    /// Dropped when the connection ends: the kick watcher then unregisters the session.
    pub(super) done: Vec<futures::channel::oneshot::Sender<()>>,
    /// Input bytes since the last complete message.
    pub(super) unfinished: usize,
    /// Until the connection publishes or plays, its input is fed a message at a time.
    pub(super) splitter: Option<super::input::Splitter>,
    /// A refusal went out: the connection lingers (`REFUSAL_LINGER`) before it closes.
    pub(super) refused: bool,
}

/// Serves one RTMP connection; `prefix`: bytes already read from it (after a PROXY header).
pub(super) async fn connection<S>(stream: S, peer: SocketAddr, id: u64, ctx: Rc<Ctx>, prefix: Vec<u8>)
where
    S: Split + AsyncReadRent + AsyncWriteRent + 'static,
{
    let (mut rd, wr) = stream.into_split();
    let (out, out_rx, mut abort, abort_writer) = outbox();
    monoio::spawn(writer(wr, out_rx, abort_writer));
    // The whole pre-session phase (handshake, connect, the publish or play command) has one
    // deadline from accept, whatever trickles in meanwhile: a byte every few seconds must not
    // hold a connection open for ever (slowloris).
    let session_deadline = Instant::now() + ctx.idle_timeout;
    // Handshake, bounded in time.
    let mut hs = Handshake::new(PeerType::Server);
    let handshake_time = HANDSHAKE_TIMEOUT.min(ctx.idle_timeout);
    let leftover = match monoio::time::timeout(handshake_time, handshake(&mut rd, &mut hs, &out, prefix)).await {
        Ok(Ok(rest)) => rest,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "RTMP handshake failed");
            let _ = out.unbounded_send(Out::Close);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "RTMP handshake timed out");
            let _ = out.unbounded_send(Out::Close);
            return;
        }
    };
    let (session, results) = match ServerSession::new(ServerSessionConfig::new()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = ?e, "RTMP session setup failed");
            let _ = out.unbounded_send(Out::Close);
            return;
        }
    };
    let mut conn = Conn {
        id,
        peer,
        ctx,
        session: Rc::new(RefCell::new(session)),
        out,
        role: Role::None,
        closed: Rc::new(Cell::new(false)),
        done: Vec::new(),
        unfinished: 0,
        splitter: Some(super::input::Splitter::default()),
        refused: false,
    };
    let mut ok = conn.results(results).await;
    if ok && !leftover.is_empty() {
        ok = conn.input(&leftover).await;
    }
    // Small until the peer sends a lot (players send almost nothing; publishers grow it).
    let mut buf = vec![0u8; 4096];
    while ok && !conn.closed.get() {
        // A player only acknowledges now and then (the window it was given is large); its
        // connection lives until it closes or a write fails. Anyone else must keep talking.
        let idle = match conn.role {
            Role::Player(_) => PLAYER_IDLE_TIMEOUT,
            Role::Publisher(..) => conn.ctx.idle_timeout,
            Role::None => match session_deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    tracing::debug!(%peer, "RTMP connection did not publish or play in time; closing");
                    break;
                }
            },
        };
        let read = monoio::select! {
            r = monoio::time::timeout(idle, rd.read(buf)) => r,
            _ = aborted(&mut abort) => break,
        };
        let (res, b) = match read {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!(%peer, "RTMP connection idle; closing");
                break;
            }
        };
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let data = buf[..n].to_vec();
                ok = conn.input(&data).await;
                if n == buf.len() && buf.len() < 64 * 1024 {
                    buf = vec![0u8; buf.len() * 4];
                }
            }
        }
    }
    if conn.refused {
        linger(&mut rd, vec![0u8; 4096], REFUSAL_LINGER).await;
    }
    conn.finish();
}

/// Reads and discards until the peer closes, fails, or `bound` passes.
async fn linger(rd: &mut impl AsyncReadRent, mut buf: Vec<u8>, bound: Duration) {
    let until = Instant::now() + bound;
    while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        match monoio::time::timeout(left, rd.read(buf)).await {
            Ok((Ok(n), b)) if n > 0 => buf = b,
            _ => return,
        }
    }
}

pub(super) async fn handshake(
    rd: &mut impl AsyncReadRent,
    hs: &mut Handshake,
    out: &Outbox,
    mut prefix: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 4096];
    loop {
        let input = if prefix.is_empty() {
            let (res, b) = rd.read(buf).await;
            buf = b;
            let n = res.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during the handshake".into());
            }
            buf[..n].to_vec()
        } else {
            std::mem::take(&mut prefix)
        };
        match hs.process_bytes(&input).map_err(|e| format!("{e:?}"))? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                if !response_bytes.is_empty() {
                    let _ = out.unbounded_send(Out::Bytes(response_bytes));
                }
            }
            HandshakeProcessResult::Completed { response_bytes, remaining_bytes } => {
                if !response_bytes.is_empty() {
                    let _ = out.unbounded_send(Out::Bytes(response_bytes));
                }
                return Ok(remaining_bytes);
            }
        }
    }
}

impl Conn {
    pub(super) fn send(&self, bytes: Vec<u8>) {
        let _ = self.out.unbounded_send(Out::Bytes(bytes));
    }

    /// Feeds bytes from the client; false ends the connection. Before the connection
    /// publishes or plays, a message at a time, each answered before the next is read
    /// (`input::Splitter`).
    pub(super) async fn input(&mut self, data: &[u8]) -> bool {
        if !matches!(self.role, Role::None) {
            self.splitter = None;
        }
        let Some(splitter) = self.splitter.as_mut() else { return self.feed(data).await };
        let cuts = match splitter.split(data) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "RTMP input refused; closing");
                return false;
            }
        };
        let mut at = 0;
        for len in cuts {
            if !self.feed(&data[at..at + len]).await {
                return false;
            }
            at += len;
            if !matches!(self.role, Role::None) {
                // Publishing or playing: the rest goes in as it comes.
                self.splitter = None;
                return at == data.len() || self.feed(&data[at..]).await;
            }
        }
        true
    }

    async fn feed(&mut self, data: &[u8]) -> bool {
        let results = match guarded_input(&mut self.session.borrow_mut(), data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "RTMP input refused; closing");
                return false;
            }
        };
        if !within_max_message(&mut self.unfinished, &results, data.len(), self.ctx.max_message) {
            tracing::info!(
                peer = %self.peer,
                bytes = self.unfinished,
                max = self.ctx.max_message,
                "RTMP message larger than SLUICE_RTMP_MAX_MESSAGE_BYTES; closing"
            );
            return false;
        }
        self.results(results).await
    }

    pub(super) async fn results(&mut self, results: Vec<ServerSessionResult>) -> bool {
        for r in results {
            match r {
                ServerSessionResult::OutboundResponse(p) => self.send(p.bytes),
                ServerSessionResult::RaisedEvent(e) => {
                    if !self.event(e).await {
                        return false;
                    }
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
        true
    }

    pub(super) fn accept(&mut self, request_id: u32) -> bool {
        let accepted = self.session.borrow_mut().accept_request(request_id);
        match accepted {
            Ok(results) => {
                for r in results {
                    if let ServerSessionResult::OutboundResponse(p) = r {
                        self.send(p.bytes);
                    }
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = ?e, "RTMP accept failed");
                false
            }
        }
    }

    /// Refuses the request as nginx-rtmp and SRS do, so every client shows why: `onStatus`
    /// with level `error`, `code`, and the reason in `description`, on the request's message
    /// stream (`stream_id`; 1 for a publish, which rml_rtmp does not report and every client
    /// uses), then rml_rtmp's `_error` result for the command, then the connection closes.
    pub(super) fn refuse(&mut self, request_id: u32, stream_id: u32, code: &str, reason: &str) -> bool {
        if let Some(status) = super::chunk::status_error(stream_id, code, reason) {
            self.send(status.to_vec());
        }
        if let Ok(results) = self.session.borrow_mut().reject_request(request_id, code, reason) {
            for r in results {
                if let ServerSessionResult::OutboundResponse(p) = r {
                    self.send(p.bytes);
                }
            }
        }
        let _ = self.out.unbounded_send(Out::Close);
        self.refused = true;
        false
    }

    /// Has a request that could not be read recorded (`Reason::Malformed`), without waiting.
    fn record_malformed(&self, action: Action) {
        let request =
            AccessRequest::malformed(uuid::Uuid::now_v7(), action, sluice_events::Protocol::Rtmp, self.peer.ip());
        let (reply, _) = oneshot::channel();
        if self.ctx.jobs.try_send(AdmitJob { request, live: false, malformed: true, live_as: None, reply }).is_err() {
            tracing::debug!(peer = %self.peer, "a malformed request was not recorded: the admission queue is full");
        }
    }

    /// The worker's admission step, on the tokio thread.
    async fn admit(&self, request: AccessRequest) -> Result<Admitted, Refusal> {
        let (reply, answer) = oneshot::channel();
        let live = request.action == Action::Publish || self.ctx.live(&(request.app.clone(), request.stream.clone()));
        // Not live under the name asked for: the admission step looks under the public name
        // it resolves to (another player id of a publisher).
        let live_as = (!live).then(|| {
            let directory = self.ctx.directory.clone();
            super::ctx::LiveCheck(Box::new(move |key| directory.live(key).is_some()))
        });
        let job = AdmitJob { request, live, malformed: false, live_as, reply };
        if self.ctx.jobs.try_send(job).is_err() {
            return Err(Refusal::Unavailable("the admission queue is full".to_owned()));
        }
        answer.await.unwrap_or_else(|_| Err(Refusal::Unavailable("the admission step stopped".to_owned())))
    }

    pub(super) async fn event(&mut self, e: ServerSessionEvent) -> bool {
        match e {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => self.accept(request_id),

            ServerSessionEvent::PublishStreamRequested { request_id, app_name, stream_key, .. } => {
                self.publish(request_id, &app_name, &stream_key).await
            }
            ServerSessionEvent::PlayStreamRequested { request_id, app_name, stream_key, stream_id, .. } => {
                self.play(request_id, &app_name, &stream_key, stream_id).await
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let Role::Publisher(key, _) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, Media::Metadata(Arc::new(metadata)));
                }
                true
            }
            ServerSessionEvent::VideoDataReceived { data, timestamp, .. } => {
                if let Role::Publisher(key, _) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, video(data, timestamp));
                }
                true
            }
            ServerSessionEvent::AudioDataReceived { data, timestamp, .. } => {
                if let Role::Publisher(key, _) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, audio(data, timestamp));
                }
                true
            }
            ServerSessionEvent::PublishStreamFinished { .. } | ServerSessionEvent::PlayStreamFinished { .. } => false,
            _ => true,
        }
    }

    pub(super) fn request(&self, app: &str, stream_key: &str, action: Action) -> Result<AccessRequest, String> {
        access_request(app, stream_key, action, self.peer.ip())
    }

    pub(super) async fn publish(&mut self, request_id: u32, app: &str, stream_key: &str) -> bool {
        const BAD_NAME: &str = "NetStream.Publish.BadName";
        const PUBLISH_STREAM: u32 = 1;
        if !matches!(self.role, Role::None) {
            return self.refuse(request_id, PUBLISH_STREAM, BAD_NAME, "one stream per connection");
        }
        let req = match self.request(app, stream_key, Action::Publish) {
            Ok(r) => r,
            Err(e) => {
                self.record_malformed(Action::Publish);
                return self.refuse(request_id, PUBLISH_STREAM, BAD_NAME, &format!("malformed: {e}"));
            }
        };
        let admitted = match self.admit(req).await {
            Ok(a) => a,
            Err(refusal) => return self.refused(request_id, PUBLISH_STREAM, BAD_NAME, &refusal),
        };
        let Admitted { key, session, publishing, .. } = admitted;
        let Some(publishing) = publishing else {
            return self.refuse(request_id, PUBLISH_STREAM, BAD_NAME, "unavailable");
        };
        {
            let mut hub = self.ctx.hub.borrow_mut();
            // A copy relayed from a publisher that has just left ends here first.
            if hub.channels.get(&key).is_some_and(|c| c.mirror) {
                hub.end(&key);
            }
            let ch = hub.channels.entry(key.clone()).or_default();
            ch.publisher = Some(self.id);
            ch.counters = Some(publishing.counters.clone());
            hub.wake_timer();
        }
        self.ctx.directory.admitted(&key, self.ctx.thread, self.id, publishing.counters.clone());
        self.watch_kick(session);
        self.role = Role::Publisher(key, publishing);
        self.accept(request_id)
    }

    /// Refuses with the refusal's reason (`unavailable` when nothing could be decided).
    fn refused(&mut self, request_id: u32, stream_id: u32, code: &str, refusal: &Refusal) -> bool {
        match refusal {
            Refusal::Refused(record) => self.refuse(request_id, stream_id, code, record.final_reason.as_str()),
            Refusal::Unavailable(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "RTMP request refused: no decision");
                self.refuse(request_id, stream_id, code, "unavailable")
            }
        }
    }

    pub(super) async fn play(&mut self, request_id: u32, app: &str, stream_key: &str, stream_id: u32) -> bool {
        if !matches!(self.role, Role::None) {
            return self.refuse(request_id, stream_id, "NetStream.Play.Failed", "one stream per connection");
        }
        let req = match self.request(app, stream_key, Action::Play) {
            Ok(r) => r,
            Err(e) => {
                self.record_malformed(Action::Play);
                return self.refuse(request_id, stream_id, "NetStream.Play.Failed", &format!("malformed: {e}"));
            }
        };
        let Admitted { key, session, .. } = match self.admit(req).await {
            Ok(a) => a,
            Err(refusal) => {
                let code = match refusal.reason() {
                    Some(Reason::StreamNotRegistered | Reason::AppNotFound | Reason::NotLive) => {
                        "NetStream.Play.StreamNotFound"
                    }
                    _ => "NetStream.Play.Failed",
                };
                return self.refused(request_id, stream_id, code, &refusal);
            }
        };
        let player = Player {
            id: self.id,
            out: self.out.clone(),
            queued: Rc::new(Cell::new(0)),
            skipping: false,
            stream_id,
            session: self.session.clone(),
            closed: self.closed.clone(),
            joined_at: (0, 0),
            limits: self.ctx.player_limits,
            behind_since: None,
        };
        // Accepted first, so the play response precedes the media.
        let live = self.ctx.hub.borrow().channels.get(&key).is_some_and(|c| c.publisher.is_some());
        if !live && !self.ctx.mirror(&key) {
            return self.refuse(request_id, stream_id, "NetStream.Play.StreamNotFound", "not_live");
        }
        if !self.accept(request_id) {
            return false;
        }
        if !self.ctx.hub.borrow_mut().join(&key, player) {
            return false;
        }
        self.watch_kick(session);
        self.role = Role::Player(key);
        true
    }

    /// Registers the session; when it stops being allowed, the connection is closed.
    pub(super) fn watch_kick(&mut self, mut session: Session) {
        let out = self.out.clone();
        let closed = self.closed.clone();
        let peer = self.peer;
        let (done_tx, done) = futures::channel::oneshot::channel::<()>();
        self.done.push(done_tx);
        monoio::spawn(async move {
            monoio::select! {
                reason = session.ended() => {
                    tracing::info!(%peer, reason = reason.as_str(), "RTMP session ended: no longer allowed");
                    closed.set(true);
                    // At once, even for a player that stopped reading.
                    out.abort();
                }
                _ = done => {}
            }
        });
    }

    pub(super) fn finish(&mut self) {
        self.closed.set(true);
        self.done.clear();
        match std::mem::replace(&mut self.role, Role::None) {
            Role::Publisher(key, publishing) => {
                self.ctx.directory.release(&key, self.id);
                let mut hub = self.ctx.hub.borrow_mut();
                if hub.channels.get(&key).is_some_and(|c| c.publisher == Some(self.id)) {
                    hub.end(&key);
                }
                // The slot and the stream's counters end after the players heard the end.
                drop(publishing);
            }
            Role::Player(key) => self.ctx.hub.borrow_mut().leave(&key, self.id),
            Role::None => {}
        }
        let _ = self.out.unbounded_send(Out::Close);
    }
}
