//! The egress proxy, in the dataplane: TPROXY listeners inside the VM's
//! namespace (made by the supervisor, handed over) receive every TCP
//! connection and UDP datagram the guest sends anywhere; the dataplane
//! reads the original destination, asks the [`Gate`] (the policy, then
//! the route rule), and makes its own connection from the host's
//! namespace, or through the tunnel's socket factory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::broker::intercept::{self, Seen};
use super::policy::{Allowed, Denial};
use super::resolver::Resolver;
use super::route::Gate;
use super::stats::Stats;
use crate::config::Proto;
use crate::net::netns::NsSockets;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// TCP connections relayed at once for one VM at most: each holds two
/// sockets and two pipes, so this bounds the dataplane's descriptors and
/// the kernel memory a guest can pin. Beyond it new connections are reset
/// and counted. Lower when the open-file limit is (`dataplane::flow_caps`).
pub const MAX_TCP_FLOWS: usize = 4096;
/// UDP flows tracked at once for one VM (each holds two sockets until it
/// has been idle for `UDP_IDLE`).
pub const MAX_UDP_FLOWS: usize = 4096;
const UDP_IDLE: Duration = Duration::from_secs(60);

/// Live UDP flows: (guest source, original destination) → upstream socket.
type Flows = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), Arc<UdpSocket>>>>;

pub struct Proxy {
    /// The policy with the route rule.
    pub gate: Arc<Gate>,
    pub stats: Arc<Stats>,
    /// Sockets inside the VM's namespace (the reply sockets of UDP flows).
    pub inside: Arc<NsSockets>,
    pub resolver: Arc<Resolver>,
    /// The flow caps, shared by the IPv4 and IPv6 listeners.
    pub slots: Slots,
    /// The credential broker, when the VM has secrets.
    pub broker: Option<Arc<super::broker::Broker>>,
}

/// Slots for relayed TCP connections and tracked UDP flows, sized by
/// [`super::flow_caps`].
#[derive(Debug, Clone)]
pub struct Slots {
    tcp: Arc<tokio::sync::Semaphore>,
    udp: Arc<tokio::sync::Semaphore>,
}

impl Slots {
    pub fn sized() -> Slots {
        let (tcp_cap, udp_cap) = super::flow_caps();
        tracing::info!("at most {tcp_cap} relayed TCP connections and {udp_cap} UDP flows");
        Slots {
            tcp: Arc::new(tokio::sync::Semaphore::new(tcp_cap)),
            udp: Arc::new(tokio::sync::Semaphore::new(udp_cap)),
        }
    }
}

/// An address as the policy sees it: IPv4-mapped IPv6 as IPv4, without
/// flow label or scope.
fn plain(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => addr,
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::from((ip, a.port())),
            None => SocketAddr::from((*a.ip(), a.port())),
        },
    }
}

/// Close a guest connection with a reset, so the guest sees a refusal at
/// once instead of a hang.
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

