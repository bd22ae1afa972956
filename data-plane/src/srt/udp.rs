//! The SRT driver's UDP socket: datagrams queued during a round are sent at its end in as few
//! system calls as the kernel allows (issue #21, `ops/bench/udp-batching` measured each way):
//! one `sendmmsg` for the round, and inside it, a peer's run of same-size datagrams as one
//! message with `UDP_SEGMENT` (GSO), which the kernel splits back into datagrams.

use std::io::{self, Cursor, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use nix::sys::time::TimeSpec;
use srt_protocol::packet::{Packet, ReceivePacketError, ReceivePacketResult};
use std::net::UdpSocket;

/// Segments in one GSO message: the kernel takes at most 64, and 64 KiB in all (48 of
/// SRT's 1,332-byte datagrams).
const MAX_SEGMENTS: usize = 40;
/// Messages in one `sendmmsg` (the kernel's `UIO_MAXIOV`).
const MAX_MESSAGES: usize = 1024;
/// Datagrams read in one round at most, so a flood cannot starve the rest of the round.
const MAX_READS: usize = 4096;
/// Datagrams one `recvmmsg` reads at most.
const READ_BATCH: usize = 64;
/// The largest datagram read (SRT's maximum packet size is 1,500 bytes).
const MAX_DATAGRAM: usize = 1500;
/// Queued bytes that make a round send what it has so far: the round's buffer keeps its
/// capacity, so without a bound one burst (retransmissions to hundreds of players that fell
/// behind) would hold memory for good. 4 MiB is about three rounds of 500 players of a
/// 2.2 Mbit/s stream.
const FLUSH_BYTES: usize = 4 << 20;

/// A message to send: its peer, where it starts in the round's bytes, its length, and the
/// segment size if it is a GSO message of several datagrams.
type Message = (SocketAddr, usize, usize, Option<u16>);

/// The round's datagrams (peer, start, length; back to back in one buffer) as messages: with
/// `gso`, a peer's consecutive datagrams of one size (the last of the run may be shorter) as
/// one message of at most `MAX_SEGMENTS`; the rest one datagram each. A `sendmmsg` shares one
/// control message among all its messages, so they are ordered by segment size; a lone
/// datagram no longer than the largest segment size goes with that size (the kernel sends a
/// message no longer than its segment size as one plain datagram), so a round of data and
/// control packets is one system call.
fn messages(queued: &[(SocketAddr, usize, usize)], gso: bool) -> Vec<Message> {
    let mut messages = Vec::with_capacity(queued.len());
    let mut i = 0;
    while i < queued.len() {
        let (to, start, len) = queued[i];
        let (mut j, mut end) = (i + 1, start + len);
        if gso {
            while j < queued.len() && j - i < MAX_SEGMENTS && queued[j].0 == to && queued[j].1 == end {
                let next = queued[j].2;
                if next > len {
                    break;
                }
                end += next;
                j += 1;
                if next < len {
                    break;
                }
            }
        }
        messages.push((to, start, end - start, (j - i > 1).then_some(len as u16)));
        i = j;
    }
    if let Some(largest) = messages.iter().filter_map(|m| m.3).max() {
        for m in messages.iter_mut().filter(|m| m.3.is_none() && m.2 <= usize::from(largest)) {
            m.3 = Some(largest);
        }
    }
    messages.sort_by_key(|m| m.3);
    messages
}

/// A `recvmmsg` sender as a standard address.
fn std_address(a: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip().into(), v4.port())));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id())))
}

/// Counters of what the socket did, for the benchmarks and the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IoStats {
    pub datagrams_sent: u64,
    pub send_calls: u64,
    pub send_dropped: u64,
    pub datagrams_received: u64,
    pub receive_calls: u64,
}

/// Where the driver's datagrams come from and go: the UDP socket (`Io`), or the fuzz target's
/// replay (`driver::fuzz`).
pub(super) trait Transport {
    /// What has arrived, parsed, in order.
    fn receive(&mut self, each: &mut dyn FnMut(ReceivePacketResult));
    /// A datagram for the end of the round (or sooner, once a bound of bytes is queued).
    fn queue(&mut self, packet: &Packet, to: SocketAddr);
    /// The end of the round: everything queued goes out.
    fn flush(&mut self);
}

