//! The VM namespace's nftables ruleset, built as nft's JSON and applied
//! with `nft -j -f -` from a thread inside that namespace.
//!
//! Why the `nft` binary with JSON rather than a netlink crate: nft is the
//! reference implementation of the ruleset encoding (bytecode, sets,
//! TPROXY), applies a whole ruleset atomically, and its JSON input is a
//! documented, stable schema we can build and unit-test as data. The
//! netlink crates for nf_tables are young and would make us maintain the
//! expression encoding ourselves. The rules live only in the VM's own
//! namespace: the host's ruleset is never touched, and they vanish with
//! the namespace.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::plan::{NetPlan, PROXY_TCP_PORT, PROXY_UDP_PORT};

/// Firewall mark of packets diverted to the proxy; routed to `lo` by a
/// policy rule.
pub const TPROXY_MARK: u32 = 1;
/// Routing table holding the `local 0.0.0.0/0 dev lo` route.
pub const TPROXY_TABLE: u32 = 100;

pub const TABLE: &str = "migrant";
/// Named counter of guest packets dropped for a source address other
/// than the guest's own.
pub const SPOOFED: &str = "spoofed_source";
/// Named counter of guest TCP and UDP packets to multicast addresses,
/// dropped (neighbour discovery is not among them).
pub const MULTICAST: &str = "multicast";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (install nftables)")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the VM's ruleset: {0}")]
    Rejected(String),
}

fn match_eq(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

/// Connection-tracking state is a bit mask: "in" tests for any of the bits.
fn ct_state_in(states: &[&str]) -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": states}})
}

fn iif(tap: &str) -> Value {
    match_eq(json!({"meta": {"key": "iifname"}}), json!(tap))
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}})
}

/// Accept `proto` to the gateway's `port`, arriving on `tap`.
fn to_gateway(tap: &str, gw: &str, proto: &str, port: u16) -> Vec<Value> {
    vec![
        iif(tap),
        match_eq(
            json!({"payload": {"protocol": "ip", "field": "daddr"}}),
            json!(gw),
        ),
        match_eq(
            json!({"payload": {"protocol": proto, "field": "dport"}}),
            json!(port),
        ),
        json!({"accept": null}),
    ]
}

/// The payload protocol of an address's family in nft's JSON.
fn family(ip: std::net::IpAddr) -> &'static str {
    if ip.is_ipv6() { "ip6" } else { "ip" }
}

/// Drop (and count) what the guest sends from any source but `guest`, in
/// that address's family.
fn spoofed(tap: &str, guest: std::net::IpAddr) -> Value {
    let nfproto = if guest.is_ipv6() { "ipv6" } else { "ipv4" };
    rule(
        "prerouting",
        vec![
            iif(tap),
            match_eq(json!({"meta": {"key": "nfproto"}}), json!(nfproto)),
            json!({"match": {"op": "!=",
                "left": {"payload": {"protocol": family(guest), "field": "saddr"}},
                "right": guest.to_string()}}),
            json!({"counter": SPOOFED}),
            json!({"drop": null}),
        ],
    )
}

/// The gateway's closed TCP ports (all but `open`) answer like closed
/// ports: a reset to the SYN (the proxy would otherwise complete the
/// handshake first), counted.
fn closed_ports(tap: &str, gateway: std::net::IpAddr, open: &[u16]) -> Value {
    let mut expr = vec![
        iif(tap),
        match_eq(
            json!({"payload": {"protocol": family(gateway), "field": "daddr"}}),
            json!(gateway.to_string()),
        ),
        match_eq(json!({"meta": {"key": "l4proto"}}), json!("tcp")),
    ];
    if !open.is_empty() {
        expr.push(json!({"match": {"op": "!=",
            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
            "right": {"set": open}}}));
    }
    expr.push(json!({"counter": GATEWAY_REFUSED}));
    expr.push(json!({"reject": {"type": "tcp reset"}}));
    rule("prerouting", expr)
}

/// Neighbour discovery from the guest: neighbour solicitations and
/// advertisements, with the hop limit of 255 that proves they were not
/// routed, from the guest's own address or the unspecified one (duplicate
/// address detection). Only those: each solicitation makes the kernel
/// remember its sender, and neighbour tables are bounded for the whole
/// host, so a guest that could solicit from endless link-local addresses
/// could crowd out the host's own neighbours. Router solicitations (no
/// router answers here), advertisements and redirects are not in it.
fn neighbour_discovery(tap: &str, guest: std::net::Ipv6Addr) -> Vec<Value> {
    vec![
        iif(tap),
        json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
            "right": {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}}}),
        json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
            "right": {"set": [guest.to_string(), "::"]}}}),
        match_eq(
            json!({"payload": {"protocol": "ip6", "field": "hoplimit"}}),
            json!(255),
        ),
        json!({"accept": null}),
    ]
}

