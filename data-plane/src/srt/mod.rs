//! The SRT server (issue #6): srt-tokio on the worker's tokio runtime, one UDP port for every
//! connection, over the vendored, patched srt-protocol (`data-plane/vendor/README.md`).
//!
//! The caller's streamid is read before the connection is accepted (the standard
//! `#!::r=app/stream,m=publish|request,t=…,u=…,s=…` form, Ant Media's `app/stream,token=…`,
//! or a plain `app/stream`) and decided through the same `Decider` as RTMP: same methods, same
//! one-time claims, webhook, audit and per-IP backoff. A refused caller is rejected during the
//! handshake with a code libsrt reports: 1400 malformed streamid, 1402 connection limit, 1403
//! a refused credential, 1404 an unknown app or stream (or nothing live to play), 1409 a
//! second publisher, 1429 an address in the penalty box, 1503 no decision possible (the worker
//! has no state yet); `UNSECURE` when the caller's encryption does not match the app's
//! passphrase (checked before deciding), `BADSECRET` for a wrong passphrase.
//!
//! Relay: the publisher's MPEG-TS packets go to every player of the stream through a
//! `broadcast` channel of shared `Bytes` (no copy per player), after the GOP cache (the
//! packets since the last video keyframe). A player that falls more than the channel's
//! capacity behind loses the oldest packets (counted as dropped) and is closed after it lags
//! three times in a row; it never stalls the publisher. Sessions are registered for kick on
//! change, as RTMP's are. The sockets' statistics feed the stream's `SrtLink` (heartbeats,
//! `/v1/stats`, SLS `/stats`, Prometheus).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use sluice_events::AuthState;
use sluice_events::SecretKind;
use sluice_events::dist::SrtLink;
use sluice_events::{AccessRequest, Action, AppName, Protocol, Reason, StreamName, wire};
use srt_protocol::packet::CoreRejectReason;
use srt_protocol::settings::KeySettings;
use srt_tokio::access::{RejectReason, ServerRejectReason};
use srt_tokio::options::{ByteCount, KeySize, Passphrase, StreamId};
use srt_tokio::{SocketStatistics, SrtListener};
use tokio::sync::broadcast;

use crate::decide::Decider;
use crate::stats::StreamCounters;

/// Packets (1316 bytes of TS each) a player may fall behind before it loses the oldest:
/// about 1.5 s of a 10 Mbit/s stream.
const PLAYER_QUEUE: usize = 1500;
/// A player that lags this many times in a row is closed.
const LAGS_BEFORE_CLOSE: u32 = 3;
/// Send buffer of a player's connection, in packets of 1,456 bytes (libsrt's default).
const SEND_BUFFER_PACKETS: u64 = 8192;
/// A publisher silent this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// libsrt's code for a rate-limited caller: server reject codes are 1000 + an HTTP status,
/// and srt-tokio carries them as 2000 + the status on the wire.
const REJECT_TOO_MANY_REQUESTS: i32 = 2429;

/// What the SRT server is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The receive and send latency offered to callers.
    pub latency: Duration,
}

type Key = (AppName, StreamName);

struct Live {
    publisher: u64,
    feed: Arc<Feed>,
    /// Set once the publisher is admitted.
    counters: Option<Arc<StreamCounters>>,
}

/// Packets the GOP cache holds at most (about 5 MB); a longer GOP is not cached.
const GOP_MAX_PACKETS: usize = 4096;

/// The publisher's packets: to live players through the channel, and into the GOP cache (the
/// packets since the last video keyframe), under one lock, so a player that joins gets the
/// cache and then the channel with nothing missing and nothing twice.
struct Feed {
    tx: broadcast::Sender<Bytes>,
    gop: Mutex<Gop>,
}

#[derive(Default)]
struct Gop {
    packets: Vec<Bytes>,
    /// A keyframe started the packets (false until the first, and after an overlong GOP).
    open: bool,
}

