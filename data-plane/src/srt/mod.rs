//! The SRT server (issue #6): srt-tokio on the worker's tokio runtime, one UDP port for every
//! connection, over the vendored, patched srt-protocol (`data-plane/vendor/README.md`).
//!
//! The caller's streamid is read before the connection is accepted (the standard
//! `#!::r=app/stream,m=publish|request,t=…,u=…,s=…` form, Ant Media's `app/stream,token=…`,
//! or a plain `app/stream`) and admitted through the same `Admission` as RTMP: same methods, same
//! one-time claims, webhook, audit, per-IP backoff and one publisher slot per stream. A refused caller is rejected during the
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

mod driver;
mod feed;
mod link;
mod relay;
mod udp;

pub use driver::fuzz as fuzz_driver;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use sluice_events::{AccessRequest, Action, AppName, AuthState, Protocol, Reason, SecretKind, wire};
use srt_protocol::packet::CoreRejectReason;
use srt_protocol::settings::ConnInitSettings;
use srt_protocol::settings::KeySettings;
use srt_tokio::SrtListener;
use srt_tokio::access::{RejectReason, ServerRejectReason};
use srt_tokio::options::{ByteCount, KeySize, ListenerOptions, Passphrase, SocketOptions, StreamId};

use crate::admit::{Admission, Admitted, Refusal};
use crate::limits::Permit;
use crate::slot::Key;
use crate::task::Tasks;
use relay::Hub;

/// Send buffer of a player's connection, in packets of 1,456 bytes (libsrt's default).
const SEND_BUFFER_PACKETS: u64 = 8192;
/// libsrt's code for a rate-limited caller: server reject codes are 1000 + an HTTP status,
/// and srt-tokio carries them as 2000 + the status on the wire.
const REJECT_TOO_MANY_REQUESTS: i32 = 2429;

/// A publisher silent this long is closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The UDP socket's kernel buffers asked for (the kernel caps them at `net.core.rmem_max` and
/// `wmem_max`).
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Which code drives SRT connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One loop on one thread over srt-protocol's sans-IO core, batched system calls
    /// (`driver.rs`, issue #21): the default.
    Batched,
    /// srt-tokio: a task and channels per connection, one system call per datagram (kept for
    /// side-by-side measurement, `SLUICE_SRT_ENGINE=tokio`).
    Tokio,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "batched" => Ok(Engine::Batched),
            "tokio" => Ok(Engine::Tokio),
            _ => Err("batched or tokio".into()),
        }
    }
}

/// What the SRT server is told at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The receive and send latency offered to callers.
    pub latency: Duration,
    pub engine: Engine,
    /// The batched driver's shortest time between two rounds.
    pub tick: Duration,
}

/// The options every SRT connection is made with.
fn socket_options(settings: &Settings) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.sender.peer_latency = settings.latency;
    o.receiver.latency = settings.latency;
    // srt-tokio's default send buffer is 32 packets (46,592 bytes): a player falls that far
    // behind in 150 ms of a 2 Mbit/s stream. libsrt's default, 8,192 packets; what a player
    // holds is bounded anyway by the drop of packets older than 1.25 × latency.
    o.sender.buffer_size = ByteCount(SEND_BUFFER_PACKETS * 1456);
    o
}

/// Binds the SRT port and serves callers until the worker stops.
pub async fn spawn(tasks: &Tasks, settings: Settings, admission: Admission) -> std::io::Result<()> {
    match settings.engine {
        Engine::Batched => spawn_batched(tasks, &settings, admission),
        Engine::Tokio => spawn_tokio(tasks, &settings, admission).await,
    }
}

/// The batched driver on its own thread; deciding on the tokio runtime.
fn spawn_batched(tasks: &Tasks, settings: &Settings, admission: Admission) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::os::fd::AsRawFd as _;
    let options = ListenerOptions::with(settings.listen, socket_options(settings)).map_err(std::io::Error::other)?;
    let init = ConnInitSettings::from(options.into_value().socket);
    let udp = std::net::UdpSocket::bind(settings.listen)?;
    udp.set_nonblocking(true)?;
    for result in [
        setsockopt(udp.as_raw_fd(), sockopt::RcvBuf, &UDP_BUFFER_BYTES),
        setsockopt(udp.as_raw_fd(), sockopt::SndBuf, &UDP_BUFFER_BYTES),
    ] {
        result.map_err(std::io::Error::from)?;
    }
    let local = udp.local_addr()?;
    let (requests, requests_rx) = tokio::sync::mpsc::channel(driver::PENDING_REQUESTS);
    let (commands, commands_rx) = driver::commands()?;
    let live = driver::LiveSet::default();
    let (tick, driver_live) = (settings.tick, live.clone());
    let (started, ready) = std::sync::mpsc::channel();
    // A plain thread: the driver waits in `ppoll` itself (a runtime's park, timer wheel and
    // registrations cost more than the round at a few players).
    std::thread::Builder::new().name("sluice-srt".into()).spawn(move || {
        let io = match udp::Io::new(udp) {
            Ok(io) => io,
            Err(e) => return drop(started.send(Err(e))),
        };
        let _ = started.send(Ok(()));
        driver::Driver::new(io, local, init, requests, commands_rx, driver_live, tick).run();
    })?;
    ready.recv().map_err(std::io::Error::other)??;
    tracing::info!(listen = %local, tick_ms = tick.as_millis() as u64, "SRT on the batched driver");
    tasks.spawn("SRT admission", driver::admission_loop(requests_rx, commands.clone(), admission, live));
    // When the worker stops, so does the driver (sessions end with a shutdown packet).
    struct StopOnDrop(driver::Commands);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(driver::Command::Stop);
        }
    }
    tasks.spawn("SRT driver", async move {
        let _stop = StopOnDrop(commands);
        std::future::pending::<()>().await
    });
    Ok(())
}

