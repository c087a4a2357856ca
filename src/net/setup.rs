//! The VM's namespace as the supervisor makes it, with root's rights,
//! before anything reads a byte from the guest: the guest-facing
//! interface's addresses and policy routing ([`super::tap`]), the
//! nftables ruleset ([`super::nft`]), and every socket the dataplane
//! will serve on (DHCP, DNS, the transparent listeners, which need
//! `CAP_NET_ADMIN`). All of it from the one [`NetPlan`].

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::plan::{NetPlan, PROXY_TCP_PORT, PROXY_UDP_PORT};
use super::{nft, tap};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SetupError::Nft(nft::NftError::Spawn(_)) | SetupError::Tap(tap::TapError::Open(_)) => {
                crate::exit::UNAVAILABLE
            }
            _ => crate::exit::SOFTWARE,
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SetupError {
    move |source| SetupError::Io { what, source }
}

/// Sockets created inside the namespace for the dataplane. The supervisor
/// keeps them for as long as the VM runs: a restarted dataplane gets the
/// same ones, and while none runs the guest's packets wait unanswered.
pub struct Sockets {
    /// The guest's link (its interface index in the namespace).
    pub guest_link: u32,
    /// WireGuard mode: a netlink route socket of the namespace, for the
    /// tunnel's route rule.
    pub routes: Option<socket2::Socket>,
    pub dhcp: std::net::UdpSocket,
    pub dns: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
    pub listeners: Option<(std::net::TcpListener, std::net::UdpSocket)>,
    /// The same for IPv6 (with `ipv6 = true`).
    pub listeners6: Option<(std::net::TcpListener, std::net::UdpSocket)>,
}

/// Configure `iface` and the namespace; call on a thread inside it.
pub fn setup_in_ns(iface: &str, net: &NetPlan) -> Result<Sockets, SetupError> {
    tap::configure(
        iface,
        net.gateway,
        net.subnet.prefix_len(),
        net.net6,
        net.proxied(),
    )?;
    nft::apply(&nft::ruleset(iface, net))?;
    let dns =
        std::net::UdpSocket::bind(SocketAddrV4::new(net.gateway, 53)).map_err(io("DNS socket"))?;
    dns.set_nonblocking(true).map_err(io("DNS socket"))?;
    let dns_tcp = std::net::TcpListener::bind(SocketAddrV4::new(net.gateway, 53))
        .map_err(io("DNS TCP listener"))?;
    dns_tcp
        .set_nonblocking(true)
        .map_err(io("DNS TCP listener"))?;
    let listeners = |v6: bool| -> Result<_, SetupError> {
        Ok((
            tcp_listener(v6).map_err(io("TCP proxy listener"))?,
            udp_socket(v6).map_err(io("UDP proxy socket"))?,
        ))
    };
    let listeners6 = match net.net6 {
        Some(_) if net.proxied() => Some(listeners(true)?),
        _ => None,
    };
    let listeners = net.proxied().then(|| listeners(false)).transpose()?;
    let guest_link = nix::net::if_::if_nametoindex(iface).map_err(|e| SetupError::Io {
        what: "guest link index",
        source: e.into(),
    })?;
    let routes = net
        .tunnel
        .as_ref()
        .map(|_| {
            socket2::Socket::new(
                socket2::Domain::from(libc::AF_NETLINK),
                socket2::Type::RAW.cloexec(),
                Some(socket2::Protocol::from(libc::NETLINK_ROUTE)),
            )
        })
        .transpose()
        .map_err(io("route socket"))?;
    let dhcp = dhcp_socket(iface).map_err(io("DHCP socket"))?;
    Ok(Sockets {
        guest_link,
        routes,
        dhcp,
        dns,
        dns_tcp,
        listeners,
        listeners6,
    })
}

/// Creates the server socket: UDP, SO_REUSEADDR, SO_BROADCAST,
/// SO_BINDTODEVICE(`ifname`), bound to 0.0.0.0:67, close-on-exec and
/// non-blocking (ready for `tokio::net::UdpSocket::from_std`).
///
/// Call it on a thread that has entered the VM's network namespace: the
/// socket belongs to the namespace of the thread that creates it. Needs
/// CAP_NET_BIND_SERVICE (port 67) and, on older kernels, CAP_NET_RAW
/// (SO_BINDTODEVICE) in that namespace.
pub fn dhcp_socket(ifname: &str) -> std::io::Result<std::net::UdpSocket> {
    // An empty name would *remove* the device binding.
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains(['/', '\0']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid interface name {ifname:?}"),
        ));
    }
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        nix::sys::socket::SockProtocol::Udp,
    )?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Broadcast, &true)?;
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(ifname),
    )?;
    let addr =
        nix::sys::socket::SockaddrIn::from(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 67));
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Keepalive on the guest's side of relayed connections (set on the
/// listener): a guest process gone while its half of a connection waits
/// frees the slot within minutes.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);
/// A transparent socket of `family` (IPv6 only, never mapped IPv4) bound
/// to `port` of every address.
fn transparent(v6: bool, ty: Type, proto: Protocol, port: u16) -> std::io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, ty.cloexec(), Some(proto))?;
    s.set_reuse_address(true)?;
    let any = if v6 {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
    } else {
        s.set_ip_transparent_v4(true)?;
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
    };
    if proto == Protocol::UDP {
        if v6 {
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6OrigDstAddr, &true)
        } else {
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)
        }
        .map_err(std::io::Error::from)?;
    }
    s.bind(&any.into())?;
    Ok(s)
}

/// The TCP TPROXY listener (IPv4, or IPv6 with `v6`); call on a thread
/// inside the namespace.
pub fn tcp_listener(v6: bool) -> std::io::Result<std::net::TcpListener> {
    let s = transparent(v6, Type::STREAM, Protocol::TCP, PROXY_TCP_PORT)?;
    // Accepted connections inherit these: no system calls per connection.
    s.set_tcp_nodelay(true)?;
    s.set_tcp_keepalive(&KEEPALIVE)?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The UDP TPROXY socket (with the original destination delivered as
/// ancillary data; IPv4, or IPv6 with `v6`); call on a thread inside the
/// namespace.
pub fn udp_socket(v6: bool) -> std::io::Result<std::net::UdpSocket> {
    let s = transparent(v6, Type::DGRAM, Protocol::UDP, PROXY_UDP_PORT)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// `nameserver` lines of a resolv.conf, port 53.
pub fn upstreams_from(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The host's resolvers, read from /etc/resolv.conf.
pub fn host_upstreams() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| upstreams_from(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions edns0\n";
        assert_eq!(
            upstreams_from(text),
            vec![
                "127.0.0.53:53".parse().unwrap_or_else(|e| panic!("{e}")),
                "[fe80::1]:53".parse().unwrap_or_else(|e| panic!("{e}")),
            ]
        );
    }
}
