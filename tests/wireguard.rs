//! WireGuard egress on a real guest under TCG, against an independent peer
//! (wireguard-go and wg from Debian) in a "vpn" namespace, with keys made
//! for this run. Nothing leaves this machine:
//!
//! ```text
//!   [host ns: migrant] 45.31.0.1, 2001:db8:31::1 ──veth── 45.31.0.2, 2001:db8:31::2 [vpn ns] wireguard-go 10.77.0.1/24,
//!        │                                    │        dnsmasq 10.77.0.1 (ok.test -> 45.20.0.11)
//!        │                                    └ 45.41.0.1 ──veth── 45.41.0.2 ┐
//!        └── 45.10.0.1 ──veth (the direct path, counted) ── 45.10.0.2 [internet ns]
//!                                               45.20.0.12:80 answers with the source address it saw
//! ```

mod common;

use common::net::TestNet;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn sh(ns: &str, script: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wg_key(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut c = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("wg: {e}"));
    if let Some(mut i) = c.stdin.take() {
        i.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = c.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The "vpn" namespace with its wireguard-go peer, beside a [`TestNet`].
struct Vpn {
    ns: String,
    iface: String,
    peer_public: String,
    our_private: String,
    children: Vec<Child>,
}

impl Vpn {
    fn new(net: &TestNet, tag: &str) -> Vpn {
        let id = std::process::id() % 100000;
        let ns = format!("mgt-v{tag}-{id}");
        let iface = format!("mgw{tag}{id}");
        let run = |args: &[&str]| {
            let s = Command::new("ip")
                .args(args)
                .status()
                .unwrap_or_else(|e| panic!("ip: {e}"));
            assert!(s.success(), "ip {args:?}");
        };
        run(&["netns", "add", &ns]);
        let mut vpn = Vpn {
            ns: ns.clone(),
            iface: iface.clone(),
            peer_public: String::new(),
            our_private: String::new(),
            children: Vec::new(),
        };
        run(&[
            "link", "add", "mgt-hv", "netns", &net.host, "type", "veth", "peer", "name", "mgt-vh",
            "netns", &ns,
        ]);
        run(&[
            "link", "add", "mgt-vi", "netns", &ns, "type", "veth", "peer", "name", "mgt-iv",
            "netns", &net.inet,
        ]);
        // The peer is reached over IPv4 (45.31.0.2) and IPv6
        // (2001:db8:31::2), as a provider's server is.
        sh(
            &net.host,
            "sysctl -qw net.ipv6.conf.mgt-hv.disable_ipv6=0 \
             && ip addr add 45.31.0.1/24 dev mgt-hv && ip -6 addr add 2001:db8:31::1/64 dev mgt-hv nodad \
             && ip link set mgt-hv up",
        );
        sh(
            &ns,
            "sysctl -qw net.ipv6.conf.mgt-vh.disable_ipv6=0 && ip -6 addr add 2001:db8:31::2/64 dev mgt-vh nodad \
             && ip link set lo up && ip addr add 45.31.0.2/24 dev mgt-vh && ip link set mgt-vh up \
             && ip addr add 45.41.0.1/24 dev mgt-vi && ip link set mgt-vi up \
             && ip route add default via 45.41.0.2 && sysctl -qw net.ipv4.ip_forward=1",
        );
        sh(
            &net.inet,
            "ip addr add 45.41.0.2/24 dev mgt-iv && ip link set mgt-iv up \
             && ip route add 10.77.0.0/24 via 45.41.0.1 && ip addr add 45.20.0.12/32 dev lo",
        );
        // Count the TCP and UDP packets (all the proxy ever relays) that
        // reach the internet over the host's direct link: the guest's must
        // never be among them. (The host's own kernel chatter there, such
        // as multicast reports, is not a flow and not counted.)
        sh(
            &net.inet,
            "nft add table inet mgt && nft add chain inet mgt pre '{ type filter hook prerouting priority -300; }' \
             && nft add counter inet mgt direct && nft add rule inet mgt pre iifname mgt-ih meta l4proto '{ tcp, udp }' counter name direct \
             && nft add set inet mgt seen4 '{ typeof ip saddr . ip daddr . meta l4proto . th dport; size 256; flags dynamic; }' \
             && nft add set inet mgt seen6 '{ typeof ip6 saddr . ip6 daddr . meta l4proto . th dport; size 256; flags dynamic; }' \
             && nft add rule inet mgt pre iifname mgt-ih meta nfproto ipv4 meta l4proto '{ tcp, udp }' add @seen4 '{ ip saddr . ip daddr . meta l4proto . th dport }' \
             && nft add rule inet mgt pre iifname mgt-ih meta nfproto ipv6 meta l4proto '{ tcp, udp }' add @seen6 '{ ip6 saddr . ip6 daddr . meta l4proto . th dport }'",
        );
        // Echoes the client's address: proof of which way a connection
        // came.
        let whoami = common::net::http_server(&net.inet, "45.20.0.12", 80, "@peer");
        vpn.children.push(whoami);

        let peer_private = wg_key(&["genkey"], "");
        vpn.peer_public = wg_key(&["pubkey"], &peer_private);
        vpn.our_private = wg_key(&["genkey"], "");
        let our_public = wg_key(&["pubkey"], &vpn.our_private);
        let wg = Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", "-f", &iface])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("wireguard-go: {e}"));
        vpn.children.push(wg);
        let sock = format!("/var/run/wireguard/{iface}.sock");
        assert!(
            wait_for(Duration::from_secs(10), || std::path::Path::new(&sock)
                .exists()),
            "wireguard-go did not start"
        );
        let keyfile = std::env::temp_dir().join(format!("mgt-wgkey-{id}"));
        std::fs::write(&keyfile, &peer_private).unwrap_or_else(|e| panic!("{e}"));
        sh(
            &ns,
            &format!(
                "wg set {iface} listen-port 51820 private-key {} peer {our_public} allowed-ips 10.77.0.2/32 \
                 && ip addr add 10.77.0.1/24 dev {iface} && ip link set {iface} up",
                keyfile.display()
            ),
        );
        let _ = std::fs::remove_file(&keyfile);
        let dns = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "dnsmasq",
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=10.77.0.1",
                "--bind-interfaces",
                "--address=/ok.test/45.20.0.11",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("dnsmasq: {e}"));
        vpn.children.push(dns);
        std::thread::sleep(Duration::from_millis(500));
        vpn
    }

    /// A provider-style dual-stack file: an IPv4 and an IPv6 address,
    /// `0.0.0.0/0, ::/0`, an IPv4 resolver.
    fn conf(&self, peer_public: &str, endpoint: &str) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.77.0.2/32, fc00:bbbb:bbbb:bb01::1:102/128\nDNS = 10.77.0.1\n\n\
             [Peer]\nPublicKey = {peer_public}\nEndpoint = {endpoint}\nAllowedIPs = 0.0.0.0/0, ::/0\n\
             PersistentKeepalive = 5\n",
            self.our_private
        )
    }

    /// The peer's side of IPv6 through the tunnel: its address on the
    /// WireGuard interface, the file's IPv6 address among the peer's
    /// allowed IPs, and a route to the internet namespace's IPv6 servers
    /// (which route the tunnel's network back).
    fn add_ipv6(&self, net: &TestNet) {
        let our_public = wg_key(&["pubkey"], &self.our_private);
        sh(
            &self.ns,
            &format!(
                "sysctl -qw net.ipv6.conf.all.forwarding=1 \
                 && sysctl -qw net.ipv6.conf.{iface}.disable_ipv6=0 \
                 && sysctl -qw net.ipv6.conf.mgt-vi.disable_ipv6=0 \
                 && ip -6 addr add fc00:bbbb:bbbb:bb01::1/64 dev {iface} nodad \
                 && wg set {iface} peer {our_public} allowed-ips 10.77.0.2/32,fc00:bbbb:bbbb:bb01::1:102/128 \
                 && ip -6 addr add 2a0a:4100::1/64 dev mgt-vi nodad \
                 && ip -6 route add default via 2a0a:4100::2",
                iface = self.iface
            ),
        );
        sh(
            &net.inet,
            "ip -6 addr add 2a0a:4100::2/64 dev mgt-iv nodad \
             && ip -6 route add fc00:bbbb:bbbb:bb01::/64 via 2a0a:4100::1",
        );
    }

    /// What reached the internet over the host's direct link (source,
    /// destination, protocol, port), for a failure message.
    fn direct_flows(net: &TestNet) -> String {
        sh(
            &net.inet,
            "nft list set inet mgt seen4; nft list set inet mgt seen6",
        )
    }

    /// Packets that reached the internet over the host's direct link.
    fn direct_packets(net: &TestNet) -> u64 {
        let out = sh(&net.inet, "nft -j list counter inet mgt direct");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_u64()))
            .unwrap_or_else(|| panic!("no counter in {out}"))
    }
}

