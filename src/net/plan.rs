//! The VM's network, projected once from the validated config: the
//! namespace's addresses and ruleset ([`super::setup`], [`super::nft`]),
//! the dataplane's servers and policy, and the tunnel's DNS are all built
//! from this one value, which the supervisor hands to the dataplane as it
//! is. Pure data: nothing here touches the system.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Egress, Net6, NetRule, Proto};

/// The TPROXY listener ports inside the VM's namespace (nothing else
/// listens there): the ruleset diverts to them, the supervisor binds
/// them, the dataplane serves them.
pub const PROXY_TCP_PORT: u16 = 15001;
pub const PROXY_UDP_PORT: u16 = 15002;

/// WireGuard mode, as the network sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// The TUN inside the namespace: only answers to the namespace's own
    /// connections come in from it.
    pub iface: String,
    /// The tunnel's DNS servers, queried through it; empty: the host's
    /// resolvers answer.
    pub dns: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetPlan {
    pub gateway: Ipv4Addr,
    /// The guest's leased address: the only source it may send from.
    pub guest: Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    /// With `ipv6 = true`: the guest's IPv6 network; otherwise every IPv6
    /// packet from the guest is dropped.
    pub net6: Option<Net6>,
    pub egress: Egress,
    pub rules: Vec<NetRule>,
    pub allow_domains: Vec<String>,
    pub tunnel: Option<Tunnel>,
    /// DNS servers the resolver forwards to; empty: local names only.
    pub upstreams: Vec<SocketAddr>,
}

impl NetPlan {
    /// The network of `cfg`; `tunnel` in WireGuard mode; `host_resolvers`
    /// answer the guest's DNS unless the tunnel names servers of its own
    /// (and nobody does when nothing may leave).
    pub fn of(cfg: &Config, tunnel: Option<Tunnel>, host_resolvers: Vec<SocketAddr>) -> NetPlan {
        let upstreams = match &tunnel {
            _ if cfg.network.egress == Egress::None => Vec::new(),
            Some(t) if !t.dns.is_empty() => {
                t.dns.iter().map(|ip| SocketAddr::from((*ip, 53))).collect()
            }
            _ => host_resolvers,
        };
        NetPlan {
            gateway: cfg.gateway_ip(),
            guest: cfg.guest_ip(),
            subnet: cfg.network.subnet,
            net6: cfg.net6(),
            egress: cfg.network.egress,
            rules: cfg.network.rules.clone(),
            allow_domains: cfg.network.allow_domains.clone(),
            tunnel,
            upstreams,
        }
    }

    /// The proxy runs unless nothing at all may leave.
    pub fn proxied(&self) -> bool {
        self.egress != Egress::None || !self.rules.is_empty()
    }

    /// Gateway TCP ports that named holes open (a connection to any other
    /// gateway port is refused before any handshake).
    pub fn gateway_tcp_holes(&self) -> Vec<u16> {
        self.rules
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
            .collect()
    }

    /// The guest's DNS leaves through the tunnel (its servers answer).
    pub fn dns_via_tunnel(&self) -> bool {
        self.tunnel.as_ref().is_some_and(|t| !t.dns.is_empty())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A plan for unit tests: the default subnet, `egress`, `rules`.
    pub(crate) fn plan(egress: Egress, rules: Vec<NetRule>) -> NetPlan {
        NetPlan {
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            guest: Ipv4Addr::new(10, 0, 2, 15),
            subnet: "10.0.2.0/24".parse().unwrap_or_else(|e| panic!("{e}")),
            net6: None,
            egress,
            rules,
            allow_domains: Vec::new(),
            tunnel: None,
            upstreams: Vec::new(),
        }
    }

    #[test]
    fn holes_and_proxy() {
        let p = plan(
            Egress::None,
            vec![
                NetRule::AllowHostPort {
                    proto: Proto::Tcp,
                    port: 8080,
                },
                NetRule::AllowHostPort {
                    proto: Proto::Udp,
                    port: 53,
                },
            ],
        );
        assert!(p.proxied(), "a hole needs the proxy even with egress none");
        assert_eq!(p.gateway_tcp_holes(), vec![8080]);
        assert!(!plan(Egress::None, Vec::new()).proxied());
    }

    #[test]
    fn dns_goes_where_the_tunnel_says() {
        let with = |dns: Vec<IpAddr>| Tunnel {
            iface: "wg0".into(),
            dns,
        };
        assert!(!plan(Egress::Direct, Vec::new()).dns_via_tunnel());
        let mut p = plan(Egress::Direct, Vec::new());
        p.tunnel = Some(with(Vec::new()));
        assert!(!p.dns_via_tunnel());
        p.tunnel = Some(with(vec![IpAddr::from([10, 9, 0, 1])]));
        assert!(p.dns_via_tunnel());
    }
}