/// srt-tokio's listener on the tokio runtime, a task per caller.
async fn spawn_tokio(tasks: &Tasks, settings: &Settings, admission: Admission) -> std::io::Result<()> {
    let options = socket_options(settings);
    let (listener, mut incoming) = SrtListener::builder().set(|o| *o = options).bind(settings.listen).await?;
    tracing::info!(listen = %settings.listen, "SRT on srt-tokio");
    let hub = Arc::new(Hub::default());
    tasks.spawn("SRT listener", async move {
        let _listener = listener;
        while let Some(request) = incoming.incoming().next().await {
            let (admission, hub) = (admission.clone(), hub.clone());
            tokio::spawn(async move { caller(request, admission, hub).await });
        }
    });
    Ok(())
}

/// One srt-tokio caller: decided, then refused with a reject code or accepted and handed to
/// its publisher or player loop.
async fn caller(request: srt_tokio::ConnectionRequest, admission: Admission, hub: Arc<Hub>) {
    let stream_id = request.stream_id().map(|s: &StreamId| s.as_bytes().to_vec());
    let matches = |k: &KeySettings| request.passphrase_matches(k);
    let caller = Caller {
        remote: request.remote(),
        stream_id: stream_id.as_deref(),
        key_size: request.key_size(),
        passphrase_matches: &matches,
    };
    match verdict(caller, &admission, |k| hub.is_live(k)).await {
        Err(reject) => {
            let _ = request.reject(reject).await;
        }
        Ok(Accepted { keys, admitted, permit }) => {
            if admitted.publishing.is_some() {
                relay::publish(request, keys, admitted, &hub).await;
            } else {
                relay::play(request, keys, admitted, &hub).await;
            }
            drop(permit);
        }
    }
}

/// The reject code for a refusal.
fn reject_reason(reason: Reason) -> RejectReason {
    match reason {
        Reason::AppNotFound | Reason::StreamNotRegistered | Reason::NotLive => {
            RejectReason::Server(ServerRejectReason::Notfound)
        }
        Reason::StreamBusy => RejectReason::Server(ServerRejectReason::Conflict),
        Reason::RateLimited => RejectReason::ServerUnrecognized(REJECT_TOO_MANY_REQUESTS),
        _ => RejectReason::Server(ServerRejectReason::Forbidden),
    }
}

/// An SRT streamid as an `AccessRequest`. A streamid with no mode (SLS's plain names) takes
/// the name's: a stream's secret publish name publishes, any other name plays; a bare name is
/// in `default_app` (`SLUICE_SLS_APP`).
pub fn access_request(
    raw: &[u8],
    client_ip: std::net::IpAddr,
    state: &AuthState,
    default_app: &AppName,
) -> Result<AccessRequest, String> {
    let parsed = wire::parse_srt_streamid_in(raw, Some(default_app)).map_err(|e| e.to_string())?;
    let publish_name =
        |app: &AppName, stream| state.apps.get(app).is_some_and(|a| a.publish_names.contains_key(stream));
    let action = if parsed.by_name && publish_name(&parsed.target.app, &parsed.target.stream) {
        Action::Publish
    } else {
        parsed.action
    };
    Ok(AccessRequest {
        // Time-ordered, as every decision id (it becomes an event id in the log).
        id: uuid::Uuid::now_v7(),
        app: parsed.target.app,
        stream: parsed.target.stream,
        action,
        protocol: Protocol::Srt,
        client_ip,
        credential: parsed.target.credential,
        client_id: None,
    })
}

/// What an SRT caller asked, as the listener saw it before accepting: enough to decide.
pub(super) struct Caller<'a> {
    pub remote: SocketAddr,
    pub stream_id: Option<&'a [u8]>,
    pub key_size: KeySize,
    /// Whether the caller's key material opens with these settings (srt-protocol's patched
    /// `AccessControlRequest::passphrase_matches`).
    pub passphrase_matches: &'a (dyn Fn(&KeySettings) -> bool + Sync),
}

