//! A media thread's streams: per stream the publisher, metadata, sequence headers, GOP, the
//! shared write `Window`, its players and the other threads it is relayed to (`Mirror`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use rml_rtmp::sessions::{ServerSession, StreamMetadata};
use sluice_events::{AppName, StreamName};

use super::chunk::{
    AUDIO_CSID, CHUNK_SIZE, Media, VIDEO_CSID, chunk_message, is_audio_header, is_keyframe, is_video_header,
};
use super::writer::{Out, Outbox, WRITE_BATCH};
use crate::stats::StreamCounters;

/// Media messages queued towards another media thread before that relay skips to the next
/// keyframe (the other thread is overloaded; its players would fall behind anyway).
pub(super) const MIRROR_QUEUE: usize = 4096;

/// A player, fed straight into its connection's writer (no task of its own).
pub(super) struct Player {
    pub(super) id: u64,
    pub(super) out: Outbox,
    /// Media messages handed to the writer and not yet written.
    pub(super) queued: Rc<Cell<usize>>,
    /// Dropped media since the queue filled; waits for a keyframe.
    pub(super) skipping: bool,
    pub(super) stream_id: u32,
    pub(super) session: Rc<RefCell<ServerSession>>,
    pub(super) closed: Rc<Cell<bool>>,
    /// Bytes and messages of the stream's window when it joined, which its start (the GOP)
    /// already covered: its first window is the rest.
    pub(super) joined_at: (usize, usize),
    pub(super) limits: PlayerLimits,
    /// Since when its queue has been full.
    pub(super) behind_since: Option<Instant>,
}

/// How far a player may fall behind (`Settings::player_queue`, `Settings::player_behind`).
#[derive(Debug, Clone, Copy)]
pub(super) struct PlayerLimits {
    pub(super) queue: usize,
    pub(super) behind: Duration,
}

/// What becomes of media for a player.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Deliver,
    /// Dropped: the player is behind, or waits for a keyframe after it was.
    Skip,
    /// Behind for longer than allowed: the connection is ended.
    Disconnect,
}

