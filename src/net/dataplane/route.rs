//! The route rule of the egress policy: an allowed flow must leave the way
//! the host reaches the internet.
//!
//! Fixed address classes cannot know a host's own networks: a corporate
//! range outside RFC 1918, a split-tunnel VPN's routes, a Tailscale exit,
//! the host's public address. The kernel does. Before the proxy connects
//! for the guest it asks, over netlink (RTM_GETROUTE, answered while the
//! request is sent, so the lookup costs two system calls), how the
//! namespace its upstream socket lives in would send to the destination,
//! and [`judge`] admits only a unicast route through a next hop of that
//! namespace's default route. A `local` route is the host itself, so a
//! newly added host address is refused at once.
//!
//! [`judge`] is pure; [`RouteGuard`] holds the netlink socket and the
//! default route's next hops (re-read every two seconds by
//! [`RouteGuard::refresh`], and on a miss at most once a second). On any
//! error the answer is a refusal and the last good next hops are kept.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::policy::Denial;

/// What the kernel said about one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A unicast route: out of `oif`, through `gateway` (none: on-link).
    Unicast { oif: u32, gateway: Option<IpAddr> },
    /// An address of this namespace.
    Local,
    /// Broadcast, multicast or anycast.
    Broadcast,
    /// No route, or an unreachable, prohibit, blackhole or throw route.
    Unreachable,
}

/// A next hop: interface and gateway.
pub type Hop = (u32, Option<IpAddr>);

/// Which unicast routes count as the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Direct egress: only through a next hop of a default route.
    DefaultRoute,
    /// `egress = "open"`: any unicast route (the LAN too), not the host.
    AnyUnicast,
    /// The VM's own namespace in WireGuard mode, whose only links are the
    /// guest's (this interface index) and the tunnel: anything but the
    /// guest's link.
    NotVia(u32),
}

/// The decision for one route: pure, unit-tested.
pub fn judge(route: Route, rule: &Rule, defaults: &HashSet<Hop>) -> Result<(), Denial> {
    match route {
        Route::Local => Err(Denial::HostAddress),
        Route::Broadcast => Err(Denial::Multicast),
        Route::Unreachable => Err(Denial::NotInternet),
        Route::Unicast { oif, gateway } => match rule {
            Rule::AnyUnicast => Ok(()),
            Rule::NotVia(guest) if oif != *guest => Ok(()),
            Rule::NotVia(_) => Err(Denial::GuestNetwork),
            Rule::DefaultRoute if defaults.contains(&(oif, gateway)) => Ok(()),
            Rule::DefaultRoute => Err(Denial::NotInternet),
        },
    }
}

/// Next hops of the default routes in a route dump: `0.0.0.0/0` in any
/// table, and the `0.0.0.0/1` + `128.0.0.0/1` pair that VPN clients use
/// to override a default without replacing it.
pub fn default_hops(routes: &[RouteMessage]) -> HashSet<Hop> {
    let mut hops = HashSet::new();
    for r in routes {
        if r.header.destination_prefix_length > 1 || r.header.kind != RouteType::Unicast {
            continue;
        }
        for a in &r.attributes {
            if let RouteAttribute::MultiPath(next) = a {
                for n in next {
                    hops.insert((n.interface_index, next_hop(&n.attributes).1));
                }
            }
        }
        if let (Some(oif), gateway) = next_hop(&r.attributes) {
            hops.insert((oif, gateway));
        }
    }
    hops
}

/// The output interface and gateway named by route attributes.
fn next_hop(attrs: &[RouteAttribute]) -> (Option<u32>, Option<IpAddr>) {
    let mut oif = None;
    let mut gateway = None;
    for a in attrs {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = address(g),
            _ => {}
        }
    }
    (oif, gateway)
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route the kernel gave for one destination.
fn route_of(msg: &RouteMessage) -> Route {
    match msg.header.kind {
        RouteType::Unicast => match next_hop(&msg.attributes) {
            (Some(oif), gateway) => Route::Unicast { oif, gateway },
            (None, _) => Route::Unreachable,
        },
        RouteType::Local => Route::Local,
        RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast => Route::Broadcast,
        _ => Route::Unreachable,
    }
}

