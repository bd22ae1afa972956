//! The RTMP server: `Settings::threads` media threads, each a monoio runtime (io_uring, epoll
//! where io_uring is refused) with its own `SO_REUSEPORT` listener; `rml_rtmp` for the
//! handshake, chunking and commands.
//!
//! Every publish and play is decided through the worker's `Decider` (on the tokio thread, over
//! a channel: claims and the spool live there) and recorded, allow or deny. A second publisher
//! on a live stream, on any thread, is refused with `stream_busy` *before* any claim, so it
//! never burns a one-time token. Admitted sessions are registered for kick on change.
//!
//! Fan-out: one publisher per stream, any number of players. Metadata, the AVC/AAC sequence
//! headers and the current GOP are replayed to late joiners so playback starts on a keyframe.
//! Each media message is chunked once, into the stream's `Window`: up to `merge_write` of media
//! (a keyframe always opens a new one), flushed to every player as one shared `Bytes`, so a
//! player's write costs no copy, and there is one merge timer per media thread, not one per
//! player. Each player has a bounded queue; a player that falls behind skips to the next
//! window that opens on a keyframe. A stream is relayed to another media thread once, when
//! that thread has a player for it (`Ctx::mirror`).
//!
//! Bounded per connection: connections (per address and in total, `limits::Gate`), handshake
//! time, silence, and input that completes no message (`Settings::max_message`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::channel::mpsc as fmpsc;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata};
use rml_rtmp::time::RtmpTimestamp;
use sluice_events::{AccessRequest, Action, AppName, DecisionRecord, Protocol, Reason, StreamName, wire};
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::decide::{DecideError, Decider};
use crate::stats::{MediaStats, StreamCounters};

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A player may stay silent far longer: it only acknowledges its window now and then.
const PLAYER_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Media messages queued towards another media thread before that relay skips to the next
/// keyframe (the other thread is overloaded; its players would fall behind anyway).
const MIRROR_QUEUE: usize = 4096;

/// A decision asked of the tokio thread.
#[derive(Debug)]
pub struct DecideJob {
    pub request: AccessRequest,
    /// Refuse with this reason whatever `decide` says (no claims made).
    pub refuse: Option<Reason>,
    pub reply: oneshot::Sender<Result<DecisionRecord, DecideError>>,
}

/// Runs the decision jobs of the media threads on the tokio runtime.
pub async fn serve_decisions(decider: Decider, mut jobs: mpsc::Receiver<DecideJob>) {
    while let Some(job) = jobs.recv().await {
        let d = decider.clone();
        tokio::spawn(async move {
            let _ = job.reply.send(d.decide_refusing(job.request, job.refuse).await);
        });
    }
}

/// What a publisher sends, as the hub hands it on. `Send`: a stream published on one media
/// thread is relayed to the others where it has players.
#[derive(Clone)]
enum Media {
    Metadata(Arc<StreamMetadata>),
    /// The payload, its timestamp, and the message already chunked for stream id 1 (what
    /// nearly every player uses), shared by every player: prepared once per message.
    Video(Bytes, RtmpTimestamp, Bytes),
    Audio(Bytes, RtmpTimestamp, Bytes),
    /// The publisher left.
    End,
}

/// The outgoing chunk size every session announces (rml_rtmp's default).
const CHUNK_SIZE: usize = 4096;
/// Chunk streams of the pre-chunked media (rml_rtmp's own choice for these types, which it
/// no longer uses for them since media bypasses its serializer).
const VIDEO_CSID: u8 = 4;
const AUDIO_CSID: u8 = 5;

/// One RTMP message as chunks: a type-0 header (absolute timestamp), then type-3 headers
/// between chunks, so the bytes depend only on the message and the stream id.
pub fn chunk_message(
    csid: u8,
    type_id: u8,
    stream_id: u32,
    timestamp: u32,
    payload: &[u8],
    chunk_size: usize,
) -> Bytes {
    let extended = timestamp >= 0x00ff_ffff;
    let chunks = payload.len().div_ceil(chunk_size).max(1);
    let mut out = Vec::with_capacity(payload.len() + 16 + chunks * 5);
    out.push(csid & 0x3f);
    let ts = timestamp.min(0x00ff_ffff);
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&stream_id.to_le_bytes());
    if extended {
        out.extend_from_slice(&timestamp.to_be_bytes());
    }
    for (i, chunk) in payload.chunks(chunk_size).enumerate() {
        if i > 0 {
            out.push(0xc0 | (csid & 0x3f));
            if extended {
                out.extend_from_slice(&timestamp.to_be_bytes());
            }
        }
        out.extend_from_slice(chunk);
    }
    Bytes::from(out)
}

fn video(data: Bytes, ts: RtmpTimestamp) -> Media {
    let chunked = chunk_message(VIDEO_CSID, 9, 1, ts.value, &data, CHUNK_SIZE);
    Media::Video(data, ts, chunked)
}

fn audio(data: Bytes, ts: RtmpTimestamp) -> Media {
    let chunked = chunk_message(AUDIO_CSID, 8, 1, ts.value, &data, CHUNK_SIZE);
    Media::Audio(data, ts, chunked)
}

fn is_keyframe(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b >> 4 == 1)
}

fn is_video_header(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] & 0x0f == 7 && data[1] == 0
}

fn is_audio_header(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] >> 4 == 10 && data[1] == 0
}

/// A player, fed straight into its connection's writer (no task of its own).
struct Player {
    id: u64,
    out: Outbox,
    /// Media messages handed to the writer and not yet written.
    queued: Rc<Cell<usize>>,
    /// Dropped media since the queue filled; waits for a keyframe.
    skipping: bool,
    stream_id: u32,
    session: Rc<RefCell<ServerSession>>,
    closed: Rc<Cell<bool>>,
    /// Bytes and messages of the stream's window when it joined, which its start (the GOP)
    /// already covered: its first window is the rest.
    joined_at: (usize, usize),
    limits: PlayerLimits,
    /// Since when its queue has been full.
    behind_since: Option<Instant>,
}

/// How far a player may fall behind (`Settings::player_queue`, `Settings::player_behind`).
#[derive(Debug, Clone, Copy)]
struct PlayerLimits {
    queue: usize,
    behind: Duration,
}

/// What becomes of media for a player.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Deliver,
    /// Dropped: the player is behind, or waits for a keyframe after it was.
    Skip,
    /// Behind for longer than allowed: the connection is ended.
    Disconnect,
}

