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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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

type SocketRequest = (
    socket2::Type,
    tokio::sync::oneshot::Sender<std::io::Result<socket2::Socket>>,
);

/// Makes sockets inside a namespace for code running outside it: a thread
/// that entered the namespace once creates each socket (a socket belongs
/// to the namespace it was created in, whichever thread uses it later).
/// In WireGuard mode the proxy and the resolver reach the tunnel this way.
#[derive(Debug)]
pub struct NsSockets {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<SocketRequest>>,
}

impl NsSockets {
    /// Start the thread; it ends when this is dropped.
    pub fn spawn(ns: &NetNs) -> Result<NsSockets, NetnsError> {
        let fd = ns.fd.try_clone().map_err(NetnsError::Enter)?;
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ns-sockets".into())
            .spawn(move || {
                let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered.map_err(|e| NetnsError::Enter(e.into())));
                if !ok {
                    return;
                }
                drop(fd);
                while let Ok((ty, reply)) = rx.recv() {
                    let _ = reply.send(socket2::Socket::new(socket2::Domain::IPV4, ty, None));
                }
            })
            .map_err(NetnsError::Enter)?;
        ready_rx.recv().map_err(|_| NetnsError::Panicked)??;
        Ok(NsSockets {
            tx: std::sync::Mutex::new(tx),
        })
    }

    async fn socket(&self, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || std::io::Error::other("the namespace socket thread is gone");
        self.tx
            .lock()
            .map_err(|_| gone())?
            .send((ty, reply))
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
        let s = self.socket(socket2::Type::STREAM).await?;
        let std: std::net::TcpStream = s.into();
        tokio::net::TcpSocket::from_std_stream(std)
            .connect(to)
            .await
    }

    /// A UDP socket bound to an ephemeral port inside the namespace.
    pub async fn udp(&self) -> std::io::Result<tokio::net::UdpSocket> {
        let s = self.socket(socket2::Type::DGRAM).await?;
        s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
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
            (Exit::Tunnel(t), _) => t.udp().await,
        }
    }
}