/// A netlink route socket of one namespace.
#[derive(Debug)]
pub struct RouteSocket {
    sock: socket2::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RouteSocket {
    /// A socket of the calling thread's namespace.
    pub fn new() -> std::io::Result<RouteSocket> {
        let sock = socket2::Socket::new(
            socket2::Domain::from(libc::AF_NETLINK),
            socket2::Type::RAW.cloexec(),
            Some(socket2::Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        RouteSocket::from_socket(sock)
    }

    /// Use `sock`, an AF_NETLINK/NETLINK_ROUTE socket made in the
    /// namespace whose routes are wanted.
    pub fn from_socket(sock: socket2::Socket) -> std::io::Result<RouteSocket> {
        sock.set_nonblocking(false)?;
        // The kernel answers while the request is sent; the timeout only
        // guards against a reply that never comes.
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(RouteSocket {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn request(&mut self, msg: RouteMessage, flags: u16) -> std::io::Result<Vec<RouteMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(msg)),
        );
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock.send(&out)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut routes = Vec::new();
        loop {
            let n = std::io::Read::read(&mut &self.sock, &mut self.buf)?;
            let mut data = self.buf.get(..n).unwrap_or_default();
            while data.len() >= 16 {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if len < 16 || len > data.len() {
                    return Err(std::io::Error::other("malformed netlink message"));
                }
                let one = &data[..len];
                data = data.get(len.next_multiple_of(4)..).unwrap_or_default();
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(one)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                if msg.header.sequence_number != self.seq {
                    continue; // A late answer to an earlier request.
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                        routes.push(r);
                        if !dump {
                            return Ok(routes);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(routes),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// How this namespace would send to `dst`.
    pub fn get(&mut self, dst: IpAddr) -> Route {
        let mut msg = RouteMessage::default();
        match dst {
            IpAddr::V4(v4) => {
                msg.header.address_family = AddressFamily::Inet;
                msg.header.destination_prefix_length = 32;
                msg.attributes
                    .push(RouteAttribute::Destination(RouteAddress::Inet(v4)));
            }
            IpAddr::V6(v6) => {
                msg.header.address_family = AddressFamily::Inet6;
                msg.header.destination_prefix_length = 128;
                msg.attributes
                    .push(RouteAttribute::Destination(RouteAddress::Inet6(v6)));
            }
        }
        match self.request(msg, NLM_F_REQUEST) {
            Ok(r) => r.first().map_or(Route::Unreachable, route_of),
            // ENETUNREACH, EHOSTUNREACH, EACCES, EINVAL: no way there.
            Err(e) => {
                tracing::debug!("route to {dst}: {e}");
                Route::Unreachable
            }
        }
    }

    /// Every route of every table, IPv4 and IPv6.
    pub fn dump(&mut self) -> std::io::Result<Vec<RouteMessage>> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            match self.request(msg, NLM_F_REQUEST | NLM_F_DUMP) {
                Ok(r) => routes.extend(r),
                // A host without IPv6 (ipv6.disable=1) has no such table.
                Err(e) if family == AddressFamily::Inet6 => {
                    tracing::debug!("no IPv6 routes: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(routes)
    }
}

/// Route checks for flows leaving from one namespace.
#[derive(Debug)]
pub struct RouteGuard {
    socket: Mutex<RouteSocket>,
    rule: Rule,
    defaults: RwLock<HashSet<Hop>>,
    last_refresh: Mutex<Option<Instant>>,
    /// Lookups made and the time they took (for the benchmark).
    lookups: std::sync::atomic::AtomicU64,
    lookup_nanos: std::sync::atomic::AtomicU64,
}

/// How often a miss may re-read the default routes.
const MISS_REFRESH: Duration = Duration::from_secs(1);

impl RouteGuard {
    pub fn new(socket: RouteSocket, rule: Rule) -> RouteGuard {
        let guard = RouteGuard {
            socket: Mutex::new(socket),
            rule,
            defaults: RwLock::default(),
            last_refresh: Mutex::new(None),
            lookups: Default::default(),
            lookup_nanos: Default::default(),
        };
        guard.refresh();
        guard
    }

    /// Re-read the default routes; on an error keep the last good ones.
    pub fn refresh(&self) {
        if self.rule != Rule::DefaultRoute {
            return;
        }
        let dumped = match self.socket.lock() {
            Ok(mut s) => s.dump(),
            Err(_) => return,
        };
        if let Ok(mut last) = self.last_refresh.lock() {
            *last = Some(Instant::now());
        }
        match dumped {
            Ok(routes) => {
                let hops = default_hops(&routes);
                if let Ok(mut d) = self.defaults.write()
                    && *d != hops
                {
                    tracing::info!("default route next hops: {hops:?}");
                    *d = hops;
                }
            }
            Err(e) => tracing::warn!("cannot read the routing table (keeping the last): {e}"),
        }
    }

    /// The kernel's route to `dst`, timed.
    fn lookup(&self, dst: IpAddr) -> Route {
        use std::sync::atomic::Ordering;
        let started = Instant::now();
        let route = match self.socket.lock() {
            Ok(mut s) => s.get(dst),
            Err(_) => Route::Unreachable,
        };
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.lookup_nanos.fetch_add(took, Ordering::Relaxed);
        route
    }

    /// Whether a named hole to `dst` stays off the host: its target may
    /// be anywhere the rule names (the LAN, a VPN), but never an address
    /// the kernel delivers locally, including one the host gained after
    /// `up` checked the rules.
    pub fn check_hole(&self, dst: IpAddr) -> Result<(), Denial> {
        match self.lookup(dst) {
            Route::Local => Err(Denial::HostAddress),
            _ => Ok(()),
        }
    }

    /// Whether a flow to `dst` leaves the way the rule admits.
    pub fn check(&self, dst: IpAddr) -> Result<(), Denial> {
        let route = self.lookup(dst);
        let verdict = self.judge_now(route);
        if verdict == Err(Denial::NotInternet) && matches!(route, Route::Unicast { .. }) {
            // The default route may have changed since the last read.
            let due = self
                .last_refresh
                .lock()
                .map(|l| l.is_none_or(|t| t.elapsed() >= MISS_REFRESH))
                .unwrap_or(false);
            if due {
                self.refresh();
                return self.judge_now(route);
            }
        }
        verdict
    }

    /// Lookups so far and their mean time in nanoseconds.
    pub fn lookup_cost(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        let n = self.lookups.load(Ordering::Relaxed);
        let total = self.lookup_nanos.load(Ordering::Relaxed);
        (n, total.checked_div(n).unwrap_or(0))
    }

    fn judge_now(&self, route: Route) -> Result<(), Denial> {
        match self.defaults.read() {
            Ok(d) => judge(route, &self.rule, &d),
            Err(_) => Err(Denial::NotInternet),
        }
    }
}

/// The egress policy with the route rule: what the proxy asks before it
/// connects, and what the resolver asks of every address in an answer.
/// It also says where an allowed flow leaves from ([`Gate::exit`]): host
/// or tunnel is decided here, once.
#[derive(Debug)]
pub struct Gate {
    pub policy: super::policy::Policy,
    /// Flows that leave from the host's namespace.
    pub host: RouteGuard,
    /// WireGuard mode: flows that leave from the VM's namespace, whose
    /// only route out is the tunnel. Absent (tunnel flows refused) when
    /// its route socket is.
    pub tunnel: Option<TunnelExit>,
}

/// The way out through the tunnel: the route rule of the VM's namespace
/// and the factory of sockets inside it, always together.
#[derive(Debug)]
pub struct TunnelExit {
    pub guard: RouteGuard,
    pub sockets: std::sync::Arc<crate::net::netns::NsSockets>,
}

impl Gate {
    /// The policy's decision, then (for flows that are not named holes)
    /// the route rule of the namespace the flow leaves from.
    pub fn decide(
        &self,
        proto: crate::config::Proto,
        dst: std::net::SocketAddr,
    ) -> Result<super::policy::Allowed, Denial> {
        let allowed = self.policy.decide(proto, dst)?;
        let guard = self.guard(allowed.via_tunnel)?;
        if !allowed.hole {
            guard.check(allowed.to.ip())?;
        } else if !allowed.to.ip().is_loopback() {
            // Loopback is `allow-host-port`'s own target (the policy
            // refuses it for every other hole).
            guard.check_hole(allowed.to.ip())?;
        }
        Ok(allowed)
    }

    fn guard(&self, via_tunnel: bool) -> Result<&RouteGuard, Denial> {
        match (via_tunnel, &self.tunnel) {
            (false, _) => Ok(&self.host),
            (true, Some(t)) => Ok(&t.guard),
            (true, None) => Err(Denial::NotInternet),
        }
    }

    /// Where a flow [`Gate::decide`] allowed connects from: the host's
    /// namespace, or the tunnel's sockets; `None` (never the host) when it
    /// must use a tunnel that is not there.
    pub fn exit(&self, allowed: &super::policy::Allowed) -> Option<crate::net::netns::Exit> {
        use crate::net::netns::Exit;
        match (allowed.via_tunnel, &self.tunnel) {
            (false, _) => Some(Exit::Host),
            (true, Some(t)) => Some(Exit::Tunnel(std::sync::Arc::clone(&t.sockets))),
            (true, None) => {
                tracing::error!(
                    "flow to {} must use the tunnel, which is missing",
                    allowed.to
                );
                None
            }
        }
    }

    /// Whether a DNS answer may carry `ip` (see
    /// [`super::policy::Policy::answer_address`]).
    pub fn answer_allowed(&self, ip: IpAddr) -> bool {
        match self.policy.answer_address(ip) {
            Ok(true) => true,
            Ok(false) => self
                .guard(self.policy.net.tunnel.is_some())
                .and_then(|g| g.check(ip))
                .is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(a: [u8; 4]) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::from(a)))
    }

    #[test]
    fn only_the_default_next_hop_is_the_internet() {
        let defaults: HashSet<Hop> = [(2, v4([192, 168, 1, 1]))].into_iter().collect();
        let rule = Rule::DefaultRoute;
        let via = |oif, gateway| Route::Unicast { oif, gateway };
        // Through the default gateway.
        assert_eq!(
            judge(via(2, v4([192, 168, 1, 1])), &rule, &defaults),
            Ok(())
        );
        // On-link on the default route's interface: the LAN.
        assert_eq!(
            judge(via(2, None), &rule, &defaults),
            Err(Denial::NotInternet)
        );
        // Another gateway on the same link (a LAN router to 11.0.0.0/8).
        assert_eq!(
            judge(via(2, v4([192, 168, 1, 50])), &rule, &defaults),
            Err(Denial::NotInternet)
        );
        // Another interface (a VPN, a second NIC).
        assert_eq!(
            judge(via(7, None), &rule, &defaults),
            Err(Denial::NotInternet)
        );
        assert_eq!(
            judge(Route::Local, &rule, &defaults),
            Err(Denial::HostAddress)
        );
        assert_eq!(
            judge(Route::Broadcast, &rule, &defaults),
            Err(Denial::Multicast)
        );
        assert_eq!(
            judge(Route::Unreachable, &rule, &defaults),
            Err(Denial::NotInternet)
        );
        // No default route at all: nothing is the internet.
        assert_eq!(
            judge(via(2, v4([192, 168, 1, 1])), &rule, &HashSet::new()),
            Err(Denial::NotInternet)
        );
    }

    #[test]
    fn open_and_tunnel_rules() {
        let none = HashSet::new();
        let lan = Route::Unicast {
            oif: 3,
            gateway: None,
        };
        assert_eq!(judge(lan, &Rule::AnyUnicast, &none), Ok(()));
        assert_eq!(
            judge(Route::Local, &Rule::AnyUnicast, &none),
            Err(Denial::HostAddress)
        );
        assert_eq!(judge(lan, &Rule::NotVia(4), &none), Ok(()));
        assert_eq!(
            judge(lan, &Rule::NotVia(3), &none),
            Err(Denial::GuestNetwork)
        );
    }

    fn route(prefix: u8, kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix;
        m.header.kind = kind;
        m.attributes = attrs;
        m
    }

    #[test]
    fn default_hops_come_from_default_routes_only() {
        let gw = |a: [u8; 4]| RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::from(a)));
        let routes = vec![
            route(
                0,
                RouteType::Unicast,
                vec![RouteAttribute::Oif(2), gw([192, 168, 1, 1])],
            ),
            // A VPN's pair of /1 routes over a default.
            route(1, RouteType::Unicast, vec![RouteAttribute::Oif(9)]),
            // Specific routes and other kinds are not the way out.
            route(
                8,
                RouteType::Unicast,
                vec![RouteAttribute::Oif(2), gw([192, 168, 1, 50])],
            ),
            route(0, RouteType::Unreachable, vec![RouteAttribute::Oif(5)]),
        ];
        let hops = default_hops(&routes);
        let want: HashSet<Hop> = [(2, v4([192, 168, 1, 1])), (9, None)].into_iter().collect();
        assert_eq!(hops, want);
    }

    /// The real kernel, in this process's namespace: the loopback address
    /// is local, and whatever the lookup says for a public address is a
    /// definite answer (no panic, no error).
    #[test]
    fn kernel_lookup_of_a_local_address() {
        let Ok(mut s) = RouteSocket::new() else {
            return; // No netlink in this sandbox.
        };
        assert_eq!(s.get(Ipv4Addr::LOCALHOST.into()), Route::Local);
        let _ = s.get(Ipv4Addr::new(45, 20, 0, 10).into());
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            assert_eq!(s.get(std::net::Ipv6Addr::LOCALHOST.into()), Route::Local);
        }
        assert!(s.dump().is_ok());
    }
}