pub(super) struct Io {
    /// Non-blocking, and watched only while the driver waits for a datagram (`wait`): watched
    /// for good, every datagram arriving while the driver sleeps to its next round would wake
    /// the thread for nothing (250 wakeups a second at 10 players).
    socket: UdpSocket,
    ipv6: bool,
    /// The round's datagrams, serialized back to back.
    out: BytesMut,
    /// Each queued datagram: its peer, where it starts in `out`, its length.
    queued: Vec<(SocketAddr, usize, usize)>,
    /// GSO is on until the kernel refuses it once.
    gso: bool,
    /// `READ_BATCH` buffers for `recvmmsg`.
    rx: Vec<[u8; MAX_DATAGRAM]>,
    /// What the last `recvmmsg` read: each datagram's length and sender.
    read: Vec<(usize, Option<SocketAddr>)>,
    pub stats: IoStats,
}

impl Io {
    pub(super) fn new(socket: UdpSocket) -> io::Result<Io> {
        socket.set_nonblocking(true)?;
        let ipv6 = socket.local_addr()?.is_ipv6();
        Ok(Io {
            socket,
            ipv6,
            out: BytesMut::with_capacity(256 * 1024),
            queued: Vec::with_capacity(1024),
            gso: true,
            rx: vec![[0; MAX_DATAGRAM]; READ_BATCH],
            read: Vec::with_capacity(READ_BATCH),
            stats: IoStats::default(),
        })
    }

    /// Until `wake` is readable (a command for the driver), a datagram is waiting (only with
    /// `datagrams`), or `timeout` has passed: one `ppoll`, nothing registered, so the socket
    /// wakes the thread only while the driver wants a datagram. Says which of the two is ready
    /// (neither: the timeout, or a signal).
    pub(super) fn wait(&self, wake: &impl AsRawFd, datagrams: bool, timeout: Duration) -> Ready {
        let mut fds =
            [PollFd::new(wake.as_raw_fd(), PollFlags::POLLIN), PollFd::new(self.socket.as_raw_fd(), PollFlags::POLLIN)];
        let watched = if datagrams { 2 } else { 1 };
        if ppoll(&mut fds[..watched], Some(TimeSpec::from_duration(timeout)), None).is_err() {
            return Ready::default();
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        Ready { command: ready(&fds[0]), datagram: datagrams && ready(&fds[1]) }
    }
}

/// What `Io::wait` found ready.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Ready {
    pub command: bool,
    pub datagram: bool,
}