impl Player {
    /// Hands `m` to the writer; false once the player is gone (or the stream ended).
    pub(super) fn deliver(&mut self, m: &Media, counters: Option<&Arc<StreamCounters>>) -> bool {
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
    pub(super) fn deliver_window(
        &mut self,
        bytes: &Bytes,
        messages: usize,
        counters: Option<&Arc<StreamCounters>>,
    ) -> bool {
        if let Some(c) = counters {
            c.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.queued.set(self.queued.get() + messages);
        self.out.unbounded_send(Out::Media(bytes.clone(), self.queued.clone(), messages)).is_ok()
    }

    /// Whether `media` goes into the stream's shared window for this player rather than to
    /// it alone: audio and video for stream id 1 (nearly every player), whose chunked bytes
    /// are the same for all.
    pub(super) fn windowed(&self, media: &Media) -> bool {
        self.stream_id == 1 && matches!(media, Media::Video(..) | Media::Audio(..))
    }

    /// The queue check before `units` media messages reach this player: skipped (and counted
    /// as dropped) while it is behind and until a keyframe starts what comes; disconnected
    /// once it has been behind for longer than its limit.
    pub(super) fn admits(&mut self, keyframe: bool, units: usize, counters: Option<&Arc<StreamCounters>>) -> Admit {
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
pub(super) struct Window {
    pub(super) bytes: Vec<u8>,
    pub(super) messages: usize,
    /// A video keyframe opened it (a keyframe always starts a window), so a player that
    /// fell behind can rejoin here.
    pub(super) keyframe: bool,
    pub(super) opened: Option<Instant>,
}

/// This stream relayed to another media thread, which has players for it.
pub(super) struct Mirror {
    pub(super) tx: fmpsc::UnboundedSender<Media>,
    /// Sent and not yet taken by the other thread.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) skipping: bool,
}

impl Mirror {
    pub(super) fn send(&self, m: &Media) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.unbounded_send(m.clone()).is_ok()
    }
}

#[derive(Default)]
pub(super) struct Channel {
    /// A publisher is live (or being decided); for a mirror, the relay's id.
    pub(super) publisher: Option<u64>,
    /// Fed by the publisher's thread, not by a connection of this one.
    pub(super) mirror: bool,
    /// Other threads this stream is relayed to.
    pub(super) mirrors: Vec<Mirror>,
    /// Set once the publisher is admitted.
    pub(super) counters: Option<Arc<StreamCounters>>,
    pub(super) metadata: Option<Arc<StreamMetadata>>,
    pub(super) video_header: Option<Media>,
    pub(super) audio_header: Option<Media>,
    pub(super) gop: Vec<Media>,
    pub(super) players: Vec<Player>,
    pub(super) window: Window,
    /// Bytes of the last window flushed: the next one's starting capacity.
    pub(super) last_window: usize,
}

impl Channel {
    /// What a late joiner (a player, or another thread's relay) gets first: metadata, the
    /// sequence headers, then the current GOP.
    pub(super) fn start(&self) -> Vec<Media> {
        let headers =
            [self.metadata.clone().map(Media::Metadata), self.video_header.clone(), self.audio_header.clone()];
        headers.into_iter().flatten().chain(self.gop.iter().cloned()).collect()
    }

    /// Sends the window to every stream-id-1 player that is keeping up.
    pub(super) fn flush(&mut self) {
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
pub(super) fn player_gone(counters: Option<&Arc<StreamCounters>>) {
    if let Some(c) = counters {
        c.players.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) type Key = (AppName, StreamName);

/// The streams of this media thread.
pub(super) struct Hub {
    pub(super) channels: HashMap<Key, Channel>,
    /// How long media may wait in a stream's window for more (0: every message flushed at once).
    pub(super) merge: Duration,
    /// Wakes the merge timer, which sleeps while the thread has no stream.
    pub(super) timer: Option<fmpsc::UnboundedSender<()>>,
}

impl Hub {
    /// A stream came to this thread: the merge timer runs again.
    pub(super) fn wake_timer(&self) {
        if let Some(timer) = &self.timer {
            let _ = timer.unbounded_send(());
        }
    }

    /// Flushes the windows that have waited `merge`: the media thread's one timer, so a stream
    /// whose publisher pauses does not hold its last media back.
    pub(super) fn flush_due(&mut self, now: Instant) {
        for ch in self.channels.values_mut() {
            if ch.window.opened.is_some_and(|t| now.duration_since(t) >= self.merge) {
                ch.flush();
            }
        }
    }

    pub(super) fn publish(&mut self, key: &Key, media: Media) {
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
    pub(super) fn attach(&mut self, key: &Key, mirror: Mirror) {
        let Some(ch) = self.channels.get_mut(key).filter(|c| c.publisher.is_some() && !c.mirror) else { return };
        let start = ch.start();
        for m in start {
            if !mirror.send(&m) {
                return;
            }
        }
        ch.mirrors.push(mirror);
    }

    /// Adds a player and hands it the stream's start (`Channel::start`).
    pub(super) fn join(&mut self, key: &Key, mut player: Player) -> bool {
        let Some(ch) = self.channels.get_mut(key) else { return false };
        if ch.publisher.is_none() {
            return false;
        }
        // Its start (below) covers what waits in the window: it gets only the rest of it.
        player.joined_at = (ch.window.bytes.len(), ch.window.messages);
        if let Some(c) = &ch.counters {
            c.players.fetch_add(1, Ordering::Relaxed);
        }
        let start = ch.start();
        for m in start {
            player.deliver(&m, ch.counters.as_ref());
        }
        ch.players.push(player);
        true
    }

    pub(super) fn leave(&mut self, key: &Key, id: u64) {
        if let Some(ch) = self.channels.get_mut(key) {
            let before = ch.players.len();
            ch.players.retain(|p| p.id != id);
            if ch.players.len() < before
                && let Some(c) = &ch.counters
            {
                c.players.fetch_sub(1, Ordering::Relaxed);
            }
            // A relayed copy nobody here watches is dropped; its relay stops at the next
            // message and the publisher's thread forgets it.
            if ch.mirror && ch.players.is_empty() {
                self.channels.remove(key);
            }
        }
    }

    pub(super) fn end(&mut self, key: &Key) {
        if let Some(mut ch) = self.channels.remove(key) {
            // The stream's counters end with the publisher's slot (`admit::Publishing`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtmp::chunk::{audio, video};
    use crate::rtmp::writer::outbox;
    use rml_rtmp::sessions::ServerSessionConfig;
    use rml_rtmp::time::RtmpTimestamp;
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
        let stats = crate::stats::MediaStats::default();
        let counters = stats.stream_started("tv", "cam", "rtmp", None);
        let mut hub = Hub { channels: HashMap::new(), merge: Duration::from_millis(100), timer: None };
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
        let mut hub = Hub { channels: HashMap::new(), merge: Duration::ZERO, timer: None };
        let key: Key = (AppName::parse("tv").unwrap(), StreamName::parse("cam").unwrap());
        hub.channels.insert(key.clone(), Channel { publisher: Some(9), ..Channel::default() });
        let (p, mut rx) = test_player(1, 1);
        assert!(hub.join(&key, p));
        hub.publish(&key, audio(Bytes::from_static(&[0xaf, 1, 0xcc]), RtmpTimestamp::new(0)));
        hub.publish(&key, audio(Bytes::from_static(&[0xaf, 1, 0xdd]), RtmpTimestamp::new(20)));
        assert_eq!(received(&mut rx).iter().map(|p| p.1).collect::<Vec<_>>(), vec![1, 1]);
    }
}