impl Player {
    /// Hands `m` to the writer; false once the player is gone (or the stream ended).
    fn deliver(&mut self, m: &Media, counters: Option<&Arc<StreamCounters>>) -> bool {
        let bytes = match m {
            Media::Video(_, _, chunked) | Media::Audio(_, _, chunked) if self.stream_id == 1 => chunked.clone(),
            Media::Video(d, ts, _) => chunk_message(VIDEO_CSID, 9, self.stream_id, ts.value, d, CHUNK_SIZE),
            Media::Audio(d, ts, _) => chunk_message(AUDIO_CSID, 8, self.stream_id, ts.value, d, CHUNK_SIZE),
            Media::Metadata(md) => match self.session.borrow_mut().send_metadata(self.stream_id, md) {
                Ok(p) => Bytes::from(p.bytes),
                Err(_) => return false,
            },
            Media::End => {
                self.closed.set(true);
                // A player that is behind would not read the goodbye: its writer may be stuck
                // on a full socket, so the connection is ended instead.
                if self.queued.get() >= self.limits.queue {
                    self.out.abort();
                    return false;
                }
                if let Ok(p) = self.session.borrow_mut().finish_playing(self.stream_id) {
                    let _ = self.out.unbounded_send(Out::Bytes(p.bytes));
                }
                let _ = self.out.unbounded_send(Out::Close);
                return false;
            }
        };
        if let Some(c) = counters {
            c.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.queued.set(self.queued.get() + 1);
        self.out.unbounded_send(Out::Media(bytes, self.queued.clone(), 1)).is_ok()
    }

    /// Hands a flushed window (`messages` media messages, chunked for stream id 1) to the
    /// writer, shared with every other player of the stream; false once the player is gone.
    fn deliver_window(&mut self, bytes: &Bytes, messages: usize, counters: Option<&Arc<StreamCounters>>) -> bool {
        if let Some(c) = counters {
            c.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.queued.set(self.queued.get() + messages);
        self.out.unbounded_send(Out::Media(bytes.clone(), self.queued.clone(), messages)).is_ok()
    }

    /// Whether `media` goes into the stream's shared window for this player rather than to
    /// it alone: audio and video for stream id 1 (nearly every player), whose chunked bytes
    /// are the same for all.
    fn windowed(&self, media: &Media) -> bool {
        self.stream_id == 1 && matches!(media, Media::Video(..) | Media::Audio(..))
    }

    /// The queue check before `units` media messages reach this player: skipped (and counted
    /// as dropped) while it is behind and until a keyframe starts what comes; disconnected
    /// once it has been behind for longer than its limit.
    fn admits(&mut self, keyframe: bool, units: usize, counters: Option<&Arc<StreamCounters>>) -> Admit {
        let drop = |c: Option<&Arc<StreamCounters>>| {
            if let Some(c) = c {
                c.dropped.fetch_add(units as u64, Ordering::Relaxed);
            }
        };
        if self.queued.get() >= self.limits.queue {
            let since = *self.behind_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.limits.behind {
                tracing::info!(player = self.id, "player behind for too long; disconnecting");
                self.closed.set(true);
                self.out.abort();
                drop(counters);
                return Admit::Disconnect;
            }
            if !self.skipping {
                tracing::debug!(player = self.id, "player behind; skipping to the next keyframe");
            }
            self.skipping = true;
            drop(counters);
            return Admit::Skip;
        }
        self.behind_since = None;
        if self.skipping && !keyframe {
            drop(counters);
            return Admit::Skip;
        }
        self.skipping = false;
        Admit::Deliver
    }
}

/// Media of one stream since its last flush, chunked for stream id 1: every in-step player
/// gets the same bytes in one write (SRS's merged write, done once per stream instead of
/// once per player: no per-player copy, timer or queue entry per message).
#[derive(Default)]
struct Window {
    bytes: Vec<u8>,
    messages: usize,
    /// A video keyframe opened it (a keyframe always starts a window), so a player that
    /// fell behind can rejoin here.
    keyframe: bool,
    opened: Option<Instant>,
}

/// This stream relayed to another media thread, which has players for it.
struct Mirror {
    tx: fmpsc::UnboundedSender<Media>,
    /// Sent and not yet taken by the other thread.
    queued: Arc<AtomicUsize>,
    skipping: bool,
}

impl Mirror {
    fn send(&self, m: &Media) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.unbounded_send(m.clone()).is_ok()
    }
}

#[derive(Default)]
struct Channel {
    /// A publisher is live (or being decided); for a mirror, the relay's id.
    publisher: Option<u64>,
    /// Fed by the publisher's thread, not by a connection of this one.
    mirror: bool,
    /// Other threads this stream is relayed to.
    mirrors: Vec<Mirror>,
    /// Set once the publisher is admitted.
    counters: Option<Arc<StreamCounters>>,
    metadata: Option<Arc<StreamMetadata>>,
    video_header: Option<Media>,
    audio_header: Option<Media>,
    gop: Vec<Media>,
    players: Vec<Player>,
    window: Window,
    /// Bytes of the last window flushed: the next one's starting capacity.
    last_window: usize,
}

impl Channel {
    /// Sends the window to every stream-id-1 player that is keeping up.
    fn flush(&mut self) {
        if self.window.messages == 0 {
            return;
        }
        let window = std::mem::take(&mut self.window);
        self.last_window = window.bytes.len();
        let bytes = Bytes::from(window.bytes);
        let counters = self.counters.clone();
        self.players.retain_mut(|p| {
            let (skip_bytes, skip_messages) = std::mem::take(&mut p.joined_at);
            let messages = window.messages - skip_messages;
            if p.stream_id != 1 || messages == 0 {
                return true;
            }
            let kept = match p.admits(window.keyframe && skip_messages == 0, messages, counters.as_ref()) {
                Admit::Deliver => p.deliver_window(&bytes.slice(skip_bytes..), messages, counters.as_ref()),
                Admit::Skip => true,
                Admit::Disconnect => false,
            };
            if !kept {
                player_gone(counters.as_ref());
            }
            kept
        });
    }
}

/// A player left the stream's list without `Hub::leave` (its connection ended or was ended).
fn player_gone(counters: Option<&Arc<StreamCounters>>) {
    if let Some(c) = counters {
        c.players.fetch_sub(1, Ordering::Relaxed);
    }
}

type Key = (AppName, StreamName);

/// The streams of this media thread.
struct Hub {
    channels: HashMap<Key, Channel>,
    stats: Arc<MediaStats>,
    /// How long media may wait in a stream's window for more (0: every message flushed at once).
    merge: Duration,
}

impl Hub {
    /// Flushes the windows that have waited `merge`: the media thread's one timer, so a stream
    /// whose publisher pauses does not hold its last media back.
    fn flush_due(&mut self, now: Instant) {
        for ch in self.channels.values_mut() {
            if ch.window.opened.is_some_and(|t| now.duration_since(t) >= self.merge) {
                ch.flush();
            }
        }
    }

