//! The egress policy: deny by default, pure and unit-tested.
//!
//! Given where the guest tried to go, [`Policy::decide`] says where the
//! supervisor connects on its behalf, or why not. The guest never gets a
//! route: every allowed flow is a new connection made by the supervisor.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use crate::config::{Egress, NetRule, Proto};

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
    /// RFC 1918.
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
    /// IPv6 (no IPv6 egress in this version).
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
    pub egress: Egress,
    pub gateway: Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    pub rules: Vec<NetRule>,
    pub host: HostAddrs,
    /// With `allow_domains`: addresses its DNS answers admitted.
    pub domains: Option<super::domains::Allowlist>,
    /// WireGuard mode: flows that are not named holes use the tunnel.
    pub tunnel: bool,
}

impl Policy {
    /// A named `allow-lan-host` hole for `ip` (with its via-tunnel mark);
    /// never one of the host's own addresses, which `up` refuses too.
    fn lan_hole(&self, ip: Ipv4Addr) -> Result<Option<bool>, Denial> {
        let hole = self.rules.iter().find_map(|r| match r {
            NetRule::AllowLanHost { addr, via_tunnel } if *addr == ip => Some(*via_tunnel),
            _ => None,
        });
        if hole.is_some() && (self.host.contains(IpAddr::V4(ip)) || ip.is_loopback()) {
            return Err(Denial::HostAddress);
        }
        Ok(hole)
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
            Some(Denial::Private | Denial::Cgnat) if self.egress == Egress::Open => {}
            Some(d) => return Err(d),
            None => {}
        }
        if self.host.contains(IpAddr::V4(ip)) {
            return Err(Denial::HostAddress);
        }
        Ok(())
    }

    /// Whether a DNS answer may tell the guest about `ip`: an address the
    /// guest could be allowed to reach (before the route rule, which
    /// [`super::route::Gate`] adds), or a named LAN hole. Answers that
    /// name the host, the LAN or reserved space are dropped, so that a
    /// split-horizon name tells the guest nothing internal.
    pub fn answer_address(&self, ip: Ipv4Addr) -> Result<bool, Denial> {
        if self.in_subnet(ip) {
            return Err(Denial::GuestNetwork);
        }
        if self.lan_hole(ip)?.is_some() {
            return Ok(true);
        }
        self.classify_public(ip).map(|()| false)
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        self.subnet.contains(&ip)
    }

    /// The decision for a guest flow to `dst`.
    pub fn decide(&self, proto: Proto, dst: SocketAddrV4) -> Result<Allowed, Denial> {
        let ip = *dst.ip();
        let port = dst.port();
        if ip == self.gateway {
            for r in &self.rules {
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
                        return Ok(Allowed {
                            to: SocketAddr::V4(target),
                            hole: true,
                            via_tunnel,
                        });
                    }
                    _ => {}
                }
            }
            return Err(Denial::GatewayPort);
        }
        if self.in_subnet(ip) {
            return Err(Denial::GuestNetwork);
        }
        if let Some(via_tunnel) = self.lan_hole(ip)? {
            return Ok(Allowed {
                to: SocketAddr::V4(dst),
                hole: true,
                via_tunnel,
            });
        }
        if self.egress == Egress::None {
            return Err(Denial::EgressNone);
        }
        self.classify_public(ip)?;
        if let Some(list) = &self.domains {
            if proto == Proto::Udp && port == 443 {
                return Err(Denial::Quic);
            }
            if !list.admits_addr(ip) {
                return Err(Denial::NotAllowedDomain);
            }
        }
        // With WireGuard, everything that is not a named hole leaves
        // through the tunnel.
        Ok(Allowed {
            to: SocketAddr::V4(dst),
            hole: false,
            via_tunnel: self.tunnel,
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
            egress,
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            subnet: ipnet::Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 2, 0), 24),
            rules,
            host,
            domains: None,
            tunnel: false,
        }
    }

    fn to(a: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(a), port)
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
                    addr: Ipv4Addr::new(192, 168, 1, 50),
                    via_tunnel: false,
                },
                NetRule::ForwardPort {
                    proto: Proto::Tcp,
                    guest_port: 8081,
                    target: to([10, 0, 0, 5], 80),
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
                    addr: Ipv4Addr::new(192, 168, 1, 50),
                    via_tunnel: false,
                },
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(192, 168, 1, 51),
                    via_tunnel: true,
                },
                NetRule::ForwardPort {
                    proto: Proto::Tcp,
                    guest_port: 8081,
                    target: SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 6), 80),
                    via_tunnel: true,
                },
                NetRule::AllowHostPort {
                    proto: Proto::Tcp,
                    port: 8080,
                },
            ],
        );
        p.tunnel = true;
        let via = |ip: [u8; 4], port| {
            p.decide(Proto::Tcp, SocketAddrV4::new(Ipv4Addr::from(ip), port))
                .map(|a| a.via_tunnel)
        };
        assert_eq!(via([93, 184, 216, 34], 443), Ok(true));
        assert_eq!(via([192, 168, 1, 50], 80), Ok(false));
        assert_eq!(via([192, 168, 1, 51], 80), Ok(true));
        assert_eq!(via([10, 0, 2, 2], 8081), Ok(true));
        assert_eq!(via([10, 0, 2, 2], 8080), Ok(false));
        // The policy still refuses inside the tunnel.
        assert_eq!(via([192, 168, 1, 52], 80), Err(Denial::Private));
        assert_eq!(via([45, 1, 2, 3], 80), Err(Denial::HostAddress));
        p.tunnel = false;
        let via = |ip: [u8; 4], port| {
            p.decide(Proto::Tcp, SocketAddrV4::new(Ipv4Addr::from(ip), port))
                .map(|a| a.via_tunnel)
        };
        assert_eq!(via([93, 184, 216, 34], 443), Ok(false));
    }
    #[test]
    fn cloud_hosts_quic_and_holes_to_the_host() {
        let mut p = policy(
            Egress::Open,
            vec![
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(45, 1, 2, 3),
                    via_tunnel: false,
                },
                NetRule::AllowLanHost {
                    addr: Ipv4Addr::new(127, 0, 0, 1),
                    via_tunnel: false,
                },
            ],
        );
        for ip in CLOUD_HOSTS {
            assert_eq!(
                p.decide(Proto::Tcp, SocketAddrV4::new(ip, 80)),
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
                addr: Ipv4Addr::new(192, 168, 1, 50),
                via_tunnel: false,
            }],
        );
        let a = |ip: [u8; 4]| p.answer_address(Ipv4Addr::from(ip));
        assert_eq!(a([93, 184, 216, 34]), Ok(false));
        assert_eq!(a([192, 168, 1, 50]), Ok(true));
        assert_eq!(a([192, 168, 1, 51]), Err(Denial::Private));
        assert_eq!(a([45, 1, 2, 3]), Err(Denial::HostAddress));
        assert_eq!(a([10, 0, 2, 15]), Err(Denial::GuestNetwork));
        assert_eq!(a([168, 63, 129, 16]), Err(Denial::CloudHost));
    }
}
