//! The WireGuard data loop: boringtun's noise state machines between the
//! TUN device of the VM's namespace and one UDP socket in the host's.
//!
//! It runs in its own process (`migrant __wg`, see [`super::child`]) as the
//! unprivileged QEMU user, holding nothing but those two descriptors and a
//! report socket to the supervisor: the code that parses packets from the
//! network and the guest's side never runs with root's capabilities.
//!
//! One thread, poll(2) on the three descriptors, non-blocking I/O: read a
//! burst of packets from one side, encrypt or decrypt each into a buffer,
//! write it to the other side. Packets go to the peer whose `AllowedIPs`
//! hold the destination most specifically (cryptokey routing); decrypted
//! packets are delivered only when their source is one the peer may use.
//! Timers (handshake retries, rekeying, keepalives, cookie expiry) run
//! every 250 ms as boringtun expects.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What the loop needs, sent by the supervisor over the child's stdin
/// (never on the command line or in the environment: it holds the key).
#[derive(Serialize, Deserialize)]
pub struct Spec {
    pub private_key: [u8; 32],
    pub peers: Vec<PeerSpec>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct PeerSpec {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    /// Resolved on the host at `up`; `None` until the peer reaches us.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: Option<u16>,
}

/// One line the loop writes to the supervisor, about every second and
/// whenever a peer completes its first handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// Base64, as wg(8) shows it.
    pub public_key: String,
    pub endpoint: Option<String>,
    /// Milliseconds since the last completed handshake, if any.
    pub last_handshake_ms: Option<u64>,
    /// Payload bytes sent into and received from the tunnel.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// Room for the largest datagram plus WireGuard's overhead.
const BUF: usize = 65536 + 64;
/// Packets taken from one side before looking at the other.
const BURST: usize = 64;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshakes per second before the loop answers with cookies (WireGuard's
/// DoS defence) instead of doing the Diffie-Hellman work.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
const REPORT_EVERY: Duration = Duration::from_secs(1);

struct Peer {
    tunn: Tunn,
    public: [u8; 32],
    endpoint: Option<SocketAddr>,
    allowed: Vec<IpNet>,
    handshaken: bool,
}

impl Peer {
    fn allows(&self, ip: IpAddr) -> bool {
        self.allowed.iter().any(|n| n.contains(&ip))
    }
}

/// The peer for a packet to `dst`: the most specific `AllowedIPs` entry.
fn route(peers: &[Peer], dst: IpAddr) -> Option<usize> {
    peers
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.allowed
                .iter()
                .filter(move |n| n.contains(&dst))
                .map(move |n| (n.prefix_len(), i))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, i)| i)
}

