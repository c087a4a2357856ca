//! The VM namespace's dataplane, independent of QEMU: addresses, policy
//! routing and the nftables ruleset on the guest-facing interface, then
//! the DNS and egress-proxy tasks. The supervisor uses it with a TAP
//! device; `migrant __netlab` (benchmarks) with a veth whose other end is
//! a namespace standing in for the guest.

use std::net::SocketAddrV4;
use std::sync::Arc;

use super::netns::NetNs;
use super::{dns, domains, nft, policy, proxy, resolver, route, tap};
use crate::config::{Config, Egress, NetRule, Proto};

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
    /// The proxy runs unless nothing at all may leave.
    pub proxied: bool,
    /// Gateway TCP ports opened by rules.
    pub gateway_tcp_holes: Vec<u16>,
    /// WireGuard mode: the TUN, which nothing may reach the namespace from
    /// except answers to the supervisor's own connections.
    pub tunnel_iface: Option<String>,
}

/// WireGuard mode, for [`spawn`].
pub struct TunnelExit {
    pub sockets: Arc<super::netns::NsSockets>,
    /// The tunnel's DNS servers; empty: the host's resolvers answer.
    pub dns: Vec<std::net::Ipv4Addr>,
}

impl Setup {
    pub fn for_config(cfg: &Config) -> Setup {
        Setup {
            gateway: cfg.gateway_ip(),
            guest: cfg.guest_ip(),
            prefix: cfg.network.prefix,
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

/// Sockets created inside the namespace, used from the host's.
pub struct Sockets {
    /// The guest's link (its interface index in the namespace).
    pub guest_link: u32,
    /// WireGuard mode: a netlink route socket of the namespace, for the
    /// tunnel's route rule.
    pub routes: Option<super::route::RouteSocket>,
    pub dns: std::net::UdpSocket,
    pub dns_tcp: std::net::TcpListener,
    pub listeners: Option<(std::net::TcpListener, std::net::UdpSocket)>,
}

/// Configure `iface` and the namespace; call on a thread inside it.
pub fn setup_in_ns(iface: &str, setup: &Setup) -> Result<Sockets, DataplaneError> {
    tap::configure(iface, setup.gateway, setup.prefix, setup.proxied)?;
    let plan = nft::Plan {
        tap: iface.to_string(),
        gateway: setup.gateway,
        guest: setup.guest,
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
    let listeners = if setup.proxied {
        Some((
            proxy::tcp_listener().map_err(io("TCP proxy listener"))?,
            proxy::udp_socket().map_err(io("UDP proxy socket"))?,
        ))
    } else {
        None
    };
    let guest_link = nix::net::if_::if_nametoindex(iface).map_err(|e| DataplaneError::Io {
        what: "guest link index",
        source: e.into(),
    })?;
    let routes = setup
        .tunnel_iface
        .as_ref()
        .map(|_| super::route::RouteSocket::new())
        .transpose()
        .map_err(io("route socket"))?;
    Ok(Sockets {
        guest_link,
        routes,
        dns,
        dns_tcp,
        listeners,
    })
}

/// Start DNS and the proxy on the current runtime; returns the counters
/// and the policy.
pub fn spawn(
    cfg: &Config,
    ns: Arc<NetNs>,
    sockets: Sockets,
    tunnel: Option<TunnelExit>,
    journal: Option<std::path::PathBuf>,
) -> Result<(Arc<proxy::Stats>, Arc<route::Gate>), DataplaneError> {
    let gateway = cfg.gateway_ip();
    let dns_sock = tokio::net::UdpSocket::from_std(sockets.dns).map_err(io("DNS socket"))?;
    let stats = Arc::new(proxy::Stats::with_journal(match journal {
        Some(path) => super::journal::Journal::open(path),
        None => super::journal::Journal::disabled(),
    }));
    let allow = (!cfg.network.allow_domains.is_empty())
        .then(|| domains::Allowlist::new(&cfg.network.allow_domains));
    let host = policy::HostAddrs::default();
    host.refresh();
    let rule = if cfg.network.egress == Egress::Open {
        route::Rule::AnyUnicast
    } else {
        route::Rule::DefaultRoute
    };
    let host_routes = route::RouteSocket::new().map_err(io("route socket"))?;
    let gate = Arc::new(route::Gate {
        policy: policy::Policy {
            egress: cfg.network.egress,
            gateway,
            subnet: cfg.network.subnet,
            prefix: cfg.network.prefix,
            rules: cfg.network.rules.clone(),
            host,
            domains: allow.clone(),
            tunnel: tunnel.is_some(),
        },
        host: route::RouteGuard::new(host_routes, rule),
        // Without its socket, tunnel flows are refused (fail closed).
        tunnel: tunnel
            .as_ref()
            .and(sockets.routes)
            .map(|routes| route::RouteGuard::new(routes, route::Rule::NotVia(sockets.guest_link))),
    });
    let resolver = Arc::new(resolver::Resolver {
        stub: dns::Stub {
            names: vec![
                (cfg.name.clone(), cfg.guest_ip()),
                ("gateway".to_string(), gateway),
            ],
        },
        // With egress none the guest resolves local names only; with a
        // tunnel that names DNS servers, they answer through it.
        upstreams: match &tunnel {
            _ if cfg.network.egress == Egress::None => Vec::new(),
            Some(t) if !t.dns.is_empty() => t
                .dns
                .iter()
                .map(|ip| std::net::SocketAddr::from((*ip, 53)))
                .collect(),
            _ => resolver::host_upstreams(),
        },
        exit: match &tunnel {
            Some(t) if !t.dns.is_empty() => super::netns::Exit::Tunnel(Arc::clone(&t.sockets)),
            _ => super::netns::Exit::Host,
        },
        allow: allow.clone(),
        stats: Arc::clone(&stats),
        gate: Some(Arc::clone(&gate)),
        in_flight: Arc::new(tokio::sync::Semaphore::new(resolver::MAX_IN_FLIGHT)),
    });
    tokio::spawn({
        let r = Arc::clone(&resolver);
        async move {
            if let Err(e) = r.serve_udp(dns_sock).await {
                tracing::error!("DNS stopped: {e}");
            }
        }
    });
    let dns_tcp =
        tokio::net::TcpListener::from_std(sockets.dns_tcp).map_err(io("DNS TCP listener"))?;
    tokio::spawn(Arc::clone(&resolver).serve_tcp(dns_tcp));
    tokio::spawn(proxy::watch_host(Arc::clone(&gate)));
    if let Some((tcp, udp)) = sockets.listeners {
        let proxy = Arc::new(proxy::Proxy {
            gate: Arc::clone(&gate),
            stats: Arc::clone(&stats),
            ns,
            resolver,
            tunnel: tunnel.map(|t| t.sockets),
        });
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(io("TCP proxy listener"))?;
        tokio::spawn(Arc::clone(&proxy).serve_tcp(tcp));
        tokio::spawn(async move {
            if let Err(e) = proxy.serve_udp(udp).await {
                tracing::error!("UDP proxy stopped: {e}");
            }
        });
    }
    Ok((stats, gate))
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
/// interface `tap0` of the namespace at `netns`, until SIGTERM or SIGINT.
pub fn netlab(
    netns: &std::path::Path,
    project: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    raise_fd_limit();
    let cfg = crate::config::load(project)?;
    let ns = Arc::new(NetNs::open(netns)?);
    let setup = Setup::for_config(&cfg);
    let plan = crate::wireguard::plan_for(&cfg)?;
    let (sockets, tun) = ns
        .run(|| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tun = plan
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
        // WireGuard mode: the same tunnel a VM would get.
        let mut running = None;
        let wg_log =
            std::env::temp_dir().join(format!("migrant-netlab-wg-{}.log", std::process::id()));
        if let (Some(plan), Some(tun)) = (&plan, tun) {
            let udp = crate::wireguard::bind_udp(plan)?;
            let exe = std::env::current_exe()?;
            let log =
                std::env::temp_dir().join(format!("migrant-netlab-wg-{}.log", std::process::id()));
            running = Some(
                crate::wireguard::bring_up(
                    &exe,
                    (plan, tun, udp),
                    &crate::qemu::process::qemu_identity()?,
                    &log,
                    cfg.network.wireguard_timeout,
                    &ns,
                )
                .await?,
            );
        }
        let (exit, tunnel) = match running {
            Some(r) => (Some(r.exit), Some(r.tunnel)),
            None => (None, None),
        };
        let (stats, gate) = spawn(&cfg, ns, sockets, exit, None)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!("ready");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("{:?}", stats.view());
        let (n, nanos) = gate.host.lookup_cost();
        eprintln!("route check: {n} lookups, {nanos} ns each");
        if let Some(t) = &tunnel {
            eprintln!("{:?}", *t.reports.borrow());
        }
        if plan.is_some() {
            let _ = std::fs::remove_file(&wg_log);
        }
        Ok(())
    })
}
