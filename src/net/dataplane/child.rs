//! `migrant __dataplane`: everything that reads the guest's network bytes
//! (DHCP, DNS over UDP and TCP, the egress proxy with its TLS and HTTP
//! inspection, the SSH forward), in its own confined process.
//!
//! The supervisor made every socket it needs while it could (the TPROXY
//! listeners, DNS and DHCP sockets inside the VM's namespace, the SSH
//! socket) and passes them across exec with the [`Plan`] on stdin. Before
//! it reads a byte from the guest the child closes every other
//! descriptor, makes an empty, deleted directory its root, becomes the
//! VM's own uid (no capabilities, no new privileges, not dumpable, death
//! with the supervisor) and loads a seccomp allow-list that kills it on
//! anything else. Sockets it needs later inside the namespace (UDP reply
//! sockets, tunnel exits, connections to the guest) it asks of the
//! supervisor over a socket link ([`crate::net::netns::serve`]); upstream
//! sockets it makes itself, in the host's namespace where it lives.
//!
//! If it dies, nothing leaves the VM: the listeners stay with the
//! supervisor, so the guest's connections wait unanswered until the
//! supervisor starts it again.

use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use super::link::{Event, MAX_MESSAGE, ROUTE_COST_REQUEST, STATS_REQUEST};
use super::{Fds, Handover};
use super::{dhcp, dns, domains, forward, journal, policy, proxy, resolver, route};
use crate::net::netns::{Exit, NsSockets};

/// Entry point of `migrant __dataplane`. Returns the exit code.
pub fn main() -> u8 {
    match run() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("dataplane: {e}");
            crate::exit::SOFTWARE
        }
    }
}

/// The largest plan read (the broker's upstream roots make most of it:
/// Debian's store is about 300 KiB of base64).
const MAX_HANDOVER: u64 = 8 << 20;

fn run() -> std::io::Result<()> {
    let mut text = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_HANDOVER)
        .read_to_end(&mut text)?;
    let h: Handover = serde_json::from_slice(&text).map_err(std::io::Error::other)?;
    crate::sandbox::close_strays(&h.fds.all());
    let fds = Owned::take(&h.fds)?;
    crate::sandbox::empty_root(&h.plan.empty_parent)?;
    crate::sandbox::drop_identity(h.plan.uid, h.plan.gid, h.plan.parent)?;
    filter().load()?;
    tracing::info!(uid = h.plan.uid, "dataplane started");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(h, fds))
}

fn filter() -> crate::sandbox::Filter {
    let domain = |d: i32| [(0u32, d as u64)];
    use crate::sandbox::lists;
    let filter = crate::sandbox::Filter::new()
        .allow(lists::BASE)
        .allow(lists::DATAPLANE);
    lists::DATAPLANE_SOCKET_FAMILIES
        .iter()
        .fold(filter, |f, family| f.allow_if("socket", &domain(*family)))
        // The runtime's own signal pipe.
        .allow_if("socketpair", &domain(libc::AF_UNIX))
        // Reading its own limits (the proxy sizes its caps to them);
        // never setting any.
        .allow_if("prlimit64", &[(0, 0), (2, 0)])
        // Thread names only.
        .allow_if("prctl", &[(0, libc::PR_SET_NAME as u64)])
}

/// The inherited descriptors, owned.
struct Owned {
    dhcp: OwnedFd,
    dns: OwnedFd,
    dns_tcp: OwnedFd,
    proxy: Option<(OwnedFd, OwnedFd)>,
    proxy6: Option<(OwnedFd, OwnedFd)>,
    tunnel_routes: Option<OwnedFd>,
    ssh: Option<OwnedFd>,
    factory: OwnedFd,
    events: OwnedFd,
}

