//! WireGuard egress: every flow the guest is allowed leaves through a
//! userspace tunnel (boringtun) whose TUN device lives in the VM's
//! namespace and whose UDP socket lives in the host's.
//!
//! How it fits the dataplane: the guest keeps its gateway; the egress
//! proxy applies the policy as always and, in WireGuard mode, opens its
//! upstream sockets *inside* the VM's namespace, whose only route out is
//! the TUN (`AllowedIPs` become its routes). There is no other interface
//! and no forwarding, so nothing the guest sends can leave any other way;
//! when the tunnel is down, connections simply fail. Named holes leave
//! from the host's namespace unless marked `via-tunnel`.
//!
//! The packet loop runs in a child process (`migrant __wg`) that drops to
//! the unprivileged QEMU user before it reads a single packet; see
//! [`tunnel`]. The supervisor creates the TUN and the UDP socket, hands
//! them over, waits for the first handshake before the VM starts (fail
//! closed), and publishes the child's reports in `wg.json` for `migrant wg`.

pub mod child;
pub mod conf;
pub mod tunnel;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Name of the TUN device inside the VM's namespace.
pub const TUN_NAME: &str = "wg0";
/// wg-quick's default MTU.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("{file}: peer at line {line}: cannot resolve endpoint {host}:{port}")]
    Resolve {
        file: String,
        line: usize,
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no IPv4 Address in [Interface]; the tunnel needs one")]
    NoAddress(String),
    #[error(
        "{0}: no IPv6 Address in [Interface], and `ipv6 = true` sends the guest's IPv6 through the tunnel; add the tunnel's IPv6 address, or set ipv6 = false"
    )]
    NoAddress6(String),
    #[error("cannot create the WireGuard TUN device")]
    Tun(#[source] crate::net::tap::TapError),
    #[error("cannot set up the WireGuard UDP socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot listen on UDP port {port} for WireGuard (ListenPort in {file})")]
    ListenPort {
        port: u16,
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the WireGuard process")]
    Spawn(#[source] std::io::Error),
    #[error(
        "no WireGuard handshake with {pending} within {secs} s (wrong key, or endpoint unreachable?); the VM was not started"
    )]
    NoHandshake { pending: String, secs: u64 },
    #[error("the WireGuard process exited before the first handshake (see {log})")]
    Died { log: String },
    #[error(transparent)]
    Netns(#[from] crate::net::netns::NetnsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl WgError {
    pub fn exit_code(&self) -> u8 {
        match self {
            WgError::NoAddress(_) | WgError::NoAddress6(_) => crate::exit::CONFIG,
            // A name that does not resolve now may resolve later.
            WgError::Resolve { .. }
            | WgError::Tun(_)
            | WgError::NoHandshake { .. }
            | WgError::Died { .. }
            | WgError::ListenPort { .. } => crate::exit::UNAVAILABLE,
            WgError::Socket(_) | WgError::Spawn(_) | WgError::Netns(_) => crate::exit::SOFTWARE,
            WgError::Config(e) => e.exit_code(),
        }
    }
}

/// A peer with its endpoint resolved.
#[derive(Debug, Clone)]
pub struct ResolvedPeer {
    pub public_key: conf::PublicKey,
    /// As written in the file (a name or an address).
    pub written: Option<String>,
    pub endpoint: Option<SocketAddr>,
}

/// The tunnel as the supervisor sets it up.
#[derive(Debug, Clone)]
pub struct Plan {
    pub conf: conf::WgConfig,
    pub peers: Vec<ResolvedPeer>,
    pub address: Ipv4Net,
    /// Every IPv4 `AllowedIPs` entry of every peer, once.
    pub routes: Vec<Ipv4Net>,
    /// The tunnel's DNS servers, queried through it (IPv6 ones only with
    /// `ipv6 = true`).
    pub dns: Vec<IpAddr>,
    /// With `ipv6 = true`: the tunnel's IPv6 address and every IPv6
    /// `AllowedIPs` entry, once (the guest's IPv6 goes through it too);
    /// otherwise the file's IPv6 parts are unused.
    pub v6: Option<(ipnet::Ipv6Net, Vec<ipnet::Ipv6Net>)>,
    /// The wg-quick file, for messages.
    pub file: String,
}

/// Resolve endpoint names once, on the host, and collect what the
/// namespace needs. Runs in the host's namespace (its resolver).
pub fn plan(file: &Path, conf: conf::WgConfig, ipv6: bool) -> Result<Plan, WgError> {
    let name = file.display().to_string();
    let address = *conf
        .addresses
        .first()
        .ok_or_else(|| WgError::NoAddress(name.clone()))?;
    let v6 = if ipv6 {
        let address6 = *conf
            .addresses6
            .first()
            .ok_or_else(|| WgError::NoAddress6(name.clone()))?;
        let mut routes6: Vec<ipnet::Ipv6Net> = Vec::new();
        for n in conf.peers.iter().flat_map(|p| &p.allowed_ips) {
            if let IpNet::V6(v6) = n
                && !routes6.contains(&v6.trunc())
            {
                routes6.push(v6.trunc());
            }
        }
        Some((address6, routes6))
    } else {
        None
    };
    let mut peers = Vec::new();
    for p in &conf.peers {
        let (written, endpoint) = resolve_endpoint(&name, p)?;
        peers.push(ResolvedPeer {
            public_key: p.public_key.clone(),
            written,
            endpoint,
        });
    }
    let mut routes: Vec<Ipv4Net> = Vec::new();
    for p in &conf.peers {
        for n in &p.allowed_ips {
            if let IpNet::V4(v4) = n {
                let v4 = v4.trunc();
                if !routes.contains(&v4) {
                    routes.push(v4);
                }
            }
        }
    }
    // IPv6 servers only when the tunnel carries IPv6.
    let dns = conf
        .dns
        .iter()
        .filter(|a| a.is_ipv4() || v6.is_some())
        .copied()
        .collect();
    Ok(Plan {
        conf,
        peers,
        address,
        routes,
        dns,
        v6,
        file: name,
    })
}

/// A peer's endpoint as written, and its IPv4 address (a name resolved
/// with the host's resolver).
fn resolve_endpoint(
    file: &str,
    p: &conf::Peer,
) -> Result<(Option<String>, Option<SocketAddr>), WgError> {
    Ok(match &p.endpoint {
        None => (None, None),
        Some(conf::Endpoint::Addr(a)) => (Some(a.to_string()), Some(*a)),
        Some(conf::Endpoint::Name { host, port }) => {
            let resolve_err = |source| WgError::Resolve {
                file: file.to_string(),
                line: p.line,
                host: host.clone(),
                port: *port,
                source,
            };
            // IPv4 first (what the host most surely routes), else IPv6.
            let all: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(resolve_err)?
                .collect();
            let found = all
                .iter()
                .find(|a| a.is_ipv4())
                .or_else(|| all.first())
                .copied()
                .ok_or_else(|| resolve_err(std::io::Error::other("no address")))?;
            (Some(format!("{host}:{port}")), Some(found))
        }
    })
}

impl Plan {
    /// The tunnel as the VM's network sees it.
    pub fn net(&self) -> crate::net::plan::Tunnel {
        crate::net::plan::Tunnel {
            iface: TUN_NAME.to_string(),
            dns: self.dns.clone(),
        }
    }

    /// The plan with endpoint names resolved again, for a restarted
    /// tunnel (the peer may have moved since `up`); a name that does not
    /// resolve now keeps its last address.
    pub fn re_resolved(&self) -> Plan {
        let mut next = self.clone();
        for (p, r) in self.conf.peers.iter().zip(next.peers.iter_mut()) {
            if !matches!(p.endpoint, Some(conf::Endpoint::Name { .. })) {
                continue;
            }
            match resolve_endpoint(&self.file, p) {
                Ok((_, Some(a))) if r.endpoint != Some(a) => {
                    tracing::info!(
                        "WireGuard endpoint {} now resolves to {a}",
                        r.written.as_deref().unwrap_or("?")
                    );
                    r.endpoint = Some(a);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}; keeping the last address"),
            }
        }
        next
    }

    /// What the packet loop gets (it holds the private key: stdin only).
    pub fn spec(&self) -> tunnel::Spec {
        tunnel::Spec {
            private_key: self.conf.private_key.0,
            peers: self
                .conf
                .peers
                .iter()
                .zip(&self.peers)
                .map(|(p, r)| tunnel::PeerSpec {
                    public_key: p.public_key.0,
                    preshared_key: p.preshared_key.as_ref().map(|k| k.0),
                    endpoint: r.endpoint,
                    // IPv6 entries only when the guest's IPv6 uses the
                    // tunnel: otherwise no IPv6 packet is carried.
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .filter(|n| n.addr().is_ipv4() || self.v6.is_some())
                        .map(IpNet::trunc)
                        .collect(),
                    keepalive: p.persistent_keepalive,
                })
                .collect(),
        }
    }

    /// The endpoint when the tunnel has exactly one peer and it has one.
    pub fn single_endpoint(&self) -> Option<SocketAddr> {
        match self.peers.as_slice() {
            [only] => only.endpoint,
            _ => None,
        }
    }

    pub fn mtu(&self) -> u16 {
        self.conf.mtu.unwrap_or(DEFAULT_MTU)
    }
}

/// In the current thread's namespace: create the TUN, give it the
/// interface address and MTU, bring it up and route `AllowedIPs` into it.
pub fn create_tun_in_ns(plan: &Plan) -> Result<File, WgError> {
    let tun = crate::net::tap::create_tun(TUN_NAME).map_err(WgError::Tun)?;
    crate::net::tap::configure_tun(
        TUN_NAME,
        plan.address,
        plan.mtu(),
        &plan.routes,
        plan.v6.as_ref(),
    )
    .map_err(WgError::Tun)?;
    Ok(tun)
}

/// The UDP socket the tunnel speaks from, in the host's namespace: bound
/// to `ListenPort` if set, with large buffers (bursts of a fast TCP flow).
pub fn bind_udp(plan: &Plan) -> Result<std::net::UdpSocket, WgError> {
    use socket2::{Domain, Socket, Type};
    // IPv4 unless a peer is reached over IPv6: then one dual-stack socket
    // for every peer (Linux sends to IPv4 addresses from it as given).
    let v6 = plan
        .peers
        .iter()
        .any(|p| p.endpoint.is_some_and(|e| e.is_ipv6()));
    let s = Socket::new(
        if v6 { Domain::IPV6 } else { Domain::IPV4 },
        Type::DGRAM,
        None,
    )
    .map_err(WgError::Socket)?;
    if v6 {
        s.set_only_v6(false).map_err(WgError::Socket)?;
    }
    let size = 4 << 20;
    let _ = s.set_recv_buffer_size(size);
    let _ = s.set_send_buffer_size(size);
    // The FORCE variants ignore the system maximum (we are root here).
    force_buffers(&s, size);
    let port = plan.conf.listen_port.unwrap_or(0);
    let any = if v6 {
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
    };
    s.bind(&any.into()).map_err(|source| match port {
        0 => WgError::Socket(source),
        _ => WgError::ListenPort {
            port,
            file: plan.file.clone(),
            source,
        },
    })?;
    // One peer: connect to it. The packet loop then sends without
    // addresses and its seccomp filter allows nothing else, so even an
    // exploited loop reaches no host but the peer (and the socket takes
    // datagrams from the peer alone: no roaming, which a client with a
    // fixed server does not need).
    if let Some(peer) = plan.single_endpoint() {
        s.connect(&peer.into()).map_err(WgError::Socket)?;
    }
    Ok(s.into())
}

fn force_buffers(s: &socket2::Socket, size: usize) {
    use std::os::fd::AsRawFd;
    let v = size as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&v`,
        // a live c_int; the descriptor is an open socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// What `migrant wg` and `status` read: written by the supervisor from the
/// packet loop's reports. No secrets: public keys, endpoints, counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// Unix time in milliseconds when this was written.
    pub written_ms: u64,
    pub address: String,
    /// The tunnel's DNS servers; empty when the guest's queries go to the
    /// host's resolvers (outside the tunnel).
    pub dns: Vec<String>,
    pub peers: Vec<tunnel::PeerReport>,
    /// Endpoints as written in the file (names stay names).
    pub written_endpoints: Vec<Option<String>>,
}

impl Published {
    pub fn path(run_dir: &Path) -> std::path::PathBuf {
        run_dir.join("wg.json")
    }

    /// How old the report is now, to age the handshake times.
    pub fn age(&self) -> Duration {
        let now = crate::state::now_ms();
        Duration::from_millis(now.saturating_sub(self.written_ms))
    }
}

/// Read the VM's WireGuard file and resolve its endpoints (host namespace).
pub fn plan_for(cfg: &crate::config::Config) -> Result<Option<Plan>, WgError> {
    match &cfg.network.wireguard {
        Some(file) => Ok(Some(plan(file, conf::load(file)?, cfg.network.ipv6)?)),
        None => Ok(None),
    }
}

/// Start the packet loop again after it died: a new TUN with its routes
/// (the old one went with the old process), a new UDP socket, the same
/// keys. The dataplane's sockets into the namespace stay as they are.
pub async fn restart(
    exe: &Path,
    plan: &Plan,
    identity: &crate::qemu::process::Identity,
    log: &Path,
    ns: &crate::net::netns::NetNs,
) -> Result<(child::Tunnel, Plan), WgError> {
    let old = plan.clone();
    let plan = tokio::task::spawn_blocking(move || old.re_resolved())
        .await
        .unwrap_or_else(|_| plan.clone());
    let tun = ns.run(|| create_tun_in_ns(&plan))??;
    let udp = bind_udp(&plan)?;
    let tunnel = child::start(exe, &plan, tun, udp, identity, log).await?;
    Ok((tunnel, plan))
}

/// Start the packet loop and wait (up to `timeout`) for every peer with an
/// endpoint to complete a handshake; on failure the loop is gone and the
/// namespace has no route out.
pub async fn bring_up(
    exe: &Path,
    (plan, tun, udp): (&Plan, File, std::net::UdpSocket),
    identity: &crate::qemu::process::Identity,
    log: &Path,
    timeout: Duration,
) -> Result<child::Tunnel, WgError> {
    let mut tunnel = child::start(exe, plan, tun, udp, identity, log).await?;
    tunnel.wait_handshake(timeout).await?;
    Ok(tunnel)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const PEER: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    fn parse(text: &str) -> conf::WgConfig {
        conf::parse(Path::new("wg.conf"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn names_resolve_once_and_routes_are_the_ipv4_allowed_ips() {
        let c = parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\nAddress = 10.7.0.2/32\nDNS = 10.7.0.1, fd00::1\n\
             [Peer]\nPublicKey = {PEER}\nEndpoint = localhost:51820\n\
             AllowedIPs = 10.7.0.0/24, 10.7.0.9/24, ::/0, 0.0.0.0/0\n"
        ));
        let p = plan(Path::new("wg.conf"), c, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.peers[0].endpoint,
            Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 51820))
        );
        assert_eq!(p.peers[0].written.as_deref(), Some("localhost:51820"));
        let routes: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, ["10.7.0.0/24", "0.0.0.0/0"]);
        assert_eq!(p.dns, [IpAddr::from(Ipv4Addr::new(10, 7, 0, 1))]);
        assert_eq!(p.mtu(), DEFAULT_MTU);
        let spec = p.spec();
        assert_eq!(
            spec.peers[0].allowed_ips.len(),
            3,
            "IPv6 entries are left out"
        );
        assert_eq!(spec.peers[0].endpoint, p.peers[0].endpoint);

        // A restart resolves names again: an endpoint that moved is
        // followed (here: back from where a stale plan pointed).
        let mut stale = p.clone();
        stale.peers[0].endpoint = Some(SocketAddr::new(Ipv4Addr::new(192, 0, 2, 9).into(), 51820));
        let fresh = stale.re_resolved();
        assert_eq!(fresh.peers[0].endpoint, p.peers[0].endpoint);
        assert_eq!(fresh.spec().peers[0].endpoint, p.peers[0].endpoint);
        // MTU = from the file is what the TUN gets.
        let with_mtu = parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\nAddress = 10.7.0.2/32\nMTU = 1280\n\n[Peer]\nPublicKey = {PEER}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n"
        ));
        let m = plan(Path::new("wg.conf"), with_mtu, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.mtu(), 1280);
    }

    /// A provider's dual-stack file: IPv4 and IPv6 addresses, `::/0`, an
    /// IPv6 endpoint. The tunnel uses its IPv4 parts; the socket is the
    /// endpoint's family, connected to it.
    #[test]
    fn a_dual_stack_file_with_an_ipv6_endpoint() {
        let c = parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\nAddress = 10.7.0.2/32, fc00:bbbb:bbbb:bb01::1:102/128\nDNS = 10.7.0.1\n\n\
             [Peer]\nPublicKey = {PEER}\nEndpoint = [::1]:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n"
        ));
        assert_eq!(c.addresses6.len(), 1);
        assert!(!c.warnings.iter().any(|w| w.contains("IPv6")));
        let said = c.unused_ipv6(Path::new("wg.conf")).unwrap_or_default();
        assert!(
            said.contains("fc00:bbbb:bbbb:bb01::1:102/128") && said.contains("::/0"),
            "{said:?}"
        );
        // With ipv6 = true the IPv6 parts are the tunnel's.
        let both = plan(Path::new("wg.conf"), c.clone(), true).unwrap_or_else(|e| panic!("{e}"));
        let (a6, r6) = both.v6.clone().unwrap_or_else(|| panic!("no IPv6 plan"));
        assert_eq!(a6.to_string(), "fc00:bbbb:bbbb:bb01::1:102/128");
        assert_eq!(
            r6.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["::/0"]
        );
        assert_eq!(both.spec().peers[0].allowed_ips.len(), 2);
        // An IPv6 resolver serves only when the tunnel carries IPv6.
        let v6dns = parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\nAddress = 10.7.0.2/32, fd00:7::2/128\nDNS = fd00:7::53\n\n\
             [Peer]\nPublicKey = {PEER}\nEndpoint = 127.0.0.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\n"
        ));
        let off =
            plan(Path::new("wg.conf"), v6dns.clone(), false).unwrap_or_else(|e| panic!("{e}"));
        assert!(off.dns.is_empty());
        let on = plan(Path::new("wg.conf"), v6dns, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            on.dns,
            ["fd00:7::53"
                .parse::<IpAddr>()
                .unwrap_or_else(|e| panic!("{e}"))]
        );
        let p = plan(Path::new("wg.conf"), c, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.address.to_string(), "10.7.0.2/32");
        let udp = bind_udp(&p).unwrap_or_else(|e| panic!("{e}"));
        let peer = udp.peer_addr().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peer.to_string(), "[::1]:51820");

        // Two peers, one over IPv4: a dual-stack socket, unconnected.
        let two = parse(&format!(
            "[Interface]\nPrivateKey = {KEY}\nAddress = 10.7.0.2/32\nDNS = 10.7.0.1\n\n\
             [Peer]\nPublicKey = {PEER}\nEndpoint = [::1]:51820\nAllowedIPs = 10.8.0.0/16\n\n\
             [Peer]\nPublicKey = {KEY}\nEndpoint = 127.0.0.1:51821\nAllowedIPs = 0.0.0.0/0\n"
        ));
        let p = plan(Path::new("wg.conf"), two, false).unwrap_or_else(|e| panic!("{e}"));
        let udp = bind_udp(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(udp.peer_addr().is_err(), "several peers: not connected");
        assert!(udp.local_addr().is_ok_and(|a| a.is_ipv6()));
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let to = v4.local_addr().unwrap_or_else(|e| panic!("{e}"));
        udp.send_to(b"x", to)
            .unwrap_or_else(|e| panic!("an IPv4 peer from the dual-stack socket: {e}"));
    }
}