    fn publish(&mut self, key: &Key, media: Media) {
        let Some(ch) = self.channels.get_mut(key) else { return };
        let size = match &media {
            Media::Video(d, ..) | Media::Audio(d, ..) => d.len() as u64,
            _ => 0,
        };
        if let Some(c) = ch.counters.as_ref().filter(|_| !ch.mirror) {
            c.bytes_in.fetch_add(size, Ordering::Relaxed);
        }
        let counters = ch.counters.clone();
        match &media {
            Media::Metadata(m) => ch.metadata = Some(m.clone()),
            Media::Video(data, ..) if is_video_header(data) => ch.video_header = Some(media.clone()),
            Media::Audio(data, ..) if is_audio_header(data) => ch.audio_header = Some(media.clone()),
            Media::Video(data, ..) => {
                if is_keyframe(data) {
                    ch.gop.clear();
                }
                ch.gop.push(media.clone());
            }
            Media::Audio(..) => {
                if !ch.gop.is_empty() {
                    ch.gop.push(media.clone());
                }
            }
            Media::End => {}
        }
        let keyframe = matches!(&media, Media::Video(d, ..) if is_keyframe(d));
        let shared = match &media {
            Media::Video(_, _, chunked) | Media::Audio(_, _, chunked) => Some(chunked),
            _ => None,
        };
        // In order: what is waiting goes before metadata or the end, and a keyframe opens a
        // window of its own.
        if shared.is_none() || keyframe {
            ch.flush();
        }
        ch.players.retain_mut(|p| {
            if p.windowed(&media) {
                return true;
            }
            // The end reaches every player, behind or not.
            let admit =
                if matches!(media, Media::End) { Admit::Deliver } else { p.admits(keyframe, 1, counters.as_ref()) };
            let kept = match admit {
                Admit::Deliver => p.deliver(&media, counters.as_ref()),
                Admit::Skip => true,
                Admit::Disconnect => false,
            };
            if !kept {
                player_gone(counters.as_ref());
            }
            kept
        });
        if let Some(chunked) = shared {
            let w = &mut ch.window;
            let now = Instant::now();
            let opened = *w.opened.get_or_insert(now);
            if w.messages == 0 {
                w.keyframe = keyframe;
                // About what the last window held, so it does not grow by reallocation.
                w.bytes.reserve(ch.last_window);
            }
            w.bytes.extend_from_slice(chunked);
            w.messages += 1;
            // Due now (a steady publisher keeps windows at `merge`; the media thread's timer
            // covers one that pauses), full, or no merging at all.
            if self.merge.is_zero() || w.bytes.len() >= WRITE_BATCH || now.duration_since(opened) >= self.merge {
                ch.flush();
            }
        }
        ch.mirrors.retain_mut(|m| {
            if m.skipping && !keyframe {
                return true;
            }
            if m.queued.load(Ordering::Relaxed) >= MIRROR_QUEUE {
                if !m.skipping {
                    tracing::debug!("relay to another media thread behind; skipping to the next keyframe");
                }
                m.skipping = true;
                return true;
            }
            m.skipping = false;
            m.send(&media)
        });
    }

    /// Relays the stream to another media thread: its start first (metadata, sequence
    /// headers, the current GOP), then everything the publisher sends. Dropped when the stream
    /// is not live here (the other thread then ends its copy).
    fn attach(&mut self, key: &Key, mirror: Mirror) {
        let Some(ch) = self.channels.get_mut(key).filter(|c| c.publisher.is_some() && !c.mirror) else { return };
        let start = ch
            .metadata
            .clone()
            .map(Media::Metadata)
            .into_iter()
            .chain(ch.video_header.clone())
            .chain(ch.audio_header.clone())
            .chain(ch.gop.iter().cloned());
        for m in start {
            if !mirror.send(&m) {
                return;
            }
        }
        ch.mirrors.push(mirror);
    }

    /// A late joiner's start: metadata, sequence headers, then the current GOP.
    /// Adds a player and hands it metadata, sequence headers and the current GOP.
    fn join(&mut self, key: &Key, mut player: Player) -> bool {
        let Some(ch) = self.channels.get_mut(key) else { return false };
        if ch.publisher.is_none() {
            return false;
        }
        // Its start (below) covers what waits in the window: it gets only the rest of it.
        player.joined_at = (ch.window.bytes.len(), ch.window.messages);
        if let Some(c) = &ch.counters {
            c.players.fetch_add(1, Ordering::Relaxed);
        }
        let start = ch
            .metadata
            .clone()
            .map(Media::Metadata)
            .into_iter()
            .chain(ch.video_header.clone())
            .chain(ch.audio_header.clone())
            .chain(ch.gop.iter().cloned());
        for m in start {
            player.deliver(&m, ch.counters.as_ref());
        }
        ch.players.push(player);
        true
    }

    fn leave(&mut self, key: &Key, id: u64) {
        if let Some(ch) = self.channels.get_mut(key) {
            let before = ch.players.len();
            ch.players.retain(|p| p.id != id);
            if ch.players.len() < before {
                if let Some(c) = &ch.counters {
                    c.players.fetch_sub(1, Ordering::Relaxed);
                }
            }
            // A relayed copy nobody here watches is dropped; its relay stops at the next
            // message and the publisher's thread forgets it.
            if ch.mirror && ch.players.is_empty() {
                self.channels.remove(key);
            }
        }
    }

    fn end(&mut self, key: &Key) {
        if let Some(mut ch) = self.channels.remove(key) {
            if !ch.mirror {
                self.stats.stream_ended(key.0.as_str(), key.1.as_str());
            }
            ch.flush();
            for p in &mut ch.players {
                p.deliver(&Media::End, None);
            }
            for m in &ch.mirrors {
                m.send(&Media::End);
            }
        }
    }
}

/// The live streams of every media thread: one publisher per stream across the worker, and
/// where a player on another thread finds it.
#[derive(Debug, Default)]
struct Directory {
    streams: Mutex<HashMap<Key, Entry>>,
}

#[derive(Debug)]
struct Entry {
    thread: usize,
    publisher: u64,
    /// Set once the publisher is admitted; shared with the threads it is relayed to.
    counters: Option<Arc<StreamCounters>>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the stream's one publisher slot; false when someone has it.
    fn claim(&self, key: &Key, thread: usize, publisher: u64) -> bool {
        let mut streams = self.lock();
        if streams.contains_key(key) {
            return false;
        }
        streams.insert(key.clone(), Entry { thread, publisher, counters: None });
        true
    }

    fn admitted(&self, key: &Key, publisher: u64, counters: Arc<StreamCounters>) {
        if let Some(e) = self.lock().get_mut(key).filter(|e| e.publisher == publisher) {
            e.counters = Some(counters);
        }
    }

    fn release(&self, key: &Key, publisher: u64) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|e| e.publisher == publisher) {
            streams.remove(key);
        }
    }

    /// The thread and counters of an admitted publisher of `key`.
    fn live(&self, key: &Key) -> Option<(usize, Arc<StreamCounters>)> {
        self.lock().get(key).and_then(|e| Some((e.thread, e.counters.clone()?)))
    }
}

/// A media thread asks the publisher's thread to relay a stream to it.
struct Attach {
    key: Key,
    mirror: Mirror,
}

struct Ctx {
    /// Which media thread this is.
    thread: usize,
    directory: Arc<Directory>,
    /// Every media thread's inbox, by thread.
    inboxes: Arc<Vec<fmpsc::UnboundedSender<Attach>>>,
    hub: RefCell<Hub>,
    gate: std::sync::Arc<crate::limits::Gate>,
    jobs: mpsc::Sender<DecideJob>,
    decider: Decider,
    next_id: Cell<u64>,
    /// `SLUICE_RTMP_MAX_MESSAGE_BYTES`.
    max_message: usize,
    player_limits: PlayerLimits,
    idle_timeout: Duration,
}

/// What the RTMP server is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Media threads, each a monoio runtime with its own `SO_REUSEPORT` listener.
    pub threads: usize,
    /// Input an RTMP connection may send without completing a message.
    pub max_message: usize,
    /// A connection that is not playing and stays silent this long is closed (a publisher
    /// that stopped sending).
    pub idle_timeout: Duration,
    /// How long a stream's media may wait for more to share its players' writes (one window
    /// per stream, shared by every player; 0: each message written at once).
    pub merge_write: Duration,
    /// Media messages queued per player before it skips to the next keyframe.
    pub player_queue: usize,
    /// A player whose queue stays full this long is disconnected.
    pub player_behind: Duration,
}