impl Owned {
    fn take(f: &Fds) -> std::io::Result<Owned> {
        // Each one non-blocking, for the runtime.
        let inherited = |fd: i32| -> std::io::Result<OwnedFd> {
            let owned = crate::sandbox::inherited(fd)?;
            socket2::SockRef::from(&owned).set_nonblocking(true)?;
            Ok(owned)
        };
        let opt = |fd: Option<i32>| fd.map(inherited).transpose();
        Ok(Owned {
            dhcp: inherited(f.dhcp)?,
            dns: inherited(f.dns)?,
            dns_tcp: inherited(f.dns_tcp)?,
            proxy: match (f.tcp, f.udp) {
                (Some(t), Some(u)) => Some((inherited(t)?, inherited(u)?)),
                _ => None,
            },
            proxy6: match (f.tcp6, f.udp6) {
                (Some(t), Some(u)) => Some((inherited(t)?, inherited(u)?)),
                _ => None,
            },
            tunnel_routes: opt(f.tunnel_routes)?,
            ssh: opt(f.ssh)?,
            // The socket link is used blocking, from its own thread.
            factory: {
                let fd = crate::sandbox::inherited(f.factory)?;
                socket2::SockRef::from(&fd).set_nonblocking(false)?;
                fd
            },
            events: inherited(f.events)?,
        })
    }
}

/// Serve until the supervisor goes.
async fn serve(h: Handover, fds: Owned) -> std::io::Result<()> {
    let plan = &h.plan;
    let net = &plan.net;
    let events = Arc::new(tokio::net::UnixDatagram::from_std(
        std::os::unix::net::UnixDatagram::from(fds.events),
    )?);
    let report = {
        let events = Arc::clone(&events);
        move |e: Event| {
            if let Err(err) = events.try_send(&e.encode()) {
                tracing::debug!("event to the supervisor lost: {err}");
            }
        }
    };
    let inside = Arc::new(NsSockets::remote(fds.factory).map_err(std::io::Error::other)?);
    let lease_rx = spawn_dhcp(plan, fds.dhcp, h.start.lease_seen, report.clone())?;

    let stats = Arc::new(super::stats::Stats::with_journal(if plan.journal {
        let report = report.clone();
        journal::Journal::with_sink(Box::new(move |lines: &[u8]| {
            report(Event::Journal(lines.to_vec()));
            Ok(())
        }))
    } else {
        journal::Journal::disabled()
    }));
    let allow =
        (!net.allow_domains.is_empty()).then(|| domains::Allowlist::new(&net.allow_domains));
    let tunnel = net.tunnel.as_ref().map(|_| Arc::clone(&inside));
    let gate = gate(
        net,
        allow.clone(),
        tunnel.clone(),
        fds.tunnel_routes,
        h.guest_link,
    )?;
    // The credential broker: a plan that cannot be used stops the child
    // (the supervisor reports it) rather than letting placeholders out
    // unbrokered.
    let broker = match &plan.broker {
        Some(b) => Some(Arc::new(
            super::broker::Broker::new(b).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let resolver = Arc::new(resolver::Resolver {
        stub: dns::Stub {
            names: vec![
                (plan.name.clone(), net.guest),
                ("gateway".to_string(), net.gateway),
            ],
        },
        upstreams: net.upstreams.clone(),
        exit: match &tunnel {
            Some(t) if net.dns_via_tunnel() => Exit::Tunnel(Arc::clone(t)),
            _ => Exit::Host,
        },
        allow,
        stats: Arc::clone(&stats),
        gate: Some(Arc::clone(&gate)),
        in_flight: Arc::new(tokio::sync::Semaphore::new(resolver::MAX_IN_FLIGHT)),
        broker: broker.clone(),
    });
    let dns_sock = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fds.dns))?;
    tokio::spawn({
        let r = Arc::clone(&resolver);
        async move {
            if let Err(e) = r.serve_udp(dns_sock).await {
                tracing::error!("DNS stopped: {e}");
            }
        }
    });
    let dns_tcp = tokio::net::TcpListener::from_std(std::net::TcpListener::from(fds.dns_tcp))?;
    tokio::spawn(Arc::clone(&resolver).serve_tcp(dns_tcp));
    tokio::spawn(proxy::watch_host(Arc::clone(&gate), broker.clone()));
    if fds.proxy.is_some() {
        let proxy = Arc::new(proxy::Proxy {
            gate: Arc::clone(&gate),
            stats: Arc::clone(&stats),
            inside: Arc::clone(&inside),
            resolver,
            slots: proxy::Slots::sized(),
            broker,
        });
        // One pair of listeners per address family, one proxy behind them.
        for (tcp, udp) in fds.proxy.into_iter().chain(fds.proxy6) {
            let tcp = tokio::net::TcpListener::from_std(std::net::TcpListener::from(tcp))?;
            tokio::spawn(Arc::clone(&proxy).serve_tcp(tcp));
            let udp = std::net::UdpSocket::from(udp);
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                if let Err(e) = proxy.serve_udp(udp).await {
                    tracing::error!("UDP proxy stopped: {e}");
                }
            });
        }
    }
    let ssh_target = SocketAddr::V4(SocketAddrV4::new(net.guest, 22));
    if let Some(fd) = fds.ssh {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tokio::spawn(forward::serve_unix(
            listener,
            Arc::clone(&inside),
            ssh_target,
        ));
    }
    if h.start.probe_ssh {
        tokio::spawn(probe_ssh(lease_rx, inside, ssh_target, report.clone()));
    }

    // The supervisor's requests, until it goes.
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = events.recv(&mut buf).await?;
        match &buf[..n] {
            STATS_REQUEST => report(Event::Stats(stats.view())),
            ROUTE_COST_REQUEST => {
                let (n, nanos) = gate.host.lookup_cost();
                eprintln!("route check: {n} lookups, {nanos} ns each");
            }
            _ => {}
        }
    }
}

