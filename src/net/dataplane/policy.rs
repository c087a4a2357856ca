//! The egress policy: deny by default, pure and unit-tested.
//!
//! Given where the guest tried to go, [`Policy::decide`] says where the
//! supervisor connects on its behalf, or why not. The guest never gets a
//! route: every allowed flow is a new connection made by the supervisor.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, RwLock};

use crate::config::{Egress, NetRule, Proto};
use crate::net::plan::NetPlan;

/// Why a flow was refused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Denial {
    /// `egress = "none"`.
    EgressNone,
    /// A gateway port that no rule opens.
    GatewayPort,
    /// 127.0.0.0/8 and 0.0.0.0/8.
    Loopback,
    /// RFC 1918; for IPv6 unique local fc00::/7 and site-local fec0::/10.
    Private,
    /// 100.64.0.0/10.
    Cgnat,
    /// 169.254.0.0/16, cloud metadata included.
    LinkLocal,
    /// 224.0.0.0/4 and broadcast.
    Multicast,
    /// IETF reserved and documentation ranges, 240.0.0.0/4.
    Reserved,
    /// An address the host itself holds.
    HostAddress,
    /// The guest network itself (other VMs, the guest's own subnet).
    GuestNetwork,
    /// Not an address or name admitted by `allow_domains`.
    NotAllowedDomain,
    /// IPv6 while `ipv6` is off.
    Ipv6,
    /// More concurrent TCP connections than the proxy relays for one VM.
    TooManyConnections,
    /// The host reaches it, but not through its default route: an internal
    /// network, a VPN's routes, no route at all.
    NotInternet,
    /// A well-known cloud host endpoint (Azure's WireServer, metadata).
    CloudHost,
    /// UDP to port 443 (QUIC) with `allow_domains`: its names cannot be
    /// checked, and clients fall back to TCP.
    Quic,
    /// A guest packet from another source address than its lease
    /// (counted by nftables).
    SpoofedSource,
    /// A DNS question the gateway does not forward: zone transfers, ANY,
    /// local names, reverse names of private ranges.
    DnsQuery,
    /// With `allow_domains`: first bytes that start a TLS or HTTP request
    /// but cannot be read whole (split, too large, too slow, malformed).
    Uninspectable,
    /// A secret's placeholder in a request's URL.
    SecretInUrl,
    /// A secret's placeholder in a request's body or trailers.
    SecretInBody,
    /// A secret's placeholder to a host not listed for that secret.
    SecretNotForHost,
    /// A secret's placeholder in plain HTTP.
    SecretInClear,
    /// A secret's host whose server the host's trust store does not
    /// vouch for.
    UntrustedServer,
    /// On a connection for a secret's host, a request for another host.
    Misdirected,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::EgressNone => "egress-none",
            Denial::GatewayPort => "gateway-port",
            Denial::Loopback => "loopback",
            Denial::Private => "private",
            Denial::Cgnat => "cgnat",
            Denial::LinkLocal => "link-local",
            Denial::Multicast => "multicast",
            Denial::Reserved => "reserved",
            Denial::HostAddress => "host-address",
            Denial::GuestNetwork => "guest-network",
            Denial::NotAllowedDomain => "not-allowed-domain",
            Denial::Ipv6 => "ipv6",
            Denial::TooManyConnections => "too-many-connections",
            Denial::NotInternet => "not-internet",
            Denial::CloudHost => "cloud-host",
            Denial::Quic => "quic",
            Denial::Uninspectable => "uninspectable",
            Denial::DnsQuery => "dns-query",
            Denial::SpoofedSource => "spoofed-source",
            Denial::SecretInUrl => "secret-in-url",
            Denial::SecretInBody => "secret-in-body",
            Denial::SecretNotForHost => "secret-not-for-host",
            Denial::SecretInClear => "secret-in-clear",
            Denial::UntrustedServer => "untrusted-server",
            Denial::Misdirected => "misdirected-request",
        }
    }
}

/// Where the supervisor connects for an allowed flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub to: SocketAddr,
    /// A named hole (rules bypass `allow_domains`).
    pub hole: bool,
    /// Must leave through the WireGuard tunnel.
    pub via_tunnel: bool,
}