/// The IPv6 part of the prerouting chain: everything dropped without
/// `net6`; with it, neighbour discovery, then only the guest's own
/// source address, and the gateway's closed TCP ports reset (DNS over
/// TCP to the gateway is the resolver's, through the proxy).
fn ipv6_rules(tap: &str, net: &NetPlan) -> Vec<Value> {
    let Some(net6) = net.net6 else {
        let v6 = match_eq(json!({"meta": {"key": "nfproto"}}), json!("ipv6"));
        return vec![rule(
            "prerouting",
            vec![iif(tap), v6, json!({"drop": null})],
        )];
    };
    let mut open: Vec<u16> = net.gateway_tcp_holes();
    open.push(53);
    vec![
        rule("prerouting", neighbour_discovery(tap, net6.guest)),
        spoofed(tap, net6.guest.into()),
        closed_ports(tap, net6.gateway.into(), &open),
    ]
}

/// ARP from the guest names only its own address as the sender (or none,
/// for a probe): the kernel remembers the sender of every ARP request for
/// one of its addresses, and neighbour tables are bounded for the whole
/// host (1024 entries by default), so a guest sending requests from
/// endless made-up addresses would leave the host and every other VM
/// unable to reach new neighbours. Dropped and counted as spoofed.
fn arp_rules(tap: &str, net: &NetPlan) -> Vec<Value> {
    let rule = json!({"add": {"rule": {"family": "arp", "table": TABLE, "chain": "input",
    "expr": [
        iif(tap),
        {"match": {"op": "!=",
            "left": {"payload": {"protocol": "arp", "field": "saddr ip"}},
            "right": {"set": [net.guest.to_string(), "0.0.0.0"]}}},
        {"counter": SPOOFED},
        {"drop": null},
    ]}}});
    vec![
        json!({"add": {"table": {"family": "arp", "name": TABLE}}}),
        json!({"add": {"counter": {"family": "arp", "table": TABLE, "name": SPOOFED}}}),
        json!({"add": {"chain": {"family": "arp", "table": TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}}),
        rule,
    ]
}

/// The complete ruleset of the namespace whose guest-facing interface is
/// `tap`, as nft JSON. The guest sends from its leased address only;
/// with a proxy (anything may leave: [`NetPlan::proxied`]) its TCP and
/// UDP are diverted to the TPROXY listeners, else all but DHCP and DNS is
/// dropped; the gateway's TCP ports but the holes' refuse; with a tunnel,
/// its TUN only answers.
pub fn ruleset(tap: &str, net: &NetPlan) -> Value {
    let gw = net.gateway.to_string();
    let mut cmds = vec![
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"add": {"counter": {"family": "inet", "table": TABLE, "name": GATEWAY_REFUSED}}}),
        json!({"add": {"counter": {"family": "inet", "table": TABLE, "name": SPOOFED}}}),
        json!({"add": {"counter": {"family": "inet", "table": TABLE, "name": MULTICAST}}}),
        json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "prerouting",
            "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}}}),
        json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}}),
        json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}}),
        // Anti-spoofing: the guest sends from its leased address only
        // (before its lease, DHCP from 0.0.0.0).
        rule(
            "prerouting",
            vec![
                iif(tap),
                match_eq(
                    json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                    json!("0.0.0.0"),
                ),
                match_eq(
                    json!({"payload": {"protocol": "udp", "field": "dport"}}),
                    json!(67),
                ),
                json!({"accept": null}),
            ],
        ),
        spoofed(tap, net.guest.into()),
        // Replies to connections the supervisor itself opened into the
        // guest (the SSH forward) are ours: deliver them, never divert.
        rule(
            "prerouting",
            vec![
                iif(tap),
                match_eq(
                    json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                    json!(gw.clone()),
                ),
                ct_state_in(&["established", "related"]),
                json!({"accept": null}),
            ],
        ),
        // DHCP (broadcast) and DNS on the gateway are served locally.
        rule(
            "prerouting",
            vec![
                iif(tap),
                match_eq(
                    json!({"payload": {"protocol": "udp", "field": "dport"}}),
                    json!(67),
                ),
                json!({"accept": null}),
            ],
        ),
        // DNS over UDP, and over TCP for answers too large for a datagram.
        rule("prerouting", to_gateway(tap, &gw, "udp", 53)),
        rule("prerouting", to_gateway(tap, &gw, "tcp", 53)),
    ];
    cmds.extend(ipv6_rules(tap, net));
    cmds.push(closed_ports(
        tap,
        net.gateway.into(),
        &net.gateway_tcp_holes(),
    ));
    // TCP and UDP to multicast groups go nowhere (the namespace forwards
    // nothing): dropped here and counted, not left to the proxy.
    for (family, group) in [("ip", ("224.0.0.0", 4)), ("ip6", ("ff00::", 8))] {
        cmds.push(rule(
            "prerouting",
            vec![
                iif(tap),
                match_eq(
                    json!({"payload": {"protocol": family, "field": "daddr"}}),
                    json!({"prefix": {"addr": group.0, "len": group.1}}),
                ),
                json!({"match": {"op": "==",
                    "left": {"meta": {"key": "l4proto"}},
                    "right": {"set": ["tcp", "udp"]}}}),
                json!({"counter": MULTICAST}),
                json!({"drop": null}),
            ],
        ));
    }
    match net.proxied() {
        true => {
            let families: &[(&str, &str)] = match net.net6 {
                Some(_) => &[("ipv4", "ip"), ("ipv6", "ip6")],
                None => &[("ipv4", "ip")],
            };
            for (nfproto, family) in families {
                for (proto, port) in [("tcp", PROXY_TCP_PORT), ("udp", PROXY_UDP_PORT)] {
                    cmds.push(rule(
                        "prerouting",
                        vec![
                            iif(tap),
                            match_eq(json!({"meta": {"key": "nfproto"}}), json!(nfproto)),
                            match_eq(json!({"meta": {"key": "l4proto"}}), json!(proto)),
                            json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": TPROXY_MARK}}),
                            // tproxy assigns the socket but does not end the
                            // chain: accept, or the catch-all drop below wins.
                            json!({"tproxy": {"family": family, "port": port}}),
                            json!({"accept": null}),
                        ],
                    ));
                }
            }
            cmds.push(rule("prerouting", vec![iif(tap), json!({"drop": null})]));
        }
        false => cmds.push(rule("prerouting", vec![iif(tap), json!({"drop": null})])),
    }
    // Anything from the guest that reached the input hook unmarked and is
    // not DHCP/DNS was not meant for us.
    cmds.push(rule(
        "input",
        vec![
            iif(tap),
            match_eq(json!({"meta": {"key": "mark"}}), json!(TPROXY_MARK)),
            json!({"accept": null}),
        ],
    ));
    cmds.push(rule(
        "input",
        vec![
            iif(tap),
            match_eq(
                json!({"payload": {"protocol": "udp", "field": "dport"}}),
                json!({"set": [53, 67]}),
            ),
            json!({"accept": null}),
        ],
    ));
    cmds.push(rule("input", to_gateway(tap, &gw, "tcp", 53))); // Replies to the supervisor's own connections into the guest.
    cmds.push(rule(
        "input",
        vec![
            iif(tap),
            ct_state_in(&["established", "related"]),
            json!({"accept": null}),
        ],
    ));
    if let Some(net6) = net.net6 {
        cmds.push(rule("input", neighbour_discovery(tap, net6.guest)));
    }
    cmds.push(rule("input", vec![iif(tap), json!({"drop": null})]));
    if let Some(tun) = net.tunnel.as_ref().map(|t| t.iface.as_str()) {
        // The far side of the tunnel may answer, never open: no listener
        // of the namespace (DNS, the proxy) is reachable from there.
        cmds.push(rule(
            "input",
            vec![
                iif(tun),
                ct_state_in(&["established", "related"]),
                json!({"accept": null}),
            ],
        ));
        cmds.push(rule("input", vec![iif(tun), json!({"drop": null})]));
    }
    cmds.extend(arp_rules(tap, net));
    json!({"nftables": cmds})
}