/// Starts the media threads (`settings.threads`, each a monoio runtime with its own
/// `SO_REUSEPORT` listener on `listen`) and serves until the process ends. The kernel spreads
/// connections over the threads; a stream published on one is relayed to the others that have
/// players for it, once per thread, not once per player.
pub fn spawn(
    settings: Settings,
    decider: Decider,
    jobs: mpsc::Sender<DecideJob>,
    gate: std::sync::Arc<crate::limits::Gate>,
) -> std::io::Result<()> {
    let threads = settings.threads.max(1);
    let directory = Arc::new(Directory::default());
    let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..threads).map(|_| fmpsc::unbounded::<Attach>()).unzip();
    let inboxes = Arc::new(inboxes);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (thread, inbox) in receivers.into_iter().enumerate() {
        let ready_tx = ready_tx.clone();
        let (settings, decider, jobs, gate) = (settings.clone(), decider.clone(), jobs.clone(), gate.clone());
        let (directory, inboxes) = (directory.clone(), inboxes.clone());
        std::thread::Builder::new().name(format!("sluice-rtmp-{thread}")).spawn(move || {
            let listen = settings.listen;
            let uring = monoio::utils::detect_uring();
            let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build();
            let mut rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if thread == 0 {
                if uring {
                    tracing::info!(%listen, threads, "RTMP on monoio with io_uring");
                } else {
                    tracing::warn!(%listen, threads, "io_uring refused by this kernel; RTMP on monoio with epoll");
                }
            }
            rt.block_on(async move {
                let listener = match TcpListener::bind_with_config(listen, &ListenerOpts::new().reuse_port(true)) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let hub = RefCell::new(Hub {
                    channels: HashMap::new(),
                    stats: decider.stats.clone(),
                    merge: settings.merge_write,
                });
                let ctx = Rc::new(Ctx {
                    thread,
                    directory,
                    inboxes,
                    hub,
                    gate,
                    jobs,
                    decider,
                    next_id: Cell::new(1),
                    max_message: settings.max_message.max(4096),
                    idle_timeout: settings.idle_timeout,
                    player_limits: PlayerLimits { queue: settings.player_queue.max(1), behind: settings.player_behind },
                });
                monoio::spawn(serve_inbox(ctx.clone(), inbox));
                if !settings.merge_write.is_zero() {
                    monoio::spawn(flush_windows(ctx.clone(), settings.merge_write));
                }
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let Some(permit) = ctx.gate.admit(peer.ip()) else {
                                tracing::debug!(%peer, "RTMP connection refused: connection limit");
                                drop(stream);
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let id = ctx.new_id();
                            let conn_ctx = ctx.clone();
                            monoio::spawn(async move {
                                connection(stream, peer, id, conn_ctx).await;
                                drop(permit);
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "RTMP accept failed");
                            monoio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        })?;
    }
    drop(ready_tx);
    for _ in 0..threads {
        ready_rx.recv().map_err(|_| std::io::Error::other("an RTMP thread stopped"))??;
    }
    Ok(())
}

/// The media thread's one merge timer, for streams whose publisher pauses: every half
/// `merge`, windows that have waited `merge` go (so none waits more than 1.5 × `merge`).
async fn flush_windows(ctx: Rc<Ctx>, merge: Duration) {
    loop {
        monoio::time::sleep(merge / 2).await;
        ctx.hub.borrow_mut().flush_due(Instant::now());
    }
}

/// Relay requests from the other media threads.
async fn serve_inbox(ctx: Rc<Ctx>, mut inbox: fmpsc::UnboundedReceiver<Attach>) {
    while let Some(Attach { key, mirror }) = inbox.next().await {
        ctx.hub.borrow_mut().attach(&key, mirror);
    }
}

impl Ctx {
    /// A connection or relay id, unique across the media threads.
    fn new_id(&self) -> u64 {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        ((self.thread as u64) << 48) | n
    }

    /// Gives this thread a copy of `key` relayed from the thread where it is published, if
    /// it is live there. The copy is a channel like any other; its players join it.
    fn mirror(self: &Rc<Self>, key: &Key) -> bool {
        let Some((thread, counters)) = self.directory.live(key) else { return false };
        if thread == self.thread {
            return false;
        }
        let (tx, mut rx) = fmpsc::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let mirror = Mirror { tx, queued: queued.clone(), skipping: false };
        if self.inboxes[thread].unbounded_send(Attach { key: key.clone(), mirror }).is_err() {
            return false;
        }
        let id = self.new_id();
        let ch = Channel { publisher: Some(id), mirror: true, counters: Some(counters), ..Channel::default() };
        self.hub.borrow_mut().channels.insert(key.clone(), ch);
        tracing::info!(app = %key.0, stream = %key.1, from = thread, to = self.thread, "RTMP stream relayed from another media thread");
        let ctx = self.clone();
        let key = key.clone();
        monoio::spawn(async move {
            let ours = |hub: &Hub| hub.channels.get(&key).is_some_and(|c| c.mirror && c.publisher == Some(id));
            while let Some(m) = rx.next().await {
                queued.fetch_sub(1, Ordering::Relaxed);
                let mut hub = ctx.hub.borrow_mut();
                if !ours(&hub) {
                    // Nobody here watches it any more: dropping `rx` tells the publisher's
                    // thread at its next message.
                    return;
                }
                if matches!(m, Media::End) {
                    hub.end(&key);
                    return;
                }
                hub.publish(&key, m);
            }
            let mut hub = ctx.hub.borrow_mut();
            if ours(&hub) {
                hub.end(&key);
            }
        });
        true
    }
}

enum Out {
    Bytes(Vec<u8>),
    /// Media bytes shared with other players, the player's count of queued media, and how
    /// many media messages these bytes hold.
    Media(Bytes, Rc<Cell<usize>>, usize),
    Close,
}

/// Most bytes gathered into one write when several messages are waiting.
const WRITE_BATCH: usize = 256 * 1024;

/// A connection's way out: everything in order, to its writer; or `abort`, which ends the
/// connection at once.
#[derive(Clone)]
struct Outbox {
    tx: fmpsc::UnboundedSender<Out>,
    abort: Rc<[fmpsc::UnboundedSender<()>; 2]>,
}

impl Outbox {
    fn unbounded_send(&self, out: Out) -> Result<(), ()> {
        self.tx.unbounded_send(out).map_err(|_| ())
    }

    /// Ends the connection now, even if its writer is stuck on a full socket (a player that
    /// stopped reading): its reader and writer both stop waiting and let go of the socket,
    /// which closes it. What was queued is not written.
    fn abort(&self) {
        for tx in self.abort.iter() {
            let _ = tx.unbounded_send(());
        }
    }
}

/// A new connection's outbox, with what its writer reads and the reader's and writer's abort
/// signals.
fn outbox() -> (Outbox, fmpsc::UnboundedReceiver<Out>, fmpsc::UnboundedReceiver<()>, fmpsc::UnboundedReceiver<()>) {
    let (tx, rx) = fmpsc::unbounded();
    let (abort_reader, reader) = fmpsc::unbounded();
    let (abort_writer, writer) = fmpsc::unbounded();
    (Outbox { tx, abort: Rc::new([abort_reader, abort_writer]) }, rx, reader, writer)
}

/// Resolves when the connection is aborted; never when its outbox is simply dropped (the
/// writer then ends by draining its queue).
async fn aborted(signal: &mut fmpsc::UnboundedReceiver<()>) {
    if signal.next().await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// What one write gathers.
#[derive(Default)]
struct Batch {
    parts: Vec<Bytes>,
    size: usize,
    /// The player's queue count and how many media messages this write takes off it.
    media: Option<(Rc<Cell<usize>>, usize)>,
    closing: bool,
}

impl Batch {
    fn take(&mut self, out: Out) {
        match out {
            Out::Bytes(b) => {
                self.size += b.len();
                self.parts.push(Bytes::from(b));
            }
            Out::Media(b, queued, messages) => {
                self.size += b.len();
                self.parts.push(b);
                let n = self.media.as_ref().map_or(0, |m| m.1);
                self.media = Some((queued, n + messages));
            }
            Out::Close => self.closing = true,
        }
    }

    fn full(&self) -> bool {
        self.closing || self.size >= WRITE_BATCH
    }
}

/// Writes what the connection sends, in order, gathering what is waiting into one write (one
/// ring entry instead of one per message; a lone message is written as is, no copy). Media
/// comes already merged per stream (`Window`), so nothing waits here: a control message or a
/// close is written as soon as it is queued.
async fn writer(
    mut wr: impl AsyncWriteRent,
    mut rx: fmpsc::UnboundedReceiver<Out>,
    mut abort: fmpsc::UnboundedReceiver<()>,
) {
    loop {
        let first = monoio::select! {
            out = rx.next() => out,
            _ = aborted(&mut abort) => None,
        };
        let Some(first) = first else { break };
        let mut batch = Batch::default();
        batch.take(first);
        drain(&mut rx, &mut batch);
        let buf = match batch.parts.len() {
            0 => Bytes::new(),
            1 => batch.parts.pop().unwrap_or_default(),
            _ => {
                // Gathered for this write only: an idle player holds no buffer (2,400
                // players with a kept 64 KiB each would be 150 MiB).
                let mut joined = Vec::with_capacity(batch.size);
                for b in &batch.parts {
                    joined.extend_from_slice(b);
                }
                Bytes::from(joined)
            }
        };
        let res = monoio::select! {
            r = wr.write_all(buf) => r.0,
            // A write stuck on a full socket is cancelled; the connection is over.
            _ = aborted(&mut abort) => return,
        };
        if let Some((queued, n)) = batch.media {
            queued.set(queued.get().saturating_sub(n));
        }
        if res.is_err() || batch.closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

/// Moves what is waiting into the batch, up to a full write.
fn drain(rx: &mut fmpsc::UnboundedReceiver<Out>, batch: &mut Batch) {
    while !batch.full() {
        match rx.try_recv() {
            Ok(out) => batch.take(out),
            Err(_) => break,
        }
    }
}

/// What a connection is doing.
enum Role {
    None,
    Publisher(Key),
    Player(Key),
}

struct Conn {
    id: u64,
    peer: SocketAddr,
    ctx: Rc<Ctx>,
    session: Rc<RefCell<ServerSession>>,
    out: Outbox,
    role: Role,
    closed: Rc<Cell<bool>>,
    /// Dropped when the connection ends: the kick watcher then unregisters the session.
    done: Vec<futures::channel::oneshot::Sender<()>>,
    /// Input bytes since the last complete message.
    unfinished: usize,
}

async fn connection(stream: TcpStream, peer: SocketAddr, id: u64, ctx: Rc<Ctx>) {
    let (mut rd, wr) = stream.into_split();
    let (out, out_rx, mut abort, abort_writer) = outbox();
    monoio::spawn(writer(wr, out_rx, abort_writer));
    // Handshake, bounded in time.
    let mut hs = Handshake::new(PeerType::Server);
    let leftover = match monoio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut hs, &out)).await {
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
        let idle = if matches!(conn.role, Role::Player(_)) { PLAYER_IDLE_TIMEOUT } else { conn.ctx.idle_timeout };
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
    conn.finish();
}

async fn handshake(rd: &mut impl AsyncReadRent, hs: &mut Handshake, out: &Outbox) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (res, b) = rd.read(buf).await;
        buf = b;
        let n = res.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the handshake".into());
        }
        match hs.process_bytes(&buf[..n]).map_err(|e| format!("{e:?}"))? {
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
    fn send(&self, bytes: Vec<u8>) {
        let _ = self.out.unbounded_send(Out::Bytes(bytes));
    }

    /// Feeds bytes from the client; false ends the connection.
    async fn input(&mut self, data: &[u8]) -> bool {
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

    async fn results(&mut self, results: Vec<ServerSessionResult>) -> bool {
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

    fn accept(&mut self, request_id: u32) -> bool {
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

    /// Refuses the request with `code` and the reason in the description, then closes.
    fn refuse(&mut self, request_id: u32, code: &str, reason: &str) -> bool {
        if let Ok(results) = self.session.borrow_mut().reject_request(request_id, code, reason) {
            for r in results {
                if let ServerSessionResult::OutboundResponse(p) = r {
                    self.send(p.bytes);
                }
            }
        }
        let _ = self.out.unbounded_send(Out::Close);
        false
    }

    async fn decide(&self, request: AccessRequest, refuse: Option<Reason>) -> Result<DecisionRecord, String> {
        let (reply, answer) = oneshot::channel();
        self.ctx
            .jobs
            .try_send(DecideJob { request, refuse, reply })
            .map_err(|_| "the decision queue is full".to_owned())?;
        answer.await.map_err(|_| "the decider stopped".to_owned())?.map_err(|e| e.to_string())
    }

    async fn event(&mut self, e: ServerSessionEvent) -> bool {
        match e {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => self.accept(request_id),

            ServerSessionEvent::PublishStreamRequested { request_id, app_name, stream_key, .. } => {
                let started = std::time::Instant::now();
                let keep = self.publish(request_id, &app_name, &stream_key).await;
                self.ctx.decider.stats.decision_latency(started.elapsed());
                keep
            }
            ServerSessionEvent::PlayStreamRequested { request_id, app_name, stream_key, stream_id, .. } => {
                let started = std::time::Instant::now();
                let keep = self.play(request_id, &app_name, &stream_key, stream_id).await;
                self.ctx.decider.stats.decision_latency(started.elapsed());
                keep
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let Role::Publisher(key) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, Media::Metadata(Arc::new(metadata)));
                }
                true
            }
            ServerSessionEvent::VideoDataReceived { data, timestamp, .. } => {
                if let Role::Publisher(key) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, video(data, timestamp));
                }
                true
            }
            ServerSessionEvent::AudioDataReceived { data, timestamp, .. } => {
                if let Role::Publisher(key) = &self.role {
                    self.ctx.hub.borrow_mut().publish(key, audio(data, timestamp));
                }
                true
            }
            ServerSessionEvent::PublishStreamFinished { .. } | ServerSessionEvent::PlayStreamFinished { .. } => false,
            _ => true,
        }
    }

    fn request(&self, app: &str, stream_key: &str, action: Action) -> Result<AccessRequest, String> {
        access_request(app, stream_key, action, self.peer.ip())
    }

    async fn publish(&mut self, request_id: u32, app: &str, stream_key: &str) -> bool {
        if !matches!(self.role, Role::None) {
            return self.refuse(request_id, "NetStream.Publish.BadName", "one stream per connection");
        }
        let req = match self.request(app, stream_key, Action::Publish) {
            Ok(r) => r,
            Err(e) => return self.refuse(request_id, "NetStream.Publish.BadName", &format!("malformed: {e}")),
        };
        // The public name (after publish-name mapping), to hold the stream's one publisher
        // slot while the decision is made.
        let public = sluice_events::decide::public_stream(&self.ctx.decider.shared.state.load(), &req);
        let key = (req.app.clone(), public);
        if self.ctx.gate.penalized(self.peer.ip(), std::time::Instant::now()) {
            let _ = self.decide(req, Some(Reason::RateLimited)).await;
            return self.refuse(request_id, "NetStream.Publish.BadName", Reason::RateLimited.as_str());
        }
        // The slot is the worker's, across media threads.
        let busy = !self.ctx.directory.claim(&key, self.ctx.thread, self.id);
        if !busy {
            let mut hub = self.ctx.hub.borrow_mut();
            // A copy relayed from a publisher that has just left ends here first.
            if hub.channels.get(&key).is_some_and(|c| c.mirror) {
                hub.end(&key);
            }
            hub.channels.entry(key.clone()).or_default().publisher = Some(self.id);
        }
        let refuse = busy.then_some(Reason::StreamBusy);
        let admitted_by_req = req.clone();
        let record = match self.decide(req, refuse).await {
            Ok(r) => r,
            Err(e) => {
                self.release(&key, busy);
                tracing::warn!(error = %e, "RTMP publish refused: no decision");
                return self.refuse(request_id, "NetStream.Publish.BadName", "unavailable");
            }
        };
        self.note_outcome(&record);
        if !record.allowed {
            self.release(&key, busy);
            return self.refuse(request_id, "NetStream.Publish.BadName", record.final_reason.as_str());
        }
        self.watch_kick(admitted_by_req, &record);
        let counters = self.ctx.decider.stats.stream_started(key.0.as_str(), key.1.as_str(), "rtmp");
        if let Some(ch) = self.ctx.hub.borrow_mut().channels.get_mut(&key) {
            ch.counters = Some(counters.clone());
        }
        self.ctx.directory.admitted(&key, self.id, counters);
        self.role = Role::Publisher(key);
        self.accept(request_id)
    }

    /// Feeds the per-IP backoff: credential failures count, a busy stream does not.
    fn note_outcome(&self, record: &DecisionRecord) {
        let ip = self.peer.ip();
        if record.allowed {
            self.ctx.gate.succeeded(ip);
        } else if !matches!(record.final_reason, Reason::StreamBusy | Reason::RateLimited) {
            self.ctx.gate.failed(ip, std::time::Instant::now());
        }
    }

    fn release(&self, key: &Key, busy: bool) {
        if busy {
            return;
        }
        self.ctx.directory.release(key, self.id);
        let mut hub = self.ctx.hub.borrow_mut();
        if hub.channels.get(key).is_some_and(|c| c.publisher == Some(self.id)) {
            // Players that joined while the publisher was being decided are told it is over.
            hub.end(key);
        }
    }

    async fn play(&mut self, request_id: u32, app: &str, stream_key: &str, stream_id: u32) -> bool {
        if !matches!(self.role, Role::None) {
            return self.refuse(request_id, "NetStream.Play.Failed", "one stream per connection");
        }
        let req = match self.request(app, stream_key, Action::Play) {
            Ok(r) => r,
            Err(e) => return self.refuse(request_id, "NetStream.Play.Failed", &format!("malformed: {e}")),
        };
        if self.ctx.gate.penalized(self.peer.ip(), std::time::Instant::now()) {
            let _ = self.decide(req, Some(Reason::RateLimited)).await;
            return self.refuse(request_id, "NetStream.Play.Failed", Reason::RateLimited.as_str());
        }
        let admitted_by_req = req.clone();
        let record = match self.decide(req, None).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "RTMP play refused: no decision");
                return self.refuse(request_id, "NetStream.Play.Failed", "unavailable");
            }
        };
        self.note_outcome(&record);
        if !record.allowed {
            let code = match record.final_reason {
                Reason::StreamNotRegistered | Reason::AppNotFound => "NetStream.Play.StreamNotFound",
                _ => "NetStream.Play.Failed",
            };
            return self.refuse(request_id, code, record.final_reason.as_str());
        }
        let key = (record.request.app.clone(), record.decision.stream.clone());
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
            return self.refuse(request_id, "NetStream.Play.StreamNotFound", "not_live");
        }
        if !self.accept(request_id) {
            return false;
        }
        if !self.ctx.hub.borrow_mut().join(&key, player) {
            return false;
        }
        self.watch_kick(admitted_by_req, &record);
        self.role = Role::Player(key);
        true
    }

    /// Registers the session; when it stops being allowed, the connection is closed.
    fn watch_kick(&mut self, request: AccessRequest, record: &DecisionRecord) {
        let mut session = self.ctx.decider.sessions.admit(request, record.decision.method);
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

    fn finish(&mut self) {
        self.closed.set(true);
        self.done.clear();
        match std::mem::replace(&mut self.role, Role::None) {
            Role::Publisher(key) => {
                self.ctx.directory.release(&key, self.id);
                let mut hub = self.ctx.hub.borrow_mut();
                if hub.channels.get(&key).is_some_and(|c| c.publisher == Some(self.id)) {
                    hub.end(&key);
                }
            }
            Role::Player(key) => self.ctx.hub.borrow_mut().leave(&key, self.id),
            Role::None => {}
        }
        let _ = self.out.unbounded_send(Out::Close);
    }
}

