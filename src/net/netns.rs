//! The VM's anonymous network namespace.
//!
//! The supervisor creates it with `unshare(CLONE_NEWNET)` on a short-lived
//! thread and keeps only a descriptor: no name under `/run/netns`, so when
//! the supervisor and QEMU are gone, the namespace is gone too. Work that
//! must happen inside (creating sockets, the TAP, netlink) runs on a scoped
//! thread that enters it; sockets keep their namespace afterwards.
//!
//! This is the one place that needs CAP_SYS_ADMIN for networking.

use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sched::{CloneFlags, setns, unshare};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot create the VM's network namespace")]
    Create(#[source] std::io::Error),
    #[error("cannot enter the VM's network namespace")]
    Enter(#[source] std::io::Error),
    #[error("a thread working inside the VM's network namespace panicked")]
    Panicked,
}

/// A network namespace held by descriptor.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// Create a new, empty network namespace (only a down `lo`).
    pub fn create() -> Result<NetNs, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<NetNs, NetnsError> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Create(e.into()))?;
                let f = File::open("/proc/thread-self/ns/net").map_err(NetnsError::Create)?;
                Ok(NetNs { fd: f.into() })
            })
            .join()
            .map_err(|_| NetnsError::Panicked)?
        })
    }

    /// Hold an existing namespace, e.g. `/run/netns/NAME`.
    pub fn open(path: &std::path::Path) -> Result<NetNs, NetnsError> {
        let f = File::open(path).map_err(NetnsError::Enter)?;
        Ok(NetNs { fd: f.into() })
    }

    /// Run `f` on a thread inside this namespace and return its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T, NetnsError> {
                setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetnsError::Enter(e.into()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Panicked)?
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A socket the dataplane needs inside the VM's namespace, which it cannot
/// enter itself (unprivileged): it asks the supervisor over a link (see
/// [`serve`]), or, running as root in-process, a thread that entered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// An unbound TCP socket (tunnel exits, forwards to the guest).
    Stream,
    /// A UDP socket bound to an ephemeral port (tunnel exits).
    Datagram,
    /// The same two for IPv6 (`ipv6 = true` through the tunnel).
    Stream6,
    Datagram6,
    /// A transparent UDP socket bound to `bind` (the destination a guest's
    /// datagram named) and connected to `peer` (the guest): replies speak
    /// as the place the guest wrote to.
    Reply {
        bind: SocketAddr,
        peer: SocketAddr,
    },
}

/// An address in a request: family, 16 address bytes (an IPv4 address in
/// the first 4), port.
const ADDR_LEN: usize = 19;

