//! The media threads: one monoio runtime each with its own `SO_REUSEPORT` listener, the
//! merge timer and the relay inbox; and the tokio side that serves their admissions.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::channel::mpsc as fmpsc;
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::conn::connection;
use super::ctx::{AdmitJob, Attach, Ctx, Directory};
use super::hub::{Hub, PlayerLimits};

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
    /// Turns true on SIGTERM: the listeners close (live connections go on).
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// Peers whose connections open with a PROXY protocol header naming the client.
    pub proxy_protocol_from: Vec<sluice_events::Cidr>,
    /// RTMPS: its listen address and the certificates (swapped by a reload).
    pub rtmps: Option<(SocketAddr, super::tls::Certificates)>,
}

/// Starts the media threads (`settings.threads`, each a monoio runtime with its own
/// `SO_REUSEPORT` listener on `listen`) and serves until the process ends. The kernel spreads
/// connections over the threads; a stream published on one is relayed to the others that have
/// players for it, once per thread, not once per player.
pub fn spawn(settings: Settings, jobs: mpsc::Sender<AdmitJob>, gate: Arc<crate::limits::Gate>) -> std::io::Result<()> {
    let threads = settings.threads.max(1);
    let directory = Arc::new(Directory::default());
    let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..threads).map(|_| fmpsc::unbounded::<Attach>()).unzip();
    let inboxes = Arc::new(inboxes);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (thread, inbox) in receivers.into_iter().enumerate() {
        let ready_tx = ready_tx.clone();
        let (settings, jobs, gate) = (settings.clone(), jobs.clone(), gate.clone());
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
                let bind = |at: SocketAddr| TcpListener::bind_with_config(at, &ListenerOpts::new().reuse_port(true));
                let rtmps = match &settings.rtmps {
                    Some((at, certs)) => match bind(*at) {
                        Ok(l) => Some((l, certs.clone())),
                        Err(e) => {
                            let _ = ready_tx.send(Err(std::io::Error::new(e.kind(), format!("RTMPS on {at}: {e}"))));
                            return;
                        }
                    },
                    None => None,
                };
                let listener = match bind(listen) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let (timer, woken) = futures::channel::mpsc::unbounded();
                let timer = (!settings.merge_write.is_zero()).then_some(timer);
                let hub = RefCell::new(Hub { channels: HashMap::new(), merge: settings.merge_write, timer });
                let ctx = Rc::new(Ctx {
                    thread,
                    directory,
                    inboxes,
                    hub,
                    gate,
                    jobs,
                    next_id: Cell::new(1),
                    max_message: settings.max_message.max(4096),
                    idle_timeout: settings.idle_timeout,
                    player_limits: PlayerLimits { queue: settings.player_queue.max(1), behind: settings.player_behind },
                });
                monoio::spawn(serve_inbox(ctx.clone(), inbox));
                if !settings.merge_write.is_zero() {
                    monoio::spawn(flush_windows(ctx.clone(), settings.merge_write, woken));
                }
                let settings = Rc::new(settings);
                if let Some((tls_listener, certs)) = rtmps {
                    monoio::spawn(accept_loop(tls_listener, ctx.clone(), settings.clone(), Some(certs)));
                }
                accept_loop(listener, ctx, settings, None).await;
                // Draining: no new connections; the thread serves its live ones to their end.
                std::future::pending::<()>().await;
            });
        })?;
    }
    drop(ready_tx);
    for _ in 0..threads {
        ready_rx.recv().map_err(|_| std::io::Error::other("an RTMP thread stopped"))??;
    }
    Ok(())
}