impl Feed {
    fn new() -> Feed {
        Feed { tx: broadcast::channel(PLAYER_QUEUE).0, gop: Mutex::default() }
    }

    fn publish(&self, data: Bytes) {
        let mut gop = self.gop.lock().unwrap_or_else(|p| p.into_inner());
        if starts_video_keyframe(&data) {
            gop.packets.clear();
            gop.open = true;
        }
        if gop.open {
            if gop.packets.len() < GOP_MAX_PACKETS {
                gop.packets.push(data.clone());
            } else {
                *gop = Gop::default();
            }
        }
        let _ = self.tx.send(data);
    }

    /// The cached GOP and a receiver of what follows it.
    fn join(&self) -> (Vec<Bytes>, broadcast::Receiver<Bytes>) {
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

/// The SRT streams of this worker: one publisher each.
#[derive(Default)]
struct Hub {
    streams: Mutex<HashMap<Key, Live>>,
    next_id: AtomicU64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Live>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self, key: &Key, id: u64) -> bool {
        let mut streams = self.lock();
        if streams.contains_key(key) {
            return false;
        }
        streams.insert(key.clone(), Live { publisher: id, feed: Arc::new(Feed::new()), counters: None });
        true
    }

    fn release(&self, key: &Key, id: u64) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|l| l.publisher == id) {
            streams.remove(key);
        }
    }

    fn admitted(&self, key: &Key, id: u64, counters: Arc<StreamCounters>) -> Option<Arc<Feed>> {
        let mut streams = self.lock();
        let live = streams.get_mut(key).filter(|l| l.publisher == id)?;
        live.counters = Some(counters);
        Some(live.feed.clone())
    }

    /// An admitted publisher's GOP cache and a receiver of the packets after it.
    fn subscribe(&self, key: &Key) -> Option<(Vec<Bytes>, broadcast::Receiver<Bytes>, Arc<StreamCounters>)> {
        let (feed, counters) = {
            let streams = self.lock();
            let live = streams.get(key)?;
            (live.feed.clone(), live.counters.clone()?)
        };
        let (gop, rx) = feed.join();
        Some((gop, rx, counters))
    }
}

/// Binds the SRT port and serves callers on the tokio runtime until the process ends.
pub async fn spawn(settings: Settings, decider: Decider) -> std::io::Result<()> {
    let (listener, mut incoming) = SrtListener::builder()
        .latency(settings.latency)
        // srt-tokio's default send buffer is 32 packets (46,592 bytes): a player falls that
        // far behind in 150 ms of a 2 Mbit/s stream. libsrt's default, 8,192 packets; what a
        // player holds is bounded anyway by the drop of packets older than 1.25 × latency.
        .set(|o| o.sender.buffer_size = ByteCount(SEND_BUFFER_PACKETS * 1456))
        .bind(settings.listen)
        .await?;
    tracing::info!(listen = %settings.listen, "SRT on srt-tokio");
    let hub = Arc::new(Hub::default());
    tokio::spawn(async move {
        let _listener = listener;
        while let Some(request) = incoming.incoming().next().await {
            let (decider, hub) = (decider.clone(), hub.clone());
            tokio::spawn(async move { caller(request, decider, hub).await });
        }
    });
    Ok(())
}

/// The reject code for a refusal.
fn reject_reason(reason: Reason) -> RejectReason {
    match reason {
        Reason::AppNotFound | Reason::StreamNotRegistered => RejectReason::Server(ServerRejectReason::Notfound),
        Reason::StreamBusy => RejectReason::Server(ServerRejectReason::Conflict),
        Reason::RateLimited => RejectReason::ServerUnrecognized(REJECT_TOO_MANY_REQUESTS),
        _ => RejectReason::Server(ServerRejectReason::Forbidden),
    }
}