impl Drop for Vpn {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
    }
}

/// The tunnel process of the supervisor `sup`, if any.
fn tunnel_pid(sup: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("__wg ") && cmd.contains(&format!("--parent {sup}"))).then_some(pid)
    })
}

fn wg_json_opt(env: &Env) -> Option<serde_json::Value> {
    let out = env.run(&["wg", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn wg_json(env: &Env) -> serde_json::Value {
    let out = env.ok(&["wg", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("wg --json: {e}: {out}"))
}

#[test]
fn all_egress_goes_through_the_tunnel_and_stops_with_it() {
    let Some(image) = test_image() else { return };
    let net = TestNet::new("w");
    let vpn = Vpn::new(&net, "a");
    let env = Env::new_in("wg", &image, "", Some(&net.host));
    std::fs::write(
        env.project.join("wireguard.conf"),
        vpn.conf(&vpn.peer_public, "[2001:db8:31::2]:51820"),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // The dual-stack file with an IPv6 endpoint works; its IPv6 parts are
    // said to be unused, once.
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("IPv6 parts are unused").count(), 1, "{said}");
    let up = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(up.contains("WireGuard tunnel up"), "{up}");
    assert!(up.contains("DNS through the tunnel: 10.77.0.1"), "{up}");
    let sup = env
        .pid_of("__supervisor")
        .unwrap_or_else(|| panic!("no supervisor"));
    let tunnel = tunnel_pid(sup).unwrap_or_else(|| panic!("no tunnel process"));
    let status = std::fs::read_to_string(format!("/proc/{tunnel}/status")).unwrap_or_default();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        !uid_line.split_whitespace().skip(1).any(|u| u == "0"),
        "the tunnel runs as root: {uid_line}"
    );
    // No capabilities, no new privileges, a seccomp filter.
    for want in ["CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"] {
        assert!(
            status.contains(want),
            "tunnel process lacks {want:?}: {status}"
        );
    }
    let before = wg_json(&env);

    let r = env.probe(&[
        // The server saw the tunnel's address: the flow went through it.
        "http:http://45.20.0.12/",
        // DNS, wherever the guest sends it, is answered by the tunnel's
        // server (the host's resolver would say 45.20.0.10).
        "dns:ok.test",
        "udpdns:45.20.0.53:ok.test",
        "tcpdns:10.0.2.2:ok.test",
        "tcpdns:45.20.0.53:ok.test",
        // The policy still holds inside the tunnel.
        "http:http://45.10.0.1:9090/",
        "tcp:10.0.2.2:22",
    ]);
    expect(&r, "http:http://45.20.0.12/", "10.77.0.2");
    expect(&r, "dns:ok.test", "45.20.0.11");
    expect(&r, "udpdns:45.20.0.53:ok.test", "45.20.0.11");
    expect(&r, "tcpdns:10.0.2.2:ok.test", "45.20.0.11");
    expect(&r, "tcpdns:45.20.0.53:ok.test", "45.20.0.11");
    expect(&r, "http:http://45.10.0.1:9090/", "ERR");
    expect(&r, "tcp:10.0.2.2:22", "ERR");
    assert_eq!(
        Vpn::direct_packets(&net),
        0,
        "guest traffic reached the internet outside the tunnel: {}",
        Vpn::direct_flows(&net)
    );

    // `migrant wg`: a recent handshake, and the bytes of the probe (the
    // supervisor publishes the tunnel's counters once a second).
    let grew = |now: &serde_json::Value| {
        ["sent_bytes", "received_bytes"].iter().all(|k| {
            now["peers"][0][k].as_u64().unwrap_or(0) > before["peers"][0][k].as_u64().unwrap_or(0)
        })
    };
    let mut after = wg_json(&env);
    assert!(
        wait_for(Duration::from_secs(5), || {
            after = wg_json(&env);
            grew(&after)
        }),
        "the byte counts did not grow: {before} -> {after}"
    );
    let peer = &after["peers"][0];
    assert_eq!(peer["public_key"], vpn.peer_public.as_str());
    assert_eq!(peer["endpoint"], "[2001:db8:31::2]:51820");
    let age = peer["latest_handshake_secs"]
        .as_u64()
        .unwrap_or_else(|| panic!("no handshake: {after}"));
    assert!(age < 180, "handshake {age} s ago");
    // Root and the VM's owner read it (root made this VM): another local
    // user learns nothing, not even the peer.
    {
        let out = env.run_as_nobody(&["wg"]);
        assert_eq!(out.status.code(), Some(77), "wg as nobody: {}", text(&out));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&vpn.peer_public),
            "{}",
            text(&out)
        );
    }
    let text = env.ok(&["wg"]);
    assert!(text.contains("latest handshake:"), "{text}");
    assert!(
        text.contains("dns:       10.77.0.1 through the tunnel"),
        "{text}"
    );
    let status = env.ok(&["status"]);
    assert!(
        status.contains("wireguard:   10.77.0.2/32 via [2001:db8:31::2]:51820"),
        "{status}"
    );
    assert!(status.contains("10.77.0.1 through the tunnel"), "{status}");

    // The tunnel process dies: the supervisor starts a new one (new TUN,
    // new handshake) and the guest's egress comes back through it.
    let _ = Command::new("kill")
        .args(["-9", &tunnel.to_string()])
        .status();
    let mut again = None;
    assert!(
        wait_for(Duration::from_secs(20), || {
            again = tunnel_pid(sup).filter(|p| *p != tunnel);
            again.is_some()
        }),
        "no new tunnel process"
    );
    assert!(
        wait_for(Duration::from_secs(30), || {
            wg_json_opt(&env).is_some_and(|v| v["peers"][0]["latest_handshake_secs"].is_u64())
        }),
        "no handshake after the restart"
    );
    let r = env.probe(&["http:http://45.20.0.12/"]);
    expect(&r, "http:http://45.20.0.12/", "10.77.0.2");
    assert_eq!(
        Vpn::direct_packets(&net),
        0,
        "egress leaked around the restart: {}",
        Vpn::direct_flows(&net)
    );

    // The peer goes away: the guest's egress stops, and nothing leaks.
    sh(&vpn.ns, &format!("ip link set {} down", vpn.iface));
    sh(&vpn.ns, "ip link set mgt-vh down");
    let r = env.probe(&["http:http://45.20.0.12/", "http:http://45.20.0.11/"]);
    expect(&r, "http:http://45.20.0.12/", "ERR");
    expect(&r, "http:http://45.20.0.11/", "ERR");
    assert_eq!(
        Vpn::direct_packets(&net),
        0,
        "egress leaked once the tunnel died: {}",
        Vpn::direct_flows(&net)
    );
    // The direct path itself works: the counter is not blind.
    sh(
        &net.host,
        "python3 -c \"import urllib.request; urllib.request.urlopen('http://45.20.0.12/', timeout=5).read()\"",
    );
    assert!(
        Vpn::direct_packets(&net) > 0,
        "the direct-path counter counts nothing"
    );

    env.ok(&["halt", "--force"]);
    assert!(
        wait_for(Duration::from_secs(10), || tunnel_pid(sup).is_none()),
        "the tunnel process outlived the VM"
    );
    env.ok(&["destroy"]);
    env.assert_clean();
}

#[test]
fn a_wrong_key_or_a_dead_endpoint_fails_up_and_leaves_nothing() {
    let Some(image) = test_image() else { return };
    let net = TestNet::new("x");
    let vpn = Vpn::new(&net, "b");
    let env = Env::new_in(
        "wgbad",
        &image,
        "[network]\nwireguard_timeout = 4\n",
        Some(&net.host),
    );
    let stranger = wg_key(&["pubkey"], &wg_key(&["genkey"], ""));
    for (key, endpoint) in [
        (stranger.as_str(), "45.31.0.2:51820"),
        (vpn.peer_public.as_str(), "45.31.0.2:51999"),
    ] {
        std::fs::write(env.project.join("wireguard.conf"), vpn.conf(key, endpoint))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = env.run(&["up"]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(69), "{t}");
        assert!(
            t.contains(&format!(
                "no WireGuard handshake with {endpoint} within 4 s"
            )),
            "{t}"
        );
        assert!(!t.contains(&vpn.our_private), "the private key was printed");
        assert!(env.pid_of("qemu-system").is_none(), "QEMU ran");
        // Nothing runs and nothing of the run is left (processes,
        // namespace, TUN, sockets, wg.json); the VM stays built and
        // stopped, as with any start that fails its checks.
        env.assert_clean();
        let status = env.ok(&["status"]);
        assert!(status.contains("state:       stopped"), "{status}");
        assert!(!status.contains("wireguard:"), "{status}");
    }
    assert_eq!(Vpn::direct_packets(&net), 0, "{}", Vpn::direct_flows(&net));
}

/// `ipv6 = true` with a provider's dual-stack file: the guest's IPv4 and
/// IPv6 both go through the tunnel (the server sees the tunnel's
/// addresses), nothing leaves directly, and the policy holds for IPv6
/// inside the tunnel.
#[test]
fn with_ipv6_both_families_go_through_the_tunnel() {
    let Some(image) = test_image() else { return };
    let net = TestNet::with_ipv6("x");
    let vpn = Vpn::new(&net, "6");
    vpn.add_ipv6(&net);
    let env = Env::new_in("wg6", &image, "[network]\nipv6 = true\n", Some(&net.host));
    std::fs::write(
        env.project.join("wireguard.conf"),
        vpn.conf(&vpn.peer_public, "45.31.0.2:51820"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = env.run(&["up"]);
    assert!(out.status.success(), "up: {}", text(&out));
    // The IPv6 parts are used now: nothing said about them.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("IPv6 parts are unused"),
        "{}",
        text(&out)
    );
    let r = env.probe(&[
        "http:http://45.20.0.12/",
        "http:http://[2a0a:2000::10]/",
        // The host and the LAN stay out of reach inside the tunnel.
        "http:http://[2a0a:1000::1]:9096/",
        "http:http://[fd77::50]/",
    ]);
    expect(&r, "http:http://45.20.0.12/", "10.77.0.2");
    expect(
        &r,
        "http:http://[2a0a:2000::10]/",
        "fc00:bbbb:bbbb:bb01::1:102",
    );
    expect(&r, "http:http://[2a0a:1000::1]:9096/", "ERR");
    expect(&r, "http:http://[fd77::50]/", "ERR");
    assert_eq!(
        Vpn::direct_packets(&net),
        0,
        "guest traffic reached the internet outside the tunnel: {}",
        Vpn::direct_flows(&net)
    );
    let status = env.ok(&["status"]);
    assert!(
        status.contains("fc00:bbbb:bbbb:bb01::1:102/128"),
        "{status}"
    );
    env.ok(&["destroy"]);
    env.assert_clean();
}