/// The DHCP server on `socket`, offering the guest its one lease; the
/// returned watch turns true once the guest holds it (at once when
/// `lease_seen`).
fn spawn_dhcp(
    plan: &super::Plan,
    socket: OwnedFd,
    lease_seen: bool,
    report: impl Fn(Event) + Send + 'static,
) -> std::io::Result<tokio::sync::watch::Receiver<bool>> {
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(lease_seen);
    let lease = dhcp::Lease {
        mac: plan.mac.0,
        ip: plan.net.guest,
        server: plan.net.gateway,
        netmask: plan.net.subnet.netmask(),
        router: plan.net.gateway,
        dns: vec![plan.net.gateway],
        lease_secs: 86400,
        hostname: Some(plan.name.clone()),
        domain: None,
        mtu: None,
    };
    let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    tokio::spawn(async move {
        let r = dhcp::serve(socket, lease, move |ev| {
            if let dhcp::DhcpEvent::Acked { ip } = ev {
                tracing::info!("DHCP: lease {ip} acknowledged");
                let _ = lease_tx.send(true);
                report(Event::Lease);
            } else {
                tracing::debug!("DHCP: {ev:?}");
            }
        })
        .await;
        if let Err(e) = r {
            tracing::error!("DHCP server stopped: {e}");
        }
    });
    Ok(lease_rx)
}

/// The one place a flow's exit is decided: the policy for `net`, the
/// host's route rule, and in WireGuard mode the tunnel's (the VM's
/// namespace, whose only way out is not the guest's link). Without its
/// route socket, tunnel flows are refused (fail closed).
fn gate(
    net: &crate::net::plan::NetPlan,
    domains: Option<domains::Allowlist>,
    tunnel: Option<Arc<NsSockets>>,
    tunnel_routes: Option<OwnedFd>,
    guest_link: u32,
) -> std::io::Result<Arc<route::Gate>> {
    let host = policy::HostAddrs::default();
    host.refresh();
    let rule = if net.egress == crate::config::Egress::Open {
        route::Rule::AnyUnicast
    } else {
        route::Rule::DefaultRoute
    };
    Ok(Arc::new(route::Gate {
        policy: policy::Policy {
            net: net.clone(),
            host,
            domains,
        },
        host: route::RouteGuard::new(route::RouteSocket::new()?, rule),
        tunnel: match (tunnel, tunnel_routes) {
            (Some(sockets), Some(fd)) => Some(route::TunnelExit {
                guard: route::RouteGuard::new(
                    route::RouteSocket::from_socket(socket2::Socket::from(fd))?,
                    route::Rule::NotVia(guest_link),
                ),
                sockets,
            }),
            _ => None,
        },
    }))
}

/// Report when the guest's SSH server first answers, once it holds its
/// lease.
async fn probe_ssh(
    mut lease_rx: tokio::sync::watch::Receiver<bool>,
    inside: Arc<NsSockets>,
    target: SocketAddr,
    report: impl Fn(Event),
) {
    while !*lease_rx.borrow_and_update() {
        if lease_rx.changed().await.is_err() {
            return;
        }
    }
    loop {
        if forward::ssh_banner(&inside, target).await {
            report(Event::Sshd);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