impl Proxy {
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, src) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("proxy accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&self.slots.tcp).try_acquire_owned() else {
                if let Ok(dst) = stream.local_addr().map(plain) {
                    self.stats
                        .deny(Proto::Tcp, src, dst, Denial::TooManyConnections);
                }
                reset(stream);
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.tcp_flow(stream, src).await;
                drop(slot);
            });
        }
    }

    async fn tcp_flow(&self, guest: TcpStream, src: SocketAddr) {
        // With TPROXY the accepted socket's local address is where the
        // guest meant to go.
        let Ok(dst) = guest.local_addr().map(plain) else {
            return reset(guest);
        };
        let policy = &self.gate.policy;
        // DNS over TCP to any server (the gateway's IPv6 address too; its
        // IPv4 one has a listener of its own) is answered by the gateway's
        // resolver, like DNS over UDP: one resolver sees every lookup.
        if dst.port() == 53 && dst.ip() != IpAddr::V4(policy.net.gateway) {
            return self.resolver.tcp_client(guest).await;
        }
        let allowed = match self.gate.decide(Proto::Tcp, dst) {
            Ok(a) => a,
            Err(why) => {
                self.stats.deny(Proto::Tcp, src, dst, why);
                return reset(guest);
            }
        };
        let inspect = policy.domains.as_ref().filter(|_| !allowed.hole);
        // With secrets, connections to their hosts (and plain HTTP) are
        // the broker's: looked at without taking a byte.
        let seen = match &self.broker {
            Some(b) if !allowed.hole => intercept::classify(b, dst, &guest).await,
            _ => Seen::Other,
        };
        let broker_slot = match (&seen, &self.broker) {
            (Seen::Other, _) | (_, None) => None,
            (_, Some(b)) => match Arc::clone(&b.slots).try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    self.stats
                        .deny(Proto::Tcp, src, dst, Denial::TooManyConnections);
                    return reset(guest);
                }
            },
        };
        if let (Seen::Tls(name), Some(list)) = (&seen, inspect)
            && !list.admits_request(dst.ip(), name)
        {
            self.stats.secret_refused(
                src,
                dst,
                Some(name),
                None,
                None,
                Denial::NotAllowedDomain,
                "",
            );
            return reset(guest);
        }
        // With allow_domains, the client's first bytes are checked before
        // anything is sent on its behalf (the broker checks each request
        // of the connections it takes).
        let first = match inspect.filter(|_| seen == Seen::Other) {
            Some(list) => match super::inspect::before_connect(list, dst.ip(), &guest).await {
                Ok(Some(first)) => first,
                Ok(None) => return reset(guest),
                Err(refusal) => {
                    self.stats.deny_inspected(src, dst, refusal);
                    return reset(guest);
                }
            },
            None => super::inspect::First::default(),
        };
        let named = first.name.clone();
        let exit = match self.gate.exit(&allowed) {
            Some(e) => e,
            None => return reset(guest),
        };
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, exit.connect(allowed.to)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("connect {} for {src}: {e}", allowed.to);
                return reset(guest);
            }
            Err(_) => {
                tracing::debug!("connect {} for {src}: timed out", allowed.to);
                return reset(guest);
            }
        };
        // A connection to ourselves is the host, whatever the tables said.
        if !allowed.hole
            && upstream
                .local_addr()
                .is_ok_and(|l| l.ip() == allowed.to.ip())
        {
            self.stats.deny(Proto::Tcp, src, dst, Denial::HostAddress);
            return reset(guest);
        }
        self.stats.tcp.fetch_add(1, Ordering::Relaxed);
        // The guest's side has TCP_NODELAY and keepalive from the listener.
        let _ = upstream.set_nodelay(true);
        let flow = |b: &Arc<super::broker::Broker>| intercept::Flow {
            broker: Arc::clone(b),
            stats: Arc::clone(&self.stats),
            src,
            dst,
            list: inspect.cloned(),
        };
        let (up, down) = if let (Seen::Tls(name), Some(b)) = (&seen, &self.broker) {
            intercept::tls(flow(b), guest, upstream, name.clone()).await
        } else if let (Seen::Http, Some(b)) = (&seen, &self.broker) {
            intercept::plain(flow(b), guest, upstream).await
        } else if let Some(list) = inspect {
            let (refused, up, down) =
                super::inspect::relay(list, dst.ip(), &guest, &upstream, first).await;
            if let Some(refusal) = refused {
                self.stats.deny_inspected(src, dst, refusal);
            }
            (up, down)
        } else {
            // Both directions, each shut down for writing when its source
            // ends; the bytes move by splice(2) and never enter user space.
            match super::splice::relay(&guest, &upstream).await {
                Ok(moved) => moved,
                Err(e) => {
                    tracing::debug!("relay {src} -> {}: {e}", allowed.to);
                    (0, 0)
                }
            }
        };
        drop(broker_slot);
        let named = named.or(match seen {
            Seen::Tls(name) => Some(name),
            _ => None,
        });
        self.stats
            .flow_ended(Proto::Tcp, dst, allowed, named, up, down);
    }

    pub async fn serve_udp(self: Arc<Self>, socket: std::net::UdpSocket) -> std::io::Result<()> {
        // SAFETY: `socket` is an open, owned UDP socket that moves into the
        // AsyncFd and is neither closed nor replaced while it lives there.
        let fd = unsafe { AsyncFd::register(socket) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let flows: Flows = Arc::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let mut guard = fd.readable().await?;
            let got = guard.try_io(|inner| recv_orig(inner.get_ref(), &mut buf));
            let (len, src, dst) = match got {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::debug!("udp proxy recv: {e}");
                    continue;
                }
                Err(_would_block) => continue,
            };
            let data = buf[..len].to_vec();
            let existing = flows.lock().ok().and_then(|f| f.get(&(src, dst)).cloned());
            if let Some(up) = existing {
                let _ = up.send(&data).await;
                continue;
            }
            // The verdict before a slot: what the policy refuses holds
            // none and is counted under its own reason, however many
            // flows the guest keeps open.
            let allowed = match self.udp_verdict(dst) {
                Ok(a) => a,
                Err(why) => {
                    self.stats.deny(Proto::Udp, src, dst, why);
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&self.slots.udp).try_acquire_owned() else {
                self.stats
                    .deny(Proto::Udp, src, dst, Denial::TooManyConnections);
                continue;
            };
            let this = Arc::clone(&self);
            let flows = Arc::clone(&flows);
            tokio::spawn(async move {
                this.udp_flow(src, dst, allowed, data, flows).await;
                drop(slot);
            });
        }
    }

    /// A new UDP flow's verdict: `None` for DNS (to any server it goes to
    /// the gateway's resolver, so that `allow_domains` sees every
    /// lookup), else where the policy lets it go. Refused: an address no
    /// reply socket can speak as (broadcast, multicast, scope-less
    /// link-local), and what the policy refuses.
    fn udp_verdict(&self, dst: SocketAddr) -> Result<Option<Allowed>, Denial> {
        if let Some(why) = unanswerable(dst.ip()) {
            return Err(why);
        }
        if dst.port() == 53 {
            return Ok(None);
        }
        self.gate.decide(Proto::Udp, dst).map(Some)
    }

    async fn udp_flow(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        allowed: Option<Allowed>,
        first: Vec<u8>,
        flows: Flows,
    ) {
        // The reply socket speaks as `dst` to the guest.
        let reply = match self.inside.reply(dst, src).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("udp reply socket for {dst}: {e}");
                return;
            }
        };
        let Some(allowed) = allowed else {
            return self.dns_flow(reply, first).await;
        };
        let Some(exit) = self.gate.exit(&allowed) else {
            return;
        };
        let up = match exit.udp_for(allowed.to).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("udp upstream socket: {e}");
                return;
            }
        };
        if up.connect(allowed.to).await.is_err() {
            return;
        }
        let up = Arc::new(up);
        if let Ok(mut f) = flows.lock() {
            f.insert((src, dst), Arc::clone(&up));
        }
        self.stats.udp.fetch_add(1, Ordering::Relaxed);
        let _ = up.send(&first).await;
        // Buffers only while a datagram is being moved: an idle flow
        // holds two sockets and no memory of ours.
        let (mut sent, mut received) = (first.len() as u64, 0u64);
        loop {
            let moved = tokio::select! {
                r = up.readable() => r.and_then(|()| forward(&up, &reply, &mut received)),
                // Later datagrams of this flow may land on the connected
                // reply socket instead of the TPROXY socket.
                r = reply.readable() => r.and_then(|()| forward(&reply, &up, &mut sent)),
                _ = tokio::time::sleep(UDP_IDLE) => break,
            };
            if moved.is_err() {
                break;
            }
        }
        if let Ok(mut f) = flows.lock() {
            f.remove(&(src, dst));
        }
        self.stats
            .flow_ended(Proto::Udp, dst, allowed, None, sent, received);
    }

    async fn dns_flow(&self, reply: UdpSocket, first: Vec<u8>) {
        let mut query = first;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(resp) = self
                .resolver
                .handle(&query, super::resolver::Transport::Udp)
                .await
            {
                let _ = reply.send(&resp).await;
            }
            match tokio::time::timeout(Duration::from_secs(10), reply.recv(&mut buf)).await {
                Ok(Ok(n)) => query = buf[..n].to_vec(),
                _ => return,
            }
        }
    }
}

