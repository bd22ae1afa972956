//! A live SRT stream's packets: to every player through one `broadcast` channel of shared
//! `Bytes` (no copy per player), after the GOP cache (the packets since the last video
//! keyframe, found in the MPEG-TS).

use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::broadcast;

/// Packets (1316 bytes of TS each) a player may fall behind before it loses the oldest:
/// about 1.5 s of a 10 Mbit/s stream.
const PLAYER_QUEUE: usize = 1500;
/// A player that lags this many times in a row is closed.
pub(super) const LAGS_BEFORE_CLOSE: u32 = 3;
/// Packets the GOP cache holds at most (about 5 MB); a longer GOP is not cached.
const GOP_MAX_PACKETS: usize = 4096;

/// The publisher's packets: to live players through the channel, and into the GOP cache (the
/// packets since the last video keyframe), under one lock, so a player that joins gets the
/// cache and then the channel with nothing missing and nothing twice.
pub(super) struct Feed {
    tx: broadcast::Sender<Bytes>,
    gop: Mutex<Gop>,
}

/// The packets since the last video keyframe (at most `GOP_MAX_PACKETS`).
#[derive(Default)]
pub(super) struct Gop {
    packets: Vec<Bytes>,
    /// A keyframe started the packets (false until the first, and after an overlong GOP).
    open: bool,
}

impl Gop {
    pub(super) fn push(&mut self, data: &Bytes) {
        if starts_video_keyframe(data) {
            self.packets.clear();
            self.open = true;
        }
        if self.open {
            if self.packets.len() < GOP_MAX_PACKETS {
                self.packets.push(data.clone());
            } else {
                *self = Gop::default();
            }
        }
    }

    pub(super) fn packets(&self) -> &[Bytes] {
        &self.packets
    }
}

impl Feed {
    pub(super) fn new() -> Feed {
        Feed { tx: broadcast::channel(PLAYER_QUEUE).0, gop: Mutex::default() }
    }

    pub(super) fn publish(&self, data: Bytes) {
        let mut gop = self.gop.lock().unwrap_or_else(|p| p.into_inner());
        gop.push(&data);
        let _ = self.tx.send(data);
    }

    /// The cached GOP and a receiver of what follows it.
    pub(super) fn join(&self) -> (Vec<Bytes>, broadcast::Receiver<Bytes>) {
        let gop = self.gop.lock().unwrap_or_else(|p| p.into_inner());
        (gop.packets.clone(), self.tx.subscribe())
    }
}

/// Whether an SRT payload (MPEG-TS packets of 188 bytes) holds the start of a video keyframe:
/// a TS packet that starts a video PES (stream id 0xE0–0xEF) with the adaptation field's
/// random-access indicator set (ffmpeg and encoders set it on keyframes; audio PES, which it
/// is also set on, are not video).
fn starts_video_keyframe(payload: &[u8]) -> bool {
    payload.chunks_exact(188).any(|ts| {
        let unit_start = ts[1] & 0x40 != 0;
        let control = (ts[3] >> 4) & 0b11;
        if ts[0] != 0x47 || !unit_start || control != 0b11 {
            return false;
        }
        let adaptation = usize::from(ts[4]);
        let random_access = adaptation > 0 && ts[5] & 0x40 != 0;
        let pes = 5 + adaptation;
        random_access && ts.get(pes..pes + 4).is_some_and(|h| h[..3] == [0, 0, 1] && (0xE0..=0xEF).contains(&h[3]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TS packet: `pid`, payload-unit start, an adaptation field with the random-access
    /// flag if `random_access`, then a PES start of `stream_id`.
    fn ts(stream_id: u8, random_access: bool) -> [u8; 188] {
        let mut p = [0xffu8; 188];
        p[..4].copy_from_slice(&[0x47, 0x40 | 0x01, 0x00, 0x30]);
        p[4] = 1;
        p[5] = if random_access { 0x40 } else { 0 };
        p[6..10].copy_from_slice(&[0, 0, 1, stream_id]);
        p
    }

    #[test]
    fn video_keyframes_start_the_gop_and_audio_ones_do_not() {
        let payload = |packets: &[[u8; 188]]| packets.concat();
        assert!(starts_video_keyframe(&payload(&[ts(0xC0, true), ts(0xE0, true)])));
        assert!(!starts_video_keyframe(&payload(&[ts(0xC0, true)])), "audio");
        assert!(!starts_video_keyframe(&payload(&[ts(0xE0, false)])), "not random access");
        assert!(!starts_video_keyframe(&[0x47; 100]), "short");
        let mut no_adaptation = ts(0xE0, true);
        no_adaptation[3] = 0x10;
        assert!(!starts_video_keyframe(&no_adaptation));
        let mut long = ts(0xE0, true);
        long[4] = 183;
        assert!(!starts_video_keyframe(&long), "no room for a PES header");

        let feed = Feed::new();
        let key = Bytes::from(payload(&[ts(0xE0, true)]));
        let delta = Bytes::from(payload(&[ts(0xE0, false)]));
        feed.publish(delta.clone());
        assert!(feed.join().0.is_empty(), "nothing before the first keyframe");
        feed.publish(key.clone());
        feed.publish(delta.clone());
        let (gop, mut rx) = feed.join();
        assert_eq!(gop, [key.clone(), delta.clone()]);
        feed.publish(key.clone());
        assert_eq!(rx.try_recv().unwrap(), key, "what follows the cache comes through the channel");
        assert_eq!(feed.join().0, [key], "a keyframe restarts the cache");
    }
}
