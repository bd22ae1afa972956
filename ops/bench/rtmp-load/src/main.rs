//! `rtmp-load URL N SECS`: N RTMP players of `rtmp://host:port/app/stream`, on one thread.
//! Each does the handshake, connect and play with `rml_rtmp`, then stops parsing: it only
//! counts bytes and sends an Acknowledgement every 2.5 MB (the window it announces), so the
//! load itself costs little. After a warm-up of 5 s it measures for SECS seconds and prints
//! one JSON line: players connected, total bytes, per-player bytes/s (min, p5, median), and
//! when each connection was closed by the server (Unix ms), for the revocation benchmark.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod report;

const WINDOW: u64 = 2_500_000;

fn ack(sequence: u32) -> [u8; 16] {
    // fmt 0, csid 2; timestamp 0; length 4; type 3 (Acknowledgement); stream 0; payload.
    let mut m = [0u8; 16];
    m[0] = 0x02;
    m[6] = 4;
    m[7] = 3;
    m[12..16].copy_from_slice(&sequence.to_be_bytes());
    m
}

async fn send(stream: &mut TcpStream, results: Vec<ClientSessionResult>) -> std::io::Result<Vec<ClientSessionEvent>> {
    let mut events = Vec::new();
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => stream.write_all(&p.bytes).await?,
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            ClientSessionResult::UnhandleableMessageReceived(_) => {}
        }
    }
    Ok(events)
}

/// The load tool's one clock (it stands outside both planes and their `clock` modules).
#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn player(addr: String, app: String, key: String, counter: Arc<AtomicU64>) -> Result<u64, String> {
    let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let mut stream = TcpStream::connect(&addr).await.map_err(|x| e(&x))?;
    stream.set_nodelay(true).map_err(|x| e(&x))?;
    let mut hs = Handshake::new(PeerType::Client);
    let p0p1 = hs.generate_outbound_p0_and_p1().map_err(|x| e(&x))?;
    stream.write_all(&p0p1).await.map_err(|x| e(&x))?;
    let mut buf = vec![0u8; 64 * 1024];
    let rest = loop {
        let n = stream.read(&mut buf).await.map_err(|x| e(&x))?;
        if n == 0 {
            return Err("closed in handshake".into());
        }
        match hs.process_bytes(&buf[..n]).map_err(|x| e(&x))? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                stream.write_all(&response_bytes).await.map_err(|x| e(&x))?
            }
            HandshakeProcessResult::Completed { response_bytes, remaining_bytes } => {
                stream.write_all(&response_bytes).await.map_err(|x| e(&x))?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, results) = ClientSession::new(ClientSessionConfig::new()).map_err(|x| e(&x))?;
    send(&mut stream, results).await.map_err(|x| e(&x))?;
    let connect = session.request_connection(app).map_err(|x| e(&x))?;
    send(&mut stream, vec![connect]).await.map_err(|x| e(&x))?;
    let mut pending = rest;
    let mut playing = false;
    let mut requested = false;
    while !playing {
        if pending.is_empty() {
            let n = stream.read(&mut buf).await.map_err(|x| e(&x))?;
            if n == 0 {
                return Err("closed before play".into());
            }
            pending = buf[..n].to_vec();
        }
        let results = session.handle_input(&pending).map_err(|x| e(&x))?;
        pending.clear();
        for ev in send(&mut stream, results).await.map_err(|x| e(&x))? {
            match ev {
                ClientSessionEvent::ConnectionRequestAccepted if !requested => {
                    requested = true;
                    let play = session.request_playback(key.clone()).map_err(|x| e(&x))?;
                    send(&mut stream, vec![play]).await.map_err(|x| e(&x))?;
                }
                ClientSessionEvent::PlaybackRequestAccepted => playing = true,
                ClientSessionEvent::ConnectionRequestRejected { description } => return Err(description),
                _ => {}
            }
        }
    }
    // Counting only.
    let mut total: u64 = 0;
    let mut next_ack = WINDOW;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(unix_ms()),
            Ok(n) => n,
        };
        total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if total >= next_ack {
            stream.write_all(&ack(total as u32)).await.map_err(|x| e(&x))?;
            next_ack = total + WINDOW;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: rtmp-load rtmp://HOST:PORT/APP/STREAM PLAYERS SECONDS");
        std::process::exit(2);
    }
    let url = args[1].strip_prefix("rtmp://").unwrap_or(&args[1]).to_owned();
    let mut parts = url.splitn(3, '/');
    let (addr, app, key) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let players: usize = args[2].parse().unwrap_or(1);
    let secs: u64 = args[3].parse().unwrap_or(10);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("rtmp-load: {err}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let counters: Vec<Arc<AtomicU64>> = (0..players).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let failed = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        for c in &counters {
            let (addr, app, key, c, failed) = (addr.clone(), app.clone(), key.clone(), c.clone(), failed.clone());
            let closed = closed.clone();
            tokio::spawn(async move {
                match player(addr, app, key, c).await {
                    Ok(at) => closed.lock().unwrap_or_else(|p| p.into_inner()).push(at),
                    Err(err) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("rtmp-load: player: {err}");
                        }
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let start: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let t = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let elapsed = t.elapsed().as_secs_f64();
        let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let closed = closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let failed = failed.load(Ordering::Relaxed);
        println!("{}", report::report(failed, elapsed, &start, &after, closed, serde_json::json!({})));
    });
}