/// Hosts that clouds serve to every VM on public-looking addresses, which
/// admit traffic from the host itself: Azure's WireServer (and DNS), and
/// Alibaba Cloud's metadata service (inside CGNAT space, which
/// `egress = "open"` admits). 169.254.0.0/16 (AWS, GCP, Azure, Oracle
/// metadata) is link-local and refused as such.
pub const CLOUD_HOSTS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(168, 63, 129, 16),
    Ipv4Addr::new(100, 100, 100, 200),
];

/// The fixed address classes, in order of precedence.
pub fn classify(ip: Ipv4Addr) -> Option<Denial> {
    let o = ip.octets();
    let in_net = |net: [u8; 4], prefix: u8| {
        ipnet::Ipv4Net::new(Ipv4Addr::from(net), prefix).is_ok_and(|n| n.contains(&ip))
    };
    if o[0] == 0 || o[0] == 127 {
        Some(Denial::Loopback)
    } else if in_net([10, 0, 0, 0], 8)
        || in_net([172, 16, 0, 0], 12)
        || in_net([192, 168, 0, 0], 16)
    {
        Some(Denial::Private)
    } else if in_net([100, 64, 0, 0], 10) {
        Some(Denial::Cgnat)
    } else if in_net([169, 254, 0, 0], 16) {
        Some(Denial::LinkLocal)
    } else if ip.is_broadcast() || in_net([224, 0, 0, 0], 4) {
        Some(Denial::Multicast)
    } else if in_net([240, 0, 0, 0], 4)
        || in_net([192, 0, 0, 0], 24)
        || in_net([192, 0, 2, 0], 24)
        || in_net([198, 18, 0, 0], 15)
        || in_net([198, 51, 100, 0], 24)
        || in_net([203, 0, 113, 0], 24)
        || in_net([192, 88, 99, 0], 24)
    {
        Some(Denial::Reserved)
    } else {
        None
    }
}

/// What the fixed IPv6 classes say of an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class6 {
    /// A global unicast address.
    Public,
    /// One of the forms that carry an IPv4 address (NAT64, 6to4, Teredo):
    /// it is decided as each of these IPv4 addresses too.
    Embeds(Vec<Ipv4Addr>),
    Denied(Denial),
}

/// The fixed IPv6 address classes. Only global unicast 2000::/3 may be
/// public; within it documentation, benchmarking and ORCHID ranges are
/// reserved, and the transition forms embed an IPv4 address that the
/// IPv4 rules decide (a guest must not reach a LAN host as
/// `64:ff9b::c0a8:4d32`). IPv4-mapped addresses are not classed here:
/// the policy decides them as the IPv4 flow they are.
pub fn classify6(ip: Ipv6Addr) -> Class6 {
    let s = ip.segments();
    let o = ip.octets();
    let v4 = |b: [u8; 4]| Ipv4Addr::from(b);
    let in_net =
        |net: Ipv6Addr, prefix: u8| ipnet::Ipv6Net::new(net, prefix).is_ok_and(|n| n.contains(&ip));
    if ip.is_unspecified() || ip.is_loopback() {
        Class6::Denied(Denial::Loopback)
    } else if in_net(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
        Class6::Denied(Denial::LinkLocal)
    } else if in_net(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)
        || in_net(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10)
    {
        Class6::Denied(Denial::Private)
    } else if s[0] >> 8 == 0xff {
        Class6::Denied(Denial::Multicast)
    } else if in_net(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        Class6::Embeds(vec![v4([o[12], o[13], o[14], o[15]])])
    } else if in_net(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48) {
        // Local-use NAT64: the prefix length is the operator's; read it
        // both as a /48 (RFC 6052, around the reserved octet) and a /96.
        Class6::Embeds(vec![
            v4([o[6], o[7], o[9], o[10]]),
            v4([o[12], o[13], o[14], o[15]]),
        ])
    } else if s[0] == 0x2002 {
        Class6::Embeds(vec![v4([o[2], o[3], o[4], o[5]])])
    } else if in_net(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32) {
        // Teredo: the server's address, and the client's (inverted).
        Class6::Embeds(vec![
            v4([o[4], o[5], o[6], o[7]]),
            v4([!o[12], !o[13], !o[14], !o[15]]),
        ])
    } else if in_net(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32)
        || in_net(Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 0), 48)
        || in_net(Ipv6Addr::new(0x2001, 0x10, 0, 0, 0, 0, 0, 0), 28)
        || in_net(Ipv6Addr::new(0x2001, 0x20, 0, 0, 0, 0, 0, 0), 28)
        || in_net(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20)
        || !in_net(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3)
    {
        // Documentation, benchmarking, ORCHID, and everything outside
        // global unicast (discard 100::/64, IPv4-compatible ::/96 among
        // them).
        Class6::Denied(Denial::Reserved)
    } else {
        Class6::Public
    }
}