fn put_addr(b: &mut [u8], a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            b[0] = 4;
            b[1..5].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            b[0] = 6;
            b[1..17].copy_from_slice(&v6.octets());
        }
    }
    b[17..19].copy_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let b: &[u8; ADDR_LEN] = b.try_into().ok()?;
    let port = u16::from_be_bytes([b[17], b[18]]);
    let ip = match b[0] {
        4 if b[5..17].iter().all(|x| *x == 0) => IpAddr::from(<[u8; 4]>::try_from(&b[1..5]).ok()?),
        6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[1..17]).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl Request {
    const LEN: usize = 1 + 2 * ADDR_LEN;

    fn encode(&self) -> [u8; Request::LEN] {
        let mut b = [0u8; Request::LEN];
        match self {
            Request::Stream => b[0] = 1,
            Request::Datagram => b[0] = 2,
            Request::Stream6 => b[0] = 4,
            Request::Datagram6 => b[0] = 5,
            Request::Reply { bind, peer } => {
                b[0] = 3;
                put_addr(&mut b[1..1 + ADDR_LEN], *bind);
                put_addr(&mut b[1 + ADDR_LEN..], *peer);
            }
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Request> {
        let b: &[u8; Request::LEN] = b.try_into().ok()?;
        let rest_zero = b[1..].iter().all(|x| *x == 0);
        match b[0] {
            1 if rest_zero => Some(Request::Stream),
            2 if rest_zero => Some(Request::Datagram),
            4 if rest_zero => Some(Request::Stream6),
            5 if rest_zero => Some(Request::Datagram6),
            3 => {
                let bind = get_addr(&b[1..1 + ADDR_LEN])?;
                let peer = get_addr(&b[1 + ADDR_LEN..])?;
                // One family: a reply speaks from where the guest wrote.
                (bind.is_ipv4() == peer.is_ipv4()).then_some(Request::Reply { bind, peer })
            }
            _ => None,
        }
    }

    /// Make the socket in the calling thread's namespace (a reply socket
    /// needs CAP_NET_ADMIN for the transparent bind).
    fn make(&self) -> std::io::Result<socket2::Socket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = match self {
            Request::Stream => Socket::new(Domain::IPV4, Type::STREAM.cloexec(), None)?,
            Request::Stream6 => Socket::new(Domain::IPV6, Type::STREAM.cloexec(), None)?,
            Request::Datagram => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?;
                s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
                s
            }
            Request::Datagram6 => {
                let s = Socket::new(Domain::IPV6, Type::DGRAM.cloexec(), None)?;
                s.set_only_v6(true)?;
                s.bind(&std::net::SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
                s
            }
            Request::Reply { bind, peer } => {
                let s = Socket::new(
                    Domain::for_address(*bind),
                    Type::DGRAM.cloexec(),
                    Some(Protocol::UDP),
                )?;
                s.set_reuse_address(true)?;
                if bind.is_ipv4() {
                    s.set_ip_transparent_v4(true)?;
                } else {
                    s.set_only_v6(true)?;
                    s.set_ip_transparent_v6(true)?;
                }
                s.bind(&(*bind).into())?;
                s.connect(&(*peer).into())?;
                s
            }
        };
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// The supervisor's side of the socket link: a thread inside `ns` that
/// answers each [`Request`] read from `link` (a SOCK_SEQPACKET socket
/// whose other end the unprivileged dataplane holds) with the socket, or
/// an error number. The dataplane may be compromised: a request must be
/// exactly one well-formed message, and a reply socket may speak only to
/// `guest` (a spoofed source towards anything else is refused). Ends when
/// the dataplane closes its end.
pub fn serve(
    ns: &NetNs,
    link: OwnedFd,
    guests: Vec<IpAddr>,
) -> Result<std::thread::JoinHandle<()>, NetnsError> {
    let fd = ns.fd.try_clone().map_err(NetnsError::Enter)?;
    std::thread::Builder::new()
        .name("ns-factory".into())
        .spawn(move || {
            if let Err(e) = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET) {
                tracing::error!("socket factory: cannot enter the VM's namespace: {e}");
                return;
            }
            drop(fd);
            let mut buf = [0u8; 64];
            loop {
                let n = match nix::sys::socket::recv(
                    link.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(0) | Err(nix::errno::Errno::ECONNRESET) => return,
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!("socket factory: {e}");
                        return;
                    }
                };
                let made = match Request::decode(&buf[..n]) {
                    Some(Request::Reply { peer, .. }) if !guests.contains(&peer.ip()) => {
                        Err(std::io::Error::from_raw_os_error(libc::EPERM))
                    }
                    Some(req) => req.make(),
                    None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
                };
                if let Err(e) = answer(link.as_fd(), made) {
                    tracing::warn!("socket factory: {e}");
                    return;
                }
            }
        })
        .map_err(NetnsError::Enter)
}

fn answer(link: BorrowedFd<'_>, made: std::io::Result<socket2::Socket>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let (code, sock) = match made {
        Ok(s) => (0i32, Some(s)),
        Err(e) => (e.raw_os_error().unwrap_or(libc::EIO), None),
    };
    let bytes = code.to_le_bytes();
    let iov = [std::io::IoSlice::new(&bytes)];
    let fds: Vec<i32> = sock.iter().map(|s| s.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(link.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// The dataplane's side of the link: send `req`, wait for the socket.
fn ask(link: BorrowedFd<'_>, req: Request) -> std::io::Result<socket2::Socket> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, send};
    send(link.as_raw_fd(), &req.encode(), MsgFlags::MSG_NOSIGNAL)?;
    let mut code = [0u8; 4];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut code)];
    let msg = recvmsg::<()>(
        link.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in this process
                // for this message; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    if msg.bytes == 0 {
        return Err(std::io::Error::other(
            "the supervisor closed the socket link",
        ));
    }
    match (i32::from_le_bytes(code), got) {
        (0, Some(fd)) => Ok(socket2::Socket::from(fd)),
        (0, None) => Err(std::io::Error::other(
            "the socket link answered without a socket",
        )),
        (errno, _) => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// A SOCK_SEQPACKET socket pair for [`serve`] and [`NsSockets::remote`].
pub fn link_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

type Pending = (
    Request,
    tokio::sync::oneshot::Sender<std::io::Result<socket2::Socket>>,
);

/// Makes sockets inside the VM's namespace for code running outside it,
/// on one thread: either a thread that entered the namespace once (a
/// socket belongs to the namespace it was created in, whichever thread
/// uses it later), or, in the unprivileged dataplane, a thread that asks
/// the supervisor over the socket link.
#[derive(Debug)]
pub struct NsSockets {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Pending>>,
}

impl NsSockets {
    /// Enter `ns` on a thread; it ends when this is dropped.
    pub fn spawn(ns: &NetNs) -> Result<NsSockets, NetnsError> {
        let fd = ns.fd.try_clone().map_err(NetnsError::Enter)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let tx = NsSockets::thread(move || {
            let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered.map_err(|e| NetnsError::Enter(e.into())));
            drop(fd);
            ok.then_some(|req: Request| req.make())
        })?;
        ready_rx.recv().map_err(|_| NetnsError::Panicked)??;
        Ok(NsSockets {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// Ask the supervisor over `link` (one end of [`link_pair`]).
    pub fn remote(link: OwnedFd) -> Result<NsSockets, NetnsError> {
        let tx = NsSockets::thread(move || Some(move |req: Request| ask(link.as_fd(), req)))?;
        Ok(NsSockets {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// A thread that runs `start`, then serves each request with the
    /// function it returned (none: it ends at once).
    fn thread<F>(
        start: impl FnOnce() -> Option<F> + Send + 'static,
    ) -> Result<std::sync::mpsc::Sender<Pending>, NetnsError>
    where
        F: FnMut(Request) -> std::io::Result<socket2::Socket>,
    {
        let (tx, rx) = std::sync::mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("ns-sockets".into())
            .spawn(move || {
                let Some(mut make) = start() else { return };
                while let Ok((req, reply)) = rx.recv() {
                    let _ = reply.send(make(req));
                }
            })
            .map_err(NetnsError::Enter)?;
        Ok(tx)
    }

    async fn socket(&self, req: Request) -> std::io::Result<socket2::Socket> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || std::io::Error::other("the namespace socket thread is gone");
        self.tx
            .lock()
            .map_err(|_| gone())?
            .send((req, reply))
            .map_err(|_| gone())?;
        let s = answer.await.map_err(|_| gone())??;
        s.set_nonblocking(true)?;
        s.set_cloexec(true)?;
        Ok(s)
    }

    /// A TCP connection to `to`, made from inside the namespace.
    pub async fn connect(
        &self,
        to: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let req = if to.is_ipv6() {
            Request::Stream6
        } else {
            Request::Stream
        };
        let s = self.socket(req).await?;
        let std: std::net::TcpStream = s.into();
        tokio::net::TcpSocket::from_std_stream(std)
            .connect(to)
            .await
    }

    /// A UDP socket bound to an ephemeral port inside the namespace, of
    /// the family of `to`.
    pub async fn udp(&self, to: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
        let req = if to.is_ipv6() {
            Request::Datagram6
        } else {
            Request::Datagram
        };
        let s = self.socket(req).await?;
        tokio::net::UdpSocket::from_std(s.into())
    }

    /// The socket that answers the guest at `peer` as `bind` (see
    /// [`Request::Reply`]).
    pub async fn reply(
        &self,
        bind: SocketAddr,
        peer: SocketAddr,
    ) -> std::io::Result<tokio::net::UdpSocket> {
        let s = self.socket(Request::Reply { bind, peer }).await?;
        tokio::net::UdpSocket::from_std(s.into())
    }
}

/// Where the supervisor's upstream sockets are made: in the host's
/// namespace (direct egress, holes), or in the VM's, whose only route out
/// is the WireGuard tunnel.
#[derive(Debug, Clone)]
pub enum Exit {
    Host,
    Tunnel(std::sync::Arc<NsSockets>),
}

impl Exit {
    pub async fn connect(
        &self,
        to: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        match self {
            Exit::Host => tokio::net::TcpStream::connect(to).await,
            Exit::Tunnel(t) => t.connect(to).await,
        }
    }

    /// A UDP socket on an ephemeral port, for talking to `to`.
    pub async fn udp_for(
        &self,
        to: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::UdpSocket> {
        match (self, to) {
            (Exit::Host, std::net::SocketAddr::V4(_)) => {
                tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).await
            }
            (Exit::Host, std::net::SocketAddr::V6(_)) => {
                tokio::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).await
            }
            (Exit::Tunnel(t), to) => t.udp(to).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests cross a boundary from a process that may be compromised:
    /// every well-formed one round-trips, anything else is refused.
    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let v4: SocketAddr = "45.20.0.10:53".parse().unwrap_or_else(|e| panic!("{e}"));
        let g4: SocketAddr = "10.0.2.15:40000".parse().unwrap_or_else(|e| panic!("{e}"));
        let v6: SocketAddr = "[2a0a:2000::10]:53"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let g6: SocketAddr = "[fd6d:6967:7261:6e74::15]:40000"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        for req in [
            Request::Stream,
            Request::Datagram,
            Request::Stream6,
            Request::Datagram6,
            Request::Reply { bind: v4, peer: g4 },
            Request::Reply { bind: v6, peer: g6 },
        ] {
            assert_eq!(Request::decode(&req.encode()), Some(req));
        }
        // Mixed families, unknown kinds and families, stray bytes, lengths.
        let mixed = Request::Reply { bind: v4, peer: g6 }.encode();
        assert_eq!(Request::decode(&mixed), None);
        let mut bad = Request::Reply { bind: v6, peer: g6 }.encode();
        bad[1] = 5;
        assert_eq!(Request::decode(&bad), None);
        let mut stray = Request::Reply { bind: v4, peer: g4 }.encode();
        stray[10] = 1;
        assert_eq!(Request::decode(&stray), None);
        let mut stream = Request::Stream.encode();
        stream[3] = 1;
        assert_eq!(Request::decode(&stream), None);
        assert_eq!(Request::decode(&[9; Request::LEN]), None);
        assert_eq!(Request::decode(&[1]), None);
    }
}