/// An admitted caller: the key settings to accept it with, the admission (its session, and a
/// publisher's slot and counters) and its place under the connection limit, both held until
/// the connection ends.
pub(super) struct Accepted {
    pub keys: Option<KeySettings>,
    pub admitted: Admitted,
    pub permit: Permit,
}

/// Decides one caller: drain, connection limit, streamid, encryption, then the one admission
/// step. `is_live` says whether a stream has a publisher on this worker.
pub(super) async fn verdict(
    caller: Caller<'_>,
    admission: &Admission,
    is_live: impl Fn(&Key) -> bool,
) -> Result<Accepted, RejectReason> {
    let peer = caller.remote;
    if admission.decider.shared.is_draining() {
        // The worker is going away: try another (1503), nothing decided. The UDP socket is
        // every SRT session's, so it stays open for the live ones.
        return Err(RejectReason::Server(ServerRejectReason::Down));
    }
    let Some(permit) = admission.decider.gate.admit(peer.ip()) else {
        tracing::debug!(%peer, "SRT caller refused: connection limit");
        return Err(RejectReason::Server(ServerRejectReason::Overload));
    };
    let raw = caller.stream_id.unwrap_or_default();
    let req = match access_request(raw, peer.ip(), &admission.decider.shared.state.load(), &admission.decider.sls_app) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "SRT streamid refused");
            // Recorded, so a misconfigured caller shows in the audit (coalesced when it retries).
            if let Err(e) = admission.decider.record_malformed(Action::Play, Protocol::Srt, peer.ip()).await {
                tracing::debug!(%peer, error = %e, "a malformed SRT request was not recorded");
            }
            return Err(RejectReason::Server(ServerRejectReason::BadRequest));
        }
    };
    // Encryption is the app's: callers must use its passphrase if it has one, and must not
    // encrypt if it has none. A mismatch, a wrong passphrase included (the caller's key
    // material must open with the app's), is refused before anything is decided: nothing to
    // log, no one-time token spent (issue #16 item 4).
    let keys = match encryption(&admission.decider.shared.state.load(), &req.app, &caller) {
        Ok(keys) => keys,
        Err(reject) => {
            tracing::debug!(%peer, app = %req.app, ?reject, "SRT caller refused: encryption does not match the app's");
            return Err(reject);
        }
    };
    // Live under the public name the request resolves to (another player id of a publisher
    // plays the publisher's stream).
    let live = req.action == Action::Publish || is_live(&(req.app.clone(), req.stream.clone())) || {
        let public = sluice_events::decide::public_stream(&admission.decider.shared.state.load(), &req);
        public != req.stream && is_live(&(req.app.clone(), public))
    };
    match admission.admit(req, live).await {
        Ok(admitted) => Ok(Accepted { keys, admitted, permit }),
        Err(Refusal::Refused(record)) => Err(reject_reason(record.final_reason)),
        Err(Refusal::Unavailable(e)) => {
            tracing::warn!(%peer, error = %e, "SRT caller refused: no decision");
            // Not ready (no state yet) or the spool refuses: 1503, try later.
            Err(RejectReason::Server(ServerRejectReason::Down))
        }
    }
}

/// The key settings to accept a caller of `app` with, or the rejection when the caller's
/// encryption does not match the app's passphrase (`Unsecure` when one side encrypts and the
/// other does not, `BadSecret` for a wrong passphrase). An unknown app is left to the decision.
fn encryption(state: &AuthState, app: &AppName, request: &Caller<'_>) -> Result<Option<KeySettings>, RejectReason> {
    let caller = request.key_size;
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
    if caller == KeySize::Unspecified {
        return Err(RejectReason::Core(CoreRejectReason::Unsecure));
    }
    let keys = KeySettings { key_size: caller, passphrase };
    if !(request.passphrase_matches)(&keys) {
        return Err(RejectReason::Core(CoreRejectReason::BadSecret));
    }
    Ok(Some(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (state, live) = (AuthState::new(), AppName::parse("live").unwrap());
        let request = |raw: &[u8]| access_request(raw, ip, &state, &live);
        let r = request(b"#!::r=live/cam1,m=publish,t=abc").unwrap();
        assert_eq!((r.app.as_str(), r.stream.as_str(), r.action), ("live", "cam1", Action::Publish));
        assert_eq!(r.protocol, Protocol::Srt);
        let r = request(b"studio/cam1,token=abc").unwrap();
        assert_eq!((r.app.as_str(), r.stream.as_str(), r.action), ("studio", "cam1", Action::Publish), "Ant's form");
        let r = request(b"live/cam1").unwrap();
        assert_eq!(r.action, Action::Play, "a name that is no publish name plays");
        let r = request(b"cam1").unwrap();
        assert_eq!((r.app.as_str(), r.action), ("live", Action::Play), "SLS's bare name is in its app");
        for bad in [&b""[..], &[0xff, 0xfe], b"#!::m=publish", b"#!::r=a/b,r=a/c", b"#!::r=a/b,m=record", &[b'a'; 600]]
        {
            assert!(request(bad).is_err(), "{bad:?}");
        }
    }
}