/// Move one waiting datagram from `from` to `to` (none after a spurious
/// wake-up), counting its bytes; a full `to` drops it, as a busy link
/// would. The buffer exists only while a datagram is moved.
fn forward(from: &UdpSocket, to: &UdpSocket, count: &mut u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65536];
    match from.try_recv(&mut buf) {
        Ok(n) => {
            *count += n as u64;
            let _ = to.try_send(&buf[..n]);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// Receive one datagram with its original destination (either family).
fn recv_orig(
    sock: &std::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, SocketAddr)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let src = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
                })
        })
        .ok_or_else(|| std::io::Error::other("datagram without a source"))?;
    let mut dst = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                dst = Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                dst = Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))));
            }
            _ => {}
        }
    }
    let len = msg.bytes;
    let dst =
        dst.ok_or_else(|| std::io::Error::other("datagram without its original destination"))?;
    Ok((len, plain(src), plain(dst)))
}

/// Keep the policy's view of the host current: its addresses, its default
/// routes, and the addresses `allow_domains` admitted (expired entries
/// dropped).
pub async fn watch_host(gate: Arc<Gate>, broker: Option<Arc<super::broker::Broker>>) {
    loop {
        if let Some(b) = &broker {
            b.expire();
        }
        if gate.policy.host.refresh() {
            tracing::info!("host addresses changed; policy updated");
        }
        gate.host.refresh();
        if let Some(list) = &gate.policy.domains {
            list.expire();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Why no reply socket can speak as `ip`, if it is an address no unicast
/// socket may take: broadcast and multicast, an IPv6 link-local address
/// (which needs a scope), the unspecified address.
fn unanswerable(ip: IpAddr) -> Option<Denial> {
    match ip {
        IpAddr::V4(v4) if v4.is_broadcast() || v4.is_multicast() => Some(Denial::Multicast),
        IpAddr::V4(v4) if v4.is_unspecified() => Some(Denial::Loopback),
        IpAddr::V6(v6) if v6.is_multicast() => Some(Denial::Multicast),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Denial::LinkLocal),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(Denial::Loopback),
        _ => None,
    }
}