/// Accepts on `listener` until the drain starts (then closes it): each connection, after its
/// PROXY header when its peer is a trusted load balancer, takes a place under the connection
/// limits and, on the RTMPS listener (`tls`), completes a TLS handshake within
/// `HANDSHAKE_TIMEOUT` before it is served.
async fn accept_loop(
    listener: TcpListener,
    ctx: Rc<Ctx>,
    settings: Rc<Settings>,
    tls: Option<super::tls::Certificates>,
) {
    let mut drain = settings.drain.clone();
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = drain.wait_for(|d| *d) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "RTMP accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxied = settings.proxy_protocol_from.iter().any(|c| c.contains(peer.ip()));
        // Limits apply at once to a direct peer, and to a proxied client once its header is read.
        let mut permit = None;
        if !proxied {
            let Some(p) = ctx.gate.admit(peer.ip()) else {
                tracing::debug!(%peer, "RTMP connection refused: connection limit");
                continue;
            };
            permit = Some(p);
        }
        // Each kind of connection is its own task type: a plain connection's task must not be
        // sized for a TLS session it never has (it was, and cost 3 KiB a connection).
        let ctx = ctx.clone();
        match &tls {
            None => {
                monoio::spawn(async move {
                    let Some((stream, client, rest, permit)) = admitted(stream, peer, proxied, permit, &ctx).await
                    else {
                        return;
                    };
                    let id = ctx.new_id();
                    connection(stream, client, id, ctx, rest).await;
                    drop(permit);
                });
            }
            Some(certs) => {
                let certs = certs.clone();
                monoio::spawn(async move {
                    let Some((stream, client, rest, permit)) = admitted(stream, peer, proxied, permit, &ctx).await
                    else {
                        return;
                    };
                    // What followed a PROXY header is the start of the TLS handshake.
                    let io = monoio::io::PrefixedReadIo::new(stream, std::io::Cursor::new(rest));
                    let acceptor = monoio_rustls::TlsAcceptor::from(certs.load_full());
                    match monoio::time::timeout(super::conn::HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls_stream)) => {
                            let id = ctx.new_id();
                            connection(tls_stream, client, id, ctx, Vec::new()).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%client, error = %e, "RTMPS handshake failed"),
                        Err(_) => tracing::debug!(%client, "RTMPS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
}

/// The client behind a connection (its PROXY header's, from a trusted load balancer), what
/// followed the header, and its place under the connection limits; `None` when refused.
async fn admitted(
    mut stream: TcpStream,
    peer: SocketAddr,
    proxied: bool,
    permit: Option<crate::limits::Permit>,
    ctx: &Ctx,
) -> Option<(TcpStream, SocketAddr, Vec<u8>, crate::limits::Permit)> {
    let (client, rest) = if proxied {
        match super::proxy::read_header(&mut stream, super::conn::HANDSHAKE_TIMEOUT).await {
            Ok((client, rest)) => (client.unwrap_or(peer), rest),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "RTMP connection from a PROXY peer refused");
                return None;
            }
        }
    } else {
        (peer, Vec::new())
    };
    let permit = match permit {
        Some(p) => p,
        None => match ctx.gate.admit(client.ip()) {
            Some(p) => p,
            None => {
                tracing::debug!(%client, "RTMP connection refused: connection limit");
                return None;
            }
        },
    };
    let _ = stream.set_nodelay(true);
    Some((stream, client, rest, permit))
}

/// The media thread's one merge timer, for streams whose publisher pauses: every half
/// `merge`, windows that have waited `merge` go (so none waits more than 1.5 × `merge`). A
/// thread without a stream has no window: the timer sleeps until a stream comes (`woken`)
/// instead of waking the thread 1 / (merge / 2) times a second for nothing.
pub(super) async fn flush_windows(
    ctx: Rc<Ctx>,
    merge: Duration,
    mut woken: futures::channel::mpsc::UnboundedReceiver<()>,
) {
    loop {
        if ctx.hub.borrow().channels.is_empty() {
            if woken.next().await.is_none() {
                return;
            }
            while woken.try_recv().is_ok() {}
        }
        monoio::time::sleep(merge / 2).await;
        ctx.hub.borrow_mut().flush_due(Instant::now());
    }
}

/// Relay requests from the other media threads.
pub(super) async fn serve_inbox(ctx: Rc<Ctx>, mut inbox: fmpsc::UnboundedReceiver<Attach>) {
    while let Some(Attach { key, mirror }) = inbox.next().await {
        ctx.hub.borrow_mut().attach(&key, mirror);
    }
}