fn b64(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Encrypted packets to one endpoint, sent with one `sendmsg` and UDP
/// generic segmentation offload (the kernel cuts the buffer into
/// datagrams of `seg` bytes; only the last may be shorter). A burst of
/// full-size TCP segments from the TUN costs one system call instead of
/// one per packet.
struct Batch {
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    to: Option<SocketAddr>,
    /// Cleared when the kernel refuses UDP_SEGMENT: then one datagram per
    /// call.
    gso: bool,
    /// The socket is connected to the one peer: datagrams go without a
    /// destination (`send`), and GSO is a socket option (`sendmsg` is not
    /// allowed by the seccomp filter then).
    connected: bool,
    /// The UDP_SEGMENT option set on the connected socket now (0: none).
    gso_set: u16,
}

/// Send one datagram to `to`, or to the connected peer.
fn send_one(udp: &UdpSocket, data: &[u8], to: SocketAddr, connected: bool) {
    let sent = if connected {
        udp.send(data)
    } else {
        udp.send_to(data, to)
    };
    // A full socket buffer drops the packet, as a busy link would; TCP
    // inside the tunnel recovers.
    if let Err(e) = sent
        && e.kind() != ErrorKind::WouldBlock
    {
        tracing::debug!("wireguard: send to {to}: {e}");
    }
}

/// Segments per GSO send (the kernel allows 64 at least) and its byte cap.
const GSO_SEGMENTS: usize = 64;
const GSO_BYTES: usize = 65000;

impl Batch {
    fn new(connected: bool) -> Batch {
        Batch {
            buf: Vec::with_capacity(GSO_BYTES),
            seg: 0,
            count: 0,
            to: None,
            gso: true,
            connected,
            gso_set: 0,
        }
    }

    /// Set UDP_SEGMENT on the connected socket (only when it changes).
    fn segment_size(&mut self, udp: &UdpSocket, seg: u16) -> nix::Result<()> {
        if self.gso_set == seg {
            return Ok(());
        }
        nix::sys::socket::setsockopt(
            udp,
            nix::sys::socket::sockopt::UdpGsoSegment,
            &i32::from(seg),
        )?;
        self.gso_set = seg;
        Ok(())
    }

    /// A burst with GSO: `sendmsg` with the segment size, or on a connected
    /// socket the socket option and `send`.
    fn send_segmented(&mut self, udp: &UdpSocket, to: SocketAddr) -> nix::Result<()> {
        let seg = self.seg as u16;
        if self.connected {
            self.segment_size(udp, seg)?;
            return match udp.send(&self.buf) {
                Ok(_) => Ok(()),
                Err(e) => Err(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            };
        }
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        let iov = [std::io::IoSlice::new(&self.buf)];
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        let addr = SockaddrStorage::from(to);
        sendmsg(udp.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).map(|_| ())
    }

    /// Whether `len` bytes to `to` can join the batch. A shorter datagram
    /// may join as the last one.
    fn fits(&self, len: usize, to: SocketAddr) -> bool {
        self.count == 0
            || (self.gso
                && self.to == Some(to)
                && len <= self.seg
                && self.buf.len() == self.seg * self.count
                && self.count < GSO_SEGMENTS
                && self.buf.len() + len <= GSO_BYTES)
    }

    fn push(&mut self, data: &[u8], to: SocketAddr) {
        if self.count == 0 {
            self.seg = data.len();
            self.to = Some(to);
        }
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    fn flush(&mut self, udp: &UdpSocket) {
        let Some(to) = self.to else {
            return;
        };
        if self.count > 1 {
            match self.send_segmented(udp, to) {
                Ok(()) | Err(nix::errno::Errno::EAGAIN) => {}
                Err(e @ (nix::errno::Errno::EIO | nix::errno::Errno::EINVAL)) => {
                    tracing::info!(
                        "wireguard: no UDP segmentation offload ({e}); sending one datagram per call"
                    );
                    self.gso = false;
                    if self.connected {
                        let _ = self.segment_size(udp, 0);
                    }
                    for chunk in self.buf.chunks(self.seg) {
                        send_one(udp, chunk, to, self.connected);
                    }
                }
                Err(e) => tracing::debug!("wireguard: send to {to}: {e}"),
            }
        } else if self.count == 1 {
            // A datagram longer than the segment size set on the socket
            // would be cut: clear the option first.
            if self.connected && self.gso_set != 0 && self.buf.len() > usize::from(self.gso_set) {
                let _ = self.segment_size(udp, 0);
            }
            send_one(udp, &self.buf, to, self.connected);
        }
        self.buf.clear();
        self.count = 0;
        self.to = None;
    }
}

/// What kind of message a datagram is, for deciding whether it was
/// authentic (only then may it move the peer's endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiation,
    Response,
    Cookie,
    Data,
}

struct Loop {
    secret: StaticSecret,
    public: PublicKey,
    /// Shared by every peer: checks MAC1 of handshakes before any
    /// expensive work and answers with cookies when under load.
    limiter: std::sync::Arc<RateLimiter>,
    /// Once a second, the limiter's handshake count starts again.
    limiter_reset: Instant,
    peers: Vec<Peer>,
    tun: std::fs::File,
    udp: UdpSocket,
    out: Vec<u8>,
    batch: Batch,
}

impl Loop {
    /// A packet the namespace routed into the TUN: encrypt it for its peer.
    fn on_tun(&mut self, packet: &[u8]) {
        let Some(dst) = Tunn::dst_address(packet) else {
            return;
        };
        let Some(i) = route(&self.peers, dst) else {
            return;
        };
        let peer = &mut self.peers[i];
        match peer.tunn.encapsulate(packet, &mut self.out) {
            TunnResult::WriteToNetwork(b) => {
                let Some(to) = peer.endpoint else {
                    return;
                };
                if !self.batch.fits(b.len(), to) {
                    self.batch.flush(&self.udp);
                }
                self.batch.push(b, to);
            }
            TunnResult::Err(e) => tracing::debug!("wireguard: encapsulate: {e:?}"),
            _ => {}
        }
    }

    fn send_out(&mut self, len: usize, to: SocketAddr) {
        let data = &self.out[..len];
        // A datagram longer than the connected socket's segment size
        // would be cut.
        if self.batch.connected
            && self.batch.gso_set != 0
            && data.len() > usize::from(self.batch.gso_set)
        {
            let _ = self.batch.segment_size(&self.udp, 0);
        }
        send_one(&self.udp, data, to, self.batch.connected);
    }

    /// Which peer a datagram is for, or `None` to drop it. Handshakes are
    /// checked (MAC1, and under load the cookie) before the Diffie-Hellman
    /// work that finds their peer; a cookie reply is sent when needed.
    fn peer_of(&mut self, datagram: &[u8], from: SocketAddr) -> Option<(usize, Kind)> {
        let packet = match self
            .limiter
            .verify_packet(Some(from.ip()), datagram, &mut self.out)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let len = cookie.len();
                self.send_out(len, from);
                return None;
            }
            Err(_) => return None,
        };
        match packet {
            Packet::HandshakeInit(h) => {
                let half = parse_handshake_anon(&self.secret, &self.public, &h).ok()?;
                let i = self
                    .peers
                    .iter()
                    .position(|p| p.public == half.peer_static_public)?;
                Some((i, Kind::Initiation))
            }
            Packet::HandshakeResponse(h) => Some((index(h.receiver_idx)?, Kind::Response)),
            Packet::PacketCookieReply(c) => Some((index(c.receiver_idx)?, Kind::Cookie)),
            Packet::PacketData(d) => Some((index(d.receiver_idx)?, Kind::Data)),
        }
        .filter(|(i, _)| *i < self.peers.len())
    }

    /// A datagram from the network: decrypt it, answer handshakes, deliver
    /// data to the TUN.
    fn on_udp(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some((i, kind)) = self.peer_of(datagram, from) else {
            return;
        };
        let mut first = true;
        let mut authentic = false;
        let mut input: &[u8] = datagram;
        loop {
            let peer = &mut self.peers[i];
            let src = first.then_some(from.ip());
            let result = peer.tunn.decapsulate(src, input, &mut self.out);
            match result {
                TunnResult::WriteToNetwork(b) => {
                    // A cookie reply (64 bytes) is what an unauthenticated
                    // handshake under load gets; a handshake response is
                    // 92 bytes; anything else answers an authentic packet.
                    if first {
                        authentic = match kind {
                            Kind::Initiation => b.len() == 92,
                            _ => b.len() != 64,
                        };
                    }
                    let len = b.len();
                    self.send_out(len, from);
                }
                TunnResult::WriteToTunnelV4(b, src) => {
                    authentic = true;
                    if self.peers[i].allows(src.into()) {
                        let len = b.len();
                        if let Err(e) = self.tun.write(&self.out[..len]) {
                            tracing::debug!("wireguard: write to the TUN: {e}");
                        }
                    }
                    break;
                }
                TunnResult::WriteToTunnelV6(b, src) => {
                    authentic = true;
                    // Only when IPv6 entries were given (ipv6 = true).
                    if self.peers[i].allows(src.into()) {
                        let len = b.len();
                        if let Err(e) = self.tun.write(&self.out[..len]) {
                            tracing::debug!("wireguard: write to the TUN: {e}");
                        }
                    }
                    break;
                }
                TunnResult::Done => {
                    if first && kind != Kind::Initiation {
                        authentic = true;
                    }
                    break;
                }
                TunnResult::Err(e) => {
                    tracing::debug!("wireguard: from {from}: {e:?}");
                    break;
                }
            }
            first = false;
            input = &[];
        }
        // Roaming: a peer is reached where its last authentic packet came from.
        if authentic {
            self.peers[i].endpoint = Some(from);
        }
    }

    fn timers(&mut self) {
        if self.limiter_reset.elapsed() >= Duration::from_secs(1) {
            self.limiter.reset_count();
            self.limiter_reset = Instant::now();
        }
        for i in 0..self.peers.len() {
            let peer = &mut self.peers[i];
            match peer.tunn.update_timers(&mut self.out) {
                TunnResult::WriteToNetwork(b) => {
                    let len = b.len();
                    if let Some(to) = self.peers[i].endpoint {
                        self.send_out(len, to);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => tracing::debug!("wireguard: timers: {e:?}"),
                _ => {}
            }
        }
    }

    fn initiate(&mut self) {
        for i in 0..self.peers.len() {
            let Some(to) = self.peers[i].endpoint else {
                continue;
            };
            if let TunnResult::WriteToNetwork(b) = self.peers[i]
                .tunn
                .format_handshake_initiation(&mut self.out, false)
            {
                let len = b.len();
                self.send_out(len, to);
            }
        }
    }

    /// Whether a peer completed its first handshake since the last call
    /// (cheap: looked at every turn of the loop, unlike [`Loop::report`]).
    fn first_handshakes(&mut self) -> bool {
        let mut fresh = false;
        for p in self.peers.iter_mut().filter(|p| !p.handshaken) {
            if p.tunn.time_since_last_handshake().is_some() {
                p.handshaken = true;
                fresh = true;
            }
        }
        fresh
    }

    fn report(&self) -> Report {
        let peers = self
            .peers
            .iter()
            .map(|p| {
                let (since, tx, rx, _, _) = p.tunn.stats();
                PeerReport {
                    public_key: b64(&p.public),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    last_handshake_ms: since.map(|d| d.as_millis() as u64),
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        Report { peers }
    }
}

/// A session index names its peer in its upper 24 bits (boringtun shifts
/// the index given to [`Tunn::new`] left by 8); peers are numbered from 1.
fn index(receiver_idx: u32) -> Option<usize> {
    (receiver_idx >> 8).checked_sub(1).map(|i| i as usize)
}

/// Run until the supervisor closes the report socket.
pub fn run(
    spec: Spec,
    tun: std::fs::File,
    udp: UdpSocket,
    mut report: UnixStream,
    connected: bool,
) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    let secret = StaticSecret::from(spec.private_key);
    let public = PublicKey::from(&secret);
    let limiter = std::sync::Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
    let peers = spec
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| Peer {
            tunn: Tunn::new(
                secret.clone(),
                PublicKey::from(p.public_key),
                p.preshared_key,
                p.keepalive.filter(|k| *k > 0),
                (i + 1) as u32,
                Some(std::sync::Arc::clone(&limiter)),
            ),
            public: p.public_key,
            endpoint: p.endpoint,
            allowed: p.allowed_ips.clone(),
            handshaken: false,
        })
        .collect();
    // fcntl rather than std's set_nonblocking (an ioctl, which the
    // process's seccomp filter does not allow).
    set_nonblocking(&tun)?;
    set_nonblocking(&udp)?;
    set_nonblocking(&report)?;
    let mut lp = Loop {
        secret,
        public,
        limiter,
        limiter_reset: Instant::now(),
        peers,
        tun,
        udp,
        out: vec![0u8; BUF],
        batch: Batch::new(connected),
    };
    lp.initiate();
    let mut buf = vec![0u8; BUF];
    let mut next_timer = Instant::now() + TIMER_TICK;
    let mut next_report = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_timer {
            lp.timers();
            next_timer = now + TIMER_TICK;
        }
        if lp.first_handshakes() || now >= next_report {
            let mut line = serde_json::to_vec(&lp.report()).map_err(std::io::Error::other)?;
            line.push(b'\n');
            match report.write_all(&line) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            next_report = now + REPORT_EVERY;
        }
        let wait = next_timer
            .min(next_report)
            .saturating_duration_since(Instant::now());
        let (tun_ready, udp_ready, ctl_ready) = {
            let mut fds = [
                PollFd::new(lp.tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(lp.udp.as_fd(), PollFlags::POLLIN),
                PollFd::new(report.as_fd(), PollFlags::POLLIN),
            ];
            let ms = PollTimeout::from(wait.as_millis().min(1000) as u16);
            match poll(&mut fds, ms) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
        };
        if ctl_ready {
            // The supervisor never writes: readable means it went away.
            let mut b = [0u8; 64];
            match report.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if tun_ready {
            for _ in 0..BURST {
                match lp.tun.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => lp.on_tun(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            lp.batch.flush(&lp.udp);
        }
        if udp_ready {
            for _ in 0..BURST {
                match lp.udp.recv_from(&mut buf) {
                    // A dual-stack socket (an IPv6 peer among them) shows
                    // IPv4 peers as mapped addresses: compare them plain.
                    Ok((n, from)) => lp.on_udp(
                        &buf[..n],
                        SocketAddr::new(from.ip().to_canonical(), from.port()),
                    ),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // ICMP errors (an unreachable endpoint) surface
                        // here; the timers keep retrying.
                        tracing::debug!("wireguard: receive: {e}");
                        break;
                    }
                }
            }
        }
    }
}

fn set_nonblocking(f: &impl AsFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(f, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(f, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn keys() -> (StaticSecret, PublicKey) {
        let s = StaticSecret::from([7u8; 32]);
        let p = PublicKey::from(&s);
        (s, p)
    }

    fn peer(nets: &[&str]) -> Peer {
        let (s, _) = keys();
        let other = PublicKey::from(&StaticSecret::from([9u8; 32]));
        Peer {
            tunn: Tunn::new(s, other, None, None, 1, None),
            public: [0; 32],
            endpoint: None,
            allowed: nets.iter().filter_map(|n| n.parse().ok()).collect(),
            handshaken: false,
        }
    }

    #[test]
    fn packets_go_to_the_most_specific_allowed_ips() {
        let peers = vec![peer(&["0.0.0.0/0"]), peer(&["10.9.0.0/16", "10.9.8.0/24"])];
        let at = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(route(&peers, at("1.1.1.1")), Some(0));
        assert_eq!(route(&peers, at("10.9.1.1")), Some(1));
        assert_eq!(route(&peers, at("10.9.8.1")), Some(1));
        let only = vec![peer(&["10.9.0.0/16"])];
        assert_eq!(route(&only, at("1.1.1.1")), None);
        // IPv6 only where IPv6 entries were given.
        assert_eq!(route(&peers, at("2a0a::1")), None);
        let dual = vec![peer(&["0.0.0.0/0", "::/0"]), peer(&["fd00:77::/64"])];
        assert_eq!(route(&dual, at("2a0a::1")), Some(0));
        assert_eq!(route(&dual, at("fd00:77::9")), Some(1));
    }

    #[test]
    fn session_indexes_name_peers_from_one() {
        assert_eq!(index(1 << 8), Some(0));
        assert_eq!(index((3 << 8) | 0xff), Some(2));
        assert_eq!(index(0xff), None);
    }

    /// A minimal IPv4 packet from `src` to `dst` carrying `payload`.
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    struct End {
        /// Our side of the stand-in TUN (a datagram socket pair).
        tun: std::os::unix::net::UnixDatagram,
        reports: std::io::BufReader<UnixStream>,
        _report_hold: UnixStream,
        thread: std::thread::JoinHandle<std::io::Result<()>>,
    }

    fn start(spec: Spec, udp: UdpSocket) -> End {
        let (ours, theirs) =
            std::os::unix::net::UnixDatagram::pair().unwrap_or_else(|e| panic!("{e}"));
        let (rep_ours, rep_theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let tun_file = std::fs::File::from(std::os::fd::OwnedFd::from(theirs));
        let connected = udp.peer_addr().is_ok();
        let thread = std::thread::spawn(move || run(spec, tun_file, udp, rep_theirs, connected));
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        let hold = rep_ours.try_clone().unwrap_or_else(|e| panic!("{e}"));
        End {
            tun: ours,
            reports: std::io::BufReader::new(rep_ours),
            _report_hold: hold,
            thread,
        }
    }

    /// Two packet loops on loopback, each with its own keys: a packet put
    /// into one's TUN comes out of the other's, after a real handshake; a
    /// packet whose source the sender may not use is dropped; the reports
    /// show the handshake and the bytes.
    #[test]
    fn two_loops_carry_packets_over_loopback() {
        two_loops("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1");
    }

    /// The same over IPv6 (an endpoint like `[2001:db8::1]:51820`).
    #[test]
    fn two_loops_carry_packets_over_ipv6() {
        two_loops("[::1]:0", "[::1]:0", "::1");
    }

    /// B on a dual-stack socket (some peer of it is IPv6), A over IPv4: B
    /// sees A's address as IPv4, not as a mapped IPv6 one, and answers it.
    #[test]
    fn a_dual_stack_socket_serves_an_ipv4_peer() {
        two_loops("127.0.0.1:0", "[::]:0", "127.0.0.1");
    }

    /// A (one peer, connected) bound at `a_bind`, B at `b_bind`, reached at
    /// `b_host` and B's port.
    fn two_loops(a_bind: &str, b_bind: &str, b_host: &str) {
        use std::io::BufRead;
        let (a_key, b_key) = ([1u8; 32], [2u8; 32]);
        let public = |k: [u8; 32]| PublicKey::from(&StaticSecret::from(k)).to_bytes();
        let a_udp = UdpSocket::bind(a_bind).unwrap_or_else(|e| panic!("{e}"));
        let b_udp = UdpSocket::bind(b_bind).unwrap_or_else(|e| panic!("{e}"));
        let b_port = b_udp
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let b_ip: IpAddr = b_host.parse().unwrap_or_else(|e| panic!("{e}"));
        let b_addr = SocketAddr::new(b_ip, b_port);
        let net = |s: &str| s.parse::<IpNet>().unwrap_or_else(|e| panic!("{e}"));
        // A has one peer: its socket is connected to it, as the supervisor
        // does (sends without an address, GSO as a socket option); B's is
        // not (sendto and sendmsg with addresses).
        a_udp.connect(b_addr).unwrap_or_else(|e| panic!("{e}"));
        let a = start(
            Spec {
                private_key: a_key,
                peers: vec![PeerSpec {
                    public_key: public(b_key),
                    preshared_key: Some([9u8; 32]),
                    endpoint: Some(b_addr),
                    allowed_ips: vec![net("0.0.0.0/0")],
                    keepalive: None,
                }],
            },
            a_udp,
        );
        let b = start(
            Spec {
                private_key: b_key,
                peers: vec![PeerSpec {
                    public_key: public(a_key),
                    preshared_key: Some([9u8; 32]),
                    // B learns A's endpoint from A's handshake.
                    endpoint: None,
                    allowed_ips: vec![net("10.9.0.2/32")],
                    keepalive: None,
                }],
            },
            b_udp,
        );
        let (guest, far) = (Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(45, 1, 1, 1));
        let hello = ipv4(guest, far, b"hello through the tunnel");
        a.tun.send(&hello).unwrap_or_else(|e| panic!("{e}"));
        let mut got = vec![0u8; 2048];
        let n = b
            .tun
            .recv(&mut got)
            .unwrap_or_else(|e| panic!("nothing came out: {e}"));
        assert_eq!(&got[..n], &hello[..]);

        // B may only deliver what A may send: 10.9.0.2. A spoofed source is
        // dropped, the next good packet still arrives.
        a.tun
            .send(&ipv4(Ipv4Addr::new(10, 9, 0, 3), far, b"spoofed"))
            .unwrap_or_else(|e| panic!("{e}"));
        let good = ipv4(guest, far, b"second");
        a.tun.send(&good).unwrap_or_else(|e| panic!("{e}"));
        let n = b.tun.recv(&mut got).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..n], &good[..], "the spoofed packet was delivered");

        // A burst from the connected side (segmented when batched), then a
        // datagram longer than the burst's segments: all arrive whole.
        let burst: Vec<Vec<u8>> = (0..10u8)
            .map(|i| ipv4(guest, far, &[i; 1000]))
            .chain(std::iter::once(ipv4(guest, far, &[0xee; 1400])))
            .collect();
        for p in &burst {
            a.tun.send(p).unwrap_or_else(|e| panic!("{e}"));
        }
        for p in &burst {
            let n = b
                .tun
                .recv(&mut got)
                .unwrap_or_else(|e| panic!("burst: {e}"));
            assert_eq!(&got[..n], &p[..], "a burst packet changed");
        }

        // And back: B routes to A by its AllowedIPs.
        let back = ipv4(far, guest, b"reply");
        b.tun.send(&back).unwrap_or_else(|e| panic!("{e}"));
        let n = a.tun.recv(&mut got).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got[..n], &back[..]);

        let mut a_reports = a.reports;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = None;
        while std::time::Instant::now() < deadline {
            let mut line = String::new();
            if a_reports.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let r: Report = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}"));
            if r.peers[0].rx_bytes > 0 {
                last = Some(r);
                break;
            }
        }
        let r = last.unwrap_or_else(|| panic!("no report with received bytes"));
        assert!(r.peers[0].last_handshake_ms.is_some());
        assert!(r.peers[0].tx_bytes >= (hello.len() + good.len()) as u64);
        assert_eq!(r.peers[0].endpoint, Some(b_addr.to_string()));
        // Closing the report socket ends the loop.
        drop(a_reports);
        drop(a._report_hold);
        let ended = a.thread.join().unwrap_or_else(|_| panic!("loop panicked"));
        assert!(ended.is_ok(), "{ended:?}");
        drop(b);
    }
}