/// An RTMP publish or play target as an `AccessRequest`.
fn access_request(
    app: &str,
    stream_key: &str,
    action: Action,
    client_ip: std::net::IpAddr,
) -> Result<AccessRequest, String> {
    let target = wire::parse_rtmp(app, stream_key).map_err(|e| e.to_string())?;
    Ok(AccessRequest {
        // Time-ordered: the decision's id is its event id in the log, where ordered ids keep
        // the unique index's inserts at its right edge.
        id: uuid::Uuid::now_v7(),
        app: target.app,
        stream: target.stream,
        action,
        protocol: Protocol::Rtmp,
        client_ip,
        credential: target.credential,
    })
}

/// `ServerSession::handle_input`, contained: rml_rtmp 0.8.0 panics on some chunk sequences
/// (arithmetic overflow in its chunk deserializer, `chunk_io/deserializer.rs:371`, found by
/// `ops/bench/fuzz`; in a release build the same input asks for a capacity-overflowing
/// allocation). A panic there ends this one connection, never the media thread and the other
/// sessions on it.
/// Another: an AMF0 command message with fewer than three values (`amf0_command.rs:35`,
/// a slice index out of range, in release builds too).
fn guarded_input(session: &mut ServerSession, data: &[u8]) -> Result<Vec<ServerSessionResult>, String> {
    GUARDED.with(|g| g.set(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle_input(data)));
    GUARDED.with(|g| g.set(false));
    match outcome {
        Ok(Ok(results)) => Ok(results),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("rml_rtmp panicked on this input".to_owned()),
    }
}