impl Transport for Io {
    /// Reads what has arrived (at most `MAX_READS` datagrams, `READ_BATCH` a `recvmmsg`),
    /// parsed, in order.
    fn receive(&mut self, each: &mut dyn FnMut(ReceivePacketResult)) {
        let mut reads = 0;
        while reads < MAX_READS {
            let Io { socket, rx, read, stats, .. } = self;
            stats.receive_calls += 1;
            let fd = socket.as_raw_fd();
            let result = (|| {
                let slices: Vec<[IoSliceMut<'_>; 1]> = rx.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
                let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(slices.len(), None);
                let results = recvmmsg(fd, &mut headers, &slices, MsgFlags::MSG_DONTWAIT, None)?;
                read.clear();
                read.extend(results.map(|r| (r.bytes, r.address.and_then(std_address))));
                Ok::<_, io::Error>(read.len())
            })();
            match result {
                Ok(n) => {
                    reads += n;
                    self.stats.datagrams_received += n as u64;
                    for (i, &(len, from)) in self.read.iter().enumerate() {
                        // A datagram without a sender cannot be answered: skipped.
                        let Some(from) = from else { continue };
                        let parsed = Packet::parse(&mut Cursor::new(&self.rx[i][..len]), self.ipv6)
                            .map(|p| (p, from))
                            .map_err(ReceivePacketError::from);
                        each(parsed);
                    }
                    if n < READ_BATCH {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP error of an earlier send (a caller gone); the next read goes on.
                Err(_) => reads += 1,
            }
        }
    }

    fn queue(&mut self, packet: &Packet, to: SocketAddr) {
        let start = self.out.len();
        packet.serialize(&mut self.out);
        self.queued.push((to, start, self.out.len() - start));
        if self.out.len() >= FLUSH_BYTES {
            self.flush();
        }
    }

    /// Sends everything queued: runs of same-size datagrams to one peer as GSO messages (the
    /// last of a run may be shorter), the rest one datagram a message, each kind in
    /// `sendmmsg` calls of up to 1,024 messages. A datagram the kernel will not take now
    /// (a full socket buffer) is dropped and counted: SRT retransmits what its peer misses.
    fn flush(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.queued);
        let messages = messages(&queued, self.gso);
        let mut k = 0;
        while k < messages.len() {
            let segment = messages[k].3;
            let mut end = k;
            while end < messages.len() && messages[end].3 == segment && end - k < MAX_MESSAGES {
                end += 1;
            }
            let batch = &messages[k..end];
            if let Err(e) = self.send_batch(batch, segment)
                && segment.is_some()
                && self.gso
                && e != nix::errno::Errno::EAGAIN
            {
                // The kernel or the route does not take GSO: send datagram by datagram from now on.
                tracing::warn!(error = %e, "SRT: UDP GSO refused; sending one datagram a message");
                self.gso = false;
                let singles: Vec<_> = batch
                    .iter()
                    .flat_map(|&(to, start, len, seg)| {
                        let seg = usize::from(seg.unwrap_or(len as u16)).max(1);
                        (start..start + len).step_by(seg).map(move |s| (to, s, seg.min(start + len - s), None))
                    })
                    .collect();
                for chunk in singles.chunks(MAX_MESSAGES) {
                    let _ = self.send_batch(chunk, None);
                }
            }
            k = end;
        }
        self.out.clear();
        self.queued = queued;
        self.queued.clear();
    }
}

impl Io {
    /// One `sendmmsg` of `batch`; what it did not send is counted as dropped.
    fn send_batch(&mut self, batch: &[Message], segment: Option<u16>) -> nix::Result<()> {
        let slices: Vec<[IoSlice<'_>; 1]> =
            batch.iter().map(|&(_, start, len, _)| [IoSlice::new(&self.out[start..start + len])]).collect();
        let addresses: Vec<Option<SockaddrStorage>> =
            batch.iter().map(|&(to, ..)| Some(SockaddrStorage::from(to))).collect();
        let datagrams = |m: &[Message]| -> u64 {
            m.iter().map(|&(_, _, len, seg)| seg.map_or(1, |s| len.div_ceil(usize::from(s).max(1)) as u64)).sum()
        };
        let segment_size = segment.unwrap_or(0);
        let gso = [ControlMessage::UdpGsoSegments(&segment_size)];
        let cmsgs: &[ControlMessage<'_>] = if segment.is_some() { &gso } else { &[] };
        let mut headers =
            MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), segment.is_some().then(|| nix::cmsg_space!(u16)));
        self.stats.send_calls += 1;
        let sent = sendmmsg(self.socket.as_raw_fd(), &mut headers, &slices, &addresses, cmsgs, MsgFlags::MSG_DONTWAIT)
            .map(|r| r.count());
        match sent {
            Ok(n) => {
                self.stats.datagrams_sent += datagrams(&batch[..n]);
                self.stats.send_dropped += datagrams(&batch[n..]);
                Ok(())
            }
            Err(e) => {
                if segment.is_none() || !self.gso || e == nix::errno::Errno::EAGAIN {
                    self.stats.send_dropped += datagrams(batch);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_sees_a_command_always_and_a_datagram_only_when_asked() {
        use std::os::unix::net::UnixStream;
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = socket.local_addr().expect("address");
        let io = Io::new(socket).expect("io");
        let (wake, woken) = UnixStream::pair().expect("pair");
        let short = Duration::from_millis(5);
        let nothing = io.wait(&woken, true, short);
        assert!(!nothing.command && !nothing.datagram);
        UdpSocket::bind("127.0.0.1:0").expect("bind").send_to(b"x", to).expect("send");
        // A datagram waits unseen (and is still there after) while the driver wants commands only.
        assert!(!io.wait(&woken, false, short).command);
        let datagram = io.wait(&woken, true, Duration::from_secs(60));
        assert!(datagram.datagram && !datagram.command);
        std::io::Write::write_all(&mut &wake, &[1]).expect("wake");
        let both = io.wait(&woken, true, Duration::from_secs(60));
        assert!(both.command && both.datagram);
        assert!(io.wait(&woken, false, Duration::from_secs(60)).command);
    }

    #[test]
    fn a_round_sends_what_it_has_once_its_buffer_is_full() {
        use srt_protocol::packet::{
            DataEncryption, DataPacket, MsgNumber, PacketLocation, SeqNumber, SocketId, TimeStamp,
        };
        let io_socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = peer.local_addr().expect("address");
        let mut io = Io::new(io_socket).expect("io");
        let data = |n: u32| {
            Packet::Data(DataPacket {
                seq_number: SeqNumber::new_truncate(n),
                message_loc: PacketLocation::ONLY,
                in_order_delivery: false,
                encryption: DataEncryption::None,
                retransmitted: false,
                message_number: MsgNumber::new_truncate(n),
                timestamp: TimeStamp::from_micros(0),
                dest_sockid: SocketId(7),
                payload: bytes::Bytes::from(vec![0x47; 1316]),
            })
        };
        // Three times the bound in one round: never more than the bound plus one datagram held.
        let mut most = 0;
        for n in 0..(3 * FLUSH_BYTES / 1332) as u32 {
            io.queue(&data(n), to);
            most = most.max(io.out.len());
        }
        assert!(most < FLUSH_BYTES + MAX_DATAGRAM, "held {most} bytes");
        assert!(
            io.stats.send_calls > 0
                && io.stats.datagrams_sent + io.stats.send_dropped >= 2 * (FLUSH_BYTES / 1332) as u64
        );
        io.flush();
        assert!(io.out.is_empty() && io.queued.is_empty());
    }

    #[test]
    fn a_peers_run_of_one_size_is_one_gso_message_and_the_rest_go_alone() {
        let (a, b) = (SocketAddr::from(([127, 0, 0, 1], 1)), SocketAddr::from(([127, 0, 0, 1], 2)));
        // a: three data packets and a shorter one (one message); b: a control packet alone (a
        // run never grows), then two data packets (one message); a last one of a alone.
        let mut queued = Vec::new();
        let mut at = 0;
        for (to, len) in [(a, 1332), (a, 1332), (a, 1332), (a, 44), (b, 44), (b, 1332), (b, 1332), (a, 1332)] {
            queued.push((to, at, len));
            at += len;
        }
        let m = messages(&queued, true);
        // The lone datagrams share the GSO messages' call (each no longer than a segment).
        assert_eq!(
            m,
            [
                (a, 0, 3 * 1332 + 44, Some(1332)),
                (b, 3 * 1332 + 44, 44, Some(1332)),
                (b, 3 * 1332 + 88, 2 * 1332, Some(1332)),
                (a, 5 * 1332 + 88, 1332, Some(1332))
            ]
        );
        // A lone datagram longer than every segment goes in a call of its own.
        let big = [(a, 0, 1332), (a, 1332, 1332), (b, 2664, 1456)];
        assert_eq!(messages(&big, true), [(b, 2664, 1456, None), (a, 0, 2664, Some(1332))]);
        // Without GSO, one datagram a message, all of them.
        assert_eq!(messages(&queued, false).len(), queued.len());
        // A run is cut at MAX_SEGMENTS.
        let long: Vec<_> = (0..MAX_SEGMENTS + 3).map(|i| (a, i * 1332, 1332)).collect();
        let m = messages(&long, true);
        assert_eq!(m.len(), 2);
        assert_eq!(m.iter().map(|x| x.2 / 1332).sum::<usize>(), MAX_SEGMENTS + 3);
        assert!(m.iter().all(|x| x.2 / 1332 <= MAX_SEGMENTS));
    }
}