/// An SRT streamid as an `AccessRequest`.
pub fn access_request(raw: &[u8], client_ip: std::net::IpAddr) -> Result<AccessRequest, String> {
    let parsed = wire::parse_srt_streamid(raw).map_err(|e| e.to_string())?;
    Ok(AccessRequest {
        // Time-ordered, as every decision id (it becomes an event id in the log).
        id: uuid::Uuid::now_v7(),
        app: parsed.target.app,
        stream: parsed.target.stream,
        action: parsed.action,
        protocol: Protocol::Srt,
        client_ip,
        credential: parsed.target.credential,
    })
}

async fn caller(request: srt_tokio::ConnectionRequest, decider: Decider, hub: Arc<Hub>) {
    let peer = request.remote();
    let ip = peer.ip();
    let Some(permit) = decider.gate.admit(ip) else {
        tracing::debug!(%peer, "SRT caller refused: connection limit");
        let _ = request.reject(RejectReason::Server(ServerRejectReason::Overload)).await;
        return;
    };
    let raw = request.stream_id().map(|s: &StreamId| s.as_bytes().to_vec()).unwrap_or_default();
    let req = match access_request(&raw, ip) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "SRT streamid refused");
            let _ = request.reject(RejectReason::Server(ServerRejectReason::BadRequest)).await;
            return;
        }
    };
    // Encryption is the app's: callers must use its passphrase if it has one, and must not
    // encrypt if it has none. A mismatch is refused before anything is decided (nothing to
    // log, no one-time token spent); a wrong passphrase only shows once the handshake
    // completes, after the decision.
    let key_size = request.key_size();
    let keys = match encryption(&decider.shared.state.load(), &req.app, key_size) {
        Ok(keys) => keys,
        Err(reject) => {
            tracing::debug!(%peer, app = %req.app, ?reject, "SRT caller refused: encryption does not match the app's");
            let _ = request.reject(reject).await;
            return;
        }
    };
    let started = Instant::now();
    if decider.gate.penalized(ip, started) {
        let _ = decider.decide_refusing(req, Some(Reason::RateLimited)).await;
        let _ = request.reject(reject_reason(Reason::RateLimited)).await;
        return;
    }
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let public = sluice_events::decide::public_stream(&decider.shared.state.load(), &req);
    let key = (req.app.clone(), public);
    let publishing = req.action == Action::Publish;
    let busy = publishing && !hub.claim(&key, id);
    let admitted_by = req.clone();
    let record = match decider.decide_refusing(req, busy.then_some(Reason::StreamBusy)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "SRT caller refused: no decision");
            if publishing && !busy {
                hub.release(&key, id);
            }
            // Not ready (no state yet) or the spool refuses: 1503, try later.
            let _ = request.reject(RejectReason::Server(ServerRejectReason::Down)).await;
            return;
        }
    };
    decider.stats.decision_latency(started.elapsed());
    if record.allowed {
        decider.gate.succeeded(ip);
    } else if !matches!(record.final_reason, Reason::StreamBusy | Reason::RateLimited) {
        decider.gate.failed(ip, Instant::now());
    }
    if !record.allowed {
        if publishing && !busy {
            hub.release(&key, id);
        }
        let _ = request.reject(reject_reason(record.final_reason)).await;
        return;
    }
    let key = (record.request.app.clone(), record.decision.stream.clone());
    let mut session = decider.sessions.admit(admitted_by, record.decision.method);
    if publishing {
        let counters = decider.stats.stream_started(key.0.as_str(), key.1.as_str(), "srt");
        let Some(feed) = hub.admitted(&key, id, counters.clone()) else {
            decider.stats.stream_ended(key.0.as_str(), key.1.as_str());
            let _ = request.reject(RejectReason::Server(ServerRejectReason::Conflict)).await;
            return;
        };
        let socket = match request.accept(keys).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, error = %e, "SRT handshake failed after the decision (a wrong passphrase?)");
                hub.release(&key, id);
                decider.stats.stream_ended(key.0.as_str(), key.1.as_str());
                return;
            }
        };
        tracing::info!(%peer, app = %key.0, stream = %key.1, "SRT publisher live");
        let mut socket = socket;
        let (rtt, latency) = (socket.settings().rtt, socket.settings().recv_tsbpd_latency);
        counters.srt_link(|l| {
            l.rtt_us = rtt.as_micros() as u64;
            l.latency_ms = latency.as_millis() as u64;
        });
        let mut link = socket.statistics().clone();
        loop {
            tokio::select! {
                Some(s) = link.next() => counters.srt_link(|l| publisher_link(l, &s)),
                packet = tokio::time::timeout(IDLE_TIMEOUT, socket.next()) => match packet {
                    Ok(Some(Ok((_, data)))) => {
                        counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                        feed.publish(data);
                    }
                    Ok(Some(Err(_)) | None) => break,
                    Err(_) => {
                        tracing::debug!(%peer, "SRT publisher idle; closing");
                        break;
                    }
                },
                reason = session.ended() => {
                    tracing::info!(%peer, reason = reason.as_str(), "SRT session ended: no longer allowed");
                    break;
                }
            }
        }
        hub.release(&key, id);
        decider.stats.stream_ended(key.0.as_str(), key.1.as_str());
        let _ = socket.close().await;
    } else {
        // Only a live stream can be played: the caller learns it before the handshake ends.
        let Some((gop, mut rx, counters)) = hub.subscribe(&key) else {
            let _ = request.reject(RejectReason::Server(ServerRejectReason::Notfound)).await;
            return;
        };
        let mut socket = match request.accept(keys).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, error = %e, "SRT handshake failed after the decision (a wrong passphrase?)");
                return;
            }
        };
        counters.players.fetch_add(1, Ordering::Relaxed);
        // The GOP so far first, so the player decodes at once instead of waiting for the
        // publisher's next keyframe.
        for data in gop {
            let n = data.len() as u64;
            if socket.send((Instant::now(), data)).await.is_err() {
                break;
            }
            counters.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
        let mut lags = 0;
        let mut link = socket.statistics().clone();
        let mut reported = PlayerLink::default();
        loop {
            tokio::select! {
                Some(s) = link.next() => {
                    let now = PlayerLink::of(&s);
                    counters.srt_link(|l| now.add_since(&reported, l));
                    reported = now;
                }
                packet = rx.recv() => match packet {
                    Ok(data) => {
                        lags = 0;
                        let n = data.len() as u64;
                        if socket.send((Instant::now(), data)).await.is_err() {
                            break;
                        }
                        counters.bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        counters.dropped.fetch_add(missed, Ordering::Relaxed);
                        lags += 1;
                        if lags >= LAGS_BEFORE_CLOSE {
                            tracing::info!(%peer, "SRT player too far behind; closing");
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                reason = session.ended() => {
                    tracing::info!(%peer, reason = reason.as_str(), "SRT session ended: no longer allowed");
                    break;
                }
            }
        }
        counters.players.fetch_sub(1, Ordering::Relaxed);
        let _ = socket.close().await;
    }
    drop(permit);
}

/// The key settings to accept a caller of `app` with, or the rejection when the caller's
/// encryption does not match the app's passphrase. An unknown app is left to the decision.
fn encryption(state: &AuthState, app: &AppName, caller: KeySize) -> Result<Option<KeySettings>, RejectReason> {
    let Some(app) = state.apps.get(app).filter(|a| a.secrets.contains_key(&SecretKind::SrtPassphrase)) else {
        return match caller {
            KeySize::Unspecified => Ok(None),
            _ => Err(RejectReason::Core(CoreRejectReason::Unsecure)),
        };
    };
    // Sealed and this worker cannot open it: refuse rather than serve in the clear.
    let passphrase = app.secret_bytes(SecretKind::SrtPassphrase).and_then(|p| String::from_utf8(p.to_vec()).ok());
    let Some(passphrase) = passphrase.and_then(|p| Passphrase::try_from(p).ok()) else {
        return Err(RejectReason::Server(ServerRejectReason::Down));
    };
    match caller {
        KeySize::Unspecified => Err(RejectReason::Core(CoreRejectReason::Unsecure)),
        key_size => Ok(Some(KeySettings { key_size, passphrase })),
    }
}

/// The publisher's link figures from its socket's statistics.
fn publisher_link(l: &mut SrtLink, s: &SocketStatistics) {
    if !s.rx_average_rtt.is_zero() {
        l.rtt_us = s.rx_average_rtt.as_micros() as u64;
    }
    // Packets per second of 1,456 bytes (SRT's payload and header), as libsrt's mbpsBandwidth.
    l.bandwidth_bps = s.rx_bandwidth * 1456 * 8;
    l.rcv_buf_ms = s.rx_acknowledged_time.as_millis() as u64;
    l.pkt_rcv_drop = s.rx_dropped_data;
    l.bytes_rcv_drop = s.rx_dropped_bytes;
    l.pkt_rcv_retrans = s.rx_retransmit_data;
    // srt-tokio keeps no loss count: a packet was lost if it had to be retransmitted or never
    // arrived in time; its size is the average.
    l.pkt_rcv_loss = s.rx_retransmit_data + s.rx_dropped_data;
    let average = s.rx_bytes.checked_div(s.rx_data).unwrap_or(0);
    l.bytes_rcv_loss = s.rx_dropped_bytes + s.rx_retransmit_data * average;
}

/// One player's send-side counters, added to its stream's totals as they grow.
#[derive(Debug, Default, Clone, Copy)]
struct PlayerLink {
    retransmitted: u64,
    lost: u64,
    dropped: u64,
}

impl PlayerLink {
    fn of(s: &SocketStatistics) -> PlayerLink {
        PlayerLink { retransmitted: s.tx_retransmit_data, lost: s.tx_loss_data, dropped: s.tx_dropped_data }
    }

    fn add_since(&self, before: &PlayerLink, l: &mut SrtLink) {
        l.pkt_snd_retrans += self.retransmitted.saturating_sub(before.retransmitted);
        l.pkt_snd_loss += self.lost.saturating_sub(before.lost);
        l.pkt_snd_drop += self.dropped.saturating_sub(before.dropped);
    }
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

    #[test]
    fn refusals_map_to_the_documented_reject_codes() {
        let code = |r: Reason| match reject_reason(r) {
            RejectReason::Server(s) => s as i32,
            RejectReason::ServerUnrecognized(n) => n,
            other => panic!("{other:?}"),
        };
        // On the wire 2000 + status; libsrt reports 1000 + status.
        assert_eq!(code(Reason::TokenNotFound), 2403);
        assert_eq!(code(Reason::CidrDenied), 2403);
        assert_eq!(code(Reason::StreamNotRegistered), 2404);
        assert_eq!(code(Reason::AppNotFound), 2404);
        assert_eq!(code(Reason::StreamBusy), 2409);
        assert_eq!(code(Reason::RateLimited), 2429);
    }

    #[test]
    fn streamids_in_every_form_become_requests_and_garbage_is_an_error() {
        let ip = std::net::IpAddr::from([192, 0, 2, 7]);
        let r = access_request(b"#!::r=live/cam1,m=publish,t=abc", ip).unwrap();
        assert_eq!((r.app.as_str(), r.stream.as_str(), r.action), ("live", "cam1", Action::Publish));
        assert_eq!(r.protocol, Protocol::Srt);
        let r = access_request(b"live/cam1,token=abc", ip).unwrap();
        assert_eq!(r.stream.as_str(), "cam1");
        let r = access_request(b"live/cam1", ip).unwrap();
        assert_eq!(r.action, Action::Play);
        for bad in [&b""[..], &[0xff, 0xfe], b"#!::m=publish", b"#!::r=a/b,r=a/c", b"#!::r=a/b,m=record", &[b'a'; 600]]
        {
            assert!(access_request(bad, ip).is_err(), "{bad:?}");
        }
    }
}
