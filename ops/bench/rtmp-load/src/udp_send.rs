//! `udp-send MODE FIRST_PORT N SECS [TICK_MS]`: what SRT fan-out costs the kernel, without SRT
//! (issue #21). One source stream of 2.2 Mbit/s in SRT-sized datagrams (16-byte header + 1,316
//! bytes of MPEG-TS, ~209 a second) sent to N receivers on `127.0.0.1:FIRST_PORT+i` (counted
//! by `srt-load --udp`), for 5 s of warm-up and SECS measured, in one of four ways:
//!
//! - `sendto`: one `sendto` per datagram per receiver, as srt-tokio and libsrt do;
//! - `sendmmsg`: each source datagram to all N receivers in one `sendmmsg`;
//! - `gso`: every TICK_MS, each receiver's datagrams in one `sendmsg` with `UDP_SEGMENT`;
//! - `mmsg-gso`: every TICK_MS, all receivers' GSO messages in one `sendmmsg`.
//!
//! Prints one JSON line: the process's CPU over the measured window (utime + stime from
//! `getrusage`), datagrams and bytes sent, and CPU % of a core per delivered Gbit/s.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg, sendmsg};

const DATAGRAM: usize = 16 + 1316;
const RATE_BPS: f64 = 2.2e6;
const WARM_UP: Duration = Duration::from_secs(5);

fn cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000);
    t(u.user_time()) + t(u.system_time())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: udp-send sendto|sendmmsg|gso|mmsg-gso FIRST_PORT N SECS [TICK_MS]");
        std::process::exit(2);
    }
    let mode = args[1].clone();
    let first: u16 = args[2].parse().expect("FIRST_PORT");
    let n: usize = args[3].parse().expect("N");
    let secs: u64 = args[4].parse().expect("SECS");
    let tick = Duration::from_millis(args.get(5).and_then(|t| t.parse().ok()).unwrap_or(20));
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let fd = socket.as_raw_fd();
    let peers: Vec<SockaddrIn> =
        (0..n).map(|i| SockaddrIn::from(SocketAddrV4::new([127, 0, 0, 1].into(), first + i as u16))).collect();
    let std_peers: Vec<SocketAddrV4> =
        (0..n).map(|i| SocketAddrV4::new([127, 0, 0, 1].into(), first + i as u16)).collect();
    let interval = Duration::from_secs_f64(DATAGRAM as f64 * 8.0 / RATE_BPS);
    let batched = mode == "gso" || mode == "mmsg-gso";
    let step = if batched { tick } else { interval };
    // One batch's worth of datagrams, contiguous (a GSO message is one buffer of segments).
    let per_step = if batched { (tick.as_secs_f64() / interval.as_secs_f64()).ceil().max(1.0) as usize } else { 1 };
    let payload = vec![0x47u8; DATAGRAM * per_step];
    let gso_size = DATAGRAM as u16;
    let mut headers =
        MultiHeaders::<SockaddrIn>::preallocate(n.max(1), if batched { Some(nix::cmsg_space!(u16)) } else { None });
    let started = Instant::now();
    let (mut sent, mut datagrams) = (0u64, 0u64);
    let mut window: Option<(Instant, Duration, u64)> = None;
    let mut next = started;
    let mut due_total = 0f64;
    loop {
        let now = Instant::now();
        if window.is_none() && now.duration_since(started) >= WARM_UP {
            window = Some((now, cpu(), datagrams));
        }
        if let Some((at, _, _)) = window
            && now.duration_since(at) >= Duration::from_secs(secs)
        {
            break;
        }
        // How many source datagrams are due this step (the rate, kept exact over time).
        due_total += step.as_secs_f64() / interval.as_secs_f64();
        // A batch holds at most what one buffer does; the rest waits for the next step.
        let k =
            ((due_total.floor() as u64).saturating_sub(sent) as usize).min(if batched { per_step } else { usize::MAX });
        sent += k as u64;
        if k > 0 {
            let bytes = &payload[..DATAGRAM * k.min(per_step)];
            match mode.as_str() {
                "sendto" => {
                    for _ in 0..k {
                        for p in &std_peers {
                            let _ = socket.send_to(&payload[..DATAGRAM], p);
                        }
                    }
                }
                "sendmmsg" => {
                    for _ in 0..k {
                        let slices: Vec<[IoSlice<'_>; 1]> =
                            (0..n).map(|_| [IoSlice::new(&payload[..DATAGRAM])]).collect();
                        let addrs: Vec<Option<SockaddrIn>> = peers.iter().copied().map(Some).collect();
                        let _ = sendmmsg(fd, &mut headers, &slices, &addrs, [], MsgFlags::empty()).map(|r| r.count());
                    }
                }
                "gso" => {
                    let cmsg = [ControlMessage::UdpGsoSegments(&gso_size)];
                    for p in &peers {
                        let _ = sendmsg(fd, &[IoSlice::new(bytes)], &cmsg, MsgFlags::empty(), Some(p));
                    }
                }
                "mmsg-gso" => {
                    let cmsg = [ControlMessage::UdpGsoSegments(&gso_size)];
                    let slices: Vec<[IoSlice<'_>; 1]> = (0..n).map(|_| [IoSlice::new(bytes)]).collect();
                    let addrs: Vec<Option<SockaddrIn>> = peers.iter().copied().map(Some).collect();
                    let _ = sendmmsg(fd, &mut headers, &slices, &addrs, cmsg, MsgFlags::empty()).map(|r| r.count());
                }
                other => {
                    eprintln!("unknown mode {other}");
                    std::process::exit(2);
                }
            }
            datagrams += (k * n) as u64;
        }
        next += step;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let (at, cpu0, d0) = window.expect("measured");
    let wall = at.elapsed().as_secs_f64();
    let cpu_secs = (cpu() - cpu0).as_secs_f64();
    let bytes = (datagrams - d0) as f64 * DATAGRAM as f64;
    let gbps = bytes * 8.0 / wall / 1e9;
    let cpu_pct = cpu_secs / wall * 100.0;
    println!(
        "{}",
        serde_json::json!({
            "mode": mode, "receivers": n, "tick_ms": if batched { tick.as_millis() as u64 } else { 0 },
            "datagrams": datagrams - d0, "cpu_pct": (cpu_pct * 10.0).round() / 10.0,
            "gbps": (gbps * 1000.0).round() / 1000.0,
            "cpu_pct_per_gbps": if gbps > 0.0 { (cpu_pct / gbps * 10.0).round() / 10.0 } else { 0.0 },
        })
    );
}