/// The named counter of connection attempts to closed gateway TCP ports
/// (refused by the ruleset itself, so the proxy never sees them).
pub const GATEWAY_REFUSED: &str = "gateway_refused";

/// Packets counted so far by each of the named counters `names` of our
/// table, read with one `nft` run; call from a thread inside the
/// namespace.
pub fn read_counters<const N: usize>(names: [&str; N]) -> Result<[u64; N], NftError> {
    // Every counter of the namespace (only ours exist there): a name may
    // stand in both our tables (inet and arp), and the counts add up.
    let out = Command::new("nft")
        .args(["-j", "list", "counters"])
        .stdin(Stdio::null())
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let mut packets = [0u64; N];
    for (p, name) in packets.iter_mut().zip(names) {
        *p = counter_packets(&out.stdout, name)
            .ok_or_else(|| NftError::Rejected(format!("no counter {name} in nft's answer")))?;
    }
    Ok(packets)
}

/// The `packets` of the counters named `name` of our tables in
/// `nft -j list counters` output, added up; `None` when there is none.
fn counter_packets(json: &[u8], name: &str) -> Option<u64> {
    let v: Value = serde_json::from_slice(json).ok()?;
    v["nftables"]
        .as_array()?
        .iter()
        .filter(|o| o["counter"]["name"] == name && o["counter"]["table"] == TABLE)
        .map(|o| o["counter"]["packets"].as_u64())
        .reduce(|a, b| Some(a? + b?))
        .flatten()
}