/// The host's own addresses, refreshed by the supervisor.
#[derive(Debug, Default, Clone)]
pub struct HostAddrs(Arc<RwLock<HashSet<IpAddr>>>);

impl HostAddrs {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.read().map(|s| s.contains(&ip)).unwrap_or(true)
    }
    /// Re-read the host's addresses; on an error keep the last good set
    /// (never fail open). Returns whether it changed.
    pub fn refresh(&self) -> bool {
        match HostAddrs::read_host() {
            Ok(now) => self.replace(now),
            Err(e) => {
                tracing::warn!("cannot read the host's addresses (keeping the last): {e}");
                false
            }
        }
    }
    /// Replace the set; returns whether it changed.
    pub fn replace(&self, new: HashSet<IpAddr>) -> bool {
        match self.0.write() {
            Ok(mut s) if *s != new => {
                *s = new;
                true
            }
            _ => false,
        }
    }
    /// Read every address of every interface of the current namespace.
    pub fn read_host() -> Result<HashSet<IpAddr>, nix::Error> {
        nix::ifaddrs::getifaddrs().map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
    }
}

/// Decides what the guest may reach.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The VM's network: its egress, holes, subnet and gateway; with
    /// `ipv6 = true` its IPv6 network (otherwise every IPv6 flow is
    /// refused); in WireGuard mode, flows that are not named holes use the
    /// tunnel.
    pub net: NetPlan,
    pub host: HostAddrs,
    /// With `allow_domains`: addresses its DNS answers admitted.
    pub domains: Option<super::domains::Allowlist>,
}

impl Policy {
    /// A named `allow-lan-host` hole for `ip` (with its via-tunnel mark);
    /// never one of the host's own addresses, which `up` refuses too.
    fn lan_hole(&self, ip: IpAddr) -> Result<Option<bool>, Denial> {
        let hole = self.net.rules.iter().find_map(|r| match r {
            NetRule::AllowLanHost { addr, via_tunnel } if *addr == ip => Some(*via_tunnel),
            _ => None,
        });
        if hole.is_some() {
            self.not_the_host(ip)?;
        }
        Ok(hole)
    }

