//! `srt-load HOST:PORT STREAMID N SECS`: N SRT receivers (srt-tokio callers) of one stream,
//! counting payload bytes and the packets their SRT layer dropped as too late (lost to the
//! application). After a warm-up of 5 s it measures for SECS seconds and prints one JSON line
//! in `rtmp-load`'s shape plus `lost_packets`, `received_packets` and `cpu_seconds` (this
//! process's, over the window); for the revocation benchmark `closed_at_ms`, when each
//! receiver's stream was ended by the server, and `last_media_at_ms`, when each last got media
//! (Unix ms, 0 for none).
//!
//! `srt-load --udp FIRST_PORT N SECS`: the same count for N libsrt receivers
//! (`srt-live-transmit srt://… udp://127.0.0.1:FIRST_PORT+i`) started by the caller: it counts
//! the datagrams each one forwards (`last_media_at_ms`: the kernel's arrival time of its last
//! one). `lost_packets` is then what the SRT layer did not deliver: srt-live-transmit does not
//! report it, so it stays 0 and the rates tell the loss. The benchmark uses this mode by
//! default: libsrt receivers, as real players are.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use srt_tokio::SrtSocket;

mod report;

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    packets: AtomicU64,
    lost: AtomicU64,
    /// When media last came (Unix ms).
    last_ms: AtomicU64,
}

async fn receiver(addr: String, streamid: String, c: Arc<Counters>) -> std::io::Result<()> {
    let mut socket = SrtSocket::builder().call(addr.as_str(), Some(streamid.as_str())).await?;
    let mut stats = socket.statistics().clone();
    loop {
        tokio::select! {
            packet = socket.next() => match packet {
                Some(Ok((_, data))) => {
                    c.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    c.packets.fetch_add(1, Ordering::Relaxed);
                    c.last_ms.store(unix_ms(), Ordering::Relaxed);
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            Some(s) = stats.next() => c.lost.store(s.rx_dropped_data, Ordering::Relaxed),
        }
    }
}

/// Counts the datagrams arriving on one UDP port, each at the kernel's arrival time (the counter
/// itself may read late on a busy core).
async fn udp_counter(port: u16, c: Arc<Counters>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
    use std::os::fd::AsRawFd as _;
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await?;
    let fd = socket.as_raw_fd();
    setsockopt(fd, sockopt::ReceiveTimestamp, &true)?;
    let mut buf = vec![0u8; 65536];
    let mut space = nix::cmsg_space!(nix::sys::time::TimeVal);
    loop {
        let (n, at) = socket
            .async_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let m = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)?;
                let at = m.cmsgs().find_map(|c| match c {
                    ControlMessageOwned::ScmTimestamp(tv) => {
                        Some(tv.tv_sec() as u64 * 1000 + tv.tv_usec() as u64 / 1000)
                    }
                    _ => None,
                });
                Ok((m.bytes, at))
            })
            .await?;
        c.bytes.fetch_add(n as u64, Ordering::Relaxed);
        c.packets.fetch_add(1, Ordering::Relaxed);
        c.last_ms.store(at.unwrap_or_else(unix_ms), Ordering::Relaxed);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let udp = args.get(1).is_some_and(|a| a == "--udp");
    if args.len() != 5 {
        eprintln!("usage: srt-load HOST:PORT STREAMID RECEIVERS SECONDS | srt-load --udp FIRST_PORT RECEIVERS SECONDS");
        std::process::exit(2);
    }
    // With --udp: ("--udp", FIRST_PORT).
    let (addr, streamid) = (args[1].clone(), args[2].clone());
    let first_port: u16 = if udp { streamid.parse().unwrap_or(0) } else { 0 };
    let receivers: usize = args[3].parse().unwrap_or(1);
    let secs: u64 = args[4].parse().unwrap_or(10);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("srt-load: {err}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let counters: Vec<Arc<Counters>> = (0..receivers).map(|_| Arc::default()).collect();
        let failed = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        for (i, c) in counters.iter().enumerate() {
            let (addr, streamid, c, failed) = (addr.clone(), streamid.clone(), c.clone(), failed.clone());
            let closed = closed.clone();
            let port = first_port.wrapping_add(i as u16);
            tokio::spawn(async move {
                let done = if udp { udp_counter(port, c).await } else { receiver(addr, streamid, c).await };
                match done {
                    Ok(()) => {
                        let ms = unix_ms();
                        closed.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                    }
                    Err(err) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("srt-load: receiver: {err}");
                        }
                    }
                }
            });
            if !udp {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let snapshot = |f: fn(&Counters) -> u64| counters.iter().map(|c| f(c)).collect::<Vec<u64>>();
        let (bytes0, packets0, lost0) = (
            snapshot(|c| c.bytes.load(Ordering::Relaxed)),
            snapshot(|c| c.packets.load(Ordering::Relaxed)),
            snapshot(|c| c.lost.load(Ordering::Relaxed)),
        );
        let (t, cpu0) = (std::time::Instant::now(), cpu_secs());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let cpu = cpu_secs() - cpu0;
        let elapsed = t.elapsed().as_secs_f64();
        let delta = |now: Vec<u64>, then: &[u64]| now.iter().zip(then).map(|(a, b)| a - b).sum::<u64>();
        let extra = serde_json::json!({
            "received_packets": delta(snapshot(|c| c.packets.load(Ordering::Relaxed)), &packets0),
            "lost_packets": delta(snapshot(|c| c.lost.load(Ordering::Relaxed)), &lost0),
            "cpu_seconds": cpu,
            "last_media_at_ms": snapshot(|c| c.last_ms.load(Ordering::Relaxed)),
        });
        let bytes = snapshot(|c| c.bytes.load(Ordering::Relaxed));
        let closed = closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let failed = failed.load(Ordering::Relaxed);
        println!("{}", report::report(failed, elapsed, &bytes0, &bytes, closed, extra));
    });
}

/// This process's CPU time (user + system), seconds.
fn cpu_secs() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    getrusage(UsageWho::RUSAGE_SELF).map(|u| t(u.user_time()) + t(u.system_time())).unwrap_or(0.0)
}

/// The load tool's one clock (it stands outside both planes and their `clock` modules).
#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