/// Apply `ruleset` with nft; call from a thread inside the namespace.
pub fn apply(ruleset: &Value) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.to_string().as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Egress, NetRule, Proto};
    use crate::net::plan::tests::plan as net_plan;

    /// TCP holes to the gateway's `ports` (allow-host-port rules).
    fn holes(ports: &[u16]) -> Vec<NetRule> {
        ports
            .iter()
            .map(|&port| NetRule::AllowHostPort {
                proto: Proto::Tcp,
                port,
            })
            .collect()
    }

    fn rules(v: &Value) -> Vec<String> {
        v["nftables"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["add"]["rule"].is_object())
                    .map(|c| c["add"]["rule"]["expr"].to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn direct_egress_diverts_tcp_and_udp_to_the_proxy() {
        let v = ruleset("tap0", &net_plan(Egress::Direct, holes(&[8080])));
        let r = rules(&v);
        // Only the guest's own source address passes (and DHCP before it).
        let spoof = r
            .iter()
            .position(|e| e.contains("spoofed_source") && e.contains("\"10.0.2.15\""))
            .unwrap_or_else(|| panic!("no anti-spoofing rule: {r:?}"));
        let proxy = r
            .iter()
            .position(|e| e.contains("tproxy"))
            .unwrap_or_else(|| panic!("no tproxy: {r:?}"));
        assert!(spoof < proxy);
        assert!(r.iter().any(
            |e| e.contains("\"tproxy\":{\"family\":\"ip\",\"port\":15001}")
                && e.contains("\"tcp\"")
        ));
        assert!(r.iter().any(
            |e| e.contains("\"tproxy\":{\"family\":\"ip\",\"port\":15002}")
                && e.contains("\"udp\"")
        ));
        // The catch-all drop comes after the diversions.
        let last_pre = r
            .iter()
            .rposition(|e| e.contains("tproxy"))
            .unwrap_or(usize::MAX);
        let drop = r
            .iter()
            .position(|e| e == &format!("[{},{{\"drop\":null}}]", iif("tap0")))
            .unwrap_or(0);
        assert!(drop > last_pre);
        // The forward hook drops: the namespace never routes guest packets.
        let forward = v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["add"]["chain"]["name"] == "forward"))
            .map(|c| c["add"]["chain"]["policy"].clone());
        assert_eq!(forward, Some(json!("drop")));
    }

    #[test]
    fn without_a_proxy_nothing_is_diverted() {
        let v = ruleset("tap0", &net_plan(Egress::None, Vec::new()));
        assert!(!v.to_string().contains("tproxy"));
        assert!(v.to_string().contains("10.0.2.2"));
    }

    #[test]
    fn counter_packets_from_nft_json() {
        let out = br#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "gateway_refused", "table": "migrant", "handle": 1, "packets": 7, "bytes": 420}}]}"#;
        assert_eq!(counter_packets(out, GATEWAY_REFUSED), Some(7));
        let both = br#"{"nftables": [{"counter": {"family": "inet", "name": "spoofed_source", "table": "migrant", "packets": 3}}, {"counter": {"family": "arp", "name": "spoofed_source", "table": "migrant", "packets": 4}}, {"counter": {"family": "inet", "name": "spoofed_source", "table": "other", "packets": 50}}]}"#;
        assert_eq!(counter_packets(both, SPOOFED), Some(7));
        assert_eq!(counter_packets(out, "other"), None);
        assert_eq!(counter_packets(b"not json", GATEWAY_REFUSED), None);
    }

    /// nft itself accepts the ruleset (root only: needs a private namespace).
    #[test]
    fn nft_accepts_the_ruleset() {
        if !nix::unistd::Uid::effective().is_root() || crate::qemu::process::which("nft").is_none()
        {
            eprintln!("SKIPPED: needs root and nft");
            return;
        }
        let ns = crate::net::netns::NetNs::create().unwrap_or_else(|e| panic!("{e}"));
        let v6 = Some(crate::config::Net6::standard());
        for (egress, net6) in [
            (Egress::Direct, None),
            (Egress::None, None),
            (Egress::Direct, v6),
        ] {
            // Nothing may leave: no holes either (a hole needs the proxy).
            let holes = match egress {
                Egress::None => Vec::new(),
                _ => holes(&[8080, 8081]),
            };
            let proxy = !holes.is_empty();
            let mut plan = net_plan(egress, holes);
            plan.net6 = net6;
            let listed = ns
                .run(|| {
                    apply(&ruleset("tap0", &plan))?;
                    assert_eq!(
                        read_counters([GATEWAY_REFUSED, SPOOFED, MULTICAST])?,
                        [0, 0, 0]
                    );
                    let out = Command::new("nft")
                        .args(["list", "ruleset"])
                        .output()
                        .map_err(NftError::Spawn)?;
                    // Start over for the next plan.
                    let _ = Command::new("nft").args(["flush", "ruleset"]).status();
                    Ok::<_, NftError>(String::from_utf8_lossy(&out.stdout).into_owned())
                })
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(listed.contains("table inet migrant"), "{listed}");
            let closed = if proxy {
                "ip daddr 10.0.2.2 tcp dport != { 8080, 8081 } counter name \"gateway_refused\" reject with tcp reset"
            } else {
                "ip daddr 10.0.2.2 meta l4proto tcp counter name \"gateway_refused\" reject with tcp reset"
            };
            assert!(listed.contains(closed), "{listed}");
            assert!(
                listed.contains("ct state established,related accept"),
                "{listed}"
            );
            assert_eq!(
                listed.contains("tproxy ip to :15001 accept"),
                proxy,
                "{listed}"
            );
            assert_eq!(
                listed.contains("tproxy ip6 to :15001 accept"),
                net6.is_some(),
                "{listed}"
            );
            if net6.is_some() {
                assert!(
                    listed.contains(
                        "ip6 saddr != fd6d:6967:7261:6e74::15 counter name \"spoofed_source\" drop"
                    ),
                    "{listed}"
                );
                // Neighbour discovery from the guest's own addresses only.
                assert!(
                    listed.contains("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 saddr { ::, fd6d:6967:7261:6e74::15 } ip6 hoplimit 255 accept"),
                    "{listed}"
                );
            } else {
                assert!(listed.contains("meta nfproto ipv6 drop"), "{listed}");
            }
            assert!(
                listed.contains("table arp migrant")
                    && listed.contains(
                        "arp saddr ip != { 0.0.0.0, 10.0.2.15 } counter name \"spoofed_source\" drop"
                    ),
                "{listed}"
            );
        }
    }

    #[test]
    fn the_tunnel_may_answer_but_never_open() {
        let mut plan = net_plan(Egress::Direct, Vec::new());
        plan.tunnel = Some(crate::net::plan::Tunnel {
            iface: "wg0".into(),
            dns: Vec::new(),
        });
        let r = rules(&ruleset("tap0", &plan));
        let accept = r
            .iter()
            .position(|e| e.contains("\"wg0\"") && e.contains("established"))
            .unwrap_or_else(|| panic!("no accept for answers: {r:?}"));
        let drop = r
            .iter()
            .position(|e| e.contains("\"wg0\"") && e.contains("drop"))
            .unwrap_or_else(|| panic!("no drop: {r:?}"));
        assert!(accept < drop);
        plan.tunnel = None;
        let without = rules(&ruleset("tap0", &plan));
        assert!(!without.iter().any(|e| e.contains("wg0")));
    }
}
