//! The VM namespace's dataplane, independent of QEMU. The supervisor (as
//! root) configures the namespace — addresses, policy routing, the
//! nftables ruleset on the guest-facing interface — and makes every socket
//! the dataplane needs ([`setup_in_ns`]); the dataplane itself (DHCP, DNS,
//! the egress proxy, the SSH forward) runs unprivileged in a child process
//! ([`child`]) that the supervisor starts and restarts ([`parent`]). The
//! supervisor uses it with a TAP device; `migrant __netlab` (benchmarks)
//! with a veth whose other end is a namespace standing in for the guest.

pub mod child;
pub mod dhcp;
pub mod dns;
pub mod domains;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod inspect;
pub mod journal;
pub mod link;
pub mod parent;
pub mod policy;
pub mod proxy;
pub mod resolver;
pub mod route;
pub mod splice;
pub mod stats;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::netns::NetNs;
use super::{nft, tap};
use crate::config::{Config, Egress, Net6, NetRule, Proto};

/// The next datagram on `socket` for a guest-facing server (`what`
/// names it in the log): errors a guest's packets can cause (an ICMP
/// error queued on the socket, an interrupted call) are skipped, any
/// other ends the server.
pub async fn recv_datagram(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
    what: &str,
) -> std::io::Result<(usize, SocketAddr)> {
    use std::io::ErrorKind;
    loop {
        match socket.recv_from(buf).await {
            Ok(got) => return Ok(got),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted
                        | ErrorKind::WouldBlock
                        | ErrorKind::ConnectionRefused
                        | ErrorKind::ConnectionReset
                ) =>
            {
                tracing::debug!(error = %e, "{what}: transient receive error");
            }
            Err(e) => return Err(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
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

impl DataplaneError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DataplaneError::Nft(nft::NftError::Spawn(_))
            | DataplaneError::Tap(tap::TapError::Open(_)) => crate::exit::UNAVAILABLE,
            _ => crate::exit::SOFTWARE,
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::Io { what, source }
}

/// What the namespace needs, from the Migrantfile.
#[derive(Debug, Clone)]
pub struct Setup {
    pub gateway: std::net::Ipv4Addr,
    /// The guest's leased address.
    pub guest: std::net::Ipv4Addr,
    pub prefix: u8,
    /// With `ipv6 = true`: the guest's IPv6 network.
    pub net6: Option<Net6>,
    /// The proxy runs unless nothing at all may leave.
    pub proxied: bool,
    /// Gateway TCP ports opened by rules.
    pub gateway_tcp_holes: Vec<u16>,
    /// WireGuard mode: the TUN, which nothing may reach the namespace from
    /// except answers to the supervisor's own connections.
    pub tunnel_iface: Option<String>,
}

impl Setup {
    pub fn for_config(cfg: &Config) -> Setup {
        Setup {
            gateway: cfg.gateway_ip(),
            guest: cfg.guest_ip(),
            prefix: cfg.network.subnet.prefix_len(),
            net6: cfg.net6(),
            proxied: cfg.network.egress != Egress::None || !cfg.network.rules.is_empty(),
            gateway_tcp_holes: cfg
                .network
                .rules
                .iter()
                .filter_map(|r| match *r {
                    NetRule::AllowHostPort {
                        proto: Proto::Tcp,
                        port,
                    } => Some(port),
                    NetRule::ForwardPort {
                        proto: Proto::Tcp,
                        guest_port,
                        ..
                    } => Some(guest_port),
                    _ => None,
                })
                .collect(),
            tunnel_iface: cfg
                .network
                .wireguard
                .is_some()
                .then(|| crate::wireguard::TUN_NAME.to_string()),
        }
    }
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
pub fn setup_in_ns(iface: &str, setup: &Setup) -> Result<Sockets, DataplaneError> {
    tap::configure(
        iface,
        setup.gateway,
        setup.prefix,
        setup.net6,
        setup.proxied,
    )?;
    let plan = nft::Plan {
        tap: iface.to_string(),
        gateway: setup.gateway,
        guest: setup.guest,
        net6: setup.net6,
        proxy: setup.proxied.then_some((proxy::TCP_PORT, proxy::UDP_PORT)),
        gateway_tcp_holes: setup.gateway_tcp_holes.clone(),
        tunnel: setup.tunnel_iface.clone(),
    };
    nft::apply(&nft::ruleset(&plan))?;
    let dns = std::net::UdpSocket::bind(SocketAddrV4::new(setup.gateway, 53))
        .map_err(io("DNS socket"))?;
    dns.set_nonblocking(true).map_err(io("DNS socket"))?;
    let dns_tcp = std::net::TcpListener::bind(SocketAddrV4::new(setup.gateway, 53))
        .map_err(io("DNS TCP listener"))?;
    dns_tcp
        .set_nonblocking(true)
        .map_err(io("DNS TCP listener"))?;
    let listeners = |v6: bool| -> Result<_, DataplaneError> {
        Ok((
            proxy::tcp_listener(v6).map_err(io("TCP proxy listener"))?,
            proxy::udp_socket(v6).map_err(io("UDP proxy socket"))?,
        ))
    };
    let listeners6 = match setup.net6 {
        Some(_) if setup.proxied => Some(listeners(true)?),
        _ => None,
    };
    let listeners = setup.proxied.then(|| listeners(false)).transpose()?;
    let guest_link = nix::net::if_::if_nametoindex(iface).map_err(|e| DataplaneError::Io {
        what: "guest link index",
        source: e.into(),
    })?;
    let routes = setup
        .tunnel_iface
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
    let dhcp = dhcp::bind_socket(iface).map_err(io("DHCP socket"))?;
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

/// Everything the dataplane child needs, from the supervisor (on its
/// stdin, as JSON): the network settings, the descriptors it inherited,
/// and who to become.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub guest: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    pub net6: Option<Net6>,
    pub mac: [u8; 6],
    pub egress: Egress,
    pub rules: Vec<NetRule>,
    pub allow_domains: Vec<String>,
    /// DNS servers the resolver forwards to; empty: local names only.
    pub upstreams: Vec<SocketAddr>,
    /// WireGuard mode: flows marked for the tunnel, and (with
    /// `dns_via_tunnel`) DNS, leave from the namespace.
    pub tunnel: bool,
    pub dns_via_tunnel: bool,
    pub guest_link: u32,
    /// Send the egress journal to the supervisor.
    pub journal: bool,
    /// Report when the guest's SSH server first answers (after the lease,
    /// or at once when `lease_seen`).
    pub probe_ssh: bool,
    pub lease_seen: bool,
    /// The identity to become, and the supervisor's pid (it must still be
    /// the parent once that is done).
    pub uid: u32,
    pub gid: u32,
    pub parent: i32,
    /// A folder only root writes, for [`crate::sandbox::empty_root`].
    pub empty_parent: std::path::PathBuf,
    pub fds: Fds,
}

/// Descriptor numbers the child inherits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fds {
    pub dhcp: i32,
    pub dns: i32,
    pub dns_tcp: i32,
    pub tcp: Option<i32>,
    pub udp: Option<i32>,
    pub tcp6: Option<i32>,
    pub udp6: Option<i32>,
    pub tunnel_routes: Option<i32>,
    pub ssh: Option<i32>,
    /// The socket link ([`crate::net::netns::NsSockets::remote`]).
    pub factory: i32,
    /// The event socket ([`link`]).
    pub events: i32,
}

impl Fds {
    pub fn all(&self) -> Vec<i32> {
        let mut v = vec![self.dhcp, self.dns, self.dns_tcp, self.factory, self.events];
        v.extend(
            [
                self.tcp,
                self.udp,
                self.tcp6,
                self.udp6,
                self.tunnel_routes,
                self.ssh,
            ]
            .into_iter()
            .flatten(),
        );
        v
    }
}

impl Plan {
    /// The plan for `cfg`; `tunnel_dns` is `Some` in WireGuard mode (the
    /// tunnel's DNS servers; empty: the host's resolvers answer).
    pub fn for_config(
        cfg: &Config,
        mac: [u8; 6],
        tunnel_dns: Option<&[std::net::IpAddr]>,
        identity: &crate::qemu::process::Identity,
        empty_parent: &std::path::Path,
    ) -> Plan {
        let dns_via_tunnel = tunnel_dns.is_some_and(|d| !d.is_empty());
        Plan {
            name: cfg.name.clone(),
            guest: cfg.guest_ip(),
            gateway: cfg.gateway_ip(),
            subnet: cfg.network.subnet,
            net6: cfg.net6(),
            mac,
            egress: cfg.network.egress,
            rules: cfg.network.rules.clone(),
            allow_domains: cfg.network.allow_domains.clone(),
            // With egress none the guest resolves local names only; with a
            // tunnel that names DNS servers, they answer through it.
            upstreams: match tunnel_dns {
                _ if cfg.network.egress == Egress::None => Vec::new(),
                Some(d) if !d.is_empty() => {
                    d.iter().map(|ip| SocketAddr::from((*ip, 53))).collect()
                }
                _ => resolver::host_upstreams(),
            },
            tunnel: tunnel_dns.is_some(),
            dns_via_tunnel,
            guest_link: 0,
            journal: false,
            probe_ssh: false,
            lease_seen: false,
            uid: identity.uid.as_raw(),
            gid: identity.gid.as_raw(),
            parent: nix::unistd::getpid().as_raw(),
            empty_parent: empty_parent.to_path_buf(),
            fds: Fds::default(),
        }
    }
}

/// Open files the dataplane wants: 4096 relayed TCP connections of six
/// descriptors, 4096 UDP flows of two, and room for everything else.
const WANTED_FILES: u64 = 4096 * 6 + 4096 * 2 + 1024;

/// Raise the open-file limit so the connection caps fit: to
/// [`WANTED_FILES`] (root may raise the hard limit), else to the hard
/// limit. The proxy sizes its caps to what it got ([`flow_caps`]).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < WANTED_FILES => {
            let target = hard.max(WANTED_FILES);
            if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_err()
                && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

/// The proxy's caps on relayed TCP connections and UDP flows: 4096 each,
/// or what the open-file limit leaves room for (half of it for each kind,
/// after 512 for everything else), so a flood meets the cap, never
/// `EMFILE` (which would also starve DNS and DHCP).
pub fn flow_caps() -> (usize, usize) {
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let budget = usize::try_from(limit.saturating_sub(512) / 2).unwrap_or(usize::MAX);
    (
        (budget / 6).clamp(16, proxy::MAX_TCP_FLOWS),
        (budget / 2).clamp(16, proxy::MAX_UDP_FLOWS),
    )
}

/// `migrant __netlab`: the dataplane of the project at `project` on the
/// interface `tap0` of the namespace at `netns`, until SIGTERM or SIGINT;
/// the same confined child a VM gets.
pub fn netlab(
    netns: &std::path::Path,
    project: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    let cfg = crate::config::load(project)?;
    let ns = Arc::new(NetNs::open(netns)?);
    let setup = Setup::for_config(&cfg);
    let wg = crate::wireguard::plan_for(&cfg)?;
    let (sockets, tun) = ns
        .run(|| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tun = wg
                .as_ref()
                .map(crate::wireguard::create_tun_in_ns)
                .transpose()?;
            Ok((setup_in_ns(tap::TAP_NAME, &setup)?, tun))
        })?
        .map_err(|e| e as Box<dyn std::error::Error>)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let exe = std::env::current_exe()?;
        let identity = crate::qemu::process::qemu_identity()?;
        // WireGuard mode: the same tunnel a VM would get.
        let mut tunnel = None;
        let wg_log =
            std::env::temp_dir().join(format!("migrant-netlab-wg-{}.log", std::process::id()));
        if let (Some(plan), Some(tun)) = (&wg, tun) {
            let udp = crate::wireguard::bind_udp(plan)?;
            tunnel = Some(
                crate::wireguard::bring_up(
                    &exe,
                    (plan, tun, udp),
                    &identity,
                    &wg_log,
                    cfg.network.wireguard_timeout,
                )
                .await?,
            );
        }
        let plan = Plan::for_config(
            &cfg,
            [0x52, 0x54, 0x00, 0x6e, 0x6c, 0x01],
            wg.as_ref().map(|p| p.dns.as_slice()),
            &identity,
            &std::env::temp_dir(),
        );
        let hub = parent::Hub::new(None, None);
        let kept = parent::Kept { sockets, ssh: None };
        let mut plane = parent::start(&exe, project, plan, &kept, &ns, &hub).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!("ready");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            status = plane.child.wait() => {
                return Err(format!("the dataplane exited: {status:?}").into());
            }
        }
        eprintln!("{:?}", hub.stats().await);
        hub.ask(link::ROUTE_COST_REQUEST).await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if let Some(t) = &tunnel {
            eprintln!("{:?}", *t.reports.borrow());
        }
        if wg.is_some() {
            let _ = std::fs::remove_file(&wg_log);
        }
        Ok(())
    })
}