thread_local! {
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside `guarded_input` (for the fuzz target's panic hook: a panic
/// there is contained by design; anywhere else it is a crash).
#[doc(hidden)]
pub fn in_guarded_input() -> bool {
    GUARDED.with(Cell::get)
}

/// What rml_rtmp buffers is bounded: input that completes no message (one oversized message,
/// or many interleaved on different chunk streams) within `max` bytes ends the connection.
/// `unfinished` counts the input since the last complete message; false means close.
fn within_max_message(unfinished: &mut usize, results: &[ServerSessionResult], len: usize, max: usize) -> bool {
    let completed = results.iter().any(|r| {
        matches!(r, ServerSessionResult::RaisedEvent(_) | ServerSessionResult::UnhandleableMessageReceived(_))
    });
    if completed {
        *unfinished = 0;
        return true;
    }
    *unfinished += len;
    *unfinished <= max
}

/// Everything the worker does with a client's bytes short of I/O and the decision job, driven
/// synchronously: the server handshake over the input, then `rml_rtmp`'s session over the same
/// bytes (fed in pieces whose size the first byte picks) with the message-size bound, accept
/// and reject as a connection does, request parsing and `decide` against an empty state, and
/// the media path (classification, chunking once for all players, metadata to a player). For
/// the fuzz target in `data-plane/fuzz`, which checks that no input panics.
#[doc(hidden)]
pub fn drive_input(data: &[u8], max_message: usize) {
    let mut hs = Handshake::new(PeerType::Server);
    let _ = hs.process_bytes(data);
    let Ok((mut session, _)) = ServerSession::new(ServerSessionConfig::new()) else { return };
    let state = sluice_events::AuthState::default();
    let ip = std::net::IpAddr::from([192, 0, 2, 1]);
    let step = usize::from(data.first().copied().unwrap_or(0)).max(1) * 16;
    let mut unfinished = 0;
    for piece in data.chunks(step) {
        let Ok(results) = guarded_input(&mut session, piece) else { return };
        if !within_max_message(&mut unfinished, &results, piece.len(), max_message) {
            return;
        }
        for r in results {
            let ServerSessionResult::RaisedEvent(e) = r else { continue };
            let (request_id, app, key, action) = match e {
                ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                    let _ = session.accept_request(request_id);
                    continue;
                }
                ServerSessionEvent::PublishStreamRequested { request_id, app_name, stream_key, .. } => {
                    (request_id, app_name, stream_key, Action::Publish)
                }
                ServerSessionEvent::PlayStreamRequested { request_id, app_name, stream_key, .. } => {
                    (request_id, app_name, stream_key, Action::Play)
                }
                ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                    let _ = session.send_metadata(1, &Arc::new(metadata));
                    continue;
                }
                ServerSessionEvent::VideoDataReceived { data, timestamp, .. } => {
                    let _ = (is_keyframe(&data), is_video_header(&data), video(data, timestamp));
                    continue;
                }
                ServerSessionEvent::AudioDataReceived { data, timestamp, .. } => {
                    let _ = (is_audio_header(&data), audio(data, timestamp));
                    continue;
                }
                _ => continue,
            };
            match access_request(&app, &key, action, ip) {
                Ok(req) => {
                    let d = sluice_events::decide(&state, &req, sluice_events::Timestamp(0));
                    let _ = match d.outcome {
                        sluice_events::Outcome::Deny => {
                            session.reject_request(request_id, "NetStream.Play.Failed", "no")
                        }
                        _ => session.accept_request(request_id),
                    };
                }
                Err(e) => {
                    let _ = session.reject_request(request_id, "NetStream.Publish.BadName", &e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::chunk_io::ChunkDeserializer;

    #[test]
    fn one_publisher_per_stream_across_threads_and_only_admitted_streams_are_relayed() {
        let stats = MediaStats::default();
        let dir = Directory::default();
        let key: Key = (AppName::parse("tv").unwrap(), StreamName::parse("cam").unwrap());
        assert!(dir.claim(&key, 0, 1));
        assert!(!dir.claim(&key, 1, 2), "a second publisher on another thread");
        assert!(dir.live(&key).is_none(), "not relayed while being decided");
        dir.admitted(&key, 2, stats.stream_started("tv", "cam", "rtmp"));
        assert!(dir.live(&key).is_none(), "only the slot's holder is admitted");
        dir.admitted(&key, 1, stats.stream_started("tv", "cam", "rtmp"));
        assert_eq!(dir.live(&key).map(|(t, _)| t), Some(0));
        dir.release(&key, 2);
        assert!(dir.live(&key).is_some(), "released only by its holder");
        dir.release(&key, 1);
        assert!(dir.live(&key).is_none());
        assert!(dir.claim(&key, 1, 3));
    }

    /// Inputs the fuzzer found that panic rml_rtmp 0.8.0 (`data-plane/fuzz/regressions`).
    pub(crate) const RML_PANICS: [&[u8]; 2] = [
        include_bytes!("../fuzz/regressions/rtmp_session-deserializer-overflow"),
        include_bytes!("../fuzz/regressions/rtmp_session-short-amf0-command"),
    ];

    #[test]
    fn input_that_panics_rml_rtmp_ends_only_its_connection() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let mut refused = Vec::new();
        for crash in RML_PANICS {
            let (mut session, _) = ServerSession::new(ServerSessionConfig::new()).unwrap();
            let step = usize::from(crash[0]).max(1) * 16;
            refused.push(crash.chunks(step).find_map(|piece| guarded_input(&mut session, piece).err()));
            assert!(!in_guarded_input());
            // The fuzz driver goes through the same guard.
            drive_input(crash, 64 * 1024);
        }
        std::panic::set_hook(hook);
        for r in refused {
            assert_eq!(r.as_deref(), Some("rml_rtmp panicked on this input"));
        }
    }

    /// A player on `stream_id` and what its writer would receive.
    fn test_player(id: u64, stream_id: u32) -> (Player, fmpsc::UnboundedReceiver<Out>) {
        let (out, rx, _, _) = outbox();
        let (session, _) = ServerSession::new(ServerSessionConfig::new()).unwrap();
        let player = Player {
            id,
            out,
            queued: Rc::new(Cell::new(0)),
            skipping: false,
            stream_id,
            session: Rc::new(RefCell::new(session)),
            closed: Rc::new(Cell::new(false)),
            joined_at: (0, 0),
            limits: PlayerLimits { queue: 1024, behind: Duration::from_secs(10) },
            behind_since: None,
        };
        (player, rx)
    }

    /// Media parts (bytes, message count) waiting for a writer.
    fn received(rx: &mut fmpsc::UnboundedReceiver<Out>) -> Vec<(Bytes, usize)> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Out::Media(b, _, n) = o {
                out.push((b, n));
            }
        }
        out
    }

    #[test]
    fn stream_windows_are_shared_by_players_and_open_on_keyframes() {
        let stats = Arc::new(MediaStats::default());
        let counters = stats.stream_started("tv", "cam", "rtmp");
        let mut hub = Hub { channels: HashMap::new(), stats, merge: Duration::from_millis(100) };
        let key: Key = (AppName::parse("tv").unwrap(), StreamName::parse("cam").unwrap());
        hub.channels.insert(
            key.clone(),
            Channel { publisher: Some(9), counters: Some(counters.clone()), ..Channel::default() },
        );
        let (a, mut rx_a) = test_player(1, 1);
        let (b, mut rx_b) = test_player(2, 1);
        let (other, mut rx_other) = test_player(3, 2);
        let slow_queue = b.queued.clone();
        for p in [a, b, other] {
            assert!(hub.join(&key, p));
        }
        let ts = |v| RtmpTimestamp::new(v);
        let key_frame = || video(Bytes::from_static(&[0x17, 1, 0, 0, 0, 0xaa]), ts(0));
        let inter = |t| video(Bytes::from_static(&[0x27, 1, 0, 0, 0, 0xbb]), ts(t));
        let sound = |t| audio(Bytes::from_static(&[0xaf, 1, 0xcc]), ts(t));
        let chunked = |m: &Media| match m {
            Media::Video(_, _, c) | Media::Audio(_, _, c) => c.clone(),
            _ => unreachable!(),
        };

        let first = [key_frame(), sound(10), inter(33), sound(40)];
        let mut expected = Vec::new();
        for m in &first {
            expected.extend_from_slice(&chunked(m));
            hub.publish(&key, m.clone());
        }
        // Stream id 1 waits for its window; another stream id is served message by message.
        assert!(received(&mut rx_a).is_empty() && received(&mut rx_b).is_empty());
        assert_eq!(received(&mut rx_other).len(), 4);
        hub.flush_due(Instant::now());
        assert!(received(&mut rx_a).is_empty(), "not due before the merge window");
        hub.flush_due(Instant::now() + Duration::from_millis(100));
        let (got_a, got_b) = (received(&mut rx_a), received(&mut rx_b));
        assert_eq!(got_a.len(), 1);
        assert_eq!((&got_a[0].0[..], got_a[0].1), (&expected[..], 4), "one write of the four messages");
        assert_eq!(got_a[0].0.as_ptr(), got_b[0].0.as_ptr(), "the same bytes, not a copy per player");

        // A player joining mid-window got the waiting media in its start (the GOP): it gets
        // only the rest of that window, and nothing is flushed early for the others.
        let (late, mut rx_late) = test_player(4, 1);
        hub.publish(&key, sound(45));
        assert!(hub.join(&key, late));
        let start = received(&mut rx_late);
        assert!(start.iter().any(|(b, _)| b[..] == chunked(&sound(45))[..]), "the GOP covers the window");
        assert!(received(&mut rx_a).is_empty());
        hub.publish(&key, sound(48));
        hub.channels.get_mut(&key).unwrap().flush();
        assert_eq!(received(&mut rx_a).iter().map(|p| p.1).collect::<Vec<_>>(), vec![2]);
        let rest = received(&mut rx_late);
        assert_eq!(rest.len(), 1);
        assert_eq!((&rest[0].0[..], rest[0].1), (&chunked(&sound(48))[..], 1));
        received(&mut rx_b);

        // A steady publisher's next message flushes a window that is due, without the timer.
        hub.publish(&key, sound(50));
        hub.channels.get_mut(&key).unwrap().window.opened = Some(Instant::now() - Duration::from_millis(150));
        hub.publish(&key, sound(60));
        assert_eq!(received(&mut rx_a).iter().map(|p| p.1).collect::<Vec<_>>(), vec![2]);

        // A keyframe flushes what waits before it and opens a window of its own.
        hub.publish(&key, inter(66));
        hub.publish(&key, key_frame());
        assert_eq!(received(&mut rx_a).iter().map(|p| p.1).collect::<Vec<_>>(), vec![1]);
        assert!(hub.channels[&key].window.keyframe);

        // A player that is behind gets nothing, counted as dropped, until a window opens on a
        // keyframe after it has caught up.
        hub.channels.get_mut(&key).unwrap().flush();
        received(&mut rx_a);
        received(&mut rx_b);
        slow_queue.set(1024);
        let dropped = counters.dropped.load(Ordering::Relaxed);
        hub.publish(&key, inter(100));
        hub.publish(&key, sound(110));
        hub.channels.get_mut(&key).unwrap().flush();
        assert!(received(&mut rx_b).is_empty());
        assert_eq!(received(&mut rx_a).len(), 1, "the others are unaffected");
        assert_eq!(counters.dropped.load(Ordering::Relaxed), dropped + 2);
        slow_queue.set(0);
        hub.publish(&key, inter(133));
        hub.channels.get_mut(&key).unwrap().flush();
        assert!(received(&mut rx_b).is_empty(), "caught up, but still waiting for a keyframe");
        hub.publish(&key, key_frame());
        hub.channels.get_mut(&key).unwrap().flush();
        assert_eq!(received(&mut rx_b).len(), 1);

        // Metadata and the end go after what is waiting, in order.
        received(&mut rx_a);
        hub.publish(&key, sound(150));
        hub.publish(&key, Media::Metadata(Arc::new(StreamMetadata::new())));
        let mut order = Vec::new();
        while let Ok(o) = rx_a.try_recv() {
            order.push(match o {
                Out::Media(..) => "media",
                Out::Bytes(_) => "bytes",
                Out::Close => "close",
            });
        }
        assert_eq!(order.first(), Some(&"media"), "{order:?}");
        assert_eq!(order.len(), 2, "the window, then the metadata: {order:?}");
        hub.publish(&key, sound(160));
        hub.end(&key);
        let mut order = Vec::new();
        while let Ok(o) = rx_a.try_recv() {
            order.push(matches!(o, Out::Close));
        }
        assert_eq!(order.first(), Some(&false), "the last window before the end");
        assert_eq!(order.last(), Some(&true));
    }

    #[test]
    fn with_no_merge_window_every_message_is_written_at_once() {
        let stats = Arc::new(MediaStats::default());
        let mut hub = Hub { channels: HashMap::new(), stats, merge: Duration::ZERO };
        let key: Key = (AppName::parse("tv").unwrap(), StreamName::parse("cam").unwrap());
        hub.channels.insert(key.clone(), Channel { publisher: Some(9), ..Channel::default() });
        let (p, mut rx) = test_player(1, 1);
        assert!(hub.join(&key, p));
        hub.publish(&key, audio(Bytes::from_static(&[0xaf, 1, 0xcc]), RtmpTimestamp::new(0)));
        hub.publish(&key, audio(Bytes::from_static(&[0xaf, 1, 0xdd]), RtmpTimestamp::new(20)));
        assert_eq!(received(&mut rx).iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn pre_chunked_messages_read_back_as_the_same_messages() {
        let mut de = ChunkDeserializer::new();
        de.set_max_chunk_size(CHUNK_SIZE).unwrap();
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for (ts, len) in [(0u32, 1usize), (40, 4096), (80, 4097), (0x00ff_fffe, 10_000), (0x0100_0000, 9000)] {
            let bytes = chunk_message(VIDEO_CSID, 9, 1, ts, &payload[..len], CHUNK_SIZE);
            let m = de.get_next_message(&bytes).unwrap().expect("one whole message");
            assert_eq!((m.timestamp.value, m.type_id, m.message_stream_id), (ts, 9, 1));
            assert_eq!(&m.data[..], &payload[..len]);
            assert!(de.get_next_message(&[]).unwrap().is_none());
        }
    }
}