    /// Every hole but `allow-host-port` (whose one target is the host's
    /// loopback port it names) must not open the host: not one of its
    /// addresses, not loopback, not the unspecified address (which a
    /// connect turns into the host).
    fn not_the_host(&self, ip: IpAddr) -> Result<(), Denial> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.host.contains(ip) || ip.is_loopback() || ip.is_unspecified() {
            return Err(Denial::HostAddress);
        }
        Ok(())
    }

    /// The address rules for a flow that is not a hole: cloud host
    /// endpoints, the fixed classes, the host's own addresses.
    fn classify_public(&self, ip: Ipv4Addr) -> Result<(), Denial> {
        if CLOUD_HOSTS.contains(&ip) {
            return Err(Denial::CloudHost);
        }
        match classify(ip) {
            // The original's NETWORK_ISOLATION=false: the LAN is open, the
            // host itself still is not.
            Some(Denial::Private | Denial::Cgnat) if self.net.egress == Egress::Open => {}
            Some(d) => return Err(d),
            None => {}
        }
        if self.host.contains(IpAddr::V4(ip)) {
            return Err(Denial::HostAddress);
        }
        Ok(())
    }

    /// The same for an IPv6 address (IPv4-mapped ones are decided as
    /// IPv4 before this): the fixed classes, the IPv4 rules for every
    /// IPv4 address it embeds, the host's own addresses.
    fn classify_public6(&self, ip: Ipv6Addr) -> Result<(), Denial> {
        match classify6(ip) {
            Class6::Public => {}
            Class6::Embeds(inner) => {
                for v4 in inner {
                    self.classify_public(v4)?;
                }
            }
            Class6::Denied(Denial::Private) if self.net.egress == Egress::Open => {}
            Class6::Denied(d) => return Err(d),
        }
        if self.host.contains(IpAddr::V6(ip)) {
            return Err(Denial::HostAddress);
        }
        Ok(())
    }

    /// Whether a DNS answer may tell the guest about `ip`: an address the
    /// guest could be allowed to reach (before the route rule, which
    /// [`super::route::Gate`] adds), or a named LAN hole. Answers that
    /// name the host, the LAN or reserved space are dropped, so that a
    /// split-horizon name tells the guest nothing internal.
    pub fn answer_address(&self, ip: IpAddr) -> Result<bool, Denial> {
        let ip = match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => {
                    let net6 = self.net.net6.ok_or(Denial::Ipv6)?;
                    if net6.contains(v6) {
                        return Err(Denial::GuestNetwork);
                    }
                    if self.lan_hole(IpAddr::V6(v6))?.is_some() {
                        return Ok(true);
                    }
                    return self.classify_public6(v6).map(|()| false);
                }
            },
        };
        if self.in_subnet(ip) {
            return Err(Denial::GuestNetwork);
        }
        if self.lan_hole(IpAddr::V4(ip))?.is_some() {
            return Ok(true);
        }
        self.classify_public(ip).map(|()| false)
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        self.net.subnet.contains(&ip)
    }

    /// The decision for a guest flow to `dst`.
    pub fn decide(&self, proto: Proto, dst: SocketAddr) -> Result<Allowed, Denial> {
        match dst {
            SocketAddr::V4(d) => self.decide4(proto, d),
            SocketAddr::V6(d) => match d.ip().to_ipv4_mapped() {
                // An IPv4-mapped destination is an IPv4 flow.
                Some(v4) => self.decide4(proto, SocketAddrV4::new(v4, d.port())),
                None => self.decide6(proto, *d.ip(), d.port()),
            },
        }
    }

    fn decide6(&self, proto: Proto, ip: Ipv6Addr, port: u16) -> Result<Allowed, Denial> {
        let net6 = self.net.net6.ok_or(Denial::Ipv6)?;
        if ip == net6.gateway {
            // The gateway's IPv6 address opens the same holes as its IPv4
            // one.
            return self.gateway_hole(proto, port);
        }
        if net6.contains(ip) {
            return Err(Denial::GuestNetwork);
        }
        let to = SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0));
        if let Some(via_tunnel) = self.lan_hole(IpAddr::V6(ip))? {
            return Ok(Allowed {
                to,
                hole: true,
                via_tunnel,
            });
        }
        if self.net.egress == Egress::None {
            return Err(Denial::EgressNone);
        }
        self.classify_public6(ip)?;
        self.domains_admit(proto, IpAddr::V6(ip), port)?;
        Ok(Allowed {
            to,
            hole: false,
            via_tunnel: self.net.tunnel.is_some(),
        })
    }

    /// With `allow_domains`: QUIC is refused, and anything else needs an
    /// address its DNS answers admitted.
    fn domains_admit(&self, proto: Proto, ip: IpAddr, port: u16) -> Result<(), Denial> {
        if let Some(list) = &self.domains {
            if proto == Proto::Udp && port == 443 {
                return Err(Denial::Quic);
            }
            if !list.admits_addr(ip) {
                return Err(Denial::NotAllowedDomain);
            }
        }
        Ok(())
    }

    /// What a rule opens on the gateway's `port`, if any.
    fn gateway_hole(&self, proto: Proto, port: u16) -> Result<Allowed, Denial> {
        for r in &self.net.rules {
            match *r {
                NetRule::AllowHostPort { proto: p, port: hp } if p == proto && hp == port => {
                    return Ok(Allowed {
                        to: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, hp)),
                        hole: true,
                        via_tunnel: false,
                    });
                }
                NetRule::ForwardPort {
                    proto: p,
                    guest_port,
                    target,
                    via_tunnel,
                } if p == proto && guest_port == port => {
                    self.not_the_host(target.ip())?;
                    return Ok(Allowed {
                        to: target,
                        hole: true,
                        via_tunnel,
                    });
                }
                _ => {}
            }
        }
        Err(Denial::GatewayPort)
    }

    fn decide4(&self, proto: Proto, dst: SocketAddrV4) -> Result<Allowed, Denial> {
        let ip = *dst.ip();
        let port = dst.port();
        if ip == self.net.gateway {
            return self.gateway_hole(proto, port);
        }
        if self.in_subnet(ip) {
            return Err(Denial::GuestNetwork);
        }
        if let Some(via_tunnel) = self.lan_hole(IpAddr::V4(ip))? {
            return Ok(Allowed {
                to: SocketAddr::V4(dst),
                hole: true,
                via_tunnel,
            });
        }
        if self.net.egress == Egress::None {
            return Err(Denial::EgressNone);
        }
        self.classify_public(ip)?;
        self.domains_admit(proto, IpAddr::V4(ip), port)?;
        // With WireGuard, everything that is not a named hole leaves
        // through the tunnel.
        Ok(Allowed {
            to: SocketAddr::V4(dst),
            hole: false,
            via_tunnel: self.net.tunnel.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(egress: Egress, rules: Vec<NetRule>) -> Policy {
        let host = HostAddrs::default();
        host.replace(
            [
                IpAddr::V4(Ipv4Addr::new(45, 1, 2, 3)),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ]
            .into_iter()
            .collect(),
        );
        Policy {
            net: crate::net::plan::tests::plan(egress, rules),
            host,
            domains: None,
        }
    }

    fn to(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    #[test]
    fn public_addresses_are_reached_directly() {
        let p = policy(Egress::Direct, vec![]);
        let d = p.decide(Proto::Tcp, to([93, 184, 216, 34], 443));
        assert_eq!(
            d.map(|a| a.to),
            Ok("93.184.216.34:443"
                .parse()
                .unwrap_or_else(|e| panic!("{e}")))
        );
    }

    #[test]
    fn every_private_class_is_refused() {
        let p = policy(Egress::Direct, vec![]);
        let cases: [([u8; 4], Denial); 14] = [
            ([127, 0, 0, 1], Denial::Loopback),
            ([0, 0, 0, 0], Denial::Loopback),
            ([10, 1, 2, 3], Denial::Private),
            ([172, 31, 255, 1], Denial::Private),
            ([192, 168, 1, 50], Denial::Private),
            ([100, 64, 0, 6], Denial::Cgnat),
            ([169, 254, 169, 254], Denial::LinkLocal),
            ([224, 0, 0, 251], Denial::Multicast),
            ([255, 255, 255, 255], Denial::Multicast),
            ([240, 0, 0, 1], Denial::Reserved),
            ([198, 51, 100, 7], Denial::Reserved),
            ([45, 1, 2, 3], Denial::HostAddress),
            ([10, 0, 2, 99], Denial::GuestNetwork),
            ([10, 0, 2, 2], Denial::GatewayPort),
        ];
        for (ip, want) in cases {
            assert_eq!(p.decide(Proto::Tcp, to(ip, 80)), Err(want), "{ip:?}");
        }
        // Just outside the private ranges.
        for ip in [
            [172, 32, 0, 1],
            [100, 128, 0, 1],
            [11, 0, 0, 1],
            [192, 169, 0, 1],
        ] {
            assert!(p.decide(Proto::Tcp, to(ip, 80)).is_ok(), "{ip:?}");
        }
    }

    #[test]
    fn egress_none_blocks_everything_but_holes() {
        let p = policy(
            Egress::None,
            vec![NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port: 8080,
            }],
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([93, 184, 216, 34], 443)),
            Err(Denial::EgressNone)
        );
        assert!(p.decide(Proto::Tcp, to([10, 0, 2, 2], 8080)).is_ok());
    }

    #[test]
    fn holes_open_exactly_their_port_or_host() {
        let p = policy(
            Egress::Direct,
            vec![
                NetRule::AllowHostPort {
                    proto: Proto::Tcp,
                    port: 8080,
                },
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                    via_tunnel: false,
                },
                NetRule::ForwardPort {
                    proto: Proto::Tcp,
                    guest_port: 8081,
                    target: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 5), 80).into(),
                    via_tunnel: false,
                },
            ],
        );
        let host = p.decide(Proto::Tcp, to([10, 0, 2, 2], 8080)).map(|a| a.to);
        assert_eq!(
            host,
            Ok("127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(
            p.decide(Proto::Udp, to([10, 0, 2, 2], 8080)),
            Err(Denial::GatewayPort)
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([10, 0, 2, 2], 8082)),
            Err(Denial::GatewayPort)
        );
        let fwd = p.decide(Proto::Tcp, to([10, 0, 2, 2], 8081)).map(|a| a.to);
        assert_eq!(
            fwd,
            Ok("10.0.0.5:80".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([10, 0, 0, 5], 80)),
            Err(Denial::Private)
        );
        assert!(p.decide(Proto::Tcp, to([192, 168, 1, 50], 22)).is_ok());
        assert!(p.decide(Proto::Udp, to([192, 168, 1, 50], 5353)).is_ok());
        assert_eq!(
            p.decide(Proto::Tcp, to([192, 168, 1, 51], 22)),
            Err(Denial::Private)
        );
    }

    #[test]
    fn open_mode_admits_the_lan_but_not_the_host() {
        let p = policy(Egress::Open, vec![]);
        assert!(p.decide(Proto::Tcp, to([192, 168, 1, 9], 80)).is_ok());
        assert_eq!(
            p.decide(Proto::Tcp, to([127, 0, 0, 1], 80)),
            Err(Denial::Loopback)
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([45, 1, 2, 3], 80)),
            Err(Denial::HostAddress)
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([169, 254, 169, 254], 80)),
            Err(Denial::LinkLocal)
        );
    }

    #[test]
    fn with_a_tunnel_only_marked_holes_use_it() {
        let mut p = policy(
            Egress::Direct,
            vec![
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                    via_tunnel: false,
                },
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(192, 168, 1, 51).into(),
                    via_tunnel: true,
                },
                NetRule::ForwardPort {
                    proto: Proto::Tcp,
                    guest_port: 8081,
                    target: SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 6), 80).into(),
                    via_tunnel: true,
                },
                NetRule::AllowHostPort {
                    proto: Proto::Tcp,
                    port: 8080,
                },
            ],
        );
        p.net.tunnel = Some(crate::net::plan::Tunnel {
            iface: "wg0".into(),
            dns: Vec::new(),
        });
        let via = |ip: [u8; 4], port| p.decide(Proto::Tcp, to(ip, port)).map(|a| a.via_tunnel);
        assert_eq!(via([93, 184, 216, 34], 443), Ok(true));
        assert_eq!(via([192, 168, 1, 50], 80), Ok(false));
        assert_eq!(via([192, 168, 1, 51], 80), Ok(true));
        assert_eq!(via([10, 0, 2, 2], 8081), Ok(true));
        assert_eq!(via([10, 0, 2, 2], 8080), Ok(false));
        // The policy still refuses inside the tunnel.
        assert_eq!(via([192, 168, 1, 52], 80), Err(Denial::Private));
        assert_eq!(via([45, 1, 2, 3], 80), Err(Denial::HostAddress));
        p.net.tunnel = None;
        let via = |ip: [u8; 4], port| p.decide(Proto::Tcp, to(ip, port)).map(|a| a.via_tunnel);
        assert_eq!(via([93, 184, 216, 34], 443), Ok(false));
    }
    #[test]
    fn cloud_hosts_quic_and_holes_to_the_host() {
        let mut p = policy(
            Egress::Open,
            vec![
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(45, 1, 2, 3).into(),
                    via_tunnel: false,
                },
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(127, 0, 0, 1).into(),
                    via_tunnel: false,
                },
            ],
        );
        for ip in CLOUD_HOSTS {
            assert_eq!(
                p.decide(Proto::Tcp, SocketAddr::from((ip, 80))),
                Err(Denial::CloudHost)
            );
        }
        // A hole never opens the host, even when the host's address
        // appears after `up` checked the rules.
        assert_eq!(
            p.decide(Proto::Tcp, to([45, 1, 2, 3], 22)),
            Err(Denial::HostAddress)
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([127, 0, 0, 1], 22)),
            Err(Denial::HostAddress)
        );
        // Nor does a forward: to one of the host's addresses, loopback, the
        // unspecified address or their IPv4-mapped forms, whatever port.
        for (port, target) in [
            (8001, "45.1.2.3:80"),
            (8002, "127.0.0.1:80"),
            (8003, "0.0.0.0:80"),
            (8004, "[::ffff:45.1.2.3]:80"),
            (8005, "[::1]:80"),
        ] {
            p.net.rules.push(NetRule::ForwardPort {
                proto: Proto::Tcp,
                guest_port: port,
                target: target.parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false,
            });
            assert_eq!(
                p.decide(Proto::Tcp, to([10, 0, 2, 2], port)),
                Err(Denial::HostAddress),
                "{target}"
            );
        }
        // QUIC only with allow_domains; other UDP needs an admitted address.
        assert!(p.decide(Proto::Udp, to([93, 184, 216, 34], 443)).is_ok());
        let list = super::super::domains::Allowlist::new(&["ok.example".into()]);
        list.learn("ok.example", Ipv4Addr::new(93, 184, 216, 34), 60);
        p.domains = Some(list);
        assert_eq!(
            p.decide(Proto::Udp, to([93, 184, 216, 34], 443)),
            Err(Denial::Quic)
        );
        assert!(p.decide(Proto::Udp, to([93, 184, 216, 34], 4433)).is_ok());
        assert!(p.decide(Proto::Tcp, to([93, 184, 216, 34], 443)).is_ok());
        assert_eq!(
            p.decide(Proto::Udp, to([93, 184, 216, 35], 4433)),
            Err(Denial::NotAllowedDomain)
        );
    }

    #[test]
    fn answers_carry_only_reachable_addresses() {
        let p = policy(
            Egress::Direct,
            vec![NetRule::AllowLanHost {
                addr: Ipv4Addr::new(192, 168, 1, 50).into(),
                via_tunnel: false,
            }],
        );
        let a = |ip: [u8; 4]| p.answer_address(Ipv4Addr::from(ip).into());
        assert_eq!(a([93, 184, 216, 34]), Ok(false));
        assert_eq!(a([192, 168, 1, 50]), Ok(true));
        assert_eq!(a([192, 168, 1, 51]), Err(Denial::Private));
        assert_eq!(a([45, 1, 2, 3]), Err(Denial::HostAddress));
        assert_eq!(a([10, 0, 2, 15]), Err(Denial::GuestNetwork));
        assert_eq!(a([168, 63, 129, 16]), Err(Denial::CloudHost));
    }

    fn v6(p: &Policy, ip: &str, port: u16) -> Result<Allowed, Denial> {
        let ip: Ipv6Addr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        p.decide(Proto::Tcp, SocketAddr::from((ip, port)))
    }

    fn with_ipv6(egress: Egress) -> Policy {
        let mut p = policy(egress, vec![]);
        p.net.net6 = Some(crate::config::Net6::standard());
        let mut host: HashSet<IpAddr> = HashSet::new();
        host.insert("2a0a:1000::1".parse().unwrap_or_else(|e| panic!("{e}")));
        host.insert(IpAddr::V4(Ipv4Addr::new(45, 1, 2, 3)));
        p.host.replace(host);
        p
    }

    #[test]
    fn ipv6_is_refused_unless_enabled() {
        let p = policy(Egress::Direct, vec![]);
        assert_eq!(v6(&p, "2a0a:2000::10", 80), Err(Denial::Ipv6));
        assert_eq!(
            p.answer_address("2a0a:2000::10".parse().unwrap_or_else(|e| panic!("{e}"))),
            Err(Denial::Ipv6)
        );
    }

    #[test]
    fn ipv6_reaches_global_unicast_only() {
        let p = with_ipv6(Egress::Direct);
        assert_eq!(
            v6(&p, "2a0a:2000::10", 443).map(|a| a.to),
            Ok("[2a0a:2000::10]:443"
                .parse()
                .unwrap_or_else(|e| panic!("{e}")))
        );
        let cases = [
            ("::", Denial::Loopback),
            ("::1", Denial::Loopback),
            ("fe80::1", Denial::LinkLocal),
            ("fd12::5", Denial::Private),
            ("fc00::1", Denial::Private),
            ("fec0::1", Denial::Private),
            ("ff02::1", Denial::Multicast),
            ("ff05::1:3", Denial::Multicast),
            ("2001:db8::1", Denial::Reserved),
            ("100::1", Denial::Reserved),
            ("::10.1.2.3", Denial::Reserved),
            ("4000::1", Denial::Reserved),
            ("2a0a:1000::1", Denial::HostAddress),
            ("fd6d:6967:7261:6e74::99", Denial::GuestNetwork),
            ("fd6d:6967:7261:6e74::2", Denial::GatewayPort),
        ];
        for (ip, want) in cases {
            assert_eq!(v6(&p, ip, 80), Err(want), "{ip}");
        }
    }

    /// Every form that carries an IPv4 address is decided as that
    /// address: a LAN host is not reachable through NAT64, 6to4, Teredo
    /// or an IPv4-mapped address; a public one is.
    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_decided_as_ipv4() {
        let p = with_ipv6(Egress::Direct);
        for (ip, want) in [
            ("64:ff9b::c0a8:4d32", Denial::Private),
            ("64:ff9b::7f00:1", Denial::Loopback),
            ("64:ff9b:1:c0a8:4d:3200::", Denial::Private),
            // Local-use NAT64 is read as a /48 and as a /96: both must pass.
            ("64:ff9b:1:5db8:d8:2200:a9fe:a9fe", Denial::LinkLocal),
            ("64:ff9b:1::5db8:d822", Denial::Loopback),
            ("2002:c0a8:4d32::1", Denial::Private),
            ("2002:2d01:0203::1", Denial::HostAddress),
            // Teredo: server 192.168.77.50, client anything.
            ("2001:0:c0a8:4d32::1", Denial::Private),
            // Teredo: the client 10.0.0.1, inverted in the last 32 bits.
            ("2001:0:5db8:d822:0:0:f5ff:fffe", Denial::Private),
            ("::ffff:192.168.77.50", Denial::Private),
            ("::ffff:127.0.0.1", Denial::Loopback),
            ("64:ff9b::a83f:8110", Denial::CloudHost),
        ] {
            assert_eq!(v6(&p, ip, 80), Err(want), "{ip}");
        }
        // Public IPv4 inside: allowed, and a mapped address is an IPv4 flow.
        assert!(v6(&p, "64:ff9b::5db8:d822", 80).is_ok());
        assert_eq!(
            v6(&p, "::ffff:93.184.216.34", 80).map(|a| a.to),
            Ok("93.184.216.34:80".parse().unwrap_or_else(|e| panic!("{e}")))
        );
    }

    #[test]
    fn ipv6_follows_egress_and_allow_domains() {
        let mut p = with_ipv6(Egress::Open);
        // Open admits the LAN (ULA), never the host or link-local.
        assert!(v6(&p, "fd12::5", 80).is_ok());
        assert_eq!(v6(&p, "fe80::1", 80), Err(Denial::LinkLocal));
        assert_eq!(v6(&p, "2a0a:1000::1", 80), Err(Denial::HostAddress));
        p.net.egress = Egress::None;
        assert_eq!(v6(&p, "2a0a:2000::10", 80), Err(Denial::EgressNone));
        p.net.egress = Egress::Direct;
        let list = super::super::domains::Allowlist::new(&["ok.example".into()]);
        let ok: Ipv6Addr = "2a0a:2000::10".parse().unwrap_or_else(|e| panic!("{e}"));
        list.learn("ok.example", ok, 60);
        p.domains = Some(list);
        assert!(v6(&p, "2a0a:2000::10", 443).is_ok());
        assert_eq!(v6(&p, "2a0a:2000::11", 443), Err(Denial::NotAllowedDomain));
        assert_eq!(
            p.decide(Proto::Udp, SocketAddr::from((ok, 443))),
            Err(Denial::Quic)
        );
        // Answers: public IPv6 yes, the host, ULA and mapped LAN no.
        let a = |ip: &str| p.answer_address(ip.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(a("2a0a:2000::10"), Ok(false));
        assert_eq!(a("2a0a:1000::1"), Err(Denial::HostAddress));
        assert_eq!(a("fd12::5"), Err(Denial::Private));
        assert_eq!(a("::ffff:10.0.0.1"), Err(Denial::Private));
        assert_eq!(a("64:ff9b::a00:1"), Err(Denial::Private));
    }

    #[test]
    fn ipv6_holes_open_exactly_their_host() {
        let mut p = with_ipv6(Egress::Direct);
        p.net.rules = vec![
            NetRule::AllowLanHost {
                addr: "fd12::5".parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false,
            },
            NetRule::AllowLanHost {
                addr: "2a0a:1000::1".parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false,
            },
            NetRule::ForwardPort {
                proto: Proto::Tcp,
                guest_port: 8081,
                target: "[fd12::5]:80".parse().unwrap_or_else(|e| panic!("{e}")),
                via_tunnel: false,
            },
        ];
        assert_eq!(v6(&p, "fd12::5", 22).map(|a| a.hole), Ok(true));
        assert_eq!(v6(&p, "fd12::6", 22), Err(Denial::Private));
        // Never the host, whatever a rule says.
        assert_eq!(v6(&p, "2a0a:1000::1", 22), Err(Denial::HostAddress));
        // The forward, from either gateway address.
        let fwd: SocketAddr = "[fd12::5]:80".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v6(&p, "fd6d:6967:7261:6e74::2", 8081).map(|a| a.to),
            Ok(fwd)
        );
        assert_eq!(
            p.decide(Proto::Tcp, to([10, 0, 2, 2], 8081)).map(|a| a.to),
            Ok(fwd)
        );
        let a = |ip: &str| p.answer_address(ip.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(a("fd12::5"), Ok(true));
    }
}
